"""Data sets, streamed: inputs read one at a time, in bounded memory, from files, folders, patterns,
``.npz`` shards or any iterable (a ``torch.utils.data.DataLoader`` too).

* :class:`DataSource`: a data set as :class:`~fp16guard.inputs.NamedInput` items, read lazily:
  files one at a time through :data:`fp16guard.inputs.READERS`, iterables item by item. Its
  ``length`` is known for files and sized iterables (the progress display's count and ETA), and
  :meth:`DataSource.indexed` gives each process of a ``torch.distributed`` group its own shard
  (global inputs ``rank::world_size``; files outside the shard are not read).
* :func:`write_shards`: many inputs in a few ``.npz`` files (:data:`fp16guard.inputs.SHARD_ROWS`),
  which every ``--input`` reads back one input per row.
* :class:`RangeWatch`: the early stop: whether the ranges stopped moving, as the power of two of
  every value's amax.

``fp16guard.calibrate`` and ``fp16guard.inspect.streaming.inspect_stream`` take any of these
(:func:`streamed` says when a call streams); their statistics are merged input by input (running
max, sums), so memory holds one block of :data:`BLOCK` inputs, not the data set.
"""

from __future__ import annotations

import collections.abc
import itertools
import math
import numbers
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

from fp16guard import distributed
from fp16guard.errors import InputError, UsageError
from fp16guard.inputs import SHARD_ROWS, NamedInput, input_files, load_file

#: Inputs measured at once (ONNX: one ONNX Runtime session per block and graph); memory holds one
#: block of inputs and their statistics.
BLOCK = 256

#: Inputs a PyTorch module is captured (``torch.export``) with when its inputs are streamed: the
#: first ones of the data set, the same on every rank (dimensions that differ among them are dynamic).
CAPTURE_INPUTS = 16


def _is_paths(data: Any) -> bool:
    """A path, or a non-empty list or tuple of paths (files, folders, patterns)."""
    if isinstance(data, (str, Path)):
        return True
    return isinstance(data, (list, tuple)) and bool(data) and all(isinstance(d, (str, Path)) for d in data)


def _rows(path: Path) -> int | None:
    """How many inputs a file holds, without decoding it: a shard's rows, else 1; None for a
    Polygraphy ``.json`` (known once read)."""
    suffix = path.suffix.lower()
    if suffix == ".json":
        return None
    if suffix != ".npz" or not zipfile.is_zipfile(path):
        return 1  # not an archive: the reader names the damage when the file is read
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as z:
            return int(z[SHARD_ROWS]) if SHARD_ROWS in z.files else 1
    except (ValueError, OSError, zipfile.BadZipFile, EOFError):
        return 1  # the reader names the damage when the file is read


def to_input(item: Any, label: str) -> NamedInput:
    """One item of an iterable as a :class:`NamedInput`: kept if it is one; a mapping (a DataLoader's
    dict batch) as arrays named by its keys; a tuple or list as positional arrays; an array or
    tensor (copied to numpy on the CPU) as one array."""
    if isinstance(item, NamedInput):
        return item
    import numpy as np

    def array(a):
        """A numpy array of ``a`` (a tensor is detached and copied to the CPU)."""
        return np.asarray(a.detach().cpu() if hasattr(a, "detach") else a)
    if isinstance(item, Mapping):
        return NamedInput(label, tuple(array(v) for v in item.values()), names=tuple(str(k) for k in item))
    arrays = item if isinstance(item, (tuple, list)) else (item,)
    return NamedInput(label, tuple(array(a) for a in arrays))


def _presharded(data: Any) -> bool:
    """A DataLoader whose sampler is a ``DistributedSampler``: each rank already reads its own share."""
    sampler = getattr(data, "sampler", None)
    return type(sampler).__name__ == "DistributedSampler"


