"""Image datasets: loaders, a built-in dataset, seeded shuffling and augmentation.

:func:`load` returns ``(x_train, y_train, x_test, y_test)`` as NumPy arrays:
images ``uint8`` in NHWC layout (values 0..255), labels ``int32``. The names
(see :data:`DATASETS` and :func:`info`):

- ``"builtin"`` (the default): real handwritten digits shipped inside the
  package (``jaxcfl/nn/datasets/digits.npz``, 45 KB), nothing is downloaded. The
  1797 8x8 images of the UCI "Optical Recognition of Handwritten Digits" test
  set, as distributed with scikit-learn, upsampled to a 20x20 box inside a
  28x28x1 image, as MNIST lays its digits out. See :func:`load` for the exact resize and split.
- ``"mnist"`` and ``"fashion_mnist"``: the four IDX files, gzipped or not.
- ``"cifar10"``: the python version, as the archive ``cifar-10-python.tar.gz``
  (read in place) or its extracted folder ``cifar-10-batches-py/``.

No file dataset is downloaded: put the files under ``root`` (default:
``$JAXCFL_DATA``, else ``./data``); :func:`load` looks in ``root`` and in the
sub-folders other tools use (torchvision's ``MNIST/raw`` and so on). A missing
or damaged file raises an error naming the expected files and every place
looked in.

Randomness is a pure function of integers: :func:`batches` shuffles with a
permutation drawn from ``numpy.random.default_rng([tag, seed, epoch])`` and
:func:`augment` (random crop with zero padding, random horizontal flip) from
``default_rng([tag, seed, epoch, step])``, so the same arguments give the same
result in every process. (NumPy fixes these streams for a given NumPy version;
NEP 19 allows them to change between versions.)
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib
import io
import os
import pickle
import tarfile
import zlib
from collections.abc import Iterator, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from jaxcfl._core.validate import check_choice, check_int, check_positive

__all__ = [
    "DATASETS",
    "DatasetInfo",
    "augment",
    "batches",
    "channel_stats",
    "crop_flip",
    "info",
    "load",
    "normalize",
    "num_batches",
    "permutation",
    "read_idx",
]

PathLike = str | os.PathLike


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What :func:`load` returns for one dataset, and where it looks for it.

    Attributes:
      name: the name :func:`load` takes.
      image_shape: ``(height, width, channels)`` of one image.
      num_classes: labels are ``0 .. num_classes - 1``.
      train_size, test_size: number of images in each split.
      files: the file names looked for (empty for the built-in set).
      subdirs: sub-folders of ``root`` searched, in order, after ``root`` itself.
      mean, std: per-channel mean and standard deviation of the training
        images scaled to [0, 1], for :func:`normalize`.
      source: where the data comes from.
    """

    name: str
    image_shape: tuple[int, int, int]
    num_classes: int
    train_size: int
    test_size: int
    files: tuple[str, ...]
    subdirs: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str


_IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_CIFAR_ARCHIVE = "cifar-10-python.tar.gz"
_CIFAR_FOLDER = "cifar-10-batches-py"
_CIFAR_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)

