"""Strict JSON for every document fp16guard writes (reports, plans, bisect and fix results).

JSON has no infinity or NaN, and Python's ``json`` module writes ``Infinity``/``NaN`` unless told
not to, which most parsers (``jq``, JavaScript's ``JSON.parse``, Go, Rust's serde) reject. One rule
covers every document: **a float that is not finite is written as the string ``"inf"``,
``"-inf"`` or ``"nan"``**, which Python's ``float()`` reads back. Everything is then dumped with
``allow_nan=False``, so a missed case raises instead of writing an invalid file.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def strict(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by ``"inf"``, ``"-inf"`` or ``"nan"``
    (dicts, lists and tuples walked recursively; tuples become lists; numpy scalars become Python
    numbers)."""
    if isinstance(obj, dict):
        return {k: strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v) for v in obj]
    if type(obj).__module__ == "numpy" and hasattr(obj, "item"):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    return obj


def dumps(obj: Any, *, indent: int | None = 1) -> str:
    """Strict JSON text of ``obj`` (see the module docstring); raises ``ValueError`` on a NaN that
    :func:`strict` did not reach."""
    return json.dumps(strict(obj), indent=indent, allow_nan=False)


def write(obj: Any, path: str | Path) -> Path:
    """Write :func:`dumps` of ``obj`` and a newline to ``path``, atomically
    (:func:`fp16guard.files.write_text`: a temporary file renamed into place); returns the path.

    Raises:
        OSError: the file cannot be written (for example its folder does not exist); nothing is left.
    """
    from fp16guard.files import write_text

    return write_text(path, dumps(obj) + "\n")
