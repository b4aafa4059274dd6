"""One rank of tests/test_distributed.py, launched by ``torchrun --nproc-per-node 2`` (gloo, CPU).

``python distributed_worker.py OUT MODEL.onnx N``: each rank reads its shard (inputs ``rank::2``) of
the :func:`inputs` data set and runs :class:`~fp16guard.FInspect` (the caller's own loop over
``probe.run``), ``inspect_stream`` on the module and on the ONNX model, and ``calibrate`` on both;
every result is merged across the ranks, and rank 0 alone writes them to ``OUT`` as JSON (every
rank checks that it holds the same merged plan).
"""

import json
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: tests.models

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from fp16guard import FInspect, calibrate, distributed  # noqa: E402
from fp16guard.datasets import DataSource  # noqa: E402
from fp16guard.inputs import torch_args  # noqa: E402
from fp16guard.inspect.streaming import inspect_stream  # noqa: E402
from tests.models import residual_net  # noqa: E402


def inputs(n: int) -> list[np.ndarray]:
    """``n`` inputs of :func:`~tests.models.residual_net`, of growing scale (the same in every process)."""
    rng = np.random.default_rng(7)
    return [(rng.normal(size=(1, 3, 8, 8)) * (1 + i / 4)).astype(np.float32) for i in range(n)]


def results(model_path: str, n: int) -> dict:
    """Every merged result of this rank's shard, as JSON-ready dicts."""
    net = residual_net()
    data = inputs(n)
    with torch.no_grad(), FInspect(net) as probe:
        for item in DataSource(data):  # this rank's shard
            probe.run(*torch_args(item))
    report = probe.report()  # merged across the ranks
    out = {"finspect": report.to_json(), "finspect_mode": report.mode}
    out["stream_torch"] = inspect_stream(net, data).to_json()
    out["stream_onnx"] = inspect_stream(model_path, data).to_json()
    out["plan_onnx"] = calibrate(model_path, data).to_json()
    out["plan_torch"] = calibrate(net, data).to_json()
    return out


def main() -> None:
    warnings.simplefilter("ignore")
    out_path, model_path, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    dist.init_process_group("gloo")
    try:
        assert distributed.active() and distributed.world_size() == 2
        out = results(model_path, n)
        plans = distributed.gather(out["plan_onnx"])
        assert plans[0] == plans[1], "the ranks hold different plans"
        if distributed.is_main():
            Path(out_path).write_text(json.dumps(out))
        else:
            Path(f"{out_path}.rank{distributed.rank()}").write_text("rank 1 ran")  # that it ran, not a result
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