DATASETS: dict[str, DatasetInfo] = {
    "builtin": DatasetInfo(
        name="builtin",
        image_shape=(28, 28, 1),
        num_classes=10,
        train_size=1433,
        test_size=364,
        files=(),
        subdirs=(),
        # computed from the built-in training split (see tests/test_data.py)
        mean=(0.1558,),
        std=(0.2768,),
        source="UCI Optical Recognition of Handwritten Digits (test set, 8x8), as shipped by scikit-learn; "
        "upsampled to 20x20 and centred in 28x28. Shipped in jaxcfl/nn/datasets/digits.npz (CC BY 4.0, see the README there).",
    ),
    "mnist": DatasetInfo(
        name="mnist",
        image_shape=(28, 28, 1),
        num_classes=10,
        train_size=60000,
        test_size=10000,
        files=_IDX_FILES,
        subdirs=("MNIST/raw", "mnist", "MNIST", "mnist/raw"),
        mean=(0.1307,),
        std=(0.3081,),
        source="http://yann.lecun.com/exdb/mnist/",
    ),
    "fashion_mnist": DatasetInfo(
        name="fashion_mnist",
        image_shape=(28, 28, 1),
        num_classes=10,
        train_size=60000,
        test_size=10000,
        files=_IDX_FILES,
        subdirs=("FashionMNIST/raw", "fashion_mnist", "fashion-mnist", "FashionMNIST", "fashion_mnist/raw"),
        mean=(0.2860,),
        std=(0.3530,),
        source="https://github.com/zalandoresearch/fashion-mnist",
    ),
    "cifar10": DatasetInfo(
        name="cifar10",
        image_shape=(32, 32, 3),
        num_classes=10,
        train_size=50000,
        test_size=10000,
        files=(_CIFAR_ARCHIVE, _CIFAR_FOLDER + "/") + _CIFAR_BATCHES,
        subdirs=("cifar10", "cifar-10", "CIFAR10"),
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
        source="https://www.cs.toronto.edu/~kriz/cifar.html (CIFAR-10 python version)",
    ),
}



class DatasetNotFound(FileNotFoundError):
    """No complete copy of a dataset in the folders searched; the message says where it looked and where to get it."""

def info(name: str) -> DatasetInfo:
    """The :class:`DatasetInfo` of ``name`` (one of :data:`DATASETS`)."""
    return DATASETS[check_choice("dataset", name, DATASETS)]


