"""The law table (issue 24 item 1): one row per op, both frontends decide roles by it, and they agree.

Each row is built both ways where it can be: a tiny torch module captured with ``torch.export``
(the ATen pass's role) and exported to ONNX (the ONNX pass's role). Where the exporter writes
another op than the row's own (``square`` as ``Pow``, ``addmm`` as ``Gemm``) the case says which;
where it does not write the row's ONNX op at all (``RMSNormalization`` at opset 20), the ONNX side
is a hand-built node. A row one frontend cannot express says so in the table (``Law.skip``), and
the test checks that every other row has a case. The docs' tables are the table's
(:func:`fp16guard.fixing.laws.markdown`).
"""

import re
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from fp16guard.fixing import fix_model, laws, onnx_masks, onnx_pass, torch_edit, torch_masks, torch_pass
from fp16guard.fixing.laws import ATEN, LAWS, ONNX
from fp16guard.fixing.solver_model import Role
from fp16guard.fixing.targets import prepare_onnx
from fp16guard.torch_graph import capture
from fp16guard.torch_onnx import export_onnx

REPO = Path(__file__).resolve().parents[1]
ROWS = {law.name: law for law in LAWS}


class Fn(nn.Module):
    """``f(self, x)`` as a module, with constant buffers ``c`` (like x), ``w`` [4, 5], ``b`` [5], ``idx`` and ``mask``."""

    def __init__(self, f, shape=(1, 3, 4, 4)):
        super().__init__()
        self.f = f
        g = torch.Generator().manual_seed(0)
        self.register_buffer("c", torch.rand(shape, generator=g) + 0.5)
        self.register_buffer("w", torch.randn(4, 5, generator=g))
        self.register_buffer("b", torch.randn(5, generator=g))
        self.register_buffer("idx", torch.randint(0, 3, shape, generator=g))
        self.register_buffer("mask", torch.rand(shape, generator=g) > 0.5)

    def forward(self, x):
        return self.f(self, x)


def fn(f, shape=(1, 3, 4, 4)):
    return lambda: Fn(f, shape)


@dataclass
class Case:
    """One way of building a row's op.

    Attributes:
        row: the law's name; ``role``/``degree``: what both frontends must give.
        module: a factory of the torch module (None: ONNX only).
        shape: the input's shape.
        onnx_op: the ONNX op the exporter writes for it, when not one of the row's.
        built: a hand-built ONNX model ``(op type, model)`` instead of the export (the exporter does
            not write the row's op); None: export the module.
        decomposed: for a row ONNX cannot express, the ONNX ops and roles its export decomposes into.
        dynamic: captured with a dynamic batch (shape reads are then ops; batch 1 would be specialized).
    """

    row: str
    role: Role
    module: Callable[[], nn.Module] | None = None
    degree: Fraction = Fraction(1)
    shape: tuple = (1, 3, 4, 4)
    onnx_op: str | None = None
    built: Callable[[], tuple[str, onnx.ModelProto]] | None = None
    decomposed: dict = field(default_factory=dict)
    label: str = ""
    dynamic: bool = False

    @property
    def id(self) -> str:
        return f"{self.row}-{self.label}" if self.label else self.row


def node_model(op: str, inputs: list, attrs: dict | None = None, shape=(1, 3, 4, 4), opset: int = 18,
               out_type=TensorProto.FLOAT, n_out: int = 1):
    """A one-node ONNX model: ``"x"`` is the float graph input, an array a constant, ``""`` an omitted input."""
    def build():
        inits, names = [], []
        for k, a in enumerate(inputs):
            if isinstance(a, str):
                names.append(a)
            else:
                inits.append(numpy_helper.from_array(np.asarray(a), f"c{k}"))
                names.append(f"c{k}")
        outs = [f"y{k}" for k in range(n_out)]
        node = helper.make_node(op, names, outs, name="op", **(attrs or {}))
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                                  [helper.make_tensor_value_info(outs[0], out_type, None)], inits)
        return op, helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return build


