"""Files fp16guard reads and writes: refused in one line when they cannot be, and written atomically.

* :func:`check_readable`: a path a command reads must be a readable regular file (not missing, a
  folder, a symlink loop, a FIFO that would block the read forever).
* :func:`check_writable`: a path a command writes is checked before any work (its folder, a name
  the filesystem takes, not a FIFO or device, not a hard link or symlink to a file the command reads).
* :func:`atomic_output`: every output is written to a temporary file in the target folder and
  renamed over the target only when complete (``os.replace``, atomic on POSIX within one
  filesystem), so an error, a full disk, Ctrl-C or SIGTERM leaves no partial file and an existing
  file untouched. :func:`terminate_as_interrupt` makes SIGTERM unwind like Ctrl-C so the temporary
  file is removed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import stat
import tempfile
from pathlib import Path
from typing import Iterator

from fp16guard.errors import Fp16GuardError, UsageError


def check_readable(path: str | Path, what: str, error: type[Fp16GuardError] = UsageError) -> None:
    """Refuse, in one line, a ``path`` that is not a readable regular file.

    Args:
        path: the file a command reads.
        what: what it is, for the message (``"ONNX model"``, ``"checkpoint"``, ``"plan"``).
        error: the error class raised (``ModelLoadError`` for models, ``InputError`` for inputs).

    Raises:
        error: missing (``"<what> not found: <path>"``), a folder, a symlink loop, not a regular
            file (a FIFO, socket or device, whose read can block forever), or not readable.
    """
    path = Path(path)
    try:
        st = path.stat()
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise error(f"{what} {path} is a symlink loop; give the file itself") from None
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            raise error(f"{what} not found: {path}") from None
        if e.errno == errno.ENAMETOOLONG:
            raise error(f"{what} {str(path)[:60]}...: the name is too long for the filesystem") from None
        raise error(f"{what} {path}: cannot read it ({e.strerror})") from None
    if stat.S_ISDIR(st.st_mode):
        raise error(f"{path} is a folder, not {_article(what)} {what} file")
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{what} {path} is not a regular file (a FIFO, socket or device); give a file")
    if not os.access(path, os.R_OK):
        raise error(f"{what} {path}: permission denied; make it readable")


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeio" else "a"


def check_writable(path: str | Path, flag: str, *, reads: dict[tuple[int, int], str] | None = None) -> Path:
    """Check, before any work, that ``path`` can be written as an output: returns it resolved.

    Args:
        path: the output path as given.
        flag: the option that named it (``-o``, ``--json``), for the message.
        reads: ``(st_dev, st_ino) -> what`` of the files the command reads: an output that is the
            same file (the same path, a hard link or a symlink to it) is refused.

    Raises:
        UsageError: the path is a folder, a symlink loop, a FIFO/socket/device (writing would block or
            go elsewhere), a file the command reads, a name the filesystem refuses (too long); its
            folder is missing, not a folder or not writable.
    """
    given = str(path)
    try:
        p = Path(path).resolve(strict=False)
    except (OSError, RuntimeError) as e:  # RuntimeError: Python 3.10's symlink loop
        raise UsageError(f"{flag} {given}: {'is a symlink loop' if 'loop' in str(e).lower() else e}; give a plain "
                         f"file name") from None
    name_max = _name_max(p.parent)
    if len(os.fsencode(p.name)) + len(".tmp-XXXXXXXX.") > name_max:
        raise UsageError(f"{flag} {given[:60]}...: the file name has {len(os.fsencode(p.name))} bytes; this "
                         f"filesystem takes at most {name_max - 16} here (fp16guard writes a temporary file "
                         f"beside it); give a shorter name")
    try:
        st = os.stat(p)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UsageError(f"{flag} {given} is a symlink loop; give a plain file name") from None
        st = None
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            raise UsageError(f"{flag} {given} is a folder; give a file name inside it")
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"{flag} {given} is not a regular file (a FIFO, socket or device): fp16guard writes "
                             f"a file and renames it into place; give a file path")
        if reads and (st.st_dev, st.st_ino) in reads:
            raise UsageError(f"{flag} {given} would overwrite the {reads[(st.st_dev, st.st_ino)]} the command "
                             f"reads (the same file, or a link to it); write elsewhere")
    if not p.parent.exists():
        raise UsageError(f"{flag} {given}: the folder {Path(given).parent} does not exist; create it first")
    if not p.parent.is_dir():
        raise UsageError(f"{flag} {given}: {Path(given).parent} is not a folder")
    try:
        with tempfile.TemporaryFile(dir=p.parent):
            pass
    except OSError as e:
        raise UsageError(f"{flag} {given}: cannot write in {Path(given).parent} ({e.strerror}); pick a "
                         f"writable folder") from None
    return p


def _name_max(folder: Path) -> int:
    """The longest file name (bytes) the filesystem of ``folder`` takes (255 where unknown)."""
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def file_identity(path: str | Path) -> tuple[int, int] | None:
    """``(st_dev, st_ino)`` of an existing file (links to it share it), or None."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


