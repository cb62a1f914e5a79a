"""Bit-level comparison of runs: fingerprints, the paper's divergence, a deterministic mode,
and a checker that repeats a computation in separate processes.

Deterministic mode
------------------
Bit-exact reproducibility needs three things that XLA does not promise by default:

* **CPU**: ``--xla_cpu_multi_thread_eigen=false``. Eigen's multi-threaded matrix
  products and convolutions split their reductions by the thread pool, so the
  bits may depend on the number of threads and, with work stealing, on timing.
* **GPU**: ``--xla_gpu_deterministic_ops=true`` and
  ``--xla_gpu_exclude_nondeterministic_ops=true`` (no atomics-based scatter or
  reductions, deterministic cuDNN/cuBLAS algorithms), and
  ``--xla_gpu_autotune_level=0`` so that every process picks the same
  convolution algorithm instead of the fastest one measured at start-up.
* **Everywhere**: ``jax_default_matmul_precision="highest"`` (no TF32 or bf16
  passes on GPU/TPU), and ``--xla_allow_excess_precision=false`` so that
  low-precision (bfloat16) arithmetic is rounded after every operation.

The XLA flags are read once, when the backend starts: :func:`enable_deterministic_mode`
sets them in ``XLA_FLAGS`` for this process if JAX has not started a backend yet,
and always for the child processes it starts (:func:`run_in_processes`). The CLI's
``jaxcfl --deterministic ...`` enables it before anything is computed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array
from jax.typing import ArrayLike

__all__ = ["DETERMINISTIC_XLA_FLAGS", "DETERMINISTIC_MATMUL_PRECISION", "divergence", "fingerprint",
    "deterministic_xla_flags", "deterministic_env", "enable_deterministic_mode", "deterministic_mode_enabled",
    "ProcessCheck", "run_in_processes"]


def divergence(a: ArrayLike, b: ArrayLike) -> Array:
    """The paper's divergence ``2 mean(|a - b| / (|a| + |b|))`` between two weight arrays.

    Entries where both are zero contribute zero. The value lies in ``[0, 2]``:
    0 for identical arrays, order one once a perturbation has been amplified
    to the size of the weights (Section 4, Figure 2; Figure 4 right).
    """
    a = jnp.asarray(a)
    b = jnp.asarray(b)
    num = jnp.abs(a - b)
    den = jnp.abs(a) + jnp.abs(b)
    ratio = jnp.where(den > 0, num / jnp.where(den > 0, den, 1), 0.0)
    return 2.0 * jnp.mean(ratio)


_FINGERPRINTABLE = (jax.Array, np.ndarray, np.generic, bool, int, float, complex, str, bytes)


def fingerprint(tree) -> str:
    """A stable hex digest of the exact bytes, shapes and dtypes of a pytree (and its structure).

    Leaves must be arrays, numbers, strings or bytes (in any pytree container);
    anything else raises ``TypeError``: its bytes would be an object's address,
    which differs between two runs that computed the same thing.
    """
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    digest = hashlib.sha256(str(treedef).encode())
    for leaf in leaves:
        if not isinstance(leaf, _FINGERPRINTABLE):
            raise TypeError(f"fingerprint: cannot hash a leaf of type {type(leaf).__name__} ({leaf!r:.80}); "
                            f"leaves must be arrays, numbers, strings or bytes (convert it, e.g. str(path))")
        if isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        arr = np.asarray(jax.device_get(leaf))
        digest.update(f"{arr.dtype.str}{arr.shape}".encode())
        digest.update(np.ascontiguousarray(arr).tobytes())
    return digest.hexdigest()


# --- deterministic mode --------------------------------------------------------------------------

DETERMINISTIC_XLA_FLAGS: tuple[str, ...] = (
    "--xla_cpu_multi_thread_eigen=false",
    "--xla_gpu_deterministic_ops=true",
    "--xla_gpu_exclude_nondeterministic_ops=true",
    "--xla_gpu_autotune_level=0",
    "--xla_allow_excess_precision=false",
)
"""The XLA flags of the deterministic mode (see the module docstring for each one's reason)."""

DETERMINISTIC_MATMUL_PRECISION = "highest"


def _flag_name(flag: str) -> str:
    return flag.split("=", 1)[0]


def deterministic_xla_flags(existing: str = "") -> str:
    """``existing`` XLA_FLAGS with the deterministic flags set (a user's own values are replaced)."""
    ours = {_flag_name(f) for f in DETERMINISTIC_XLA_FLAGS}
    kept = [f for f in existing.split() if _flag_name(f) not in ours]
    return " ".join(kept + list(DETERMINISTIC_XLA_FLAGS))


def deterministic_env(base: Mapping[str, str] | None = None, *, enable: bool = True) -> dict[str, str]:
    """An environment for a child process, with the deterministic mode's XLA flags on or off."""
    env = dict(os.environ if base is None else base)
    ours = {_flag_name(f) for f in DETERMINISTIC_XLA_FLAGS}
    if enable:
        env["XLA_FLAGS"] = deterministic_xla_flags(env.get("XLA_FLAGS", ""))
        env["JAXCFL_DETERMINISTIC"] = "1"
    else:
        env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split() if _flag_name(f) not in ours)
        env.pop("JAXCFL_DETERMINISTIC", None)
    return env


