"""Polygraphy's data files, read and written with Polygraphy's own JSON encoding.

Polygraphy (NVIDIA/TensorRT ``tools/Polygraphy``, pure Python on PyPI; these functions need no
TensorRT) keeps arrays in JSON as ``{"array": <base64 of np.save>, "polygraphy_class": "ndarray"}``
and torch tensors as ``{"tensor": <base64 of torch.save>, "polygraphy_class": "Tensor"}``
(``polygraphy/json/serde.py``). fp16guard writes them with ``polygraphy.json``. It reads input
files with a decoder of its own that knows these two classes only and never runs code from the
file: an array is ``np.load(..., allow_pickle=False)``, a tensor ``torch.load(...,
weights_only=True)`` (torch 2.6 or later), and any other encoded class (a ``RunResults``, ...) is
named, not built. Polygraphy's decoder would build any class it has registered.

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

import base64
import io
import json
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Mapping, NamedTuple, Sequence

import numpy as np

from fp16guard.deps import import_polygraphy
from fp16guard.errors import InputError, first_line
from fp16guard.named_input import NamedInput, check_input_path, file_input

#: Runner names of :func:`save_run_results` as ``fix --save-outputs`` uses them.
RUNNER_FP32 = "fp16guard-fp32"
RUNNER_FIXED = "fp16guard-fixed-fp16"


def _quiet():
    """Polygraphy's own logger (it prints to stdout) silenced: fp16guard says what it wrote."""
    from polygraphy.logger import G_LOGGER

    return G_LOGGER.verbosity(G_LOGGER.CRITICAL)


class _Encoded(NamedTuple):
    """A JSON object Polygraphy encoded from one of its classes, not decoded yet.

    Attributes:
        kind: the class (``ndarray``, ``Tensor``, ``RunResults``, ...).
        fields: the object's other keys (``{"array": <base64>}`` for an ``ndarray``).
    """

    kind: str
    fields: dict


def _object_hook(pairs) -> dict | _Encoded:
    """``json.loads``'s ``object_pairs_hook``: an object of a Polygraphy class (``"polygraphy_class"``
    key, or the ``"__polygraphy_encoded_<class>"`` key of older Polygraphy) as :class:`_Encoded`,
    any other object as a dict."""
    from polygraphy import constants

    dct = dict(pairs)
    kind = dct.pop(constants.TYPE_MARKER, None)
    legacy = [k for k, v in dct.items() if k.startswith("__polygraphy_encoded_") and v == constants.LEGACY_TYPE_MARKER]
    if kind is None and legacy:
        kind = legacy[0][len("__polygraphy_encoded_"):]
        del dct[legacy[0]]
    return dct if kind is None else _Encoded(str(kind), dct)


def _kind(value) -> str:
    """What a decoded JSON value is, for a message: its Polygraphy class or its Python type."""
    return value.kind if isinstance(value, _Encoded) else type(value).__name__


def _as_array(value, where: str) -> np.ndarray | None:
    """A feed-dict value as numpy: an encoded ``ndarray`` or torch ``Tensor`` decoded without
    running code from the file; None for any other value.

    Args:
        where: the value's place, for messages (``inputs.json: item 0's 'x'``).

    Raises:
        InputError: an ``ndarray``/``Tensor`` payload that is missing, not base64 text, or not a
            plain array or tensor (a pickled object among them).
    """
    if not isinstance(value, _Encoded) or value.kind not in ("ndarray", "Tensor"):
        return None
    key = "array" if value.kind == "ndarray" else "tensor"
    payload = value.fields.get(key)
    if not isinstance(payload, str):
        got = (f"whose {key!r} is of type {type(payload).__name__}, not base64 text" if key in value.fields
               else f"with no {key!r} payload")
        raise InputError(f"{where} is an encoded {value.kind} {got}; write the file with polygraphy run "
                         f"--save-inputs or polygraphy.json.save_json")
    if value.kind == "Tensor":
        return _tensor_payload(payload, where)
    try:
        try:
            data = base64.b64decode(payload, validate=True)
        except ValueError:  # binascii.Error: older Polygraphy wrote the np.save bytes as latin-1 text
            data = payload.encode("latin-1")
        if not data.startswith((b"\x93NUMPY", b"PK\x03\x04")):  # np.load would quote its unsafe way out
            raise ValueError("its bytes are not np.save output: a pickle, or damaged")
        loaded = np.load(io.BytesIO(data), allow_pickle=False)  # never unpickles: object arrays raise
        if isinstance(loaded, np.lib.npyio.NpzFile):  # older Polygraphy: an .npz of one array
            with loaded:
                if not loaded.files:
                    raise ValueError("an empty .npz archive")
                loaded = loaded[loaded.files[0]]
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:  # UnicodeEncodeError is a ValueError
        raise InputError(f"{where} holds no readable numpy array ({first_line(e) or type(e).__name__}); "
                         f"fp16guard loads plain numeric arrays only, never pickled data") from None
    return loaded


