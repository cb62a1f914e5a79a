"""The training run of ``tests/data/legacy_training_run``, the same code under the old version and this one.

The folder was written by jaxcfl at commit fb1e471 (checkpoint and metrics rewritten whole after
every epoch), with::

    git archive fb1e471 src | tar -x -C /tmp/old
    PYTHONPATH=/tmp/old/src:tests python tests/_legacy_run.py tests/data/legacy_training_run

(it trains 2 of the 3 epochs of :func:`legacy_fit`, then stops). Write it again when a new JAX
changes the numbers. ``tests/test_folder_faults.py`` resumes it.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import jax
import numpy as np
import optax
from flax import nnx

LEGACY = Path(__file__).parent / "data" / "legacy_training_run"


class Net(nnx.Module):
    """A small MLP with parameters, BatchNorm statistics and a Dropout RNG stream (key arrays)."""

    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(8, 12, rngs=rngs)
        self.norm = nnx.BatchNorm(12, momentum=0.9, rngs=rngs)
        self.dropout = nnx.Dropout(0.25, rngs=rngs)
        self.out = nnx.Linear(12, 3, rngs=rngs)

    def __call__(self, x):
        return self.out(self.dropout(nnx.relu(self.norm(self.hidden(x)))))


def factory(key):
    return Net(nnx.Rngs(params=key, dropout=jax.random.fold_in(key, 1)))


def _data(n, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 8)).astype(np.float32)
    return x, np.argmax(x[:, :3], axis=1).astype(np.int32)


DATA, TEST = _data(48, 0), _data(24, 1)
KS = (1.0, 2.0, 3.0)


@functools.lru_cache(maxsize=None)
def engine():
    """One engine for every run here, so that its compiled programs serve them all."""
    from jaxcfl.nn._lockstep import Lockstep

    return Lockstep(factory, optax.adamw(2e-2, weight_decay=1e-3), copies_mode="unroll", probe="hidden",
                    trace_params=4, checksums=True, keep_outputs=True)


def legacy_fit(out, epochs=3, **kwargs):
    """The run of the legacy folder: 3 epochs of 3 steps, 3 copies, every curve recorded."""
    from jaxcfl.nn._lockstep import Copies

    return engine().fit(DATA, Copies(k=KS), epochs=epochs, batch_size=16, test=TEST, out=out, progress=False,
                        lr_at=lambda e: 0.02 / (1 + e), settings=dict(run="legacy_fit", epochs=epochs), **kwargs)


def write_legacy_folder(out):
    class Stop(Exception):
        pass

    def stop(epoch, partial):
        if epoch == 2:
            raise Stop

    try:
        legacy_fit(out, on_epoch=stop)
    except Stop:
        pass
    os.remove(Path(out) / ".jaxcfl.lock")


if __name__ == "__main__":
    write_legacy_folder(sys.argv[1])
