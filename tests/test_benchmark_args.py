"""The inspection benchmarks refuse arguments no run could use: one line on stderr, exit 2, before
any model is built."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[1]


@pytest.mark.parametrize("script, args, expected", [
    ("eager_breakdown.py", ["--device", "cpu", "--models", "resnet50,nosuch"], "unknown model 'nosuch'"),
    ("eager_breakdown.py", ["--device", "cpu", "--dtype", "int8"], "unknown floating dtype 'int8'"),
    ("inspect_overhead.py", ["--device", "cpu", "--dtypes", "float32,float17"], "unknown floating dtype 'float17'"),
    ("inspect_overhead.py", ["--device", "cpu", "--iters", "0"], "--iters 0: give 1 or more"),
])
def test_bad_arguments_give_one_line_and_exit_2(script, args, expected):
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True,
                         text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 2
    assert run.stdout == ""
    assert run.stderr.count("\n") == 1 and expected in run.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_graph_mode_without_a_gpu_is_refused_with_one_line():
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "inspect_overhead.py"), "--graph"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "needs a CUDA GPU" in run.stderr


def test_kernel_variants_parse_to_the_knobs_they_set():
    """``--kernels`` entries: positional reduction, overlap, group MiB, largest grouped KiB, then
    options; unset options stay as fp16guard ships them, and a malformed entry parses to None."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import inspect_overhead as bench
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    from fp16guard.inspect import replay, triton_stats

    shipped = (replay.STATISTICS_STREAMS, triton_stats.SIDE_PROGRAMS_PER_SM, replay.PRIORITIZE_MODEL)
    assert bench.parse_kernel("partials:side:0") == ("partials", True, 0, 0, *shipped)
    assert bench.parse_kernel("partials:side:32:2048:s2:p4:noprio") == ("partials", True, 32 << 20, 2 << 20, 2, 4, False)
    assert bench.parse_kernel("atomic:inline:8:prio") == ("atomic", False, 8 << 20, 0, *shipped[:2], True)
    for bad in ("partials:side", "partials:side:0:x", "partials:side:0:s0", "partials:both:0", "sum:side:0",
                "partials:side:s2"):
        assert bench.parse_kernel(bad) is None, bad
    assert bench.kernel_label(bench.parse_kernel("partials:side:0:s1:p4:noprio")) == (
        "partials, 1 side stream of 4 programs per SM, per tensor, no priorities")
