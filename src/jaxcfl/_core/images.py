"""Input images: the paper's checkerboard, and a user's own image read from a file.

:func:`load_image` is what ``jaxcfl theory``, ``jaxcfl sweep`` and ``jaxcfl bounds``
read ``--image`` with: ``"checkerboard"``, a 2-D ``.npy`` array (used as it is), or a
picture that Pillow reads (PNG, JPEG, ...), converted to grey in ``[0, 1]``.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array
from jax.typing import DTypeLike

from jaxcfl._core.validate import check_int, check_memory

__all__ = ["LUMA_WEIGHTS", "checkerboard", "load_image"]

LUMA_WEIGHTS = (0.299, 0.587, 0.114)
"""ITU-R 601-2 luma weights of R, G and B: the grey of a colour picture (Pillow's ``"L"`` conversion uses them too)."""


def checkerboard(n: int, *, dtype: DTypeLike | None = None) -> Array:
    """The paper's ``n x n`` checkerboard: ``I[m, l] = -1`` where ``m + l`` is even, ``+1`` otherwise.

    Args:
      n: side length (the paper uses 256).
      dtype: floating dtype; defaults to JAX's default float (float32, or
        float64 under ``jax.enable_x64``).

    Returns:
      An ``(n, n)`` array of +-1.

    Raises:
      ValueError: ``n < 1``, or an array larger than this machine's memory (refused before
        anything is allocated, with the estimate).

    References:
      Sun et al. (2024), Section 5 / appendix E: the input of the one-layer CNN.

    Example:
      >>> import jaxcfl
      >>> jaxcfl.checkerboard(3).tolist()
      [[-1.0, 1.0, -1.0], [1.0, -1.0, 1.0], [-1.0, 1.0, -1.0]]
    """
    n = check_int("n", n, minimum=1)
    dtype = jax.dtypes.canonicalize_dtype(dtype if dtype is not None else float)
    check_memory("n", n * n * np.dtype(dtype).itemsize, f"a {n} x {n} {np.dtype(dtype).name} checkerboard")
    idx = np.arange(n)  # built in NumPy (exact +-1), one transfer: no eager op to compile per size
    parity = (idx[:, None] + idx[None, :]) % 2
    return jnp.asarray(np.where(parity == 0, -1.0, 1.0).astype(dtype))


def load_image(source: str | os.PathLike, *, size: int = 256) -> np.ndarray:
    """A 2-D float64 image: the checkerboard, a ``.npy`` array, or a picture converted to grey in ``[0, 1]``.

    Args:
      source: ``"checkerboard"`` (the paper's, ``size x size``, values +-1; write
        ``./checkerboard`` for a file of that name), a path to a ``.npy`` file
        holding one 2-D array of real numbers (used as it is: no scaling), or a path
        to a picture that Pillow reads (PNG and JPEG; also TIFF, BMP, GIF, WebP, ...).
      size: the side of the checkerboard (ignored for files).

    Pictures become grey values in ``[0, 1]``, by their mode (bit depth):

    * 8-bit grey (``L``, ``LA``): ``v / 255``; bilevel (``1``): 0 or 1;
    * 16-bit grey (``I;16``, e.g. a 16-bit PNG): ``v / 65535``, all 16 bits kept;
      32-bit integer grey (``I``) only when its values fit 16 bits (how older Pillow
      versions open 16-bit PNGs), also ``v / 65535``;
    * colour (``RGB``, ``RGBA``, palette, ``CMYK``, ...; 8 bits a channel, as Pillow
      decodes them): the luma ``(0.299 R + 0.587 G + 0.114 B) / 255`` (ITU-R 601-2,
      :data:`LUMA_WEIGHTS`, the weights of Pillow's ``"L"`` mode, here in float64
      without its rounding to 8 bits), on the stored (gamma-encoded) values;
    * 32-bit float grey (``F``, e.g. a float TIFF): the values as they are.

    An alpha channel is ignored, the EXIF orientation of a photograph is applied,
    and a multi-frame file gives its first frame.

    Returns:
      A float64 NumPy array of shape ``(height, width)``, every value finite.

    Raises:
      ValueError: the file is missing, unreadable, truncated, not 2-D, not real, not
        finite or empty, or larger than this machine's memory (judged from a ``.npy``
        file's header, before anything is read); the message names ``source``.

    Example:
      >>> import jaxcfl
      >>> jaxcfl.load_image("checkerboard", size=2).tolist()
      [[-1.0, 1.0], [1.0, -1.0]]
    """
    if isinstance(source, str) and source == "checkerboard":
        size = check_int("size", size, minimum=1)
        check_memory("size", size * size * (8 + np.dtype(jax.dtypes.canonicalize_dtype(float)).itemsize),
                     f"a {size} x {size} checkerboard")
        return np.asarray(checkerboard(size), np.float64)
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"source must be 'checkerboard' or a path, got {type(source).__name__} {source!r:.60}")
    path = Path(source)
    if not path.is_file():
        what = "a folder" if path.is_dir() else "no such file"
        raise ValueError(f"cannot read {str(path)!r}: {what}; give a .npy array, a PNG or JPEG picture, or 'checkerboard'")
    image = _read_npy(path) if path.suffix.lower() == ".npy" else _read_picture(path)
    if image.ndim != 2 or image.dtype.kind not in "biuf":
        raise ValueError(f"{str(path)!r} holds an array of shape {image.shape} and dtype {image.dtype}; "
                         f"it must be a 2-D array of real numbers")
    if image.size == 0:
        raise ValueError(f"{str(path)!r} holds an empty image (shape {image.shape})")
    image = np.asarray(image, np.float64)
    if not np.all(np.isfinite(image)):
        raise ValueError(f"{str(path)!r} holds {int(np.sum(~np.isfinite(image)))} NaN or infinite value(s); "
                         f"every pixel must be finite")
    return image


