"""Stage 2, bisect: name the first module whose FP16 execution breaks the output.

* :func:`bisect` (:mod:`~fp16guard.bisect.search`): the binary search over cuts, its
  :class:`BisectResult` (JSON schema ``fp16guard.bisect/1``), and the tolerance it sets from the
  model's own FP16 rounding noise (:func:`noise_tolerance`).
* :mod:`~fp16guard.bisect.targets`: the two kinds of model it cuts, each split by
  :mod:`~fp16guard.bisect.onnx_split` (ONNX nodes) or :mod:`~fp16guard.bisect.torch_split`
  (PyTorch module segments).
* :func:`print_bisect`, :func:`plot_bisect`: the result in a terminal and as a PNG.
"""

from fp16guard.bisect.plot import plot_bisect
from fp16guard.bisect.render import print_bisect
from fp16guard.bisect.search import (
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

__all__ = ["DEFAULT_TOLERANCE", "NOISE_CAP", "NOISE_FACTOR", "SCHEMA", "BisectResult", "Offender", "Trial", "bisect",
           "noise_tolerance", "plot_bisect", "print_bisect"]
