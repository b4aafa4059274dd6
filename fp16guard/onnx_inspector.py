"""The inspector for ONNX files: every intermediate value of an FP32 ONNX Runtime run.

Exposing every intermediate tensor as a graph output at once would keep them all alive (gigabytes
for a 2880x2048 image). :func:`inspect_onnx` instead exposes them in *chunks* whose total size,
estimated by ONNX shape inference for the actual input shapes, fits a memory budget (default
1 GiB; a value whose size cannot be inferred counts as a sixteenth of the budget). Each chunk is
one ONNX Runtime run; its outputs are reduced on the host with :func:`fp16guard.stats.tensor_stats`
and freed before the next chunk runs. A model whose activations fit the budget runs once.

(Reducing inside the graph, with ``ReduceMax``/``ReduceSum`` nodes appended per value, was tried
first: ONNX Runtime's CPU kernels for the boolean masks made it 80x slower than a plain run, and it
scheduled the reductions late enough to hold 7 GB for a 736x1472 image.)

Node names are mapped back to module scopes where the exporter wrote them
(``/backbone/layer4/conv/Conv`` -> ``backbone.layer4.conv``); otherwise the scope is the node's
first output name (Paddle's ``conv2d_450.tmp_0``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Union

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .inputs import InputError
from .report import CallRecord, InspectionReport
from .static_check import check_onnx
from .stats import RangeStats

logger = logging.getLogger("fp16guard")

FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}

Feeds = Union[Mapping[str, np.ndarray], Sequence[np.ndarray], np.ndarray]


class ModelLoadError(ValueError):
    """A model file is missing, unreadable, or not something fp16guard can run."""


def load_onnx(model: str | Path | onnx.ModelProto) -> onnx.ModelProto:
    """Load an ONNX model from a path (external data next to it is followed) or pass one through.

    Raises:
        ModelLoadError: the file does not exist or is not a valid ONNX model.
    """
    if isinstance(model, onnx.ModelProto):
        return model
    path = Path(model)
    if not path.is_file():
        raise ModelLoadError(f"ONNX model not found: {path}")
    try:
        proto = onnx.load(str(path))
    except Exception as e:  # onnx raises DecodeError, ValueError, OSError depending on the damage
        raise ModelLoadError(f"{path}: not a readable ONNX model ({type(e).__name__}: {e})") from None
    if not proto.graph.node:
        raise ModelLoadError(f"{path}: the ONNX graph has no nodes")
    return proto


def scope_of(node_name: str) -> str:
    """Module scope from a PyTorch-exported node name: ``/backbone/layer4/conv/Conv`` -> ``backbone.layer4.conv``.

    Returns ``""`` when the name carries no scope (no leading ``/``).
    """
    if not node_name.startswith("/"):
        return ""
    parts = [p for p in node_name.split("/") if p]
    return ".".join(parts[:-1])


def node_scope(node: onnx.NodeProto) -> str:
    """Module scope of an exported node: from torch.onnx's ``pkg.torch.onnx.name_scopes`` metadata
    (dynamo exporter) or from a scoped name (:func:`scope_of`); ``""`` when neither says."""
    import ast

    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            try:
                parts = [x for x in ast.literal_eval(p.value) if x]
            except (ValueError, SyntaxError):
                break
            if len(parts) < 2:
                return ""
            cumulative = len(parts) < 3 or parts[-2].startswith(parts[-3] + ".")
            return parts[-2] if cumulative else ".".join(parts[:-1])
    return scope_of(node.name)


def graph_constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Every constant tensor of the main graph by name: initializers and ``Constant`` node values."""
    out = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type != "Constant" or not node.output:
            continue
        for attr in node.attribute:
            if attr.name == "value":
                out[node.output[0]] = numpy_helper.to_array(attr.t)
            elif attr.name == "value_float":
                out[node.output[0]] = np.array(attr.f, dtype=np.float32)
            elif attr.name == "value_floats":
                out[node.output[0]] = np.array(attr.floats, dtype=np.float32)
    return out


def _node_name(node: onnx.NodeProto, index: int) -> str:
    return node.name or f"{node.op_type}_{index}"


def _value_types(model: onnx.ModelProto) -> dict[str, int]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception as e:  # shape inference is best effort; fall back to what the file declares
        logger.warning("ONNX shape inference failed (%s); using declared types only", e)
        inferred = model
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.input, *g.value_info, *g.output]}
    types.update({i.name: i.data_type for i in g.initializer})
    return types