def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int] | None:
    """``(shape, dtype, offset of the data)`` of a ``.npy`` file, read from its header alone;
    ``None`` when the file does not start like one (``np.load`` then says why)."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(f)
            elif version in ((2, 0), (3, 0)):
                shape, _, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                return None
            return tuple(int(n) for n in shape), np.dtype(dtype), f.tell()
    except (OSError, ValueError, TypeError, EOFError):
        return None


def _read_npy(path: Path) -> np.ndarray:
    header = _npy_header(path)
    if header is not None:  # what the header claims, checked before anything is allocated
        shape, dtype, offset = header
        count = int(np.prod(shape, dtype=object))
        if not dtype.hasobject:
            shown = " x ".join(map(str, shape)) or "scalar"
            converted = 0 if dtype == np.float64 else 8  # the float64 copy
            check_memory("source", count * (dtype.itemsize + converted),
                         f"{str(path)!r} (its header says: a {shown} {dtype.name} array)",
                         hint="give a smaller image")
            have, need = path.stat().st_size - offset, count * dtype.itemsize
            if have < need:
                raise ValueError(f"{str(path)!r} is truncated: its header claims a {shown} {dtype.name} array "
                                 f"({need} bytes), but the file holds {max(have, 0)} bytes of data")
    try:
        image = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise ValueError(f"cannot read {str(path)!r} as a .npy array ({err}); give one 2-D array saved with numpy.save") from None
    if hasattr(image, "files"):  # an .npz archive behind a .npy name
        image.close()
        raise ValueError(f"{str(path)!r} holds several arrays (an .npz); give one 2-D array saved with numpy.save")
    return image


def _read_picture(path: Path) -> np.ndarray:
    """The grey values of a picture (:func:`load_image` documents the conversion)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as picture:
            width, height = picture.size  # from the header: checked before any pixel is decoded
            check_memory("source", width * height * 8 * (len(picture.getbands()) + 2),
                         f"{str(path)!r} (a {width} x {height} {picture.mode} picture, decoded and converted to grey)",
                         hint="give a smaller image")
            picture = ImageOps.exif_transpose(picture)
            return _grey(picture, path)
    except UnidentifiedImageError:
        raise ValueError(f"cannot read {str(path)!r}: not a .npy array, and not a picture Pillow recognises "
                         f"(PNG, JPEG, TIFF, ...)") from None
    except (OSError, SyntaxError, Image.DecompressionBombError) as err:  # truncated or damaged data, too large
        raise ValueError(f"cannot read {str(path)!r} as a picture ({type(err).__name__}: {err})") from None


def _grey(picture, path: Path) -> np.ndarray:
    mode = picture.mode
    if mode == "1":
        return np.asarray(picture, np.float64)
    if mode in ("L", "LA"):
        return np.asarray(picture.getchannel(0), np.float64) / 255.0
    if mode.startswith("I;16"):
        return np.asarray(picture, np.float64) / 65535.0
    if mode == "I":
        values = np.asarray(picture, np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise ValueError(f"{str(path)!r} is a 32-bit integer picture with values in [{values.min()}, "
                             f"{values.max()}]; only 16-bit grey is scaled to [0, 1] (save it as a .npy array)")
        return values / 65535.0
    if mode == "F":
        return np.asarray(picture, np.float64)
    if mode in ("RGB", "RGBA", "RGBX", "RGBa", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "La"):
        rgb = np.asarray(picture.convert("RGB"), np.float64)
        return (rgb @ np.asarray(LUMA_WEIGHTS)) / 255.0
    raise ValueError(f"{str(path)!r} is a picture of mode {mode!r}, which jaxcfl does not convert to grey; "
                     f"save it as 8- or 16-bit grey or RGB, or as a .npy array")
