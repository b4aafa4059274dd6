"""The replay behind :func:`fp16guard.control_flow.inner_ranges`: an ``If``/``Loop``/``Scan`` node run
in Python, one ONNX Runtime run of its subgraph at a time (:class:`Replay`): the branch the condition
picks, every iteration of a loop body, every step of a scan, each subgraph as a model of its own whose
inputs are its formal inputs and the outer values it reads, every inner value exposed as an output
(:func:`exposing`) and reduced to range statistics. Inner control flow is replayed the same way,
recursively."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fp16guard.onnx_graph import cpu_session, free_reads, infer_shapes, node_reads, plan_chunks, subgraphs
from fp16guard.stats import RangeStats

logger = logging.getLogger("fp16guard")

#: Iterations a replayed ``Loop`` may run at most (ONNX Runtime already ran the same loop to its end).
MAX_ITERATIONS = 1 << 20


def _value_info(name: str, value) -> onnx.ValueInfoProto:
    """A graph input typed like ``value`` (an array, or a list of arrays for a sequence), shape left free."""
    if isinstance(value, list):
        elem = helper.np_dtype_to_tensor_dtype(np.asarray(value[0]).dtype) if value else TensorProto.FLOAT
        return helper.make_tensor_sequence_value_info(name, elem, None)
    return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(np.asarray(value).dtype), None)


def _signature(value) -> tuple:
    """What a compiled subgraph depends on in a fed value: tensor or sequence, and its dtype."""
    if isinstance(value, list):
        return ("seq", np.asarray(value[0]).dtype.str if value else "")
    return ("tensor", np.asarray(value).dtype.str)


def exposing(model: onnx.ModelProto, names: Sequence[str],
              infos: Mapping[str, onnx.ValueInfoProto]) -> onnx.ModelProto:
    """A copy of ``model`` whose graph outputs are ``names`` (typed where shape inference typed them)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.output[:]
    for n in names:
        vi = onnx.ValueInfoProto()
        if n in infos:
            vi.CopyFrom(infos[n])
            if vi.type.HasField("tensor_type"):
                vi.type.tensor_type.ClearField("shape")
        vi.name = n
        m.graph.output.append(vi)
    return m


def _stats(v: np.ndarray) -> RangeStats:
    """The range statistics of one array (:func:`fp16guard.stats.tensor_stats`)."""
    import torch

    from fp16guard.stats import tensor_stats

    v = np.ascontiguousarray(v)
    t = torch.from_numpy(v if v.flags.writeable else v.copy())
    return RangeStats.from_row(tensor_stats(t).tolist(), t.numel())


class _Compiled:
    """A subgraph made a model of its own, and the ONNX Runtime sessions that expose its values."""

    def __init__(self, model: onnx.ModelProto, feed: Mapping, budget: int):
        from fp16guard.onnx_graph import activation_values, value_bytes

        try:
            inferred = infer_shapes(model)
        except Exception:  # noqa: BLE001 - untyped outputs still run
            inferred = model
        g = inferred.graph
        infos = {v.name: v for v in [*g.input, *g.value_info, *g.output]}
        types = {n: v.type.tensor_type.elem_type for n, v in infos.items() if v.type.HasField("tensor_type")}
        types.update({i.name: i.data_type for i in model.graph.initializer})
        inputs = {i.name for i in model.graph.input}
        measured, _ = activation_values(model, types, {i.name for i in model.graph.initializer})
        self.measured = [v for v in measured if v not in inputs]
        local = {o for n in model.graph.node for o in n.output if o}
        self.control = [n for n in model.graph.node if subgraphs(n)]
        self.outputs = [o.name for o in model.graph.output]
        raw = list(dict.fromkeys([*(o for o in self.outputs if o in local),
                                  *(x for n in self.control for x in node_reads(n) if x in local)]))
        sized = onnx.ModelProto()
        sized.CopyFrom(model)
        for i in sized.graph.input:  # declared shapes, for the chunk sizes only
            v = feed.get(i.name)
            if isinstance(v, np.ndarray) and i.type.HasField("tensor_type"):
                i.type.tensor_type.shape.CopyFrom(helper.make_tensor_type_proto(0, list(v.shape)).tensor_type.shape)
        chunks = plan_chunks(self.measured, value_bytes(sized, {}), budget) if self.measured else []
        chunks = chunks or [[]]
        chunks[0] = list(dict.fromkeys([*raw, *chunks[0]]))
        self.chunks = chunks
        self.raw = set(raw)
        self.sessions = [cpu_session(exposing(model, c, infos)) for c in chunks]


