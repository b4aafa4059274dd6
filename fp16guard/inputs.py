"""Model inputs: files to :class:`NamedInput` through one table of readers, and the one path from
a :class:`NamedInput` to what a model is fed.

:data:`READERS` maps a file suffix to an :class:`InputReader` (``read(path) -> list[NamedInput]``
and how messages name the type); everything that lists input types reads it (folders in
:func:`load_inputs`, the messages, ``--input``'s help, the examples). A new suffix is one reader
function and one row (``docs/inputs.md``). Readers return raw decoded images and waveforms, with
their :class:`InputKind`; the example (or the user's model) applies its own preprocessing.
:class:`NamedInput` and :class:`InputKind` themselves stand below this module, in
:mod:`fp16guard.named_input` (the model loaders and the Polygraphy reader use them too), and
are handed on here.

Every command feeds models through :func:`as_inputs` (what the Python API was given ->
``NamedInput`` items), :func:`onnx_feed` (-> ``{input name: array}``) and :func:`torch_args` (-> a
tuple of tensors; raw images and waveforms in the generic layout a PyTorch model takes), checked
against the model by one function, :func:`check_feeds`; so ``inspect``, ``bisect``, ``calibrate``
and ``fix`` accept the same inputs for the same model. numpy and torch are imported where used:
``--help`` reads :data:`READERS` without them.
"""

from __future__ import annotations

import glob
import re
import wave
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from fp16guard.errors import InputError, first_line
from fp16guard.named_input import (  # handed on too: fp16guard.inputs.NamedInput is the everyday spelling
    InputKind,
    NamedInput,
    check_input_path,
    file_input,
    native,
)

if TYPE_CHECKING:
    import numpy as np


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """Read a PCM ``.wav`` (8/16/32-bit integer) as mono float32 in [-1, 1].

    A file whose sample data ends mid-frame (its length not a multiple of sample width x channels,
    or shorter than its header says by a partial frame) is refused rather than read up to its last
    complete frame: such a file was cut off (an interrupted copy, download or recording), so more
    than the partial sample may be missing, and an analysis of a silently shortened waveform would
    read as one of the whole file.

    Returns:
        ``(waveform [T] float32, sample_rate in Hz)``; several channels are averaged.

    Raises:
        InputError: not a readable PCM WAV file, an unsupported sample width, or data ending mid-frame.
    """
    import numpy as np

    try:
        with wave.open(str(path), "rb") as w:
            width, channels, rate = w.getsampwidth(), w.getnchannels(), w.getframerate()
            raw = w.readframes(w.getnframes())
            raw += w.readframes(1)  # the bytes of a partial last frame, which getnframes() leaves out
    except (wave.Error, EOFError) as e:
        raise InputError(f"{path}: not a PCM WAV file ({e}); convert it with `sox IN -b 16 OUT.wav`") from None
    dtype = {1: np.uint8, 2: np.int16, 4: np.int32}.get(width)
    if dtype is None:
        raise InputError(f"{path}: {8 * width}-bit WAV samples are not supported; use 16-bit PCM")
    if len(raw) % (width * channels):
        raise InputError(f"{path}: the audio data ends mid-sample ({len(raw)} bytes is not a whole number of "
                         f"{channels}-channel {8 * width}-bit frames): the file is cut off; copy or export it again")
    x = np.frombuffer(raw, dtype=dtype).astype(np.float32)
    x = (x - 128.0) / 128.0 if width == 1 else x / float(np.iinfo(dtype).max)
    return x.reshape(-1, channels).mean(axis=1), rate


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as ``uint8 [H, W, 3]`` RGB (grayscale and alpha are converted).

    16-bit images (PNG/TIFF modes ``I;16`` and ``I``) are scaled to 8 bits by their full range
    (``round(v / 257)``), not clipped: Pillow's own ``convert("RGB")`` clips them at 255.

    Images over Pillow's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``, about 89
    megapixels) are refused before they are decoded.

    Raises:
        InputError: not a readable image, an image over Pillow's pixel limit, or a float image
            (mode ``F``) with no defined 8-bit range.
    """
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():  # Pillow only warns up to twice its limit: refuse those too
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(path)
        with im:
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                wide = np.asarray(im, dtype=np.float64)
                if wide.max(initial=0) > 65535 or wide.min(initial=0) < 0:
                    raise InputError(f"{path}: a 32-bit integer image (values {wide.min():.0f} to {wide.max():.0f}) "
                                     f"has no 8-bit reading; save it as .npy with the model's own scaling")
                gray = np.rint(wide / 257.0).astype(np.uint8)
                return np.repeat(gray[..., None], 3, axis=-1)
            if im.mode == "F":
                raise InputError(f"{path}: a floating-point image has no 8-bit reading; save it as .npy instead")
            return np.asarray(im.convert("RGB"))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InputError(f"{path}: too large to decode ({first_line(e).rstrip('.')}); resize it to the size the "
                         f"model takes, or save the model's input array as .npy") from None
    except (UnidentifiedImageError, OSError) as e:
        raise InputError(f"{path}: not a readable image ({e})") from None


@dataclass(frozen=True)
class InputReader:
    """One row of :data:`READERS`: how files of one suffix become inputs.

    Attributes:
        read: ``read(path) -> list[NamedInput]``, the inputs the file holds, for an existing
            ``path``; raises :class:`InputError` naming the file for one it cannot read.
        kind: the :class:`InputKind` of the items it gives.
        noun: how messages name the type, article included (``.npy``, ``an image``); default the
            suffix. Rows of one noun are listed together, their suffixes in brackets.
        aside: another tool's format, listed apart (``... file (nor Polygraphy .json)``).
    """

    read: Callable[[Path], list[NamedInput]]
    kind: InputKind = InputKind.ARRAYS
    noun: str = ""
    aside: bool = False


def _numpy_file(p: Path, read: Callable[[], list[NamedInput]]) -> list[NamedInput]:
    """``read()``, numpy's errors for a damaged file as one :class:`InputError`."""
    try:
        return read()
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise InputError(f"{p}: not a readable numpy file ({e}); write it with np.save / np.savez") from None


