"""Result folders that lose nothing: one writer, manifest first, atomic units, checksums.

Every folder jaxcfl writes results to (a sweep's ``out``, a training run's
``out``, a ``reproduce`` experiment's ``--out``) is a :class:`ResultFolder`:

* **One writer.** An exclusive OS lock (``fcntl.flock`` on ``.jaxcfl.lock``) is
  held for the folder's lifetime. A second writer gets :class:`FolderInUse` at
  once, naming the folder and the holder's process id. The kernel drops the
  lock when its process dies, so a run killed with ``kill -9`` never blocks its
  own resume.
* **Manifest first.** ``manifest.json`` (what the folder holds: its kind and the
  settings that define it) is written before any result. A folder that holds
  something else is refused.
* **Atomic units.** A unit of work (a sweep chunk, a training checkpoint) is
  one file, written to a temporary name, flushed to disk and renamed into
  place; its SHA-256 then enters the manifest, itself replaced atomically. The
  manifest's entry is the commit: a unit whose file is missing, or whose bytes
  do not match, was never committed (a crash between the two renames) or was
  damaged since, and :meth:`ResultFolder.read` reports which.
* **The umask is honoured** (:func:`jaxcfl._core.io.atomic_open`).
* **One writer across processes.** In a multi-process run (:mod:`jaxcfl._core.distributed`) a
  folder opened by every process is *shared*: only process 0 creates, locks, writes and
  reads it; every method is a collective that every process calls at the same point, and
  its outcome (the bytes read, the error raised) is process 0's, on every process. The
  other processes need not see the folder at all (no shared file system is assumed).
  Inside :func:`jaxcfl._core.distributed.on_leader` process 0 uses it alone; inside
  :func:`jaxcfl._core.distributed.process_local` a folder belongs to the process that opens it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from jaxcfl._core.io import atomic_open
from jaxcfl._version import __version__

__all__ = ["MANIFEST", "LOCK", "FolderInUse", "FolderMismatch", "sha256", "ResultFolder"]

try:  # POSIX; elsewhere folders are not locked (documented in docs/reliability.md)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

MANIFEST = "manifest.json"
LOCK = ".jaxcfl.lock"
T = TypeVar("T")


class FolderInUse(RuntimeError):
    """Another live process writes to this folder."""


class FolderMismatch(ValueError):
    """The folder holds other results (another kind, other settings) or no readable manifest."""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _plain_json(value: Any) -> Any:
    """``value`` as JSON would read it back (tuples become lists), for comparing settings."""
    return json.loads(json.dumps(value))


class ResultFolder:
    """An output folder, locked while open, whose every result file is checksummed in its manifest.

    Args:
      path: the folder (created if missing).
      kind: what it holds, e.g. ``"sweep"`` or ``"train"``.
      settings: what defines its results (JSON-serialisable); a folder whose
        manifest records other settings is refused, naming the keys that differ.
      label: the argument name to use in messages (e.g. ``"out"``).

    Use it as a context manager, or call :meth:`open` and :meth:`close`.
    """

    def __init__(self, path: str | os.PathLike, *, kind: str, settings: Mapping[str, Any], label: str = "out"):
        self.path = Path(path)
        self.kind = kind
        self.settings = _plain_json(dict(settings))
        self.label = label
        self._lock_fd: int | None = None
        self._files: dict[str, str] = {}
        self._shared = False  # opened by every process of a multi-process run: process 0 does the I/O
        self._follower = False  # a shared folder seen from a process other than 0

    def __repr__(self) -> str:
        return f"ResultFolder({str(self.path)!r}, kind={self.kind!r})"

    # --- lifetime -------------------------------------------------------------------------

    def open(self) -> "ResultFolder":
        if self.is_open:
            return self
        from jaxcfl._core import distributed as distributed
        if not distributed.shares_folders():
            self._open_here()
            return self
        files = distributed.on_leader(self._open_here)  # every process raises process 0's error, if any
        self._shared, self._follower = True, not distributed.is_leader()
        self._files = dict(files)
        return self

    def _open_here(self) -> dict[str, str]:
        if self.path.exists() and not self.path.is_dir():
            raise FolderMismatch(f"{self.label}={str(self.path)!r} is a file, not a folder; give a folder "
                                 f"(it is created if missing)")
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock()
        try:
            self._start_or_resume()
        except BaseException:
            self.close()
            raise
        return dict(self._files)

    def close(self) -> None:
        """Release the lock (the results stay). Not a collective: each process closes its own handle."""
        self._shared = self._follower = False
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)  # closing the descriptor releases the flock

    def __enter__(self) -> "ResultFolder":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):  # a folder dropped without close() must not stay locked in a long-lived process
        try:
            self.close()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass

    @property
    def is_open(self) -> bool:
        return self._lock_fd is not None or self._follower

    def _on_writer(self, fn: Callable[[], T]) -> T:
        """``fn()`` here; for a shared folder, on process 0, its result (or error) on every process."""
        if not self._shared:
            return fn()
        from jaxcfl._core import distributed as distributed
        return distributed.on_leader(fn)

    def _lock(self) -> None:
        fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                if err.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise FolderInUse(f"{self.label}={str(self.path)!r} is in use by another jaxcfl process "
                                      f"(pid {holder}); wait for it to finish, or use another folder") from None
                raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def _start_or_resume(self) -> None:
        manifest = self.path / MANIFEST
        if not manifest.exists():
            others = [p.name for p in self.path.iterdir() if p.name != LOCK]
            if others:
                raise FolderMismatch(f"{self.label}={str(self.path)!r} is not empty and holds no jaxcfl manifest "
                                     f"({', '.join(sorted(others)[:3])}{', ...' if len(others) > 3 else ''}); "
                                     f"use an empty or new folder")
            self._files = {}
            self._write_manifest()
            return
        try:
            stored = json.loads(manifest.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise FolderMismatch(f"{self.label}={str(self.path)!r}: its {MANIFEST} is unreadable ({err}); "
                                 f"use an empty folder") from None
        if not isinstance(stored, dict) or not isinstance(stored.get("files", {}), dict):
            raise FolderMismatch(f"{self.label}={str(self.path)!r}: its {MANIFEST} is not a jaxcfl manifest; "
                                 f"use an empty folder")
        if stored.get("kind", self.kind) != self.kind:
            raise FolderMismatch(f"{self.label}={str(self.path)!r} holds a {stored.get('kind')} result, not a {self.kind}; "
                                 f"use another folder")
        theirs = stored.get("settings", stored.get("spec"))
        if theirs != self.settings:
            theirs = theirs if isinstance(theirs, dict) else {}
            diff = sorted(k for k in set(theirs) | set(self.settings) if theirs.get(k) != self.settings.get(k))
            raise FolderMismatch(f"{self.label}={str(self.path)!r} holds a different {self.kind} "
                                 f"(differs in: {', '.join(diff)}); use another folder")
        self._files = {str(k): str(v) for k, v in stored.get("files", {}).items()}

    def _write_manifest(self) -> None:
        payload = dict(jaxcfl=__version__, kind=self.kind, settings=self.settings, files=self._files)
        with atomic_open(self.path / MANIFEST, "w") as fh:
            json.dump(payload, fh, indent=1, allow_nan=False)

    # --- units ------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if not self.is_open:
            raise RuntimeError(f"{self!r} is not open; use it in a with block or call open()")

    def commit(self, name: str, data: bytes) -> Path:
        """Write the unit ``name`` atomically and record its checksum: after this, it is committed."""
        self._check_open()
        path, self._files[name] = self._on_writer(lambda: self._commit_here(name, data))
        return path

    def _commit_here(self, name: str, data: bytes) -> tuple[Path, str]:
        path = self.path / name
        with atomic_open(path, "wb") as fh:
            fh.write(data)
        self._files[name] = sha256(data)
        self._write_manifest()
        return path, self._files[name]

    def read(self, name: str) -> tuple[bytes | None, str]:
        """``(data, state)`` of unit ``name``; ``data`` is ``None`` unless ``state == "ok"``.

        ``state`` is ``"ok"``, ``"absent"`` (never committed), ``"missing"``
        (committed, file gone) or ``"corrupt"`` (its bytes do not match the
        checksum: damaged, or another file copied over it). A shared folder: process 0's
        reading, on every process.
        """
        return self._on_writer(lambda: self._read_here(name))

    def _read_here(self, name: str) -> tuple[bytes | None, str]:
        expected = self._files.get(name)
        if expected is None:
            return None, "absent"
        try:
            data = (self.path / name).read_bytes()
        except FileNotFoundError:
            return None, "missing"
        if sha256(data) != expected:
            return None, "corrupt"
        return data, "ok"

    def adopt(self, name: str) -> None:
        """Record the checksum of ``name``, a file written into the folder by another writer (a figure)."""
        self.adopt_present([name], missing_ok=False)

    def adopt_present(self, names: Iterable[str], *, missing_ok: bool = True) -> None:
        """:meth:`adopt` each of ``names`` that is a file (all of them, unless ``missing_ok``), in one step."""
        self._check_open()
        names = list(names)
        self._files.update(self._on_writer(lambda: self._adopt_here(names, missing_ok)))

    def _adopt_here(self, names: list[str], missing_ok: bool) -> dict[str, str]:
        found = {name: sha256((self.path / name).read_bytes()) for name in names
                 if not missing_ok or (self.path / name).is_file()}
        if found:
            self._files.update(found)
            self._write_manifest()
        return found

    def forget(self, name: str) -> None:
        """Drop the unit ``name`` from the manifest (its file, if any, is left to be overwritten)."""
        self._check_open()
        self._on_writer(lambda: self._forget_here(name))
        self._files.pop(name, None)

    def _forget_here(self, name: str) -> None:
        if self._files.pop(name, None) is not None:
            self._write_manifest()

    @property
    def files(self) -> dict[str, str]:
        """The committed units and their SHA-256 digests."""
        return dict(self._files)
