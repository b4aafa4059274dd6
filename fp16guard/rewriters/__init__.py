"""mmdeploy function rewriters driven by an fp16guard plan.

``import fp16guard.rewriters`` registers, when mmdeploy is installed, FUNCTION_REWRITERs for the
TensorRT backend (:mod:`fp16guard.rewriters.mmdeploy_rewriters`):

* ``mmdet.models.backbones.resnet.BasicBlock.forward``
* ``mmocr.models.textdet.necks.fpem_ffm.FPEM_FFM.forward``
* generic: ``torch.nn.Conv1d/2d/3d``, ``Linear``, ``_BatchNorm``, ``LayerNorm`` and
  ``MultiheadAttention`` ``.forward`` (any codebase; DETR-style transformer layers)

They read the plan named in the deploy config (``fp16guard = dict(plan='plan.json')``) through
the rewriter context and apply it to the modules the plan lists (matched by parameter
fingerprint, :mod:`fp16guard.fixing.module_scales`); without that key, or for modules the plan does not
list, they call the original function. An mmdeploy deploy config can import them with
``custom_imports = dict(imports=['fp16guard.rewriters'], allow_failed_imports=False)``.

The scaled forwards themselves are plain PyTorch (:mod:`fp16guard.rewriters.blocks`) and import
without mmdeploy.
"""

from __future__ import annotations

import importlib
import importlib.util

if importlib.util.find_spec("mmdeploy") is not None:
    importlib.import_module(f"{__name__}.mmdeploy_rewriters")  # registers the rewriters
