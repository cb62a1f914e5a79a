"""What every experiment does with its results: one folder, atomic files, a row cache, a clock, a log.

The ``jaxcfl reproduce`` experiments and the ``variance`` and ``determinism`` commands
(:mod:`jaxcfl.experiments`) all write through this module:

* :class:`ResultDir`: the output folder (or none: ``ResultDir(None)`` writes nothing and
  reuses nothing) and the experiment's clock. Its ``write_*`` methods put a file in the
  folder atomically (:class:`jaxcfl._core.io.atomic_open`: a reader, or a resumed run, sees
  the old file or the whole new one, never a part); ``finish`` records the files and the
  seconds in the payload and writes it as the run's JSON;
* :class:`RowCache`: finished rows, one JSON file each, reused by a rerun whose settings
  match (``ResultDir.row_cache``);
* :func:`write_json`, :func:`write_csv`, :func:`write_npz`, :func:`read_json`: the same
  writers for files outside a :class:`ResultDir` (a run's sub-folders);
* :func:`jsonable`: strict JSON values (non-finite floats become ``null``);
* :class:`Stopwatch`, :func:`stderr`: elapsed seconds and the progress log;
* :func:`sweep_chunks_on_disk`: the finished chunks of a resumable :func:`jaxcfl.sweep` folder.

Every path in an experiment's folder comes from :meth:`ResultDir.file` (the ``write_*``
methods, :meth:`~ResultDir.finish` and the :class:`RowCache` use it; figures are saved
with ``plot.save(fig, results.file(name))``, sweeps and training runs get their
sub-folders from it), so that what a result folder promises (a lock for its lifetime,
taken where the folder is made; a checksum per file; a manifest completed by
``finish``: ``docs/reliability.md``) can be added here once, for every experiment. This module is
one of the shared pieces (it imports no PDE, network or front-end module).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxcfl._core.folder import MANIFEST, ResultFolder
from jaxcfl._core.io import atomic_open

__all__ = [
    "ResultDir",
    "RowCache",
    "Stopwatch",
    "identity_json",
    "jsonable",
    "read_json",
    "stderr",
    "sweep_chunks_on_disk",
    "write_csv",
    "write_json",
    "write_npz",
]


def stderr(message: str) -> None:
    """The experiments' default progress log: a line on stderr, so that ``--json`` output on stdout stays pure."""
    print(message, file=sys.stderr, flush=True)


