"""Every error fp16guard raises on purpose, under one base, each with the CLI exit status it maps to.

The command line (:func:`fp16guard.cli.main`) prints any :class:`Fp16GuardError` as one line,
``fp16guard: error: <message>``, on stderr and exits with the class's :attr:`~Fp16GuardError.exit_code`:

* :class:`UsageError` (exit 2): the command line is inconsistent (a flag that does not apply)
* :class:`InputError` (exit 2): an input file is missing, unreadable or does not fit the model
* :class:`ModelLoadError` (exit 2): a model file or factory cannot be loaded
* :class:`PlanError` (exit 2): a plan file is malformed or belongs to another model
* :class:`ExportError` (exit 2): ``torch.export`` / the ONNX exporter cannot capture the model
* :class:`SplitError` (exit 2): bisect cannot cut the model (PyTorch or ONNX)
* :class:`BisectError` (exit 2): bisect was asked something it cannot answer (no inputs, no op)
* :class:`RewriteError` (exit 2): a rewrite cannot be applied (a rescaled constant beyond FP16)
* :class:`BackendError` (exit 2): the FP16 backend cannot run here (no CUDA, no TensorRT)
* :class:`AssetError` (exit 2): an example's weights cannot be fetched or fail their hash
* :class:`MissingDependencyError` (exit 2): an optional package is not installed
* :class:`WtsError` (exit 2): a tensorrtx ``.wts`` weights file is missing or malformed
* :class:`FixError` (exit 2): the model cannot be fixed as asked (no inputs, FP32 already inf)
* :class:`OutputError` (exit 2): an output cannot be written (a full disk); nothing was left
* :class:`StillOverflowsError` (exit 1): the fixed model still gives inf/NaN in FP16: an FP16 problem
* :class:`InaccurateFixError` (exit 1): the fixed model is finite but worse than the tolerance, naive FP16 or the FP32 fallback

Exit status 1 means only "an FP16 problem was found"; anything that is not an
:class:`Fp16GuardError` is a bug and ends in a traceback, never disguised as either status.
Each class also derives from the builtin it replaced (``ValueError``, ``RuntimeError``,
``ImportError``), so ``except ValueError`` written against earlier releases still catches it.
"""

from __future__ import annotations

#: Exit statuses of the command line.
EXIT_CLEAN = 0
EXIT_OVERFLOW = 1
EXIT_USAGE = 2


class Fp16GuardError(Exception):
    """Base of every error fp16guard raises on purpose; ``exit_code`` is the CLI status (2: usage)."""

    exit_code = EXIT_USAGE


class UsageError(Fp16GuardError, ValueError):
    """The command line asks for something inconsistent (the message says what to give instead)."""


class InputError(Fp16GuardError, ValueError):
    """An input file is missing, unreadable, or does not fit the model."""


class ModelLoadError(Fp16GuardError, ValueError):
    """A model file is missing, unreadable, or not something fp16guard can run."""


class PlanError(Fp16GuardError, ValueError):
    """A plan file is missing, malformed, from another schema version, or does not match the model."""


class ExportError(Fp16GuardError, ValueError):
    """``torch.export`` or the ONNX exporter cannot capture the model; the message says what to try."""


class SplitError(Fp16GuardError, ValueError):
    """A model cannot be captured or cut into an FP16 prefix and an FP32 suffix."""


class OnnxSplitError(SplitError):
    """An ONNX graph cannot be cut (a value crossing a cut has no inferred type, or no float value to cut after)."""


class BisectError(Fp16GuardError, ValueError):
    """bisect cannot run as asked (no inputs, nothing to cut)."""


class RewriteError(Fp16GuardError, ValueError):
    """A rewrite cannot be applied (for example a rescaled constant no longer fits FP16)."""


class BackendError(Fp16GuardError, RuntimeError):
    """The FP16 backend cannot run here (missing library, no GPU) or failed to build an engine."""


class AssetError(Fp16GuardError, RuntimeError):
    """An example asset cannot be fetched, or its hash does not match."""


class MissingDependencyError(Fp16GuardError, ImportError):
    """An optional dependency is not installed; the message names the pip extra that brings it."""


class WtsError(Fp16GuardError, ValueError):
    """A tensorrtx ``.wts`` weights file is missing or malformed (the message names the file and line)."""


class FixError(Fp16GuardError, RuntimeError):
    """The model cannot be fixed as asked: no inputs, or the FP32 model itself gives inf/NaN."""


class OutputError(Fp16GuardError, OSError):
    """An output file cannot be written (no space left, a quota, a read-only filesystem); the
    command's outputs are removed (:class:`fp16guard.files.OutputSet`)."""


class StillOverflowsError(FixError):
    """The fixed model still produces inf/NaN in FP16 (exit status 1: an FP16 problem was found)."""

    exit_code = EXIT_OVERFLOW


class InaccurateFixError(StillOverflowsError):
    """The fixed model is finite but not right enough: an input's error exceeds the tolerance, or
    is clearly worse than the naive FP16 conversion or the FP32 fallback (exit status 1)."""


def first_line(e: BaseException) -> str:
    """The first non-empty line of an exception's message, stripped (library errors run to many
    lines; a one-line error quotes only this)."""
    return next((line.strip() for line in str(e).splitlines() if line.strip()), "")
