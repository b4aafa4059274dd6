"""The command line on streamed data sets and under ``torchrun``: ``--stream`` and ``--early-stop N``
for ``inspect`` and ``calibrate``, and the process group a ``torchrun`` launch describes.

``--input`` then becomes a :class:`~fp16guard.datasets.DataSource` (files, folders, quoted patterns,
``.npz`` shards, read one at a time: :func:`stream_inputs`), which ``calibrate``
(:mod:`fp16guard.fixing.streaming`) and ``inspect`` (:func:`fp16guard.inspect.streaming.inspect_stream`)
measure in bounded memory. Under ``torchrun --nproc-per-node N --no-python fp16guard ...`` every
process joins the group (:func:`process_group`: gloo, or NCCL with ``--device cuda``), reads its own
shard of ``--input``, and the statistics are merged across processes; rank 0 alone prints and
writes the files, the other ranks write nothing.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from fp16guard import distributed
from fp16guard.files import OutputSet

if TYPE_CHECKING:
    import argparse

    from rich.console import Console


def _count(text: str) -> int:
    """A count of at least 1 (argparse's ``type``: a bad one is a usage error, exit 2)."""
    import argparse

    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count of inputs; give a whole number, 1 or more")
    return n


def add_stream_arguments(p: argparse.ArgumentParser) -> None:
    """``--stream`` and ``--early-stop N`` (``inspect`` and ``calibrate``)."""
    p.add_argument("--stream", action="store_true",
                   help="read --input one file at a time, statistics merged as they come (bounded memory; ONNX "
                        "inspect: one record per node over all inputs); implied by --early-stop and torchrun")
    p.add_argument("--early-stop", type=_count, default=None, metavar="N",
                   help="stop reading --input once no value's power of two moved for N inputs (a warning says "
                        "after which input)")


def wants_stream(args: argparse.Namespace) -> bool:
    """Whether this command reads ``--input`` as a stream: ``inspect`` or ``calibrate`` with
    ``--stream``, ``--early-stop`` or under ``torchrun``, for a MODEL with ``--input`` (not an
    example, not ``--submodule``)."""
    asked = getattr(args, "stream", False) or getattr(args, "early_stop", None) is not None or distributed.launched()
    return bool(asked and args.command in ("inspect", "calibrate") and args.input and not args.example
                and not getattr(args, "submodule", None))


def stream_inputs(args: argparse.Namespace, model, framework: str):
    """``--input`` as a :class:`~fp16guard.datasets.DataSource` (a PyTorch model's ``.npz`` keys in
    ``forward``'s order, as :func:`~fp16guard.loading.by_forward_names` puts them)."""
    from fp16guard.datasets import DataSource
    from fp16guard.loading import Framework, by_forward_names

    if framework == Framework.ONNX:
        return DataSource(args.input)
    return DataSource(args.input, transform=lambda item: by_forward_names(model, item))


def inspect_streamed(args: argparse.Namespace, model, inputs, name: str):
    """The report of ``inspect`` on a stream (:func:`~fp16guard.inspect.streaming.inspect_stream`)."""
    from fp16guard.inspect.streaming import inspect_stream

    return inspect_stream(model, inputs, early_stop=args.early_stop, ops=args.ops, device=args.device,
                          half=args.half, cuda_graph=None if args.cuda_graph else False,
                          memory_budget=int(args.memory_budget * (1 << 30)), source=name)


class _Discarded(OutputSet):
    """A rank other than 0: its files go to a private folder that is removed, whatever happens."""

    def __init__(self) -> None:
        super().__init__()
        self.folder = Path(tempfile.mkdtemp(prefix="fp16guard-rank-"))

    def path(self, target: str | Path) -> Path:
        """Where ``target`` is written on this rank: a file of its name in the discarded folder."""
        return super().path(self.folder / Path(target).name)

    def __exit__(self, kind, value, tb) -> None:
        self.discard()
        shutil.rmtree(self.folder, ignore_errors=True)


@contextlib.contextmanager
def process_group(args: argparse.Namespace, console: Console) -> Iterator[OutputSet]:
    """The command's :class:`~fp16guard.files.OutputSet`, inside the process group a ``torchrun``
    launch describes (joined here, left at the end; nothing without one). On a rank other than 0
    the console and the progress display are silent and the files are discarded."""
    started = distributed.init_from_env(getattr(args, "device", "cpu") or "cpu")
    try:
        if distributed.is_main():
            with OutputSet() as outputs:
                yield outputs
        else:
            console.quiet = True
            args.progress = None
            with _Discarded() as outputs:
                yield outputs
    finally:
        if started:
            distributed.finish()
