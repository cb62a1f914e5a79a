"""Lockstep training of k perturbed copies of a Flax network (Section 4, appendix C).

The copies share one initialisation and the same batches, and differ only in the
perturbation factor ``k`` of :func:`jaxcfl.perturb.perturbed_sgd`: one vmapped,
jit-compiled step trains all of them. Everything that could vary between two
runs is fixed by the seeds: the initialisation by ``init_seed``, the batch order
by ``seed`` and the epoch, the augmentation by ``seed``, the epoch and the step.
With the deterministic mode (:mod:`jaxcfl.determinism`) a run is reproducible bit
for bit, and a run killed and resumed from its checkpoint ends with the same
bytes as one that never stopped.

Optimiser (the paper's): SGD with Nesterov momentum 0.9, weight decay 5e-4, lr
0.1 divided by 10 at 20/40/60/80% of the epochs (epochs 40, 80, 120, 160 of 200),
batch 128, random crop with padding 4 and horizontal flips.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax import Array

from jaxcfl import _validate as v
from jaxcfl import data as datasets
from jaxcfl import nets
from jaxcfl._folder import ResultFolder
from jaxcfl._results import npz_bytes
from jaxcfl.determinism import divergence, fingerprint
from jaxcfl.guard import cfl_guard, guard_state, refresh_due
from jaxcfl.perturb import perturbed_sgd

PAPER_MILESTONES = (0.2, 0.4, 0.6, 0.8)
"""lr drops at these fractions of the epochs: epochs 40, 80, 120 and 160 of 200."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """What is trained, on what, and how. Every field is part of a run's identity.

    Attributes:
      model: one of :data:`jaxcfl.nets.NETWORKS`.
      dataset: one of :data:`jaxcfl.data.DATASETS` (``"builtin"`` needs no files).
      data_root: where the dataset's files are (see :func:`jaxcfl.data.load`).
      activation, beta: ``"relu"`` or ``"swish"`` with Swish's beta.
      epochs, batch_size: training length and batch (the last partial batch is dropped).
      lr, momentum, nesterov, weight_decay: the optimiser.
      milestones: epochs after which lr is multiplied by ``gamma``; ``None``: the
        paper's schedule scaled to ``epochs`` (:data:`PAPER_MILESTONES`).
      gamma: lr decay factor at each milestone.
      augment: random crop (pad 4) and, if ``flip``, horizontal flips.
      flip: ``None``: flips for CIFAR-10 and Fashion-MNIST, none for digits.
      init_seed: seed of the shared initialisation.
      train_size, test_size: use only the first n examples (``None``: all).
      eval_batch_size: test examples per evaluation batch.
      probe: substring of the parameter path whose divergence is logged every step
        (Figure 2: "one conv layer"); ``None``: the first convolution kernel.
      guard: keep every step inside its local stability limit with :func:`jaxcfl.cfl_guard`
        (``docs/cfl_guard.md``); ``guard_safety``, ``guard_every``, ``guard_iterations`` and
        ``guard_first_iterations`` are its ``safety``, ``every``, ``iterations`` and
        ``first_iterations``. The guard sees each batch's loss.
    """

    model: str = "resnet20"
    dataset: str = "builtin"
    data_root: str | None = None
    activation: str = "relu"
    beta: float = 1.0
    epochs: int = 1
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    milestones: tuple[int, ...] | None = None
    gamma: float = 0.1
    augment: bool = True
    flip: bool | None = None
    init_seed: int = 0
    train_size: int | None = None
    test_size: int | None = None
    eval_batch_size: int = 500
    probe: str | None = None
    guard: bool = False
    guard_safety: float = 0.9
    guard_every: int = 20
    guard_iterations: int = 4
    guard_first_iterations: int = 20

    def __post_init__(self) -> None:
        v.check_choice("model", self.model, nets.NETWORKS)
        v.check_choice("dataset", self.dataset, datasets.DATASETS)
        v.check_choice("activation", self.activation, ("relu", "swish"))
        v.check_positive("beta", self.beta)
        v.check_int("epochs", self.epochs)
        v.check_int("batch_size", self.batch_size)
        v.check_int("eval_batch_size", self.eval_batch_size)
        v.check_int("init_seed", self.init_seed, minimum=0)
        v.check_positive("lr", self.lr)
        v.check_unit_interval("momentum", self.momentum)
        v.check_nonnegative("weight_decay", self.weight_decay)
        v.check_positive("gamma", self.gamma)
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov=True needs momentum > 0")
        for name in ("train_size", "test_size"):
            if getattr(self, name) is not None:
                v.check_int(name, getattr(self, name))
        if self.guard:
            v.check_positive("guard_safety", self.guard_safety)
            if not self.guard_safety <= 1:
                raise ValueError(f"guard_safety must lie in (0, 1], got {self.guard_safety!r}")
            v.check_int("guard_every", self.guard_every)
            v.check_int("guard_iterations", self.guard_iterations)
            v.check_int("guard_first_iterations", self.guard_first_iterations)
        if self.milestones is not None:
            object.__setattr__(self, "milestones", tuple(v.check_int("milestones", int(m), minimum=1)
                                                         for m in self.milestones))

    @property
    def milestone_epochs(self) -> tuple[int, ...]:
        if self.milestones is not None:
            return self.milestones
        return tuple(sorted({m for f in PAPER_MILESTONES if 0 < (m := int(round(f * self.epochs))) < self.epochs}))

    def lr_at(self, epoch: int) -> float:
        """The lr in force during ``epoch`` (0-based): :func:`step_decay` over :attr:`milestone_epochs`,
        in float64 (the optimiser runs the same schedule over steps, in float32).

        Example:
          >>> from jaxcfl.train import TrainConfig
          >>> config = TrainConfig(epochs=200)
          >>> config.milestone_epochs
          (40, 80, 120, 160)
          >>> [round(config.lr_at(epoch), 6) for epoch in (0, 39, 40, 80, 199)]
          [0.1, 0.1, 0.01, 0.001, 1e-05]
        """
        return float(step_decay(self.lr, self.gamma, self.milestone_epochs, xp=np)(epoch))

    @property
    def uses_flip(self) -> bool:
        return self.flip if self.flip is not None else self.dataset in ("cifar10", "fashion_mnist")

    @property
    def guard_settings(self) -> tuple[int, int, int] | None:
        """``(every, iterations, first_iterations)`` of the guard (static: they shape the compiled
        step), or ``None``."""
        return (self.guard_every, self.guard_iterations, self.guard_first_iterations) if self.guard else None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["milestones"] = list(self.milestone_epochs)
        if not self.guard:  # an unguarded run keeps the identity it had before the guard existed
            for name in ("guard", "guard_safety", "guard_every", "guard_iterations", "guard_first_iterations"):
                del d[name]
        return d


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LockstepState:
    """The k copies, stacked along axis 0 of every leaf."""

    params: Any
    batch_stats: Any
    opt_state: Any


def step_decay(lr: Any, gamma: Any, boundaries: Sequence[int], xp: Any = jnp) -> Callable[[Any], Any]:
    """The learning-rate schedule ``count -> lr * gamma ** (number of boundaries <= count)``.

    Its one definition: the optimiser traces it over steps (``xp=jnp``, float32 arrays,
    boundaries in steps), and :meth:`TrainConfig.lr_at` evaluates it on the host over
    epochs (``xp=np``, Python floats, so float64).
    """
    edges = xp.asarray(tuple(boundaries) or (np.iinfo(np.int32).max,), np.int32)

    def schedule(count):
        return lr * gamma ** xp.sum(count >= edges).astype(xp.result_type(lr))

    return schedule


def _optimizer(lr: Array, k: Array, momentum: Array, weight_decay: Array, gamma: Array,
               boundaries: tuple[int, ...], nesterov: bool, safety: Array | None = None,
               guard: tuple[int, int, int] | None = None) -> optax.GradientTransformation:
    """perturbed_sgd with the :func:`step_decay` schedule, then the CFL guard when ``guard`` is
    ``(every, iterations, first_iterations)``; every number traced."""
    schedule = step_decay(lr, gamma, boundaries)
    sgd = perturbed_sgd(schedule, k, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    if guard is None:
        return sgd
    every, iterations, first_iterations = guard
    return optax.chain(sgd, cfl_guard(schedule, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                                      safety=safety, every=every, iterations=iterations,
                                      first_iterations=first_iterations))


def cross_entropy(logits: Array, labels: Array) -> Array:
    """Mean softmax cross-entropy of integer labels."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@functools.lru_cache(maxsize=None)
