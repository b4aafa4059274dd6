"""fp16guard's cache folder: fetched example weights and TensorRT engines."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Where fetched and cached files live: ``$FP16GUARD_CACHE`` or ``~/.cache/fp16guard``."""
    return Path(os.environ.get("FP16GUARD_CACHE", Path.home() / ".cache" / "fp16guard"))
