"""Small models whose FP16 behaviour is known by construction (used by several test files)."""

from collections import namedtuple
from dataclasses import dataclass

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
        y = self.bn(self.lin(x))
        raise RuntimeError("boom")


def toy_factory() -> nn.Module:
    torch.manual_seed(0)
    return Overflowing()