def read_npy(p: Path) -> list[NamedInput]:
    """``.npy``: one array, the model's single input (:func:`file_input`); pickles refused."""
    import numpy as np

    return _numpy_file(p, lambda: [file_input(p.name, (np.load(p, allow_pickle=False),))])


#: The key that makes an ``.npz`` a shard of many inputs (:func:`fp16guard.datasets.write_shards`):
#: its number of rows; row ``i`` of every other array is input ``i``, labelled ``<file>[i]``.
SHARD_ROWS = "__fp16guard_rows__"


def read_npz(p: Path) -> list[NamedInput]:
    """``.npz``: one input of several arrays, named by their keys (``np.savez(f, x=..., mask=...)``;
    positional archives ``arr_0``, ``arr_1``, ... in order); a shard (:data:`SHARD_ROWS`) gives one
    input per row."""
    import numpy as np

    if not zipfile.is_zipfile(p):  # np.load would read it as an .npy, or refuse it as a pickle
        try:
            with open(p, "rb") as f:
                npy = f.read(6) == b"\x93NUMPY"
        except OSError:
            npy = False
        what = "this one is an .npy array); rename it .npy, or" if npy else "this file is not one);"
        raise InputError(f"{p}: not a readable numpy file (an .npz is a zip archive; {what} write it with np.savez")

    def read():
        """The array names, the arrays and the shard's row count (None for a plain .npz)."""
        with np.load(p, allow_pickle=False) as z:
            keys = [k for k in z.files if k != SHARD_ROWS]
            return keys, [z[k] for k in keys], int(z[SHARD_ROWS]) if len(keys) < len(z.files) else None
    keys, arrays, rows = _numpy_file(p, read)
    if not keys:
        raise InputError(f"{p}: holds no arrays; save the model's inputs in it (np.savez(path, x=...))")
    if rows is None:
        return [file_input(p.name, arrays, names=keys)]
    short = [k for k, a in zip(keys, arrays) if a.ndim == 0 or len(a) < rows]
    if rows < 1 or short:
        raise InputError(f"{p}: a shard of {rows} row(s){f', but its array {short[0]!r} has fewer' if short else ''}; "
                         f"write shards with fp16guard.datasets.write_shards")
    return [file_input(f"{p.name}[{i}]", [a[i] for a in arrays], names=keys) for i in range(rows)]


