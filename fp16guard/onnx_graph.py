"""The ONNX graph layer: loading, constants, value types, consumers, scopes, and the pieces of the FP32 run.

Every stage reads ONNX graphs through these helpers: :func:`load_onnx` (one error for a bad file),
:func:`graph_constants`, :func:`value_types`, :func:`consumers` ("who reads value t"),
:func:`node_scope` (the module a node came from), :func:`cpu_session` (the one place an ONNX
Runtime CPU session is built), and what the FP32 measurement of every activation
(:func:`fp16guard.onnx_ranges.value_ranges`, above this layer and the control flow replay) is made of:
the values measured (:func:`activation_values`), their sizes (:func:`value_bytes`), the chunks
that fit a memory budget (:func:`plan_chunks`) and the graph that exposes one chunk (:func:`expose`).

Node names are mapped back to module scopes where the exporter wrote them
(``/backbone/layer4/conv/Conv`` -> ``backbone.layer4.conv``); otherwise the scope is the node's
first output name (Paddle's ``conv2d_450.tmp_0``).
"""


from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Union

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fp16guard.errors import InputError, ModelLoadError, first_line

logger = logging.getLogger("fp16guard")

FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}

Feeds = Union[Mapping[str, np.ndarray], Sequence[np.ndarray], np.ndarray]


def load_onnx(model: str | Path | onnx.ModelProto) -> onnx.ModelProto:
    """Load an ONNX model from a path (external data next to it is followed) or pass one through.

    Raises:
        ModelLoadError: the file does not exist or is not a valid ONNX model.
    """
    if isinstance(model, onnx.ModelProto):
        return model
    path = Path(model)
    from fp16guard.files import check_readable

    check_readable(path, "ONNX model", ModelLoadError)  # missing, a folder, a symlink loop, a FIFO
    if path.stat().st_size == 0:
        raise ModelLoadError(f"{path}: the file is empty; export the model again")
    try:
        proto = onnx.load(str(path))
    except Exception as e:  # onnx raises DecodeError, ValueError, OSError depending on the damage
        raise ModelLoadError(f"{path}: not a readable ONNX model ({type(e).__name__}: {first_line(e)[:200]})") from None
    if not proto.graph.node:
        raise ModelLoadError(f"{path}: the ONNX graph has no nodes")
    return proto


def model_sha256(model: onnx.ModelProto) -> str:
    """Hex SHA-256 of the model's deterministic serialization: a plan's ``model_sha256`` for an
    ONNX model and the key of the engine cache."""
    return hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()


