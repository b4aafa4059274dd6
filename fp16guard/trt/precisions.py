"""The FP32 islands of a fixed model as TensorRT 10 precision constraints (trtexec and Polygraphy).

``fp16guard fix`` writes a *typed* FP16 ONNX: every tensor's type says its precision, which a
strongly typed TensorRT network (the only kind on TensorRT 11) obeys. A *weakly typed* TensorRT 10
build with the FP16 flag picks each layer's precision itself and may run an FP32 island in FP16;
:class:`LayerPrecisions` pins the islands instead, so such a build of the FP32 graph with the fix's
rewrites (``fix --save-fp32``; its node names are the typed model's) keeps the typed model's FP32
layers. The layers left unconstrained may run in FP16 or FP32, whichever TensorRT times faster.

Names: TensorRT's ONNX parser names the layer of a node after the node
(``ImporterContext::registerLayer`` in onnx/onnx-tensorrt, ``ImporterContext.cpp``: the node's name,
made unique); helper layers the parser adds for one node (a broadcast shuffle, a cast) get other
names and are not constrained. fp16guard names every unnamed node before it rewrites, so each FP32
node has a name.

What the tools take (checked against their sources):

* **trtexec** (TensorRT 10 ``samples/common/sampleOptions.cpp``, help text and parser):
  ``--layerPrecisions=spec`` with ``spec ::= layerPrecision[","spec]``, ``layerPrecision ::=
  layerName":"precision``, ``precision ::= "fp32"|"fp16"|"int32"|"int8"``; ``--layerOutputTypes=spec``
  the same with ``type ::= "fp32"|...["+"type]`` (one type is broadcast to every output:
  ``setLayerOutputTypes`` in ``sampleEngines.cpp``); both "effective only when
  precisionConstraints is set to obey or prefer": ``--precisionConstraints=obey`` ("meet precision
  constraints ... or fail"). ``getLayerPrecisions`` splits the list on *every* comma first, then
  ``splitNameAndValue`` splits each item on its *last* colon (or takes a single-quoted name,
  ``'name':value``), and recent versions read one ``*`` in a name as a wildcard (``findPlausible``).
* **Polygraphy** (``polygraphy/tools/args/backend/trt/loader.py``): ``--layer-precisions
  <layer_name>:<layer_precision> ...`` (``nargs="+"``), precisions named by TensorRT's data type
  aliases (``float32``), parsed by ``args_util.parse_arglist_to_dict`` with ``str.rpartition(":")``
  (the last colon); "you should also set --precision-constraints to either 'prefer' or 'obey'"
  (``tools/args/backend/trt/config.py``: ``--precision-constraints {prefer,obey,none}``). Polygraphy
  has no output-type option for inner layers (``--tensor-dtypes`` sets network inputs and outputs
  only) and no file form for these options; from Python, ``polygraphy.backend.trt.SetLayerPrecisions(
  network, {name: trt.float32})`` takes :attr:`LayerPrecisions.fp32_layers` directly.

So a node name with a colon is written as it is (both tools split on the last colon); a name with a
comma (trtexec cannot express it), a single quote (trtexec's quoting) or ``*`` (trtexec's
wildcard) is **refused** with :class:`~fp16guard.errors.FixError`, asking to rename the node. Names
with spaces or other shell characters are shell-quoted (``shlex.quote``) in the flag lines.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import onnx
from onnx import TensorProto

from fp16guard.errors import FixError
from fp16guard.fp16_onnx import Fp16Conversion
from fp16guard.onnx_graph import value_types

SCHEMA = "fp16guard.layer-precisions/1"
#: Characters a layer name may not hold, and why (see the module docstring).
FORBIDDEN = {",": "trtexec splits --layerPrecisions on every comma", "'": "trtexec reads single quotes as quoting",
             "*": "trtexec reads * as a wildcard matching other layers"}


def check_layer_name(name: str) -> None:
    """Refuse a node name the precision flags cannot carry.

    Raises:
        FixError: an empty name, or one holding ``,``, ``'`` or ``*``; the message names the node.
    """
    if not name:
        raise FixError("an FP32 node has no name, so no TensorRT layer can be constrained by it; name every node")
    for ch, why in FORBIDDEN.items():
        if ch in name:
            raise FixError(f"FP32 node {name!r} holds {ch!r}, which the precision flags cannot carry ({why}); "
                           f"rename the node in the ONNX model and fix it again")


@dataclass(frozen=True)
class LayerPrecisions:
    """The layers a weakly typed TensorRT 10 build must keep in FP32.

    Attributes:
        fp32_layers: ONNX node names kept in FP32, in graph order (TensorRT layer names).
        float_outputs: the subset whose every output is a float tensor: their output type is pinned
            too (an FP32 comparison's bool output has no FP32 type).
    """

    fp32_layers: tuple[str, ...]
    float_outputs: tuple[str, ...]

    def __post_init__(self):
        for name in self.fp32_layers:
            check_layer_name(name)

    def trtexec_flags(self) -> str:
        """``--layerPrecisions=a:fp32,b:fp32 --layerOutputTypes=a:fp32,b:fp32 --precisionConstraints=obey``,
        or ``""`` when nothing is constrained."""
        if not self.fp32_layers:
            return ""
        flags = ["--layerPrecisions=" + ",".join(f"{n}:fp32" for n in self.fp32_layers)]
        if self.float_outputs:
            flags.append("--layerOutputTypes=" + ",".join(f"{n}:fp32" for n in self.float_outputs))
        return " ".join(shlex.quote(f) for f in [*flags, "--precisionConstraints=obey"])

    def polygraphy_flags(self) -> str:
        """``--layer-precisions a:float32 b:float32 --precision-constraints obey``, or ``""``."""
        if not self.fp32_layers:
            return ""
        return " ".join(["--layer-precisions", *(shlex.quote(f"{n}:float32") for n in self.fp32_layers),
                         "--precision-constraints", "obey"])

    def to_json(self) -> dict:
        """Schema ``fp16guard.layer-precisions/1``: the names and both flag lines."""
        return {"schema": SCHEMA, "fp32_layers": list(self.fp32_layers), "float_outputs": list(self.float_outputs),
                "trtexec": self.trtexec_flags(), "polygraphy": self.polygraphy_flags()}

    def text(self, source: str = "the fixed model") -> str:
        """The file :meth:`save` writes: ``#`` comments, then the trtexec line, then Polygraphy's
        (both empty when there is no FP32 island)."""
        n = len(self.fp32_layers)
        head = (f"# {n} FP32 layer(s) of {source}, by ONNX node name: {', '.join(self.fp32_layers)}" if n else
                f"# {source} has no FP32 island: every layer may run in FP16, no constraint is needed")
        return "\n".join([
            head,
            "# TensorRT 10, weakly typed (--fp16), the rewritten FP32 ONNX or the typed one. The first line after",
            "# the comments is for trtexec, the second for polygraphy run/convert:",
            "#   trtexec --onnx=MODEL --fp16 $(grep -v '^#' THIS | sed -n 1p)",
            "#   polygraphy run MODEL --trt --fp16 $(grep -v '^#' THIS | sed -n 2p)",
            self.trtexec_flags(), self.polygraphy_flags(), ""])

    def save(self, path: str | Path, source: str = "the fixed model") -> Path:
        """Write :meth:`text`, or :meth:`to_json` when ``path`` ends in ``.json`` (atomically:
        :func:`fp16guard.files.write_text`); returns the path."""
        from fp16guard.files import write_text

        p = Path(path)
        return write_text(p, json.dumps(self.to_json(), indent=2) + "\n" if p.suffix.lower() == ".json"
                          else self.text(source))


def fp32_nodes_of_typed_model(model: onnx.ModelProto) -> list[str]:
    """Nodes of a typed FP16 model (:func:`~fp16guard.fp16_onnx.to_typed_fp16`) that compute in FP32:
    every node but Casts and Constants with a float32 input or output, in graph order."""
    types = value_types(model)
    return [n.name for n in model.graph.node if n.op_type not in ("Cast", "Constant")
            and any(types.get(t) == TensorProto.FLOAT for t in (*n.input, *n.output) if t)]


def layer_precisions(model: onnx.ModelProto, fp32_nodes: Sequence[str] | Fp16Conversion | None = None) -> LayerPrecisions:
    """The FP32 layers of a fixed model as precision constraints.

    Args:
        model: the typed FP16 model (``FixResult.fixed``) or its rewritten FP32 graph
            (``FixResult.rewritten_fp32``): they share node names.
        fp32_nodes: the nodes kept in FP32 (``FixResult.conversion``, or its ``fp32_nodes``); default:
            read from the typed model's tensor types (:func:`fp32_nodes_of_typed_model`).

    Raises:
        FixError: a name the flags cannot carry (:func:`check_layer_name`), or one the model lacks.
    """
    if fp32_nodes is None:
        fp32_nodes = fp32_nodes_of_typed_model(model)
    elif isinstance(fp32_nodes, Fp16Conversion):
        fp32_nodes = fp32_nodes.fp32_nodes
    nodes = {n.name: n for n in model.graph.node}
    missing = [n for n in fp32_nodes if n not in nodes]
    if missing:
        raise FixError(f"FP32 node {missing[0]!r} is not in the model ({len(missing)} missing); give the fixed model")
    wanted = set(fp32_nodes)
    ordered = [n.name for n in model.graph.node if n.name in wanted]
    types = value_types(model)
    float_outputs = [name for name in ordered if all(types.get(o) == TensorProto.FLOAT for o in nodes[name].output if o)]
    return LayerPrecisions(tuple(ordered), tuple(float_outputs))