class Stopwatch:
    """Wall-clock seconds since it was made (:func:`time.perf_counter`)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def seconds(self) -> float:
        return time.perf_counter() - self.start


# --- files -----------------------------------------------------------------------------------------

def jsonable(value: Any) -> Any:
    """``value`` with strict-JSON leaves: non-finite floats become ``None``; NumPy and JAX scalars and
    arrays become Python numbers and lists; tuples become lists. Anything else is left to :mod:`json`."""
    if isinstance(value, Mapping):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, np.generic) or hasattr(value, "__array__"):
        return jsonable(np.asarray(value).tolist())
    return value


def non_finite_paths(value: Any, path: str = "") -> list[str]:
    """JSON-pointer-like paths (``/rows/3/alpha_min``) of the NaN and infinite floats in ``value``."""
    if isinstance(value, Mapping):
        return [p for k, v in value.items() for p in non_finite_paths(v, f"{path}/{k}")]
    if isinstance(value, (list, tuple)):
        return [p for i, v in enumerate(value) for p in non_finite_paths(v, f"{path}/{i}")]
    if isinstance(value, (float, np.floating)) or (hasattr(value, "__array__") and not isinstance(value, (str, bytes))):
        arr = np.asarray(value)
        if arr.dtype.kind in "fc" and not np.all(np.isfinite(arr)):
            return [path or "/"]
    return []


def strict_payload(payload: Any, *, most: int = 50) -> Any:
    """:func:`jsonable` of ``payload``; when it held NaN or infinities (now ``null``), a dict
    payload gains ``"non_finite"``: which values they were, and why they read ``null``."""
    clean = jsonable(payload)
    paths = non_finite_paths(payload)
    if paths and isinstance(clean, dict):
        clean["non_finite"] = dict(
            note="these values were NaN or infinite (a diverged run, an undefined statistic); strict JSON writes them as null",
            count=len(paths), paths=paths[:most])
    return clean


def json_text(payload: Any, *, strict: bool = True, indent: int = 1) -> str:
    """``payload`` as JSON text. ``strict``: through :func:`jsonable`, with ``allow_nan=False``
    (what other JSON readers accept). ``strict=False`` keeps NaN and infinities as Python writes
    them, so that a cache read back by :func:`read_json` gives the very values that were computed."""
    if strict:
        return json.dumps(jsonable(payload), indent=indent, allow_nan=False)
    return json.dumps(payload, indent=indent)


def write_json(path: str | os.PathLike, payload: Any, *, strict: bool = True, indent: int = 1) -> str:
    """Write :func:`json_text` of ``payload`` atomically; returns the path."""
    with atomic_open(path, "w") as fh:
        fh.write(json_text(payload, strict=strict, indent=indent))
    return str(path)


def read_json(path: str | os.PathLike) -> Any:
    """The JSON in ``path``, or ``None`` when it is missing or unreadable (a cache that is not there)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def csv_text(
    rows: Sequence[Mapping[str, Any]],
    *,
    joins: Mapping[str, str] | None = None,
    last: Sequence[str] = (),
    lineterminator: str = "\r\n",
) -> str:
    """``rows`` (dicts with the keys of the first) as CSV text.

    Args:
      rows: one dict per line; the columns are the first row's keys, in its order.
      joins: ``{column: separator}``: a list in that column is written as its items joined by
        the separator (``None``: empty).
      last: columns moved to the end, in this order.
      lineterminator: ``"\\r\\n"`` (the :mod:`csv` default) or ``"\\n"``.
    """
    if not rows:
        raise ValueError("no rows to write")
    joins = dict(joins or {})
    columns = [k for k in rows[0] if k not in last] + [k for k in last if k in rows[0]]
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator=lineterminator)
    writer.writeheader()
    for row in rows:
        writer.writerow({**row, **{k: sep.join(map(str, row[k] or [])) for k, sep in joins.items() if k in row}})
    return buf.getvalue()


def write_csv(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]], **options: Any) -> str:
    """Write :func:`csv_text` of ``rows`` atomically; returns the path."""
    if not rows:
        raise ValueError(f"no rows to write to {path}")
    text = csv_text(rows, **options)
    with atomic_open(path, "w", newline="") as fh:
        fh.write(text)
    return str(path)


def npz_bytes(arrays: Mapping[str, Any]) -> bytes:
    """``arrays`` as the bytes of an uncompressed ``.npz`` (:func:`numpy.savez`)."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def write_npz(path: str | os.PathLike, arrays: Mapping[str, Any]) -> str:
    """Write :func:`npz_bytes` of ``arrays`` atomically; returns the path."""
    with atomic_open(path, "wb") as fh:
        fh.write(npz_bytes(arrays))
    return str(path)


SWEEP_CHUNK = "chunk_{index:05d}.npz"
"""The file name of chunk ``index`` in a resumable :func:`jaxcfl.sweep` folder (:mod:`jaxcfl.pde._sweeps` writes it by this name)."""


def sweep_chunks_on_disk(folder: str | os.PathLike | None, chunks: int) -> int:
    """How many of chunks ``0 .. chunks - 1`` of the sweep folder ``folder`` are committed: on disk and
    recorded in its manifest (0 for ``None`` or a folder without a readable manifest). A report, read
    without the lock; the sweep itself checks each chunk's checksum before it reuses it."""
    if folder is None:
        return 0
    recorded = read_json(Path(folder) / MANIFEST)
    recorded = recorded.get("files") if isinstance(recorded, dict) else None
    if not isinstance(recorded, dict):
        return 0
    names = (SWEEP_CHUNK.format(index=i) for i in range(chunks))
    return sum(name in recorded and (Path(folder) / name).exists() for name in names)


