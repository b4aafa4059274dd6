"""The step parsing of ``benchmarks/fix_cost.py``: fp16guard's ``done`` lines and AutoCast's log
lines become time spans, and the AutoCast rows it writes read back as stored timings."""

import importlib.util
import sys
from pathlib import Path

import pytest

SPEC = importlib.util.spec_from_file_location("bench_fix_cost", Path(__file__).parents[1] / "benchmarks" / "fix_cost.py")
fix_cost = sys.modules.setdefault("bench_fix_cost", importlib.util.module_from_spec(SPEC))
SPEC.loader.exec_module(fix_cost)


def test_done_lines_parse_with_and_without_a_count():
    assert fix_cost.parse_done("done  calibration: FP32 activation ranges on 2 input(s) (6/6)  8.0 s") == (
        "calibration: FP32 activation ranges on 2 input(s)", "6/6", 8.0)
    assert fix_cost.parse_done("done  capture: the model's graph  0.1 s") == ("capture: the model's graph", None, 0.1)
    assert fix_cost.parse_done("done  bisect: cuts (12)  3.5 s") == ("bisect: cuts", "12", 3.5)
    assert fix_cost.parse_done("fixed typed FP16 model: out.onnx") is None
    assert fix_cost.short("verify: the fixed model on emulate: FP16 storage emulated (x: y)") == \
        "verify: the fixed model on emulate"


def test_fp16guard_spans_cover_startup_steps_gaps_and_the_tail():
    lines = [(2.0, "done  capture: the model's graph  0.5 s"), (2.1, "some warning"),
             (5.0, "done  calibration: FP32 activation ranges on 4 input(s) (4/4)  2.0 s")]
    spans = fix_cost.fp16guard_steps(lines, end=6.0)
    assert [(n, round(a, 2), round(b, 2), note) for n, a, b, note in spans] == [
        ("startup", 0.0, 1.5, "imports, load, inputs"), ("capture: the model's graph", 1.5, 2.0, ""),
        ("(between steps)", 2.0, 3.0, ""), ("calibration: FP32 activation ranges on 4 input(s)", 3.0, 5.0, "count 4/4"),
        ("(after last step)", 5.0, 6.0, "report, write")]


def test_autocast_phases_follow_its_log_lines():
    lines = [(3.0, "INFO - Running ONNX Runtime to obtain reference outputs (this may take a while)..."),
             (5.0, "INFO - Skipping node a: reference IO out of range"), (5.1, "INFO - Skipping node b"),
             (8.0, "INFO - Converted 260/267 nodes (97.38%) to fp16"), (8.5, "INFO - Converted model saved to x")]
    spans = fix_cost.autocast_steps(lines, end=9.0)
    assert [(n, a, b) for n, a, b, _ in spans] == [
        ("load, sanitize, infer types", 0.0, 3.0), ("reference runs", 3.0, 5.0),
        ("aggregate, classify, convert", 5.0, 8.0), ("save", 8.0, 8.5), ("(exit)", 8.5, 9.0)]


def test_written_autocast_rows_read_back_as_stored(tmp_path):
    rows = [fix_cost.Step("TOTAL", 13.7, 2475.0, "rc 0, maxrss 2487 MiB"), fix_cost.Step("reference runs", 1.7, None)]
    text = "\n".join(["# header", *(fix_cost.fmt("bert-L4", "autocast", s, i > 0) for i, s in enumerate(rows)),
                      fix_cost.fmt("bert-L4", "fp16guard", rows[0], False)])
    (tmp_path / "r.txt").write_text(text)
    stored = fix_cost.stored_autocast(tmp_path / "r.txt")
    assert list(stored) == ["bert-L4"]
    total, ref = stored["bert-L4"]
    assert (total.name, total.seconds, total.peak_mib) == ("TOTAL", 13.7, 2475.0)
    assert total.note.startswith("stored; rc 0")
    assert (ref.name, ref.seconds, ref.peak_mib) == ("reference runs", 1.7, None)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_rss_of_this_process_is_positive():
    import os

    assert fix_cost.tree_rss_mib(os.getpid()) > 1
