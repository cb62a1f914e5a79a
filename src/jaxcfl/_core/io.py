"""File helpers shared by everything that writes results as it goes."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["TEMP_SUFFIX", "append_at", "atomic_open", "fsync_dir", "publish", "write_temp"]

TEMP_SUFFIX = ".partial"
"""The suffix of the temporary files of :func:`write_temp`: a file named ``.NAME.XXXXXXXX.partial`` is a write
that never finished (its writer was killed), which :class:`jaxcfl._core.folder.ResultFolder` removes."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush the directory ``path`` (its entries: a rename, a new file) to disk; a no-op where directories
    cannot be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - file systems that refuse to flush a directory
        pass
    finally:
        os.close(fd)


def write_temp(path: str | os.PathLike, data: bytes) -> Path:
    """``data`` in a new temporary file beside ``path``, flushed to disk, with the mode an ordinary ``open``
    would give it; returns the temporary file (for :func:`publish`). Removed again if the write fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
    except BaseException:
        os.unlink(tmp)
        raise
    return Path(tmp)


def publish(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Move the finished temporary file ``tmp`` onto ``path`` in one step (``os.replace``) and flush the directory."""
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)


def append_at(path: str | os.PathLike, data: bytes, at: int, *, sync: bool = True) -> int:
    """Write ``data`` at byte ``at`` of ``path`` (created if missing), dropping whatever followed ``at``; returns
    the new length. What lay beyond ``at`` was never committed (a write cut short by a kill), so an append
    starts where the committed bytes end. ``sync``: flush the file to disk before returning.

    Raises:
      ValueError: the file is shorter than ``at`` (committed bytes were lost).
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        size = os.fstat(fd).st_size
        if size < at:
            raise ValueError(f"{path} holds {size} bytes, fewer than the {at} committed")
        if size > at:
            os.ftruncate(fd, at)
        os.lseek(fd, at, os.SEEK_SET)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
    return at + len(data)


class atomic_open:
    """Write to a temporary file in the same directory, flush it to disk, then ``os.replace`` it into place.

    A reader (or a resumed run) sees either the old file or the complete new one,
    never a partial write, even if the process is killed mid-write. The file gets
    the mode an ordinary ``open`` would give it (``0o666`` less the umask), not
    the ``0o600`` of a temporary file.
    """

    def __init__(self, path: str | os.PathLike, mode: str, **kw):
        self.path, self.mode, self.kw = Path(path), mode, kw

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=TEMP_SUFFIX, dir=self.path.parent)
        self.fh = os.fdopen(fd, self.mode, **self.kw)
        return self.fh

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                self.fh.flush()
                os.fsync(self.fh.fileno())
        finally:
            self.fh.close()
        if exc_type is None:
            os.chmod(self.tmp, 0o666 & ~_umask())
            publish(self.tmp, self.path)
        else:
            os.unlink(self.tmp)
        return False