def activation_values(model: onnx.ModelProto, types: Mapping[str, int] | None = None,
                      constants: Iterable[str] | None = None) -> tuple[list[str], set[str]]:
    """The floating values an inspection measures, in execution order, and the constant-only ones.

    ``types`` (value name -> ONNX element type) and ``constants`` (names of initializers and
    ``Constant`` outputs) are computed from ``model`` when not given.

    Returns:
        ``(measured, constant)``: graph inputs and node outputs of floating type that depend on
        at least one graph input; and every value computed from constants alone (initializers,
        ``Constant`` nodes and what folds from them), which the static check covers instead.
    """
    types = _value_types(model) if types is None else types
    constant = set(graph_constants(model) if constants is None else constants)
    measured = [i.name for i in model.graph.input if types.get(i.name) in FLOAT_TYPES and i.name not in constant]
    for node in model.graph.node:
        if node.op_type == "Constant" or (node.input and all(not n or n in constant for n in node.input)):
            constant.update(node.output)
            continue
        measured += [o for o in node.output if o and types.get(o) in FLOAT_TYPES]
    return measured, constant


def value_bytes(model: onnx.ModelProto, feed: Mapping[str, np.ndarray]) -> dict[str, int]:
    """Size in bytes of every value whose shape ONNX shape inference can work out for ``feed``."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for i in fixed.graph.input:
        if i.name in feed:
            dims = i.type.tensor_type.shape.dim
            del dims[:]
            for d in feed[i.name].shape:
                dims.add().dim_value = int(d)
    try:
        g = onnx.shape_inference.infer_shapes(fixed, data_prop=True).graph
    except Exception:
        return {}
    out = {}
    for v in [*g.input, *g.value_info, *g.output]:
        tt = v.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else 0 for d in tt.shape.dim]
        if tt.HasField("shape") and all(dims) and tt.elem_type in FLOAT_TYPES:
            out[v.name] = int(np.prod(dims)) * np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)).itemsize
    return out


def plan_chunks(names: Sequence[str], sizes: Mapping[str, int], budget: int) -> list[list[str]]:
    """Split ``names`` (in order) into consecutive chunks whose summed ``sizes`` stay within ``budget``.

    A value of unknown size counts as ``budget // 16``; a value larger than the budget gets a
    chunk of its own.
    """
    chunks: list[list[str]] = []
    cur: list[str] = []
    used = 0
    for name in names:
        size = sizes.get(name, budget // 16)
        if cur and used + size > budget:
            chunks.append(cur)
            cur, used = [], 0
        cur.append(name)
        used += size
    if cur:
        chunks.append(cur)
    return chunks


def expose(model: onnx.ModelProto, names: Sequence[str], types: Mapping[str, int]) -> onnx.ModelProto:
    """A copy of ``model`` whose graph outputs are exactly ``names``, with element types ``types``."""
    new = onnx.ModelProto()
    new.CopyFrom(model)
    del new.graph.output[:]
    new.graph.output.extend(helper.make_tensor_value_info(n, types[n], None) for n in names)
    return new


def _as_feed_list(model: onnx.ModelProto, feeds, constants: set[str]) -> list[dict[str, np.ndarray]]:
    inputs = [i for i in model.graph.input if i.name not in constants]
    if isinstance(feeds, (np.ndarray, Mapping)):
        feeds = [feeds]
    elif isinstance(feeds, Sequence) and feeds and all(isinstance(f, np.ndarray) for f in feeds) \
            and len(inputs) > 1 and len(feeds) == len(inputs):
        feeds = [tuple(feeds)]
    out = []
    for f in feeds:
        if isinstance(f, np.ndarray):
            f = (f,)
        if not isinstance(f, Mapping):
            if len(f) != len(inputs):
                raise InputError(f"the model takes {len(inputs)} inputs ({', '.join(i.name for i in inputs)}), "
                                 f"got {len(f)} arrays")
            f = {i.name: a for i, a in zip(inputs, f)}
        out.append({k: np.asarray(v) for k, v in f.items()})
    for f in out:
        check_feed(inputs, f)
    return out


def check_feed(inputs: Sequence[onnx.ValueInfoProto], feed: Mapping[str, np.ndarray]) -> None:
    """Check a feed against the graph's declared inputs: names, rank, static dims, element type.

    Raises:
        InputError: naming the input, what the graph declares and what was given.
    """
    for i in inputs:
        if i.name not in feed:
            raise InputError(f"missing model input {i.name!r} (the model takes: {', '.join(x.name for x in inputs)})")
        a = feed[i.name]
        tt = i.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        shown = "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"
        if tt.HasField("shape") and (a.ndim != len(dims) or any(d is not None and d != s for d, s in zip(dims, a.shape))):
            raise InputError(f"input {i.name!r} must have shape {shown}, got {list(a.shape)}")
        want = helper.tensor_dtype_to_np_dtype(tt.elem_type)
        if a.dtype != want:
            if np.issubdtype(a.dtype, np.floating) and np.issubdtype(want, np.floating):
                feed[i.name] = a.astype(want)  # type: ignore[index]
            else:
                raise InputError(f"input {i.name!r} must be {np.dtype(want).name}, got {a.dtype.name}")
    unknown = set(feed) - {i.name for i in inputs}
    if unknown:
        raise InputError(f"unknown model input(s) {sorted(unknown)}; the model takes: {', '.join(x.name for x in inputs)}")


def value_ranges(model: str | Path | onnx.ModelProto, feeds: Feeds | Sequence[Feeds], *,
                 providers: Sequence[str] | None = None, labels: Sequence[str] = (),
                 memory_budget: int = 1 << 30) -> list[dict[str, RangeStats]]:
    """Range statistics of every activation of an FP32 ONNX model, per run.

    The values measured are :func:`activation_values` (graph inputs and node outputs of floating
    type that depend on an input). They are exposed as graph outputs in chunks of at most
    ``memory_budget`` bytes and reduced to :class:`RangeStats` as each run returns.

    Args:
        model, feeds, providers, labels, memory_budget: as in :func:`inspect_onnx`.

    Returns:
        One ``{value name: RangeStats}`` per run.

    Raises:
        ModelLoadError: ONNX Runtime cannot load the model.
        InputError: a feed does not match the graph's inputs, or ONNX Runtime fails on it.
    """
    import onnxruntime as ort
    import torch

    from .stats import tensor_stats

    proto = load_onnx(model)
    consts = graph_constants(proto)
    runs = _as_feed_list(proto, feeds, set(consts))
    types = _value_types(proto)
    measured, _ = activation_values(proto, types, consts)
    largest = max(runs, key=lambda f: sum(a.nbytes for a in f.values()))
    chunks = plan_chunks(measured, value_bytes(proto, largest), memory_budget)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    name = Path(model).name if not isinstance(model, onnx.ModelProto) else proto.graph.name
    logger.info("measuring %d values of %s in %d chunk(s) per run", len(measured), name, len(chunks))

    stats: list[dict[str, RangeStats]] = [{} for _ in runs]
    for chunk in chunks:
        try:
            sess = ort.InferenceSession(expose(proto, chunk, types).SerializeToString(), opts,
                                        providers=list(providers or ["CPUExecutionProvider"]))
        except Exception as e:
            raise ModelLoadError(f"ONNX Runtime cannot load {name}: {e}") from None
        for run, feed in enumerate(runs):
            try:
                values = sess.run(None, feed)
            except Exception as e:
                label = labels[run] if run < len(labels) else f"run {run}"
                raise InputError(f"ONNX Runtime failed on {label}: {e}") from None
            for value_name, v in zip(chunk, values):
                t = torch.from_numpy(np.ascontiguousarray(v))
                stats[run][value_name] = RangeStats.from_row(tensor_stats(t).tolist(), t.numel())
            del values
    return stats


def inspect_onnx(model: str | Path | onnx.ModelProto, feeds: Feeds | Sequence[Feeds], *,
                 providers: Sequence[str] | None = None, static: bool = True,
                 labels: Sequence[str] = (), source: str | None = None,
                 memory_budget: int = 1 << 30) -> InspectionReport:
    """Inspect an FP32 ONNX model: per-node activation ranges, from/to transitions, static check.

    Args:
        model: path to an ``.onnx`` file or an ``onnx.ModelProto``.
        feeds: one run's inputs (a dict by input name, a tuple of arrays in input order, or one
            array for a single-input model) or a list of runs. Shapes must match the graph's
            declared static dimensions; floating arrays are cast to the declared float type.
        providers: ONNX Runtime execution providers (default: CPU).
        static: include the static check of initializers, ``Constant`` nodes and BatchNorms.
        labels: a label per run, for the report.
        source: what to call the model in the report (default: the file name).
        memory_budget: bytes of intermediate values held at once (see the module docstring).

    Returns:
        An :class:`InspectionReport` with one :class:`CallRecord` per node and run (``call`` is the
        run index), nodes in graph (topological) order.

    Raises:
        ModelLoadError: the model is missing or unreadable, or ONNX Runtime cannot load it.
        InputError: a feed does not match the graph's inputs, or ONNX Runtime fails on it.
    """
    proto = load_onnx(model)
    consts = graph_constants(proto)
    runs = _as_feed_list(proto, feeds, set(consts))
    name = source or (Path(model).name if not isinstance(model, onnx.ModelProto) else proto.graph.name)
    stats = value_ranges(proto, runs, providers=providers, labels=labels, memory_budget=memory_budget)

    records: list[CallRecord] = []
    for run in range(len(runs)):
        seen = stats[run]
        for i, node in enumerate(proto.graph.node):
            if not any(o in seen for o in node.output):
                continue
            node_name = _node_name(node, i)
            scope = scope_of(node.name) or (node.output[0] if node.output else node_name)
            records.append(CallRecord(
                len(records), node_name, node.op_type, scope, run,
                RangeStats.merge(seen[n] for n in node.input if n in seen),
                RangeStats.merge(seen[n] for n in node.output if n in seen)))
    consumer = {}
    for i, node in enumerate(proto.graph.node):
        for n in node.input:
            consumer.setdefault(n, _node_name(node, i))
    return InspectionReport(
        source=name,
        calls=tuple(records),
        static=tuple(check_onnx(proto, consts, consumer)) if static else (),
        inputs=tuple(labels) or tuple(f"run {k}" for k in range(len(runs))),
    )
