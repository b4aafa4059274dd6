"""Control flow in ONNX graphs: ``If``, ``Loop`` and ``Scan`` nodes and the subgraphs they hold.

ONNX Runtime runs a subgraph inside its ``If``/``Loop``/``Scan`` kernel and cannot return the
values computed there. fp16guard reaches them in three ways:

* :func:`normalize` (every stage, before anything else): every value and node inside a subgraph
  gets a model-wide unique name (a plan and a report name inner values and nodes as they name main
  graph ones), and an ``If`` whose condition is a constant, or computed from constants and static
  shapes only, is replaced by the branch it always takes (constant-folded with
  ``onnx.reference``): TorchScript's exporter writes such an ``If`` for ``squeeze`` of a dimension
  it did not know.
* :func:`inner_ranges` (inspect and calibration): after the main graph's FP32 run, each control
  flow node is replayed in Python, one ONNX Runtime run of its subgraph at a time: the branch the
  condition picks, every iteration of a loop body, every step of a scan, each subgraph as a model
  of its own whose inputs are its formal inputs and the outer values it reads, every inner value
  exposed. Inner control flow is replayed the same way, recursively. Every op still runs in ONNX
  Runtime's own FP32 kernels, the shapes may change from one iteration to the next, and statistics
  are merged over branches taken, iterations and runs. The replay itself is
  :mod:`fp16guard.control_flow_replay`.
* :func:`unmeasured`: the subgraphs that never ran on the inputs given (the ``else`` branch of an
  ``If`` the calibration never took), which are converted to FP16 unmeasured and reported so.

The typed FP16 conversion (:func:`fp16guard.fp16_onnx.to_typed_fp16`) enters subgraphs itself:
their nodes run in FP16 (or FP32 where the plan says), while the control flow node's inputs and
outputs, and so its subgraphs' formal inputs and outputs, stay FP32: both branches of an ``If``
and each iteration of a loop then agree on types, and the scale solver sees the node as a barrier
that reads and writes true values.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fp16guard.control_flow_replay import Replay, exposing
from fp16guard.onnx_graph import (
    FLOAT_TYPES,
    cpu_session,
    constant_names,
    graph_defines,
    infer_shapes,
    node_name,
    node_reads,
    subgraphs,
    unique_name,
)
from fp16guard.stats import RangeStats

logger = logging.getLogger("fp16guard")

#: The control flow ops whose subgraphs fp16guard measures (others with subgraphs, such as
#: ``SequenceMap``, are converted but never measured).
CONTROL_FLOW_OPS = ("If", "Loop", "Scan")


# ---------------------------------------------------------------- walking and renaming


def walk(graph: onnx.GraphProto) -> Iterator[tuple[onnx.NodeProto, str, onnx.GraphProto]]:
    """Every subgraph inside ``graph``, nested ones included, as ``(owner node, attribute, subgraph)``,
    an owner before the subgraphs of its inner nodes."""
    for node in graph.node:
        for attr, sub in subgraphs(node):
            yield node, attr, sub
            yield from walk(sub)


def inner_nodes(graph: onnx.GraphProto) -> list[tuple[onnx.NodeProto, onnx.NodeProto, str]]:
    """Every node inside a subgraph of ``graph``, as ``(node, owner node, attribute)``."""
    return [(n, owner, attr) for owner, attr, sub in walk(graph) for n in sub.node]


def all_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The nodes of ``graph`` and of every subgraph inside it."""
    return [*graph.node, *(n for n, _, _ in inner_nodes(graph))]


def has_control_flow(model: onnx.ModelProto) -> bool:
    """Whether a node of the main graph holds a subgraph."""
    return any(subgraphs(n) for n in model.graph.node)


def branch_label(owner: onnx.NodeProto, attr: str) -> str:
    """``branch else of If '/If'``, ``body of Loop 'loop'``: a subgraph as a report names it."""
    if owner.op_type == "If":
        return f"branch {attr.removesuffix('_branch')} of If {owner.name!r}"
    return f"{attr} of {owner.op_type} {owner.name!r}"


