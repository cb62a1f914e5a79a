"""File helpers shared by everything that writes results as it goes."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["atomic_open"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


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
        fd, self.tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
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
            os.replace(self.tmp, self.path)
        else:
            os.unlink(self.tmp)
        return False
