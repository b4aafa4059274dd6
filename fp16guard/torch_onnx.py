"""The ONNX export of a PyTorch module: the one place fp16guard calls ``torch.onnx.export``.

:func:`export_onnx_routes` tries the export routes of :data:`ONNX_ROUTES` in order (the dynamo
exporter, the TorchScript exporter, the dynamo exporter on a ``torch.export`` program) and takes
the first whose model ONNX Runtime loads (bfloat16 computation widened to float32 where it has no
kernel: :func:`widen_bfloat16`) and, for a trace that fixed a Python value computed from tensors,
that computes what the module does; :func:`export_onnx` is its plain form. The capture of a module
as a ``torch.fx`` graph is :mod:`fp16guard.torch_graph`'s.

The dynamo exporter (``torch.onnx.export(..., dynamo=True)``, needs onnxscript) records each
node's module scope in its metadata (``pkg.torch.onnx.name_scopes``); without onnxscript, or where
it fails, the TorchScript exporter is used, whose node names carry the scopes instead
(``/conv2/Conv``).
"""

from __future__ import annotations

import importlib.util
import io
import logging
import re
from dataclasses import dataclass
from typing import Sequence

import onnx

from fp16guard.errors import ExportError, ModelLoadError, first_line
from fp16guard.torch_graph import eval_mode, printed_to_log


#: The ONNX export routes :func:`export_onnx_routes` tries, in order, and their names in a report.
ONNX_ROUTES = {
    "dynamo": "the dynamo exporter (torch.onnx.export(dynamo=True))",
    "torchscript": "the TorchScript exporter (torch.onnx.export(dynamo=False))",
    "exported_program": "the dynamo exporter on torch.export's ExportedProgram",
}


@dataclass(frozen=True)
class OnnxExport:
    """An ONNX export and how it was made (:func:`export_onnx_routes`).

    Attributes:
        model: the FP32 ``onnx.ModelProto``.
        route: the route that made it, a key of :data:`ONNX_ROUTES`.
        failed: ``"route: why"`` for each route tried before it.
        widened: what :func:`widen_bfloat16` changed so ONNX Runtime can run the graph ("" if nothing).
        traced: Python values the TorchScript trace fixed to the example input's (a branch on a
            tensor, a count): ``file:line: first sentence`` of each ``torch.jit.TracerWarning``.
        checked: the argument tuples the export was compared with the module on (a trace only).
    """

    model: onnx.ModelProto
    route: str
    failed: tuple[str, ...] = ()
    widened: str = ""
    traced: tuple[str, ...] = ()
    checked: int = 0

    @property
    def fell_back(self) -> bool:
        """Whether the export is not the first route's plain output."""
        return bool(self.failed or self.widened)

    def describe(self) -> str:
        """One sentence: the route used, why the ones before it failed, what was changed."""
        text = f"exported to ONNX with {ONNX_ROUTES[self.route]}"
        if self.failed:
            text += f" after {'; '.join(self.failed)}"
        if self.widened:
            text += f"; {self.widened}"
        if self.traced:
            text += (f"; the trace fixed {len(self.traced)} Python value(s) computed from tensors to what the "
                     f"example input gave ({self.traced[0][:160]})" +
                     (f", checked against the module on {self.checked} inputs" if self.checked > 1 else
                      ": give more inputs to check it on others"))
        return text


def _export_error(e: BaseException) -> str:
    """An exporter's failure in one line: the dynamo exporter's exception summary where it has one
    (its first line only says which step failed), without terminal colour codes."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if "## Exception summary" in lines:
        summary = lines[lines.index("## Exception summary") + 1:]
        if summary:
            return re.sub(r"^<class '(?:[\w.]+\.)?(\w+)'>: ", r"\1: ", summary[0])[:240]
    return f"{type(e).__name__}: {(lines[0] if lines else '')[:200]}"


def _dynamic_axes(module, args: tuple, dynamic_shapes) -> dict:
    """The TorchScript exporter's ``input_names`` and ``dynamic_axes`` for ``dynamic_shapes`` (as
    :func:`~fp16guard.torch_graph.dynamic_dims` gives them; the inputs named after ``forward``'s
    parameters); ``{}`` when every shape is static."""
    import inspect

    if not dynamic_shapes:
        return {}
    try:
        params = [p.name for p in inspect.signature(module.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    names = [params[k] if k < len(params) else f"input_{k}" for k in range(len(args))]
    axes = {names[k]: {d: f"{names[k]}_{d}" for d in dims} for k, dims in enumerate(dynamic_shapes) if dims}
    return {"input_names": names, "dynamic_axes": axes}


def _export_route(route: str, module, args: tuple, dynamic_shapes) -> tuple[onnx.ModelProto, tuple[str, ...]]:
    """One route's export: ``(model, TracerWarning lines)``."""
    import warnings

    import torch

    with eval_mode(module), printed_to_log(f"torch.onnx.export ({route})"), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always", torch.jit.TracerWarning)
        if route == "dynamo":
            proto = torch.onnx.export(module, tuple(args), dynamo=True, verbose=False,
                                      dynamic_shapes=dynamic_shapes).model_proto
        elif route == "exported_program":
            program = torch.export.export(module, tuple(args), dynamic_shapes=dynamic_shapes, strict=False)
            proto = torch.onnx.export(program, tuple(args), dynamo=True, verbose=False).model_proto
        else:
            buf = io.BytesIO()
            torch.onnx.export(module, tuple(args), buf, dynamo=False, **_dynamic_axes(module, args, dynamic_shapes))
            proto = onnx.load_from_string(buf.getvalue())
    traced = tuple(dict.fromkeys(f"{w.filename.rsplit('/', 1)[-1]}:{w.lineno}: {str(w.message).split('. ')[0]}"
                                 for w in seen if issubclass(w.category, torch.jit.TracerWarning)
                                 and "might cause the trace to be incorrect" in str(w.message)))
    return proto, traced


