"""jaxcfl.nn._data: loaders (on small files in the real formats), built-in digits, batching, augmentation."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import re
import subprocess
import sys
import tarfile
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from jaxcfl.nn import _data as data
IDX_NAMES = data.DATASETS["mnist"].files
CIFAR_BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


# --- writers for the real formats -------------------------------------------------------------


def idx_bytes(arr: np.ndarray) -> bytes:
    arr = np.asarray(arr, np.uint8)
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in arr.shape)
    return header + arr.tobytes()


def write_idx(path: Path, arr: np.ndarray, gz: bool) -> Path:
    raw = idx_bytes(arr)
    path = path.with_name(path.name + ".gz") if gz else path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def make_idx_set(folder: Path, seed: int = 0, gz=(False, True, True, False), n_train=6, n_test=4):
    rng = np.random.default_rng(seed)
    arrays = [
        rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        rng.integers(0, 10, n_train).astype(np.uint8),
        rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        rng.integers(0, 10, n_test).astype(np.uint8),
    ]
    paths = [write_idx(folder / name, a, z) for name, a, z in zip(IDX_NAMES, arrays, gz)]
    return arrays, paths


def cifar_batch(n: int, rng) -> dict:
    return {
        b"batch_label": b"testing batch",
        b"labels": [int(v) for v in rng.integers(0, 10, n)],
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"filenames": [b"img%d.png" % i for i in range(n)],
    }


def make_cifar_batches(seed: int = 0) -> dict[str, dict]:
    rng = np.random.default_rng(seed)
    return {name: cifar_batch(3 if name == "test_batch" else 2, rng) for name in CIFAR_BATCHES}


def write_cifar_folder(folder: Path, batches: dict[str, dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, d in batches.items():
        (folder / name).write_bytes(pickle.dumps(d, protocol=2))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"airplane"] * 10}, protocol=2))


def write_cifar_tar(path: Path, batches: dict[str, dict], skip=()) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, d in batches.items():
            if name in skip:
                continue
            payload = pickle.dumps(d, protocol=2)
            member = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            member.size = len(payload)
            tar.addfile(member, io.BytesIO(payload))
    return path


def expected_cifar(batches: dict[str, dict]):
    def nhwc(d):
        return d[b"data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)

    xtr = np.concatenate([nhwc(batches[n]) for n in CIFAR_BATCHES[:5]])
    ytr = np.concatenate([batches[n][b"labels"] for n in CIFAR_BATCHES[:5]])
    return xtr, ytr, nhwc(batches["test_batch"]), np.asarray(batches["test_batch"][b"labels"])


# --- names and info ---------------------------------------------------------------------------


def test_unknown_name_lists_known_names(tmp_path):
    with pytest.raises(ValueError, match="cifar10.*fashion_mnist|fashion_mnist.*cifar10") as err:
        data.load("cifar100", root=tmp_path)
    for name in ("builtin", "mnist", "fashion_mnist", "cifar10"):
        assert repr(name) in str(err.value)
    with pytest.raises(ValueError, match="dataset"):
        data.info("svhn")


def test_info_matches_datasets():
    assert set(data.DATASETS) == {"builtin", "mnist", "fashion_mnist", "cifar10"}
    assert data.info("cifar10").image_shape == (32, 32, 3)
    assert len(data.info("cifar10").mean) == 3 and len(data.info("mnist").std) == 1
    assert "cifar-10-python.tar.gz" in data.info("cifar10").files
    assert data.info("fashion_mnist").subdirs[0] == "FashionMNIST/raw"


# --- IDX: MNIST and Fashion-MNIST ---------------------------------------------------------------


@pytest.mark.parametrize(
    "name, sub",
    [("mnist", ""), ("mnist", "MNIST/raw"), ("mnist", "mnist"), ("fashion_mnist", ""),
     ("fashion_mnist", "FashionMNIST/raw"), ("fashion_mnist", "fashion_mnist")],
)
@pytest.mark.parametrize("gz", [(False,) * 4, (True,) * 4, (False, True, True, False)])
def test_idx_round_trip(tmp_path, name, sub, gz):
    arrays, _ = make_idx_set(tmp_path / sub, gz=gz)
    xtr, ytr, xte, yte = data.load(name, root=tmp_path)
    assert xtr.shape == (6, 28, 28, 1) and xte.shape == (4, 28, 28, 1)
    assert xtr.dtype == np.uint8 and ytr.dtype == np.int32
    np.testing.assert_array_equal(xtr[..., 0], arrays[0])
    np.testing.assert_array_equal(ytr, arrays[1])
    np.testing.assert_array_equal(xte[..., 0], arrays[2])
    np.testing.assert_array_equal(yte, arrays[3])


def test_idx_root_from_environment(tmp_path, monkeypatch):
    arrays, _ = make_idx_set(tmp_path / "MNIST" / "raw")
    monkeypatch.setenv("JAXCFL_DATA", str(tmp_path))
    np.testing.assert_array_equal(data.load("mnist")[1], arrays[1])


def test_idx_search_order_root_first(tmp_path):
    first, _ = make_idx_set(tmp_path, seed=1)
    make_idx_set(tmp_path / "MNIST" / "raw", seed=2)
    np.testing.assert_array_equal(data.load("mnist", root=tmp_path)[0][..., 0], first[0])


def test_idx_plain_file_preferred_to_gz(tmp_path):
    arrays, _ = make_idx_set(tmp_path, gz=(False,) * 4)
    (tmp_path / (IDX_NAMES[0] + ".gz")).write_bytes(b"not gzip at all")
    np.testing.assert_array_equal(data.load("mnist", root=tmp_path)[0][..., 0], arrays[0])


def test_read_idx_header_and_dtypes(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    p = write_idx(tmp_path / "a", arr, gz=True)
    np.testing.assert_array_equal(data.read_idx(p), arr)
    # a big-endian int32 IDX file (type 0x0C)
    ints = np.array([1, -2, 70000], ">i4")
    (tmp_path / "b").write_bytes(bytes([0, 0, 0x0C, 1]) + (3).to_bytes(4, "big") + ints.tobytes())
    out = data.read_idx(tmp_path / "b")
    np.testing.assert_array_equal(out, [1, -2, 70000])
    assert out.dtype.isnative


@pytest.mark.parametrize(
    "content, match",
    [
        (b"\x12\x34\x08\x01" + (1).to_bytes(4, "big") + b"\x00", "magic number"),
        (b"\x00\x00\x07\x01" + (1).to_bytes(4, "big") + b"\x00", "magic number"),
        (b"\x00\x00", "not an IDX file"),
        (b"\x00\x00\x08\x03\x00\x00", "truncated"),
        (b"\x00\x00\x08\x01" + (5).to_bytes(4, "big") + b"\x00\x01", "size mismatch"),
        (b"\x1f\x8b\x08\x00garbage", "gzip"),
    ],
)
def test_read_idx_rejects_damaged_files(tmp_path, content, match):
    p = tmp_path / "train-labels-idx1-ubyte"
    p.write_bytes(content)
    with pytest.raises(ValueError, match=match) as err:
        data.read_idx(p)
    assert str(p) in str(err.value)


def test_idx_truncated_gzip_names_file(tmp_path):
    _, paths = make_idx_set(tmp_path, gz=(True,) * 4)
    paths[2].write_bytes(paths[2].read_bytes()[:100])
    with pytest.raises(ValueError, match="gzip") as err:
        data.load("fashion_mnist", root=tmp_path)
    assert str(paths[2]) in str(err.value)


def test_idx_wrong_kind_or_shape(tmp_path):
    _, paths = make_idx_set(tmp_path, gz=(False,) * 4)
    # labels where images belong: magic 0x801 in the images file
    paths[0].write_bytes(idx_bytes(np.zeros(6, np.uint8)))
    with pytest.raises(ValueError, match="0x00000803") as err:
        data.load("mnist", root=tmp_path)
    assert str(paths[0]) in str(err.value)
    paths[0].write_bytes(idx_bytes(np.zeros((6, 27, 28), np.uint8)))
    with pytest.raises(ValueError, match=r"\(N, 28, 28\)"):
        data.load("mnist", root=tmp_path)
    paths[0].write_bytes(idx_bytes(np.zeros((5, 28, 28), np.uint8)))
    with pytest.raises(ValueError, match="5 images but .* 6 labels") as err:
        data.load("mnist", root=tmp_path)
    assert str(paths[1]) in str(err.value)
    paths[0].write_bytes(idx_bytes(np.zeros((6, 28, 28), np.uint8)))
    paths[1].write_bytes(idx_bytes(np.full(6, 10, np.uint8)))
    with pytest.raises(ValueError, match="label 10 out of range"):
        data.load("mnist", root=tmp_path)


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_idx_missing_names_files_and_every_folder(tmp_path, name):
    (tmp_path / "MNIST" / "raw").mkdir(parents=True)
    write_idx(tmp_path / IDX_NAMES[0], np.zeros((1, 28, 28)), gz=True)  # an incomplete set in root
    with pytest.raises(FileNotFoundError) as err:
        data.load(name, root=tmp_path)
    msg = str(err.value)
    for fname in IDX_NAMES:
        assert fname in msg
    for folder in data._search_dirs(tmp_path, data.info(name)):
        assert str(folder) in msg
    assert "missing train-labels-idx1-ubyte" in msg


# --- CIFAR-10 -------------------------------------------------------------------------------


def check_cifar(out, batches):
    xtr, ytr, xte, yte = out
    assert xtr.shape == (10, 32, 32, 3) and xte.shape == (3, 32, 32, 3)
    assert xtr.dtype == np.uint8 and ytr.dtype == np.int32 and xtr.flags.c_contiguous
    for got, want in zip(out, expected_cifar(batches)):
        np.testing.assert_array_equal(got, want)
    # row-major CHW: pixel (h, w) of channel c of image n is data[n, c * 1024 + h * 32 + w]
    raw = batches["data_batch_1"][b"data"]
    assert xtr[1, 5, 7, 2] == raw[1, 2 * 1024 + 5 * 32 + 7]
    assert xtr[0, 31, 0, 0] == raw[0, 31 * 32]


@pytest.mark.parametrize("layout", ["archive", "archive-as-root", "folder", "subdir-folder", "subdir-archive", "flat"])
def test_cifar_round_trip(tmp_path, layout):
    batches = make_cifar_batches()
    root = tmp_path
    if layout == "archive":
        write_cifar_tar(tmp_path / "cifar-10-python.tar.gz", batches)
    elif layout == "archive-as-root":
        root = write_cifar_tar(tmp_path / "elsewhere.tar.gz", batches)
    elif layout == "folder":
        write_cifar_folder(tmp_path / "cifar-10-batches-py", batches)
    elif layout == "subdir-folder":
        write_cifar_folder(tmp_path / "cifar10" / "cifar-10-batches-py", batches)
    elif layout == "subdir-archive":
        write_cifar_tar(tmp_path / "CIFAR10" / "cifar-10-python.tar.gz", batches)
    else:
        write_cifar_folder(tmp_path, batches)
    check_cifar(data.load("cifar10", root=root), batches)


def test_cifar_incomplete_folder_falls_back_to_archive(tmp_path):
    batches = make_cifar_batches()
    write_cifar_folder(tmp_path / "cifar-10-batches-py", batches)
    (tmp_path / "cifar-10-batches-py" / "test_batch").unlink()
    write_cifar_tar(tmp_path / "cifar-10-python.tar.gz", batches)
    check_cifar(data.load("cifar10", root=tmp_path), batches)


def test_cifar_missing_names_files_and_every_folder(tmp_path):
    write_cifar_folder(tmp_path / "cifar-10-batches-py", make_cifar_batches())
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError) as err:
        data.load("cifar10", root=tmp_path)
    msg = str(err.value)
    for expected in ("cifar-10-python.tar.gz", "cifar-10-batches-py/", "test_batch", "lacks data_batch_3"):
        assert expected in msg
    for folder in (tmp_path, tmp_path / "cifar10", tmp_path / "cifar-10", tmp_path / "CIFAR10"):
        assert str(folder) in msg


def test_cifar_damaged_archive(tmp_path):
    path = tmp_path / "cifar-10-python.tar.gz"
    path.write_bytes(b"\x1f\x8b" + os.urandom(200))
    with pytest.raises(ValueError, match="damaged CIFAR-10 archive") as err:
        data.load("cifar10", root=tmp_path)
    assert str(path) in str(err.value)
    good = write_cifar_tar(tmp_path / "good.tar.gz", make_cifar_batches())
    path.write_bytes(good.read_bytes()[:300])  # truncated
    with pytest.raises(ValueError, match=re.escape(str(path))):
        data.load("cifar10", root=tmp_path)


def test_cifar_archive_missing_member(tmp_path):
    path = write_cifar_tar(tmp_path / "cifar-10-python.tar.gz", make_cifar_batches(), skip={"test_batch"})
    with pytest.raises(ValueError, match="missing test_batch") as err:
        data.load("cifar10", root=tmp_path)
    assert str(path) in str(err.value)


def test_cifar_numpy1_pickles_load_without_warnings(tmp_path):
    # the published batches (NumPy 1, Python 2) name numpy.core.multiarray, which NumPy 2 moved
    batches = make_cifar_batches()
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar_folder(folder, batches)
    for name in CIFAR_BATCHES:
        raw = (folder / name).read_bytes()
        old = raw.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
        assert b"numpy.core.multiarray\n_reconstruct" in old
        (folder / name).write_bytes(old)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_cifar(data.load("cifar10", root=tmp_path), batches)


class _Evil:
    def __reduce__(self):
        return (os.getcwd, ())


@pytest.mark.parametrize(
    "payload, match",
    [
        (pickle.dumps({b"labels": [1]}, protocol=2), "b'data'"),
        (pickle.dumps({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}), "uint8"),
        (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}), "b'labels'"),
        (pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [10]}), "out of range"),
        (pickle.dumps({b"data": _Evil(), b"labels": [0]}), "refusing"),
        (b"\x80\x02garbage", "unpickling failed"),
    ],
)
def test_cifar_bad_batch(tmp_path, payload, match):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar_folder(folder, make_cifar_batches())
    (folder / "data_batch_2").write_bytes(payload)
    with pytest.raises(ValueError, match=match) as err:
        data.load("cifar10", root=tmp_path)
    assert str(folder / "data_batch_2") in str(err.value)


# --- built-in digits --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def builtin():
    return data.load()


@pytest.fixture(scope="module")
def raw_digits():
    path = Path(data.__file__).parent / "datasets" / "digits.npz"
    with np.load(path) as z:
        return z["images"], z["labels"]


def test_builtin_shapes_and_content(builtin):
    xtr, ytr, xte, yte = builtin
    meta = data.info("builtin")
    assert xtr.shape == (meta.train_size, 28, 28, 1) == (1433, 28, 28, 1)
    assert xte.shape == (meta.test_size, 28, 28, 1) == (364, 28, 28, 1)
    assert xtr.dtype == xte.dtype == np.uint8 and ytr.dtype == yte.dtype == np.int32
    assert xtr.min() == 0 and xtr.max() == 255
    # MNIST layout: a 20x20 digit box centred in 28x28, zero margin of 4
    assert not xtr[:, :4].any() and not xtr[:, -4:].any() and not xtr[:, :, :4].any() and not xtr[:, :, -4:].any()
    for y in (ytr, yte):
        counts = np.bincount(y, minlength=10)
        assert counts.size == 10 and counts.min() >= 0.9 * counts.mean() and counts.max() <= 1.1 * counts.mean()
    # real, distinct images: many different images, varied pixel values
    assert len({img.tobytes() for img in xtr}) > 1400
    assert np.unique(xtr).size > 200
    # real labelled content: nearest class mean beats 80% on the test split
    x = xtr.reshape(len(xtr), -1).astype(np.float64)
    centroids = np.stack([x[ytr == c].mean(0) for c in range(10)])
    d = ((xte.reshape(len(xte), -1)[:, None, :] - centroids[None]) ** 2).sum(-1)
    assert (d.argmin(1) == yte).mean() > 0.8


def test_builtin_is_deterministic(builtin):
    again = data.load("builtin", root="/nonexistent")  # root is ignored
    for a, b in zip(builtin, again):
        np.testing.assert_array_equal(a, b)


def test_builtin_split_is_first_four_fifths_per_class(builtin, raw_digits):
    images, labels = raw_digits
    assert images.shape == (1797, 8, 8) and images.max() == 16
    train_idx, test_idx = [], []
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        k = (4 * len(idx)) // 5
        train_idx += list(idx[:k])
        test_idx += list(idx[k:])
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    np.testing.assert_array_equal(builtin[1], labels[train_idx])
    np.testing.assert_array_equal(builtin[3], labels[test_idx])
    np.testing.assert_array_equal(builtin[0], data._upsample_digits(images[train_idx]))
    np.testing.assert_array_equal(builtin[2], data._upsample_digits(images[test_idx]))


def test_builtin_resize_matches_jax_bilinear(raw_digits):
    jax = pytest.importorskip("jax")
    images = raw_digits[0][:40]
    ours = data._upsample_digits(images)[:, 4:-4, 4:-4, 0].astype(np.float64)
    ref = np.asarray(jax.image.resize(images.astype(np.float32), (40, 20, 20), "bilinear"), np.float64) * 255 / 16
    assert np.abs(ours - ref).max() <= 0.5 + 1e-3
    # exact values of a constant block: 16 -> 255, 8 -> 128 (127.5 rounded half up)
    for level, want in ((16, 255), (8, 128), (0, 0)):
        assert (data._upsample_digits(np.full((1, 8, 8), level, np.uint8))[0, 4:-4, 4:-4] == want).all()


def test_builtin_mean_std_constants(builtin):
    mean, std = data.channel_stats(builtin[0])
    np.testing.assert_allclose(mean, data.info("builtin").mean, atol=5e-5)
    np.testing.assert_allclose(std, data.info("builtin").std, atol=5e-5)


# --- batches ----------------------------------------------------------------------------------


def _orders(n=50, bs=8, **kw):
    x = np.arange(n)
    return np.concatenate([xb for xb, _ in data.batches(x, x, bs, **kw)])


def test_batches_deterministic_and_seeded():
    a = _orders(seed=3, epoch=1)
    np.testing.assert_array_equal(a, _orders(seed=3, epoch=1))
    assert not np.array_equal(a, _orders(seed=4, epoch=1))
    assert not np.array_equal(a, _orders(seed=3, epoch=2))
    np.testing.assert_array_equal(a, data.permutation(50, seed=3, epoch=1)[:48])


def test_batches_pairs_and_sizes():
    x = np.arange(23)[:, None] * np.ones((1, 3))
    y = np.arange(23)
    out = list(data.batches(x, y, 5, seed=0, epoch=0))
    assert len(out) == 4 == data.num_batches(23, 5) and all(len(xb) == 5 for xb, _ in out)
    for xb, yb in out:
        np.testing.assert_array_equal(xb[:, 0], yb)
    out = list(data.batches(x, y, 5, seed=0, epoch=0, drop_last=False))
    assert [len(yb) for _, yb in out] == [5, 5, 5, 5, 3] and data.num_batches(23, 5, drop_last=False) == 5
    assert sorted(np.concatenate([yb for _, yb in out])) == list(range(23))
    ordered = np.concatenate([yb for _, yb in data.batches(x, y, 5, seed=0, epoch=0, shuffle=False, drop_last=False)])
    np.testing.assert_array_equal(ordered, y)


def test_batches_same_in_another_process():
    code = "from jaxcfl import data; print(data.permutation(20, seed=7, epoch=3).tolist())"
    env = dict(os.environ, PYTHONHASHSEED="123", PYTHONPATH=str(Path(data.__file__).parents[1]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert eval(out.stdout) == data.permutation(20, seed=7, epoch=3).tolist()


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(batch_size=0), ValueError, "batch_size"),
        (dict(batch_size=11), ValueError, "batch_size"),
        (dict(batch_size=2.0), TypeError, "batch_size"),
        (dict(batch_size=2, seed=-1), ValueError, "seed"),
        (dict(batch_size=2, epoch=-1), ValueError, "epoch"),
        (dict(batch_size=2, seed=1.5), TypeError, "seed"),
    ],
)
def test_batches_bad_arguments(kwargs, exc, match):
    kw = dict(seed=0, epoch=0) | kwargs
    with pytest.raises(exc, match=match):
        data.batches(np.zeros(10), np.zeros(10), **kw)  # raised on the call, not on the first next()


def test_batches_length_mismatch():
    with pytest.raises(ValueError, match="same leading length"):
        data.batches(np.zeros(10), np.zeros(9), 2, seed=0, epoch=0)


# --- augmentation ------------------------------------------------------------------------------


def _images(n=16, h=9, w=7, c=3, seed=0):
    return np.random.default_rng(seed).integers(1, 256, (n, h, w, c), dtype=np.uint8)


def test_crop_flip_matches_direct_construction():
    x = _images()
    out = data.crop_flip(x, np.random.default_rng(42), pad=4)
    rng = np.random.default_rng(42)
    dy, dx = rng.integers(0, 9, size=(2, len(x)))
    flips = rng.integers(0, 2, size=len(x)).astype(bool)
    assert flips.any() and not flips.all()
    for i in range(len(x)):
        padded = np.zeros((9 + 8, 7 + 8, 3), np.uint8)
        padded[4:-4, 4:-4] = x[i]
        want = padded[dy[i] : dy[i] + 9, dx[i] : dx[i] + 7]
        if flips[i]:
            want = want[:, ::-1]
        np.testing.assert_array_equal(out[i], want)
    assert out.dtype == x.dtype and out.shape == x.shape


def test_flip_only_and_identity():
    x = _images(n=32)
    out = data.crop_flip(x, np.random.default_rng(0), pad=0, flip=True)
    flipped = np.array([np.array_equal(o, xi[:, ::-1]) for o, xi in zip(out, x)])
    same = np.array([np.array_equal(o, xi) for o, xi in zip(out, x)])
    assert np.all(flipped ^ same) and flipped.any() and same.any()
    np.testing.assert_array_equal(data.crop_flip(x, np.random.default_rng(0), pad=0, flip=False), x)


def test_augment_deterministic_and_valid():
    x = _images(n=24, h=8, w=8, c=1)
    a = data.augment(x, seed=1, epoch=0, step=5)
    np.testing.assert_array_equal(a, data.augment(x, seed=1, epoch=0, step=5))
    for kw in (dict(seed=2, epoch=0, step=5), dict(seed=1, epoch=1, step=5), dict(seed=1, epoch=0, step=6)):
        assert not np.array_equal(a, data.augment(x, **kw))
    # every output is one of the (2 pad + 1)^2 crops of the zero-padded image, possibly flipped
    padded = np.pad(x, ((0, 0), (4, 4), (4, 4), (0, 0)))
    for i in range(len(x)):
        candidates = [padded[i, r : r + 8, c : c + 8] for r in range(9) for c in range(9)]
        candidates += [cand[:, ::-1] for cand in candidates]
        assert any(np.array_equal(a[i], cand) for cand in candidates)
    # the pixels outside the crop window are zero: counts of non-zero pixels never grow
    assert ((a > 0).sum(axis=(1, 2, 3)) <= (x > 0).sum(axis=(1, 2, 3))).all()


def test_augment_is_fast_on_a_cifar_batch():
    x = np.random.default_rng(0).integers(0, 256, (128, 32, 32, 3), dtype=np.uint8)
    data.augment(x, seed=0, epoch=0, step=0)
    t = time.perf_counter()
    for step in range(5):
        data.augment(x, seed=0, epoch=0, step=step)
    assert (time.perf_counter() - t) / 5 < 0.25


def test_augment_bad_arguments():
    with pytest.raises(ValueError, match=r"\(N, H, W, C\)"):
        data.augment(np.zeros((4, 4, 3)), seed=0, epoch=0, step=0)
    with pytest.raises(ValueError, match="pad"):
        data.augment(np.zeros((1, 4, 4, 3)), seed=0, epoch=0, step=0, pad=-1)
    with pytest.raises(ValueError, match="step"):
        data.augment(np.zeros((1, 4, 4, 3)), seed=0, epoch=0, step=-1)


# --- normalisation -----------------------------------------------------------------------------


def test_normalize_per_channel():
    x = np.array([[[[0, 255, 51]]]], np.uint8)
    out = data.normalize(x, (0.5, 0.5, 0.2), (0.5, 0.25, 0.1))
    assert out.dtype == np.float32 and out.shape == x.shape
    np.testing.assert_allclose(out[0, 0, 0], [-1.0, 2.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(data.normalize(np.full((2, 2, 1), 0.5), 0.5, 0.1, max_value=1.0), 0.0)
    m = data.info("mnist")
    np.testing.assert_allclose(data.normalize(np.zeros((1, 1, 1, 1), np.uint8), m.mean, m.std), -0.1307 / 0.3081, rtol=1e-6)


def test_normalize_standardises_builtin(builtin):
    meta = data.info("builtin")
    z = data.normalize(builtin[0], meta.mean, meta.std)
    assert abs(float(z.mean())) < 1e-3 and abs(float(z.std()) - 1) < 1e-3


def test_normalize_bad_arguments():
    x = np.zeros((1, 2, 2, 3), np.uint8)
    with pytest.raises(ValueError, match="std"):
        data.normalize(x, 0.5, (0.2, 0.0, 0.2))
    with pytest.raises(ValueError, match="mean"):
        data.normalize(x, (0.5, 0.5), 0.2)
    with pytest.raises(ValueError, match="max_value"):
        data.normalize(x, 0.5, 0.2, max_value=0)


def test_channel_stats():
    x = np.zeros((2, 1, 2, 2), np.uint8)
    x[..., 1] = [[[255, 0]], [[255, 0]]]
    mean, std = data.channel_stats(x)
    np.testing.assert_allclose(mean, [0.0, 0.5])
    np.testing.assert_allclose(std, [0.0, 0.5])
