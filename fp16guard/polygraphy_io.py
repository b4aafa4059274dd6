"""Polygraphy's data files, read and written with Polygraphy's own JSON encoding.

Polygraphy (NVIDIA/TensorRT ``tools/Polygraphy``, pure Python on PyPI; these functions need no
TensorRT) keeps arrays in JSON as ``{"array": <base64 of np.save>, "polygraphy_class": "ndarray"}``
(``polygraphy/json/serde.py``), so fp16guard reads and writes them with ``polygraphy.json`` rather
than a copy of that format:

* **Inputs**: ``polygraphy run --save-inputs inputs.json`` writes one JSON list of feed dicts,
  ``List[Dict[str, numpy.ndarray]]`` (``polygraphy/tools/args/comparator/comparator.py``: "A path
  with a file extension saves a single JSON List[Dict[str, numpy.ndarray]]"); an extensionless path
  writes a folder of per-iteration files ``0000000000.json``, ... each holding one feed dict
  (``IterationWriter``). :func:`read_polygraphy_inputs` reads either form, one
  :class:`~fp16guard.inputs.NamedInput` per feed dict, fed to an ONNX model by name.
* **Outputs**: :func:`save_run_results` writes a ``polygraphy.comparator.RunResults`` (what
  ``polygraphy run --save-outputs`` writes; ``--load-outputs`` and ``polygraphy inspect data`` read
  it), one runner per model variant and one iteration per input, so Polygraphy's comparator can
  compare fp16guard's FP32 reference and fixed FP16 outputs, or either against a TensorRT run,
  offline.

``polygraphy`` is imported only when one of these runs (:func:`fp16guard.deps.import_polygraphy`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from fp16guard.deps import import_polygraphy
from fp16guard.errors import InputError, first_line
from fp16guard.inputs import NamedInput

#: Runner names of :func:`save_run_results` as ``fix --save-outputs`` uses them.
RUNNER_FP32 = "fp16guard-fp32"
RUNNER_FIXED = "fp16guard-fixed-fp16"


def _quiet():
    """Polygraphy's own logger (it prints to stdout) silenced: fp16guard says what it wrote."""
    from polygraphy.logger import G_LOGGER

    return G_LOGGER.verbosity(G_LOGGER.CRITICAL)


def _as_array(value) -> np.ndarray | None:
    """A decoded feed-dict value as numpy (Polygraphy decodes torch tensors when saved from torch), or None."""
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "detach"):  # torch.Tensor
        return value.detach().cpu().numpy()
    return None


def read_polygraphy_inputs(path: str | Path) -> list[NamedInput]:
    """Read a Polygraphy input file (``polygraphy run --save-inputs inputs.json``).

    Args:
        path: a JSON file holding a list of feed dicts (``{input name: array}``), or one feed dict
            (a file of Polygraphy's per-iteration folder form).

    Returns:
        One :class:`~fp16guard.inputs.NamedInput` per feed dict, labelled ``inputs.json[0]``, ...
        (a single-dict file by its name), its arrays named by input name (``names``).

    Raises:
        InputError: the file is missing, not JSON, or not a list of ``{name: array}`` dicts (a
            RunResults file of ``--save-outputs``, a plan, plain JSON numbers).
        MissingDependencyError: polygraphy is not installed.
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(f"input file not found: {p}")
    import_polygraphy("reading Polygraphy input files (.json)")
    from polygraphy.exception import PolygraphyException
    from polygraphy.json import load_json

    try:
        with _quiet():
            data = load_json(str(p))
    except (ValueError, OSError, PolygraphyException) as e:  # JSONDecodeError is a ValueError
        why = first_line(e) or type(e).__name__
        raise InputError(f"{p}: not a readable Polygraphy JSON file ({why}); write it with "
                         "polygraphy run --save-inputs or polygraphy.json.save_json") from None
    single = isinstance(data, Mapping)
    feeds = [data] if single else data
    what = (f"{p}: not Polygraphy's input format (a list of {{input name: array}} dicts, as written by "
            "polygraphy run --save-inputs)")
    if type(feeds) is not list:  # RunResults is list-like but not a list
        raise InputError(f"{what}; it holds a {type(data).__name__}")
    if not feeds:
        raise InputError(f"{p}: holds no feed dict; save at least one iteration")
    out = []
    for i, feed in enumerate(feeds):
        if not isinstance(feed, Mapping) or not feed:
            raise InputError(f"{what}; item {i} is a {type(feed).__name__}" + (" with no array" if feed == {} else ""))
        arrays = {name: _as_array(v) for name, v in feed.items()}
        bad = next((name for name, a in arrays.items() if a is None or not isinstance(name, str)), None)
        if bad is not None:
            raise InputError(f"{what}; item {i}'s {bad!r} is a {type(feed[bad]).__name__}, not an array")
        label = p.name if single else f"{p.name}[{i}]"
        out.append(NamedInput(label, tuple(arrays.values()), names=tuple(arrays)))
    return out


def run_results(runs: Mapping[str, Sequence[Sequence[np.ndarray]]], output_names: Sequence[str]):
    """A ``polygraphy.comparator.RunResults`` of outputs computed elsewhere.

    Args:
        runs: runner name -> one list of output arrays per input (iteration), in ``output_names`` order.
        output_names: the model's output names (an ONNX graph's, so ``polygraphy run model.onnx
            --load-outputs`` matches them with its own runners').

    Raises:
        ValueError: an iteration has another number of outputs than ``output_names``.
        MissingDependencyError: polygraphy is not installed.
    """
    import_polygraphy("writing Polygraphy run results")
    from polygraphy.comparator import RunResults

    results = RunResults()
    for runner, iterations in runs.items():
        for k, outputs in enumerate(iterations):
            if len(outputs) != len(output_names):
                raise ValueError(f"{runner}: iteration {k} has {len(outputs)} outputs, the names "
                                 f"{len(output_names)}")
        results.add([dict(zip(output_names, (np.asarray(a) for a in outputs))) for outputs in iterations],
                    runner_name=runner)
    return results


def save_run_results(path: str | Path, runs: Mapping[str, Sequence[Sequence[np.ndarray]]],
                     output_names: Sequence[str]) -> Path:
    """Write :func:`run_results` with ``RunResults.save`` (Polygraphy's JSON; load it with
    ``RunResults.load(path)`` or ``polygraphy run ... --load-outputs path``).

    Returns:
        ``path``.
    """
    results = run_results(runs, output_names)
    with _quiet():
        results.save(str(path))
    return Path(path)