class Replay:
    """Replays control flow nodes in Python, one ONNX Runtime run of a subgraph at a time, and
    collects the range statistics of every value inside (see the module docstring)."""

    def __init__(self, model: onnx.ModelProto, budget: int):
        self.model = model
        self.budget = budget
        self.compiled: dict[tuple, tuple[onnx.GraphProto, _Compiled]] = {}
        self.stats: dict[str, list[RangeStats]] = {}
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)

    @staticmethod
    def _get(name: str, env: Mapping, consts: Mapping[str, onnx.TensorProto]):
        if name in env:
            return env[name]
        return numpy_helper.to_array(consts[name])

    def node(self, node: onnx.NodeProto, env: Mapping, consts: Mapping[str, onnx.TensorProto]) -> None:
        """Replay one control flow node whose reads ``env`` (values) or ``consts`` (initializers) hold."""
        graphs = dict(subgraphs(node))
        if node.op_type == "If":
            cond = np.asarray(self._get(node.input[0], env, consts))
            self.graph(graphs["then_branch" if bool(cond.reshape(-1)[0]) else "else_branch"], [], env, consts)
        elif node.op_type == "Loop":
            self._loop(node, graphs["body"], env, consts)
        elif node.op_type == "Scan" and self.opset >= 9:
            self._scan(node, graphs["body"], env, consts)
        else:
            logger.info("%s %r: fp16guard does not replay its subgraph; its values are not measured",
                        node.op_type, node.name)

    def _loop(self, node, body, env, consts) -> None:
        """ONNX ``Loop``: ``for i in range(M) while cond``, the carried values fed back."""
        ins = list(node.input) + [""] * (2 - len(node.input))
        trips = int(np.asarray(self._get(ins[0], env, consts)).reshape(-1)[0]) if ins[0] else None
        has_cond = bool(ins[1])
        cond = bool(np.asarray(self._get(ins[1], env, consts)).reshape(-1)[0]) if has_cond else True
        carried = [self._get(x, env, consts) for x in ins[2:]]
        formal = [i.name for i in body.input]
        i = 0
        while (trips is None or i < trips) and cond and i < MAX_ITERATIONS:
            values = [np.array(i, np.int64), np.array(cond, np.bool_), *carried]
            outs = self.graph(body, list(zip(formal, values)), env, consts)
            if has_cond:
                cond = bool(np.asarray(outs[0]).reshape(-1)[0])
            carried = outs[1:1 + len(carried)]
            i += 1

    def _scan(self, node, body, env, consts) -> None:
        """ONNX ``Scan`` (opset 9 and later): states fed back, scan inputs sliced along their axes."""
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        m = int(attrs["num_scan_inputs"])
        states = [self._get(x, env, consts) for x in node.input[:len(node.input) - m]]
        scans = [np.asarray(self._get(x, env, consts)) for x in node.input[len(node.input) - m:]]
        axes = list(attrs.get("scan_input_axes", [0] * m))
        reverse = list(attrs.get("scan_input_directions", [0] * m))
        axes = [a % s.ndim for a, s in zip(axes, scans)]
        steps = scans[0].shape[axes[0]] if scans else 0
        formal = [i.name for i in body.input]
        for t in range(steps):
            slices = [np.take(s, steps - 1 - t if r else t, axis=a) for s, a, r in zip(scans, axes, reverse)]
            outs = self.graph(body, list(zip(formal, [*states, *slices])), env, consts)
            states = outs[:len(states)]

    def graph(self, g: onnx.GraphProto, formals: list[tuple[str, object]], env: Mapping,
              consts: Mapping[str, onnx.TensorProto]) -> list:
        """Run subgraph ``g`` once: its formal inputs ``formals``, the outer values it reads from
        ``env``/``consts``. Records its values' statistics, replays its own control flow, and
        returns its outputs."""
        values = dict(formals)
        inits = []
        for x in free_reads(g):
            if x in values:
                continue
            if x in env:
                values[x] = env[x]
            elif x in consts:
                inits.append(consts[x])
            else:
                raise KeyError(x)
        key = (id(g), tuple((n, _signature(v)) for n, v in values.items()), tuple(t.name for t in inits))
        held, compiled = self.compiled.get(key, (None, None))
        if held is not g:  # the graph is held with its entry, so its id names it
            standalone = helper.make_graph(list(g.node), g.name or "subgraph",
                                           [_value_info(n, v) for n, v in values.items()], list(g.output),
                                           [*g.initializer, *inits], value_info=list(g.value_info))
            model = helper.make_model(standalone, opset_imports=list(self.model.opset_import),
                                      ir_version=self.model.ir_version, functions=list(self.model.functions))
            compiled = _Compiled(model, values, self.budget)
            self.compiled[key] = (g, compiled)
        for name, v in formals:  # a loop's carried values as each iteration reads them
            if isinstance(v, np.ndarray) and v.dtype.kind == "f":
                self.stats.setdefault(name, []).append(_stats(v))
        raw: dict[str, object] = {}
        for chunk, session in zip(compiled.chunks, compiled.sessions):
            for name, v in zip(chunk, session.run(None, values)):
                if name in compiled.raw:
                    raw[name] = v
                if name in compiled.measured and isinstance(v, np.ndarray):
                    self.stats.setdefault(name, []).append(_stats(v))
        if compiled.control:
            inner_env = {**env, **values, **raw}
            inner_consts = {**consts, **{i.name: i for i in g.initializer}}
            for node in compiled.control:
                self.node(node, inner_env, inner_consts)
        return [raw[o] if o in raw else values[o] if o in values else
                numpy_helper.to_array(next(t for t in [*g.initializer, *inits] if t.name == o))
                for o in compiled.outputs]