def read_image_file(p: Path) -> list[NamedInput]:
    """An image file: one ``uint8 [H, W, 3]`` RGB input of kind ``IMAGE`` (:func:`read_image`)."""
    return [NamedInput(p.name, (read_image(p),), kind=InputKind.IMAGE)]


def read_wav_file(p: Path) -> list[NamedInput]:
    """``.wav``: one mono ``float32 [T]`` waveform of kind ``AUDIO``, with its sample rate (:func:`read_wav`)."""
    x, rate = read_wav(p)
    return [NamedInput(p.name, (x,), sample_rate=rate, kind=InputKind.AUDIO)]


def read_polygraphy_file(p: Path) -> list[NamedInput]:
    """Polygraphy's ``.json`` (``polygraphy run --save-inputs``): one input per feed dict, its arrays
    named by input name (:func:`~fp16guard.polygraphy_io.read_polygraphy_inputs`, which raises)."""
    from fp16guard.polygraphy_io import read_polygraphy_inputs

    return read_polygraphy_inputs(p)


#: Input files by suffix (lower case, with its dot): the one list of what ``--input`` and
#: :func:`load_inputs` read, in the order messages list them. A new type: ``READERS[".csv"] =
#: InputReader(read_csv)`` (``docs/inputs.md``); the command line sees it once the module that adds
#: it is imported (a ``package.module:factory`` model's module, say).
READERS: dict[str, InputReader] = {
    ".npy": InputReader(read_npy, noun=".npy"),
    ".npz": InputReader(read_npz, noun=".npz"),
    **{suffix: InputReader(read_image_file, InputKind.IMAGE, "an image")
       for suffix in (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")},
    ".wav": InputReader(read_wav_file, InputKind.AUDIO, ".wav"),
    ".json": InputReader(read_polygraphy_file, noun="Polygraphy's .json", aside=True),
}


def suffixes(kind: InputKind | None = None) -> list[str]:
    """The suffixes :data:`READERS` reads (of ``kind`` only, where given), in table order."""
    return [s for s, row in READERS.items() if kind is None or row.kind is InputKind(kind)]


def _either(words: Sequence[str]) -> str:
    """``a, b or c``."""
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


def _by_noun(aside: bool | None = None) -> dict[str, list[str]]:
    """``{noun: [suffix, ...]}`` of :data:`READERS` in table order (of rows ``aside`` or not, where given)."""
    groups: dict[str, list[str]] = {}
    for suffix, row in READERS.items():
        if aside is None or row.aside == aside:
            groups.setdefault(row.noun or suffix, []).append(suffix)
    return groups


def input_types(*, listed: bool = True) -> str:
    """The input types of :data:`READERS` as messages and ``--help`` name them: ``.npy, .npz, an image
    (.bmp, .jpeg, .jpg, .png, .tif, .tiff, .webp), .wav or Polygraphy's .json`` (``listed=False``:
    without the bracketed suffixes)."""
    words = [noun if not listed or all(s in noun for s in group) else f"{noun} ({', '.join(sorted(group))})"
             for noun, group in _by_noun().items()]
    return _either(words)


def _no_input_in(folder: Path) -> InputError:
    """``<folder>: no .npy, .npz, image or .wav file (nor Polygraphy .json) in this folder``."""
    main, other = ([re.sub(r"^an? |'s\b", "", n) for n in _by_noun(aside)] for aside in (False, True))
    nor = f" (nor {_either(other)})" if other else ""
    return InputError(f"{folder}: no {_either(main)} file{nor} in this folder")


def load_file(path: str | Path) -> list[NamedInput]:
    """The inputs one file holds, read by its suffix's row of :data:`READERS` (one input, except a
    Polygraphy ``.json`` of several feed dicts: one each).

    Raises:
        InputError: the file does not exist (or is a symlink loop), its suffix has no reader, or
            the reader cannot read it (corrupt, or of a form the reader refuses).
        MissingDependencyError: a reader's optional package (polygraphy) is not installed.
    """
    p = Path(path)
    check_input_path(p)
    row = READERS.get(p.suffix.lower())
    if row is None:
        raise InputError(f"{p}: unknown input type {p.suffix.lower()!r}; use {input_types()}")
    return row.read(p)


def load_input(path: str | Path) -> NamedInput:
    """Load one ``--input`` file that holds one input (:func:`load_file`; the readers of
    :data:`READERS` say what each type gives). A Polygraphy ``.json`` of several feed dicts gives
    one input each through :func:`load_inputs` instead.

    Raises:
        InputError: as :func:`load_file`, or the file holds several inputs.
    """
    items = load_file(path)
    if len(items) != 1:
        raise InputError(f"{path}: holds {len(items)} inputs (feed dicts); load_inputs gives one input per feed dict")
    return items[0]


def load_inputs(paths) -> list[NamedInput]:
    """Load ``--input`` arguments: files as :func:`load_file`, folders as every file in them whose
    suffix :data:`READERS` reads (sorted by name; other files skipped), patterns as their matches
    (:func:`input_files`); an ``.npz`` shard gives one input per row. A Polygraphy ``.json`` gives
    one input per feed dict, and a folder of ``.json`` files is Polygraphy's per-iteration form
    (``--save-inputs DIR``).

    Raises:
        InputError: a path does not exist, a folder holds no file of a known suffix, or a file is unreadable.
    """
    return [item for f in input_files(paths) for item in load_file(f)]


def input_files(paths) -> list[Path]:
    """The files ``--input`` arguments name, in order: a file as given, a folder as every file in
    it whose suffix :data:`READERS` reads (sorted by name; others skipped), a pattern (``calib/*.npz``,
    quoted so the shell leaves it) as its matches, sorted, folders and files of known suffixes.

    Raises:
        InputError: a folder with no file of a known suffix, or a pattern that matches none.
    """
    out: list[Path] = []
    for path in paths:
        p = Path(path)
        if not p.exists() and any(c in str(path) for c in "*?["):
            found = [Path(m) for m in sorted(glob.glob(str(path)))]
            found = [m for m in found if m.is_dir() or m.suffix.lower() in READERS]
            if not found:
                other = sorted({m.suffix.lower() or "(no suffix)" for m in map(Path, glob.glob(str(path)))})
                raise InputError(f"{path}: no folder or {input_types(listed=False)} file matches this pattern" + (
                    f", only files of type {', '.join(other)}, which fp16guard does not read; convert them "
                    f"(np.save to .npy, say) or match other files" if other else "; check its folder and spelling"))
            out += input_files(found)
        elif p.is_dir():
            files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in READERS)
            if not files:
                raise _no_input_in(p)
            out += files
        else:
            out.append(p)
    return out


def as_inputs(inputs, *, what: str = "input") -> list[NamedInput]:
    """Inputs given to the Python API as :class:`NamedInput` items.

    Args:
        inputs: a ``NamedInput``, or a sequence of ``NamedInput`` items, arrays or tensors (one
            input each), or tuples/lists of them (multi-input models).
        what: how the items are labelled when they have no label (``calibration input 0``).

    Returns:
        One ``NamedInput`` per item (tensors copied to numpy on the CPU); an empty list for no input.
    """
    import numpy as np

    if isinstance(inputs, NamedInput):
        return [inputs]
    out = []
    for i, item in enumerate(inputs):
        if isinstance(item, NamedInput):
            out.append(item)
        else:
            arrays = item if isinstance(item, (tuple, list)) else (item,)
            out.append(NamedInput(f"{what} {i}", tuple(np.asarray(a.detach().cpu() if hasattr(a, "detach") else a)
                                                       for a in arrays)))
    return out


def onnx_feed(input_names: Sequence[str], item: NamedInput) -> dict[str, np.ndarray]:
    """One input as an ONNX feed, ``{graph input name: array}``.

    Arrays are matched to ``input_names`` by position; floating arrays become float32 (the FP32
    model's input type), others are kept.

    Arrays named by their file (``.npz`` keys other than ``arr_N``) are matched to ``input_names``
    by name.

    Raises:
        InputError: a raw image or waveform (an ONNX model needs its own preprocessing), the
            wrong number of arrays, or names that are not the model's input names.
    """
    import numpy as np

    if item.kind.raw:
        raise InputError(f"{item.label}: an ONNX model takes .npy/.npz arrays, not a raw {item.kind}; "
                         "convert it with the model's preprocessing first")
    arrays = item.arrays
    if item.names and not all(re.fullmatch(r"arr_\d+", n) for n in item.names):
        if set(item.names) != set(input_names):
            raise InputError(f"{item.label}: its arrays are named {', '.join(item.names)}, the model's inputs "
                             f"{', '.join(input_names)}; name them alike or save them in order with np.savez(f, a, b)")
        arrays = tuple(item.arrays[item.names.index(n)] for n in input_names)
    if len(arrays) != len(input_names):
        raise InputError(f"{item.label}: the model takes {len(input_names)} input(s) "
                         f"({', '.join(input_names)}), got {len(arrays)}")
    # np.require, not np.ascontiguousarray: the latter turns a scalar input of shape () into [1]
    return {n: np.require(a.astype(np.float32) if a.dtype.kind == "f" else native(a), requirements="C")
            for n, a in zip(input_names, arrays)}


def onnx_type_name(t) -> str:
    """An ONNX ``TypeProto`` as ONNX Runtime writes it: ``tensor(float)``, ``seq(tensor(float))``,
    ``optional(tensor(int64))``, ``map(string,tensor(float))``, ``sparse_tensor(float)``."""
    from onnx import TensorProto

    kind = t.WhichOneof("value")
    if kind in ("tensor_type", "sparse_tensor_type"):
        elem = TensorProto.DataType.Name(getattr(t, kind).elem_type).lower()
        return f"{kind[:-5]}({elem})"
    if kind == "sequence_type":
        return f"seq({onnx_type_name(t.sequence_type.elem_type)})"
    if kind == "optional_type":
        return f"optional({onnx_type_name(t.optional_type.elem_type)})"
    if kind == "map_type":
        return f"map({TensorProto.DataType.Name(t.map_type.key_type).lower()},{onnx_type_name(t.map_type.value_type)})"
    return kind or "value of no declared type"


def check_onnx_feeds(model, items: Sequence[NamedInput], *, what: str = "input") -> None:
    """Refuse, before any run, an item an ONNX model's declared inputs do not take.

    Args:
        model: the ``onnx.ModelProto``.
        items: the inputs, fed as :func:`onnx_feed` feeds them.
        what: how the message names the items (``input``, ``validation input``).

    Graph inputs of ``optional`` type are left out (the model runs without them; see
    :func:`~fp16guard.onnx_graph.fed_inputs`).

    Raises:
        InputError: a graph input no file can give (a ``seq(...)``, ``map(...)`` or sparse tensor),
            an array named for an optional input, a raw image or waveform, the wrong number or names
            of arrays (:func:`onnx_feed`), or a shape or type the graph does not declare
            (``<what> <label>: input 'x' must have ...``).
    """
    from fp16guard.onnx_graph import check_feed, fed_inputs

    names = fed_inputs(model)
    declared = [i for i in model.graph.input if i.name in names]
    for i in declared:
        if not i.type.HasField("tensor_type"):
            raise InputError(f"the model's input {i.name!r} is a {onnx_type_name(i.type)}, which input files cannot "
                             f"give (.npy, .npz and .json hold tensors); export the model with tensor inputs")
    optional = {i.name: i.type for i in model.graph.input if i.type.HasField("optional_type")}
    for item in items:
        named = next((n for n in item.names if n in optional), None)
        if named is not None:
            raise InputError(f"{what} {item.label}: the model's input {named!r} is {onnx_type_name(optional[named])}, "
                             f"which fp16guard leaves out (the model runs without it); save the file without it")
        feed = onnx_feed(names, item)  # its own errors name the item
        try:
            check_feed(declared, feed)
        except InputError as e:
            raise InputError(f"{what} {item.label}: {e}") from None


def torch_args(item: NamedInput):
    """One input as the argument tuple of a PyTorch model's ``forward``.

    Images become ``float32 [1, 3, H, W]`` in [0, 1], waveforms ``float32 [1, T]``; arrays are
    taken as they are, float64 and float16 cast to float32 (the FP32 model's input type; ``inspect
    --half`` casts them to float16 itself), in native byte order.

    Returns:
        ``tuple[torch.Tensor, ...]`` on the CPU.
    """
    import numpy as np
    import torch

    if item.kind is InputKind.IMAGE:
        return (torch.from_numpy(item.arrays[0].astype(np.float32) / 255.0).permute(2, 0, 1)[None].contiguous(),)
    if item.kind is InputKind.AUDIO:
        return (torch.from_numpy(item.arrays[0].astype(np.float32))[None],)
    out = []
    for a in item.arrays:
        t = torch.from_numpy(np.require(native(a), requirements="C"))  # keeps shape () (ascontiguousarray does not)
        out.append(t.float() if t.dtype in (torch.float64, torch.float16) else t)
    return tuple(out)


def _count(item: NamedInput) -> tuple[int, int]:
    """(NaN count, inf count) over an item's floating arrays."""
    import numpy as np

    nan = inf = 0
    for a in item.arrays:
        if a.dtype.kind == "f":
            nan += int(np.isnan(a).sum())
            inf += int(np.isinf(a).sum())
    return nan, inf


def nonfinite_inputs(items: Sequence[NamedInput]) -> list[tuple[str, int, int]]:
    """``(label, NaN count, inf count)`` of every item whose floating arrays hold inf/NaN."""
    return [(item.label, *c) for item in items if any(c := _count(item))]


def check_inputs(items: Sequence[NamedInput], *, finite: bool = True, what: str = "input") -> None:
    """Refuse inputs no FP16 question can be asked of, before any model runs.

    Args:
        items: the inputs.
        finite: also refuse inf/NaN in floating arrays (calibration, bisect and verification
            compare against FP32 on them, and inf/NaN in FP32 already says nothing). ``inspect``
            passes False: there a non-finite input is a finding of the report.
        what: how the message names the items (``input``, ``validation input``).

    Raises:
        InputError: an array with no elements; of a dtype no model computes with (strings,
            objects, complex numbers, dates); or, with ``finite``, holding inf/NaN. The message
            names the item and says what to do.
    """
    for item in items:
        if item.kind.raw:
            continue
        for k, a in enumerate(item.arrays):
            at = f"{what} {item.label}" + (f" (array {k})" if len(item.arrays) > 1 else "")
            if a.dtype.kind not in "biuf":
                raise InputError(f"{at} holds {a.dtype} values; a model takes float, integer or bool arrays "
                                 f"(convert it with .astype(np.float32))")
            if a.size == 0:
                raise InputError(f"{at} has no elements (shape {list(a.shape)}); give at least one sample")
        if finite and any(counts := _count(item)):
            nan, inf = counts
            raise InputError(f"{what} {item.label} holds {nan} NaN and {inf} inf values; FP16 cannot be judged on "
                             f"inputs FP32 cannot compute either: clean them (np.nan_to_num) or leave the file out")


def check_feeds(model, items: Sequence[NamedInput], *, framework: str, what: str = "input",
                run: bool = False) -> None:
    """Refuse, before any long run, an item the model does not take: the one check of inputs against
    a model, the command line's for every command. A fix target's ``check_feeds``
    (:mod:`fp16guard.fixing.targets`) is this check on its own model, ``run=True`` for a PyTorch one.

    Args:
        model: an ``onnx.ModelProto``, or a ``torch.nn.Module`` (a ``.pt2`` program's module too).
        items: the inputs as the model is fed them (named arrays in ``forward``'s order:
            :func:`fp16guard.loading.by_forward_names`).
        framework: a :class:`fp16guard.loading.Framework` (or its string), decided once per command.
        what: how messages name the items (``input``, ``calibration input``).
        run: PyTorch: also run the model once in FP32 (no grad) on each item.

    Checks dtypes and sizes (:func:`check_inputs`, inf/NaN aside: each command decides), then an
    ONNX model's declared inputs (:func:`check_onnx_feeds`), or a ``.pt2`` program's static
    dimensions (:func:`fp16guard.loading.check_program_inputs`) and, with ``run``, one forward.

    Raises:
        InputError: naming the item (``<what> <label>``) and what the model declares or said.
    """
    from fp16guard.loading import Framework, check_program_inputs

    check_inputs(items, finite=False, what=what)
    if Framework(framework) is Framework.ONNX:
        check_onnx_feeds(model, items, what=what)
        return
    import torch

    args = [torch_args(item) for item in items]
    check_program_inputs(model, args, what=what, labels=[i.label for i in items])
    if not run:
        return
    with torch.no_grad():
        for item, tensors in zip(items, args):
            try:
                model(*tensors)
            except (RuntimeError, ValueError, TypeError, IndexError) as e:
                shapes = ", ".join(str(list(t.shape)) for t in tensors)
                raise InputError(f"{what} {item.label} of shape {shapes}: the model rejects it: "
                                 f"{first_line(e)}") from None
