"""OpenMMLab models for ``fp16guard calibrate|bisect|export --deploy-cfg D --model-cfg M CHECKPOINT --img IMG``.

The arguments follow mmdeploy's ``tools/deploy.py`` (deploy config, model config, checkpoint,
image).

Calibration and bisection (:func:`load_model`, :func:`model_inputs`): the model is built from its
config with mmengine's registry in the config's ``default_scope`` (``mmocr``, ``mmdet``, ...), the
checkpoint loaded on the CPU, and each image goes through the model's own ``data_preprocessor``
(mean/std, BGR->RGB, padding), resized first to the deploy config's static
``onnx_config.input_shape`` when it has one. The dataset pipeline is not used there, so these run
where torchvision does not import. They run on :class:`TensorForward`, the model's tensor-mode
forward (``model._forward``: backbone, neck and head), so the plan covers what mmdeploy exports
and its module scales match the modules the rewriters see (by fingerprint).

Export (:func:`torch2onnx`): mmdeploy's own ``mmdeploy.apis.torch2onnx`` with fp16guard's
rewriters registered (it needs torchvision: the codebase's test pipeline imports it), or
:func:`mmdeploy_export` (``mmdeploy.apis.onnx.export`` on a model and input built here, no
torchvision). :func:`verify_export` runs the result in strict FP16 against FP32.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from fp16guard.deps import require
from fp16guard.errors import ModelLoadError
from fp16guard.inputs import NamedInput, read_image


class TensorForward(torch.nn.Module):
    """``model._forward(x)`` (an mmengine ``BaseModel`` in ``mode='tensor'``) as a plain module;
    outputs flattened to a tuple of tensors."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor):
        """``model._forward(x)``: ``x`` the preprocessed batch ``float32 [N, 3, H, W]``."""
        out = self.model._forward(x)
        flat, _ = torch.utils._pytree.tree_flatten(out)
        return tuple(t for t in flat if isinstance(t, torch.Tensor))