f32 = np.float32
CASES = [
    # linear
    Case("conv", Role.LINEAR, lambda: nn.Conv2d(3, 4, 3)),
    Case("conv_transpose", Role.LINEAR, lambda: nn.ConvTranspose2d(3, 4, 3)),
    Case("linear", Role.LINEAR, lambda: nn.Linear(4, 5), shape=(2, 4)),
    Case("addmm", Role.LINEAR, fn(lambda s, x: torch.addmm(s.b, x, s.w), (2, 4)), shape=(2, 4), onnx_op="Gemm"),
    Case("matmul", Role.LINEAR, fn(lambda s, x: x @ s.w), label="by-a-constant"),
    Case("matmul", Role.PRODUCT, fn(lambda s, x: x @ x.transpose(-1, -2)), label="of-two-activations"),
    Case("mul", Role.LINEAR, fn(lambda s, x: x * 3.0), label="by-a-constant"),
    Case("mul", Role.LINEAR, fn(lambda s, x: x * s.c), label="by-a-constant-tensor"),
    Case("mul", Role.PRODUCT, fn(lambda s, x: x * x), label="of-two-activations"),
    Case("div", Role.LINEAR, fn(lambda s, x: x / s.c), label="by-a-constant"),
    Case("div", Role.QUOTIENT, fn(lambda s, x: x / (x.abs() + 1)), label="of-two-activations"),
    Case("div", Role.POWER, fn(lambda s, x: s.c / x), degree=Fraction(-1), label="constant-by-activation"),
    Case("layer_norm", Role.LINEAR, lambda: nn.LayerNorm(4)),
    Case("layer_norm", Role.LINEAR, lambda: nn.LayerNorm(4, elementwise_affine=False), label="no-affine"),
    Case("group_norm", Role.LINEAR, lambda: nn.GroupNorm(1, 3),
         built=node_model("GroupNormalization", ["x", np.ones(3, f32), np.zeros(3, f32)], {"num_groups": 3}, opset=21)),
    Case("instance_norm", Role.LINEAR, lambda: nn.InstanceNorm2d(3, affine=True)),
    Case("instance_norm", Role.LINEAR, lambda: nn.InstanceNorm2d(3), label="no-affine"),
    Case("rms_norm", Role.LINEAR, lambda: nn.RMSNorm(4),
         built=node_model("RMSNormalization", ["x", np.ones(4, f32)], opset=23)),
    # tied
    Case("relu", Role.TIED, fn(lambda s, x: torch.relu(x))),
    Case("leaky_relu", Role.TIED, fn(lambda s, x: F.leaky_relu(x, 0.1))),
    Case("prelu", Role.TIED, lambda: nn.PReLU()),
    Case("clip", Role.TIED, fn(lambda s, x: x.clamp(-1.0, 2.0))),
    Case("clip", Role.TIED, fn(lambda s, x: F.relu6(x)), label="relu6"),
    Case("clip", Role.TIED, fn(lambda s, x: F.hardtanh(x)), label="hardtanh"),
    Case("max_pool", Role.TIED, fn(lambda s, x: F.max_pool2d(x, 2))),
    Case("avg_pool", Role.TIED, fn(lambda s, x: F.avg_pool2d(x, 2))),
    Case("avg_pool", Role.TIED, fn(lambda s, x: F.adaptive_avg_pool2d(x, 1)), onnx_op="ReduceMean", label="adaptive"),
    Case("avg_pool", Role.TIED, built=node_model("GlobalAveragePool", ["x"]), label="global"),
    Case("resize", Role.TIED, fn(lambda s, x: F.interpolate(x, scale_factor=2.0, mode="nearest"))),
    Case("resize", Role.TIED, fn(lambda s, x: F.interpolate(x, scale_factor=2.0, mode="bilinear")), label="bilinear"),
    Case("concat", Role.TIED, fn(lambda s, x: torch.cat([x, s.c], 1))),
    Case("add", Role.TIED, fn(lambda s, x: x + 1.5), label="a-constant"),
    Case("add", Role.TIED, fn(lambda s, x: x + x.abs()), label="two-activations"),
    Case("add", Role.TIED, fn(lambda s, x: s.c - x), label="constant-minus-activation"),
    Case("add", Role.TIED, fn(lambda s, x: 1.0 - x), label="rsub"),
    Case("max_min", Role.TIED, fn(lambda s, x: torch.maximum(x, s.c))),
    Case("sum_mean", Role.TIED, built=node_model("Sum", ["x", "x"])),
    Case("neg_abs", Role.TIED, fn(lambda s, x: -x)),
    Case("identity", Role.TIED, fn(lambda s, x: x.clone()), built=node_model("Identity", ["x"])),
    Case("reshape", Role.TIED, fn(lambda s, x: x.reshape(1, -1))),
    Case("transpose", Role.TIED, fn(lambda s, x: x.permute(0, 2, 3, 1))),
    Case("squeeze", Role.TIED, fn(lambda s, x: x.unsqueeze(0))),
    Case("slice", Role.TIED, fn(lambda s, x: x[:, 1:])),
    Case("pad", Role.TIED, fn(lambda s, x: F.pad(x, (1, 1, 1, 1), mode="reflect"))),
    Case("pad", Role.TIED, fn(lambda s, x: F.pad(x, (1, 1), value=0.5)), label="constant"),
    Case("constant_pad_nd", Role.TIED, fn(lambda s, x: torch.constant_pad_nd(x, (1, 1), 0.5)), onnx_op="Pad"),
    Case("expand_tile", Role.TIED, fn(lambda s, x: x[:, :1].expand(1, 3, 4, 4))),
    Case("expand_tile", Role.TIED, fn(lambda s, x: x.repeat(1, 2, 1, 1)), onnx_op="Tile", label="repeat"),
    Case("depth_space", Role.TIED, fn(lambda s, x: F.pixel_shuffle(x, 2), (1, 4, 2, 2)), shape=(1, 4, 2, 2)),
    Case("gather", Role.TIED, fn(lambda s, x: torch.gather(x, 1, s.idx))),
    Case("gather", Role.TIED, fn(lambda s, x: x.index_select(1, s.idx[0, 0, 0, :2])), label="index_select"),
    Case("embedding", Role.TIED, lambda: nn.Sequential(IntIndex(), nn.Embedding(10, 4)), onnx_op="Gather"),
    Case("reduce_max", Role.TIED, fn(lambda s, x: x.amax(-1))),
    Case("reduce_min", Role.TIED, fn(lambda s, x: x.amin(-1))),
    Case("reduce_mean_sum", Role.TIED, fn(lambda s, x: x.mean(-1))),
    Case("vector_norm", Role.TIED, fn(lambda s, x: torch.linalg.vector_norm(x, dim=1))),
    Case("where", Role.TIED, fn(lambda s, x: torch.where(s.mask, x, 0.5))),
    Case("cast", Role.TIED, fn(lambda s, x: x.double()), label="to-float"),
    Case("cast", Role.BARRIER, fn(lambda s, x: x.long()), label="to-integer"),
    Case("type_as", Role.TIED, fn(lambda s, x: x.type_as(s.c)), onnx_op="Identity"),
    Case("max_unpool", Role.TIED, lambda: Unpool(),
         built=node_model("MaxUnpool", ["x", np.zeros((1, 3, 4, 4), np.int64)], {"kernel_shape": [2, 2]})),
    Case("getitem", Role.TIED, fn(lambda s, x: x.max(-1)[0])),
    Case("attention", Role.TIED, fn(lambda s, x: F.scaled_dot_product_attention(x, x, x))),
    # powers
    Case("sqrt", Role.POWER, fn(lambda s, x: torch.sqrt(x.abs() + 1)), degree=Fraction(1, 2)),
    Case("reciprocal", Role.POWER, fn(lambda s, x: torch.reciprocal(x)), degree=Fraction(-1)),
    Case("rsqrt", Role.POWER, fn(lambda s, x: torch.rsqrt(x.abs() + 1)), degree=Fraction(-1, 2)),
    Case("square", Role.POWER, fn(lambda s, x: torch.square(x)), degree=Fraction(2), onnx_op="Pow"),
    Case("pow", Role.POWER, fn(lambda s, x: x ** 3), degree=Fraction(3)),
    Case("pow", Role.POWER, fn(lambda s, x: x.abs() ** 1.5), degree=Fraction(3, 2), label="fraction"),
    Case("reduce_sum_square", Role.POWER, degree=Fraction(2), built=node_model("ReduceSumSquare", ["x"])),
    # bounded, log
    Case("hardsigmoid", Role.BOUNDED, fn(lambda s, x: F.hardsigmoid(x))),
    Case("lp_normalization", Role.BOUNDED, built=node_model("LpNormalization", ["x"])),
    Case("log", Role.LOG, fn(lambda s, x: torch.log(x.abs() + 1))),
    # saturating, gated
    Case("sigmoid", Role.SATURATING, fn(lambda s, x: torch.sigmoid(x))),
    Case("tanh", Role.SATURATING, fn(lambda s, x: torch.tanh(x))),
    Case("erf", Role.SATURATING, fn(lambda s, x: torch.erf(x))),
    Case("silu", Role.GATED, fn(lambda s, x: F.silu(x)), decomposed={"Sigmoid": Role.SATURATING, "Mul": Role.PRODUCT}),
    Case("gelu", Role.GATED, fn(lambda s, x: F.gelu(x))),
    Case("gelu", Role.GATED, fn(lambda s, x: F.gelu(x, approximate="tanh")), label="tanh"),
    Case("hardswish", Role.GATED, fn(lambda s, x: F.hardswish(x))),
    Case("mish", Role.GATED, fn(lambda s, x: F.mish(x))),
    # scale-blind, barriers
    Case("shape", Role.BARRIER, fn(lambda s, x: x.view(x.shape[0], -1)), dynamic=True, shape=(2, 3, 4, 4),
         built=node_model("Shape", ["x"], out_type=TensorProto.INT64)),
    Case("softmax", Role.BARRIER, fn(lambda s, x: torch.softmax(x, -1))),
    Case("log_softmax", Role.BARRIER, fn(lambda s, x: F.log_softmax(x, -1))),
    Case("argmax", Role.BARRIER, fn(lambda s, x: x.argmax(-1))),
    Case("topk", Role.BARRIER, fn(lambda s, x: x.topk(2, -1)[0])),
    Case("exp", Role.BARRIER, fn(lambda s, x: torch.exp(x))),
    Case("softplus", Role.BARRIER, fn(lambda s, x: F.softplus(x))),
    Case("elu", Role.BARRIER, fn(lambda s, x: F.elu(x))),
]


