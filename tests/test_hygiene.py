"""Hygiene: no public entry point changes the user's model, in train, eval or mixed modes.

The rule: after ``FInspect``, ``check_module``, ``bisect``, ``calibrate``, ``fix_model`` (and
``run_torch``, the inspect command's runner) the model's state_dict is bit-identical (every tensor,
BatchNorm running statistics and ``num_batches_tracked`` included, the same tensor objects), every
submodule's ``training`` flag is what it was, and no hook or attribute is left, also when the
forward raises. Bisect, calibrate and fix measure an eval-mode copy, so a model in train or mixed
mode gives the eval-mode result.

``FInspect`` is measured differently: the user runs the forward inside the block, and a
BatchNorm in train mode updates its statistics there; the probe must add nothing to that, so the
model is compared with a twin that ran the same forward without the probe.

Bisect runs on :class:`CpuFp16`, PyTorch's FP16 kernels on the CPU (the ``torch`` backend's engine
without CUDA), and the ONNX listing of the offender's nodes is skipped (:func:`no_onnx_listing`):
no prefix is exported to ONNX, which keeps each case to about a second.
"""

from __future__ import annotations

import copy
import importlib

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.nn.modules import module as nn_module

from fp16guard import FInspect, check_module
from fp16guard.backends.base import Backend
from fp16guard.backends.torch_fp16 import TorchEngine
from fp16guard.bisection import bisect
from fp16guard.errors import BackendError, ExportError, InputError
from fp16guard.fixing import calibrate, fix_model
from fp16guard.inputs import as_inputs
from fp16guard.inspect import run_torch
from tests.models import Net, Raises, residual_input, residual_net

#: train; eval; root train with one BatchNorm in eval; root eval with one BatchNorm in train.
MODES = ("train", "eval", "train-root", "eval-root")


class CpuFp16(Backend):
    """Each prefix as an FP16 ``GraphModule`` on the CPU (PyTorch's FP16 CPU kernels)."""

    name = "cpu-fp16"

    def build_module(self, prefix, example_inputs):
        """An FP16 copy of ``prefix``."""
        self.builds += 1
        names = [n.name for n in prefix.graph.nodes if n.op == "placeholder"]
        outs = [f"out{i}" for i in range(len(next(n for n in prefix.graph.nodes if n.op == "output").args[0]))]
        return TorchEngine(copy.deepcopy(prefix).half(), names, outs, torch.device("cpu"))

    def _build(self, fp16_model):
        raise BackendError("cpu-fp16 runs PyTorch prefixes only")

    def describe(self) -> str:
        """One line."""
        return "cpu-fp16: prefix as an FP16 module on the CPU (tests)"


def in_mode(model: nn.Module, mode: str, bn: nn.Module) -> nn.Module:
    """``model`` in ``mode`` (:data:`MODES`); ``bn`` is the submodule the mixed modes set apart."""
    model.train(mode in ("train", "train-root"))
    if mode == "train-root":
        bn.eval()
    elif mode == "eval-root":
        bn.train()
    return model


def net(mode: str) -> Net:
    """:func:`residual_net` (BatchNorm2d everywhere, the last block overflows FP16) in ``mode``."""
    model = residual_net()
    return in_mode(model, mode, model.layer[1].norm1)


def raising(mode: str) -> Raises:
    """:class:`Raises` (its BatchNorm runs, then the forward raises) in ``mode``."""
    model = Raises()
    return in_mode(model, mode, model.bn)


