"""Fix the part of a model that can be captured: one submodule.

``fix_model(..., submodule="backbone")`` (``fp16guard fix --submodule backbone``) fixes one
submodule as its own model; when the whole model cannot be captured (a detector's data-dependent
post-processing: ``if scores.max() > t``, ``nonzero``, NMS) and no submodule is named, the largest
child submodule that can be captured is chosen (:func:`choose`).

The submodule is captured with the inputs it receives when the whole model runs in FP32 on the
calibration (and validation) inputs, recorded with forward pre-hooks on an internal copy
(:func:`~fp16guard.torch_graph.inference_copy`; the caller's model is never hooked). The fix
result says what stays FP32 (:class:`SubmoduleFix`), and holds the whole model with the submodule
replaced by its fixed FP16 program (:class:`FixedSubmodule`, FP32 in and out), verified end to end
against the FP32 model (:func:`finish`).
"""

from __future__ import annotations

import copy
import inspect
import math
import re
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from fp16guard.compare import Verification, VerifyRow, relative_l2
from fp16guard.errors import ExportError, FixError, UsageError, first_line
from fp16guard.inputs import NamedInput, torch_args
from fp16guard.torch_graph import inference_copy

#: How deep below the model the automatic choice looks: 1 its children, 2 their children too.
SEARCH_DEPTH = 2
#: The most captures the automatic choice tries before giving up.
SEARCH_LIMIT = 8

#: ``make(submodule, inputs, source) -> FixTarget``: the target of a submodule (raises ExportError).
MakeTarget = Callable[[torch.nn.Module, Sequence[NamedInput], str], object]


def parameter_count(module: torch.nn.Module) -> int:
    """Elements of a module's parameters (each shared parameter once)."""
    return sum(p.numel() for p in module.parameters())


def _params(n: int) -> str:
    """``no parameters``, ``1 parameter``, ``1,234 parameters``."""
    return "no parameters" if n == 0 else f"{n:,} parameter{'s' if n != 1 else ''}"


def _children(module: torch.nn.Module) -> str:
    """A module's children with their parameter counts, for an error."""
    return ", ".join(f"{name} ({_params(parameter_count(c))})" for name, c in module.named_children()) or "none"