def load_model(model_cfg: str | Path, checkpoint: str | Path) -> torch.nn.Module:
    """Build an OpenMMLab model from its config and load a checkpoint on the CPU, in eval mode.

    Raises:
        MissingDependencyError: mmengine is not installed (extra ``mmdeploy``).
        ModelLoadError: a file is missing, or the config's model cannot be built.
    """
    require("mmengine", extra="mmdeploy", purpose="OpenMMLab models (--model-cfg)")
    from mmengine.config import Config
    from mmengine.registry import MODELS, init_default_scope
    from mmengine.runner import load_checkpoint

    for what, path in (("model config", model_cfg), ("checkpoint", checkpoint)):
        if not Path(path).is_file():
            raise ModelLoadError(f"{what} not found: {path}")
    cfg = Config.fromfile(str(model_cfg))
    scope = cfg.get("default_scope", "mmdet")
    try:
        importlib.import_module(f"{scope}.models")  # registers the codebase's models
        init_default_scope(scope)
        model = MODELS.build(cfg.model)
    except Exception as e:  # noqa: BLE001 - registry errors come in many types
        raise ModelLoadError(f"cannot build the model of {model_cfg} in scope {scope!r} "
                             f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    load_checkpoint(model, str(checkpoint), map_location="cpu", logger="silent")
    return model.eval()


def _static_shape(deploy_cfg) -> tuple[int, int] | None:
    """``(width, height)`` of a static deploy config (``onnx_config.input_shape``), else None."""
    shape = (deploy_cfg.get("onnx_config") or {}).get("input_shape") if deploy_cfg else None
    return (int(shape[0]), int(shape[1])) if shape else None


def model_inputs(model: torch.nn.Module, images: Sequence[str | Path], deploy_cfg=None) -> list[NamedInput]:
    """Images as the model's ``data_preprocessor`` prepares them: ``float32 [1, 3, H, W]``.

    Args:
        model: from :func:`load_model`.
        images: image files (read as RGB; handed over as BGR, as mmcv reads them).
        deploy_cfg: an mmengine ``Config`` or dict; its static ``onnx_config.input_shape`` (``[W, H]``),
            if any, is the size images are resized to.

    Raises:
        InputError: an image cannot be read.
    """
    from PIL import Image

    size = _static_shape(deploy_cfg)
    out = []
    for path in images:
        rgb = read_image(path)
        if size is not None:
            rgb = np.asarray(Image.fromarray(rgb).resize(size, Image.BILINEAR))
        bgr = torch.from_numpy(np.ascontiguousarray(rgb[:, :, ::-1].transpose(2, 0, 1)))
        with torch.no_grad():
            x = model.data_preprocessor({"inputs": [bgr]}, False)["inputs"]
        out.append(NamedInput(Path(path).name, (x.float().numpy(),)))
    return out


def load_deploy_cfg(path: str | Path):
    """The deploy config as an mmengine ``Config``.

    Raises:
        ModelLoadError: the file is missing.
    """
    require("mmengine", extra="mmdeploy", purpose="mmdeploy deploy configs (--deploy-cfg)")
    from mmengine.config import Config

    if not Path(path).is_file():
        raise ModelLoadError(f"deploy config not found: {path}")
    return Config.fromfile(str(path))


def mmdeploy_export(deploy_cfg, model: torch.nn.Module, image: NamedInput, output_prefix: str | Path,
                *, opset_version: int = 11) -> Path:
    """Export an OpenMMLab model to ONNX through mmdeploy's own ``mmdeploy.apis.onnx.export``
    (``patch_model``, ``RewriterContext`` with the deploy config, ``torch.onnx.export``), with
    fp16guard's rewriters registered: a ``fp16guard = dict(plan=...)`` key in the deploy config
    applies the plan.

    Differences from ``mmdeploy.apis.torch2onnx``, which this replaces on machines where it
    cannot run: the model and input come from :func:`load_model` and :func:`model_inputs` (no
    dataset pipeline, so no torchvision), the export runs on the CPU (torch2onnx refuses the CPU
    for TensorRT; mmdeploy's export moves everything to the CPU anyway), the model is exported in
    tensor mode (``mode='tensor'``: the head's raw outputs, no post-processing), and the
    TorchScript exporter is used (fp16guard's rewriter of ``torch.onnx.export``).

    Args:
        deploy_cfg: an mmengine ``Config`` or dict with ``backend_config.type == 'tensorrt'``.
        model: from :func:`load_model` (eval mode).
        image: one input from :func:`model_inputs`.
        output_prefix: the ONNX file is ``<output_prefix>.onnx``.

    Returns:
        The ONNX path.

    Raises:
        MissingDependencyError: mmdeploy is not installed.
    """
    require("mmdeploy", extra="mmdeploy", purpose="exporting through mmdeploy")
    importlib.import_module("fp16guard.rewriters")  # registers the rewriters
    from mmdeploy.apis.onnx import export

    x = torch.from_numpy(image.arrays[0])
    export(model, x, str(output_prefix), backend="tensorrt", input_metas={"data_samples": None, "mode": "tensor"},
           context_info={"deploy_cfg": deploy_cfg}, opset_version=opset_version)
    return Path(f"{output_prefix}.onnx")


@contextlib.contextmanager
def _tensorrt_export_on_the_cpu():
    """Let mmdeploy build a TensorRT task processor on the CPU, for the ONNX export only.

    ``mmdeploy.apis.build_task_processor`` starts with ``check_backend_device``, which refuses
    ``cpu`` for TensorRT because mmdeploy's full pipeline builds the engine next. The ONNX export
    needs no GPU (``mmdeploy.apis.onnx.export`` moves the model to the CPU anyway), so inside this
    context that one combination passes; every other combination still goes to mmdeploy's check,
    and the original function is back on exit (also when the export raises). mmdeploy's files are
    not touched.
    """
    from mmdeploy.apis.utils import utils as api_utils
    from mmdeploy.utils import Backend, get_backend

    original = api_utils.check_backend_device

    def check_backend_device(deploy_cfg, device):
        """mmdeploy's check, except that ``cpu`` passes for TensorRT.

        Raises:
            ValueError: mmdeploy's own refusal, for every other mismatch.
        """
        if device == "cpu" and get_backend(deploy_cfg) == Backend.TENSORRT:
            return None
        return original(deploy_cfg, device)

    api_utils.check_backend_device = check_backend_device
    try:
        yield
    finally:
        api_utils.check_backend_device = original


def torch2onnx(img: str | Path, work_dir: str | Path, save_file: str, deploy_cfg, model_cfg,
               model_checkpoint: str | Path, device: str = "cpu", *, plan: str | Path | None = None) -> Path:
    """``mmdeploy.apis.torch2onnx`` with fp16guard's rewriters registered, on the CPU too.

    Same arguments as mmdeploy's (its ``tools/deploy.py`` calls it that way); mmdeploy builds the
    model from its config, loads the checkpoint, builds the input with the codebase's own test
    pipeline from ``img``, and exports in ``predict`` mode inside ``RewriterContext``. Two things
    differ, both handled here and not in mmdeploy's files:

    * the TorchScript exporter: fp16guard's rewriter of ``torch.onnx.export`` for the TensorRT
      backend passes ``dynamo=False`` (mmdeploy 1.3.1 calls it without the flag, torch >= 2.9
      defaults to the dynamo exporter, which breaks mmdeploy's context exit);
    * ``device="cpu"`` with a TensorRT deploy config, which mmdeploy refuses: here it is allowed
      for the export (see :func:`_tensorrt_export_on_the_cpu`); build the engine on the GPU machine.

    Args:
        img: image file for the export's example input.
        work_dir: output folder (created).
        save_file: ONNX file name inside ``work_dir`` (mmdeploy uses ``end2end.onnx``).
        deploy_cfg: path or mmengine ``Config``; a ``fp16guard = dict(plan=...)`` key applies a plan.
        model_cfg: path or ``Config`` of the OpenMMLab model.
        model_checkpoint: the ``.pth`` checkpoint.
        device: ``"cpu"`` or ``"cuda:N"``.
        plan: a plan file that overrides the deploy config's ``fp16guard.plan``.

    Returns:
        The ONNX path, ``work_dir / save_file``.

    Raises:
        MissingDependencyError: mmdeploy is not installed.
        ModelLoadError: a file is missing.
    """
    require("mmdeploy", extra="mmdeploy", purpose="exporting through mmdeploy")
    files = {"image": img, "checkpoint": model_checkpoint, "plan": plan}
    if isinstance(model_cfg, (str, Path)):
        files["model config"] = model_cfg
    for what, path in files.items():
        if path is not None and not Path(path).is_file():
            raise ModelLoadError(f"{what} not found: {path}")
    importlib.import_module("fp16guard.rewriters")  # registers the rewriters
    from mmdeploy.apis import torch2onnx as mmdeploy_torch2onnx

    cfg = load_deploy_cfg(deploy_cfg) if isinstance(deploy_cfg, (str, Path)) else copy.deepcopy(deploy_cfg)
    if plan is not None:
        cfg["fp16guard"] = dict(plan=str(plan))
    model_cfg = str(model_cfg) if isinstance(model_cfg, Path) else model_cfg
    with _tensorrt_export_on_the_cpu():
        mmdeploy_torch2onnx(str(img), str(work_dir), save_file, cfg, model_cfg, str(model_checkpoint), device=device)
    return Path(work_dir) / save_file


def verify_export(onnx_path: str | Path, inputs: Sequence[NamedInput], *, backend: str = "emulate"):
    """Run an exported ONNX in FP16 (typed FP16 conversion, ``backend``) against the same ONNX in
    FP32 (ONNX Runtime, CPU) on ``inputs`` (from :func:`model_inputs`).

    Returns:
        A :class:`fp16guard.compare.Verification` with one row per input, variant ``exported``.

    Raises:
        ModelLoadError: the ONNX file cannot be read.
    """
    import onnx

    from fp16guard.fixing import OnnxFixTarget, verify
    from fp16guard.fp16_onnx import to_typed_fp16

    try:
        model = onnx.load(str(onnx_path))
    except Exception as e:  # noqa: BLE001 - protobuf and IO errors
        raise ModelLoadError(f"cannot read the exported ONNX {onnx_path}: {e}") from None
    fp16, _ = to_typed_fp16(model)
    verification, _ = verify(OnnxFixTarget(model), fp16, inputs, ["export"] * len(inputs), backend=backend,
                             variant="exported")
    return verification
