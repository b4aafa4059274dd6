"""bisect on models whose offender is known by construction, and on the bundled real examples."""

import io
import json
import math

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
from hypothesis import given
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from rich.console import Console

from fp16guard.backends.base import Engine
from fp16guard.backends.emulate import EmulateBackend
from fp16guard.bisection import DEFAULT_TOLERANCE, NOISE_CAP, NOISE_FACTOR, bisect, noise_tolerance, print_bisect
from fp16guard.bisection.search import CutSearch
from fp16guard.bisection.targets import OnnxSplitTarget
from fp16guard.bisection.torch_split import TorchSplitter
from fp16guard.compare import relative_l2
from fp16guard.errors import BisectError, InputError, SplitError
from fp16guard.inputs import NamedInput
from tests.models import Scale as Gain  # multiplies by a constant, as a module with a name


def _stack(*mods):
    return nn.Sequential(*mods).eval()


def _lin(n=8, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(n, n)


def _x(n=8, rows=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, n, generator=g)


class UpDown(nn.Module):
    """x * big * (1 / big): in range on both ends, out of FP16 range inside."""

    def __init__(self, big: float):
        super().__init__()
        self.big = big

    def forward(self, x):
        return (x * self.big) * (1 / self.big)


class TwoOffenders(nn.Module):
    """Two separate offenders, each with its outputs in range: ``first`` overflows inside its
    forward, ``second`` is a BatchNorm whose running variance (1e6) does not fit FP16. A ReLU sits
    between ``mid`` and the BatchNorm (as in CREPE): directly after a conv, the ONNX exporter's
    optimizer would fold the BatchNorm into it, as TensorRT does, and the variance would vanish."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.first = UpDown(1e5)
        self.mid = nn.Conv2d(8, 8, 3, padding=1)
        self.second = nn.BatchNorm2d(8).eval()
        with torch.no_grad():
            self.second.running_var.fill_(1e6)
            self.second.weight.fill_(1e3)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(self.second(torch.relu(self.mid(self.first(self.stem(x))))))


class Absorbed(nn.Module):
    """A huge negative pre-activation overflows to -inf in FP16, BN keeps it -inf, ReLU makes it 0:
    the output is the same as in FP32, so nothing may be blamed."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        with torch.no_grad():
            self.proj.weight.zero_()
            self.proj.bias.fill_(-2e5)
        self.bn = nn.BatchNorm1d(8).eval()
        self.act = nn.ReLU()
        self.head = _lin(seed=3)

    def forward(self, x):
        return self.head(self.act(self.bn(self.proj(x))) + x)


class LogEps(nn.Module):
    def forward(self, x):
        return torch.log(x + 1e-10)


class Underflow(nn.Module):
    """log(relu(x) + 1e-10): 1e-10 flushes to zero in FP16, log(0) = -inf."""

    def __init__(self):
        super().__init__()
        self.proj = _lin(seed=4)
        self.act = nn.ReLU()
        self.log = LogEps()
        self.head = _lin(seed=5)

    def forward(self, x):
        return self.head(self.log(self.act(self.proj(x))))


@pytest.mark.slow
def test_single_offender_is_named_and_refined_to_its_op():
    model = _stack(_lin(seed=0), Gain(1e5), nn.ReLU(), Gain(1e-5), _lin(seed=1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = bisect(model, [_x()], backend="emulate")
    assert [o.name for o in result.offenders] == ["1"]  # the Gain(1e5)
    assert result.offenders[0].kind == "Scale" and "mul" in result.offenders[0].op
    assert result.offenders[0].amax == pytest.approx(
        (model[1](model[0](_x()))).abs().max().item(), rel=1e-6)  # FP32 value at the cut
    assert result.builds <= result.build_bound + 1  # + the refinement inside the module
    assert result.monotonic
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def _image(seed=1):
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.slow
def test_all_offenders_lists_both_in_order():
    model = TwoOffenders().eval()
    first = bisect(model, [_image()], backend="emulate")
    assert [o.name for o in first.offenders] == ["first"]
    both = bisect(model, [_image()], backend="emulate", all_offenders=True)
    assert [o.name for o in both.offenders] == ["first", "second"]
    assert [o.round for o in both.offenders] == [0, 1]
    assert both.offenders[1].onnx_nodes  # the module's ONNX nodes were kept in FP32 for round 2


def test_overflow_absorbed_downstream_is_not_blamed():
    model = Absorbed().eval()
    x = _x()
    # the inspector sees the overflow ...
    assert model.proj(x).abs().max() > 65504
    # ... but FP16 execution does not change the output
    result = bisect(model, [x], backend="emulate")
    assert not result.found
    assert [t.bad for t in result.trials] == [False]  # one build: the all-FP16 model is fine


@pytest.mark.slow
def test_underflow_of_an_epsilon_is_blamed_on_the_log():
    result = bisect(Underflow().eval(), [_x()], backend="emulate")
    assert [o.name for o in result.offenders] == ["log"]
    assert math.isinf(result.offenders[0].error)
    # refined to the op where the epsilon is lost: x + 1e-10 == x in FP16, so log(x) = -inf at x = 0
    assert result.offenders[0].op == "add (aten.add.Tensor)"


def test_clean_model_exits_with_nothing_found():
    result = bisect(_stack(_lin(seed=0), nn.ReLU(), _lin(seed=1)), [_x()], backend="emulate")
    assert not result.found and len(result.trials) == 1
    assert result.trials[0].error < 1e-2  # ordinary FP16 rounding passes the default tolerance


def _onnx_chain(gains):
    nodes, inits, prev = [], [], "x"
    for i, g in enumerate(gains):
        nodes.append(helper.make_node("Mul", [prev, f"g{i}"], [f"t{i}"], name=f"mul{i}"))
        nodes.append(helper.make_node("Relu", [f"t{i}"], [f"r{i}"], name=f"relu{i}"))
        inits.append(numpy_helper.from_array(np.array(g, np.float32), f"g{i}"))
        prev = f"r{i}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info(prev, TensorProto.FLOAT, [4])], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    return m


def _onnx_two_batchnorms():
    """x -> BN(var 1e6) -> Relu -> Mul 2 -> BN(var 3e5) -> Relu: each variance overflows FP16,
    each BN's output is in range (scale 1e3 / sqrt(var) brings it back)."""
    c = 4
    nodes, inits = [], []
    for i, var in enumerate((1e6, 3e5)):
        src = "x" if i == 0 else "m0"
        nodes.append(helper.make_node("BatchNormalization", [src, f"s{i}", f"b{i}", f"mu{i}", f"var{i}"], [f"bn{i}_out"],
                                      name=f"bn{i}", epsilon=1e-5))
        nodes.append(helper.make_node("Relu", [f"bn{i}_out"], [f"r{i}"], name=f"relu{i}"))
        for name, value in ((f"s{i}", 1e3 * np.ones(c)), (f"b{i}", 0.1 * np.ones(c)), (f"mu{i}", np.zeros(c)),
                            (f"var{i}", var * np.ones(c))):
            inits.append(numpy_helper.from_array(value.astype(np.float32), name))
        if i == 0:
            nodes.append(helper.make_node("Mul", ["r0", "two"], ["m0"], name="mul"))
            inits.append(numpy_helper.from_array(np.array(2.0, np.float32), "two"))
    graph = helper.make_graph(nodes, "bns", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, 2, 2])],
                              [helper.make_tensor_value_info("r1", TensorProto.FLOAT, [1, c, 2, 2])], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    return m


def test_onnx_graph_offenders_are_nodes():
    x = np.random.default_rng(0).normal(size=(1, 4, 2, 2)).astype(np.float32)
    result = bisect(_onnx_two_batchnorms(), [x], backend="emulate", all_offenders=True)
    assert [o.name for o in result.offenders] == ["bn0", "bn1"]
    assert [o.kind for o in result.offenders] == ["BatchNormalization"] * 2
    assert {u.name for u in result.unfit} == {"var0", "var1"}
    assert len(result.candidates) == 5 and result.build_bound == 5


def test_builds_stay_within_the_bound_on_a_long_chain():
    gains = [1.0] * 100
    gains[63], gains[64] = 1e6, 1e-6
    model = _onnx_chain(gains)
    result = bisect(model, [np.ones(4, np.float32)], backend="emulate")
    assert [o.name for o in result.offenders] == ["mul63"]
    assert result.builds <= result.build_bound  # ceil(log2 200) + 2 = 10


@pytest.mark.slow
def test_task_metric_replaces_relative_l2():
    model = _stack(_lin(seed=0), Gain(1e5), Gain(1e-5), _lin(seed=1))
    calls = []

    def sign_agreement(outputs, reference):
        calls.append(1)
        return float(np.mean(np.sign(outputs[0]) != np.sign(reference[0])))

    result = bisect(model, [_x()], backend="emulate", metric=sign_agreement, tolerance=0.0)
    assert calls and result.metric == "sign_agreement"
    assert [o.name for o in result.offenders] == ["1"]


def test_relative_l2():
    r = [np.array([3.0, 4.0])]
    assert relative_l2([np.array([3.0, 4.0])], r) == 0
    assert relative_l2([np.array([3.0, 4.5])], r) == pytest.approx(0.1)
    assert relative_l2([np.array([3.0, np.inf])], r) == math.inf
    assert relative_l2([np.array([3.0])], r) == math.inf


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # Python control flow on a value: neither torch.export nor fx can capture it
            return x * 2
        return x


def test_a_model_that_cannot_be_captured_gets_one_clear_error():
    with pytest.raises(SplitError, match=r"cannot capture DataDependent.*\.onnx"):
        TorchSplitter(DataDependent(), (torch.ones(3),))


def test_an_input_of_the_wrong_shape_is_named():
    with pytest.raises(InputError, match=r"rejected input input 0 of shape \[16, 5\]"):
        bisect(_stack(_lin()), [torch.ones(16, 5)], backend="emulate")
    with pytest.raises(InputError, match="takes 1 input"):
        bisect(_onnx_chain([1.0]), [NamedInput("two", (np.ones(4, np.float32), np.ones(4, np.float32)))],
               backend="emulate")
    with pytest.raises(BisectError, match="at least one input"):
        bisect(_stack(_lin()), [], backend="emulate")


def test_split_prefix_and_suffix_recompose_the_model_exactly():
    model = TwoOffenders().eval()
    x = _image()
    sp = TorchSplitter(model, (x,))
    names = [s.name for s in sp.segments]
    assert names[:2] == ["stem", "first"] and names[-2:] == ["second", "head"]
    with torch.no_grad():
        ref = model(x)
        for seg in range(len(sp.segments)):
            prefix, suffix, live = sp.split(sp.end_of(seg))
            out = suffix(*prefix(x), x)
            assert torch.equal(out[0], ref), seg


# -- the tolerance from the data: rounding noise is not an overflow -----------------------------------
#
# A random Linear+ReLU stack stays near 1e-3 relative L2 in FP16 even 40 layers deep; what makes the
# rounding of the first layers exceed 0.07 at the output is a *sensitive* model. A tanh stack with
# weight gain sigma ~ 2 is one (the chaotic phase: a perturbation grows ~1.15x per layer while every
# activation stays in [-1, 1]), so FP16 rounding alone gives 0.1 - 0.16 there. After layer 36,
# ``up`` and ``over`` multiply by 1e3 each and two Muls by 1e-3 undo it: every constant fits FP16,
# and ``over`` is the first op whose output does not (1e6 |tanh| > 65504 where |tanh| > 0.066).

DEPTH, WIDTH, OVERFLOW_AFTER = 40, 32, 36
GAINS = (("up", 1e3), ("over", 1e3), ("down", 1e-3), ("back", 1e-3))


def _deep_tanh_onnx(sigma=1.9, seed=3):
    """40 x (MatMul [16, 32] x [32, 32] -> Tanh), weights N(0, sigma^2 / 32); after layer 36, the
    Muls of :data:`GAINS` (``over``'s output is out of FP16 range)."""
    rng = np.random.default_rng(seed)
    nodes, inits, prev = [], [], "x"
    for i in range(DEPTH):
        w = rng.standard_normal((WIDTH, WIDTH)) * sigma / WIDTH**0.5
        inits.append(numpy_helper.from_array(w.astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"h{i}"], name=f"fc{i}"))
        nodes.append(helper.make_node("Tanh", [f"h{i}"], [f"a{i}"], name=f"tanh{i}"))
        prev = f"a{i}"
        if i == OVERFLOW_AFTER:
            for name, gain in GAINS:
                inits.append(numpy_helper.from_array(np.array(gain, np.float32), f"{name}_gain"))
                nodes.append(helper.make_node("Mul", [prev, f"{name}_gain"], [name], name=name))
                prev = name
    io = [helper.make_tensor_value_info(v, TensorProto.FLOAT, [16, WIDTH]) for v in ("x", prev)]
    m = helper.make_model(helper.make_graph(nodes, "deep_tanh", io[:1], io[1:], inits),
                          opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    return m


def _deep_tanh_torch(sigma=2.0, seed=0):
    """The same stack as PyTorch modules (``nn.Sequential``: Linear, Tanh, ...; zero biases), with
    the Gains of :data:`GAINS` after layer 36 (modules ``"74"`` to ``"77"``: ``"75"`` overflows)."""
    g = torch.Generator().manual_seed(seed)
    layers = []
    for i in range(DEPTH):
        fc = nn.Linear(WIDTH, WIDTH)
        with torch.no_grad():
            fc.weight.copy_(torch.randn(WIDTH, WIDTH, generator=g) * sigma / WIDTH**0.5)
            fc.bias.zero_()
        layers += [fc, nn.Tanh()]
        if i == OVERFLOW_AFTER:
            layers += [Gain(gain) for _, gain in GAINS]
    return _stack(*layers)


def test_noise_tolerance_is_floor_then_k_times_noise_then_cap():
    assert noise_tolerance(None) == (DEFAULT_TOLERANCE, "floor")
    assert noise_tolerance(math.inf) == (DEFAULT_TOLERANCE, "floor")  # a broken prefix is not noise
    assert noise_tolerance(1e-3) == (DEFAULT_TOLERANCE, "floor")
    assert noise_tolerance(0.1) == (pytest.approx(NOISE_FACTOR * 0.1), "noise")
    assert noise_tolerance(0.2) == (NOISE_CAP, "cap")
    assert noise_tolerance(0.2, floor=0.9) == (0.9, "floor")
    grid = np.linspace(0, 1, 201)
    tolerances = [noise_tolerance(float(v))[0] for v in grid]
    assert all(a <= b for a, b in zip(tolerances, tolerances[1:]))  # monotone in the noise
    assert min(tolerances) == DEFAULT_TOLERANCE and max(tolerances) == NOISE_CAP


def test_rounding_noise_above_the_fixed_tolerance_is_not_blamed_onnx():
    """ONNX nodes: the old fixed 0.07 blames a node long before the overflow (its error is finite:
    rounding); the tolerance from the data blames ``over``, the Mul whose output exceeds 65504."""
    model = _deep_tanh_onnx()
    x = np.random.default_rng(100).standard_normal((16, WIDTH)).astype(np.float32)
    result = bisect(model, [x], backend="emulate")
    over = result.candidates.index("over")
    assert result.noise_cut == over  # the longest in-range prefix ends right before the overflow
    noise_trial = next(t for t in result.trials if t.cut == over)
    assert result.noise == noise_trial.error and not noise_trial.bad
    assert result.noise > DEFAULT_TOLERANCE  # FP16 rounding alone exceeds the fixed tolerance
    assert (result.tolerance, result.tolerance_source) == noise_tolerance(result.noise)
    assert result.tolerance > DEFAULT_TOLERANCE
    assert [o.name for o in result.offenders] == ["over"] and math.isinf(result.offenders[0].error)
    assert not result.unfit  # every constant fits FP16: the activation overflows
    assert result.builds <= result.build_bound  # measuring the noise cost no build beyond the bound
    data = result.to_json()
    assert data["noise"] == result.noise and data["noise_cut"] == over and data["tolerance"] == result.tolerance
    out = io.StringIO()
    print_bisect(result, Console(file=out, width=300))
    assert f"FP16 rounding noise {result.noise:.3g} measured at cut {over}" in out.getvalue()

    fixed = bisect(model, [x], backend="emulate", tolerance=DEFAULT_TOLERANCE)
    assert fixed.tolerance == DEFAULT_TOLERANCE and fixed.tolerance_source == "explicit" and fixed.noise is None
    blamed = fixed.offenders[0]
    assert blamed.cut <= over and DEFAULT_TOLERANCE < blamed.error < result.tolerance  # precision, not range
    assert blamed.kind in ("MatMul", "Tanh")


@pytest.mark.slow
def test_rounding_noise_above_the_fixed_tolerance_is_not_blamed_torch():
    """PyTorch modules (the filed report: the old tolerance blamed the first layer)."""
    model = _deep_tanh_torch()
    x = _x(WIDTH)
    result = bisect(model, [x], backend="emulate")
    assert [(o.name, o.kind) for o in result.offenders] == [("75", "Scale")]  # the second Gain(1e3)
    assert result.noise_cut == 75 and result.noise > DEFAULT_TOLERANCE
    assert result.tolerance == noise_tolerance(result.noise)[0] > result.noise
    assert all(t.bad == (t.cut > 75) for t in result.trials if t.stage == "module") and result.monotonic
    fixed = bisect(model, [x], backend="emulate", tolerance=DEFAULT_TOLERANCE)
    assert [(o.name, o.kind) for o in fixed.offenders] == [("0", "Linear")]  # the old verdict: the first layer
    assert DEFAULT_TOLERANCE < fixed.offenders[0].error < result.tolerance


# -- the bundled real examples ---------------------------------------------------------------------

@pytest.mark.slow
def test_ppocr_det_blames_the_batchnorm_with_the_overflowing_variance():
    from fp16guard.examples import get_example, ppocr

    ex = get_example("ppocr-det")
    photos = ppocr.photos()
    result = bisect(ex.load(), [NamedInput("page", (ppocr.preprocess(photos["page"]),))], backend="emulate")
    assert [o.name for o in result.offenders] == ["p2o.BatchNormalization.1"]
    model = onnx.load(ex.load())
    bn = next(n for n in model.graph.node if n.name == "p2o.BatchNormalization.1")
    assert bn.input[4] == "batch_norm_0.w_2"  # the variance of about 9.8e7
    unfit = {u.name: u for u in result.unfit}
    assert unfit["batch_norm_0.w_2"].overflow == 24 and unfit["batch_norm_0.w_2"].amax == pytest.approx(9.79e7, rel=0.01)
    assert result.builds <= result.build_bound == 11
    good = [t.error for t in result.trials if not t.bad]
    assert max(good) < DEFAULT_TOLERANCE / 2  # FP16 rounding alone stays well under the tolerance


@pytest.mark.slow
def test_crepe_full_blames_conv2_bn():
    from fp16guard.examples import get_example

    ex = get_example("crepe-full")
    result = bisect(ex.load(), ex.inputs(), backend="emulate")
    assert [o.name for o in result.offenders] == ["conv2_BN"]
    o = result.offenders[0]
    assert o.kind == "BatchNorm2d" and "batch_norm" in o.op and o.onnx_nodes
    assert {u.name for u in result.unfit if u.overflow} == {"conv2_BN.running_var"}
    assert result.builds <= result.build_bound


@pytest.mark.slow
def test_cli_bisect_example_writes_json_and_plot(tmp_path):
    from fp16guard.cli import main

    js, png = tmp_path / "b.json", tmp_path / "b.png"
    code = main(["bisect", "--example", "ppocr-det", "--backend", "emulate", "--input",
                 str(_page_png(tmp_path)), "--json", str(js), "--plot", str(png)])
    assert code == 1
    data = json.loads(js.read_text())
    assert data["schema"] == "fp16guard.bisect/1" and data["found"]
    assert data["offenders"][0]["name"] == "p2o.BatchNormalization.1"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _page_png(tmp_path):
    from PIL import Image
    from skimage import data

    path = tmp_path / "page.png"
    Image.fromarray(data.page()).convert("RGB").save(path)
    return path


@pytest.mark.slow
def test_cli_bisect_bad_usage_is_one_line(tmp_path, capsys):
    from fp16guard.cli import main

    assert main(["bisect", str(tmp_path / "missing.onnx"), "--input", "x.npy"]) == 2
    assert main(["bisect", "--example", "ppocr-det", "--backend", "fp8"]) == 2
    assert main(["bisect", "--example", "ppocr-det", "--backend", "torch"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("fp16guard: error: ") for line in err)
    assert "--backend fp8: unknown backend" in err[1] and "PyTorch models" in err[2]


class WithPostprocessing(nn.Module):
    """An offender in the body, then post-processing (a running max) that the ONNX exporter
    cannot convert: it must stay in the FP32 PyTorch suffix."""

    def __init__(self):
        super().__init__()
        self.body = _lin(seed=6)
        self.bad = UpDown(1e5)
        self.head = _lin(seed=7)

    def forward(self, x):
        return torch.cummax(self.head(self.bad(self.body(x))), dim=0)[0]


@pytest.mark.slow
def test_post_processing_that_cannot_be_exported_stays_in_the_suffix():
    result = bisect(WithPostprocessing().eval(), [_x()], backend="emulate")
    assert [o.name for o in result.offenders] == ["bad"]
    assert any("cannot be exported to ONNX" in n and "cummax" in n for n in result.notes), result.notes
    limit = next(i for i, name in enumerate(result.candidates) if name.endswith("cummax"))
    assert max(t.cut for t in result.trials) <= limit  # never a prefix holding the cummax


@given(n=st.integers(1, 400), start=st.integers(0, 50), first_bad=st.integers(1, 500))
def test_cut_search_finds_the_first_bad_cut_in_log2_verdicts(n, start, first_bad):
    """The search object alone, on a monotone verdict: the first bad cut after ``start`` (or None
    when cut n is good), in at most 1 + ceil(log2(n - start)) verdicts, bracketing it on both sides."""
    search = CutSearch(n, start)
    asked = []
    hit = search.run(lambda c: asked.append(c) or c >= first_bad)
    if n <= start:
        assert hit is None and not asked
        return
    want = max(first_bad, start + 1) if first_bad <= n else None
    assert hit == want and search.monotonic
    assert len(asked) == len(set(asked)) <= 1 + math.ceil(math.log2(n - start))
    if hit is not None and hit - 1 > start:
        assert search.verdicts[hit - 1] is False  # the boundary is verified on the good side too


def test_cut_search_reports_a_verdict_that_breaks_monotonicity():
    search = CutSearch(8)
    search.take(8, True)
    search.take(4, True)
    search.take(2, False)
    search.take(6, False)  # good after a shorter prefix was bad
    assert not search.monotonic


# -- prefix reuse: a later cut runs only the nodes after the last good one ----------------------------

class _CountedEngine(Engine):
    """An engine that logs the model nodes (Casts aside) each of its runs evaluates."""

    def __init__(self, engine, nodes, log):
        self.engine, self.nodes, self.log = engine, nodes, log
        self.input_names, self.output_names, self.inputs = engine.input_names, engine.output_names, engine.inputs

    def _run(self, feeds):
        self.log.append(self.nodes)
        return self.engine.run(feeds)


class _CountingEmulate(EmulateBackend):
    """The ``emulate`` backend (real ONNX Runtime runs), counting the prefix nodes it runs."""

    def __init__(self):
        super().__init__()
        self.nodes_run: list[int] = []

    def build(self, model):
        return _CountedEngine(super().build(model), sum(n.op_type != "Cast" for n in model.graph.node), self.nodes_run)


def _same_search(a, b):
    """Every number of two bisect results, their wall times aside."""
    strip = lambda r: [(t.stage, t.round, t.cut, t.last, t.error, t.bad) for t in r.trials]  # noqa: E731
    assert strip(a) == strip(b)
    assert a.offenders == b.offenders and a.unfit == b.unfit and a.notes == b.notes
    assert (a.noise, a.noise_cut, a.tolerance, a.tolerance_source, a.runs, a.monotonic) == \
           (b.noise, b.noise_cut, b.tolerance, b.tolerance_source, b.runs, b.monotonic)


@pytest.mark.parametrize("case", ["deep_tanh", "two_batchnorms_all"])
def test_prefix_reuse_gives_the_numbers_of_whole_prefixes_with_fewer_nodes_run(case, monkeypatch):
    """The cut moves forward from the last good one: starting from its cached FP16 values gives
    the whole prefix's numbers bit for bit (the chaotic tanh stack shows any difference in its
    error), over two inputs and over ``all_offenders`` rounds, running far fewer prefix nodes."""
    rng = np.random.default_rng(100)
    if case == "deep_tanh":
        model, kwargs = _deep_tanh_onnx(), {}
        inputs = [rng.standard_normal((16, WIDTH)).astype(np.float32) for _ in range(2)]
    else:
        model, kwargs = _onnx_two_batchnorms(), {"all_offenders": True}
        inputs = [rng.normal(size=(1, 4, 2, 2)).astype(np.float32) for _ in range(2)]
    results = {}
    for reuse in (False, True):
        monkeypatch.setattr(OnnxSplitTarget, "reuse_prefix", reuse)
        backend = _CountingEmulate()
        results[reuse] = bisect(model, inputs, backend=backend, **kwargs), sum(backend.nodes_run)
    (whole, whole_nodes), (reused, reused_nodes) = results[False], results[True]
    _same_search(whole, reused)
    assert whole.runs == reused.runs and whole.builds == reused.builds
    if case == "deep_tanh":
        assert [o.name for o in reused.offenders] == ["over"] and len(reused.trials) == 7
        # 7 cuts of 84 candidates (the noise cut 75 first, whole in both), 11 prefix runs (a broken
        # input stops a cut): 744 node evaluations as whole prefixes, 313 from the cached cuts
        assert (whole_nodes, reused_nodes) == (744, 313)
    else:
        assert [o.name for o in reused.offenders] == ["bn0", "bn1"]
        # round 1 keeps its last good cut for round 2 (bn1, kept in FP32 then, lies after it)
        assert len(reused.trials) == 7 and (whole_nodes, reused_nodes) == (50, 38)