class DataSource:
    """A data set read one input at a time.

    Args:
        data: a path, or a list of paths: files of any :data:`~fp16guard.inputs.READERS` type,
            folders (their files, sorted by name), quoted patterns (``"calib/*.npz"``) and ``.npz``
            shards (one input per row, :func:`write_shards`); or any iterable of inputs (``NamedInput``
            items, arrays, tensors, tuples of them for several model inputs, dicts by input name):
            a list, a generator, a ``torch.utils.data.DataLoader`` (each batch one input); or a
            single ``NamedInput``.
        what: how items without a label are labelled, with their index in the whole data set
            (``calibration input 7``: the labels a list gives); default ``input``, or the word of
            the call that reads it (``calibration input`` for ``calibrate``).
        transform: applied to each input as it is read (a PyTorch model's ``.npz`` keys in
            ``forward``'s order, say).
        sharded: each process of a ``torch.distributed`` group already reads its own share (then
            rank ``r``'s ``i``-th item is input ``i * world_size + r``). Default: True for a
            DataLoader with a ``DistributedSampler``, else False (every rank reads ``rank::world_size``).

    Raises:
        InputError: a path that does not exist, a folder without inputs, a pattern matching none.
    """

    def __init__(self, data: Any, *, what: str | None = None,
                 transform: Callable[[NamedInput], NamedInput] | None = None, sharded: bool | None = None):
        if isinstance(data, DataSource):
            src = data
            data, what, transform = src.data, what or src.what, transform or src.transform
            sharded = src.sharded if sharded is None else sharded
        self.data = [data] if isinstance(data, NamedInput) else data
        self.what = what
        self.transform = transform
        self.files = input_files([data] if isinstance(data, (str, Path)) else data) if _is_paths(data) else None
        self.sharded = _presharded(data) if sharded is None else sharded
        self._length: int | None = None
        for f in self.files or ():
            if not f.is_file():
                load_file(f)  # its error: not found, a symlink loop

    @property
    def reiterable(self) -> bool:
        """Whether the data set can be read again (files, lists, DataLoaders; not a generator)."""
        return self.files is not None or not isinstance(self.data, collections.abc.Iterator)

    @property
    def length(self) -> int | None:
        """The number of inputs of the whole data set, or None when only reading tells (a
        generator, a Polygraphy ``.json``)."""
        if self._length is None:
            if self.files is not None:
                counts = [_rows(f) for f in self.files]
                self._length = None if None in counts else sum(counts)  # type: ignore[arg-type]
            elif isinstance(self.data, collections.abc.Sized):
                self._length = len(self.data)
        return self._length

    def share(self, rank: int | None = None, world: int | None = None) -> int | None:
        """How many inputs rank ``rank`` of ``world`` reads (default: this process's), or None."""
        r = distributed.rank() if rank is None else rank
        w = distributed.world_size() if world is None else world
        n = self.length
        if n is None:
            return None
        return n if self.sharded else max(0, math.ceil((n - r) / w))

    def describe(self) -> str:
        """The data set in a few words, for progress lines and notes."""
        if self.files is not None:
            n = len(self.files)
            return f"{n} file{'s' * (n != 1)}" if n != 1 else str(self.files[0])
        return type(self.data).__name__

    def indexed(self, rank: int | None = None, world: int | None = None) -> Iterator[tuple[int, NamedInput]]:
        """``(index in the whole data set, input)`` of the inputs rank ``rank`` of ``world`` reads
        (default: this process's; global inputs ``rank::world``). Files none of whose inputs are
        the rank's are not read."""
        r = distributed.rank() if rank is None else rank
        w = distributed.world_size() if world is None else world
        fit = self.transform or (lambda item: item)
        if self.files is not None:
            start = 0
            for f in self.files:
                n = _rows(f) if w > 1 else None
                if n is not None and not any((start + k) % w == r for k in range(min(n, w))):
                    start += n  # none of this file's inputs is this rank's: not read
                    continue
                items = load_file(f)
                for k, item in enumerate(items):
                    if (start + k) % w == r:
                        yield start + k, fit(item)
                start += len(items)
            return
        for i, item in enumerate(self.data):
            g = i * w + r if self.sharded else i
            if self.sharded or g % w == r:
                yield g, fit(to_input(item, f"{self.what or 'input'} {g}"))

    def __iter__(self) -> Iterator[NamedInput]:
        """The inputs this process reads (all of them without a process group)."""
        return (item for _, item in self.indexed())

    def peek(self, n: int) -> list[NamedInput]:
        """The first ``n`` inputs of the whole data set (of this rank's share when ``sharded``); a
        generator keeps them for the pass that follows."""
        if self.files is not None or not isinstance(self.data, collections.abc.Iterator):
            rank, world = (None, None) if self.sharded else (0, 1)
            return [item for _, item in itertools.islice(self.indexed(rank, world), n)]
        raw = list(itertools.islice(self.data, n))
        self.data = itertools.chain(raw, self.data)
        fit = self.transform or (lambda item: item)
        r, w = (distributed.rank(), distributed.world_size()) if self.sharded else (0, 1)
        return [fit(to_input(item, f"{self.what or 'input'} {i * w + r if self.sharded else i}"))
                for i, item in enumerate(raw)]


