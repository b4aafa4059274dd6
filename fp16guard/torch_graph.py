"""The PyTorch graph layer: one capture, module paths, one state-dict hash, and the ONNX export.

* :func:`inference_copy`: the eval-mode deep copy of the caller's module that bisect, calibrate
  and fix measure (the caller's model is never changed).
* :func:`capture`: a module as one flat ``torch.fx.GraphModule`` of ATen ops (``torch.export``,
  optionally falling back to ``torch.fx.symbolic_trace``), in eval mode; bisect cuts it, the fix
  rewrites it.
* :func:`module_paths`: which modules an op ran inside (``nn_module_stack``).
* :func:`state_dict_sha256`: the hash that ties a plan to a module.
* :func:`export_onnx`, :func:`export_onnx_routes`: the one place fp16guard calls ``torch.onnx.export``.

The dynamo exporter (``torch.onnx.export(..., dynamo=True)``, needs onnxscript) records each
node's module scope in its metadata (``pkg.torch.onnx.name_scopes``); without onnxscript, or where
it fails, the TorchScript exporter is used, whose node names carry the scopes instead
(``/conv2/Conv``).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import logging
import re
from dataclasses import dataclass
from typing import Sequence

import onnx

from fp16guard.errors import ExportError, ModelLoadError, first_line


@contextlib.contextmanager
def printed_to_log(what: str):
    """What a library prints to stdout/stderr inside the block (``torch.export`` prints the whole
    traced graph when a capture fails) goes to the ``fp16guard`` log at INFO level (shown with
    ``-v``), so the terminal holds only fp16guard's own lines."""
    import logging

    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            yield
    finally:
        text = out.getvalue().strip()
        if text:
            logging.getLogger("fp16guard").info("%s printed:\n%s", what, text)


