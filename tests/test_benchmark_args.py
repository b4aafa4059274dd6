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
