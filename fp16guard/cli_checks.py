"""The command line's checks of the options themselves, before any work and before torch loads.

:func:`check_options` refuses what the command line alone shows is wrong: output paths that cannot
be written or would overwrite an input, option values out of range, options that do not apply, an
unknown backend or device, a ``--metric`` that cannot be imported.
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path

from fp16guard.cli_parser import BISECT_BACKENDS, FIX_BACKENDS
from fp16guard.errors import UsageError
from fp16guard.fp16 import DEFAULT_TOLERANCE
from fp16guard.loading import FACTORY, Framework, model_files, model_format


#: Options that name a file the command writes, by argparse destination.
OUTPUT_OPTIONS = {"output": "-o", "json": "--json", "plot": "--plot", "save_plan": "--save-plan",
                  "layer_precisions": "--layer-precisions", "save_fp32": "--save-fp32", "save_outputs": "--save-outputs"}
#: Options that name a file the command reads, by argparse destination.
READ_OPTIONS = {"model": "model", "checkpoint": "checkpoint", "plan": "plan", "input": "input",
                "validate": "validation input"}


def _check_outputs(args) -> None:
    """Refuse an output path that cannot be written or would destroy something, before any work.

    Raises:
        UsageError: the path is a folder, a FIFO or device, a symlink loop, a name too long for its
            filesystem; its folder is missing, not a folder or not writable
            (:func:`~fp16guard.files.check_writable`); it is a file the command reads (the model, an
            input, the plan: by path, or by inode for a hard link); two outputs name one file;
            ``--plot`` has a format matplotlib cannot write, or one that needs a program this
            machine lacks (``.pgf`` needs LaTeX).
    """
    from fp16guard.files import check_writable, file_identity

    written: dict[Path, str] = {}
    read: dict[Path, str] = {}
    identities: dict[tuple[int, int], str] = {}
    for dest, flag in READ_OPTIONS.items():
        value = getattr(args, dest, None)
        for v in (value if isinstance(value, list) else [value] if value else []):
            with contextlib.suppress(OSError, RuntimeError):  # a loop or a bad name: the read check says so
                read[Path(v).resolve()] = flag
            for f in _files_of(v):
                ident = file_identity(f)
                if ident is not None:
                    identities.setdefault(ident, flag)
    for dest, flag in OUTPUT_OPTIONS.items():
        path = getattr(args, dest, None)
        if not path:
            continue
        p = check_writable(path, flag, reads=identities)
        if p in read:
            raise UsageError(f"{flag} {path} would overwrite the {read[p]} the command reads; write elsewhere")
        if p in written:
            raise UsageError(f"{flag} and {written[p]} name the same file {path}; give each its own")
        written[p] = flag
    plot = getattr(args, "plot", None)
    if plot:
        from matplotlib.backend_bases import FigureCanvasBase

        formats = FigureCanvasBase.get_supported_filetypes()
        suffix = Path(plot).suffix.lower().lstrip(".")
        if suffix not in formats:
            raise UsageError(f"--plot {plot}: matplotlib cannot write {suffix or 'a file without a suffix'!r}; "
                             f"end it in .png, .svg or .pdf")
        if suffix == "pgf":
            import shutil

            import matplotlib

            tex = matplotlib.rcParams["pgf.texsystem"]
            if shutil.which(tex) is None:
                raise UsageError(f"--plot {plot}: matplotlib writes .pgf through {tex}, which is not installed; "
                                 f"end it in .png, .svg or .pdf")


def _files_of(value: str) -> list[str]:
    """``value`` and, for a folder (an ``--input`` folder), the files directly inside it."""
    try:
        if os.path.isdir(value):
            return [os.path.join(value, n) for n in os.listdir(value)]
    except OSError:
        return []
    return [value]


def check_options(args) -> None:
    """Refuse, before any work, what the command line alone shows is wrong: output paths
    (:func:`_check_outputs`), option values out of range (a headroom target beyond FP16's normal
    range, a tolerance that is not positive and finite, counts below 1, an unknown backend or
    device), options that do not apply (``--checkpoint`` with an ONNX model, ``--stream`` or
    ``--early-stop`` with ``--submodule``), and a ``--metric``
    that cannot be imported.

    Raises:
        UsageError: naming the option, the value, and what to give instead.
        BackendError: ``--device cuda`` on a machine without CUDA.
    """
    _check_outputs(args)
    target = getattr(args, "target_log2", None)
    if target is not None and not 1 <= target <= 15:
        raise UsageError(f"--target-log2 {target}: give 1 to 15 (stored activations at most 2^K; 2^15 = 32768 is "
                         f"the largest power of two below 65504)")
    tolerance = getattr(args, "tolerance", None)
    relative_l2 = args.command == "fix" or args.command == "bisect" and getattr(args, "metric", None) is None
    if relative_l2 and tolerance is not None and not 0 < tolerance < float("inf"):
        raise UsageError(f"--tolerance {tolerance}: give a positive relative L2 error, e.g. {DEFAULT_TOLERANCE:g}")
    if tolerance is not None and math.isnan(tolerance):  # a task metric's threshold: any number but NaN
        raise UsageError(f"--tolerance {tolerance}: give a number")
    for dest, flag in (("max_offenders", "--max-offenders"), ("top", "--top")):
        count = getattr(args, dest, None)
        if count is not None and count < 1:
            raise UsageError(f"{flag} {count}: give 1 or more")
    budget = getattr(args, "memory_budget", None)
    if budget is not None and not 0 < budget < float("inf"):
        raise UsageError(f"--memory-budget {budget}: give a positive size in GiB, e.g. 1")
    streamed = ("--early-stop" if getattr(args, "early_stop", None) is not None
                else "--stream" if getattr(args, "stream", False) else None)
    if streamed and getattr(args, "submodule", None):
        raise UsageError(f"{streamed} does not apply with --submodule: a submodule is calibrated on the inputs the whole "
                         f"model gives it, read whole; drop {streamed}")
    backend = getattr(args, "backend", None)
    known = BISECT_BACKENDS if args.command == "bisect" else FIX_BACKENDS
    if backend is not None and backend not in known:
        raise UsageError(f"--backend {backend}: unknown backend; choose one of {', '.join(known)}")
    if getattr(args, "checkpoint", None) and args.command != "export":  # export's CHECKPOINT is its model
        model = getattr(args, "model", None)
        if getattr(args, "example", None) or not model or model_format(model) or ":" not in model:
            raise UsageError(f"--checkpoint applies to {FACTORY} models ({model_files()}, or an example, holds its "
                             f"weights); drop it")
    device = getattr(args, "device", None)
    given = model_format(getattr(args, "model", None))
    if device is not None and args.command == "inspect" and device != "cpu" and not (
            given and given.framework is Framework.ONNX):
        _check_device(device)
    if getattr(args, "metric", None):
        from fp16guard.compare import load_metric

        load_metric(args.metric)


def _check_device(device: str) -> None:
    """``--device`` must parse as a torch device, and a CUDA one must exist.

    Raises:
        UsageError: not a device string. BackendError: a CUDA device this machine does not have.
    """
    import torch

    from fp16guard.errors import BackendError

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {device}: not a device; give cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BackendError(f"--device {device}: no CUDA device is visible on this machine; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise BackendError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {device}: fp16guard runs on cpu or cuda")