def resolve(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """``model``'s submodule ``name`` (dotted).

    Raises:
        UsageError: no such submodule; the message names the children of the deepest module found.
    """
    parent, path = model, []
    for part in name.split("."):
        child = parent._modules.get(part) if part else None
        if child is None:
            where = f"{type(model).__name__}.{'.'.join(path)}" if path else type(model).__name__
            raise UsageError(f"submodule {name!r}: {where} has no submodule {part!r}; its children: "
                             f"{_children(parent)}")
        parent = child
        path.append(part)
    return parent


def whole_model_reason(error: BaseException | str) -> str:
    """Why the whole model was not captured, short: the capture's own failure out of the
    :class:`~fp16guard.errors.ExportError` message."""
    text = str(error)
    m = re.search(r"\((torch\.export: .*?)\)(?:; make|$)", text)
    return (m.group(1) if m else first_line(error) if isinstance(error, BaseException) else text)[:240]


@dataclass
class _Calls:
    """The calls of one hooked submodule during the FP32 runs."""

    inputs: list[NamedInput] = field(default_factory=list)  # kept ones only
    splits: list[str] = field(default_factory=list)
    count: int = 0  # calls, kept or not
    why_not: str = ""  # arguments fp16guard cannot feed a captured graph
    outputs: tuple | None = None  # (leaves of the first call's output, tree spec)


def _as_array(t: torch.Tensor) -> np.ndarray:
    """A tensor argument as numpy (bfloat16 as float32)."""
    t = t.detach().cpu()
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


def _signature(module: torch.nn.Module) -> inspect.Signature | None:
    """``module.forward``'s signature (None where Python cannot tell it)."""
    try:
        return inspect.signature(module.forward)
    except (TypeError, ValueError):
        return None


def _positional(signature: inspect.Signature | None, args: tuple, kwargs: dict) -> tuple | str:
    """A call's arguments as one positional tuple, or why they cannot be."""
    if signature is None:
        return tuple(args) if not kwargs else f"it is called with keyword arguments ({', '.join(kwargs)})"
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as e:
        return f"its call does not bind to its forward's signature ({e})"
    if bound.kwargs:
        return f"it is called with keyword-only arguments ({', '.join(bound.kwargs)})"
    return tuple(bound.args)


def _record(root: torch.nn.Module, names: Sequence[str], items: Sequence[NamedInput],
            splits: Sequence[str], keep: set[str] | None = None) -> tuple[dict[str, _Calls], list[list[np.ndarray]]]:
    """Run ``root`` (an internal copy) in FP32 on every item with forward hooks on the named
    submodules: how often each ran and whether on tensors, the inputs of each call of those in
    ``keep`` (None: all), and the whole model's outputs per item.

    Raises:
        Exception: whatever the model's forward raises.
    """
    calls = {name: _Calls() for name in names}
    state = {"label": "", "split": "", "count": {}}
    handles = []

    def pre_hook(name: str, module: torch.nn.Module):
        """A forward pre-hook for the copy's submodule ``name``: records the arguments it is called with."""
        signature = _signature(module)

        def hook(_module, args, kwargs):
            """Record one call's arguments as a NamedInput (tensors, positional)."""
            rec = calls[name]
            if rec.why_not:
                return
            bound = _positional(signature, args, kwargs)
            if isinstance(bound, str):
                rec.why_not = bound
                return
            bad = [k for k, a in enumerate(bound) if not isinstance(a, torch.Tensor)]
            if bad:
                rec.why_not = (f"its argument {bad[0]} is a {type(bound[bad[0]]).__name__}, not a tensor "
                               f"(a captured graph takes tensors)")
                return
            k = state["count"].get(name, 0)
            state["count"][name] = k + 1
            rec.count += 1
            if keep is not None and name not in keep:
                return
            label = state["label"] if k == 0 else f"{state['label']} (call {k + 1})"
            rec.inputs.append(NamedInput(label, tuple(_as_array(a) for a in bound)))
            rec.splits.append(state["split"])
        return hook

    def post_hook(name: str):
        """A forward hook for the copy's submodule ``name``: records its first output's structure."""
        def hook(_module, _args, output):
            """Keep the first call's output structure (to rebuild it from the fixed program's outputs)."""
            if calls[name].outputs is None:
                leaves, spec = tree_flatten(output)
                calls[name].outputs = ([torch.empty(0, dtype=leaf.dtype) if isinstance(leaf, torch.Tensor) else leaf
                                        for leaf in leaves], spec)
        return hook

    outputs = []
    try:
        for name in names:
            module = root.get_submodule(name)
            handles.append(module.register_forward_pre_hook(pre_hook(name, module), with_kwargs=True))
            handles.append(module.register_forward_hook(post_hook(name)))
        with torch.no_grad():
            for item, split in zip(items, splits):
                state.update(label=item.label, split=split, count={})
                out = root(*torch_args(item))
                outputs.append([t.detach().float().numpy() if t.is_floating_point() else t.detach().numpy()
                                for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)])
    finally:
        for h in handles:
            h.remove()
    return calls, outputs


