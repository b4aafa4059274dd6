"""What ``fix`` writes when pure scaling cannot reach the accuracy: the fewest FP32 (or BF16)
islands that do, and never anything worse than the FP32 fallback other tools give.

The bar (:func:`fp16guard.compare.misses_bar`) is relative to what FP16 can do for this model:
on every input, the written model's relative L2 error is at most ``1.5 x`` the FP32 fallback's
plus FP16 roundoff (``2^-10``). A fixed model that misses it goes through :func:`search_islands`:

1. **Candidates**: the nodes the FP32 fallback keeps in FP32 (readers and writers of values beyond
   FP16's range, readers of constants beyond it, flushed-constant islands) that still exist in the
   rewritten graph, beside the plan's own unfixable nodes, which always stay in FP32.
2. **Ranking**: by the largest true (unscaled) activation they read or write, from calibration:
   the nodes whose values FP16 holds only scaled lose most to its 11-bit significand (a LayerNorm
   reading a 4.6e8 residual loses the residual's small variations), so they come first.
3. **Search**: the rewritten graph with every candidate in FP32 is verified once; if it misses the
   bar, no island set on the rewritten graph helps, and the FP32 fallback itself is written. If it
   meets it, the smallest prefix of the ranked list that meets it is found by doubling and then
   bisection, as bisect searches cuts: at most ``2 log2(n) + 1`` verification runs for ``n``
   candidates (each runs every input once).

The result never holds more FP32 nodes than the fallback: a prefix is a subset of the candidates,
and the candidates are a subset of the fallback's nodes plus the plan's unfixable ones; when that
sum exceeds the fallback's count, the fallback is written instead.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

from fp16guard.compare import Verification

logger = logging.getLogger("fp16guard")


@dataclass(frozen=True)
class IslandTrial:
    """One verification run of the search.

    Attributes:
        nodes: how many nodes ran in FP32 (or BF16); ``met`` whether the model met the bar;
        worst: its worst relative L2 error over inputs.
    """

    nodes: int
    met: bool
    worst: float


@dataclass
class IslandSearch:
    """What :func:`search_islands` found.

    Attributes:
        nodes: the island nodes of the chosen model (the plan's unfixable ones first), or None
            when no island set on the rewritten graph met the bar.
        fixed, conversion, verification: the chosen model, its conversion and its verification
            (None with ``nodes``).
        candidates: the ranked candidates, ``(node, true amax it writes)``.
        trials: every verification run, in order.
    """

    nodes: list[str] | None
    fixed: object = None
    conversion: object = None
    verification: Verification | None = None
    candidates: list[tuple[str, float]] = field(default_factory=list)
    trials: list[IslandTrial] = field(default_factory=list)


def node_values(graph) -> dict[str, list[str]]:
    """``{node: the values it reads and writes}`` of an ONNX model or an fx graph (an fx node
    writes the value of its own name), in graph order."""
    if hasattr(graph, "graph") and hasattr(graph.graph, "node"):
        return {n.name: [t for t in (*n.input, *n.output) if t] for n in graph.graph.node}
    from torch.fx import Node
    from torch.utils._pytree import tree_flatten

    return {n.name: [*(a.name for a in tree_flatten((n.args, n.kwargs))[0] if isinstance(a, Node)), n.name]
            for n in graph.graph.nodes if n.op in ("call_function", "call_method", "call_module")}


def rank_candidates(graph, candidates: Sequence[str], amax: Mapping[str, float]) -> list[tuple[str, float]]:
    """``candidates`` present in ``graph``, each with the largest true amax it reads or writes,
    largest first (graph order breaks ties); unmeasured values count as 0."""
    outputs = node_values(graph)
    order = {n: i for i, n in enumerate(outputs)}
    present = [n for n in dict.fromkeys(candidates) if n in outputs]
    scored = [(n, max((float(amax.get(t, 0.0)) for t in outputs[n]), default=0.0)) for n in present]
    return sorted(scored, key=lambda s: (-s[1], order[s[0]]))


def search_islands(graph, required: Sequence[str], candidates: Sequence[str], amax: Mapping[str, float],
                   build: Callable[[list[str]], tuple[object, object]],
                   check: Callable[[object], tuple[Verification, bool]], *, limit: int | None = None) -> IslandSearch:
    """The fewest island nodes, beside ``required``, with which the rewritten ``graph`` meets the bar.

    Args:
        graph: the rewritten FP32 graph (ONNX or fx) that ``build`` converts.
        required: nodes that stay in FP32 whatever happens (the plan's unfixable nodes).
        candidates: further nodes that may go to FP32 (the fallback's), in any order.
        amax: calibration amax of the true (unscaled) values, by value name (ranking).
        build: ``build(nodes) -> (fixed model, conversion)`` with ``nodes`` in FP32 (or BF16).
        check: ``check(fixed) -> (verification, meets the bar)``.
        limit: at most this many island nodes in all (the fallback's count); more is never chosen.

    The caller has verified the model with ``required`` alone (it missed the bar): the search
    starts at one candidate.

    Returns:
        The :class:`IslandSearch`; ``nodes`` is None when even every candidate in FP32 misses the
        bar or would exceed ``limit``.
    """
    ranked = [(n, a) for n, a in rank_candidates(graph, candidates, amax) if n not in set(required)]
    out = IslandSearch(None, candidates=ranked)
    names = [n for n, _ in ranked]
    cache: dict[int, tuple[object, object, Verification, bool]] = {}

    def run(k: int):
        """The model with ``required`` and the first ``k`` ranked candidates in FP32 (memoized)."""
        if k not in cache:
            nodes = [*required, *names[:k]]
            fixed, conversion = build(nodes)
            verification, met = check(fixed)
            worst = max((r.rel_l2 for r in verification.rows), default=0.0)
            out.trials.append(IslandTrial(len(nodes), met, worst))
            logger.info("islands: %d node(s) in FP32: %s (worst rel. L2 %.3g)", len(nodes),
                        "meets the bar" if met else "misses it", worst)
            cache[k] = (fixed, conversion, verification, met)
        return cache[k]

    n = len(names)
    if limit is not None:
        n = min(n, max(0, limit - len(required)))
    if not run(n)[3]:
        return out
    lo, hi = 0, n  # run(0), the plain fixed model, missed (the caller verified it); run(n) meets
    k = 1
    while k < hi:  # doubling: 1, 2, 4, ...
        if run(k)[3]:
            hi = k
            break
        lo = k
        k = 1 if k == 0 else 2 * k
    while hi - lo > 1:  # bisection between the last miss and the first hit
        mid = (lo + hi) // 2
        if run(mid)[3]:
            hi = mid
        else:
            lo = mid
    fixed, conversion, verification, _ = run(hi)
    out.nodes, out.fixed, out.conversion, out.verification = [*required, *names[:hi]], fixed, conversion, verification
    return out
