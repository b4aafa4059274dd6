"""Imports of optional dependencies, failing with one line that names the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType

from fp16guard.errors import MissingDependencyError


def require(module: str, *, extra: str, purpose: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingDependencyError`.

    Args:
        module: the import name (``skimage``).
        extra: the fp16guard extra that installs it (``examples``).
        purpose: what it is needed for, completing "... is needed for <purpose>".
    """
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependencyError(
            f"{module} is needed for {purpose} but is not installed: pip install 'fp16guard[{extra}]'"
        ) from None