@contextlib.contextmanager
def atomic_output(path: str | Path, mode: str = "wb") -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; rename it to ``path`` when the block ends
    without an exception, else remove it (``path`` keeps its old content or stays absent).

    The temporary file is ``.<name>.tmp-XXXXXXXX.<suffix>`` in the target's folder (the same
    filesystem, so the rename is atomic; the suffix is kept for writers that choose a format by
    it, such as matplotlib). Its data are flushed to disk (``fsync``) before the rename. A
    ``KeyboardInterrupt`` (Ctrl-C, or SIGTERM under :func:`terminate_as_interrupt`) removes it too.

    Raises:
        OSError: the write or the rename failed (a full disk: ``ENOSPC``); nothing is left.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:100]}.tmp-", suffix=path.suffix, dir=path.parent or ".")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        mode_bits = _mode_for(path)
        os.chmod(tmp_path, mode_bits)
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        raise


def _mode_for(path: Path) -> int:
    """The permission bits a new file gets (0o666 less the umask), or an existing file's own."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (:func:`atomic_output`); returns ``path``."""
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically (:func:`atomic_output`); returns ``path``."""
    return write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """For the block, SIGTERM raises ``KeyboardInterrupt`` as Ctrl-C does, so ``finally`` blocks
    run and :func:`atomic_output` removes its temporary file (the default SIGTERM action ends the
    process at once). Only in the main thread; elsewhere the block runs as it is."""
    try:
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread by :func:`terminate_as_interrupt`; ``signum`` is the signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signum}")
        self.signum = signum


def _raise_interrupt(signum, frame):
    raise Terminated(signum)


class OutputSet:
    """The files one command writes, made visible together: each writer gets a temporary path
    beside its target (:meth:`path`); when the block ends without an exception every temporary
    file is renamed over its target (:meth:`commit`), otherwise all are removed, so a failure in
    the last output (``--json``, ``--plot``) leaves no first output (``-o``) behind it either.

    Usage::

        with OutputSet() as outputs:
            onnx.save(model, outputs.path("fixed.onnx"))
            write(report, outputs.path("fix.json"))
        # both files exist now, or neither does
    """

    def __init__(self) -> None:
        self._pending: list[tuple[Path, Path]] = []

    def path(self, target: str | Path) -> Path:
        """A new temporary file beside ``target`` (same suffix) to write instead of ``target``."""
        target = Path(target)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name[:100]}.tmp-", suffix=target.suffix,
                                   dir=target.parent or ".")
        os.close(fd)
        self._pending.append((Path(tmp), target))
        return Path(tmp)

    def commit(self) -> None:
        """Flush each written temporary file to disk and rename it over its target.

        Raises:
            OSError: a flush or rename failed; the files not yet renamed are removed.
        """
        try:
            for tmp, target in self._pending:
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
                os.chmod(tmp, _mode_for(target))
            for tmp, target in self._pending:
                os.replace(tmp, target)
        finally:
            self.discard()

    def discard(self) -> None:
        """Remove every temporary file still pending."""
        for tmp, _ in self._pending:
            with contextlib.suppress(OSError):
                tmp.unlink()
        self._pending = []

    def __enter__(self) -> "OutputSet":
        return self

    def __exit__(self, kind, value, tb) -> None:
        if kind is None:
            self.commit()
        else:
            self.discard()
