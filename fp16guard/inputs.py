"""Model inputs: files (``.npy``, ``.npz``, images, ``.wav``, Polygraphy's ``.json``) to
:class:`NamedInput`, and the one path from a :class:`NamedInput` to what a model is fed.

Every loader returns a :class:`NamedInput`: the arrays to feed, by position, and a label for the
report. What an image or a waveform becomes depends on the model; :func:`load_input` returns the
raw decoded array and the example (or the user's model) applies its own preprocessing.

Every command feeds models through three functions: :func:`as_inputs` (whatever the Python API
was given -> ``NamedInput`` items), :func:`onnx_feed` (one item -> ``{input name: array}``) and
:func:`torch_args` (one item -> a tuple of tensors; raw images and waveforms get the generic
layout a PyTorch model takes). So ``inspect``, ``bisect``, ``calibrate`` and ``fix`` accept the
same inputs for the same model.
"""

from __future__ import annotations

import errno
import os
import re
import wave
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from fp16guard.errors import InputError, first_line

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
AUDIO_SUFFIXES = {".wav"}
#: Polygraphy's input files (``polygraphy run --save-inputs``), read by :mod:`fp16guard.polygraphy_io`.
POLYGRAPHY_SUFFIXES = {".json"}


@dataclass(frozen=True)
class NamedInput:
    """Arrays to feed a model, with a label.

    Attributes:
        label: what the input is (a file name, ``skimage.data.page()``), for the report.
        arrays: positional model inputs (numpy arrays), or for raw images/audio the decoded data
            (``uint8 [H, W, 3]`` RGB image; ``float32 [T]`` waveform in [-1, 1]).
        sample_rate: samples per second for audio, else None.
        kind: ``arrays``, ``image`` or ``audio``.
        names: the arrays' names where the file gave them (``.npz`` keys), else empty; an ONNX
            model is fed by these names when they are its input names (:func:`onnx_feed`).
    """

    label: str
    arrays: tuple[np.ndarray, ...]
    sample_rate: int | None = None
    kind: str = "arrays"
    names: tuple[str, ...] = ()


def _native(a: np.ndarray) -> np.ndarray:
    """``a`` in this machine's byte order (a big-endian ``.npy`` written elsewhere is converted;
    torch and ONNX Runtime take native arrays only); ``a`` itself when it already is."""
    return a if a.dtype.isnative else a.astype(a.dtype.newbyteorder("="))


def file_input(label: str, arrays, names: Sequence[str] = ()) -> NamedInput:
    """The :class:`NamedInput` of arrays read from a file: in native byte order, and labelled
    ``x.npy (float16 as float32)`` when one is float16, which is how the FP32 model is fed it
    (:func:`onnx_feed`, :func:`torch_args`)."""
    arrays = tuple(_native(np.asarray(a)) for a in arrays)
    if any(a.dtype == np.float16 for a in arrays):
        label += " (float16 as float32)"
    return NamedInput(label, arrays, names=tuple(names))


def check_input_path(p: Path) -> None:
    """Refuse an input path that is not a file.

    Raises:
        InputError: ``input file not found: <p>``, or ``<p> is a symlink loop``.
    """
    if p.is_file():
        return
    try:
        os.stat(p)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise InputError(f"input {p} is a symlink loop; give the file itself") from None
    raise InputError(f"input file not found: {p}")


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


def load_input(path: str | Path) -> NamedInput:
    """Load one ``--input`` file.

    * ``.npy``: one array, the model's single input (:func:`file_input`: native byte order, float16
      noted in the label).
    * ``.npz``: several arrays; an ONNX model gets them by key (``np.savez(f, x=..., mask=...)``),
      positional archives (``arr_0``, ``arr_1``, ...) in order.
    * an image (``.png``, ``.jpg``, ...): ``uint8 [H, W, 3]`` RGB, ``kind="image"``.
    * ``.wav``: mono float32 waveform, ``kind="audio"``.
    * ``.json``: Polygraphy's inputs (``polygraphy run --save-inputs``) holding one feed dict, fed by
      name; a file of several feed dicts gives one input each through :func:`load_inputs`
      (:func:`~fp16guard.polygraphy_io.read_polygraphy_inputs`).

    Raises:
        InputError: the file does not exist (or is a symlink loop), or its type is not one of the
            above, or it is corrupt.
    """
    p = Path(path)
    check_input_path(p)
    suffix = p.suffix.lower()
    try:
        if suffix == ".npy":
            return file_input(p.name, (np.load(p, allow_pickle=False),))
        if suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                return file_input(p.name, [z[k] for k in z.files], names=z.files)
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise InputError(f"{p}: not a readable numpy file ({e}); write it with np.save / np.savez") from None
    if suffix in IMAGE_SUFFIXES:
        return NamedInput(p.name, (read_image(p),), kind="image")
    if suffix in AUDIO_SUFFIXES:
        x, rate = read_wav(p)
        return NamedInput(p.name, (x,), sample_rate=rate, kind="audio")
    if suffix in POLYGRAPHY_SUFFIXES:
        items = load_file(p)
        if len(items) != 1:
            raise InputError(f"{p}: holds {len(items)} feed dicts; load_inputs gives one input per feed dict")
        return items[0]
    raise InputError(f"{p}: unknown input type {suffix!r}; use .npy, .npz, an image "
                     f"({', '.join(sorted(IMAGE_SUFFIXES))}), .wav or Polygraphy's .json")


