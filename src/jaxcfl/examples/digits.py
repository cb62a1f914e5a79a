"""The default ``jaxcfl sensitivity`` training: the built-in digits, an NNX network, AdamW.

Copy this file to start a spec of your own: ``jaxcfl sensitivity my_file.py:training`` calls
``training()`` and measures what it returns. The keys are ``model``, ``optimizer``, ``data`` and
optionally ``test``, ``loss``, ``metric``, ``augment``, ``batch_size`` and ``stability``
(:class:`jaxcfl.nn._protocol.Training`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxcfl.nn import _data as datasets
class DigitsNet(nnx.Module):
    """28x28x1 digits -> 10 logits: flatten, Linear 256, BatchNorm, ReLU, Dropout 0.2, Linear 10."""

    def __init__(self, rngs: nnx.Rngs, hidden: int = 256, dropout: float = 0.2):
        self.hidden = nnx.Linear(28 * 28, hidden, rngs=rngs)
        self.norm = nnx.BatchNorm(hidden, momentum=0.9, rngs=rngs)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.out = nnx.Linear(hidden, 10, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0], -1)
        return self.out(self.dropout(nnx.relu(self.norm(self.hidden(x)))))


def digits() -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """The built-in digits (1433 training, 364 test images, 28x28x1), normalised, float32."""
    x, y, x_test, y_test = datasets.load("builtin")
    meta = datasets.info("builtin")
    norm = lambda a: datasets.normalize(a, meta.mean, meta.std).astype(np.float32)
    return (norm(x), y.astype(np.int32)), (norm(x_test), y_test.astype(np.int32))


def random_shift(x: jax.Array, key: jax.Array, most: int = 2) -> jax.Array:
    """Shift every image by up to ``most`` pixels in each direction (zeros enter at the edges)."""
    shifts = jax.random.randint(key, (x.shape[0], 2), -most, most + 1)
    padded = jnp.pad(x, ((0, 0), (most, most), (most, most), (0, 0)))

    def one(image, shift):
        return jax.lax.dynamic_slice(image, (most + shift[0], most + shift[1], 0), x.shape[1:])

    return jax.vmap(one)(padded, shifts)


def training() -> dict:
    """The NNX network with BatchNorm and Dropout, ``optax.adamw(1e-3, weight_decay=1e-4)``, batch 64;
    its preconditioned sharpness is held against Adam's threshold ``38 / lr`` (:class:`jaxcfl.limits.Adam`)."""
    from jaxcfl.nn._limits import Adam

    train, test = digits()
    return dict(model=lambda key: DigitsNet(nnx.Rngs(params=key, dropout=jax.random.fold_in(key, 1))),
                optimizer=optax.adamw(1e-3, weight_decay=1e-4), data=train, test=test, augment=random_shift,
                batch_size=64, stability=Adam(lr=1e-3))


def mlp_init(key: jax.Array, sizes: tuple[int, ...] = (28 * 28, 128, 10)) -> list[dict[str, jax.Array]]:
    """He-initialised weights of an MLP with the given layer sizes, as a list of ``{"w", "b"}``."""
    keys = jax.random.split(key, len(sizes) - 1)
    return [{"w": jax.random.normal(k, (m, n)) * jnp.sqrt(2.0 / m), "b": jnp.zeros(n)}
            for k, m, n in zip(keys, sizes[:-1], sizes[1:])]


def mlp_apply(params: list[dict[str, jax.Array]], x: jax.Array) -> jax.Array:
    """Logits of the MLP: ReLU between the layers."""
    h = x.reshape(x.shape[0], -1)
    for layer in params[:-1]:
        h = jax.nn.relu(h @ layer["w"] + layer["b"])
    return h @ params[-1]["w"] + params[-1]["b"]


def functional_training() -> dict:
    """A plain-JAX MLP as two pure functions, ``optax.adam(1e-3)``, batch 64."""
    train, test = digits()
    return dict(model=(mlp_init, mlp_apply), optimizer=optax.adam(1e-3), data=train, test=test, batch_size=64)
