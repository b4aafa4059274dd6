"""Results that speak for themselves, and progress with counts (issue 23, items 6 and 7).

``print`` of an inspection report, a bisect result and a fix result gives a few lines (verdict by
cause, peak or offender, next step); ``rich`` gives the full report; the command line ends with the
verdict and, on a pipe, leaves one ``done`` line per finished step on stderr. Real runs of small
models, no mocks.
"""

import io

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
from onnx import TensorProto, helper, numpy_helper
from rich.console import Console

import fp16guard
from fp16guard import FInspect
from fp16guard.cli import main
from fp16guard.inspect.render import print_report
from fp16guard.progress import RichProgress, echo, reporting, step
from tests.models import Overflowing


def _onnx(nodes, inits, x_shape=(1, 3, 8, 8)):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    return m


def _residual(gain=1.0, var=None):
    """x -> Conv -> [BatchNorm with running variance ``var``] -> Relu -> Add -> MaxPool -> Conv -> y;
    ``gain`` scales the first conv (2e4: its outputs reach ~1e5, beyond FP16)."""
    rng = np.random.default_rng(0)
    inits = {"w1": rng.normal(size=(4, 3, 3, 3)) * gain, "b1": rng.normal(size=4),
             "w2": rng.normal(size=(2, 4, 1, 1)) * (1e-4 if gain > 1 else 1), "b2": rng.normal(size=2)}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1])]
    src = "c1"
    if var is not None:
        inits.update(gamma=np.ones(4), beta=np.full(4, 0.5), mean=np.full(4, 0.1), var=np.full(4, var))
        nodes.append(helper.make_node("BatchNormalization", ["c1", "gamma", "beta", "mean", "var"], ["bn"], name="bn"))
        src = "bn"
    nodes += [helper.make_node("Relu", [src], ["r"], name="relu"),
              helper.make_node("Add", ["r", src], ["a"], name="add"),
              helper.make_node("MaxPool", ["a"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
              helper.make_node("Conv", ["p", "w2", "b2"], ["y"], name="conv2")]
    return _onnx(nodes, inits)


def _x(seed):
    return np.random.default_rng(seed).normal(size=(1, 3, 8, 8)).astype(np.float32)


def _rich(obj, width=120) -> str:
    """What ``rich`` prints for ``obj`` (its ``__rich_console__``), as plain text."""
    console = Console(width=width, record=True, file=io.StringIO(), color_system=None)
    console.print(obj)
    return console.export_text()


# ---------------------------------------------------------------- inspect


def test_print_of_a_report_names_the_activation_its_peak_and_the_next_step():
    torch.manual_seed(0)
    model = Overflowing()
    with torch.no_grad(), FInspect(model) as probe:
        model(torch.randn(2, 8))
    report = probe.report()
    up = next(s for s in report.layers() if s.name == "up")
    lines = str(report).splitlines()
    assert lines == [
        "fp16guard inspect: Overflowing, 5 layers",
        "FP16 overflow found: 1 activation beyond 65504 (from up)",
        f"peak activation {up.outputs.amax:.4g} = {up.outputs.amax / 65504:.2f}x the FP16 limit at up (Scale)",
        lines[3],
        "next: fixed, plan = fp16guard.fix(model, inputs)",
    ]
    assert lines[3].startswith(f"next largest outputs: act {up.outputs.amax:.4g}, stem ")
    assert repr(report) == "InspectionReport(source='Overflowing', inputs=0, calls=6, static=0, overflow_found=True)"
    full = _rich(report)
    assert "Worst offenders" in full and "Transitions" in full
    assert full.rstrip().endswith("FP16 overflow found: 1 activation beyond 65504 (from up); next: fixed, plan = "
                                  "fp16guard.fix(model, inputs)")


def test_a_weight_beyond_fp16_is_named_as_a_weight_with_the_fix_command_to_run(tmp_path, capsys):
    onnx.save(_residual(var=1e6), tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", _x(1))
    assert main(["inspect", str(tmp_path / "m.onnx"), "--input", str(tmp_path / "x.npy")]) == 1
    captured = capsys.readouterr()
    out = " ".join(captured.out.split())
    assert "no activation crosses 65504" in out  # the weight, not an activation, is what breaks FP16
    assert out.endswith(f"FP16 overflow found: 1 weight beyond 65504 (var); next: fp16guard fix {tmp_path}/m.onnx "
                        f"--input {tmp_path}/x.npy -o fixed.onnx")
    # on a pipe, stderr holds one line per finished step, with its count of ONNX Runtime runs
    assert captured.err.splitlines()[0].startswith("done  inspect: FP32 ONNX Runtime runs of every value on 1 "
                                                   "input(s) (1/1)  ")


def test_an_attention_mask_at_finfo_min_is_info_not_an_input_overflow():
    class Attention(nn.Module):
        def forward(self, q, mask):
            return (q @ q.transpose(-1, -2) + mask).softmax(-1)

    class Masked(nn.Module):
        """Builds transformers' additive mask, ``(1 - keep) * finfo(float32).min``, and feeds it in."""

        def __init__(self):
            super().__init__()
            self.proj, self.attn = nn.Linear(4, 4), Attention()

        def forward(self, x, keep):
            return self.attn(self.proj(x), (1.0 - keep[:, None, :]) * torch.finfo(torch.float32).min)

    torch.manual_seed(0)
    model = Masked().eval()
    with torch.no_grad(), FInspect(model) as probe:
        model(torch.randn(1, 3, 4), torch.tensor([[1.0, 1.0, 0.0]]))
    report = probe.report()
    mask = [f for f in report.findings() if f.rule == "attention_mask"]
    assert [(f.severity, f.name) for f in mask] == [("info", "attn")] and "-2^15" in mask[0].reason
    assert not any(f.rule == "input_overflow" for f in report.findings()) and not report.overflow_found
    assert str(report).splitlines()[1] == ("no FP16 overflow found (the attention mask at finfo(float32).min read "
                                           "by attn is not an overflow; fix rewrites it to -2^15)")
    # a real input beyond FP16 on the same model is still an input overflow
    with torch.no_grad(), FInspect(model) as probe:
        model.attn(torch.full((1, 3, 4), 1e8), torch.zeros(1, 1, 3))
    (finding,) = [f for f in probe.report().findings() if f.rule == "input_overflow"]
    assert finding.severity == "error" and "1e+08" in finding.reason


def test_long_layer_names_wrap_in_the_tables_instead_of_being_cut():
    name = "encoder_layer_zero_attention_output_dense_projection"
    model = nn.Sequential()
    model.add_module(name, nn.Linear(4, 4))
    with torch.no_grad(), FInspect(model) as probe:
        model(torch.randn(2, 4) * 1e5)
    console = Console(width=110, record=True, file=io.StringIO(), color_system=None)
    print_report(probe.report(), console)
    table = console.export_text().split("Worst offenders")[1].split("\n\n")[0]
    cells = [line.split("│")[2].strip() for line in table.splitlines() if line.startswith("│")]
    assert len(cells) > 1 and name in "".join(cells)  # the name, folded over lines, whole


# ---------------------------------------------------------------- fix


def test_fix_returns_a_result_that_unpacks_and_states_its_error_against_the_tolerance():
    model = _residual(gain=2e4)
    result = fp16guard.fix(model, [_x(1)], validation=[_x(2)])
    fixed, plan = result  # the old ``(fixed, plan)`` return still unpacks
    assert isinstance(fixed, onnx.ModelProto) and plan is result.plan and len(plan.regions) == 1
    assert result.verification.finite and not result.naive.finite
    worst = max(result.verification.rows, key=lambda r: r.rel_l2)
    fallback = max(r.rel_l2 for r in result.fallback.rows)
    assert str(result).splitlines() == [
        f"fix g: fixed model runs in FP16: finite on 2 input(s), worst rel. L2 error {worst.rel_l2:.3g} against "
        f"tolerance 0.07 (on {worst.label}); FP32 fallback {fallback:.3g}, plain FP16 conversion inf/NaN",
        "rewrites: 1 scale region; 0 ops left in FP32, 2 Casts",
        'next: onnx.save(result.fixed, "fixed.onnx"), then trtexec --onnx=fixed.onnx --stronglyTyped',
    ]
    assert worst.rel_l2 < 0.07 and result.tolerance == 0.07
    assert repr(result) == "FixResult(source='g', accepted=True, finite=True, rewrites=" \
                           f"{len(result.notes)}, fixed=ModelProto)"
    assert "Verification on emulate against FP32" in _rich(result)


def test_fix_names_batchnorm_folds_and_islands_in_a_users_terms():
    result = fp16guard.fix(_residual(var=1e6), [_x(1)])
    assert str(result).splitlines()[1] == "rewrites: 1 BatchNorm as per-channel scale and shift; 0 ops left in " \
                                          "FP32, 2 Casts"
    island = _onnx([helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
                    helper.make_node("Softplus", ["c"], ["y"], name="softplus")],
                   {"w": np.random.default_rng(0).normal(size=(2, 3, 1, 1)) * 1e5})
    result = fp16guard.fix(island, [_x(1)], force=True)
    assert result.plan.unfixable
    assert f"{len(result.plan.unfixable)} FP32 island" in str(result).splitlines()[1]


def test_the_fix_command_ends_with_its_verdict_and_counts_its_steps_on_a_pipe(tmp_path, capsys):
    onnx.save(_residual(gain=2e4), tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", _x(1))
    assert main(["fix", str(tmp_path / "m.onnx"), "--input", str(tmp_path / "x.npy"), "-o",
                 str(tmp_path / "f.onnx")]) == 0
    captured = capsys.readouterr()
    out = " ".join(captured.out.split())
    assert "rewrites: 1 scale region FP16 conversion" in out and "scale x" not in out
    assert "fixed model runs in FP16: finite on 1 input(s), worst rel. L2 error " in out
    assert "against tolerance 0.07 (on " in out and "; FP32 fallback " in out
    assert "fixed model in FP16: finite" not in out
    err = captured.err.splitlines()
    assert err and all(line.startswith("done  ") for line in err)
    assert any(line.startswith("done  calibration: FP32 activation ranges on 1 input(s) (1/1)  ") for line in err)
    assert any(line.startswith("done  verify: the fixed model on emulate") and " (1/1)  " in line for line in err)


# ---------------------------------------------------------------- bisect


def test_print_of_a_bisect_result_names_the_offender_and_the_next_step():
    result = fp16guard.bisect(_residual(gain=2e4), [_x(1)], backend="emulate")
    (offender,) = result.offenders
    lines = str(result).splitlines()
    assert lines[0] == (f"bisect g on emulate: FP16 breaks the output at conv1 (Conv); first bad cut {offender.cut} "
                        f"of {len(result.candidates)}, error inf > tolerance 0.07")
    assert lines[1].startswith(f"{len(result.trials)} cuts tried (bound per round {result.build_bound}), ")
    assert lines[2] == "next: fixed, plan = fp16guard.fix(model, inputs)"
    assert repr(result) == (f"BisectResult(source='g', offenders=['conv1'], trials={len(result.trials)}, "
                            f"tolerance=0.07)")
    full = _rich(result)
    assert "tried cuts" in full and "offender 1: conv1 (Conv)" in full


# ---------------------------------------------------------------- progress


def test_a_piped_progress_writes_one_line_per_finished_step_with_its_count():
    buf = io.StringIO()
    with RichProgress(Console(file=buf, width=80)) as progress, reporting(progress):
        fp16guard.inspect_onnx(_residual(), [{"x": _x(1)}, {"x": _x(2)}], memory_budget=1)
        with pytest.raises(ValueError), step("a step that fails", total=3) as advance:
            advance()
            raise ValueError("boom")
    (line,) = buf.getvalue().splitlines()  # the failed step leaves no "done"
    # one ONNX Runtime run per input, whatever the memory budget (the statistics are inside the graph)
    assert line.startswith("done  inspect: FP32 ONNX Runtime runs of every value on 2 input(s) (2/2)")


def test_a_live_progress_is_cleared_and_lines_printed_meanwhile_go_above_it():
    err, out = io.StringIO(), io.StringIO()
    stdout = Console(file=out, force_terminal=True, width=80)
    with RichProgress(Console(file=err, force_terminal=True, width=80)) as progress, reporting(progress):
        with step("search", total=4) as advance:
            echo(stdout, "a trial line")
            advance()
    assert "a trial line" in err.getvalue() and out.getvalue() == ""  # drawn above the display, on its console
    assert "done" not in err.getvalue()  # cleared when the step ends, no record left
    assert "0/4" in err.getvalue()  # the count of its total, drawn from the start