@dataclass
class SubmoduleFix:
    """What a fix of one submodule left as it was, and how the whole model does with it.

    Attributes:
        name: the submodule's qualified name; ``model_name`` the whole model's class.
        parameters: parameter elements of the submodule; ``total`` of the whole model.
        rest: ``(qualified name, parameters, why)`` of the modules beside it that stay FP32 (the
            children of the model and of the submodule's ancestors, but not the ancestors); ``why``
            is ``data-dependent`` (or another capture failure) where the automatic choice found
            that module cannot be captured, else "".
        auto: chosen automatically because the whole model cannot be captured (``whole`` says why).
        tried: ``(name, why)`` of larger submodules the automatic choice could not capture.
        inputs: the submodule's inputs as recorded (calibration, then validation): what its fixed
            program takes (the target, captured with them, saves the ``.pt2``: ``FixResult.save``).
        calibration, validation: the same, split.
        end_to_end: the whole model with the fixed submodule (``FixResult.model``) against the FP32
            model, per input of the whole model (rel. L2 is inf where an output's shape changed:
            ``shape_changes`` lists those inputs).
    """

    name: str
    model_name: str
    parameters: int
    total: int
    rest: list[tuple[str, int, str]]
    auto: bool = False
    whole: str = ""
    tried: list[tuple[str, str]] = field(default_factory=list)
    calibration: list[NamedInput] = field(default_factory=list)
    validation: list[NamedInput] = field(default_factory=list)
    end_to_end: Verification | None = None
    shape_changes: list[str] = field(default_factory=list)
    target: object = field(default=None, repr=False)
    root: torch.nn.Module | None = field(default=None, repr=False)
    items: list[NamedInput] = field(default_factory=list, repr=False)
    splits: list[str] = field(default_factory=list, repr=False)
    references: list[list[np.ndarray]] = field(default_factory=list, repr=False)
    outputs: tuple | None = field(default=None, repr=False)

    @property
    def inputs(self) -> list[NamedInput]:
        """Calibration then validation inputs of the submodule."""
        return [*self.calibration, *self.validation]

    @property
    def share(self) -> float:
        """The submodule's share of the model's parameters."""
        return self.parameters / self.total if self.total else 1.0

    @property
    def flag(self) -> str:
        """The command-line option that fixes this submodule."""
        return f"--submodule {self.name}"

    def lines(self, done: str = "fixed") -> list[str]:
        """The report's lines: what was fixed (``done``: ``calibrated`` for a plan), what stays FP32
        and why, how to reproduce the choice, the end-to-end errors."""
        rest_params = self.total - self.parameters
        why = self.whole
        blamed = any(w for _, _, w in self.rest)
        parts = [f"{n} ({_params(p)}{'; ' + w if w else ''})" for n, p, w in self.rest]
        parts.append(f"{self.model_name}.forward's own code" + (f" ({_short(why)})" if why and not blamed else ""))
        out = [f"captured and {done} {self.name} ({self.share:.0%} of the parameters); the rest of the model, "
               f"{_params(rest_params)}, stays FP32: {', '.join(parts)}"]
        if self.auto:
            failed = "".join(f"; {n} cannot be captured either ({w[:120]})" for n, w in self.tried)
            out.append(f"chosen automatically, the largest submodule that captures ({self.model_name} as a whole "
                       f"cannot: {why[:200]}){failed}; to reproduce: {self.flag} (Python: submodule={self.name!r})")
        if self.end_to_end is not None:
            rows = ", ".join(f"{r.label} {'inf/NaN' if r.nonfinite else f'{r.rel_l2:.3g}'}"
                             for r in self.end_to_end.rows)
            out.append(f"end to end ({self.model_name} with the fixed {self.name}, result.model) against FP32, "
                       f"rel. L2 per input: {rows}")
            if self.shape_changes:
                out.append(f"an output's shape changed end to end on {', '.join(self.shape_changes)} (a data-"
                           f"dependent count, such as boxes above a score threshold, differs from FP32's)")
        return out

    def to_json(self) -> dict:
        """``{"name", "parameters", "total", "rest", "auto", "whole", "tried", "end_to_end"}``."""
        return {"name": self.name, "parameters": self.parameters, "total": self.total,
                "rest": [{"name": n, "parameters": p, "reason": w} for n, p, w in self.rest], "auto": self.auto,
                "whole": self.whole, "tried": [{"name": n, "reason": w} for n, w in self.tried],
                "end_to_end": self.end_to_end.to_json() if self.end_to_end else None,
                "shape_changes": self.shape_changes}


def _short(why: str) -> str:
    """A capture failure in a word where it is a data-dependent one."""
    return "data-dependent" if re.search(r"data.?dependent", why, re.I) else why[:120]


def _rest(root: torch.nn.Module, name: str) -> list[tuple[str, int, str]]:
    """The modules beside ``name`` that stay FP32: the children of the root and of each ancestor
    of ``name``, not on its path (``why`` empty)."""
    out, prefix, module = [], "", root
    for part in name.split("."):
        for child, m in module.named_children():
            if child != part:
                out.append((prefix + child, parameter_count(m), ""))
        module = module._modules[part]
        prefix += part + "."
    return out


