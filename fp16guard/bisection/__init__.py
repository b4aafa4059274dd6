"""Stage 2, bisect: name the first module whose FP16 execution breaks the output.

* :func:`bisect` (:mod:`~fp16guard.bisection.search`): the binary search over cuts, its
  :class:`BisectResult` (JSON schema ``fp16guard.bisect/1``), and the tolerance it sets from the
  model's own FP16 rounding noise (:func:`noise_tolerance`).
* :mod:`~fp16guard.bisection.targets`: the two kinds of model it cuts, each split by
  :mod:`~fp16guard.bisection.onnx_split` (ONNX nodes) or :mod:`~fp16guard.bisection.torch_split`
  (PyTorch module segments).
* :func:`print_bisect`, :func:`plot_bisect`: the result in a terminal and as a PNG;
  ``print(result)`` gives its few-line summary (:func:`~fp16guard.bisection.render.summary`).
"""

from fp16guard.bisection import render
from fp16guard.bisection.plot import plot_bisect
from fp16guard.bisection.render import print_bisect
from fp16guard.bisection.search import (
    DEFAULT_TOLERANCE,
    NOISE_CAP,
    NOISE_FACTOR,
    SCHEMA,
    BisectResult,
    Offender,
    Trial,
    bisect,
    noise_tolerance,
)

# How a result shows itself, kept with its renderer: ``print(result)`` gives a few lines (verdict,
# offender, cost, next step), ``rich.print(result)`` the full table, ``repr`` one line.
BisectResult.__str__ = render.summary  # type: ignore[method-assign]
BisectResult.__repr__ = render.short_repr  # type: ignore[method-assign]
BisectResult.__rich_console__ = render.rich_console  # type: ignore[attr-defined]

__all__ = ["DEFAULT_TOLERANCE", "NOISE_CAP", "NOISE_FACTOR", "SCHEMA", "BisectResult", "Offender", "Trial", "bisect",
           "noise_tolerance", "plot_bisect", "print_bisect"]