def _rename(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Rename value ``old`` to ``new`` in ``graph`` (definitions and uses) and where its subgraphs
    read it from outside (a subgraph that defines ``old`` itself keeps its own)."""
    for v in (*graph.input, *graph.output, *graph.value_info):
        if v.name == old:
            v.name = new
    for t in graph.initializer:
        if t.name == old:
            t.name = new
    for node in graph.node:
        for k, x in enumerate(node.input):
            if x == old:
                node.input[k] = new
        for k, x in enumerate(node.output):
            if x == old:
                node.output[k] = new
        rename_free_reads(node, old, new)


def rename_free_reads(node: onnx.NodeProto, old: str, new: str) -> None:
    """Make ``node``'s subgraphs read outer value ``new`` where they read ``old`` (the rewrite of an
    implicit input: an ``If`` branch reads outer values by name)."""
    for _, sub in subgraphs(node):
        if old not in graph_defines(sub):
            _rename(sub, old, new)


def _all_names(graph: onnx.GraphProto) -> set[str]:
    names = set(graph_defines(graph)) | {o.name for o in graph.output}
    for _, _, sub in walk(graph):
        names |= graph_defines(sub) | {o.name for o in sub.output}
    return names


def _unique_names(model: onnx.ModelProto) -> int:
    """Give every value defined in a subgraph and every inner node a model-wide unique name (a
    subgraph may reuse a name its sibling or the outer graph defines); unnamed inner nodes get
    ``<owner>/<attribute>/<op>_<k>``. Edits ``model``; returns how many names changed."""
    taken = _all_names(model.graph)
    seen = set(graph_defines(model.graph))
    changed = 0

    def fresh(name: str) -> str:
        """``name__k``, the first one no graph uses."""
        k = 1
        while f"{name}__{k}" in taken:
            k += 1
        taken.add(f"{name}__{k}")
        return f"{name}__{k}"

    def values(graph: onnx.GraphProto) -> None:
        """Rename the values the subgraphs of ``graph`` define that another scope defines too."""
        nonlocal changed
        for node in graph.node:
            for _, sub in subgraphs(node):
                defined = [*(i.name for i in sub.input), *(i.name for i in sub.initializer),
                           *(o for n in sub.node for o in n.output if o)]
                for name in dict.fromkeys(defined):
                    if name in seen:
                        new = fresh(name)
                        _rename(sub, name, new)
                        seen.add(new)
                        changed += 1
                    else:
                        seen.add(name)
                values(sub)

    values(model.graph)
    used = {n.name for n in model.graph.node if n.name}

    def nodes(owner: onnx.NodeProto, label: str) -> None:
        """Name the nodes inside ``owner`` (called ``label``), then those inside them."""
        nonlocal changed
        for attr, sub in subgraphs(owner):
            for k, node in enumerate(sub.node):
                if not node.name or node.name in used:
                    node.name = unique_name(f"{label}/{attr}/{node.name or f'{node.op_type}_{k}'}", used)
                    changed += 1
                used.add(node.name)
                nodes(node, node.name)

    for i, owner in enumerate(model.graph.node):
        nodes(owner, node_name(owner, i))
    return changed


# ---------------------------------------------------------------- constant conditions


_NOT_EVALUATED = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial",
                  "Bernoulli"}


def _static_shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    """Fully static shapes of the main graph's values (ONNX shape inference)."""
    try:
        g = infer_shapes(model).graph
    except Exception:  # noqa: BLE001 - best effort
        g = model.graph
    out = {}
    for v in [*g.input, *g.value_info, *g.output]:
        tt = v.type.tensor_type
        if tt.HasField("shape") and all(d.HasField("dim_value") for d in tt.shape.dim):
            out[v.name] = [d.dim_value for d in tt.shape.dim]
    return out