#: The most modules beside the chosen one that the automatic choice tries to capture, to say why
#: they stay FP32 (post-processing: data-dependent).
BLAME_LIMIT = 4


def _blame(split: SubmoduleFix, calls: dict[str, _Calls], tried: dict[str, str]) -> None:
    """Say which modules beside the chosen one cannot be captured (and why): those the choice tried,
    and up to :data:`BLAME_LIMIT` others that ran on tensors, captured with ``torch.export`` here."""
    from fp16guard.torch_graph import capture

    out, budget = [], BLAME_LIMIT
    for n, p, _ in split.rest:
        why = tried.get(n, "")
        rec = calls.get(n)
        if not why and rec is not None and rec.count and not rec.why_not and budget > 0:
            budget -= 1
            kept = _record(split.root, [n], split.items, split.splits)[0][n]
            try:
                capture(split.root.get_submodule(n), [torch_args(i) for i in kept.inputs])
            except ExportError as e:
                why = whole_model_reason(e)
        out.append((n, p, _short(why) if why else ""))
    split.rest = out


def _split(root, name: str, rec: _Calls, target, items, splits, references, **kw) -> SubmoduleFix:
    """The :class:`SubmoduleFix` of a captured submodule."""
    cal = [i for i, s in zip(rec.inputs, rec.splits) if s == "calibration"]
    val = [i for i, s in zip(rec.inputs, rec.splits) if s != "calibration"]
    return SubmoduleFix(name, type(root).__name__, parameter_count(root.get_submodule(name)), parameter_count(root),
                        _rest(root, name), calibration=cal, validation=val, target=target, root=root,
                        items=list(items), splits=list(splits), references=references, outputs=rec.outputs, **kw)


def _no_calls(root, name: str) -> str:
    return f"submodule {name!r} of {type(root).__name__} never ran on the inputs given; nothing to capture"


def given(model: torch.nn.Module, items: Sequence[NamedInput], splits: Sequence[str], name: str, *,
          make: MakeTarget, source: str) -> SubmoduleFix:
    """The submodule the caller named, recorded and captured.

    Raises:
        UsageError: no such submodule. FixError: it never ran, or takes arguments that are not
            tensors. ExportError: it cannot be captured either. The model's own errors (an input it
            rejects) as :class:`~fp16guard.errors.InputError`.
    """
    from fp16guard.errors import InputError

    root = inference_copy(model)
    resolve(root, name)
    try:
        calls, references = _record(root, [name], items, splits)
    except (RuntimeError, ValueError, TypeError, IndexError) as e:
        raise InputError(f"{type(model).__name__} rejects the inputs when run whole in FP32 to record {name}'s "
                         f"inputs: {first_line(e)}") from None
    rec = calls[name]
    if rec.why_not:
        raise FixError(f"submodule {name!r} cannot be captured alone: {rec.why_not}")
    if not rec.inputs:
        raise FixError(_no_calls(root, name))
    target = make(root.get_submodule(name), rec.inputs, source)
    return _split(root, name, rec, target, items, splits, references)