def subgraph_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Nodes of the main graph that hold subgraphs (``If``, ``Loop``, ``Scan``): control flow, whose
    inner values :mod:`fp16guard.control_flow` measures by replaying it."""
    return [n for n in model.graph.node
            if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in n.attribute)]


def subgraphs(node: onnx.NodeProto) -> list[tuple[str, onnx.GraphProto]]:
    """The graphs a node holds, as ``(attribute name, graph)``: ``If``'s ``then_branch`` and
    ``else_branch``, ``Loop``'s and ``Scan``'s ``body``; a ``GRAPHS`` attribute gives ``name[k]``."""
    out = []
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            out.append((a.name, a.g))
        elif a.type == onnx.AttributeProto.GRAPHS:
            out += [(f"{a.name}[{k}]", g) for k, g in enumerate(a.graphs)]
    return out


def graph_defines(graph: onnx.GraphProto) -> set[str]:
    """Names a graph defines itself: its inputs, initializers and node outputs."""
    return ({i.name for i in graph.input} | {i.name for i in graph.initializer}
            | {i.values.name for i in graph.sparse_initializer} | {o for n in graph.node for o in n.output if o})


def free_reads(graph: onnx.GraphProto) -> list[str]:
    """Names a (sub)graph reads from the scopes around it, in order of first use: node inputs and
    graph outputs it does not define, those of its own subgraphs included."""
    local = graph_defines(graph)
    out: dict[str, None] = {}
    for node in graph.node:
        for name in node_reads(node):
            if name not in local:
                out[name] = None
    for o in graph.output:
        if o.name and o.name not in local:
            out[o.name] = None
    return list(out)


def node_reads(node: onnx.NodeProto) -> list[str]:
    """Every value a node reads: its inputs, then what its subgraphs read from outside them (an
    ``If`` branch reads outer values by name, not through inputs); ``""`` left out."""
    out = dict.fromkeys(x for x in node.input if x)
    for _, g in subgraphs(node):
        out.update(dict.fromkeys(free_reads(g)))
    return list(out)


def refuse_fp16_model(model: onnx.ModelProto, what: str) -> None:
    """Raise when ``model`` already computes in FP16 (or BF16): a graph input or output is float16,
    or a node casts a value computed from the inputs to float16 (onnxconverter-common's
    ``keep_io_types=True`` Casts, fp16guard's own typed FP16 output). Float16 weights that a
    ``Cast(to=FLOAT)`` reads (weights stored compressed, computed in FP32) are no reason.

    Args:
        what: what needs the FP32 model, completing "give <what> the FP32 model it came from".

    Raises:
        ModelLoadError: one line saying so and what to give instead.
    """
    narrow = {TensorProto.FLOAT16: "float16", TensorProto.BFLOAT16: "bfloat16"}
    g = model.graph
    why = next((f"its {kind} {v.name!r} is {narrow[v.type.tensor_type.elem_type]}"
                for kind, values in (("input", g.input), ("output", g.output)) for v in values
                if v.type.tensor_type.elem_type in narrow), "")
    inits = {t.name: t.data_type for t in g.initializer}
    constant = set(inits)
    for node in g.node if not why else ():
        if node.op_type == "Constant" or node.input and all(not t or t in constant for t in node.input):
            constant.update(node.output)  # computed from constants alone
            continue
        if node.op_type == "Cast":
            to = next((a.i for a in node.attribute if a.name == "to"), None)
        elif node.op_type == "CastLike" and len(node.input) > 1:
            to = inits.get(node.input[1])
        else:
            continue
        if to in narrow:
            why = f"node {node.name or node.op_type!r} casts {node.input[0]!r} to {narrow[to]}"
            break
    if why:
        fmt = "BF16" if "bfloat16" in why else "FP16"
        raise ModelLoadError(f"the model is already converted to {fmt} ({why}); give {what} the FP32 model it "
                             f"came from")


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


def constant_names(model: onnx.ModelProto) -> set[str]:
    """The names of :func:`graph_constants` (initializers and ``Constant`` outputs of the main
    graph), without reading their values."""
    names = {init.name for init in model.graph.initializer}
    names.update(node.output[0] for node in model.graph.node if node.op_type == "Constant" and node.output
                 and any(a.name in ("value", "value_float", "value_floats") for a in node.attribute))
    return names


def fed_inputs(model: onnx.ModelProto) -> list[str]:
    """Names of the graph inputs a caller feeds, in order: graph inputs that are not also
    initializers or ``Constant`` outputs (older exporters list weights as inputs too), nor of
    ``optional`` type (left out: the model runs without them)."""
    constants = constant_names(model)
    return [i.name for i in model.graph.input if i.name not in constants and not i.type.HasField("optional_type")]


def node_name(node: onnx.NodeProto, index: int) -> str:
    """A node's name, or ``<op_type>_<index>`` for an unnamed node (``index``: its graph position)."""
    return node.name or f"{node.op_type}_{index}"


def unique_name(base: str, used: set[str]) -> str:
    """``base``, or the first of ``base_1``, ``base_2``, ... that is not in ``used`` (not changed)."""
    name, k = base, 0
    while name in used:
        k += 1
        name = f"{base}_{k}"
    return name


#: Initializers of more elements than this are left out of the graph :func:`infer_shapes` hands to
#: ONNX (declared as graph inputs of their type and shape instead): shape inference then costs what
#: the graph's nodes cost, not what its weights weigh (BERT-base, 437 MB: 2.0 s -> 0.1 s per call).
SKELETON_LIMIT = 1024


def skeleton(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]] | None = None) -> onnx.ModelProto:
    """``model`` without its large weights: initializers above :data:`SKELETON_LIMIT` elements become
    graph inputs of the same type and shape (shape tensors and other small constants stay), so
    ONNX shape inference and ``onnx.checker`` cost what the nodes cost, not what the weights weigh,
    and a model above 2 GB can be checked. ``input_shapes`` replaces the declared shapes of the
    graph inputs it names (the shapes of an actual feed). ``model`` is not modified."""
    g = model.graph
    out = onnx.ModelProto(ir_version=model.ir_version, producer_name=model.producer_name)
    out.opset_import.extend(model.opset_import)
    out.functions.extend(model.functions)
    sg = out.graph
    sg.name = g.name
    sg.node.extend(g.node)
    sg.input.extend(g.input)
    for i in sg.input:
        if input_shapes and i.name in input_shapes:
            dims = i.type.tensor_type.shape.dim
            del dims[:]
            for d in input_shapes[i.name]:
                dims.add().dim_value = int(d)
    sg.output.extend(g.output)
    sg.value_info.extend(g.value_info)
    sg.sparse_initializer.extend(g.sparse_initializer)
    declared = {i.name for i in g.input}
    for init in g.initializer:
        if int(np.prod(init.dims, dtype=np.int64)) <= SKELETON_LIMIT:
            sg.initializer.append(init)
        elif init.name not in declared:
            sg.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    return out


