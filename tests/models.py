"""Small models whose FP16 behaviour is known by construction (used by several test files)."""

from collections import namedtuple
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

Pair = namedtuple("Pair", "small big")


@dataclass
class Out:
    small: torch.Tensor
    big: torch.Tensor


class Overflowing(nn.Module):
    """``up`` multiplies by 1e5 (overflow starts), ``down`` divides it back (absorbed)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(8, 8)
        self.up = Scale(1e5)
        self.act = nn.ReLU(inplace=True)
        self.down = Scale(1e-5)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.down(self.act(self.up(self.stem(x)))))


class Scale(nn.Module):
    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor


class Functional(nn.Module):
    """The overflow happens in a functional op that module hooks cannot see."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x):
        return self.b(F.relu(self.a(x)) * 1e5 / 1e5)


class Structured(nn.Module):
    """Returns tensors inside a namedtuple, a dict and a dataclass."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        y = self.lin(x)
        return {"pair": Pair(y, y * 1e6), "out": Out(y, torch.full_like(y, 3e5))}


class Raises(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x):
        self.bn(self.lin(x))  # the BatchNorm runs (in train mode it updates its statistics), then the forward fails
        raise RuntimeError("boom")


def toy_factory() -> nn.Module:
    torch.manual_seed(0)
    return Overflowing()


class Block(nn.Module):
    """The attribute layout of ``mmdet.models.backbones.resnet.BasicBlock`` (conv1, norm1, conv2,
    norm2, relu, downsample) with its forward; the real class is tested in tests/openmmlab."""

    def __init__(self, cin, c, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, c, 3, stride, 1, bias=False)
        self.norm1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU()
        self.downsample = None if stride == 1 and cin == c else nn.Sequential(
            nn.Conv2d(cin, c, 1, stride, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        out = self.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class Net(nn.Module):
    """A stem conv, three :class:`Block` s (one strided) and a conv/BN/ReLU head with a sigmoid."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.layer = nn.Sequential(Block(8, 8), Block(8, 16, stride=2), Block(16, 16))
        self.head = nn.Sequential(nn.Conv2d(16, 4, 1), nn.BatchNorm2d(4), nn.ReLU())

    def forward(self, x):
        return self.head(self.layer(self.stem(x))).sigmoid()


def residual_net():
    """A :class:`Net` whose last block writes about 2e5 (beyond FP16), BatchNorm statistics randomized."""
    torch.manual_seed(0)
    net = Net().eval()
    with torch.no_grad():
        for bn in net.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2)
        net.layer[2].norm2.weight.fill_(2e5)  # the last block writes ~2e5
        net.head[0].weight.mul_(1e-4)
    return net


def residual_input(seed):
    """A ``float32 [1, 3, 16, 16]`` normal input for :class:`Net`."""
    return np.random.default_rng(seed).normal(size=(1, 3, 16, 16)).astype(np.float32)


def residual_factory() -> nn.Module:
    """:func:`residual_net` as a ``package.module:factory`` for the command line."""
    return residual_net()