def choose(model: torch.nn.Module, items: Sequence[NamedInput], splits: Sequence[str], *, make: MakeTarget,
           source: str, whole: ExportError) -> SubmoduleFix | None:
    """The largest submodule (by parameters; children, then their children: :data:`SEARCH_DEPTH`)
    that runs on the inputs and can be captured, for a model that cannot be captured whole
    (``whole``, its error); None when none can (or the model's FP32 forward itself fails)."""
    root = inference_copy(model)
    modules = {n: m for n, m in root.named_modules() if n and n.count(".") < SEARCH_DEPTH}
    sizes = {n: parameter_count(m) for n, m in modules.items()}
    if not any(sizes.values()):
        return None
    try:
        calls, references = _record(root, list(modules), items, splits, keep=set())
    except Exception:  # noqa: BLE001 - the model's own forward fails: the capture's error stands
        return None
    frontier = [n for n in modules if "." not in n and sizes[n] > 0]
    tried: list[tuple[str, str]] = []
    attempts = 0
    while frontier and attempts < SEARCH_LIMIT:
        frontier.sort(key=lambda n: -sizes[n])
        name = frontier.pop(0)
        rec = calls[name]
        deeper = [n for n in modules if n.startswith(name + ".") and n.count(".") == name.count(".") + 1
                  and sizes[n] > 0]
        if not rec.count or rec.why_not:
            if rec.why_not:
                tried.append((name, rec.why_not))
            frontier += deeper
            continue
        attempts += 1
        rec = _record(root, [name], items, splits)[0][name]  # its inputs, now (not every candidate's at once)
        try:
            target = make(root.get_submodule(name), rec.inputs, f"{source}.{name}")
        except ExportError as e:
            tried.append((name, whole_model_reason(e)))
            frontier += deeper
            continue
        split = _split(root, name, rec, target, items, splits, references, auto=True,
                       whole=whole_model_reason(whole), tried=tried)
        _blame(split, calls, dict(tried))
        return split
    return None


class FixedSubmodule(torch.nn.Module):
    """A fixed FP16 program in place of a submodule: takes and returns what the submodule did (FP32
    tensors, the same output structure), running the program on the backend it was verified on.

    Attributes:
        name: the submodule it replaces; ``fixed`` the program (``torch.fx.GraphModule`` or
            ``onnx.ModelProto``); ``backend`` where it runs.
    """

    def __init__(self, name: str, fixed, run: Callable[[NamedInput], list], original: torch.nn.Module,
                 outputs: tuple, backend: str):
        super().__init__()
        self.name = name
        object.__setattr__(self, "fixed", fixed)  # not a child module: .to()/.half() on the model leave it as fixed
        self._run = run
        self._signature = _signature(original)
        self._outputs = outputs
        self.backend = backend

    def extra_repr(self) -> str:
        """The submodule's name, the fixed program's type and the backend it was verified on."""
        return f"{self.name}: fixed FP16 program ({type(self.fixed).__name__}) on {self.backend}"

    def forward(self, *args, **kwargs):
        """Run the fixed program on the arguments; outputs on the first argument's device."""
        bound = _positional(self._signature, args, kwargs)
        if isinstance(bound, str):
            raise TypeError(f"{self.name}: {bound}")
        device = next((a.device for a in bound if isinstance(a, torch.Tensor)), torch.device("cpu"))
        results = iter(self._run(NamedInput(self.name, tuple(_as_array(a) for a in bound))))
        template, spec = self._outputs
        leaves = [torch.as_tensor(np.asarray(next(results))).to(device=device, dtype=leaf.dtype)
                  if isinstance(leaf, torch.Tensor) else leaf for leaf in template]
        return tree_unflatten(leaves, spec)


def finish(split: SubmoduleFix, result, backend):
    """``result`` (the submodule's :class:`~fp16guard.fixing.FixResult`, not changed) with the whole
    model with the fixed submodule (``model``), verified end to end against FP32 on the whole model's
    inputs (``submodule.end_to_end``): a new ``FixResult``."""
    what, run = split.target.runner(result.fixed, backend)
    model = copy.deepcopy(split.root)
    parent_name, _, child = split.name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, FixedSubmodule(split.name, result.fixed, run, split.root.get_submodule(split.name),
                                          split.outputs, what))
    rows, changed = [], []
    with torch.no_grad():
        for item, s, ref in zip(split.items, split.splits, split.references):
            out = [t.detach().float().numpy() if t.is_floating_point() else t.detach().numpy()
                   for t in tree_flatten(model(*torch_args(item)))[0] if isinstance(t, torch.Tensor)]
            if len(out) == len(ref) and all(np.shape(o) == np.shape(r) for o, r in zip(out, ref)):
                rows.append(VerifyRow.measure(item.label, s, out, ref))
            else:
                changed.append(item.label)
                rows.append(VerifyRow(item.label, s, relative_l2(out, ref) if len(out) == len(ref) else math.inf,
                                      math.inf, 0))
    split.end_to_end = Verification("end_to_end", what, rows)
    split.shape_changes = changed
    return replace(result, model=model, submodule=split)