def infer_shapes(model: onnx.ModelProto, *, data_prop: bool = False,
                 input_shapes: Mapping[str, Sequence[int]] | None = None) -> onnx.ModelProto:
    """``onnx.shape_inference.infer_shapes`` of the :func:`skeleton` of ``model``: the returned model
    has the inferred ``value_info`` (large initializers are graph inputs there). ``model`` is not
    modified.

    Raises:
        Whatever ONNX shape inference raises on the graph.
    """
    return onnx.shape_inference.infer_shapes(skeleton(model, input_shapes), data_prop=data_prop)


def inputs_only(model: onnx.ModelProto) -> onnx.ModelProto:
    """What a check of feeds against ``model`` reads (:func:`fp16guard.inputs.check_feeds`), without
    its weights, for a caller that keeps it beside a full copy of the graph
    (:class:`~fp16guard.fixing.targets.OnnxFixTarget`): the
    graph's inputs and outputs, its ``Constant`` nodes, and its initializers' names (an exporter
    that lists weights as inputs too must not have them asked for)."""
    g = model.graph
    out = onnx.ModelProto(ir_version=model.ir_version)
    out.opset_import.extend(model.opset_import)
    out.graph.name = g.name
    out.graph.input.extend(g.input)
    out.graph.output.extend(g.output)
    out.graph.node.extend(n for n in g.node if n.op_type == "Constant")
    out.graph.initializer.extend(onnx.TensorProto(name=i.name, data_type=i.data_type) for i in g.initializer)
    return out


def value_types(model: onnx.ModelProto) -> dict[str, int]:
    """ONNX element type (``TensorProto.FLOAT``, ...) of every value ONNX shape inference can type,
    graph inputs, outputs and initializers included; the declared types only if inference fails."""
    try:
        inferred = infer_shapes(model)
    except Exception as e:  # shape inference is best effort; fall back to what the file declares
        logger.warning("ONNX shape inference failed (%s); using declared types only", e)
        inferred = model
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.input, *g.value_info, *g.output]}
    types.update({i.name: i.data_type for i in model.graph.initializer})
    return types


def consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """Value name -> the nodes that read it, in graph order, once per input slot (``Mul(x, x)`` is
    listed twice for ``x``, so "read by exactly one node input" is ``len(...) == 1``); a node whose
    subgraphs read an outer value (:func:`free_reads`) is listed once more for it."""
    out: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            if name:
                out.setdefault(name, []).append(node)
        for name in dict.fromkeys(r for _, g in subgraphs(node) for r in free_reads(g)):
            if name not in node.input:
                out.setdefault(name, []).append(node)
    return out