def _evaluate(node: onnx.NodeProto, inputs: Sequence[np.ndarray], model: onnx.ModelProto) -> list | None:
    """The outputs of one node on constant inputs (``onnx.reference``), or None if it cannot."""
    from onnx.reference import ReferenceEvaluator

    names = [x for x in node.input if x]
    inits = [numpy_helper.from_array(np.asarray(v), n) for n, v in zip(names, inputs)]
    g = helper.make_graph([node], "cond", [], [onnx.ValueInfoProto(name=o) for o in node.output if o],
                          list({t.name: t for t in inits}.values()))
    m = helper.make_model(g, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    try:
        return [np.asarray(v) for v in ReferenceEvaluator(m).run(None, {})]
    except Exception:  # noqa: BLE001 - an op the reference runtime lacks: not static
        return None


def _numel(t: onnx.TensorProto) -> int:
    return int(np.prod(t.dims)) if t.dims else 1


def static_conditions(model: onnx.ModelProto) -> dict[int, bool]:
    """``{index of an If node in the main graph: its condition}`` for each ``If`` whose condition
    follows from constants and static shapes alone (``Shape``/``Size`` of a value whose shape shape
    inference fixes)."""
    g = model.graph
    ifs = [i for i, n in enumerate(g.node) if n.op_type == "If" and n.input and n.input[0]]
    if not ifs:
        return {}
    known: dict[str, np.ndarray | None] = {}
    inits = {i.name: i for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output if o}
    shapes = _static_shapes(model)

    def value(name: str, depth: int = 0) -> np.ndarray | None:
        """The constant value of ``name``, or None."""
        if name in known:
            return known[name]
        node = producer.get(name)
        result = None
        if name in inits:
            result = numpy_helper.to_array(inits[name]) if _numel(inits[name]) <= 1 << 16 else None
        elif node is None or depth > 200:
            pass
        elif node.op_type in ("Shape", "Size") and node.input[0] in shapes:
            dims = shapes[node.input[0]]
            if node.op_type == "Size":
                result = np.array(int(np.prod(dims)), np.int64)
            else:
                attrs = {a.name: a.i for a in node.attribute}
                result = np.array(dims[attrs.get("start", 0):attrs.get("end")], np.int64)
        elif (not subgraphs(node) and node.domain in ("", "ai.onnx") and node.op_type not in _NOT_EVALUATED
              and node.op_type not in ("Shape", "Size")):
            inputs = [value(x, depth + 1) for x in node.input if x]
            if all(v is not None and v.size <= 1 << 16 for v in inputs):
                outs = _evaluate(node, inputs, model)
                if outs is not None:
                    for o, v in zip([o for o in node.output if o], outs):
                        known[o] = v
                    return known.get(name)
        known[name] = result
        return result

    out = {}
    for i in ifs:
        v = value(g.node[i].input[0])
        if v is not None and v.size == 1:
            out[i] = bool(v.reshape(-1)[0])
    return out


def _inline_constant_ifs(model: onnx.ModelProto) -> list[str]:
    """Replace, in place, each main-graph ``If`` whose condition is static (:func:`static_conditions`)
    by the nodes of the branch it takes, an ``Identity`` per output; repeated while the inlined
    branches hold more. Returns one sentence per ``If`` inlined."""
    notes = []
    for _ in range(100):
        conds = static_conditions(model)
        if not conds:
            break
        g = model.graph
        nodes = []
        for i, node in enumerate(g.node):
            if i not in conds:
                nodes.append(node)
                continue
            attr = "then_branch" if conds[i] else "else_branch"
            branch = onnx.GraphProto()
            branch.CopyFrom(next(sub for a, sub in subgraphs(node) if a == attr))
            nodes += list(branch.node)
            g.initializer.extend(branch.initializer)
            g.value_info.extend(branch.value_info)
            label = node_name(node, i)
            for k, (src, dst) in enumerate(zip([o.name for o in branch.output], node.output)):
                if dst:
                    nodes.append(helper.make_node("Identity", [src], [dst], name=f"{label}/{attr}/output{k}"))
            notes.append(f"If {label!r}: its condition is {conds[i]} whatever the input (constants and static "
                         f"shapes), so its {attr.removesuffix('_branch')} branch is inlined")
        del g.node[:]
        g.node.extend(nodes)
    return notes


def normalize(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """The model with unique names inside its subgraphs and its constant-condition ``If`` nodes
    inlined (see the module docstring).

    Returns:
        ``(model', notes)``: ``model`` itself when it has no subgraph; one sentence per change.
    """
    if not has_control_flow(model):
        return model, []
    m = onnx.ModelProto()
    m.CopyFrom(model)
    renamed = _unique_names(m)
    notes = _inline_constant_ifs(m)
    if renamed:
        notes.insert(0, f"{renamed} value(s) or node(s) inside If/Loop/Scan subgraphs renamed to be unique in the "
                        f"model")
    return m, notes


# ---------------------------------------------------------------- types and constants inside subgraphs


def inner_types(model: onnx.ModelProto) -> dict[str, int]:
    """ONNX element type of every value inside the model's subgraphs (shape inference, declared
    inputs and outputs, initializers and ``Constant`` values); ``{}`` without subgraphs."""
    if not has_control_flow(model):
        return {}
    try:
        inferred = infer_shapes(model)
    except Exception:  # noqa: BLE001 - declared types only
        inferred = model
    out: dict[str, int] = {}
    for _, _, sub in walk(inferred.graph):
        for v in [*sub.input, *sub.value_info, *sub.output]:
            if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type:
                out[v.name] = v.type.tensor_type.elem_type
        out.update({i.name: i.data_type for i in sub.initializer})
        for node in sub.node:
            if node.op_type == "Constant":
                for a in node.attribute:
                    if a.name == "value":
                        out[node.output[0]] = a.t.data_type
                    elif a.name in ("value_float", "value_floats"):
                        out[node.output[0]] = TensorProto.FLOAT
    return out


def inner_constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Initializers and ``Constant`` values defined inside the model's subgraphs, by name."""
    out: dict[str, np.ndarray] = {}
    for _, _, sub in walk(model.graph):
        out.update({i.name: numpy_helper.to_array(i) for i in sub.initializer})
        for node in sub.node:
            if node.op_type != "Constant" or not node.output:
                continue
            for a in node.attribute:
                if a.name == "value":
                    out[node.output[0]] = numpy_helper.to_array(a.t)
                elif a.name == "value_float":
                    out[node.output[0]] = np.array(a.f, np.float32)
                elif a.name == "value_floats":
                    out[node.output[0]] = np.array(a.floats, np.float32)
    return out


# ---------------------------------------------------------------- measuring inside subgraphs


def inner_ranges(model: onnx.ModelProto, runs: Sequence[Mapping[str, np.ndarray]], *,
                 memory_budget: int = 1 << 30) -> list[dict[str, RangeStats]]:
    """Range statistics of the values inside the model's subgraphs, per run (see the module
    docstring): a value of a branch not taken, or of a loop that ran no iteration, is absent.

    Args:
        model: the FP32 model (its subgraphs' names unique: :func:`normalize`).
        runs: one feed per run, as for :func:`~fp16guard.onnx_ranges.value_ranges`.
        memory_budget: bytes of one subgraph's intermediate values exposed at once.
    """
    control = [n for n in model.graph.node if subgraphs(n)]
    if not control:
        return [{} for _ in runs]
    consts = {i.name: i for i in model.graph.initializer}
    inputs = {i.name for i in model.graph.input}
    needed = [x for x in dict.fromkeys(x for n in control for x in node_reads(n))
              if x not in consts and x not in inputs]
    try:
        g = infer_shapes(model).graph
    except Exception:  # noqa: BLE001 - untyped outputs still run
        g = model.graph
    infos = {v.name: v for v in [*g.input, *g.value_info, *g.output]}
    session = cpu_session(exposing(model, needed, infos)) if needed else None
    replay = Replay(model, memory_budget)
    out = []
    for feed in runs:
        env = dict(feed)
        if session is not None:
            env.update(zip(needed, session.run(None, dict(feed))))
        replay.stats = {}
        for node in control:
            try:
                replay.node(node, env, consts)
            except Exception as e:  # noqa: BLE001 - a replay failure leaves the node unmeasured, not the model
                logger.warning("%s %r: its subgraph could not be replayed (%s: %s); its values are not measured",
                               node.op_type, node.name, type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        out.append({name: RangeStats.merge(items) for name, items in replay.stats.items()})
    return out


def unmeasured(model: onnx.ModelProto, runs: Sequence[Mapping[str, object]]) -> list[tuple[onnx.NodeProto, str]]:
    """Subgraphs that computed float values on none of ``runs`` (value name -> statistics, as
    :func:`inner_ranges` gives them): ``(owner node, attribute)``, outermost first; a subgraph inside
    one that never ran is not listed again."""
    seen = set().union(*(set(r) for r in runs)) if runs else set()
    types = inner_types(model)
    out: list[tuple[onnx.NodeProto, str]] = []

    def visit(graph: onnx.GraphProto, quiet: bool, constant: set[str]) -> None:
        """Check the subgraphs of ``graph``'s nodes; ``quiet`` inside one already listed;
        ``constant``: values of the scopes around computed from constants alone."""
        for node in graph.node:
            for attr, sub in subgraphs(node):
                local = constant | {i.name for i in sub.initializer}
                floats = []
                for n in sub.node:
                    if n.op_type == "Constant" or n.input and all(not x or x in local for x in node_reads(n)):
                        local.update(n.output)  # computed from constants alone: never measured
                        continue
                    floats += [o for o in n.output if o and types.get(o) in FLOAT_TYPES]
                ran = not floats or any(o in seen for o in floats)
                if not ran and not quiet:
                    out.append((node, attr))
                visit(sub, quiet or not ran, local)

    constant = constant_names(model)
    for n in model.graph.node:
        if n.op_type == "Constant" or n.input and all(not x or x in constant for x in node_reads(n)):
            constant.update(n.output)
    visit(model.graph, False, constant)
    return out


def inner_islands(model: onnx.ModelProto, amax: Mapping[str, float]) -> list[dict]:
    """The FP32 islands inside the model's subgraphs, as plan ``unfixable`` entries
    (``{tensor, nodes, amax, reason}``).

    Values inside ``If``/``Loop``/``Scan`` subgraphs are never scaled (the solver sees the control
    flow node as a barrier), so every inner value beyond 65504 in calibration (``amax``, merged over
    branches taken and iterations) is kept in FP32: the inner node that writes it and the inner
    nodes that read it; and an inner node that reads an outer value beyond 65504 runs in FP32 too.
    """
    from fp16guard.fp16 import FP16_MAX

    readers: dict[str, list[onnx.NodeProto]] = {}
    producer: dict[str, tuple[onnx.NodeProto, onnx.NodeProto, str]] = {}
    where: dict[str, tuple[onnx.NodeProto, str]] = {}
    for node, owner, attr in inner_nodes(model.graph):
        where[node.name] = (owner, attr)
        for x in node_reads(node):
            readers.setdefault(x, []).append(node)
        for o in node.output:
            if o:
                producer[o] = (node, owner, attr)
    out = []
    for t, users in readers.items():  # outer values beyond FP16 read inside
        a = amax.get(t, 0.0)
        if t not in producer and a > FP16_MAX:
            owner, attr = where[users[0].name]
            out.append({"tensor": t, "nodes": list(dict.fromkeys(n.name for n in users)), "amax": a,
                        "reason": f"read inside {branch_label(owner, attr)} with amax {a:.4g}, beyond FP16: the "
                                  f"nodes that read it there run in FP32"})
    for t, (node, owner, attr) in producer.items():
        a = amax.get(t, 0.0)
        if a > FP16_MAX:
            nodes = [node.name, *(n.name for n in readers.get(t, []))]
            out.append({"tensor": t, "nodes": list(dict.fromkeys(nodes)), "amax": a,
                        "reason": f"reaches {a:.4g} inside {branch_label(owner, attr)}, beyond FP16; values inside "
                                  f"control flow are not scaled, so the nodes that write and read it run in FP32 "
                                  f"(an island inside the subgraph)"})
    return out
