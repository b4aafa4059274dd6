"""tensorrtx's ``.wts`` weight files: read, write, and check against the FP16 range.

Format (tensorrtx ``gen_wts.py``; text, one tensor a line)::

    3
    conv1.weight 864 3d2b1c8e bd0f5c28 ...
    conv1.bias 32 ...
    bn1.running_var 32 ...

The first line is the number of tensors; each next line is ``name count`` and then ``count``
float32 values, each written as the 8 hex digits of its big-endian IEEE bytes (Python's
``struct.pack(">f", v).hex()``). Shapes are not stored: tensors come back 1-D.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from fp16guard.errors import WtsError


def write_wts(path: str | Path, weights: Mapping[str, np.ndarray]) -> Path:
    """Write ``{name: array}`` as a ``.wts`` file (values flattened, cast to float32).

    Args:
        path: the file to write.
        weights: arrays of any shape and float dtype (a ``state_dict`` turned to numpy); names may
            not contain whitespace.

    Raises:
        WtsError: a name with whitespace (tensorrtx splits lines on spaces).
    """
    lines = [str(len(weights))]
    for name, value in weights.items():
        if not name or any(c.isspace() for c in name):
            raise WtsError(f"{path}: tensor name {name!r} contains whitespace; .wts lines are split on spaces")
        flat = np.asarray(value, dtype=np.float32).reshape(-1)
        words = flat.astype(">f4").tobytes().hex()
        hexes = [words[i:i + 8] for i in range(0, len(words), 8)]
        lines.append(" ".join([name, str(flat.size), *hexes]))
    path = Path(path)
    path.write_text("\n".join(lines) + "\n")
    return path


def read_wts(path: str | Path) -> dict[str, np.ndarray]:
    """Read a ``.wts`` file into ``{name: float32 array of shape [count]}``, in file order.

    Raises:
        WtsError: the file is missing, the count line disagrees with the tensors, a tensor's value
            count disagrees with its line, or a word is not 8 hex digits.
    """
    path = Path(path)
    if not path.is_file():
        raise WtsError(f"{path}: no such .wts file")
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise WtsError(f"{path}: empty file; a .wts starts with the number of tensors")
    try:
        count = int(lines[0])
    except ValueError:
        raise WtsError(f"{path}: line 1 is {lines[0][:40]!r}, not the number of tensors") from None
    if count != len(lines) - 1:
        raise WtsError(f"{path}: line 1 announces {count} tensors, the file has {len(lines) - 1}")
    out: dict[str, np.ndarray] = {}
    for number, line in enumerate(lines[1:], start=2):
        parts = line.split()
        if len(parts) < 2 or not parts[1].isdigit():
            raise WtsError(f"{path}:{number}: expected 'name count hex...', got {line[:60]!r}")
        name, n, words = parts[0], int(parts[1]), parts[2:]
        if len(words) != n:
            raise WtsError(f"{path}:{number}: {name} announces {n} values and has {len(words)}")
        if any(len(w) != 8 for w in words):
            raise WtsError(f"{path}:{number}: {name}: every value must be 8 hex digits (big-endian float32)")
        try:
            out[name] = np.frombuffer(bytes.fromhex("".join(words)), dtype=">f4").astype(np.float32)
        except ValueError:
            raise WtsError(f"{path}:{number}: {name}: not hexadecimal") from None
    return out


def check_wts(path: str | Path, *, eps: float = 1e-5):
    """The inspector's static check on a ``.wts`` file: every tensor
    (:func:`fp16guard.inspect.static_check.check_tensor`: values beyond 65504, inf/NaN, values FP16
    flushes to zero) and every BatchNorm found by tensorrtx's naming (``<bn>.weight``, ``.bias``,
    ``.running_mean``, ``.running_var``) folded to scale/shift
    (:func:`fp16guard.inspect.static_check.check_batchnorm`).

    Args:
        path: the ``.wts`` file.
        eps: the BatchNorms' epsilon (a ``.wts`` does not store it; PyTorch's default).

    Returns:
        A list of :class:`fp16guard.inspect.report.StaticFinding`.

    Raises:
        WtsError: as :func:`read_wts`.
    """
    from fp16guard.inspect.static_check import BatchNormParams, check_batchnorm, check_tensor

    weights = read_wts(path)
    findings = []
    for name, value in weights.items():
        findings += check_tensor(name, value, layer=name.rpartition(".")[0],
                                 is_bn_stat=name.endswith(("running_var", "running_mean")))
    for name in weights:
        if not name.endswith(".running_var"):
            continue
        layer = name[: -len(".running_var")]
        parts = [weights.get(f"{layer}.{k}") for k in ("weight", "bias", "running_mean")]
        if all(p is not None and p.size == weights[name].size for p in parts):
            findings += check_batchnorm(BatchNormParams(layer, *(p.astype(np.float64) for p in parts),
                                                        weights[name].astype(np.float64), eps, name))
    return findings