def cpu_session(model: onnx.ModelProto, *, optimize: bool = True, options=None):
    """An ONNX Runtime ``InferenceSession`` of ``model`` on the CPU execution provider, quiet (warnings
    and below not logged): the one place fp16guard builds a CPU session.

    Args:
        model: the graph to run (serialized here).
        optimize: ``False`` turns graph optimizations off (emulation and FP16 prefixes must run
            exactly the graph given).
        options: a prepared ``onnxruntime.SessionOptions`` (its log level is raised); overrides
            ``optimize``.

    Raises:
        ModelLoadError: ONNX Runtime refuses the model (the message has its first line).
    """
    import onnxruntime as ort

    so = options or ort.SessionOptions()
    so.log_severity_level = 3
    if not optimize and options is None:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
        raise ModelLoadError(f"ONNX Runtime cannot load {model.graph.name or 'the model'}: {first_line(e)}") from None


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
    types = value_types(model) if types is None else types
    constant = set(constant_names(model) if constants is None else constants)
    measured = [i.name for i in model.graph.input if types.get(i.name) in FLOAT_TYPES and i.name not in constant]
    for node in model.graph.node:
        if node.op_type == "Constant" or (node.input and all(not n or n in constant for n in node_reads(node))):
            constant.update(node.output)
            continue
        measured += [o for o in node.output if o and types.get(o) in FLOAT_TYPES]
    return measured, constant


def value_bytes(model: onnx.ModelProto, feed: Mapping[str, np.ndarray]) -> dict[str, int]:
    """Size in bytes of every value whose shape ONNX shape inference can work out for ``feed``."""
    try:
        g = infer_shapes(model, data_prop=True, input_shapes={k: v.shape for k, v in feed.items()}).graph
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


def feed_list(model: onnx.ModelProto, feeds, constants: set[str]) -> list[dict[str, np.ndarray]]:
    """Feeds in any of :data:`Feeds`' forms (or a list of runs) as one checked ``{input name: array}``
    per run; ``constants`` are graph inputs that are really initializers (not fed).

    Raises:
        InputError: the wrong number of arrays, or a feed :func:`check_feed` refuses.
    """
    inputs = [i for i in model.graph.input if i.name not in constants and not i.type.HasField("optional_type")]
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
        if not i.type.HasField("tensor_type"):
            raise InputError(f"input {i.name!r} is a {i.type.WhichOneof('value')}, not a tensor; fp16guard feeds "
                             "tensors only")
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


def float64_as_float32(model: onnx.ModelProto) -> tuple[onnx.ModelProto, str | None]:
    """A float64 model (or one with float64 parts) computed in float32: float64 graph inputs,
    outputs, ``value_info``, initializers, ``Constant`` and ``ConstantOfShape`` values become
    float32, and ``Cast``/``EyeLike``/``Random*`` to float64 give float32. The typed FP16
    conversion then sees an FP32 graph; TensorRT has no float64 tensors, so the fixed model
    takes and returns float32.

    Args:
        model: a model without control flow (not modified).

    Returns:
        ``(model', note)``: the note one sentence for the report; ``model`` itself and None when
        nothing is float64.
    """
    double = TensorProto.DOUBLE
    g = model.graph
    values = [*g.input, *g.output, *g.value_info]
    weights = sum(t.data_type == double for t in g.initializer)
    touched = (weights or any(v.type.tensor_type.elem_type == double for v in values)
               or any(a.t.data_type == double if a.type == onnx.AttributeProto.TENSOR else
                      a.name in ("to", "dtype") and a.i == double for n in g.node for a in n.attribute))
    if not touched:
        return model, None
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    for i, t in enumerate(g.initializer):
        if t.data_type == double:
            with np.errstate(over="ignore"):
                g.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name))
    for v in [*g.input, *g.output, *g.value_info]:
        if v.type.tensor_type.elem_type == double:
            v.type.tensor_type.elem_type = TensorProto.FLOAT
    for node in g.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == double:
                with np.errstate(over="ignore"):
                    a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float32), a.t.name))
            elif a.type == onnx.AttributeProto.INT and a.name in ("to", "dtype") and a.i == double:
                a.i = TensorProto.FLOAT
    inputs = sum(i.type.tensor_type.elem_type == double for i in model.graph.input)
    outputs = sum(o.type.tensor_type.elem_type == double for o in model.graph.output)
    return m, (f"the float64 model is computed in float32 before the FP16 conversion ({inputs} input(s), "
               f"{outputs} output(s), {weights} weight(s) were float64): the fixed model takes and "
               f"returns float32 (TensorRT has no float64)")