class IntIndex(nn.Module):
    """Integer indices computed from the input (as an embedding reads them)."""

    def forward(self, x):
        return (x.abs() * 3).long().clamp(max=9)


class Unpool(nn.Module):
    def forward(self, x):
        return F.max_unpool2d(*F.max_pool2d(x, 2, return_indices=True), 2)


def _x(shape):
    return torch.from_numpy(np.random.default_rng(0).normal(size=shape).astype(np.float32))


def aten_role(case: Case) -> tuple[Role, Fraction]:
    """The ATen pass's role of the first node of the case's row."""
    x = _x(case.shape)
    gm = capture(case.module().eval(), [(x,), (torch.cat([x, x[:1]]),)] if case.dynamic else [(x,)])
    ops = {op.name: op for op in torch_pass.scale_ops(gm)}
    packets = {p for p, law in torch_edit.LAWS.items() if law.name == case.row}
    node = next(n for n in gm.graph.nodes if torch_edit.op_packet(n) in packets)
    return ops[node.name].role, ops[node.name].degree


def onnx_roles(case: Case) -> dict[str, tuple[Role, Fraction]]:
    """``{op type: (role, degree)}`` of the first node of each type in the ONNX graph of the case
    (exported and prepared as the fix prepares it, or hand-built)."""
    if case.built is not None:
        _, model = case.built()
    else:
        x = _x(case.shape)
        model, _ = prepare_onnx(export_onnx(case.module().eval(), (x,)))
    ops = {op.name: op for op in onnx_pass.scale_ops(model)}
    out = {}
    for node in model.graph.node:
        if node.name in ops and node.op_type not in out:
            out[node.op_type] = (ops[node.name].role, ops[node.name].degree)
    return out


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_both_frontends_give_the_row_its_role(case):
    law = ROWS[case.row]
    want = (case.role, case.degree)
    assert case.role in (law.role, *law.also, Role.BARRIER)  # a predicate gives only the roles the row documents
    if case.module is not None and ATEN not in law.skip:
        assert aten_role(case) == want, "ATen"
    if ONNX in law.skip and case.built is None and not case.onnx_op:
        if case.decomposed:  # the exporter writes the same law in several ops
            roles = onnx_roles(case)
            assert {op: roles[op][0] for op in case.decomposed} == case.decomposed
        return
    roles = onnx_roles(case)
    op = case.onnx_op or next(op for op in roles if op in law.onnx) if case.built is None else case.built()[0]
    assert roles[op] == want, f"ONNX {op}"