def streamed(data: Any) -> bool:
    """Whether the API takes ``data`` as a stream (a :class:`DataSource`): paths, generators,
    DataLoaders and other iterables that are not a list or tuple, and anything once a
    ``torch.distributed`` group is active (each rank then reads its own shard). Lists, tuples,
    single arrays, tensors and ``NamedInput`` items are taken whole, as always."""
    if isinstance(data, DataSource) or _is_paths(data) or distributed.active():
        return True
    if isinstance(data, (list, tuple, NamedInput)) or hasattr(data, "detach") or hasattr(data, "__array__"):
        return False
    return isinstance(data, collections.abc.Iterable)


def blocks(pairs: Iterable[Any], size: int = BLOCK) -> Iterator[list[Any]]:
    """``pairs`` in lists of ``size`` (the last one shorter)."""
    it = iter(pairs)
    while block := list(itertools.islice(it, size)):
        yield block


def write_shards(inputs: Iterable[Any], folder: str | Path, *, rows: int = 1000, prefix: str = "shard") -> list[Path]:
    """Write inputs as ``.npz`` shards of ``rows`` inputs each: ``<folder>/<prefix>-00000.npz``, ...

    Each shard stacks the inputs' arrays along a new first axis (input ``i`` is row ``i``; the
    arrays of one shard share their shapes), keyed by the inputs' names (``arr_0``, ... when they
    have none), with :data:`~fp16guard.inputs.SHARD_ROWS`. Inputs are read one at a time, so a
    generator is written in the memory of one shard.

    Returns:
        The paths written, in order.

    Raises:
        InputError: the inputs of one shard differ in shapes, dtypes or number of arrays.
    """
    import numpy as np

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    items = (to_input(item, f"input {i}") for i, item in enumerate(inputs))
    for k, chunk in enumerate(blocks(items, rows)):
        keys = list(chunk[0].names) or [f"arr_{j}" for j in range(len(chunk[0].arrays))]
        try:
            stacked = {key: np.stack([item.arrays[j] for item in chunk]) for j, key in enumerate(keys)}
        except (ValueError, IndexError) as e:
            raise InputError(f"shard {k}: its inputs differ in their arrays ({e}); give inputs of one form") from None
        path = folder / f"{prefix}-{k:05d}.npz"
        np.savez(path, **stacked, **{SHARD_ROWS: np.array(len(chunk))})
        paths.append(path)
    return paths


def exponent(amax: float) -> int | str | None:
    """The power of two that bounds ``amax`` (``math.frexp``'s exponent: ``2**(e-1) <= amax < 2**e``);
    ``"inf"`` for a non-finite value, None for 0."""
    if not math.isfinite(amax):
        return "inf"
    return math.frexp(amax)[1] if amax > 0 else None


class RangeWatch:
    """The early stop: whether the ranges stopped moving.

    After each block of inputs, :meth:`update` takes the running amax of every value; the ranges
    moved when the power of two of any of them (:func:`exponent`, the scale the solver picks moves
    only with it) changed. ``patience`` inputs in a row that moved nothing stop the pass
    (checked at block ends: a block that moved something counts as moving at its last input).

    Args:
        patience: inputs without a change that stop; None never stops.

    Raises:
        UsageError: ``patience`` is not a whole number of at least 1 (nor None).
    """

    def __init__(self, patience: int | None):
        if patience is not None and (isinstance(patience, bool) or not isinstance(patience, numbers.Integral)
                                     or patience < 1):
            raise UsageError(f"early_stop={patience!r}: give a whole number of inputs, 1 or more, or None")
        self.patience = None if patience is None else int(patience)
        self.seen = 0
        self.changed_at = 0
        self.stopped = False
        self._last: dict[str, Any] | None = None

    def update(self, amax: Mapping[str, float], count: int) -> bool:
        """Count ``count`` more inputs with the running ``amax`` after them; True once the ranges
        have not moved for ``patience`` inputs."""
        self.seen += count
        signature = {name: exponent(a) for name, a in amax.items()}
        if signature != self._last:
            self._last, self.changed_at = signature, self.seen
        self.stopped = self.patience is not None and self.seen - self.changed_at >= self.patience
        return self.stopped

    def note(self, total: int | None = None) -> str:
        """The line that says when and why the pass stopped."""
        of = f" of {total}" if total is not None else ""
        return (f"early stop: no value's power of two moved over inputs {self.changed_at + 1} to {self.seen} "
                f"(patience {self.patience}); stopped after input {self.seen}{of}")
