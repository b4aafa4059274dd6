"""FInspect.run: batches of one input signature merged call by call (CPU; the CUDA-graph replay of
the same logic is checked value for value in tests/test_gpu.py)."""

import copy
import logging

import pytest
import torch
import torch.nn as nn

from fp16guard import FInspect
from fp16guard.inspect.replay import describe_signature, input_signature
from fp16guard.inspect.store import StatsStore
from tests.models import Overflowing, Scale, residual_net
from tests.replay_cases import as_rows, batches, eager_reports, merged


def test_batches_of_one_shape_merge_into_one_record_per_call_equal_to_the_eager_records_merged():
    model = residual_net()
    xs = batches((2, 3, 16, 16), [1.0, 30.0, 0.01, 3.0])  # amax and underflow differ per batch
    with torch.no_grad(), FInspect(model) as probe:
        outs = [probe.run(x) for x in xs]
    report = probe.report()
    expected = merged(eager_reports(model, xs))
    assert as_rows(report.calls) == expected
    assert len(report.calls) == len(expected) == len(eager_reports(model, xs[:1])[0].calls)  # not 4x
    # merged numbers are real merges: the largest batch sets amax, counts add up over 4 batches
    stem = next(r for r in report.calls if r.name == "stem")
    assert stem.inputs.numel == 4 * 2 * 3 * 16 * 16
    assert stem.inputs.amax == pytest.approx(max(float(x.abs().max()) for x in xs))
    assert report.mode == "eager: 4 forwards (no CUDA graph: the model runs on cpu, and CUDA graphs need CUDA)"
    with torch.no_grad():
        for x, out in zip(xs, outs):
            torch.testing.assert_close(out, model(x), rtol=0, atol=0)


def test_each_input_shape_gets_its_own_records_in_the_order_first_seen():
    model = residual_net()
    small, big = batches((1, 3, 16, 16), [1, 2]), batches((2, 3, 8, 8), [5, 0.5], seed=1)
    with torch.no_grad(), FInspect(model) as probe:
        for x in (small[0], big[0], small[1], big[1]):
            probe.run(x)
    report = probe.report()
    expected = merged(eager_reports(model, small)) + merged(eager_reports(model, big))
    assert as_rows(report.calls) == expected
    assert [r.call for r in report.calls if r.name == "stem"] == [0, 1]
    assert [r.index for r in report.calls] == list(range(len(report.calls)))
    assert probe.mode.startswith("eager: 4 forwards")