def test_every_row_is_built_by_a_case_or_says_why_a_frontend_cannot_express_it():
    covered = {c.row for c in CASES}
    assert set(ROWS) <= covered, sorted(set(ROWS) - covered)
    for law in LAWS:
        for frontend in (ONNX, ATEN):
            if not law.ops(frontend):
                assert law.skip.get(frontend), f"{law.name} has no {frontend} op and no reason"
        torch_cases = [c for c in CASES if c.row == law.name and c.module is not None]
        assert torch_cases or ATEN in law.skip, f"{law.name}: no torch module builds it"
        assert law.source and law.law, law.name


def test_each_op_has_one_row_and_every_aten_name_resolves():
    for frontend in (ONNX, ATEN):
        laws.by_op(frontend)  # raises on an op claimed by two rows
    assert len(torch_edit.LAWS) == len(laws.by_op(ATEN))  # every ATen name is a packet of this torch


@pytest.mark.parametrize("law", [law for law in LAWS if law.role in laws.SATURATING_ROLES], ids=lambda law: law.name)
def test_saturation_bounds_hold_in_fp16(law):
    """Beyond B a gate rounds to its limit in FP16 (the law the clamp relies on); x * gate(x) rounds to
    x above B (within half an ulp) and to 0 below -B. B is a power of two, so B 2^-k is exact."""
    assert law.bound == 2.0 ** round(np.log2(law.bound))
    fs = [getattr(torch.ops.aten, law.aten[0]).default] if law.aten else []
    if law.name == "gelu":
        fs.append(lambda t: F.gelu(t, approximate="tanh"))
    x = torch.cat([torch.linspace(law.bound, 64.0, 20001, dtype=torch.float64),
                   torch.logspace(1.9, 6, 2000, dtype=torch.float64)])
    for f in fs:
        hi, lo = f(x), f(-x)
        if law.role is Role.SATURATING:
            assert torch.equal(hi.half(), torch.ones_like(hi).half() * hi[0].half()) and hi[0].half() == 1
            assert torch.equal(lo.half(), lo[0].half().expand_as(lo)) and abs(float(lo[0].half())) in (0.0, 1.0)
        else:
            assert float(((hi - x).abs() / x).max()) < 2.0 ** -12  # f(x) = x to half an FP16 ulp
            assert float(lo.half().abs().max()) == 0.0


