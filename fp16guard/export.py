"""PyTorch -> ONNX export, the one place fp16guard calls ``torch.onnx.export`` (and :func:`eval_mode`).

The dynamo exporter (``torch.onnx.export(..., dynamo=True)``, needs onnxscript) records each
node's module scope in its metadata (``pkg.torch.onnx.name_scopes``); without onnxscript the
TorchScript exporter is used, whose node names carry the scopes instead (``/conv2/Conv``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
from typing import Sequence

import onnx


@contextlib.contextmanager
def eval_mode(model):
    """Put ``model`` in eval mode for the block and restore its training flag after (a module
    unflattened from an ``ExportedProgram`` has no train mode and is left as it is)."""
    was_training = model.training
    try:
        model.train(False)
    except NotImplementedError:  # torch.export's unflattened module: already an inference graph
        yield model
        return
    try:
        yield model
    finally:
        model.train(was_training)


class ExportError(ValueError):
    """The module cannot be exported to ONNX (the message gives the exporter's first line)."""


def dynamic_dims(examples: Sequence[Sequence]) -> tuple[dict[int, object], ...] | None:
    """``dynamic_shapes`` for ``torch.export``: every dimension whose size differs between the
    example argument tuples becomes ``Dim.AUTO``; None when all examples have one shape."""
    import torch

    first = [tuple(a.shape) for a in examples[0]]
    out, any_dynamic = [], False
    for k, shape in enumerate(first):
        dims = {}
        for d in range(len(shape)):
            if any(tuple(ex[k].shape)[d] != shape[d] for ex in examples[1:]):
                dims[d] = torch.export.Dim.AUTO
                any_dynamic = True
        out.append(dims or None)
    return tuple(out) if any_dynamic else None


def export_onnx(module, args: tuple, *, dynamic_shapes=None, what: str = "the model") -> onnx.ModelProto:
    """Export ``module(*args)`` to an FP32 ``onnx.ModelProto``.

    Args:
        module: a ``torch.nn.Module`` or ``GraphModule`` (exported in eval mode; its training flag
            is restored).
        args: example arguments (tensors).
        dynamic_shapes: as ``torch.export`` takes it (see :func:`dynamic_dims`); dynamo only.
        what: how to name the module in the error.

    Raises:
        ExportError: the exporter failed.
    """
    import torch

    try:
        with eval_mode(module):
            if importlib.util.find_spec("onnxscript") is not None:
                program = torch.onnx.export(module, tuple(args), dynamo=True, verbose=False,
                                            dynamic_shapes=dynamic_shapes)
                return program.model_proto
            buf = io.BytesIO()
            torch.onnx.export(module, tuple(args), buf, dynamo=False)
            return onnx.load_from_string(buf.getvalue())
    except Exception as e:  # noqa: BLE001 - exporters raise many types
        first = next((line for line in str(e).strip().splitlines() if line.strip()), "")
        raise ExportError(f"cannot export {what} to ONNX ({type(e).__name__}: {first[:200]})") from None