def _backend_started() -> bool:
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):  # pragma: no cover - older or newer jax
        return True


def enable_deterministic_mode() -> dict[str, Any]:
    """Switch on the deterministic mode for this process (and the processes it starts).

    Sets ``jax_default_matmul_precision="highest"`` and adds
    :data:`DETERMINISTIC_XLA_FLAGS` to ``os.environ["XLA_FLAGS"]``. The XLA flags
    take effect in this process only if no JAX backend has started yet (call this
    first, before any computation); otherwise a ``RuntimeWarning`` says so, and
    they still apply to child processes.

    Returns:
      What was set: ``{"xla_flags", "matmul_precision", "applied_to_this_process"}``.
    """
    started = _backend_started()
    os.environ.update({k: v for k, v in deterministic_env().items() if k in ("XLA_FLAGS", "JAXCFL_DETERMINISTIC")})
    jax.config.update("jax_default_matmul_precision", DETERMINISTIC_MATMUL_PRECISION)
    if started:
        warnings.warn("a JAX backend has already started: the deterministic XLA flags apply only to new processes "
                      "(call enable_deterministic_mode() before any computation)", RuntimeWarning, stacklevel=2)
    return {"xla_flags": os.environ["XLA_FLAGS"], "matmul_precision": DETERMINISTIC_MATMUL_PRECISION,
            "applied_to_this_process": not started}


def deterministic_mode_enabled() -> bool:
    """True when this process runs with every deterministic XLA flag and the highest matmul precision."""
    flags = set(os.environ.get("XLA_FLAGS", "").split())
    return set(DETERMINISTIC_XLA_FLAGS) <= flags and jax.config.jax_default_matmul_precision == "highest"


# --- repeated runs in separate processes ---------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ProcessCheck:
    """Fingerprints of one computation repeated in separate processes."""

    target: str
    fingerprints: tuple[str, ...]
    seconds: tuple[float, ...]
    deterministic: bool

    @property
    def identical(self) -> bool:
        """All processes produced the same bytes."""
        return len(set(self.fingerprints)) == 1

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "fingerprints": list(self.fingerprints), "seconds": list(self.seconds),
                "deterministic": self.deterministic, "identical": self.identical}


_CHILD = """
import json, sys, time
spec = json.loads(sys.argv[1])
if spec["deterministic"]:
    import jax
    jax.config.update("jax_default_matmul_precision", "highest")
import importlib
from jaxcfl._core.determinism import fingerprint
module, _, name = spec["target"].partition(":")
fn = importlib.import_module(module)
for part in name.split("."):
    fn = getattr(fn, part)
start = time.perf_counter()
out = fn(*spec["args"], **spec["kwargs"])
print("JAXCFL-FINGERPRINT " + json.dumps({"fingerprint": fingerprint(out), "seconds": time.perf_counter() - start}))
"""


def _target_name(fn: Callable[..., Any] | str) -> str:
    if isinstance(fn, str):
        module, sep, name = fn.partition(":")
        if not (module and sep and name):
            raise ValueError(f"fn must be a callable or a 'module:function' string, got {fn!r}")
        return fn
    module, name = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if not callable(fn) or module in (None, "__main__") or "<" in name:
        raise TypeError(f"fn must be a module-level function importable by a new process (or 'module:function'), "
                        f"got {fn!r}")
    return f"{module}:{name}"


def run_in_processes(
    fn: Callable[..., Any] | str,
    n: int = 2,
    *,
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    deterministic: bool = True,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
) -> ProcessCheck:
    """Run ``fn(*args, **kwargs)`` in ``n`` fresh Python processes, one after another, and
    compare the :func:`fingerprint` of its results.

    Args:
      fn: a module-level function (or ``"module:function"``) that a new process can
        import; its result is any pytree of arrays.
      n: number of processes, ``>= 2``.
      args, kwargs: JSON-serialisable arguments.
      deterministic: run the children in the deterministic mode (XLA flags and
        matmul precision); ``False`` removes its flags from their environment.
      env: base environment for the children (default: this process's).
      timeout: seconds allowed to each child.

    Returns:
      :class:`ProcessCheck`; ``.identical`` says whether every run gave the same bytes.

    Raises:
      RuntimeError: a child failed; the message holds the end of its stderr.
    """
    from jaxcfl._core import validate as v
    target = _target_name(fn)
    v.check_int("n", n, minimum=2)
    spec = json.dumps({"target": target, "args": list(args), "kwargs": dict(kwargs or {}),
                       "deterministic": deterministic})
    child_env = deterministic_env(env, enable=deterministic)
    src = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    child_env["PYTHONPATH"] = os.pathsep.join(p for p in (src, child_env.get("PYTHONPATH", "")) if p)
    prints, seconds = [], []
    for _ in range(n):
        proc = subprocess.run([sys.executable, "-c", _CHILD, spec], env=child_env, capture_output=True, text=True,
                              timeout=timeout)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("JAXCFL-FINGERPRINT ")), None)
        if proc.returncode != 0 or line is None:
            raise RuntimeError(f"{target} failed in a child process (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
        result = json.loads(line.split(" ", 1)[1])
        prints.append(result["fingerprint"])
        seconds.append(float(result["seconds"]))
    return ProcessCheck(target, tuple(prints), tuple(seconds), deterministic)
