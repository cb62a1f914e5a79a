"""Lockstep training of k perturbed copies of a Flax network (Section 4, appendix C).

The copies share one initialisation and the same batches, and differ only in the
perturbation factor ``k`` of :func:`jaxcfl.perturbed_sgd`: one vmapped,
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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax import Array

from jaxcfl._core import validate as v
from jaxcfl.nn import _data as datasets
from jaxcfl.nn import nets as nets
from jaxcfl.nn._guard import DEFAULTS as GUARD_DEFAULTS
from jaxcfl.nn._guard import cfl_guard
from jaxcfl.nn._lockstep import (  # noqa: F401  (the trainer's names before the engine)
    CHECKPOINT,
    COPIES_MODES,
    Copies,
    Lockstep,
    LockstepState,
    TrainResult,
    final_epochs,
    nnx_model,
    over_copies,
    per_example_cross_entropy,
    probe_mask,
    resolve_copies_mode,
    trace_indices,
)
from jaxcfl.nn._perturb import perturbed_sgd

__all__ = ["PAPER_MILESTONES", "HYPERPARAMETERS", "TrainConfig", "step_decay", "cross_entropy",
    "network_loss", "preset_engine", "engine_of", "copies_of", "preset_batches", "init_lockstep", "load_data",
    "train"]

PAPER_MILESTONES = (0.2, 0.4, 0.6, 0.8)
"""lr drops at these fractions of the epochs: epochs 40, 80, 120 and 160 of 200."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """What is trained, on what, and how. Every field is part of a run's identity.

    Attributes:
      model: one of :data:`jaxcfl.nn.nets.NETWORKS`.
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
    guard_safety: float = GUARD_DEFAULTS.safety
    guard_every: int = GUARD_DEFAULTS.every
    guard_iterations: int = GUARD_DEFAULTS.iterations
    guard_first_iterations: int = GUARD_DEFAULTS.first_iterations

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
          >>> from jaxcfl import TrainConfig
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
    """``loss(params, batch_stats, x, y)``: mean cross-entropy of a :mod:`jaxcfl.nn.nets` network,
    BatchNorm in training mode (normalised by the batch's own statistics).

    One function object per ``graphdef`` (cached), so that the compiled programs of
    :func:`jaxcfl.sharpness` and :func:`jaxcfl.max_stable_lr` are reused across calls.
    """

    def loss(params: Any, batch_stats: Any, x: Array, y: Array) -> Array:
        return cross_entropy(nets.apply(graphdef, params, batch_stats, x, train=True)[0], y)

    return loss



def _network(model: str, in_channels: int, num_classes: int, activation: str, beta: float, key: Array) -> nnx.Module:
    return nets.create(model, num_classes=num_classes, in_channels=in_channels, activation=activation, beta=beta,
                       rngs=nnx.Rngs(key))


@functools.lru_cache(maxsize=16)
def _initialiser(model: str, in_channels: int, num_classes: int, activation: str, beta: float):
    """``(graphdef, seed -> (params, batch_stats))`` of a built-in network: one compiled program
    draws every weight (eagerly, each new weight shape would compile its own random-number kernel)."""
    build = functools.partial(_network, model, in_channels, num_classes, activation, beta)
    graphdef = nets.split(nnx.eval_shape(lambda: build(jax.random.key(0))))[0]
    return graphdef, jax.jit(lambda seed: nets.split(build(jax.random.key(seed)))[1:])


HYPERPARAMETERS = ("lr", "momentum", "weight_decay", "gamma", "safety")
"""The preset optimiser's traced numbers (:meth:`TrainConfig.hyper`); ``k`` is per copy."""


@functools.lru_cache(maxsize=16)
def preset_engine(model: str, in_channels: int, num_classes: int, activation: str = "relu", beta: float = 1.0, *,
                  nesterov: bool = True, boundaries: tuple[int, ...] = (),
                  guard: tuple[int, int, int] | None = None, probe: str | None = None,
                  copies_mode: str = "auto", trace_params: int = 0) -> Lockstep:
    """The :class:`jaxcfl.Lockstep` engine of a built-in network and the paper's optimiser.

    The network is :func:`jaxcfl.nn.nets.create` ``(model, ...)`` drawn from ``jax.random.key(init_seed)``;
    the optimiser is :func:`jaxcfl.perturbed_sgd` under the :func:`step_decay` schedule (steps
    ``boundaries``), followed by :func:`jaxcfl.cfl_guard` when ``guard = (every, iterations,
    first_iterations)``. Its numbers (:data:`HYPERPARAMETERS`) and ``k`` are traced. Cached: runs
    that differ only in numbers share one engine and its compiled programs.
    """

    def optimizer(lr, momentum, weight_decay, gamma, safety, k):
        return _optimizer(lr, k, momentum, weight_decay, gamma, boundaries, nesterov, safety, guard)

    factory = functools.partial(_network, model, in_channels, num_classes, activation, beta)
    return Lockstep(nnx_model(factory, name=model), optimizer, loss=per_example_cross_entropy, probe=probe,
                    copies_mode=copies_mode, trace_params=trace_params,
                    refresh_every=guard[0] if guard is not None else None)


