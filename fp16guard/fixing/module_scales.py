"""A PyTorch plan seen per module: which modules receive or return scaled activations.

A ``framework="torch"`` plan (:func:`fp16guard.fixing.calibrate`) names fx nodes of the
model's ``torch.export`` graph. Rewriters that patch module ``forward`` functions (the mmdeploy
rewriters in :mod:`fp16guard.rewriters`) need the same decision per *module*: "the output of
``backbone.layer4.1`` is stored as true / 2^k" and "``neck.reduce_conv_c5`` receives its input
stored as true / 2^k". :func:`module_scales` derives that from the plan and the graph: a module's
output is the last node traced inside it, its input the activations its first nodes read from
outside it (``nn_module_stack`` metadata).

A :class:`ModuleScale` also carries a fingerprint of the module's parameters and buffers, so a
rewriter that only sees the module instance (mmdeploy passes ``self``, not its qualified name)
finds its entry without any global state, and a plan made for other weights never matches.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterable, Mapping, Sequence

import torch

from fp16guard.errors import PlanError
from fp16guard.plan import RewritePlan
from fp16guard.torch_graph import state_dict_sha256


@dataclass(frozen=True)
class ModuleScale:
    """The scale exponents at one module's boundary.

    Attributes:
        module: qualified name in the calibrated model (``backbone.layer4.1``).
        type: the module's class name (``BasicBlock``).
        fingerprint: :func:`module_fingerprint` of the module.
        input_exponent: its (first) input arrives stored as ``true * 2**-input_exponent``.
        output_exponent: it must return ``true * 2**-output_exponent``.
        inner_exponent: an attention module's queries, keys and values are stored with it (the
            exponent of its ``scaled_dot_product_attention``'s ``v``); 0 elsewhere.
        input_amax: the calibration amax of its (first) input, true values (0: not measured);
            a LayerNorm rewriter reads it to keep ``(x - mean)**2`` in range when an exporter
            decomposes the norm.
    """

    module: str
    type: str
    fingerprint: str
    input_exponent: int
    output_exponent: int
    inner_exponent: int = 0
    input_amax: float = 0.0

    def to_json(self) -> dict:
        """As a JSON object."""
        return asdict(self)


def module_fingerprint(module: torch.nn.Module) -> str:
    """The module's :func:`~fp16guard.torch_graph.state_dict_sha256`, cut to 16 hex digits."""
    return state_dict_sha256(module)[:16]


def module_scales(model: torch.nn.Module, plan: RewritePlan, examples: Sequence[Sequence[torch.Tensor]], *,
                  types: Iterable[str] | None = None, captured=None,
                  amax: Mapping[str, float] | None = None) -> list[ModuleScale]:
    """Modules of ``model`` whose input or output the plan stores scaled.

    Args:
        model: the module the plan was calibrated on (captured again with ``torch.export``; not
            modified).
        plan: a ``framework="torch"`` plan of ``model``.
        examples: argument tuples, as for calibration (capture only).
        types: only modules of these class names (default: every module).
        captured: ``capture(model, examples)`` if the caller has it (an export saved).
        amax: calibration amax per plan value (fills ``input_amax``; a LayerNorm whose stored
            input exceeds ``2**7`` is listed even with both exponents 0).

    Returns:
        :class:`ModuleScale` entries for modules with a nonzero input or output exponent, in
        execution order; then the BatchNorms the plan folded into a scaled conv (they read and
        write the conv's output exponent when they run unfolded).

    Raises:
        ValueError: the plan is not a PyTorch plan.
    """
    from fp16guard.fixing.torch_pass import fold_batchnorms
    from fp16guard.torch_graph import capture, module_paths

    if plan.framework != "torch":
        raise ValueError(f"module scales need a PyTorch plan (calibrate the nn.Module), not a {plan.framework} plan")
    raw = captured if captured is not None else capture(model, examples)
    gm = fold_batchnorms(raw)[0]  # the graph the plan names (deterministic: the same node names)
    exponents = plan.exponents
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    inside: dict[str, list] = {}
    for n in nodes:
        for path in module_paths(n):
            inside.setdefault(path, []).append(n)
    modules = dict(model.named_modules())
    wanted = set(types) if types is not None else None
    out = []
    for path, members in inside.items():
        mod = modules.get(path)
        if mod is None or (wanted is not None and type(mod).__name__ not in wanted):
            continue
        names = {n.name for n in members}
        first_inputs = [a for n in members for a in n.all_input_nodes
                        if a.name not in names and a.op != "get_attr"]
        e_in = exponents.get(first_inputs[0].name, 0) if first_inputs else 0
        e_out = exponents.get(members[-1].name, 0)
        a_in = float((amax or {}).get(first_inputs[0].name, 0.0)) if first_inputs else 0.0
        inner = [exponents.get(n.args[2].name, 0) for n in members
                 if "scaled_dot_product_attention" in str(n.target) and isinstance(n.args[2], torch.fx.Node)]
        wide_norm = isinstance(mod, torch.nn.LayerNorm) and norm_input_shift(a_in, e_in) > 0
        if e_in or e_out or any(inner) or wide_norm:
            out.append(ModuleScale(path, type(mod).__name__, module_fingerprint(mod), int(e_in), int(e_out),
                                   int(inner[0]) if inner else 0, a_in))
    # a BatchNorm folded into the conv before it has no node in the plan's graph: unfolded, it
    # runs on the conv's output, so it reads and writes the exponent of the folded conv
    kept = {n.name for n in gm.graph.nodes}
    for n in raw.graph.nodes:
        target = str(getattr(n.target, "overloadpacket", n.target))
        if "batch_norm" not in target or n.name in kept or not n.all_input_nodes:
            continue
        e = exponents.get(n.all_input_nodes[0].name, 0)
        paths = module_paths(n)
        mod = modules.get(paths[-1]) if paths else None
        if e and mod is not None and (wanted is None or type(mod).__name__ in wanted):
            out.append(ModuleScale(paths[-1], type(mod).__name__, module_fingerprint(mod), int(e), int(e)))
    return out + _unscaled_twins(out, modules, inside)


