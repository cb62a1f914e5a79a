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
  something else is refused, naming the settings that differ; settings named in
  ``grows`` (a list, e.g. the seeds of a variance grid) may gain values instead, and the
  manifest records their union.
* **Atomic units, and a kill at any instant keeps the last commit.** A unit of work (a
  sweep chunk, a training checkpoint) is one file. Its bytes go to a temporary file,
  flushed to disk; then the manifest records the new SHA-256 *and the previous one*
  (``"previous"``), replaced atomically: that is the commit; then the temporary file is
  renamed over the unit. Killed before the manifest, the old unit and the old manifest
  stand; killed between the manifest and the rename, the old file matches the previous
  checksum, and the next :meth:`ResultFolder.open` takes it back as the committed unit;
  after the rename, the new unit stands. A unit whose bytes match neither was damaged
  since, and :meth:`ResultFolder.read` says so. Temporary files of killed writes
  (``.NAME.*.partial``) are removed when the folder is opened.
* **Journals: appends that cost what they add.** :meth:`ResultFolder.append` adds a
  record (its length and SHA-256 in front of it) to an append-only file, flushed to disk;
  a unit committed afterwards records how many bytes of the journal it vouches for, and
  :meth:`ResultFolder.records` reads those bytes back, checking every record. A training
  run appends one record per epoch instead of rewriting its whole history.
* **A folder it cannot write is one clear error**: :class:`FolderNotWritable` (a
  ``PermissionError`` and a ``ValueError``), naming the folder, instead of a traceback.
* **The umask is honoured** (:func:`jaxcfl._core.io.atomic_open`).
* **One writer across processes.** In a multi-process run (:mod:`jaxcfl.distributed`) a
  folder opened by every process is *shared*: only process 0 creates, locks, writes and
  reads it; every method is a collective that every process calls at the same point, and
  its outcome (the bytes read, the error raised) is process 0's, on every process. The
  other processes need not see the folder at all (no shared file system is assumed).
  Inside :func:`jaxcfl.distributed.on_leader` process 0 uses it alone; inside
  :func:`jaxcfl.distributed.process_local` a folder belongs to the process that opens it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import struct
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from jaxcfl._core.io import TEMP_SUFFIX, append_at, atomic_open, publish, write_temp
from jaxcfl._version import __version__

__all__ = ["MANIFEST", "LOCK", "FolderInUse", "FolderMismatch", "FolderNotWritable", "sha256", "ResultFolder"]

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


class FolderNotWritable(PermissionError, ValueError):
    """The folder (or a file in it) cannot be created or written: read-only, or another user's."""

    def __str__(self) -> str:  # the message alone, without OSError's "[Errno 13]"
        return str(self.strerror if self.strerror is not None else super().__str__())


_NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)

_RECORD = struct.Struct("<4sQ32s")  # magic, payload length, SHA-256 of the payload
_MAGIC = b"jxr1"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _short(value: Any, most: int = 40) -> str:
    """``value`` as JSON, cut to ``most`` characters, for a message."""
    text = json.dumps(value)
    return text if len(text) <= most else text[:most - 3] + "..."


def _plain_json(value: Any) -> Any:
    """``value`` as JSON would read it back (tuples become lists), for comparing settings."""
    return json.loads(json.dumps(value))


def _is_partial_write(name: str) -> bool:
    """Whether ``name`` is the temporary file of a write that never finished (``.NAME.*.partial``)."""
    return name.startswith(".") and name.endswith(TEMP_SUFFIX)