def _docs_table() -> tuple[str, str]:
    """The laws tables in docs/fix.md (between its ``laws-table`` markers) and their indent."""
    text = (REPO / "docs" / "fix.md").read_text()
    m = re.search(r"\n([ \t]*)<!-- laws-table: .*?-->\n(.*?)\n[ \t]*<!-- /laws-table -->", text, re.S)
    assert m, "docs/fix.md has no <!-- laws-table: ... --> ... <!-- /laws-table --> block"
    return m.group(2) + "\n", m.group(1)


def test_the_docs_op_table_is_the_law_table():
    """docs/fix.md holds the tables :func:`fp16guard.fixing.laws.markdown` writes."""
    table, indent = _docs_table()
    assert table == laws.markdown(indent), "regenerate docs/fix.md's tables with fp16guard.fixing.laws.markdown('   ')"


def test_the_mask_proofs_ops_are_the_rows_marked_for_it():
    """The attention-mask proof's sinks and moves (onnx_pass.saturate_masks, torch_masks) are rows
    with that mask behaviour."""
    onnx_rows, aten_rows = laws.by_op(ONNX), laws.by_op(ATEN)
    for ops, rows, kind in ((onnx_masks.MASK_SINKS, onnx_rows, "sink"), (onnx_masks.MASK_MOVES, onnx_rows, "move")):
        assert {op: rows[op].mask for op in ops} == {op: kind for op in ops}
    for packets, kind in ((torch_masks.SINKS, "sink"), (torch_masks.MOVES, "move")):
        names = {p.__name__.split(".")[-1] for p in packets}
        assert {n: aten_rows[n].mask for n in names} == {n: kind for n in names}


