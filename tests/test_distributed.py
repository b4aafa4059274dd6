"""Across processes with torch.distributed (issue 26, item 5): two gloo processes launched by
``torchrun`` on the CPU, each reading its own shard of a small data set, give the report and the
plans of one process on the union of the data, value for value; rank 0 alone writes.

The ranks run tests/distributed_worker.py (FInspect driven by the caller, ``inspect_stream`` on a
module and on an ONNX model, ``calibrate`` on both); this process computes the same on every input
and compares. The command line runs under ``torchrun --no-python fp16guard ...`` the same way.
"""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import onnx
import pytest
import torch
from distributed_worker import inputs

import fp16guard
from fp16guard import FInspect, distributed
from fp16guard.datasets import write_shards
from fp16guard.inputs import as_inputs, torch_args
from fp16guard.inspect.streaming import inspect_stream
from fp16guard.plan import RewritePlan
from fp16guard.torch_onnx import export_onnx
from tests.models import residual_net

TESTS = Path(__file__).resolve().parent
N = 13  # two ranks of 7 and 6 inputs: uneven shards


def _torchrun(*args: str, cwd: Path | None = None, code: int = 0) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node 2 ARGS`` (a free port of its own), gloo on the CPU;
    it must exit with ``code`` (any rank's non-zero status is torchrun's 1)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("WORLD_SIZE", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == code, f"{command} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done


def _doc(result, *drop: str) -> dict:
    """A result as its JSON reads back (tuples as lists), without the keys ``drop`` (a report's
    ``mode``, how the forwards ran, differs by construction)."""
    doc = json.loads(json.dumps(result if isinstance(result, dict) else result.to_json()))
    return {k: v for k, v in doc.items() if k not in drop}


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("dist") / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx.save(export_onnx(residual_net(), (torch.zeros(1, 3, 8, 8),)), path)
    return path


def test_two_gloo_processes_merge_to_the_single_process_results(model_file, tmp_path):
    out = tmp_path / "out.json"
    _torchrun(str(TESTS / "distributed_worker.py"), str(out), str(model_file), str(N))
    merged = json.loads(out.read_text())
    assert not (tmp_path / "out.json.rank0").exists() and (tmp_path / "out.json.rank1").exists()  # rank 0 wrote

    net, data = residual_net(), inputs(N)
    with torch.no_grad(), FInspect(net) as probe:
        for item in as_inputs(data):
            probe.run(*torch_args(item))
    single = probe.report()
    assert not distributed.active()
    assert _doc(merged["finspect"], "mode") == _doc(single, "mode")  # every record, value for value
    assert merged["finspect"]["mode"].startswith("merged over 2 processes (gloo); rank 0: eager: 7 forwards")
    assert _doc(merged["stream_torch"], "mode") == _doc(inspect_stream(net, data), "mode")
    onnx_report = inspect_stream(str(model_file), data)
    assert _doc(merged["stream_onnx"], "mode") == _doc(onnx_report, "mode")
    assert onnx_report.inputs == tuple(f"input {i}" for i in range(N))  # labels back in data-set order
    plan = fp16guard.calibrate(str(model_file), data)
    assert merged["plan_onnx"] == _doc(plan) and plan.regions
    assert merged["plan_torch"] == _doc(fp16guard.calibrate(net, data))


def test_the_command_line_under_torchrun_writes_the_single_process_plan_from_rank_0(model_file, tmp_path):
    write_shards(inputs(N), tmp_path / "calib", rows=4)
    _torchrun("--no-python", "fp16guard", "-q", "calibrate", str(model_file), "--input", "calib/",
              "-o", "plan.json", cwd=tmp_path)
    _torchrun("--no-python", "fp16guard", "-q", "inspect", str(model_file), "--input", "calib/",
              "--json", "report.json", cwd=tmp_path, code=1)  # exit 1: the overflow is found
    from fp16guard.cli import main

    assert main(["-q", "calibrate", str(model_file), "--input", str(tmp_path / "calib"),
                 "-o", str(tmp_path / "single.json")]) == 0
    assert RewritePlan.load(tmp_path / "plan.json").to_json() == RewritePlan.load(tmp_path / "single.json").to_json()
    assert main(["-q", "inspect", str(model_file), "--input", str(tmp_path / "calib"), "--stream",
                 "--json", str(tmp_path / "single-report.json")]) == 1
    report, single = (json.loads((tmp_path / name).read_text()) for name in ("report.json", "single-report.json"))
    assert report["calls"] == single["calls"] and report["inputs"] == single["inputs"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == [
        "plan.json", "report.json", "single-report.json", "single.json"]  # nothing else, no temporary file