def _unscaled_twins(scaled: list[ModuleScale], modules: Mapping[str, torch.nn.Module],
                    inside: Mapping[str, list]) -> list[ModuleScale]:
    """Entries ``(0, 0)`` for the modules the plan leaves unscaled whose weights equal a scaled
    one's (LayerNorms still at ones and zeros): a rewriter that matches by fingerprint must not give
    them their twin's exponents, so the table sees the twins disagree and tells them apart by name."""
    listed = {m.module for m in scaled}
    prints = {m.fingerprint for m in scaled}
    out = []
    for path in inside:
        mod = modules.get(path)
        if path in listed or mod is None or not mod.state_dict():
            continue
        fingerprint = module_fingerprint(mod)
        if fingerprint in prints:
            out.append(ModuleScale(path, type(mod).__name__, fingerprint, 0, 0))
    return out


#: A decomposed LayerNorm squares ``x - mean``: stored inputs above ``2**NORM_INPUT_LOG2`` are
#: shifted down to it first (``256**2`` is already inf in FP16).
NORM_INPUT_LOG2 = 7


def norm_input_shift(input_amax: float, input_exponent: int) -> int:
    """The power of two a LayerNorm rewriter divides its stored input by, so that ``(x - mean)**2``
    fits FP16 when an exporter decomposes the norm: 0 unless the stored amax (``input_amax *
    2**-input_exponent``) exceeds ``2**NORM_INPUT_LOG2``."""
    stored = input_amax * 2.0 ** -input_exponent
    return max(0, math.ceil(math.log2(stored)) - NORM_INPUT_LOG2) if stored > 0 else 0


def _decision(entry: ModuleScale) -> tuple:
    """What a rewriter does with an entry: its exponents, and the shift of a norm's input."""
    return (entry.input_exponent, entry.output_exponent, entry.inner_exponent,
            norm_input_shift(entry.input_amax, entry.input_exponent))


class ScaleTable:
    """Module scales looked up by module instance: by qualified name plus fingerprint.

    A rewriter sees only the module instance (mmdeploy passes ``self``). The table finds its
    entry by :func:`module_fingerprint`; when several entries share a fingerprint (modules with
    identical weights, e.g. freshly initialised twins) and disagree on their exponents, it tells
    them apart by qualified name, which needs the root module (:meth:`bind`, or ``model=``), and
    otherwise refuses to guess (:class:`~fp16guard.errors.PlanError`). Entries that agree are
    interchangeable.

    Modules without parameters or buffers (ReLU, pooling) have no fingerprint and are never
    found: their exponents follow from their neighbours. A table remembers each module it has
    looked up (a fingerprint hashes all of its weights), so it is meant for one export, during
    which the weights do not change.

    Args:
        entries: :class:`ModuleScale` items (a plan's ``modules``).
        model: the root module the plan was calibrated on (optional; see :meth:`bind`).
    """

    def __init__(self, entries: Iterable[ModuleScale], model: torch.nn.Module | None = None):
        self.entries = list(entries)
        self._by_fingerprint: dict[str, list[ModuleScale]] = {}
        for e in self.entries:
            self._by_fingerprint.setdefault(e.fingerprint, []).append(e)
        self._names: dict[int, str] = {}
        self._seen: dict[int, tuple[torch.nn.Module, ModuleScale | None]] = {}  # the module keeps its id
        if model is not None:
            self.bind(model)

    @classmethod
    def from_plan(cls, plan: RewritePlan, model: torch.nn.Module | None = None) -> "ScaleTable":
        """The table of a plan's ``modules`` field (empty for a plan without one)."""
        return cls((ModuleScale(**m) for m in plan.modules), model)

    def bind(self, model: torch.nn.Module) -> "ScaleTable":
        """Learn the qualified names of ``model``'s submodules, to tell apart twins with identical weights."""
        self._names = {id(m): name for name, m in model.named_modules()}
        self._seen.clear()
        return self

    def find(self, module: torch.nn.Module) -> ModuleScale | None:
        """The entry of ``module``, or None.

        Raises:
            PlanError: several entries share ``module``'s fingerprint with different exponents and
                the table has no root module to pick one by name.
        """
        if id(module) not in self._seen:
            candidates = self._by_fingerprint.get(module_fingerprint(module), []) if module.state_dict() else []
            self._seen[id(module)] = (module, self._pick(module, candidates))
        return self._seen[id(module)][1]

    def _pick(self, module: torch.nn.Module, candidates: list[ModuleScale]) -> ModuleScale | None:
        """The candidate of ``module``: the only one, one of several that agree, or the one named like it."""
        if len({_decision(c) for c in candidates}) <= 1:
            return candidates[0] if candidates else None
        name = self._names.get(id(module))
        named = [c for c in candidates if c.module == name]
        if name is None or not named:
            raise PlanError(f"modules {', '.join(c.module for c in candidates)} have identical weights but "
                            f"different scales; pass the model to ScaleTable (model=...) so they are told "
                            f"apart by name")
        return named[0]

    def exponents(self, module: torch.nn.Module) -> tuple[int, int]:
        """``(input_exponent, output_exponent)`` of ``module``; ``(0, 0)`` if the plan has none."""
        entry = self.find(module)
        return (entry.input_exponent, entry.output_exponent) if entry else (0, 0)
