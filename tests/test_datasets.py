"""Data sets, streamed (issue 26, item 4): folders, patterns, ``.npz`` shards, generators and
DataLoaders read one input at a time; the streamed plan and report equal those of the same inputs in
one list, value for value; memory stays flat as the data set grows; the early stop says where.

Real computation throughout: a small residual conv net (its last block writes ~2e5) as an ONNX
model and as a module, calibrated and inspected on generated inputs.
"""

import gc
import logging
import tracemalloc
import warnings

import numpy as np
import pytest
import torch
from fix_cases import big_input_model

import fp16guard
from fp16guard.cli import main
from fp16guard.datasets import DataSource, RangeWatch, exponent, streamed, write_shards
from fp16guard.errors import FixError, InputError
from fp16guard.inputs import as_inputs, load_inputs
from fp16guard.inspect import run_torch
from fp16guard.inspect.streaming import inspect_stream
from fp16guard.plan import RewritePlan
from fp16guard.torch_onnx import export_onnx
from tests.models import residual_net

SHAPE = (1, 3, 8, 8)


@pytest.fixture(scope="module")
def net():
    return residual_net()


@pytest.fixture(scope="module")
def model(net):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return export_onnx(net, (torch.zeros(SHAPE),))


def generated(n: int, seed: int = 1, shape=SHAPE, growth: float = 2.0):
    """``n`` normal inputs, one at a time, of growing scale (the ranges keep moving a while)."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        yield (rng.normal(size=shape) * (1 + growth * i / n)).astype(np.float32)


def test_a_streamed_plan_equals_the_plan_of_the_same_inputs_in_one_list(model):
    streamed_plan = fp16guard.calibrate(model, generated(1000))
    listed = fp16guard.calibrate(model, list(generated(1000)))
    assert streamed_plan.to_json() == listed.to_json()
    assert len(streamed_plan.calibration) == 1000 and streamed_plan.calibration[7] == "calibration input 7"
    assert streamed_plan.regions, "the plan scales the block that writes ~2e5"


def test_a_module_streamed_from_a_dataloader_gets_the_plan_of_the_list(net):
    data = list(generated(40))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.from_numpy(np.concatenate(data))),
                                         batch_size=1)  # batches [x] of shape [1, 3, 8, 8]: one input each
    assert streamed(loader) and DataSource(loader).length == 40
    plan = fp16guard.calibrate(net, loader)
    assert plan.to_json() == fp16guard.calibrate(net, data).to_json()
    assert plan.modules, "a PyTorch plan carries its per-module scales"


def test_npz_shards_folders_and_patterns_stream_as_the_files_load(model, tmp_path):
    paths = write_shards(generated(300), tmp_path / "shards", rows=64)
    assert [p.name for p in paths] == [f"shard-0000{k}.npz" for k in range(5)]
    source = DataSource(tmp_path / "shards")
    assert source.length == 300 and source.reiterable
    items = list(source)
    assert len(items) == 300 and items[65].label == "shard-00001.npz[1]" and items[65].arrays[0].shape == SHAPE
    np.testing.assert_array_equal(items[65].arrays[0], list(generated(300))[65])
    eager = load_inputs([str(tmp_path / "shards")])  # what every command's --input reads: one input per row
    assert [i.label for i in eager] == [i.label for i in items]
    plan = fp16guard.calibrate(model, str(tmp_path / "shards" / "*.npz"))  # a pattern, quoted
    assert plan.to_json() == fp16guard.calibrate(model, eager).to_json()
    with pytest.raises(InputError, match="no folder or .* matches this pattern"):
        DataSource(str(tmp_path / "none-*.npz"))


def test_each_rank_reads_its_own_shard_and_no_other_file(tmp_path):
    folder = tmp_path / "inputs"
    write_shards(generated(5), folder, rows=2, prefix="a")  # inputs 0-1, 2-3, 4
    np.save(folder / "b.npy", np.zeros(SHAPE, np.float32))  # input 5
    (folder / "c.npy").write_bytes(b"not numpy")  # input 6: only rank 0 of 2 reads it
    source = DataSource(folder)
    assert source.length == 7 and source.share(0, 2) == 4 and source.share(1, 2) == 3
    assert [i for i, _ in source.indexed(1, 2)] == [1, 3, 5]
    with pytest.raises(InputError, match="c.npy: not a readable numpy file"):
        list(source.indexed(0, 2))
    odd = DataSource(generated(7), what="x")
    assert [(i, item.label) for i, item in odd.indexed(1, 3)] == [(1, "x 1"), (4, "x 4")]


def test_the_early_stop_says_after_which_input_it_stopped(model, caplog):
    data = [np.random.default_rng(i).normal(size=SHAPE).astype(np.float32) for i in range(400)]
    with caplog.at_level(logging.WARNING, logger="fp16guard"):
        plan = fp16guard.calibrate(model, iter(data), early_stop=50)
    stopped = len(plan.calibration)
    assert 50 <= stopped < 400
    note = next(r.getMessage() for r in caplog.records if "early stop" in r.getMessage())
    assert f"stopped after input {stopped}" in note and "patience 50" in note
    assert plan.to_json() == fp16guard.calibrate(model, data[:stopped]).to_json()  # the plan of what it read


def test_the_range_watch_counts_inputs_since_a_power_of_two_last_moved():
    watch = RangeWatch(10)
    assert not watch.update({"a": 3.0}, 5)  # first look: a change at input 5
    assert not watch.update({"a": 3.9, "b": 0.0}, 5)  # 'b' is new: moved at input 10
    assert not watch.update({"a": 3.9, "b": 0.0}, 5)
    assert watch.update({"a": 2.5, "b": 0.0}, 5)  # 2**1 <= 2.5 < 2**2, as 3.9: unmoved for 10 inputs
    assert "inputs 11 to 20" in watch.note(100) and "stopped after input 20 of 100" in watch.note(100)
    assert (exponent(3.0), exponent(4.0), exponent(0.0), exponent(float("inf"))) == (2, 3, None, "inf")
    assert RangeWatch(None).update({"a": 1.0}, 10**6) is False


def test_a_graph_input_beyond_fp16_takes_a_second_pass_where_the_data_can_be_read_again():
    model = big_input_model()
    data = [np.random.default_rng(i).normal(size=(1, 3, 4, 4)).astype(np.float32) * 3e8 for i in range(6)]
    listed = fp16guard.calibrate(model, data)
    assert fp16guard.calibrate(model, DataSource(data)).to_json() == listed.to_json()
    with pytest.raises(FixError, match="a generator reads once"):
        fp16guard.calibrate(model, iter(data))


def test_a_streamed_inspection_equals_the_report_of_the_list(net, model):
    data = list(generated(30))
    assert inspect_stream(net, iter(data)).to_json() == run_torch(net, as_inputs(data)).to_json()
    blocks = inspect_stream(model, iter(data), block=7)  # each node's records merged over every input
    assert blocks.to_json() == inspect_stream(model, data).to_json()
    assert len(blocks.calls) == len({r.name for r in blocks.calls}) and blocks.overflow_found
    assert blocks.inputs == tuple(f"input {i}" for i in range(30))


def test_the_command_line_reads_patterns_and_shards_and_stops_early(model, tmp_path):
    import onnx

    onnx.save(model, tmp_path / "m.onnx")
    write_shards(generated(120, growth=0), tmp_path / "calib", rows=50)
    pattern = str(tmp_path / "calib" / "*.npz")
    assert main(["-q", "calibrate", str(tmp_path / "m.onnx"), "--input", pattern, "-o", str(tmp_path / "a.json")]) == 0
    assert main(["-q", "calibrate", str(tmp_path / "m.onnx"), "--input", pattern, "--stream",
                 "-o", str(tmp_path / "b.json")]) == 0
    a, b = (RewritePlan.load(tmp_path / name) for name in ("a.json", "b.json"))
    assert a.to_json() == b.to_json() and len(a.calibration) == 120
    assert main(["-q", "calibrate", str(tmp_path / "m.onnx"), "--input", pattern, "--early-stop", "20",
                 "-o", str(tmp_path / "c.json")]) == 0
    assert len(RewritePlan.load(tmp_path / "c.json").calibration) < 120
    assert main(["-q", "inspect", str(tmp_path / "m.onnx"), "--input", pattern, "--stream",
                 "--json", str(tmp_path / "r.json")]) == 1  # exit 1: the overflow is found


def _peak_bytes(run) -> int:
    """The peak of Python-traced memory (numpy's arrays included) while ``run()`` runs."""
    gc.collect()
    tracemalloc.start()
    try:
        run()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _flat(model, small: int, large: int) -> tuple[int, int, int]:
    """Peak bytes streaming ``small`` and ``large`` inputs of [1, 3, 16, 16], and the bytes of the
    ``large`` inputs themselves."""
    shape = (1, 3, 16, 16)
    fp16guard.calibrate(model, generated(4, shape=shape))  # warm: imports, first sessions
    peaks = [_peak_bytes(lambda n=n: fp16guard.calibrate(model, generated(n, shape=shape))) for n in (small, large)]
    return peaks[0], peaks[1], large * int(np.prod(shape)) * 4


@pytest.fixture(scope="module")
def model16(net):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return export_onnx(net, (torch.zeros(1, 3, 16, 16),))


def test_memory_stays_flat_as_the_stream_grows(model16):
    small, large, data = _flat(model16, 500, 2500)  # both past one block of 256
    # one label per input stays (the plan lists them): about 300 bytes each, against 3 KB of data
    assert large - small < 0.15 * data, (small, large, data)


@pytest.mark.slow
def test_ten_thousand_inputs_stream_in_flat_memory_to_the_plan_of_one_array(model16):
    """The issue's bar: 10,000 generated inputs, memory flat (1,000 against 10,000), the plan the
    same as the one from the same inputs in one list."""
    small, large, data = _flat(model16, 1000, 10000)
    assert large - small < 0.15 * data, (small, large, data)  # the labels: about 300 bytes per input
    shape = (1, 3, 16, 16)
    streamed_plan = fp16guard.calibrate(model16, generated(10000, shape=shape))
    assert streamed_plan.to_json() == fp16guard.calibrate(model16, list(generated(10000, shape=shape))).to_json()