def load_file(path: str | Path) -> list[NamedInput]:
    """The inputs one file holds: several for a Polygraphy ``.json`` of several feed dicts, else
    :func:`load_input`'s one."""
    if Path(path).suffix.lower() in POLYGRAPHY_SUFFIXES:
        from fp16guard.polygraphy_io import read_polygraphy_inputs

        return read_polygraphy_inputs(path)
    return [load_input(path)]


def load_inputs(paths) -> list[NamedInput]:
    """Load ``--input`` arguments: files as :func:`load_file`, folders as every supported file in
    them (sorted by name; other files skipped). A Polygraphy ``.json`` gives one input per feed dict,
    and a folder of ``.json`` files is Polygraphy's per-iteration form (``--save-inputs DIR``).

    Raises:
        InputError: a path does not exist, a folder holds no supported file, or a file is unreadable.
    """
    out: list[NamedInput] = []
    for path in paths:
        p = Path(path)
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in
                           {".npy", ".npz", *IMAGE_SUFFIXES, *AUDIO_SUFFIXES, *POLYGRAPHY_SUFFIXES})
            if not files:
                raise InputError(f"{p}: no .npy, .npz, image or .wav file (nor Polygraphy .json) in this folder")
            out += [item for f in files for item in load_file(f)]
        else:
            out += load_file(p)
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
    if item.kind != "arrays":
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
    return {n: np.require(a.astype(np.float32) if a.dtype.kind == "f" else _native(a), requirements="C")
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
    import torch

    if item.kind == "image":
        return (torch.from_numpy(item.arrays[0].astype(np.float32) / 255.0).permute(2, 0, 1)[None].contiguous(),)
    if item.kind == "audio":
        return (torch.from_numpy(item.arrays[0].astype(np.float32))[None],)
    out = []
    for a in item.arrays:
        t = torch.from_numpy(np.require(_native(a), requirements="C"))  # keeps shape () (ascontiguousarray does not)
        out.append(t.float() if t.dtype in (torch.float64, torch.float16) else t)
    return tuple(out)


def _count(item: NamedInput) -> tuple[int, int]:
    """(NaN count, inf count) over an item's floating arrays."""
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
        if item.kind != "arrays":
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


def by_forward_names(model, item: NamedInput) -> NamedInput:
    """``item`` with its named arrays (``.npz`` keys other than ``arr_N``) in the order of
    ``model.forward``'s parameters, so a PyTorch model is fed by name as an ONNX model is.

    Items without names, raw images and waveforms are returned as they are.

    Raises:
        InputError: the names are not parameters of ``forward``, or a parameter without a default is missing.
    """
    import inspect

    if item.kind != "arrays" or not item.names or all(re.fullmatch(r"arr_\d+", n) for n in item.names):
        return item
    try:
        params = [p for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):  # no signature to read: keep the file's order
        return item
    names = [p.name for p in params]
    required = [p.name for p in params if p.default is p.empty]
    if not set(item.names) <= set(names) or not set(required) <= set(item.names):
        raise InputError(f"{item.label}: its arrays are named {', '.join(item.names)}, forward takes "
                         f"{', '.join(names)}; name them alike or save them in order with np.savez(f, a, b)")
    order = [n for n in names if n in item.names]
    if order[-1] != names[len(order) - 1]:
        raise InputError(f"{item.label}: forward's parameters before {order[-1]} need arrays too "
                         f"(forward takes {', '.join(names)})")
    return NamedInput(item.label, tuple(item.arrays[item.names.index(n)] for n in order), names=tuple(order))