def network_loss(graphdef: nnx.GraphDef) -> Callable[..., Array]:
    """``loss(params, batch_stats, x, y)``: mean cross-entropy of a :mod:`jaxcfl.nets` network,
    BatchNorm in training mode (normalised by the batch's own statistics).

    One function object per ``graphdef`` (cached), so that the compiled programs of
    :func:`jaxcfl.sharpness` and :func:`jaxcfl.max_stable_lr` are reused across calls.
    """

    def loss(params: Any, batch_stats: Any, x: Array, y: Array) -> Array:
        return cross_entropy(nets.apply(graphdef, params, batch_stats, x, train=True)[0], y)

    return loss


def probe_mask(params: Any, probe: str | None) -> tuple[bool, ...]:
    """Which leaves of ``params`` the probe selects: the leaves whose path contains ``probe``
    (``None``: the first 4-D leaf, i.e. the first convolution kernel)."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    paths = [jax.tree_util.keystr(path) for path, _ in flat]
    if probe is None:
        hits = [i for i, (_, leaf) in enumerate(flat) if np.ndim(leaf) == 4][:1]
    else:
        hits = [i for i, p in enumerate(paths) if probe in p]
    if not hits:
        raise ValueError(f"probe {probe!r} matches no parameter; paths are e.g. {paths[:5]}")
    return tuple(i in hits for i in range(len(flat)))


def _divergence_to_first(stacked: Any, mask: tuple[bool, ...] | None = None) -> Array:
    """Divergence of every copy's (masked) parameters from copy 0's, shape ``(copies,)``."""
    leaves = jax.tree.leaves(stacked)
    if mask is not None:
        leaves = [leaf for leaf, keep in zip(leaves, mask) if keep]
    flat = jnp.concatenate([leaf.reshape(leaf.shape[0], -1) for leaf in leaves], axis=1)
    return jax.vmap(divergence, in_axes=(None, 0))(flat[0], flat)


COPIES_MODES = ("auto", "vmap", "unroll")


def resolve_copies_mode(mode: str) -> str:
    """``"auto"``: ``"vmap"`` on GPU/TPU, ``"unroll"`` on CPU.

    Both run the k copies in ONE jit-compiled step. ``vmap`` batches them; for a
    convolutional network with different weights per copy, XLA turns each
    convolution into a grouped convolution, which cuDNN runs well and XLA's CPU
    backend runs several times slower than the separate convolutions
    (``benchmarks/train_step.py`` measures it). ``unroll`` traces the copies one
    after the other inside the same compiled step: ordinary convolutions, k
    times the compile time.
    """
    v.check_choice("copies_mode", mode, COPIES_MODES)
    if mode == "auto":
        return "unroll" if jax.default_backend() == "cpu" else "vmap"
    return mode


def over_copies(fn: Callable, in_axes: tuple[int | None, ...], mode: str) -> Callable:
    """``jax.vmap(fn, in_axes)``, or the same signature with the copies unrolled (``mode="unroll"``)."""
    if mode == "vmap":
        return jax.vmap(fn, in_axes=in_axes)

    def unrolled(*args):
        batched = [a for a, ax in zip(args, in_axes) if ax == 0]
        copies = jax.tree.leaves(batched[0])[0].shape[0]
        outs = [fn(*[jax.tree.map(lambda t, i=i: t[i], a) if ax == 0 else a for a, ax in zip(args, in_axes)])
                for i in range(copies)]
        return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)

    return unrolled


@dataclasses.dataclass(frozen=True)
class OptimizerNumbers:
    """The optimiser's numbers (lr, momentum, weight decay, lr decay factor), passed to the
    compiled step as traced arrays: new values never recompile it.

    Not :class:`jaxcfl.Hyper`, which holds the traced hyperparameters of the PDE.
    """

    lr: float
    momentum: float
    weight_decay: float
    gamma: float
    safety: float = 0.9  # the CFL guard's margin (unused without the guard)

    @classmethod
    def of(cls, config: TrainConfig) -> OptimizerNumbers:
        return cls(config.lr, config.momentum, config.weight_decay, config.gamma, config.guard_safety)

    def arrays(self) -> tuple[Array, ...]:
        return tuple(jnp.asarray(x, jnp.float32)
                     for x in (self.lr, self.momentum, self.weight_decay, self.gamma, self.safety))


def trace_indices(num_params: int, size: int) -> np.ndarray:
    """The ``size`` entries of the flattened parameter vector that ``trace_params`` records.

    A fixed (seed 0), sorted, uniformly random choice without replacement, the same in
    every run of one architecture: the divergence of two runs' traces is an unbiased
    estimate of the divergence of all their parameters (a mean over entries).
    """
    size = min(int(size), num_params)
    if size == num_params:
        return np.arange(num_params)
    return np.sort(np.random.default_rng(0).choice(num_params, size, replace=False))


def _flat(tree: Any) -> Array:
    return jnp.concatenate([leaf.reshape(-1) for leaf in jax.tree.leaves(tree)])


@functools.lru_cache(maxsize=16)
def make_train_step(graphdef: nnx.GraphDef, *, nesterov: bool, boundaries: tuple[int, ...],
                    probe_mask: tuple[bool, ...] | None = None, copies_mode: str = "auto",
                    trace_params: int = 0, guard: tuple[int, int, int] | None = None,
                    refresh: bool | str = False) -> Callable:
    """The jitted lockstep step ``(state, ks, x, y, hyper) -> (state, metrics)``.

    ``ks`` has one perturbation factor per copy; ``x, y`` are one batch shared by
    all copies; ``hyper`` is ``(lr, momentum, weight_decay, gamma, safety)`` as arrays
    (:meth:`OptimizerNumbers.arrays`).
    With ``guard = (every, iterations, first_iterations)`` the optimiser is followed by :func:`jaxcfl.cfl_guard`,
    which re-estimates the sharpness in this program as ``refresh`` says (``"first"``, ``True``
    or ``False``: the caller compiles one step each way and follows :func:`jaxcfl.guard.refresh_due`); ``metrics`` then also holds
    each copy's effective lr (``"guard_lr"``) and sharpness estimate (``"guard_lambda"``).
    ``metrics`` holds each copy's loss, the divergence of all its parameters from
    copy 0, the divergence of the probed layer and, if ``trace_params > 0``,
    ``"trace"``: copy 0's values at the :func:`trace_indices` entries. Cached: runs
    that differ only in numbers (lr, k, seeds, data) share one compiled step.
    """

    def one(params, batch_stats, opt_state, k, x, y, lr, momentum, weight_decay, gamma, safety):
        def loss_fn(p):
            logits, new_stats = nets.apply(graphdef, p, batch_stats, x, train=True)
            return cross_entropy(logits, y), new_stats

        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        opt = _optimizer(lr, k, momentum, weight_decay, gamma, boundaries, nesterov, safety, guard)
        if guard is None:
            updates, opt_state = opt.update(grads, opt_state, params)
        else:
            updates, opt_state = opt.update(grads, opt_state, params, value_fn=lambda p: loss_fn(p)[0],
                                            refresh=refresh)
        return optax.apply_updates(params, updates), new_stats, opt_state, loss

    batched = over_copies(one, (0, 0, 0, 0, *(None,) * 7), resolve_copies_mode(copies_mode))

    @jax.jit
    def step(state: LockstepState, ks: Array, x: Array, y: Array, hyper: tuple[Array, ...]):
        params, stats, opt_state, loss = batched(state.params, state.batch_stats, state.opt_state, ks, x, y, *hyper)
        metrics = {"loss": loss, "divergence": _divergence_to_first(params)}
        if guard is not None:
            gs = guard_state(opt_state)
            metrics["guard_lr"], metrics["guard_lambda"] = gs.lr, gs.lambda_max
        if probe_mask is not None:
            metrics["probe_divergence"] = _divergence_to_first(params, probe_mask)
        if trace_params:
            first = _flat(jax.tree.map(lambda a: a[0], params))
            metrics["trace"] = first[trace_indices(first.size, trace_params)]
        return LockstepState(params, stats, opt_state), metrics

    return step


@functools.lru_cache(maxsize=16)
def make_eval_step(graphdef: nnx.GraphDef, copies_mode: str = "auto") -> Callable:
    """``(state, x, y, mask) -> (correct, loss_sum, predictions)`` per copy (BatchNorm on
    running statistics): the number of correct masked examples, the sum of their
    cross-entropies, and the predicted class of every example.

    With ``vmap`` all copies run in one program; otherwise one compiled single-copy
    forward pass is called once per copy (evaluation needs no lockstep, and this
    compiles k times faster than unrolling).
    """

    def one(params, batch_stats, x, y, mask):
        logits, _ = nets.apply(graphdef, params, batch_stats, x, train=False)
        predictions = jnp.argmax(logits, -1)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        return jnp.sum((predictions == y) & mask), jnp.sum(jnp.where(mask, losses, 0.0)), predictions

    if resolve_copies_mode(copies_mode) == "vmap":
        batched = jax.jit(jax.vmap(one, in_axes=(0, 0, None, None, None)))
        return lambda state, x, y, mask: batched(state.params, state.batch_stats, x, y, mask)
    single = jax.jit(one)

    def per_copy(state, x, y, mask):
        copies = jax.tree.leaves(state.params)[0].shape[0]
        pick = lambda tree, i: jax.tree.map(lambda a: a[i], tree)
        outs = [single(pick(state.params, i), pick(state.batch_stats, i), x, y, mask) for i in range(copies)]
        return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)

    return per_copy


@functools.lru_cache(maxsize=16)
def _initialiser(model: str, in_channels: int, num_classes: int, activation: str, beta: float):
    """``(graphdef, seed -> (params, batch_stats))``: one compiled program draws every weight
    (eagerly, each new weight shape would compile its own random-number kernel)."""

    def build(seed):
        return nets.create(model, num_classes=num_classes, in_channels=in_channels, activation=activation,
                           beta=beta, rngs=nnx.Rngs(jax.random.key(seed)))

    graphdef = nets.split(nnx.eval_shape(lambda: build(0)))[0]
    return graphdef, jax.jit(lambda seed: nets.split(build(seed))[1:])


def init_lockstep(config: TrainConfig, ks: Sequence[float], in_channels: int, num_classes: int):
    """Build the model once and stack ``len(ks)`` identical copies of it.

    Returns:
      ``(graphdef, state)``.
    """
    graphdef, initialise = _initialiser(config.model, in_channels, num_classes, config.activation, config.beta)
    params, stats = initialise(jnp.uint32(config.init_seed))
    copies = len(ks)
    stack = lambda tree: jax.tree.map(lambda a: jnp.broadcast_to(a, (copies, *a.shape)).copy(), tree)
    lr, momentum, wd, gamma, safety = OptimizerNumbers.of(config).arrays()
    opt_state = _optimizer(lr, jnp.float32(1.0), momentum, wd, gamma, (), config.nesterov, safety,
                           config.guard_settings).init(params)
    return graphdef, LockstepState(stack(params), stack(stats), stack(opt_state))


def final_epochs(epochs: int) -> int:
    """How many final epochs a run's final accuracy averages: 5% of them, at least 1.

    The paper averages the last 10 of 200 epochs (appendix C); a short run keeps the
    proportion, so that the average stays inside the last, lowest learning rate.
    """
    return max(1, round(v.check_int("epochs", epochs) / 20))


@dataclasses.dataclass
class TrainResult:
    """History of a lockstep run. Arrays have one column per copy (``ks``)."""

    config: TrainConfig
    ks: tuple[float, ...]
    seed: int
    epochs_done: int
    test_accuracy: np.ndarray  # (epochs, copies)
    test_loss: np.ndarray  # (epochs, copies): mean cross-entropy on the test set
    train_loss: np.ndarray  # (epochs, copies)
    divergence: np.ndarray  # (epochs, copies): all parameters, end of epoch
    step_divergence: np.ndarray  # (steps, copies): all parameters, after every step
    probe_divergence: np.ndarray  # (steps, copies): the probed layer, after every step
    param_trace: np.ndarray  # (steps, traced): copy 0's traced parameters after every step (empty: none)
    test_predictions: np.ndarray  # (copies, test examples): predicted classes after the last epoch
    lr: np.ndarray  # (epochs,) lr in force during each epoch
    fingerprints: tuple[str, ...]  # final parameters and batch statistics of each copy
    seconds: float
    compile_seconds: float
    state: LockstepState | None = dataclasses.field(default=None, repr=False)  # the final copies (not serialised)
    guard_lr: np.ndarray | None = None  # (steps, copies): the CFL guard's effective lr at every step (guard only)
    guard_lambda: np.ndarray | None = None  # (steps, copies): its sharpness estimate at every step (guard only)

    def final_accuracy(self, last: int | None = None) -> np.ndarray:
        """Mean test accuracy over the last ``min(last, epochs)`` epochs, per copy (appendix C).

        ``last=None``: :func:`final_epochs` of the configured epochs (the paper's 10 of 200).
        """
        return self._final(self.test_accuracy, last)

    def final_loss(self, last: int | None = None) -> np.ndarray:
        """Mean test loss over the same epochs as :meth:`final_accuracy`, per copy."""
        return self._final(self.test_loss, last)

    def _final(self, history: np.ndarray, last: int | None) -> np.ndarray:
        last = final_epochs(self.config.epochs) if last is None else v.check_int("last", last)
        return history[-min(last, self.epochs_done):].mean(axis=0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(), "ks": list(self.ks), "seed": self.seed, "epochs_done": self.epochs_done,
            "test_accuracy": self.test_accuracy.tolist(), "test_loss": self.test_loss.tolist(),
            "train_loss": self.train_loss.tolist(),
            "divergence": self.divergence.tolist(), "lr": self.lr.tolist(),
            "final_accuracy": self.final_accuracy().tolist(), "final_loss": self.final_loss().tolist(),
            "fingerprints": list(self.fingerprints),
            "seconds": self.seconds, "compile_seconds": self.compile_seconds,
        }


def _copy_fingerprints(state: LockstepState) -> tuple[str, ...]:
    host = jax.device_get((state.params, state.batch_stats))
    copies = jax.tree.leaves(host)[0].shape[0]
    return tuple(fingerprint(jax.tree.map(lambda a, i=i: a[i], host)) for i in range(copies))


CHECKPOINT = "checkpoint.npz"
"""The checkpoint of a run: weights, optimiser state, curves and history in one file, committed atomically."""


def _checkpoint_bytes(state: LockstepState, meta: dict[str, Any], curves: dict[str, np.ndarray]) -> bytes:
    leaves = [np.asarray(leaf) for leaf in jax.tree.leaves(jax.device_get(state))]
    meta_bytes = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    return npz_bytes({**curves, **{f"leaf_{i}": leaf for i, leaf in enumerate(leaves)}, "meta": meta_bytes})


def _load_checkpoint(folder: ResultFolder, template: LockstepState):
    """The committed checkpoint ``(state, meta, curves)``, or ``None`` to train from the first epoch.

    A checkpoint that does not match its checksum (damaged, or lost after its
    commit) is not used: the run starts again, with a warning (it is
    deterministic, so it ends with the same bytes).
    """
    data, status = folder.read(CHECKPOINT)
    if data is None:
        if status in ("missing", "corrupt"):
            warnings.warn(f"out={str(folder.path)!r}: {CHECKPOINT} is {status} (its checksum is in the manifest); "
                          f"training again from the first epoch", stacklevel=3)
        return None
    with np.load(io.BytesIO(data)) as z:
        leaves, treedef = jax.tree.flatten(template)
        saved = [z[f"leaf_{i}"] for i in range(len(leaves))]
        copies = leaves[0].shape[0] if leaves else 0
        # guard_* came with the CFL guard: a checkpoint written before it has none, and no guard.
        curves = {name: z[name] if name in z.files else np.zeros((0, copies)) for name in _CURVES}
        meta = json.loads(z["meta"].tobytes())
    for new, old in zip(saved, leaves):
        if new.shape != old.shape or new.dtype != old.dtype:
            raise ValueError(f"checkpoint in {str(folder.path)!r} does not match the model ({new.shape} vs {old.shape})")
    return jax.tree.unflatten(treedef, [jnp.asarray(a) for a in saved]), meta, curves


_CURVES = ("step_divergence", "probe_divergence", "param_trace", "test_predictions", "guard_lr", "guard_lambda")
"""Arrays of the checkpoint beside the weights: the per-step curves and the last predictions
(``guard_*``: the CFL guard's effective lr and sharpness estimate, empty without the guard)."""


def _write_metrics(folder: ResultFolder, result: TrainResult) -> None:
    lines = ["epoch,k,lr,train_loss,test_accuracy,test_loss,divergence"]
    for e in range(result.epochs_done):
        for c, k in enumerate(result.ks):
            lines.append(f"{e + 1},{k:g},{result.lr[e]:.8g},{result.train_loss[e, c]:.8g},"
                         f"{result.test_accuracy[e, c]:.6f},{result.test_loss[e, c]:.8g},{result.divergence[e, c]:.8g}")
    folder.commit("metrics.csv", ("\n".join(lines) + "\n").encode())
    folder.commit("metrics.json", json.dumps(result.to_dict(), indent=1).encode())


def load_data(config: TrainConfig):
    """The dataset of ``config``, trimmed to ``train_size`` / ``test_size``, with its normalisation."""
    x_train, y_train, x_test, y_test = datasets.load(config.dataset, config.data_root)
    x_train, y_train = x_train[: config.train_size], y_train[: config.train_size]
    x_test, y_test = x_test[: config.test_size], y_test[: config.test_size]
    if config.batch_size > len(x_train):
        raise ValueError(f"batch_size must be <= the number of training examples ({len(x_train)}), "
                         f"got {config.batch_size}")
    return x_train, y_train, x_test, y_test, datasets.info(config.dataset)


def train(
    config: TrainConfig,
    ks: Sequence[float] = (1.0,),
    *,
    seed: int = 1,
    out: str | Path | None = None,
    progress: bool | None = None,
    on_epoch: Callable[[int, TrainResult], None] | None = None,
    copies_mode: str = "auto",
    trace_params: int = 0,
) -> TrainResult:
    """Train ``len(ks)`` perturbed copies in lockstep for ``config.epochs`` epochs.

    Args:
      config: the run (:class:`TrainConfig`).
      ks: one perturbation factor per copy (all ``> 0``); the copies share the
        initialisation and every batch.
      seed: the batch order and augmentation (appendix C's "seed").
      out: a result folder (docs/reliability.md): locked for the run, with
        ``checkpoint.npz`` (weights, curves and history, committed as one unit
        after every epoch) and ``metrics.csv``/``.json``, each checksummed in its
        manifest. An existing checkpoint of the same run is resumed; a folder of a
        different run, or one in use by another process, is refused.
      progress: tqdm bar over the steps (``None``: when stderr is a terminal).
      on_epoch: called as ``on_epoch(epoch, partial_result)`` after each epoch's
        checkpoint is written.
      copies_mode: how the copies share the compiled step (:func:`resolve_copies_mode`);
        it changes speed, not results.
      trace_params: record copy 0's values of this many parameter entries after
        every step (:func:`trace_indices`; all of them if larger than the model),
        so that the trajectories of separate runs (other seeds) can be compared
        step by step (``TrainResult.param_trace``). 0: none.

    Returns:
      :class:`TrainResult`.
    """
    ks = tuple(float(k) for k in ks)
    if not ks:
        raise ValueError("ks is empty; give at least one perturbation factor")
    v.check_positive("ks", ks)
    seed = v.check_int("seed", seed, minimum=0)
    trace_params = v.check_int("trace_params", trace_params, minimum=0)
    start = time.perf_counter()
    x_train, y_train, x_test, y_test, meta = load_data(config)
    steps_per_epoch = datasets.num_batches(len(x_train), config.batch_size)
    boundaries = tuple(m * steps_per_epoch for m in config.milestone_epochs)
    graphdef, state = init_lockstep(config, ks, meta.image_shape[-1], meta.num_classes)
    mask = probe_mask(jax.tree.map(lambda a: a[0], state.params), config.probe)
    step_fns = {refresh: make_train_step(graphdef, nesterov=config.nesterov, boundaries=boundaries, probe_mask=mask,
                                         copies_mode=copies_mode, trace_params=trace_params,
                                         guard=config.guard_settings, refresh=refresh)
                for refresh in (("first", False, True) if config.guard else (False,))}
    eval_fn = make_eval_step(graphdef, copies_mode)
    hyper = OptimizerNumbers.of(config).arrays()
    ks_arr = jnp.asarray(ks, jnp.float32)
    copies = len(ks)

    history = {"test_accuracy": [], "test_loss": [], "train_loss": [], "divergence": [], "lr": []}
    traced = len(trace_indices(nets.count_params(jax.tree.map(lambda a: a[0], state.params)), trace_params))
    curves = {"step_divergence": np.zeros((0, copies)), "probe_divergence": np.zeros((0, copies)),
              "param_trace": np.zeros((0, traced if trace_params else 0), np.float32),
              "test_predictions": np.zeros((copies, 0), np.int32),
              "guard_lr": np.zeros((0, copies)), "guard_lambda": np.zeros((0, copies))}
    first_epoch = 0
    identity = {"config": config.to_dict(), "ks": list(ks), "seed": seed, "trace_params": trace_params}
    # The folder is locked from here to the end of the run: a second run on it is refused at once.
    folder = None if out is None else ResultFolder(out, kind="training run", settings=identity).open()
    try:
        if folder is not None:
            restored = _load_checkpoint(folder, state)
            if restored is not None:
                state, ckpt, curves = restored
                history = ckpt["history"]
                first_epoch = ckpt["epochs_done"]

        def result(epochs_done: int) -> TrainResult:
            arr = lambda name: np.asarray(history[name], np.float64).reshape(epochs_done, -1)
            return TrainResult(config, ks, seed, epochs_done, arr("test_accuracy"), arr("test_loss"), arr("train_loss"),
                               arr("divergence"), curves["step_divergence"], curves["probe_divergence"],
                               curves["param_trace"], curves["test_predictions"], np.asarray(history["lr"], np.float64),
                               _copy_fingerprints(state), time.perf_counter() - start, compile_seconds, state,
                               curves["guard_lr"] if config.guard else None,
                               curves["guard_lambda"] if config.guard else None)

        compile_seconds = 0.0
        bar = None
        if first_epoch < config.epochs:
            from tqdm.auto import tqdm

            bar = tqdm(total=(config.epochs - first_epoch) * steps_per_epoch, disable=progress is False if progress
                       is not None else None, desc=f"{config.model} seed {seed}", unit="step", leave=False)
        for epoch in range(first_epoch, config.epochs):
            losses, divs, probes, traces, guard_lrs, guard_lambdas = [], [], [], [], [], []
            for i, (xb, yb) in enumerate(datasets.batches(x_train, y_train, config.batch_size, seed=seed, epoch=epoch)):
                if config.augment:
                    xb = datasets.augment(xb, seed=seed, epoch=epoch, step=i, flip=config.uses_flip)
                xb = datasets.normalize(xb, meta.mean, meta.std)
                t0 = time.perf_counter()
                refresh = refresh_due(epoch * steps_per_epoch + i, config.guard_every) if config.guard else False
                state, metrics = step_fns[refresh](state, ks_arr, jnp.asarray(xb), jnp.asarray(yb), hyper)
                if epoch == first_epoch and i == 0:
                    jax.block_until_ready(state)
                    compile_seconds = time.perf_counter() - t0
                losses.append(metrics["loss"])
                divs.append(metrics["divergence"])
                probes.append(metrics["probe_divergence"])
                if trace_params:
                    traces.append(metrics["trace"])
                if config.guard:
                    guard_lrs.append(metrics["guard_lr"])
                    guard_lambdas.append(metrics["guard_lambda"])
                if bar is not None:
                    bar.update()
            losses = np.asarray(jax.device_get(losses))
            for name, new in (("step_divergence", divs), ("probe_divergence", probes), ("param_trace", traces),
                              ("guard_lr", guard_lrs), ("guard_lambda", guard_lambdas)):
                if new:
                    curves[name] = np.concatenate([curves[name], np.asarray(jax.device_get(new))], axis=0)
            accuracy, test_loss, curves["test_predictions"] = evaluate(eval_fn, state, x_test, y_test, meta,
                                                                        config.eval_batch_size)
            history["train_loss"].append(losses.mean(axis=0).tolist())
            history["test_accuracy"].append(accuracy.tolist())
            history["test_loss"].append(test_loss.tolist())
            history["divergence"].append(np.asarray(_divergence_to_first(state.params)).tolist())
            history["lr"].append(config.lr_at(epoch))
            partial = result(epoch + 1)
            if folder is not None:
                folder.commit(CHECKPOINT, _checkpoint_bytes(state, {"epochs_done": epoch + 1, "history": history}, curves))
                _write_metrics(folder, partial)
            if on_epoch is not None:
                on_epoch(epoch + 1, partial)
        if bar is not None:
            bar.close()
    finally:  # also on an interruption: a resume in the same process must find the folder free
        if folder is not None:
            folder.close()
    return result(config.epochs)


def evaluate(eval_fn: Callable, state: LockstepState, x: np.ndarray, y: np.ndarray, meta,
             batch_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Test accuracy, mean cross-entropy and predicted classes of every copy.

    Fixed-size (padded) batches: one compilation. Returns ``(accuracy (copies,),
    loss (copies,), predictions (copies, len(x)))``; NaN accuracy and loss when ``x`` is empty.
    """
    n = len(x)
    copies = jax.tree.leaves(state.params)[0].shape[0]
    if n == 0:
        return np.full(copies, np.nan), np.full(copies, np.nan), np.zeros((copies, 0), np.int32)
    size = min(batch_size, n)
    correct, loss, predictions = 0, 0, []
    for s in range(0, n, size):
        xb, yb = x[s : s + size], y[s : s + size]
        valid = len(xb)
        if valid < size:
            xb = np.concatenate([xb, np.zeros((size - valid, *xb.shape[1:]), xb.dtype)])
            yb = np.concatenate([yb, np.zeros(size - valid, yb.dtype)])
        mask = jnp.arange(size) < valid
        c, l, p = eval_fn(state, jnp.asarray(datasets.normalize(xb, meta.mean, meta.std)), jnp.asarray(yb), mask)
        correct, loss = correct + c, loss + l
        predictions.append(np.asarray(p)[:, :valid])
    return (np.asarray(correct, np.float64) / n, np.asarray(loss, np.float64) / n,
            np.concatenate(predictions, axis=1).astype(np.int32))
