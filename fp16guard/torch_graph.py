"""The PyTorch graph layer: one capture, module paths, one state-dict hash.

* :func:`inference_copy`: the eval-mode deep copy of the caller's module that bisect, calibrate
  and fix measure (the caller's model is never changed).
* :func:`capture`: a module as one flat ``torch.fx.GraphModule`` of ATen ops (``torch.export``,
  optionally falling back to ``torch.fx.symbolic_trace``), in eval mode, its ``no_grad``/autocast
  regions inlined (:func:`inline_wrapped_regions`); bisect cuts it, the fix rewrites it.
* :func:`module_paths`: which modules an op ran inside (``nn_module_stack``).
* :func:`state_dict_sha256`: the hash that ties a plan to a module.

The ONNX export (``export_onnx``, ``export_onnx_routes``) is :mod:`fp16guard.torch_onnx`'s; its
names (:data:`ONNX_EXPORT_NAMES`) are still reachable from here, imported on first use.
"""

from __future__ import annotations

import contextlib
import copy
import io
from typing import Sequence

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