# ---------------------------------------------------------------- the same fix both ways


class Representative(nn.Module):
    """Branches from a 1x1 conv writing ~1e5 (beyond FP16), one per representative row: relu6 (a
    clip with implicit bounds), c / x (a power of -1), an instance norm without affine weights
    tied to a residual (it gets a weight), where with a constant branch, gather of a constant
    index, sigmoid (saturating) and GELU (gated); each brought back near 1 by a 1x1 conv."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 4, 1)
        self.norm = nn.InstanceNorm2d(4)
        self.heads = nn.ModuleList(nn.Conv2d(4, 1, 1) for _ in range(7))
        with torch.no_grad():
            self.conv.weight.mul_(3e4)
            for h in self.heads:
                h.weight.mul_(1e-4)
        g = torch.Generator().manual_seed(1)
        self.register_buffer("c", torch.rand(1, 4, 8, 8, generator=g) + 0.5)
        self.register_buffer("mask", torch.rand(1, 4, 8, 8, generator=g) > 0.3)
        self.register_buffer("idx", torch.randint(0, 4, (1, 4, 8, 8), generator=g))

    def forward(self, x):
        c = self.conv(x)
        branches = [F.relu6(c) * 1e4, self.c / (c.abs() + 1) * 1e9, self.norm(c) + c, torch.where(self.mask, c, 2.0),
                    torch.gather(c, 1, self.idx), torch.sigmoid(c) * 1e4, F.gelu(c)]
        return torch.cat([h(b) for h, b in zip(self.heads, branches)], 1)


def test_representative_rows_give_the_same_fixed_model_through_torch_and_onnx():
    rng = np.random.default_rng(2)
    xs = [(rng.normal(size=(1, 1, 8, 8)) * 10.0 ** rng.uniform(-3, 1, size=(1, 1, 8, 8))).astype(np.float32)
          for _ in range(2)]
    model = Representative().eval()
    with torch.no_grad():
        assert float(model.conv(torch.from_numpy(xs[0])).abs().max()) > 65504
    results = {out: fix_model(model, xs, output=out, keep_outputs=True) for out in ("torch", "onnx")}
    for result in results.values():
        assert result.conversion.fp32_nodes == [] and result.verification.finite
        for fixed, fallback in zip(result.verification.rows, result.fallback.rows):
            assert fixed.rel_l2 <= 1.5 * fallback.rel_l2 + 2.0 ** -10
    for a, b, ref in zip(results["torch"].outputs.fixed, results["onnx"].outputs.fixed, results["torch"].outputs.fp32):
        for branch in range(ref[0].shape[1]):  # each row's branch agrees within FP16 rounding
            ra, rb, rr = (np.asarray(t[0][:, branch], np.float64) for t in (a, b, ref))
            assert np.linalg.norm(ra - rb) <= 2.0 ** -9 * np.linalg.norm(rr), branch