#: The relative L2 error against the module above which a trace that fixed a Python value computed
#: from tensors counts as wrong (a branch taken otherwise, a count fixed, gives errors near 1).
TRACE_TOLERANCE = 1e-2


def _runs_like(proto: onnx.ModelProto, module, checks: Sequence[tuple], tolerance: float) -> str | None:
    """Why an exported model does not compute what ``module`` does on ``checks`` (argument
    tuples), or None: ONNX Runtime cannot load it, or its outputs differ (relative L2 above
    ``tolerance``, or another shape: a trace that fixed a data-dependent branch or count)."""
    import numpy as np
    import torch
    from torch.utils._pytree import tree_flatten

    from fp16guard.compare import relative_l2
    from fp16guard.onnx_graph import cpu_session, fed_inputs

    if proto.ByteSize() > 2 ** 31 - 1:  # beyond protobuf's limit: ONNX Runtime reads it from files only
        return None
    try:
        session = cpu_session(proto)
    except ModelLoadError as e:
        return str(e).replace(f"ONNX Runtime cannot load {proto.graph.name or 'the model'}", "ONNX Runtime cannot load it")
    names = fed_inputs(proto)
    for k, args in enumerate(checks):
        with torch.no_grad(), eval_mode(module):
            ref = [t.detach().float().numpy() if t.is_floating_point() else t.detach().numpy()
                   for t in tree_flatten(module(*args))[0] if isinstance(t, torch.Tensor)]
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        feed = {n: (a.float() if a.is_floating_point() else a).numpy() for n, a in zip(names, tensors)}
        try:
            out = session.run(None, feed)
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types
            return f"ONNX Runtime cannot run it on input {k} ({first_line(e)[:160]})"
        if len(out) != len(ref):
            return None  # outputs flattened otherwise: nothing to compare one to one
        out = [np.asarray(o, dtype=np.float32) if np.issubdtype(np.asarray(o).dtype, np.floating) else o for o in out]
        err = relative_l2(out, ref)
        if not err <= tolerance:
            shapes = [(list(np.shape(o)), list(np.shape(r))) for o, r in zip(out, ref) if np.shape(o) != np.shape(r)]
            why = (f"output shape {shapes[0][0]} where the module gives {shapes[0][1]}" if shapes
                   else f"relative L2 error {err:.3g} against the module")
            return f"its outputs differ from the module's on input {k} ({why})"
    return None


def widen_bfloat16(model: onnx.ModelProto) -> tuple[onnx.ModelProto, str]:
    """The graph with its bfloat16 computation in float32 (ONNX Runtime's CPU provider has no
    bfloat16 ``Mul``, ``Add``, ...): bfloat16 initializers and ``Constant`` values widened (exactly),
    ``Cast``/``dtype`` targets of bfloat16 made float32, bfloat16 values declared float32; the
    bfloat16 rounding of the module's intermediate values is then not done.

    Returns:
        ``(model', what changed in one clause)``; ``model`` itself and ``""`` when nothing is bfloat16.
    """
    import numpy as np
    from onnx import numpy_helper

    bf16, f32 = onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT
    out = onnx.ModelProto()
    out.CopyFrom(model)
    counts = {"constant": 0, "cast": 0, "value": 0}

    def widen_tensor(t) -> None:
        """A bfloat16 TensorProto rewritten in place as float32."""
        if t.data_type == bf16:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name))
            counts["constant"] += 1

    def widen_type(tp) -> None:
        """A value's declared type, bfloat16 -> float32 (tensors, sequences, optionals)."""
        which = tp.WhichOneof("value")
        if which == "tensor_type" and tp.tensor_type.elem_type == bf16:
            tp.tensor_type.elem_type = f32
            counts["value"] += 1
        elif which in ("sequence_type", "optional_type"):
            widen_type(getattr(tp, which).elem_type)

    def walk(graph) -> None:
        """Every bfloat16 of one graph and its subgraphs."""
        for t in graph.initializer:
            widen_tensor(t)
        for v in (*graph.input, *graph.output, *graph.value_info):
            widen_type(v.type)
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    widen_tensor(attr.t)
                elif attr.type == onnx.AttributeProto.INT and attr.name in ("to", "dtype") and attr.i == bf16:
                    attr.i = f32
                    counts["cast"] += 1
                elif attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for g in attr.graphs:
                        walk(g)

    walk(out.graph)
    if not any(counts.values()):
        return model, ""
    parts = [f"{n} {what}" for n, what in ((counts["cast"], "Cast(s) to bfloat16"),
                                           (counts["constant"], "bfloat16 constant(s)")) if n]
    return out, (f"its bfloat16 computation runs in float32 ({', '.join(parts) or 'bfloat16 values'} made float32; "
                 f"ONNX Runtime has no bfloat16 kernels for it), so the FP32 reference skips the module's bfloat16 "
                 f"rounding")