def _tensor_payload(payload: str, where: str) -> np.ndarray:
    """A ``Tensor`` payload (base64 of ``torch.save``) as numpy, through ``torch.load(weights_only=True)``,
    whose unpickler builds tensors and plain containers only (bfloat16 becomes float32, exactly).

    Raises:
        InputError: torch older than 2.6 (its ``weights_only`` loader could run code from the file,
            CVE-2025-32434), or a payload that is not one plain tensor.
    """
    import torch

    if tuple(int(v) for v in torch.__version__.split(".")[:2] if v.isdigit()) < (2, 6):
        raise InputError(f"{where} is a torch.Tensor, which torch {torch.__version__} cannot load safely (torch.load "
                         f"before 2.6 can run code from the file); upgrade torch or save numpy arrays instead")
    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol of foreign payloads
            warnings.simplefilter("ignore")
            t = torch.load(io.BytesIO(base64.b64decode(payload, validate=True)), map_location="cpu",
                           weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:  # RuntimeError: a damaged zip
        raise InputError(f"{where} is not a plain torch.Tensor (torch.load(weights_only=True) refused it: "
                         f"{type(e).__name__}); fp16guard never unpickles other objects: save numpy arrays") from None
    if not isinstance(t, torch.Tensor):
        raise InputError(f"{where} is a Tensor payload holding a {type(t).__name__}, not a tensor; save numpy arrays")
    t = t.detach()
    try:
        return (t.float() if t.dtype == torch.bfloat16 else t).numpy()
    except (TypeError, RuntimeError) as e:  # a dtype or layout numpy has no form of (float8, sparse)
        raise InputError(f"{where} is a {t.dtype} tensor numpy cannot hold ({first_line(e)}); "
                         f"save it as float32") from None


def read_polygraphy_inputs(path: str | Path) -> list[NamedInput]:
    """Read a Polygraphy input file (``polygraphy run --save-inputs inputs.json``).

    Args:
        path: a JSON file holding a list of feed dicts (``{input name: array}``), or one feed dict
            (a file of Polygraphy's per-iteration folder form).

    Returns:
        One :class:`~fp16guard.inputs.NamedInput` per feed dict, labelled ``inputs.json[0]``, ...
        (a single-dict file by its name), its arrays named by input name (``names``).

    Loading runs no code from the file (see the module's note): arrays are read with
    ``allow_pickle=False``, tensors with ``torch.load(weights_only=True)``; arrays come in native
    byte order, float16 noted in the label (:func:`~fp16guard.inputs.file_input`).

    Raises:
        InputError: the file is missing, not JSON, nested too deeply, or not a list of
            ``{name: array}`` dicts (a RunResults file of ``--save-outputs``, a plan, plain JSON
            numbers), or an array's payload is missing, not base64 text, or not a plain numeric
            array or tensor (pickled objects are refused, never loaded).
        MissingDependencyError: polygraphy is not installed.
    """
    p = Path(path)
    check_input_path(p)
    import_polygraphy("reading Polygraphy input files (.json)")
    try:
        data = json.loads(p.read_bytes(), object_pairs_hook=_object_hook)
    except RecursionError:
        raise InputError(f"{p}: its JSON is nested too deeply to read; Polygraphy input files are a list of "
                         "{input name: array} dicts (polygraphy run --save-inputs)") from None
    except (ValueError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        why = first_line(e) or type(e).__name__
        raise InputError(f"{p}: not a readable Polygraphy JSON file ({why}); write it with "
                         "polygraphy run --save-inputs or polygraphy.json.save_json") from None
    single = isinstance(data, Mapping)
    feeds = [data] if single else data
    what = (f"{p}: not Polygraphy's input format (a list of {{input name: array}} dicts, as written by "
            "polygraphy run --save-inputs)")
    if type(feeds) is not list:  # a RunResults (encoded), a number, a string
        raise InputError(f"{what}; it holds a {_kind(data)}")
    if not feeds:
        raise InputError(f"{p}: holds no feed dict; save at least one iteration")
    out = []
    for i, feed in enumerate(feeds):
        if not isinstance(feed, Mapping) or not feed:
            raise InputError(f"{what}; item {i} is a {_kind(feed)}" + (" with no array" if feed == {} else ""))
        arrays = {name: _as_array(v, f"{p}: item {i}'s {name!r}") for name, v in feed.items()}
        bad = next((name for name, a in arrays.items() if a is None), None)
        if bad is not None:
            raise InputError(f"{what}; item {i}'s {bad!r} is a {_kind(feed[bad])}, not an array")
        label = p.name if single else f"{p.name}[{i}]"
        out.append(file_input(label, arrays.values(), names=tuple(arrays)))
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