class Branchy(nn.Module):
    """Takes ``big`` when the batch's mean is positive: the path depends on the data."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Linear(4, 4)
        self.big = Scale(1e5)
        self.small = Scale(0.5)

    def forward(self, x):
        y = self.stem(x)
        return self.big(y) if x.mean() > 0 else self.small(y)


def test_a_batch_that_takes_another_path_keeps_its_own_records_and_nothing_is_lost():
    model = Branchy().eval()
    xs = [torch.full((2, 4), 1.0), torch.full((2, 4), -1.0), torch.full((2, 4), 2.0)]
    with torch.no_grad(), FInspect(model) as probe:
        for x in xs:
            probe.run(x)
    report = probe.report()
    # batch 0 and 2 merged (same path), batch 1 on its own after them
    assert [r.name for r in report.calls] == ["stem", "big", "", "stem", "small", ""]
    eager = eager_reports(model, xs)
    assert as_rows(report.calls[:3]) == merged([eager[0], eager[2]])
    assert as_rows(report.calls[3:]) == as_rows(eager[1].calls)
    assert report.first_nonfinite() is None and {r.name for r in report.transitions()} == {"big", ""}
    assert probe.mode.startswith("eager: 3 forwards")


def test_ops_view_records_merge_too():
    model = Overflowing().eval()
    xs = batches((3, 8), [1, 4, 0.5])
    with torch.no_grad(), FInspect(model, ops=True) as probe:
        for x in xs:
            probe.run(x)
    report = probe.report()
    eager = eager_reports(model, xs, ops=True)
    assert as_rows(report.ops) == merged(eager, "ops") and len(report.ops) == len(eager[0].ops)
    assert as_rows(report.calls) == merged(eager)


def test_model_calls_and_run_batches_share_one_report():
    model = Overflowing().eval()
    a, b, c = batches((3, 8), [1, 2, 3])
    with torch.no_grad(), FInspect(model) as probe:
        model(a)
        probe.run(b)
        probe.run(c)
    report = probe.report()
    eager = eager_reports(model, [a, b, c])
    assert as_rows(report.calls) == as_rows(eager[0].calls) + merged(eager[1:])
    assert [r.call for r in report.calls if r.name == "up"] == [0, 1]
    assert report.mode.startswith("eager: 3 forwards")


def test_explicit_cuda_graph_on_the_cpu_runs_eagerly_with_one_warning(caplog):
    model = Overflowing().eval()
    with caplog.at_level(logging.INFO, logger="fp16guard"), torch.no_grad(), \
            FInspect(model, cuda_graph=True) as probe:
        for x in batches((3, 8), [1, 2, 3, 4]):
            probe.run(x)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "CUDA graphs need CUDA" in warnings[0].getMessage()
    assert probe.report().mode.startswith("eager: 4 forwards (no CUDA graph: the model runs on cpu")


def test_cuda_graph_false_says_nothing_about_graphs():
    model = Overflowing().eval()
    with torch.no_grad(), FInspect(model, cuda_graph=False) as probe:
        for x in batches((3, 8), [1, 2]):
            probe.run(x)
    assert probe.mode == "eager: 2 forwards"


def test_run_outside_the_block_is_refused():
    probe = FInspect(Overflowing())
    with pytest.raises(RuntimeError, match="inside `with FInspect"):
        probe.run(torch.zeros(1, 8))


def test_run_leaves_the_model_as_it_was():
    model = residual_net().train()
    before = copy.deepcopy(model.state_dict())
    with FInspect(model) as probe:
        for x in batches((2, 3, 16, 16), [1, 2, 3]):
            probe.run(x)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) is False  # train mode updates BN
    model = residual_net()
    before = copy.deepcopy(model.state_dict())
    with torch.no_grad(), FInspect(model) as probe:
        for x in batches((2, 3, 16, 16), [1, 2, 3]):
            probe.run(x)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_input_signature_keys_shapes_dtypes_and_values():
    x = torch.zeros(2, 3)
    assert input_signature((x,), {}) == input_signature((torch.ones(2, 3),), {})
    assert input_signature((x,), {}) != input_signature((torch.zeros(3, 2),), {})
    assert input_signature((x,), {}) != input_signature((x.half(),), {})
    assert input_signature((x,), {"scale": 2}) != input_signature((x,), {"scale": 3})
    assert input_signature((x.t(),), {}) != input_signature((torch.zeros(3, 2),), {})  # strides
    assert input_signature((x, [1, 2]), {}) is not None
    assert input_signature((x, {"a": [1]}), {}) == input_signature((x, {"a": [1]}), {})
    assert describe_signature((x,), {"m": torch.zeros(2, dtype=torch.int64)}) == "[2, 3] float32, [2] int64"


def test_unhashable_arguments_run_as_plain_forwards():
    class TakesConfig(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def forward(self, x, config):
            return self.lin(x) * config.scale

    class Config:
        __hash__ = None

        def __init__(self, scale):
            self.scale = scale

    model = TakesConfig().eval()
    with torch.no_grad(), FInspect(model) as probe:
        for s in (1.0, 2.0):
            probe.run(torch.ones(1, 2), Config(s))
    assert [r.name for r in probe.report().calls] == ["lin", "", "lin", ""]


def test_store_device_rows_follow_row_order_across_blocks():
    store = StatsStore(fused=False)
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(5, generator=g) * 10 ** k for k in range(-6, 6)]
    for t in tensors[:5]:
        store.measure(t)
    store.flush()  # a first block
    for t in tensors[5:]:
        store.measure(t)
    rows = store.device_rows()
    assert rows.shape == (12, 5) and rows.dtype == torch.float64
    assert [tuple(r) for r in rows.tolist()] == store.read()
    store.clear()
    assert store.device_rows() is None and store.read() == []


def test_run_torch_merges_inputs_of_one_shape_and_the_report_says_how_it_ran(tmp_path):
    from fp16guard.inputs import NamedInput
    from fp16guard.inspect import run_torch

    model = residual_net()
    xs = batches((1, 3, 16, 16), [1, 2, 3])
    inputs = [NamedInput(f"x{i}.npy", (x.numpy(),)) for i, x in enumerate(xs)]
    report = run_torch(model, inputs)
    assert as_rows(report.calls) == merged(eager_reports(model, xs))
    assert report.inputs == ("x0.npy", "x1.npy", "x2.npy")
    doc = report.to_json()
    assert doc["mode"] == report.mode == (
        "eager: 3 forwards (no CUDA graph: the model runs on cpu, and CUDA graphs need CUDA)")
    assert doc["summary"]["calls"] == len(eager_reports(model, xs[:1])[0].calls)


def _record(model, x, mode):
    """The signature record of one eager forward of ``model`` under ``mode`` (CPU: no graph)."""
    with mode(), FInspect(model, static=False) as probe:
        probe.run(x)
    (record,) = probe._signatures.values()
    return record


def test_row_map_pairs_the_fresh_rows_of_inference_mode_with_the_shared_rows_of_no_grad():
    """Under inference mode every tensor is measured afresh (no version counter); under no_grad a
    module's output read again as the next one's input keeps its row. ``row_map`` pairs them, and
    the paired rows hold the same numbers value for value."""
    from fp16guard.inspect.replay import row_map

    model = residual_net()
    x = batches((2, 3, 16, 16), [3.0])[0]
    fresh = _record(model, x.clone(), torch.inference_mode)
    shared = _record(model, x.clone(), torch.no_grad)
    assert len(shared.numel) < len(fresh.numel)  # rows shared under no_grad
    mapping = row_map(fresh.structure, shared.structure)
    assert mapping is not None and len(mapping) == len(fresh.numel) and set(mapping) == set(range(len(shared.numel)))
    fresh_host, _ = fresh.host_rows()
    shared_host, _ = shared.host_rows()
    assert [shared_host[m] for m in mapping] == fresh_host
    assert row_map(fresh.structure, fresh.structure) == list(range(len(fresh.numel)))


def test_row_map_refuses_forwards_through_other_calls_or_sizes():
    from fp16guard.inspect.replay import row_map

    model = residual_net()
    x = batches((2, 3, 16, 16), [3.0])[0]
    full = _record(model, x, torch.no_grad)
    other_size = _record(model, batches((1, 3, 16, 16), [3.0])[0], torch.no_grad)
    layer = _record(model.layer, torch.randn(2, 8, 16, 16), torch.no_grad)
    assert row_map(full.structure, other_size.structure) is None  # same calls, other sizes
    assert row_map(full.structure, layer.structure) is None  # other calls
    calls, ops, numel = full.structure
    assert row_map(full.structure, (calls, (("op", "aten", (0,), (1,)),), numel)) is None  # op rows


def test_batches_run_inside_and_outside_inference_mode_merge_into_one_record():
    """The merged rows are a normal tensor, whatever mode the first batch ran in: a later batch
    folds into them in place outside ``torch.inference_mode()`` too (one Linear: the same rows
    in both modes, so the batches merge)."""
    torch.manual_seed(0)
    model = nn.Linear(16, 8).eval()
    xs = [torch.randn(4, 16) * s for s in (1.0, 30.0, 0.01)]
    with FInspect(model) as probe:
        with torch.inference_mode():
            probe.run(xs[0])
        with torch.no_grad():
            probe.run(xs[1])
            probe.run(xs[2])
    assert probe.mode.startswith("eager: 3 forwards")
    assert len(probe._signatures) == 1
    assert as_rows(probe.report().calls) == merged(eager_reports(model, xs))


class _SelfAttentionBlock(nn.Module):
    """LayerNorm, then ``attn(y, y, y)``: one tensor passed three times to one call."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(32)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)

    def forward(self, x):
        y = self.norm(x)
        return x + self.attn(y, y, y, need_weights=False)[0]


def test_a_tensor_passed_three_times_counts_once_in_inference_mode_as_under_no_grad():
    """Inference tensors get a row per measurement (no version counter); the same tensor passed
    as query, key and value still counts once, so both modes report the same numbers and their
    rows map onto each other."""
    from fp16guard.inspect.replay import row_map

    torch.manual_seed(0)
    model = nn.Sequential(_SelfAttentionBlock(), _SelfAttentionBlock()).eval()
    x = torch.randn(2, 5, 32)
    fresh = _record(model, x.clone(), torch.inference_mode)
    shared = _record(model, x.clone(), torch.no_grad)
    attn = [c for c in fresh.calls if c.kind == "MultiheadAttention"]
    assert len(attn) == 2 and all(len(c.inputs) == 1 for c in attn)
    assert row_map(fresh.structure, shared.structure) is not None
    with torch.inference_mode(), FInspect(model, static=False) as probe:
        model(x.clone())
    assert as_rows(probe.report().calls) == as_rows(eager_reports(model, [x])[0].calls)