def load(name: str = "builtin", root: PathLike | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Load a dataset as ``(x_train, y_train, x_test, y_test)``.

    Images are ``uint8`` arrays of shape ``(N, H, W, C)`` with values 0..255;
    labels are ``int32`` arrays of shape ``(N,)``.

    Where the files are looked for, in order (the first place holding a
    complete copy wins):

    - ``mnist`` / ``fashion_mnist``: ``root``, then ``root/<subdir>`` for each
      of ``info(name).subdirs`` (``MNIST/raw``, ``mnist``, ``MNIST``,
      ``mnist/raw``; or ``FashionMNIST/raw``, ``fashion_mnist``,
      ``fashion-mnist``, ``FashionMNIST``, ``fashion_mnist/raw``). A folder
      qualifies when it holds all four IDX files, each as ``NAME`` or
      ``NAME.gz`` (the uncompressed one is read when both exist).
    - ``cifar10``: ``root`` itself when it is the ``.tar.gz`` file; otherwise,
      for ``root`` then ``root/cifar10``, ``root/cifar-10``, ``root/CIFAR10``:
      the folder ``cifar-10-batches-py/``, then the archive
      ``cifar-10-python.tar.gz`` (read in place, not extracted), then the six
      batch files directly in that folder.

    The built-in set: the 1797 digits of ``jaxcfl/nn/datasets/digits.npz`` (8x8,
    grey levels 0..16), laid out like MNIST: each digit is resized to 20x20
    by bilinear interpolation with half-pixel centres and edge clamping (as
    ``jax.image.resize`` does when upsampling), scaled by 255/16 and rounded
    half up, in exact integer arithmetic, then padded with 4 zero pixels on
    every side to 28x28. Split: for each class, in file order, the first
    ``floor(4 n_c / 5)`` images train and the rest test; each split keeps the
    file order. That gives 1433 training and 364 test images.

    Args:
      name: ``"builtin"``, ``"mnist"``, ``"fashion_mnist"`` or ``"cifar10"``.
      root: folder (or, for CIFAR-10, the archive) to read from; defaults to
        the environment variable ``JAXCFL_DATA``, else ``./data``. Ignored for
        ``"builtin"``.

    Returns:
      ``(x_train, y_train, x_test, y_test)``.

    Raises:
      ValueError: unknown ``name``, or a file that is damaged or not in the
        expected format.
      FileNotFoundError: no complete copy of the dataset was found; the message
        names the expected files and every place looked in.

    Note:
      CIFAR-10 batches are Python pickles. They are read with an unpickler that
      only rebuilds NumPy arrays, lists and bytes, so a tampered file cannot run
      code; it raises ``ValueError`` instead.
    """
    meta = info(name)
    if name == "builtin":
        return _load_builtin()
    base = Path(root if root is not None else os.environ.get("JAXCFL_DATA", "data")).expanduser()
    if name == "cifar10":
        out = _load_cifar10(base, meta)
    else:
        out = _load_idx_dataset(base, meta)
    return out


# --- built-in digits -------------------------------------------------------------------------

_BUILTIN_FILE = "digits.npz"
_BUILTIN_LEVELS = 16  # grey levels of the 8x8 digits: 0..16
_BUILTIN_BOX = 20  # like MNIST: the digit fills a 20x20 box ...
_BUILTIN_MARGIN = 4  # ... centred in a 28x28 image


def _bilinear_weights(n_in: int, n_out: int) -> tuple[np.ndarray, int]:
    """Integer matrix ``W`` (n_out, n_in) and denominator ``d``: ``W / d`` resizes bilinearly.

    Half-pixel centres: output ``i`` samples input position
    ``(i + 1/2) n_in / n_out - 1/2``, clamped to ``[0, n_in - 1]``.
    """
    d = 2 * n_out
    pos = (2 * np.arange(n_out, dtype=np.int64) + 1) * n_in - n_out  # the position times d
    pos = np.clip(pos, 0, (n_in - 1) * d)
    lo, frac = np.divmod(pos, d)
    hi = np.minimum(lo + 1, n_in - 1)
    w = np.zeros((n_out, n_in), np.int64)
    rows = np.arange(n_out)
    np.add.at(w, (rows, lo), d - frac)
    np.add.at(w, (rows, hi), frac)
    return w, d


def _upsample_digits(images: np.ndarray, size: int = _BUILTIN_BOX, margin: int = _BUILTIN_MARGIN) -> np.ndarray:
    """``(N, 8, 8)`` grey levels 0..16 -> ``(N, size + 2 margin, size + 2 margin, 1)`` uint8 0..255, exactly."""
    n_in = images.shape[1]
    w, d = _bilinear_weights(n_in, size)
    s = np.einsum("ij,njk,lk->nil", w, images.astype(np.int64), w)  # the resized image times d**2
    den = _BUILTIN_LEVELS * d * d
    out = (2 * 255 * s + den) // (2 * den)  # round(s * 255 / den), halves up
    out = np.pad(out.astype(np.uint8), ((0, 0), (margin, margin), (margin, margin)))
    return out[..., None]


def _builtin_split(labels: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    train = np.zeros(labels.shape, bool)
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        train[idx[: (4 * idx.size) // 5]] = True
    return np.flatnonzero(train), np.flatnonzero(~train)


def _load_builtin() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    ref = resources.files("jaxcfl.nn").joinpath("datasets", _BUILTIN_FILE)
    try:
        with ref.open("rb") as f, np.load(f) as z:
            images, labels = z["images"], z["labels"]
    except FileNotFoundError as err:
        raise FileNotFoundError(f"the built-in dataset file {ref} is missing; reinstall jaxcfl") from err
    x = _upsample_digits(images)
    y = labels.astype(np.int32)
    train, test = _builtin_split(y, DATASETS["builtin"].num_classes)
    return x[train], y[train], x[test], y[test]


# --- IDX (MNIST, Fashion-MNIST) ------------------------------------------------------------------

_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _read_bytes(path: Path) -> bytes:
    """The bytes of ``path``, decompressed when it is gzipped (detected by its magic bytes)."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, ValueError) as err:
            raise ValueError(f"{path}: damaged gzip file ({err})") from err
    return raw


def read_idx(path: PathLike) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzipped or not.

    The header is a big-endian magic number ``0x0000TTDD`` (``TT`` the element
    type, 0x08 for unsigned bytes; ``DD`` the number of dimensions), then ``DD``
    big-endian 32-bit sizes, then the data in row-major order.

    Args:
      path: the file; gzip compression is detected from its content.

    Returns:
      The array, in native byte order.

    Raises:
      FileNotFoundError: ``path`` does not exist.
      ValueError: bad magic number, unknown type, or a size that does not match
        the header; the message names the file.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise ValueError(f"{path}: not an IDX file (only {len(data)} bytes)")
    zero, code, ndim = int.from_bytes(data[:2], "big"), data[2], data[3]
    if zero != 0 or code not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (magic number 0x{int.from_bytes(data[:4], 'big'):08x})")
    dtype = _IDX_DTYPES[code]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(data)} bytes, {ndim} dimensions announced)")
    shape = tuple(int(s) for s in np.frombuffer(data, ">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(
            f"{path}: IDX size mismatch: header announces shape {shape} of {dtype} ({expected} bytes), file has {len(data)} bytes"
        )
    return np.frombuffer(data, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _search_dirs(base: Path, meta: DatasetInfo) -> list[Path]:
    return [base] + [base / sub for sub in meta.subdirs]


def _find_idx_files(folder: Path) -> tuple[list[Path] | None, list[str]]:
    """The four IDX paths in ``folder`` (plain preferred to .gz), or None and the names missing."""
    found, missing = [], []
    for fname in _IDX_FILES:
        for candidate in (folder / fname, folder / (fname + ".gz")):
            if candidate.is_file():
                found.append(candidate)
                break
        else:
            missing.append(fname + "[.gz]")
    return (found if not missing else None), missing


def _check_idx(path: Path, arr: np.ndarray, kind: str, meta: DatasetInfo) -> np.ndarray:
    h, w, _ = meta.image_shape
    if arr.dtype != np.uint8:
        raise ValueError(f"{path}: expected unsigned bytes (magic 0x0000080{3 if kind == 'images' else 1}), got {arr.dtype}")
    if kind == "images" and (arr.ndim != 3 or arr.shape[1:] != (h, w)):
        raise ValueError(f"{path}: expected images of shape (N, {h}, {w}) (magic 0x00000803), got {arr.shape}")
    if kind == "labels":
        if arr.ndim != 1:
            raise ValueError(f"{path}: expected labels of shape (N,) (magic 0x00000801), got {arr.shape}")
        if arr.size and arr.max() >= meta.num_classes:
            raise ValueError(f"{path}: label {int(arr.max())} out of range 0..{meta.num_classes - 1}")
    return arr


def _load_idx_dataset(base: Path, meta: DatasetInfo) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    looked = []
    for folder in _search_dirs(base, meta):
        paths, missing = _find_idx_files(folder)
        if paths is None:
            note = "not a folder" if not folder.is_dir() else "missing " + ", ".join(missing)
            looked.append(f"{folder} ({note})")
            continue
        arrays = [_check_idx(p, read_idx(p), kind, meta) for p, kind in zip(paths, ("images", "labels") * 2)]
        for i, split in ((0, "train"), (2, "test")):
            if arrays[i].shape[0] != arrays[i + 1].shape[0]:
                raise ValueError(
                    f"{meta.name} {split}: {paths[i]} holds {arrays[i].shape[0]} images but "
                    f"{paths[i + 1]} holds {arrays[i + 1].shape[0]} labels"
                )
        xtr, ytr, xte, yte = arrays
        return xtr[..., None], ytr.astype(np.int32), xte[..., None], yte.astype(np.int32)
    raise DatasetNotFound(
        f"{meta.name}: no folder holds all of the IDX files {', '.join(f + '[.gz]' for f in _IDX_FILES)}; "
        f"looked in: {'; '.join(looked)}. Download them from {meta.source} (nothing is downloaded automatically)"
    )


# --- CIFAR-10 ----------------------------------------------------------------------------------

_PICKLE_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only plain containers, bytes and NumPy arrays."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _PICKLE_ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        if module.startswith("numpy.core"):  # NumPy 2 keeps these in numpy._core
            try:
                return getattr(importlib.import_module(module.replace("numpy.core", "numpy._core")), name)
            except (ImportError, AttributeError):
                pass
        return super().find_class(module, name)


def _unpickle_batch(f: BinaryIO, where: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        d = _ArrayUnpickler(f, encoding="bytes").load()
    except Exception as err:  # pickle raises many kinds of errors on damaged input
        raise ValueError(f"{where}: not a CIFAR-10 batch (unpickling failed: {err})") from err
    if not isinstance(d, dict) or b"data" not in d or b"labels" not in d:
        keys = sorted(d) if isinstance(d, dict) else type(d).__name__
        raise ValueError(f"{where}: not a CIFAR-10 batch (expected a dict with b'data' and b'labels', got {keys})")
    data = np.asarray(d[b"data"])
    labels = np.asarray(d[b"labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{where}: b'data' must be uint8 of shape (N, 3072), got {data.dtype} {data.shape}")
    if labels.ndim != 1 or labels.shape[0] != data.shape[0] or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{where}: b'labels' must be {data.shape[0]} integers, got {labels.dtype} {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"{where}: labels out of range 0..9 ({int(labels.min())}..{int(labels.max())})")
    x = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(x), labels.astype(np.int32)


def _read_cifar_tar(path: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    try:
        with tarfile.open(path, "r:*") as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
            missing = [b for b in _CIFAR_BATCHES if b not in members]
            if missing:
                raise ValueError(f"{path}: incomplete CIFAR-10 archive, missing {', '.join(missing)}")
            out = []
            for b in _CIFAR_BATCHES:
                f = tar.extractfile(members[b])
                out.append(_unpickle_batch(io.BytesIO(f.read()), f"{path}:{members[b].name}"))
            return out
    except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
        raise ValueError(f"{path}: damaged CIFAR-10 archive ({err})") from err


def _read_cifar_folder(folder: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    out = []
    for b in _CIFAR_BATCHES:
        with open(folder / b, "rb") as f:
            out.append(_unpickle_batch(f, str(folder / b)))
    return out


def _load_cifar10(base: Path, meta: DatasetInfo) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    looked: list[str] = []
    batches_ = None
    if base.is_file():
        batches_ = _read_cifar_tar(base)
    else:
        for folder in _search_dirs(base, meta):
            if not folder.is_dir():
                looked.append(f"{folder} (not a folder)")
                continue
            notes = []
            sub = folder / _CIFAR_FOLDER
            archive = folder / _CIFAR_ARCHIVE
            if sub.is_dir():
                missing = [b for b in _CIFAR_BATCHES if not (sub / b).is_file()]
                if not missing:
                    batches_ = _read_cifar_folder(sub)
                    break
                notes.append(f"{_CIFAR_FOLDER}/ lacks {', '.join(missing)}")
            if archive.is_file():
                batches_ = _read_cifar_tar(archive)
                break
            present = [b for b in _CIFAR_BATCHES if (folder / b).is_file()]
            if len(present) == len(_CIFAR_BATCHES):
                batches_ = _read_cifar_folder(folder)
                break
            if present:
                notes.append(f"has only {', '.join(present)}")
            looked.append(f"{folder} ({'; '.join(notes) if notes else f'no {_CIFAR_FOLDER}/ or {_CIFAR_ARCHIVE}'})")
    if batches_ is None:
        raise DatasetNotFound(
            f"cifar10: expected the archive {_CIFAR_ARCHIVE} or its folder {_CIFAR_FOLDER}/ "
            f"(holding {', '.join(_CIFAR_BATCHES)}); looked in: {'; '.join(looked)}. "
            f"Download the python version from {meta.source} (nothing is downloaded automatically)"
        )
    xtr = np.concatenate([b[0] for b in batches_[:5]])
    ytr = np.concatenate([b[1] for b in batches_[:5]])
    xte, yte = batches_[5]
    return xtr, ytr, xte, yte


# --- shuffling and batching ---------------------------------------------------------------------

_SHUFFLE_TAG = 0x5348_5546  # "SHUF": separates the shuffling stream from the augmentation one
_AUGMENT_TAG = 0x4155_474D  # "AUGM"


def permutation(n: int, *, seed: int, epoch: int) -> np.ndarray:
    """The order :func:`batches` visits ``n`` examples in, for ``seed`` and ``epoch``.

    Args:
      n: number of examples (>= 0).
      seed, epoch: non-negative ints.

    Returns:
      A permutation of ``arange(n)`` (int64), drawn by
      ``numpy.random.default_rng([tag, seed, epoch]).permutation(n)``.
    """
    n = check_int("n", n, minimum=0)
    seed = check_int("seed", seed, minimum=0)
    epoch = check_int("epoch", epoch, minimum=0)
    return np.random.default_rng([_SHUFFLE_TAG, seed, epoch]).permutation(n)


def num_batches(n: int, batch_size: int, *, drop_last: bool = True) -> int:
    """How many batches :func:`batches` yields for ``n`` examples."""
    n = check_int("n", n, minimum=0)
    batch_size = check_int("batch_size", batch_size, minimum=1)
    return n // batch_size if drop_last else -(-n // batch_size)


def batches(
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    drop_last: bool = True,
    shuffle: bool = True,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(x_batch, y_batch)`` over one epoch, in a seeded order.

    The arguments are checked when this is called, before the first batch.

    Args:
      x, y: arrays with the same leading length ``n``.
      batch_size: examples per batch (1 .. n when ``drop_last``).
      seed, epoch: non-negative ints; the order is :func:`permutation` of them,
        so it is the same for the same ``(seed, epoch)`` in every process.
      drop_last: drop the final batch when it is smaller than ``batch_size``.
      shuffle: if False, visit the examples in order (``seed`` and ``epoch``
        are then unused).

    Returns:
      An iterator of ``(x[idx], y[idx])`` pairs (copies).
    """
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim == 0 or y.ndim == 0 or x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must have the same leading length, got shapes {x.shape} and {y.shape}")
    n = x.shape[0]
    batch_size = check_int("batch_size", batch_size, minimum=1)
    if drop_last and batch_size > n:
        raise ValueError(f"batch_size must be <= the number of examples ({n}) when drop_last is True, got {batch_size}")
    order = permutation(n, seed=seed, epoch=epoch) if shuffle else np.arange(n)
    count = num_batches(n, batch_size, drop_last=drop_last)

    def gen() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for i in range(count):
            idx = order[i * batch_size : (i + 1) * batch_size]
            yield x[idx], y[idx]

    return gen()


# --- augmentation -------------------------------------------------------------------------------


def _check_nhwc(x: Any) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 4:
        raise ValueError(f"x must be a batch of images of shape (N, H, W, C), got shape {x.shape}")
    return x


def crop_flip(x: np.ndarray, rng: np.random.Generator, *, pad: int = 4, flip: bool = True) -> np.ndarray:
    """Random crop with zero padding and random horizontal flip, drawing from ``rng``.

    Image ``i`` is padded with ``pad`` zeros on every side, the ``H x W``
    window at offset ``(dy[i], dx[i])`` is cut out, and, where ``flipped[i]``,
    mirrored left to right. The draws, in this order:
    ``dy, dx = rng.integers(0, 2 * pad + 1, size=(2, N))``, then (if ``flip``)
    ``flipped = rng.integers(0, 2, size=N).astype(bool)``.

    Args:
      x: ``(N, H, W, C)`` images, any dtype.
      rng: a NumPy ``Generator``.
      pad: zero padding on each side (>= 0); 0 means no crop.
      flip: whether to flip half of the images (on average).

    Returns:
      The augmented images, same shape and dtype as ``x``.
    """
    x = _check_nhwc(x)
    pad = check_int("pad", pad, minimum=0)
    n, h, w, _ = x.shape
    dy, dx = rng.integers(0, 2 * pad + 1, size=(2, n))
    flipped = rng.integers(0, 2, size=n).astype(bool) if flip else np.zeros(n, bool)
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    rows = dy[:, None] + np.arange(h)
    cols = np.where(flipped[:, None], np.arange(w - 1, -1, -1), np.arange(w)) + dx[:, None]
    return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


def augment(x: np.ndarray, *, seed: int, epoch: int, step: int, pad: int = 4, flip: bool = True) -> np.ndarray:
    """:func:`crop_flip` with a generator fixed by ``(seed, epoch, step)``.

    Same arguments, same result, in every process. Note that horizontal flips
    change the meaning of digits and letters: pass ``flip=False`` for MNIST and
    the built-in set.

    Args:
      x: ``(N, H, W, C)`` images.
      seed, epoch, step: non-negative ints; the generator is
        ``numpy.random.default_rng([tag, seed, epoch, step])``.
      pad: zero padding on each side before the random crop.
      flip: random horizontal flips.

    Returns:
      The augmented images, same shape and dtype as ``x``.
    """
    seed = check_int("seed", seed, minimum=0)
    epoch = check_int("epoch", epoch, minimum=0)
    step = check_int("step", step, minimum=0)
    return crop_flip(x, np.random.default_rng([_AUGMENT_TAG, seed, epoch, step]), pad=pad, flip=flip)


# --- normalisation ------------------------------------------------------------------------------


def _channel_vector(name: str, value: Any, channels: int) -> np.ndarray:
    v = np.atleast_1d(np.asarray(value, dtype=np.float64))
    if v.ndim != 1 or v.size not in (1, channels):
        raise ValueError(f"{name} must be a scalar or one value per channel ({channels}), got shape {np.shape(value)}")
    return v


def normalize(x: np.ndarray, mean: float | Sequence[float], std: float | Sequence[float], *, max_value: float = 255.0) -> np.ndarray:
    """``(x / max_value - mean) / std`` per channel, as float32.

    Args:
      x: ``(..., C)`` images (``uint8`` 0..255 as :func:`load` returns them).
      mean, std: a scalar or one value per channel, in units of
        ``x / max_value``; e.g. ``info("cifar10").mean``.
      max_value: the value that maps to 1 before centring (255 for uint8
        images, 1 for images already in [0, 1]).

    Returns:
      A float32 array of the shape of ``x``.
    """
    x = np.asarray(x)
    if x.ndim == 0:
        raise ValueError("x must have a channel axis, got a scalar")
    check_positive("max_value", max_value)
    mean = _channel_vector("mean", mean, x.shape[-1])
    std = _channel_vector("std", std, x.shape[-1])
    check_positive("std", std)
    f32 = np.float32
    return (x.astype(f32) / f32(max_value) - mean.astype(f32)) / std.astype(f32)


def channel_stats(x: np.ndarray, *, max_value: float = 255.0) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and (population) standard deviation of ``x / max_value``, in float64.

    Args:
      x: ``(..., C)`` images, e.g. a training set.
      max_value: as in :func:`normalize`.

    Returns:
      ``(mean, std)``, each of shape ``(C,)``.
    """
    x = np.asarray(x)
    if x.ndim == 0 or x.size == 0:
        raise ValueError(f"x must be a non-empty array with a channel axis, got shape {x.shape}")
    check_positive("max_value", max_value)
    flat = x.reshape(-1, x.shape[-1]).astype(np.float64) / float(max_value)
    return flat.mean(axis=0), flat.std(axis=0)