@contextlib.contextmanager
def eval_mode(model):
    """Put ``model`` in eval mode for the block and restore every submodule's training flag after,
    each to its own value (a model in mixed modes stays mixed); a module unflattened from an
    ``ExportedProgram`` has no train mode and is left as it is."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.train(False)
    except NotImplementedError:  # torch.export's unflattened module: already an inference graph
        yield model
        return
    try:
        yield model
    finally:
        for m, training in flags:
            m.training = training


def inference_copy(model):
    """The model as bisect, calibrate and fix measure it: a deep copy in eval mode.

    Deployment is inference, so the stages run what TensorRT would: BatchNorm on its running
    statistics, dropout off, whatever mode the caller's model is in (train, eval, or mixed: a model
    in train mode gives the eval-mode result). The caller's model is never touched: its parameters,
    buffers (running statistics, ``num_batches_tracked``), training flags and hooks stay as they were.

    Args:
        model: a ``torch.nn.Module``; anything else (a ``torch.export.ExportedProgram``, already an
            inference graph that nothing here changes) is returned as it is.

    Raises:
        ModelLoadError: ``copy.deepcopy`` cannot copy the module.
    """
    import torch

    if not isinstance(model, torch.nn.Module):
        return model
    try:
        copied = copy.deepcopy(model)
    except Exception as e:  # noqa: BLE001 - a module's __deepcopy__ may raise anything
        raise ModelLoadError(f"cannot copy {type(model).__name__} to measure it in eval mode ({type(e).__name__}: "
                             f"{first_line(e)[:200]}); fp16guard never changes the caller's model, so the model must "
                             f"support copy.deepcopy") from None
    drop_user_hooks(copied)
    try:
        copied.eval()
    except NotImplementedError:  # torch.export's unflattened module: already an inference graph
        pass
    return copied


#: Hook tables of ``torch.nn.Module`` (handle id -> hook) that :func:`drop_user_hooks` empties on a
#: copy, and the flag tables (handle id -> bool) that go with them.
HOOK_TABLES = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
HOOK_FLAG_TABLES = ("_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs")


def drop_user_hooks(module) -> None:
    """Remove the forward and backward hooks of every submodule of ``module`` (an internal copy),
    so a hook the user put on their model (one that appends to a list, logs, saves activations)
    does not fire when fp16guard runs its copies; the user's model keeps its hooks.

    Hooks that *define* the computation stay: those of ``torch.nn.utils`` (``weight_norm``,
    ``spectral_norm``), which recompute ``weight`` from its factors before each forward.
    Module-global hooks (``torch.nn.modules.module.register_module_forward_hook``) belong to the
    process, not the model, and are left alone.
    """
    for m in module.modules():
        dropped = set()
        for table in HOOK_TABLES:
            hooks = getattr(m, table, None) or {}
            for key in [k for k, hook in hooks.items() if not _defines_computation(hook)]:
                del hooks[key]
                dropped.add(key)
        for table in HOOK_FLAG_TABLES:
            flags = getattr(m, table, None) or {}
            for key in dropped & set(flags):
                del flags[key]


def _defines_computation(hook) -> bool:
    """True for a hook from ``torch.nn.utils`` (weight or spectral normalization)."""
    return type(hook).__module__.startswith("torch.nn.utils")


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
    :func:`dynamic_dims` gives them; the inputs named after ``forward``'s parameters); ``{}`` when
    every shape is static."""
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
        dynamic_shapes: as ``torch.export`` takes it (see :func:`dynamic_dims`); dynamo only.
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
        dynamic_shapes: as ``torch.export`` takes it (see :func:`dynamic_dims`); dynamo only.
        what: how to name the module in the error.

    Raises:
        ExportError: every exporter failed.
    """
    return export_onnx_routes(module, args, dynamic_shapes=dynamic_shapes, what=what).model


def capture(model, examples: Sequence[Sequence], *, trace_fallback: bool = False):
    """The model as one flat ``torch.fx.GraphModule`` of ATen ops (``torch.export``, non-strict).

    Args:
        model: an ``nn.Module`` (captured in eval mode; its training flag is restored after, and
            nothing else of it changes) or a ``torch.export.ExportedProgram``.
        examples: argument tuples of tensors; input dimensions that differ between them are
            exported as dynamic (:func:`dynamic_dims`).
        trace_fallback: when ``torch.export`` fails, try ``torch.fx.symbolic_trace`` (a graph of
            module calls and functions rather than ATen ops; bisect can cut it, the fix cannot
            rewrite it).

    Returns:
        The ``GraphModule`` (parameters as ``get_attr`` nodes; torch.export's unused input-shape
        guard removed).

    Raises:
        ExportError: no capture worked; the message gives each failure's first line and what to do.
    """
    import torch
    from torch import fx

    if isinstance(model, torch.export.ExportedProgram):
        gm = model.module()
    else:
        errors = []
        gm = None
        with eval_mode(model):
            try:
                with printed_to_log("torch.export"):  # on failure it prints the traced graph to stderr
                    gm = torch.export.export(model, tuple(examples[0]), dynamic_shapes=dynamic_dims(examples),
                                             strict=False).module()
            except Exception as e:  # noqa: BLE001 - export raises many types
                errors.append(f"torch.export: {type(e).__name__}: {first_line(e)[:200]}")
            if gm is None and trace_fallback:
                try:
                    gm = fx.symbolic_trace(model)
                except Exception as e:  # noqa: BLE001
                    errors.append(f"torch.fx.symbolic_trace: {type(e).__name__}: {first_line(e)[:200]}")
        if gm is None:
            raise ExportError(f"cannot capture {type(model).__name__} as a graph ({'; '.join(errors)}); make "
                              f"forward() traceable (no data-dependent Python control flow), or export it to "
                              f"ONNX yourself and give fp16guard the .onnx file")
    for node in list(gm.graph.nodes):  # torch.export's input-shape guard is not an op
        if node.op == "call_module" and node.target == "_guards_fn" and not node.users:
            gm.graph.erase_node(node)
    inline_wrapped_regions(gm)
    gm.recompile()
    return gm


#: Higher-order ops ``torch.export`` writes for a ``with torch.no_grad():`` or ``torch.autocast``
#: region inside ``forward`` (Llama's rotary embedding in some transformers releases); for inference
#: they are their body's ops, and the fix reads ATen ops only.
WRAPPED_REGIONS = ("wrap_with_set_grad_enabled", "wrap_with_autocast")


def inline_wrapped_regions(gm) -> int:
    """Replace every :data:`WRAPPED_REGIONS` call in ``gm`` by its body's ops, in place (the body's
    constants are registered on ``gm``). Returns how many regions were inlined.

    Autocast regions change dtypes only under autocast, which inference through fp16guard does not
    enable, and grad mode does not change values: the inlined graph computes the same outputs.
    """
    import operator

    import torch
    from torch import fx

    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or getattr(node.target, "__name__", "") not in WRAPPED_REGIONS:
            continue
        at = next((i for i, a in enumerate(node.args) if isinstance(a, fx.Node) and a.op == "get_attr"
                   and isinstance(get_attr(gm, a.target), fx.GraphModule)), None)
        if at is None:
            continue
        body_node = node.args[at]
        body = get_attr(gm, body_node.target)
        placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
        val_map = dict(zip(placeholders, node.args[at + 1:]))
        for inner in body.graph.nodes:  # the body's constants, under names unique in gm
            if inner.op == "get_attr":
                name = f"_inlined{count}_{inner.target.replace('.', '_')}"
                value = get_attr(body, inner.target)
                if isinstance(value, torch.Tensor):
                    gm.register_buffer(name, value)
                else:
                    setattr(gm, name, value)
                inner.target = name
        with gm.graph.inserting_before(node):
            outputs = gm.graph.graph_copy(body.graph, val_map)
        outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
        for user in list(node.users):
            if user.op == "call_function" and user.target is operator.getitem:
                user.replace_all_uses_with(outputs[user.args[1]])
                gm.graph.erase_node(user)
        if node.users:  # read whole: a tuple of the outputs
            with gm.graph.inserting_before(node):
                node.replace_all_uses_with(gm.graph.call_function(tuple, (list(outputs),)))
        gm.graph.erase_node(node)
        if not body_node.users:
            gm.graph.erase_node(body_node)
            gm.delete_submodule(body_node.target)
        count += 1
    return count


def get_attr(gm, target: str):
    """The tensor (or submodule) a ``get_attr`` node's dotted ``target`` names in ``gm``."""
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _module_path(fqn) -> str:
    """A qualified module name from ``nn_module_stack``, without dynamo's ``L['self'].`` prefix."""
    fqn = fqn if isinstance(fqn, str) else str(fqn)
    for prefix in ("L['self'].", "L__self__."):  # dynamo-style paths of older versions
        if fqn.startswith(prefix):
            return fqn[len(prefix):]
    return fqn