class LogMelFrontEnd(nn.Module):
    """An audio classifier's front end: STFT as two strided convs (Hann-windowed cos/sin, 400/160),
    power ``re**2 + im**2``, a mel-like filterbank (a constant matmul), ``log(mel + 1e-10)``, and a
    small CNN. PCM [batch, samples] float32 -> logits [batch, 10].

    Fed int16-scale PCM the power reaches ~1e12 (FP16 overflow); fed [-1, 1] PCM with digital
    silence, ``1e-10`` is 0 in FP16 and the silent frames' ``log`` is ``-inf``.
    """

    def __init__(self, n_fft: int = 400, hop: int = 160, mels: int = 40):
        super().__init__()
        torch.manual_seed(0)
        n, f = torch.arange(n_fft).float(), torch.arange(n_fft // 2 + 1).float()[:, None]
        window = torch.hann_window(n_fft)
        self.re = nn.Conv1d(1, n_fft // 2 + 1, n_fft, hop, bias=False)
        self.im = nn.Conv1d(1, n_fft // 2 + 1, n_fft, hop, bias=False)
        with torch.no_grad():
            self.re.weight.copy_((torch.cos(2 * np.pi * f * n / n_fft) * window)[:, None])
            self.im.weight.copy_((-torch.sin(2 * np.pi * f * n / n_fft) * window)[:, None])
        self.mel = nn.Parameter(torch.rand(mels, n_fft // 2 + 1) / 20)
        self.cnn = nn.Sequential(nn.Conv1d(mels, 32, 3, padding=1), nn.ReLU(), nn.Conv1d(32, 32, 3, padding=1),
                                 nn.ReLU(), nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(32, 10))

    def forward(self, pcm):
        x = pcm[:, None]
        power = self.re(x) ** 2 + self.im(x) ** 2
        return self.cnn(torch.log(torch.matmul(self.mel, power) + 1e-10))


def pcm(seed: int, scale: float, silence: bool = True) -> np.ndarray:
    """One second of 16 kHz audio [1, 16000] float32: an amplitude-modulated tone plus noise, peak
    about ``0.8 * scale`` (32767: int16 scale); samples 4000..6000 digital silence if ``silence``."""
    rng = np.random.default_rng(seed)
    t = np.arange(16000) / 16000
    x = 0.3 * np.sin(2 * np.pi * (200 + 300 * seed) * t) * (1 + np.sin(2 * np.pi * 3 * t))
    x = x + 0.05 * rng.standard_normal(16000)
    if silence:
        x[4000:6000] = 0
    return (x[None] * scale).astype(np.float32)


class PreNormEncoder(nn.Module):
    """An input projection, two pre-norm transformer layers (``x + attn(norm1(x))``, ``x + ffn(norm2(x))``, as in DETR's
    decoder and most ViTs) of ``nn.MultiheadAttention``, ``nn.LayerNorm`` and ``nn.Linear``, and a
    final LayerNorm. The first layer's FFN output is 1e5x larger (the residual stream passes
    65504) and the second layer's first norm 1e5x (its attention reads values beyond 65504; its
    query and key projections 1e-5x, so the scores stay ~1 and the values ~1e5).
    Input/output float32 [batch, tokens, 32]."""

    def __init__(self, width: int = 32):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(width, width)
        self.layers = nn.ModuleList(nn.ModuleDict(dict(
            norm1=nn.LayerNorm(width), attn=nn.MultiheadAttention(width, 4, batch_first=True),
            norm2=nn.LayerNorm(width), ffn1=nn.Linear(width, 2 * width), ffn2=nn.Linear(2 * width, width)))
            for _ in range(2))
        self.norm = nn.LayerNorm(width)
        with torch.no_grad():
            for m in self.modules():  # trained norms differ from each other (and from ones)
                if isinstance(m, nn.LayerNorm):
                    m.weight.normal_(1.0, 0.05)
            self.layers[0]["ffn2"].weight.mul_(1e5)
            self.layers[0]["ffn2"].bias.mul_(1e5)
            self.layers[1]["norm1"].weight.mul_(1e5)
            self.layers[1]["attn"].in_proj_weight[:2 * width].mul_(1e-5)  # queries and keys ~1, values ~1e5

    def forward(self, x):
        x = self.embed(x)
        for layer in self.layers:
            h = layer["norm1"](x)
            x = x + layer["attn"](h, h, h, need_weights=False)[0]
            x = x + layer["ffn2"](torch.relu(layer["ffn1"](layer["norm2"](x))))
        return self.norm(x)


def tokens(seed: int) -> np.ndarray:
    """float32 [2, 6, 32], standard normal."""
    return np.random.default_rng(seed).normal(size=(2, 6, 32)).astype(np.float32)