def engine_of(config: TrainConfig, *, steps_per_epoch: int, in_channels: int, num_classes: int,
              copies_mode: str = "auto", trace_params: int = 0) -> Lockstep:
    """The :func:`preset_engine` of ``config`` (``steps_per_epoch`` places the lr milestones)."""
    return preset_engine(config.model, in_channels, num_classes, config.activation, config.beta,
                         nesterov=config.nesterov,
                         boundaries=tuple(m * steps_per_epoch for m in config.milestone_epochs),
                         guard=config.guard_settings, probe=config.probe, copies_mode=copies_mode,
                         trace_params=trace_params)


def copies_of(config: TrainConfig, ks: Sequence[float], seed: int) -> Copies:
    """The :class:`jaxcfl.Copies` of a preset run: one copy per ``k``, the config's numbers shared."""
    hyper = dict(zip(HYPERPARAMETERS, (config.lr, config.momentum, config.weight_decay, config.gamma,
                                       config.guard_safety)))
    return Copies(k=tuple(float(k) for k in ks), hyper=hyper, init_seed=config.init_seed, data_seed=seed)


def preset_batches(config: TrainConfig, x: np.ndarray, y: np.ndarray, meta: datasets.DatasetInfo):
    """The data function ``(seed, epoch) -> batches`` of a preset run: seeded order, the
    appendix-C augmentation (crop, flips), then the dataset's normalisation."""

    def batches(seed: int, epoch: int):
        for i, (xb, yb) in enumerate(datasets.batches(x, y, config.batch_size, seed=seed, epoch=epoch)):
            if config.augment:
                xb = datasets.augment(xb, seed=seed, epoch=epoch, step=i, flip=config.uses_flip)
            yield datasets.normalize(xb, meta.mean, meta.std), yb

    return batches


def init_lockstep(config: TrainConfig, ks: Sequence[float], in_channels: int, num_classes: int):
    """The stacked initial state of ``len(ks)`` copies of ``config``'s network and optimiser.

    Returns:
      ``(graphdef, state)``: the network's :func:`jaxcfl.nn.nets.split` graph and the
      :class:`jaxcfl.LockstepState`.
    """
    graphdef = _initialiser(config.model, in_channels, num_classes, config.activation, config.beta)[0]
    engine = engine_of(config, steps_per_epoch=1, in_channels=in_channels, num_classes=num_classes)
    return graphdef, engine.init(copies_of(config, ks, 0))


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
    """Train ``len(ks)`` perturbed copies of a built-in set-up in lockstep (the preset of
    :class:`jaxcfl.Lockstep`).

    Args:
      config: the run (:class:`TrainConfig`).
      ks: one perturbation factor per copy (all ``> 0``); the copies share the
        initialisation and every batch.
      seed: the batch order and augmentation (appendix C's "seed").
      out: a result folder (docs/reliability.md): locked for the run, with
        ``checkpoint.npz`` (weights and optimiser state, committed as one unit
        after every epoch), ``history.log`` (a checksummed record per epoch) and
        ``metrics.csv``/``.json``, each checksummed. An existing checkpoint of the
        same run is resumed, after a kill at any instant; a folder of a different
        run, or one in use by another process, is refused.
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
    v.check_choice("copies_mode", copies_mode, COPIES_MODES)
    x_train, y_train, x_test, y_test, meta = load_data(config)
    steps_per_epoch = datasets.num_batches(len(x_train), config.batch_size)
    engine = engine_of(config, steps_per_epoch=steps_per_epoch, in_channels=meta.image_shape[-1],
                       num_classes=meta.num_classes, copies_mode=copies_mode, trace_params=trace_params)
    identity = {"config": config.to_dict(), "ks": list(ks), "seed": seed, "trace_params": trace_params}
    return engine.fit(preset_batches(config, x_train, y_train, meta), copies_of(config, ks, seed),
                      epochs=config.epochs, test=(datasets.normalize(x_test, meta.mean, meta.std), y_test),
                      out=out, settings=identity, progress=progress, on_epoch=on_epoch,
                      eval_batch_size=config.eval_batch_size, steps_per_epoch=steps_per_epoch, lr_at=config.lr_at,
                      config=config, description=f"{config.model} seed {seed}")