def module_stack(node) -> list[tuple[str, str]]:
    """``(qualified name, class name)`` of the modules an fx node was traced inside, outermost first
    (from its ``nn_module_stack`` metadata; empty for a node traced outside any submodule)."""
    out = []
    for fqn, kind in (node.meta.get("nn_module_stack") or {}).values():
        kind = kind if isinstance(kind, str) else getattr(kind, "__name__", str(kind))
        out.append((_module_path(fqn), kind.rsplit(".", 1)[-1]))
    return out


def module_paths(node) -> list[str]:
    """Qualified names of the modules a node was traced inside, outermost first."""
    return [path for path, _ in module_stack(node)]


def module_scope(node) -> str:
    """The qualified name of the innermost module an fx node was traced inside (``""`` at the top
    level): the PyTorch counterpart of :func:`fp16guard.onnx_graph.node_scope`."""
    paths = module_paths(node)
    return paths[-1] if paths else ""


def state_dict_sha256(module) -> str:
    """Hex SHA-256 over a module's state_dict: each entry's name, dtype, shape and bytes, in order.

    The one module hash of fp16guard: a plan's ``model_sha256`` (the whole model) and, cut to 16
    hex digits, a submodule's fingerprint (:func:`fp16guard.fixing.module_scales.module_fingerprint`).
    Two modules with equal parameters and buffers hash alike, whatever their Python identity.
    """
    import hashlib
    import warnings

    import torch

    h = hashlib.sha256()
    with warnings.catch_warnings():  # under torch.jit tracing, .numpy() warns that it reads a constant: it does
        warnings.simplefilter("ignore")
        for name, t in module.state_dict().items():
            t = t.detach().cpu().contiguous()
            a = (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()
            # numpy's dtype and shape: plain values even where a rewriter (mmdeploy's
            # torch.Tensor.size for TensorRT) makes traced tensors report shapes as tensors
            h.update(f"{name}:{t.dtype}:{a.shape}".encode())
            h.update(a.tobytes())
    return h.hexdigest()
