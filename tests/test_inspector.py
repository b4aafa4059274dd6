import copy

import pytest
import torch
import torch.nn as nn

from fp16guard import FInspect
from tests.models import Functional, Overflowing, Raises, Structured


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, dict(vars(model)), {
        name: (dict(m._forward_hooks), dict(m._forward_pre_hooks), set(vars(m))) for name, m in model.named_modules()
    }


def assert_untouched(model, before):
    state, attrs, hooks = before
    after_state = model.state_dict()
    assert state.keys() == after_state.keys()
    for k in state:
        assert torch.equal(state[k], after_state[k]) and state[k].dtype == after_state[k].dtype, k
    for name, m in model.named_modules():
        assert not m._forward_hooks and not m._forward_pre_hooks, name
        assert set(vars(m)) == hooks[name][2], name


def run(model, x, **kw):
    with torch.no_grad(), FInspect(model, **kw) as probe:
        model(x)
    return probe.report()


def test_from_and_to_flags_name_the_modules():
    torch.manual_seed(0)
    model = Overflowing().eval()
    report = run(model, torch.randn(16, 8))
    flags = {(r.transition, r.name) for r in report.transitions()}
    assert flags == {("from", "up"), ("to", "down")}
    up = next(r for r in report.calls if r.name == "up")
    assert up.inputs.amax < 10 and up.outputs.amax > 65504
    assert report.overflow_found
    assert [f.rule for f in report.findings()][:2] == ["overflow_from", "overflow_to"]


def test_inplace_relu_input_is_measured_before_it_is_overwritten():
    torch.manual_seed(0)
    model = Overflowing().eval()
    x = torch.randn(16, 8)
    report = run(model, x)
    act = next(r for r in report.calls if r.name == "act")
    pre = model.up(model.stem(x))
    assert act.inputs.amax == pytest.approx(pre.abs().max().item())
    assert act.outputs.amax == pytest.approx(pre.relu().max().item())
    # the input's negatives were counted before the in-place ReLU zeroed them
    assert act.inputs.nonzero == pre.numel()
    assert act.outputs.nonzero == int((pre > 0).sum()) < pre.numel()


def test_fp16_model_gives_the_origin_of_inf():
    torch.manual_seed(0)
    model = Overflowing().eval().half()
    report = run(model, torch.randn(16, 8).half())
    first = report.first_nonfinite()
    assert first is not None and first.name == "up"
    assert first.outputs.nonfinite > 0 and first.inputs.nonfinite == 0


def test_op_view_sees_functional_overflow():
    torch.manual_seed(0)
    model = Functional().eval()
    report = run(model, torch.randn(8, 4) * 10, ops=True)
    assert report.transitions() == []  # invisible to module hooks
    ops = report.transitions(level="ops")
    assert [(r.transition, r.kind, r.scope) for r in ops] == [("from", "mul", ""), ("to", "div", "")]
    assert any(r.kind == "addmm" and r.scope == "a" for r in report.ops)


def test_walks_namedtuple_dict_and_dataclass_outputs():
    report = run(Structured().eval(), torch.randn(2, 4))
    root = next(r for r in report.calls if r.name == "")
    lin = next(r for r in report.calls if r.name == "lin")
    assert root.outputs.amax == pytest.approx(max(3e5, lin.outputs.amax * 1e6))
    assert root.outputs.numel == 3 * 8  # y (twice, counted once), y * 1e6, the 3e5 tensor
    assert root.transition == "from"


def test_model_untouched_after_clean_exit_and_with_op_view():
    torch.manual_seed(0)
    model = Overflowing().eval()
    before = snapshot(model)
    run(model, torch.randn(4, 8), ops=True)
    assert_untouched(model, before)


def test_hooks_removed_when_forward_raises_in_train_mode():
    model = Raises().train()
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        with torch.no_grad(), FInspect(model, ops=True):
            model(torch.randn(4, 4))
    for name, m in model.named_modules():
        assert not m._forward_hooks and not m._forward_pre_hooks, name
        assert set(vars(m)) == before[2][name][2]
    assert torch.equal(model.lin.weight, before[0]["lin.weight"])


def test_state_dict_bit_identical_in_eval_mode_when_forward_raises():
    model = Raises().eval()
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        with FInspect(model):
            model(torch.randn(4, 4))
    assert_untouched(model, before)


def test_no_state_shared_between_instances_and_nesting():
    torch.manual_seed(0)
    model = Overflowing().eval()
    other = nn.Sequential(nn.Linear(3, 3))
    with FInspect(model) as outer:
        with FInspect(other) as inner:
            other(torch.randn(1, 3))
        model(torch.randn(2, 8))
    assert {r.name for r in inner.report().calls} == {"", "0"}
    assert "up" in {r.name for r in outer.report().calls}
    assert "0" not in {r.name for r in outer.report().calls}


def test_same_probe_re_enters_and_counts_calls():
    torch.manual_seed(0)
    model = Overflowing().eval()
    probe = FInspect(model)
    with probe:
        with probe:  # re-entrant: hooks are installed once
            model(torch.randn(2, 8))
        model(torch.randn(2, 8))
    assert not model.up._forward_hooks
    ups = [r for r in probe.report().calls if r.name == "up"]
    assert [r.call for r in ups] == [0, 1]
    layer = next(s for s in probe.report().layers() if s.name == "up")
    assert layer.calls == 2


def test_report_before_any_forward_is_an_error():
    with FInspect(nn.Linear(2, 2)) as probe:
        pass
    with pytest.raises(RuntimeError, match="recorded nothing"):
        probe.report()


def test_rejects_non_module():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        FInspect(lambda x: x)


def test_inference_mode_tensors_are_measured():
    torch.manual_seed(0)
    model = Overflowing().eval()
    with torch.inference_mode(), FInspect(model) as probe:
        model(torch.randn(4, 8))
    assert {(r.transition, r.name) for r in probe.report().transitions()} == {("from", "up"), ("to", "down")}


def test_stats_stay_on_device_until_report():
    torch.manual_seed(0)
    model = Overflowing().eval()
    with FInspect(model) as probe:
        model(torch.randn(4, 8))
    blocks = probe._main.store._blocks
    assert blocks and all(isinstance(b, torch.Tensor) and b.shape[1] == 5 for _, b, _ in blocks)


@pytest.mark.gpu
def test_no_host_sync_in_hooks_on_cuda():
    torch.manual_seed(0)
    model = copy.deepcopy(Overflowing()).cuda().eval()
    x = torch.randn(64, 8, device="cuda")
    with torch.no_grad(), FInspect(model) as probe:
        model(x)  # warm-up: compiles the fused reduction
        torch.cuda.set_sync_debug_mode("error")
        try:
            model(x)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert {(r.transition, r.name) for r in probe.report().transitions()} == {("from", "up"), ("to", "down")}