class ResultFolder:
    """An output folder, locked while open, whose every result file is checksummed in its manifest.

    Args:
      path: the folder (created if missing).
      kind: what it holds, e.g. ``"sweep"`` or ``"train"``.
      settings: what defines its results (JSON-serialisable); a folder whose
        manifest records other settings is refused, naming the keys that differ.
      label: the argument name to use in messages (e.g. ``"out"``).
      grows: keys of ``settings`` whose values are lists that a later run may extend
        (new seeds of a grid): they are not compared; once open, ``settings[key]`` is
        the folder's values followed by the new ones, and the manifest records them.

    Use it as a context manager, or call :meth:`open` and :meth:`close`.
    """

    def __init__(self, path: str | os.PathLike, *, kind: str, settings: Mapping[str, Any], label: str = "out",
                 grows: Sequence[str] = ()):
        self.path = Path(path)
        self.kind = kind
        self.settings = _plain_json(dict(settings))
        self.label = label
        self.grows = tuple(grows)
        for key in self.grows:
            if not isinstance(self.settings.get(key), list):
                raise TypeError(f"grows: settings[{key!r}] must be a list, got {self.settings.get(key)!r}")
        self._lock_fd: int | None = None
        self._files: dict[str, str] = {}
        self._previous: dict[str, str | None] = {}  # the unit being committed: its checksum before (None: absent)
        self._journals: list[str] = []
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
        files, settings = distributed.on_leader(self._open_here)  # every process raises process 0's error, if any
        self._shared, self._follower = True, not distributed.is_leader()
        self._files, self.settings = dict(files), settings
        return self

    def _open_here(self) -> tuple[dict[str, str], dict[str, Any]]:
        if self.path.exists() and not self.path.is_dir():
            raise FolderMismatch(f"{self.label}={str(self.path)!r} is a file, not a folder; give a folder "
                                 f"(it is created if missing)")
        with self._writable():
            self.path.mkdir(parents=True, exist_ok=True)
            self._lock()
        try:
            with self._writable():
                self._start_or_resume()
        except BaseException:
            self.close()
            raise
        return dict(self._files), dict(self.settings)

    @contextlib.contextmanager
    def _writable(self) -> Iterator[None]:
        """Turn "permission denied" and "read-only file system" into :class:`FolderNotWritable`, naming the folder."""
        try:
            yield
        except OSError as err:
            if isinstance(err, FolderNotWritable) or err.errno not in _NOT_WRITABLE:
                raise
            where = f" ({err.filename})" if err.filename and str(err.filename) != str(self.path) else ""
            message = (f"{self.label}={str(self.path)!r} cannot be written: {os.strerror(err.errno).lower()}{where}; "
                       f"give a folder you can write to")
            raise FolderNotWritable(err.errno, message) from None

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
            others = [p.name for p in self.path.iterdir() if p.name != LOCK and not _is_partial_write(p.name)]
            if not others:  # a kill during the first manifest write leaves only its temporary file
                self._remove_partial_writes()
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
        rewrite = False
        if theirs == {} and self.settings and stored.get("kind") == self.kind:
            # Written before its command recorded what defines it: adopted, and its units checked one by one.
            warnings.warn(f"{self.label}={str(self.path)!r}: its {MANIFEST} records no settings (an older jaxcfl); "
                          f"taking it as this {self.kind}'s folder", stacklevel=5)
            theirs, rewrite = dict(self.settings), True
        theirs = theirs if isinstance(theirs, dict) else {}
        grown = {}
        for key in self.grows:
            old = theirs.get(key, [])
            old = old if isinstance(old, list) else [old]
            grown[key] = old + [x for x in self.settings[key] if x not in old]
            rewrite = rewrite or grown[key] != theirs.get(key)
        fixed = lambda d: {k: d.get(k) for k in set(theirs) | set(self.settings) if k not in self.grows}
        if fixed(theirs) != fixed(self.settings):
            diff = sorted(k for k, value in fixed(theirs).items() if value != fixed(self.settings)[k])
            values = "; ".join(f"{k}={_short(theirs.get(k))} in the folder, {_short(self.settings.get(k))} now"
                               for k in diff[:3])
            raise FolderMismatch(f"{self.label}={str(self.path)!r} holds a different {self.kind} "
                                 f"(differs in: {', '.join(diff)}): {values}; use another folder")
        self.settings.update(grown)
        self._remove_partial_writes()  # the folder is this run's: what a killed write left can go
        self._files = {str(k): str(v) for k, v in stored.get("files", {}).items()}
        journals = stored.get("journals", [])
        self._journals = [str(j) for j in journals] if isinstance(journals, list) else []
        previous = stored.get("previous", {})
        if isinstance(previous, dict) and previous:
            self._settle(previous)
            rewrite = True
        if rewrite:
            self._write_manifest()

    def _settle(self, previous: Mapping[str, Any]) -> None:
        """Finish the commit a kill interrupted: a unit whose file still holds its previous bytes (the rename
        never happened) is that previous unit again; a unit that was new and never landed is absent."""
        for name, before in previous.items():
            if name not in self._files:
                continue
            try:
                digest = sha256((self.path / name).read_bytes())
            except FileNotFoundError:
                digest = None
            if digest == self._files[name]:
                continue  # the rename happened: the new unit stands
            if before is None:
                del self._files[name]  # a new unit that never landed: absent (a file there is left to be overwritten)
            elif digest == before:
                self._files[name] = str(before)  # the rename never happened: the previous unit stands
            # else: neither, damaged since; read() reports it

    def _remove_partial_writes(self) -> None:
        """Remove the temporary files (``.NAME.*.partial``) that killed writes left, here and in sub-folders
        that are not result folders of their own."""
        for root, dirs, names in os.walk(self.path):
            if root != str(self.path) and (LOCK in names or MANIFEST in names):
                dirs[:] = []  # another folder, with a writer of its own
                continue
            for name in names:
                if _is_partial_write(name):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(root, name))

    def _write_manifest(self) -> None:
        payload = dict(jaxcfl=__version__, kind=self.kind, settings=self.settings, files=self._files)
        if self._journals:
            payload["journals"] = self._journals
        if self._previous:
            payload["previous"] = self._previous
        with atomic_open(self.path / MANIFEST, "w") as fh:
            json.dump(payload, fh, indent=1, allow_nan=False)

    # --- units ------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if not self.is_open:
            raise RuntimeError(f"{self!r} is not open; use it in a with block or call open()")

    def commit(self, name: str, data: bytes) -> Path:
        """Write the unit ``name`` atomically and record its checksum: after this, it is committed.

        Killed at any instant, the folder holds the new unit or, when the kill came first, the
        one committed before it (module docstring)."""
        self._check_open()
        path, self._files[name] = self._on_writer(lambda: self._commit_here(name, data))
        return path

    def _commit_here(self, name: str, data: bytes) -> tuple[Path, str]:
        path = self.path / name
        with self._writable():
            tmp = write_temp(path, data)
            before = self._files.get(name)
            try:
                self._files[name], self._previous = sha256(data), {name: before}
                self._write_manifest()  # the commit: the new checksum, and the previous one until the rename
            except BaseException:
                self._restore(name, before)
                os.unlink(tmp)
                raise
            finally:
                self._previous = {}  # the next manifest drops it: this rename is done by then, or settled on open
            try:
                publish(tmp, path)
            except BaseException:
                self._restore(name, before)
                raise
        return path, self._files[name]

    def _restore(self, name: str, digest: str | None) -> None:
        if digest is None:
            self._files.pop(name, None)
        else:
            self._files[name] = digest

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
            with self._writable():
                self._write_manifest()
        return found

    def forget(self, name: str) -> None:
        """Drop the unit ``name`` from the manifest (its file, if any, is left to be overwritten)."""
        self._check_open()
        self._on_writer(lambda: self._forget_here(name))
        self._files.pop(name, None)

    def _forget_here(self, name: str) -> None:
        if self._files.pop(name, None) is not None:
            with self._writable():
                self._write_manifest()

    # --- journals ---------------------------------------------------------------------------

    def append(self, name: str, data: bytes, *, at: int) -> int:
        """Add ``data`` as one record to the journal ``name``, after its first ``at`` bytes; returns its new length.

        What followed ``at`` is dropped (an append that no commit vouched for). The record is
        flushed to disk, but committed only by a unit committed afterwards that records the
        returned length (:meth:`records` reads that many bytes back).
        """
        self._check_open()
        return self._on_writer(lambda: self._append_here(name, data, at))

    def _append_here(self, name: str, data: bytes, at: int) -> int:
        with self._writable():
            if name not in self._journals:
                self._journals.append(name)
                self._write_manifest()
            frame = _RECORD.pack(_MAGIC, len(data), hashlib.sha256(data).digest()) + data
            return append_at(self.path / name, frame, at)

    def records(self, name: str, length: int) -> tuple[list[bytes] | None, str]:
        """``(records, state)``: the records in the first ``length`` bytes of the journal ``name``.

        ``state`` is ``"ok"``, ``"missing"`` (no file, or fewer than ``length`` bytes) or
        ``"corrupt"`` (a record whose bytes do not match its checksum, or a cut record);
        ``records`` is ``None`` unless ``"ok"``. Bytes after ``length`` are not read.
        """
        self._check_open()
        return self._on_writer(lambda: self._records_here(name, length))

    def _records_here(self, name: str, length: int) -> tuple[list[bytes] | None, str]:
        if length == 0:
            return [], "ok"
        try:
            with open(self.path / name, "rb") as fh:
                data = fh.read(length)
        except FileNotFoundError:
            return None, "missing"
        if len(data) < length:
            return None, "missing"
        out, pos = [], 0
        while pos < length:
            if length - pos < _RECORD.size:
                return None, "corrupt"
            magic, size, digest = _RECORD.unpack_from(data, pos)
            payload = data[pos + _RECORD.size:pos + _RECORD.size + size]
            if magic != _MAGIC or len(payload) != size or hashlib.sha256(payload).digest() != digest:
                return None, "corrupt"
            out.append(payload)
            pos += _RECORD.size + size
        return out, "ok"

    def write_plain(self, name: str, data: bytes, *, at: int | None = None) -> int:
        """A file that is no unit (a view derived from committed units, e.g. a CSV of a journal): written
        atomically whole (``at=None``), or ``data`` appended after its first ``at`` bytes without a flush.
        Not recorded in the manifest; returns the file's new length."""
        self._check_open()
        return self._on_writer(lambda: self._write_plain_here(name, data, at))

    def _write_plain_here(self, name: str, data: bytes, at: int | None) -> int:
        with self._writable():
            if at is None:
                with atomic_open(self.path / name, "wb") as fh:
                    fh.write(data)
                return len(data)
            try:
                size = (self.path / name).stat().st_size
            except FileNotFoundError:
                size = 0
            return append_at(self.path / name, data, min(at, size), sync=False)  # a view cut short stays a view

    @property
    def files(self) -> dict[str, str]:
        """The committed units and their SHA-256 digests."""
        return dict(self._files)