def mode_sensitive() -> nn.Sequential:
    """A model blamed on a different module in train mode than in eval mode: BatchNorm ``1``
    (running mean -3e4, variance 0.01) writes ~3e5 on its running statistics and ~1 on the batch's;
    BatchNorm ``4`` (gamma 6e4, running variance 1e4) writes ~6e2 x its input on its running
    statistics and ~6e4 x a normalized value on the batch's, beyond 65504."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    with torch.no_grad():
        model[1].running_mean.fill_(-3e4)
        model[1].running_var.fill_(1e-2)
        model[4].weight.fill_(6e4)
        model[4].running_var.fill_(1e4)
    return model


def _x() -> np.ndarray:
    return residual_input(1)


def _hooks(m: nn.Module) -> dict:
    """Every hook dictionary of a module (``_forward_hooks``, ``_forward_pre_hooks``, ...), by name."""
    return {k: tuple(v) for k, v in vars(m).items() if "hook" in k and isinstance(v, dict)}


def _global_hooks() -> dict:
    return {k: tuple(v) for k, v in vars(nn_module).items() if k.startswith("_global") and isinstance(v, dict)}


def snapshot(model: nn.Module) -> dict:
    """Everything the rule promises: tensors (cloned, and their identities), flags, hooks, attributes."""
    kept = model.state_dict(keep_vars=True)
    return dict(
        state={k: v.detach().clone() for k, v in kept.items()},
        ids={k: id(v) for k, v in kept.items()},
        grad={k: v.requires_grad for k, v in kept.items()},
        training={name: m.training for name, m in model.named_modules()},
        hooks={name: _hooks(m) for name, m in model.named_modules()},
        attrs={name: set(vars(m)) for name, m in model.named_modules()},
        global_hooks=_global_hooks(),
    )


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def assert_unchanged(model: nn.Module, before: dict, state: dict | None = None) -> None:
    """``model`` is as ``before`` says; its tensors bit-identical to ``state`` if given (a twin's)."""
    after = snapshot(model)
    want = state if state is not None else before["state"]
    assert list(after["state"]) == list(want)
    for k, t in want.items():
        got = after["state"][k]
        assert (got.dtype, got.device, got.shape) == (t.dtype, t.device, t.shape), k
        assert torch.equal(_bits(got), _bits(t)), f"{k} changed"
    for key in ("ids", "grad", "training", "hooks", "attrs", "global_hooks"):
        assert after[key] == before[key], key


# -- inspect --------------------------------------------------------------------------------------

@pytest.mark.parametrize("ops", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_finspect_adds_nothing_to_the_forward(mode, ops):
    model = net(mode)
    before, twin = snapshot(model), copy.deepcopy(model)
    x = torch.from_numpy(_x())
    with torch.no_grad():
        twin(x)
    with torch.no_grad(), FInspect(model, ops=ops) as probe:
        model(x)
    assert probe.report().overflow_found
    assert_unchanged(model, before, snapshot(twin)["state"])


@pytest.mark.parametrize("mode", MODES)
def test_finspect_adds_nothing_when_the_forward_raises(mode):
    model = raising(mode)
    before, twin = snapshot(model), copy.deepcopy(model)
    x = torch.randn(4, 4, generator=torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError, match="boom"), torch.no_grad():
        twin(x)
    with pytest.raises(RuntimeError, match="boom"), torch.no_grad(), FInspect(model, ops=True):
        model(x)
    assert_unchanged(model, before, snapshot(twin)["state"])


@pytest.mark.parametrize("mode", MODES)
def test_check_module(mode):
    model = net(mode)
    before = snapshot(model)
    assert check_module(model)
    assert_unchanged(model, before)


@pytest.mark.parametrize("mode", MODES)
def test_run_torch_measures_an_eval_copy(mode):
    model = net(mode)
    before = snapshot(model)
    report = run_torch(model, as_inputs([_x()]))
    assert_unchanged(model, before)
    reference = run_torch(net("eval"), as_inputs([_x()]))
    assert [(c.name, c.outputs) for c in report.calls] == [(c.name, c.outputs) for c in reference.calls]


@pytest.mark.parametrize("mode", MODES)
def test_run_torch_when_the_forward_raises(mode):
    model = raising(mode)
    before = snapshot(model)
    with pytest.raises(InputError, match="boom"):
        run_torch(model, as_inputs([np.ones((4, 4), np.float32)]))
    assert_unchanged(model, before)


# -- bisect ---------------------------------------------------------------------------------------

@pytest.fixture
def no_onnx_listing(monkeypatch):
    """Bisect lists the offender's ONNX nodes from an ONNX export of the prefix graph (5 s here; a
    graph captured from the copy, not the caller's model): refused, so ``onnx_nodes`` is empty."""
    def refuse(module, args, *, dynamic_shapes=None, what="the model"):
        raise ExportError(f"cannot export {what} to ONNX (not in these tests)")

    monkeypatch.setattr(importlib.import_module("fp16guard.bisection.targets"), "export_onnx", refuse)


def _verdicts(result) -> tuple:
    """What a bisect found, without its timings."""
    return (result.offenders, result.candidates, result.tolerance, result.noise, result.noise_cut,
            [(t.stage, t.round, t.cut, t.last, t.error, t.bad) for t in result.trials])


@pytest.mark.usefixtures("no_onnx_listing")
@pytest.mark.parametrize("mode", MODES)
def test_bisect(mode):
    model = net(mode)
    before = snapshot(model)
    result = bisect(model, [_x()], backend=CpuFp16())
    assert [o.name for o in result.offenders] == ["layer.2.norm2"]  # where the eval-mode model is blamed
    assert_unchanged(model, before)


@pytest.mark.parametrize("mode", MODES)
def test_bisect_when_the_forward_raises(mode):
    model = raising(mode)
    before = snapshot(model)
    with pytest.raises(InputError, match="boom"):
        bisect(model, [np.ones((4, 4), np.float32)], backend=CpuFp16())
    assert_unchanged(model, before)


@pytest.mark.usefixtures("no_onnx_listing")
@pytest.mark.parametrize("mode", ["train", "train-root", "eval-root"])
def test_bisect_blames_what_it_blames_in_eval_mode(mode):
    """The offender (and every verdict) of a model in train or mixed mode is the eval-mode one, also
    for a model whose BatchNorms overflow in one mode and not the other."""
    x = np.random.default_rng(0).normal(size=(2, 3, 4, 4)).astype(np.float32)
    expected = bisect(mode_sensitive().eval(), [x], backend=CpuFp16())
    assert [o.name for o in expected.offenders] == ["1"]
    model = mode_sensitive()
    model = in_mode(model, mode, model[1])
    before = snapshot(model)
    assert _verdicts(bisect(model, [x], backend=CpuFp16())) == _verdicts(expected)
    assert_unchanged(model, before)


# -- calibrate and fix ----------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_calibrate(mode):
    model = net(mode)
    before = snapshot(model)
    plan = calibrate(model, [_x()])
    assert_unchanged(model, before)
    assert plan.to_json() == calibrate(net("eval"), [_x()]).to_json()


@pytest.mark.parametrize("mode", MODES)
def test_fix_model(mode):
    model = net(mode)
    before = snapshot(model)
    result = fix_model(model, [_x()], compare_fallback=False)
    assert result.verification.finite
    assert_unchanged(model, before)


def test_calibrate_through_onnx_in_mixed_mode():
    model = net("train-root")
    before = snapshot(model)
    calibrate(model, [_x()], graph="onnx")
    assert_unchanged(model, before)


@pytest.mark.parametrize("entry", [calibrate, fix_model])
@pytest.mark.parametrize("mode", MODES)
def test_calibrate_and_fix_when_the_forward_raises(entry, mode):
    model = raising(mode)
    before = snapshot(model)
    with pytest.raises(ExportError):
        entry(model, [np.ones((4, 4), np.float32)])
    assert_unchanged(model, before)


@pytest.mark.parametrize("entry", ["bisect", "calibrate", "fix_model"])
def test_the_users_hooks_do_not_fire_on_internal_copies(entry):
    """A forward hook and a pre-hook the user put on their model (each appends to a list) fire
    neither during bisect, calibrate, fix nor inspect's run: those run copies, which drop the user's
    hooks; the user's model keeps them, and they still fire on the user's own forward. A
    ``spectral_norm`` pre-hook, which recomputes the weight, stays on the copies (the next test).
    (``FInspect`` and inspect's ``run_torch`` run the user's own model, hooks and all.)"""
    model = net("eval")
    calls = []
    handles = [model.layer[0].register_forward_hook(lambda m, i, o: calls.append("forward")),
               model.register_forward_pre_hook(lambda m, i: calls.append("pre"))]
    before = _hooks(model.layer[0])
    x = _x()
    if entry == "bisect":
        bisect(model, [x], backend=CpuFp16(), refine=False)
    elif entry == "calibrate":
        calibrate(model, [x])
    else:
        fix_model(model, [x], output="torch")
    assert calls == []
    assert _hooks(model.layer[0]) == before
    model(torch.from_numpy(x))
    assert calls == ["pre", "forward"]
    for h in handles:
        h.remove()


def test_a_spectral_norm_hook_stays_on_the_copy():
    """``torch.nn.utils.spectral_norm`` recomputes ``weight`` from ``weight_orig`` in a forward
    pre-hook: the copy keeps that hook (its output is the original's) and drops the user's."""
    from fp16guard.torch_graph import inference_copy

    torch.manual_seed(0)
    lin = torch.nn.utils.spectral_norm(nn.Linear(4, 4)).eval()
    lin.register_forward_hook(lambda m, i, o: o * 0)
    copied = inference_copy(lin)
    assert len(copied._forward_pre_hooks) == 1 and not copied._forward_hooks
    reference = copy.deepcopy(lin)
    reference._forward_hooks.clear()
    x = torch.ones(1, 4)
    with torch.no_grad():
        expected = reference(x)  # weight_orig / its largest singular value
        unnormalized = torch.nn.functional.linear(x, lin.weight_orig, lin.bias)
        assert torch.equal(copied(x), expected) and not torch.allclose(expected, unnormalized, atol=1e-3)