def export_onnx_routes(module, args: tuple, *, dynamic_shapes=None, what: str = "the model",
                       checks: Sequence[tuple] | None = None) -> OnnxExport:
    """Export ``module(*args)`` to an FP32 ONNX model by the first route that works.

    Routes (:data:`ONNX_ROUTES`), in order: the dynamo exporter (needs onnxscript), the TorchScript
    exporter, and, when the dynamo exporter's own ``torch.export`` failed, the dynamo exporter on
    a non-strict ``torch.export`` program. With ``checks`` a route also has to give a model ONNX
    Runtime loads (a graph with bfloat16 ops it has no kernel for is first widened,
    :func:`widen_bfloat16`) and, when the TorchScript trace warned that it fixed a Python value
    computed from tensors, one that computes what the module does on each argument tuple of
    ``checks`` (within :data:`TRACE_TOLERANCE`; a branch fixed to the example's does not);
    otherwise the next route is tried.

    Args:
        module: a ``torch.nn.Module`` or ``GraphModule`` (exported in eval mode; its training flag
            is restored).
        args: example arguments (tensors).
        dynamic_shapes: as ``torch.export`` takes it (see
            :func:`~fp16guard.torch_graph.dynamic_dims`); dynamo only.
        what: how to name the module in the error.
        checks: argument tuples to compare the export with the module on (None: no check).

    Raises:
        ExportError: no route worked; the message has each route's failure.
    """
    failed: list[str] = []
    dynamo = importlib.util.find_spec("onnxscript") is not None
    dynamo_capture_failed = False
    for route in ONNX_ROUTES:
        if route != "torchscript" and not dynamo:
            if route == "dynamo":
                failed.append("dynamo: onnxscript is not installed")
            continue
        if route == "exported_program" and not dynamo_capture_failed:
            continue  # the exporter's torch.export worked: the program would fail the same way
        try:
            proto, traced = _export_route(route, module, args, dynamic_shapes)
        except Exception as e:  # noqa: BLE001 - exporters raise many types
            failed.append(f"{route}: {_export_error(e)}")
            dynamo_capture_failed = route == "dynamo" and type(e).__name__ == "TorchExportError"
            continue
        widened = ""
        if checks is not None:
            compare = list(checks) if traced else []  # a trace that fixed a Python value may be wrong elsewhere
            problem = _runs_like(proto, module, compare, TRACE_TOLERANCE)
            if problem and problem.startswith("ONNX Runtime cannot load"):
                wide, widened = widen_bfloat16(proto)
                if widened:
                    problem = _runs_like(wide, module, compare, TRACE_TOLERANCE)
                    proto = wide
            if problem:
                failed.append(f"{route}: {problem}")
                continue
        export = OnnxExport(proto, route, tuple(failed), widened, traced, len(compare) if checks is not None else 0)
        logging.getLogger("fp16guard").info("%s: %s", what, export.describe())
        return export
    raise ExportError(f"cannot export {what} to ONNX ({'; '.join(failed)})")


def export_onnx(module, args: tuple, *, dynamic_shapes=None, what: str = "the model") -> onnx.ModelProto:
    """Export ``module(*args)`` to an FP32 ``onnx.ModelProto``: the dynamo exporter, else the
    TorchScript exporter (:func:`export_onnx_routes` without checks).

    Args:
        module: a ``torch.nn.Module`` or ``GraphModule`` (exported in eval mode; its training flag
            is restored).
        args: example arguments (tensors).
        dynamic_shapes: as ``torch.export`` takes it (see
            :func:`~fp16guard.torch_graph.dynamic_dims`); dynamo only.
        what: how to name the module in the error.

    Raises:
        ExportError: every exporter failed.
    """
    return export_onnx_routes(module, args, dynamic_shapes=dynamic_shapes, what=what).model
