"""What a model input is, below everything that reads or feeds one: :class:`NamedInput` (arrays
with a label) and its :class:`InputKind`, :func:`file_input` (the item of arrays read from a file)
and :func:`check_input_path` (the one refusal of an input path that is not a file).

The readers (:mod:`fp16guard.inputs`' table, :mod:`fp16guard.polygraphy_io`), the model loaders
(:mod:`fp16guard.loading`) and the feeds (:func:`fp16guard.inputs.onnx_feed`,
:func:`fp16guard.inputs.torch_args`) all build on these; :mod:`fp16guard.inputs` hands them on, so
``from fp16guard.inputs import NamedInput`` stays the everyday spelling. numpy is imported where
used.
"""

from __future__ import annotations

import enum
import errno
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from fp16guard.errors import InputError

if TYPE_CHECKING:
    import numpy as np


class InputKind(str, enum.Enum):
    """What a :class:`NamedInput` holds: ``ARRAYS`` (the model's inputs themselves), ``IMAGE`` (one
    ``uint8 [H, W, 3]`` RGB image) or ``AUDIO`` (one ``float32 [T]`` waveform in [-1, 1]). A PyTorch
    model gets an image as ``float32 [1, 3, H, W]`` in [0, 1] and a waveform as ``[1, T]``
    (:func:`~fp16guard.inputs.torch_args`); an ONNX model refuses both. A ``str`` enum: a member equals, prints and
    serializes (``json.dumps``) as its former string (``InputKind.IMAGE == "image"``)."""

    ARRAYS = "arrays"
    IMAGE = "image"
    AUDIO = "audio"

    __str__ = str.__str__
    __format__ = str.__format__

    @property
    def raw(self) -> bool:
        """Decoded media (an image, a waveform) that a model's own preprocessing turns into arrays."""
        return self is not InputKind.ARRAYS


@dataclass(frozen=True)
class NamedInput:
    """Arrays to feed a model, with a label.

    Attributes:
        label: what the input is (a file name, ``skimage.data.page()``), for the report.
        arrays: positional model inputs (numpy arrays), or for raw images/audio the decoded data
            (``uint8 [H, W, 3]`` RGB image; ``float32 [T]`` waveform in [-1, 1]).
        sample_rate: samples per second for audio, else None.
        kind: an :class:`InputKind` (its string, ``"image"``, is taken too and converted).
        names: the arrays' names where the file gave them (``.npz`` keys), else empty; an ONNX
            model is fed by these names when they are its input names
            (:func:`~fp16guard.inputs.onnx_feed`).

    Raises:
        ValueError: ``kind`` is not one of :class:`InputKind`.
    """

    label: str
    arrays: tuple[np.ndarray, ...]
    sample_rate: int | None = None
    kind: InputKind = InputKind.ARRAYS
    names: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "kind", InputKind(self.kind))


def native(a: np.ndarray) -> np.ndarray:
    """``a`` in this machine's byte order (a big-endian ``.npy`` written elsewhere is converted;
    torch and ONNX Runtime take native arrays only); ``a`` itself when it already is."""
    return a if a.dtype.isnative else a.astype(a.dtype.newbyteorder("="))


def file_input(label: str, arrays, names: Sequence[str] = ()) -> NamedInput:
    """The :class:`NamedInput` of arrays read from a file: in native byte order, and labelled
    ``x.npy (float16 as float32)`` when one is float16, which is how the FP32 model is fed it
    (:func:`~fp16guard.inputs.onnx_feed`, :func:`~fp16guard.inputs.torch_args`)."""
    import numpy as np

    arrays = tuple(native(np.asarray(a)) for a in arrays)
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