# --- the folder ------------------------------------------------------------------------------------

def _float_dtype() -> str:
    """The working float dtype (``float64`` under ``jax_enable_x64``): part of every run's identity."""
    import jax

    return str(jax.dtypes.canonicalize_dtype(float))


def identity_json(identity: Mapping[str, Any]) -> dict[str, Any]:
    """``identity`` as the JSON a manifest records: tuples as lists, arrays as lists, named tuples,
    dataclasses and objects with ``to_dict()`` as dicts. Anything else is a ``TypeError`` naming the entry."""

    def plain(value: Any, where: str) -> Any:
        if hasattr(value, "to_dict") and callable(value.to_dict):
            value = value.to_dict()
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = dataclasses.asdict(value)
        elif isinstance(value, tuple) and hasattr(value, "_asdict"):
            value = value._asdict()
        if isinstance(value, Mapping):
            return {str(k): plain(v, f"{where}.{k}") for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
        value = jsonable(value)
        if isinstance(value, list):
            return [plain(v, where) for v in value]
        if value is None or isinstance(value, (str, bool, int, float)):
            return value
        raise TypeError(f"identity: {where} is a {type(value).__name__}, which a manifest cannot record")

    return {str(k): plain(v, str(k)) for k, v in identity.items()}


class RowCache:
    """Finished rows, one JSON unit each in a :class:`~jaxcfl._core.folder.ResultFolder`, reused by a rerun
    whose settings match.

    Args:
      folder: the open result folder (``None``: nothing is saved and nothing is found).
      name: the file name of a row (without ``.json``) from its settings, e.g.
        ``lambda s: f"{s['scheme']}_w{s['kernel_size']}"``.
      sub: the sub-folder of the row files.
    """

    def __init__(self, folder: ResultFolder | None, name: Callable[[Mapping[str, Any]], str], sub: str = "rows"):
        self.folder = folder
        self.name = name
        self.sub = sub

    def unit(self, settings: Mapping[str, Any]) -> str:
        """The row's name in the folder: ``sub/name.json``."""
        return f"{self.sub}/{self.name(settings)}.json"

    def path(self, settings: Mapping[str, Any]) -> Path:
        if self.folder is None:
            raise ValueError("this row cache has no folder")
        return self.folder.path / self.unit(settings)

    def load(self, settings: Mapping[str, Any]) -> dict[str, Any] | None:
        """The committed row whose every ``settings`` entry is equal, or ``None``.

        A row whose file no longer matches its checksum is recomputed (with a warning)."""
        if self.folder is None:
            return None
        data, state = self.folder.read(self.unit(settings))
        if state in ("missing", "corrupt"):
            warnings.warn(f"{self.folder.label}={str(self.folder.path)!r}: {self.unit(settings)} is {state}; "
                          f"recomputing it", stacklevel=2)
        try:
            row = None if data is None else json.loads(data)
        except ValueError:
            row = None
        if isinstance(row, dict) and all(row.get(k) == v for k, v in settings.items()):
            return row
        return None

    def save(self, settings: Mapping[str, Any], row: Mapping[str, Any]) -> None:
        """Commit ``row`` (which must hold ``settings``) for a rerun; nothing without a folder.

        Written as computed (``strict=False``: a NaN stays NaN), so that a rerun returns the
        row the first run returned.
        """
        if self.folder is not None:
            self.folder.commit(self.unit(settings), json_text(row, strict=False).encode())


class ResultDir:
    """An experiment's output folder, or none, and the experiment's clock.

    With a folder, it is a :class:`~jaxcfl._core.folder.ResultFolder` of kind ``kind``:
    locked from construction to :meth:`finish` (or :meth:`close`), with a
    manifest that records the checksum of every file written through
    :meth:`write_json`, :meth:`write_csv`, :meth:`write_npz` and the row caches,
    and of every file named through :meth:`file` (figures) when the run ends.

    ``identity`` says what defines the run (its arguments, less where its output goes and how
    it is shown), and the working float dtype is added to it: a folder that holds a run of
    another identity is refused with :class:`~jaxcfl._core.folder.FolderMismatch`, naming the
    entries that differ, so that no command writes over another run's results. The entries
    named in ``grows`` are lists that a rerun may extend (new seeds of a grid): the folder then
    holds, and :attr:`identity` gives, its earlier values followed by the new ones. A folder it
    cannot write is :class:`~jaxcfl._core.folder.FolderNotWritable`, naming it.

    ``ResultDir(None)`` writes nothing (``writes`` is False; its ``write_*`` methods raise)
    and its row caches find nothing. ``seconds()`` counts from construction either way, or
    from the start of ``clock`` when one is given.
    """

    def __init__(self, path: str | os.PathLike | None, *, kind: str = "experiment", clock: Stopwatch | None = None,
                 identity: Mapping[str, Any] | None = None, grows: Sequence[str] = ()):
        self.path = None if path is None else Path(path)
        self.clock = Stopwatch() if clock is None else clock
        self.identity: dict[str, Any] = {} if identity is None else identity_json({"dtype": _float_dtype(), **identity})
        self.folder = None
        if self.path is not None:
            self.folder = ResultFolder(self.path, kind=kind, settings=self.identity, grows=grows).open()
            self.identity = dict(self.folder.settings)
        self._named: list[str] = []

    def __repr__(self) -> str:
        return f"ResultDir({None if self.path is None else str(self.path)!r})"

    @property
    def writes(self) -> bool:
        """Whether results go to disk (a folder was given)."""
        return self.path is not None

    def seconds(self) -> float:
        """Seconds since the experiment started."""
        return self.clock.seconds()

    def file(self, name: str) -> Path:
        """The path of ``name`` (may hold sub-folders) in the folder, for a writer of its own (a figure).

        Its checksum enters the manifest when the run ends."""
        if self.path is None:
            raise ValueError("no output folder: nothing is written")
        self._named.append(name)
        return self.path / name

    def _commit(self, name: str, data: bytes) -> str:
        if self.folder is None:
            raise ValueError("no output folder: nothing is written")
        return str(self.folder.commit(name, data))

    def write_json(self, name: str, payload: Any) -> str:
        return self._commit(name, json_text(payload).encode())

    def write_csv(self, name: str, rows: Sequence[Mapping[str, Any]], **options: Any) -> str:
        return self._commit(name, csv_text(rows, **options).encode())

    def write_npz(self, name: str, arrays: Mapping[str, Any]) -> str:
        return self._commit(name, npz_bytes(arrays))

    def row_cache(self, name: Callable[[Mapping[str, Any]], str], folder: str = "rows") -> RowCache:
        """A :class:`RowCache` in the sub-folder ``folder`` (a cache that finds nothing without a folder)."""
        return RowCache(self.folder, name, sub=folder)

    def close(self) -> None:
        """Record the checksums of the files named through :meth:`file` and release the folder."""
        if self.folder is not None and self.folder.is_open:
            self.folder.adopt_present(dict.fromkeys(self._named))  # one step (a collective in a multi-process run)
            self.folder.close()

    def finish(self, payload: dict[str, Any], name: str, files: Mapping[str, str]) -> dict[str, Any]:
        """The last step of a run: ``payload["files"]`` (``files`` and ``"json"``, the path of ``name``;
        ``{}`` without a folder) and ``payload["seconds"]``, then ``payload`` written as the JSON ``name``
        and the folder closed."""
        payload["files"] = dict(files, json=str(self.path / name)) if self.writes else {}
        payload["seconds"] = self.seconds()
        if self.writes:
            self.write_json(name, payload)
            self.close()
        return payload
