"""The lockstep engine: copies of any training run, in one compiled step (Section 4, appendix C).

A training run is four objects and the data:

* a **model**: a Flax NNX module, a factory ``key -> nnx.Module``, or a pair of pure functions
  ``(init(key) -> params, apply(params, x) -> outputs)`` (Linen, Equinox, Haiku, plain JAX);
  :func:`as_model` turns each into a :class:`Model`. Every NNX state collection is carried:
  BatchNorm statistics, Dropout's RNG streams, custom ``nnx.Variable`` types;
* an **optimiser**: any ``optax.GradientTransformation`` (Adam, AdamW, schedules, chains),
  or a factory ``(**hyperparameters) -> GradientTransformation`` whose numbers are traced;
* a **loss** ``(outputs, labels) -> per-example losses`` (default: softmax cross-entropy of
  integer labels) and a **metric** (default: accuracy);
* **data**: arrays ``(x, y)``, which the engine deals into seeded batches, or a function
  ``(seed, epoch) -> iterable of (x, y) batches`` (a loader the user already has).

:class:`Copies` says what differs between the copies of one run: the perturbation ``k`` of
the update (the paper's ``fl(lr k) * fl(u / k)``, :func:`jaxcfl.perturb_update`
chained last), any traced hyperparameter of the optimiser (learning rate, weight decay,
momentum: one value per copy, so an ``lr x weight-decay`` grid is one run), the
initialisation seed, a one-ulp change of the initial weights, the batch order, the
augmentation and the dropout seeds. All copies run in one jit-compiled step, vmapped or
unrolled (:func:`resolve_copies_mode`); new numbers never recompile it.

``k = 2^n`` is exact, so a copy with ``k = 2^n`` is bit-identical to ``k = 1`` for every
optimiser (``perturb_update`` is the last transform; for the paper's SGD the factory places
``k`` itself, as :func:`jaxcfl.perturbed_sgd` does).

:meth:`Lockstep.fit` trains the copies for some epochs, with a result folder that is
checkpointed after every epoch and resumed bit for bit after a kill, a progress bar, the
per-step divergence of every copy from copy 0, an optional parameter trace and per-step
checksums, and every copy's test predictions and losses.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import io
import json
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax import Array

from jaxcfl._core import validate as v
from jaxcfl._core import xla_cpu
from jaxcfl._core.folder import ResultFolder
from jaxcfl._core.results import npz_bytes
from jaxcfl._core.determinism import divergence, fingerprint
from jaxcfl.nn._guard import adopt_estimate, check_guarded, guard_state, refresh_due, warn_guard_problems
from jaxcfl.nn._perturb import perturb_update, ulp_perturb
from jaxcfl._core.canonical import canonical_convs, non_canonical_convolutions

__all__ = [
    "COPIES_MODES",
    "Copies",
    "CopyState",
    "Lockstep",
    "LockstepState",
    "Model",
    "Optimizer",
    "TrainResult",
    "accuracy",
    "as_model",
    "as_optimizer",
    "final_epochs",
    "per_example_cross_entropy",
    "resolve_copies_mode",
]


# --- losses and metrics ----------------------------------------------------------------------------

def per_example_cross_entropy(outputs: Array, labels: Array) -> Array:
    """Softmax cross-entropy of integer labels, one value per example (the default loss)."""
    return optax.softmax_cross_entropy_with_integer_labels(outputs, labels)


def accuracy(outputs: Array, labels: Array) -> Array:
    """1.0 where the largest output is the label, else 0.0, one value per example (the default metric)."""
    return (jnp.argmax(outputs, -1) == labels).astype(jnp.float32)


# --- models ----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, eq=False)
class Model:
    """A model as pure functions over explicit state.

    Attributes:
      init: ``key -> (params, state)``: the trainable parameters and every other piece of
        state (BatchNorm statistics, RNG streams, ...); ``state`` may be an empty dict.
      apply: ``(params, state, x, train) -> (outputs, new_state)``; ``train`` is a Python bool.
      name: for messages and a run's identity.
      seeded: whether ``init`` depends on its key (``False`` for a ready-built module, whose
        weights are what they are: the ``init`` source needs a factory).
    """

    init: Callable[[Array], tuple[Any, Any]]
    apply: Callable[[Any, Any, Array, bool], tuple[Array, Any]]
    name: str
    seeded: bool = True


def _name_of(obj: Any) -> str:
    fn = getattr(obj, "func", obj)  # functools.partial
    module = getattr(fn, "__module__", None) or type(fn).__module__
    qual = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{module}.{qual}"


def _decoupled(state: nnx.State) -> nnx.State:
    # New Variable objects around the same immutable arrays: the module is not aliased.
    return jax.tree.map(lambda a: a, state)


def nnx_model(factory: Callable[[Array], nnx.Module], *, name: str | None = None, seeded: bool = True) -> Model:
    """A :class:`Model` of an NNX module factory ``key -> nnx.Module``.

    The parameters are the module's ``nnx.Param`` variables (and subclasses); everything
    else (``BatchStat``, ``RngKey``/``RngCount`` of Dropout's streams, custom
    ``nnx.Variable`` types) is the state, carried from step to step. ``train=True`` calls
    ``module.train()`` on a fresh copy before the forward pass (BatchNorm on the batch's
    statistics, Dropout active), ``train=False`` calls ``module.eval()``.
    """
    abstract = nnx.eval_shape(lambda: _check_module(factory(jax.random.key(0))))
    graphdef = nnx.split(abstract, nnx.Param, ...)[0]

    def init(key):
        module = _check_module(factory(key))
        _, params, state = nnx.split(module, nnx.Param, ...)
        return _decoupled(params), _decoupled(state)

    def apply(params, state, x, train):
        module = nnx.merge(graphdef, params, state, copy=True)
        module.train() if train else module.eval()
        outputs = module(x)
        return outputs, nnx.split(module, nnx.Param, ...)[2]

    return Model(init, apply, name or _name_of(factory), seeded)


def _check_module(module: Any) -> nnx.Module:
    if not isinstance(module, nnx.Module):
        raise TypeError(f"model: the factory must return an nnx.Module, got {type(module).__name__}")
    return module


def functional_model(init: Callable[[Array], Any], apply: Callable[[Any, Array], Array], *,
                     name: str | None = None) -> Model:
    """A :class:`Model` of pure functions ``init(key) -> params`` and ``apply(params, x) -> outputs``
    (no state besides the parameters)."""

    def init_fn(key):
        return init(key), {}

    def apply_fn(params, state, x, train):
        del train
        return apply(params, x), state

    return Model(init_fn, apply_fn, name or f"({_name_of(init)}, {_name_of(apply)})")


def as_model(model: Any) -> Model:
    """A :class:`Model` from any of the accepted forms.

    Args:
      model: a :class:`Model`; an ``nnx.Module`` (its weights are every copy's initial
        weights); a factory ``key -> nnx.Module``; or a pair ``(init, apply)`` of pure
        functions ``init(key) -> params``, ``apply(params, x) -> outputs``.

    Raises:
      TypeError: anything else, naming ``model``.
    """
    if isinstance(model, Model):
        return model
    if isinstance(model, nnx.Module):
        module = model
        _, params, state = nnx.split(module, nnx.Param, ...)
        params, state = _decoupled(params), _decoupled(state)
        built = nnx_model(lambda key: nnx.merge(*nnx.split(module, nnx.Param, ...), copy=True),
                          name=type(module).__qualname__, seeded=False)
        return dataclasses.replace(built, init=lambda key: (params, state))
    if isinstance(model, tuple) and len(model) == 2 and all(callable(f) for f in model):
        return functional_model(*model)
    if callable(model) and not isinstance(model, type):
        return nnx_model(model)
    if isinstance(model, type) and issubclass(model, nnx.Module):
        raise TypeError(f"model: got the class {model.__qualname__}; pass an instance, or a factory "
                        f"`lambda key: {model.__qualname__}(..., rngs=nnx.Rngs(key))`")
    raise TypeError(f"model must be an nnx.Module, a factory key -> nnx.Module, or a pair (init, apply) of "
                    f"functions, got {type(model).__name__}")


# --- optimisers ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, eq=False)
class Optimizer:
    """An optimiser whose numbers are traced: ``build(hyper)`` is the transformation for one copy.

    ``hyper`` maps each hyperparameter name (``"k"`` always among them) to a traced scalar.
    ``build`` is called inside the compiled step, so new values never recompile it.

    Attributes:
      build: ``hyper -> optax.GradientTransformationExtraArgs``.
      names: the hyperparameters ``build`` reads (besides ``k``), with their defaults.
      injected: names that live in an ``optax.inject_hyperparams`` state instead.
      name: for messages and a run's identity.
    """

    build: Callable[[Mapping[str, Array]], optax.GradientTransformationExtraArgs]
    names: Mapping[str, float] = dataclasses.field(default_factory=dict)
    injected: tuple[str, ...] = ()
    name: str = "optimizer"


def _injected_names(tx: optax.GradientTransformation) -> tuple[str, ...]:
    """The numeric hyperparameters of every ``optax.inject_hyperparams`` state inside ``tx``'s state."""
    shapes = jax.eval_shape(tx.init, {"w": jax.ShapeDtypeStruct((1,), jnp.float32)})
    names: list[str] = []
    for node in jax.tree.leaves(shapes, is_leaf=_is_injected):
        if _is_injected(node):
            names += [n for n in node.hyperparams if n not in names]
    return tuple(names)


def _is_injected(node: Any) -> bool:
    return isinstance(node, (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState))


def _set_injected(opt_state: Any, values: Mapping[str, Array]) -> Any:
    """``opt_state`` with the given ``inject_hyperparams`` values (one copy's)."""

    def fix(node):
        if not _is_injected(node):
            return node
        hp = dict(node.hyperparams)
        for name, value in values.items():
            if name in hp:
                hp[name] = jnp.asarray(value, jnp.asarray(hp[name]).dtype)
        return node._replace(hyperparams=hp)

    return jax.tree.map(fix, opt_state, is_leaf=_is_injected)


def as_optimizer(optimizer: Any) -> Optimizer:
    """An :class:`Optimizer` from an optax transformation or a factory of one.

    Args:
      optimizer: an :class:`Optimizer`; an ``optax.GradientTransformation`` (any optax
        optimiser, schedule or chain; ``perturb_update(k)`` is chained after it, and the
        numbers of ``optax.inject_hyperparams`` in it can differ between copies); or a
        factory ``(**hyperparameters) -> GradientTransformation`` called with traced values
        (a factory that takes ``k`` places the perturbation itself, e.g.
        :func:`jaxcfl.perturbed_sgd`; otherwise ``perturb_update(k)`` is chained last).

    Raises:
      TypeError: anything else, naming ``optimizer``.
    """
    if isinstance(optimizer, Optimizer):
        return optimizer
    if isinstance(optimizer, optax.GradientTransformation):
        tx = optax.with_extra_args_support(optimizer)

        def build(hyper):
            return optax.chain(tx, perturb_update(hyper["k"]))

        return Optimizer(build, {}, _injected_names(optimizer), _name_of(optimizer.update))
    if callable(optimizer) and not isinstance(optimizer, type):
        try:
            signature = inspect.signature(optimizer)
        except (TypeError, ValueError) as err:
            raise TypeError(f"optimizer: cannot read the signature of {optimizer!r:.60}: {err}") from None
        params = {n: p for n, p in signature.parameters.items()
                  if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        takes_k = "k" in params
        defaults = {n: p.default for n, p in params.items() if n != "k" and p.default is not p.empty}

        def build(hyper):
            kwargs = {n: hyper[n] for n in params if n in hyper}
            tx = optimizer(**kwargs)
            if not isinstance(tx, optax.GradientTransformation):
                raise TypeError(f"optimizer: the factory must return an optax.GradientTransformation, "
                                f"got {type(tx).__name__}")
            tx = optax.with_extra_args_support(tx)
            return tx if takes_k else optax.chain(tx, perturb_update(hyper["k"]))

        names = {n: defaults.get(n) for n in params if n != "k"}
        return Optimizer(build, names, (), _name_of(optimizer))
    raise TypeError(f"optimizer must be an optax.GradientTransformation or a factory (**hyperparameters) -> "
                    f"GradientTransformation, got {type(optimizer).__name__}")


# --- what differs between the copies ---------------------------------------------------------------

_PER_COPY_FIELDS = ("k", "init_seed", "init_ulp", "data_seed", "augment_seed", "dropout_seed")


@dataclasses.dataclass(frozen=True)
class Copies:
    """What differs between the copies of one lockstep run.

    Every field is one value shared by all copies, or a sequence with one value per copy
    (all sequences of one length: the number of copies).

    Attributes:
      k: the perturbation factor of the update (``> 0``; ``2^n`` changes no bit).
      hyper: traced optimiser hyperparameters by name (``{"learning_rate": [1e-3, 3e-3]}``):
        arguments of an optimiser factory, or numbers of an ``optax.inject_hyperparams``.
      init_seed: seed of the initialisation (``jax.random.key(init_seed)``).
      init_ulp: ``None``: the initial weights as drawn; an int: move one entry of them, chosen
        by that seed, by one ulp (:func:`jaxcfl.ulp_perturb`, Summers and Dinneen's one-bit change).
      data_seed: the batch order (and, for a data function, whatever it seeds).
      augment_seed: the in-step augmentation's key (``None``: ``data_seed``).
      dropout_seed: ``None``: the model's own RNG streams; an int: every RNG stream of the
        model's state folded with it (Dropout masks and any other stochastic layer).
    """

    k: float | Sequence[float] = 1.0
    hyper: Mapping[str, float | Sequence[float]] = dataclasses.field(default_factory=dict)
    init_seed: int | Sequence[int] = 0
    init_ulp: int | None | Sequence[int | None] = None
    data_seed: int | Sequence[int] = 1
    augment_seed: int | None | Sequence[int | None] = None
    dropout_seed: int | None | Sequence[int | None] = None

    def __post_init__(self) -> None:
        if not isinstance(self.hyper, Mapping):
            raise TypeError(f"hyper must be a mapping name -> value(s), got {type(self.hyper).__name__}")
        lengths = {len(x) for x in self._sequences().values()}
        if len(lengths) > 1:
            raise ValueError(f"every per-copy sequence of Copies must have one length, got "
                             f"{ {n: len(x) for n, x in self._sequences().items()} }")
        if 0 in lengths:
            raise ValueError("Copies: a per-copy sequence is empty; give at least one copy")
        for i in range(self.count):
            k = self.value("k", i)
            v.check_positive("k", k)
            for name in ("init_seed", "data_seed"):
                v.check_int(name, self.value(name, i), minimum=0)
            for name in ("init_ulp", "augment_seed", "dropout_seed"):
                if self.value(name, i) is not None:
                    v.check_int(name, self.value(name, i), minimum=0)
            for name in self.hyper:
                value = self.hyper_value(name, i)
                if not np.isfinite(value):
                    raise ValueError(f"hyper[{name!r}] must be finite, got {value!r}")

    def _sequences(self) -> dict[str, Sequence]:
        out = {n: getattr(self, n) for n in _PER_COPY_FIELDS if _is_sequence(getattr(self, n))}
        out.update({f"hyper[{n!r}]": x for n, x in self.hyper.items() if _is_sequence(x)})
        return out

    @property
    def count(self) -> int:
        """The number of copies."""
        lengths = [len(x) for x in self._sequences().values()]
        return lengths[0] if lengths else 1

    def value(self, name: str, i: int) -> Any:
        """Copy ``i``'s value of field ``name``."""
        x = getattr(self, name)
        return x[i] if _is_sequence(x) else x

    def hyper_value(self, name: str, i: int) -> float:
        x = self.hyper[name]
        return float(x[i] if _is_sequence(x) else x)

    def varies(self, name: str) -> bool:
        """Whether copies differ in field ``name`` (``"hyper[...]"`` names too)."""
        if name.startswith("hyper["):
            x = self.hyper[name[7:-2]]
        else:
            x = getattr(self, name)
        return _is_sequence(x) and len({_hashable(e) for e in x}) > 1

    def ks(self) -> tuple[float, ...]:
        return tuple(float(self.value("k", i)) for i in range(self.count))

    def augment_seed_of(self, i: int) -> int:
        a = self.value("augment_seed", i)
        return self.value("data_seed", i) if a is None else a

    def to_dict(self) -> dict[str, Any]:
        out = {n: _plain(getattr(self, n)) for n in _PER_COPY_FIELDS}
        out["hyper"] = {n: _plain(x) for n, x in self.hyper.items()}
        return out


def _is_sequence(x: Any) -> bool:
    return isinstance(x, (list, tuple, np.ndarray)) or (isinstance(x, jax.Array) and x.ndim > 0)


def _hashable(x: Any) -> Any:
    return None if x is None else float(x)


def _plain(x: Any) -> Any:
    if _is_sequence(x):
        return [None if e is None else (int(e) if float(e).is_integer() and not isinstance(e, float) else float(e))
                for e in x]
    return x if x is None or isinstance(x, (int, float)) else float(x)


# --- state -----------------------------------------------------------------------------------------

@jax.tree_util.register_dataclass
@dataclasses.dataclass
class CopyState:
    """One copy: its parameters, its model state (BatchNorm statistics, RNG streams) and
    its optimiser state."""

    params: Any
    model_state: Any
    opt_state: Any


@jax.jit
def _take_copy(tree: Any, i: Array) -> Any:
    """Copy ``i`` of every leaf: one compiled program per state structure (op by op, every leaf
    shape compiled its own slice). A copy of the bits, nothing computed."""
    return jax.tree.map(lambda a: a[i], tree)


@jax.jit
def _stack_copies(trees: tuple) -> Any:
    """Equally structured trees stacked along a new axis 0, as one compiled program."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LockstepState:
    """The copies of a lockstep run, stacked along axis 0 of every leaf.

    Use :attr:`copies` and :meth:`copy` instead of indexing the leaves by hand.
    """

    params: Any
    model_state: Any
    opt_state: Any

    @property
    def copies(self) -> int:
        """The number of copies."""
        leaves = jax.tree.leaves((self.params, self.model_state, self.opt_state))
        return int(leaves[0].shape[0]) if leaves else 0

    def copy(self, i: int) -> CopyState:
        """Copy ``i`` (a :class:`CopyState` of unstacked pytrees)."""
        n = self.copies
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not -n <= i < n:
            raise IndexError(f"copy index must be an int in [-{n}, {n}), got {i!r}")
        return CopyState(*_take_copy((self.params, self.model_state, self.opt_state), i % n))

    @property
    def batch_stats(self) -> Any:
        """The model state (an older name: the built-in networks' state is their BatchNorm statistics)."""
        return self.model_state

    @classmethod
    def stack(cls, copies: Sequence[CopyState]) -> LockstepState:
        """Stack equally structured copies along a new axis 0."""
        if not copies:
            raise ValueError("copies is empty; give at least one CopyState")
        return cls(*_stack_copies(tuple((c.params, c.model_state, c.opt_state) for c in copies)))


# --- running the copies together -------------------------------------------------------------------

COPIES_MODES = ("auto", "vmap", "unroll")


def resolve_copies_mode(mode: str, params: Any = None) -> str:
    """``"auto"``: ``"vmap"`` on GPU/TPU; on CPU ``"unroll"`` for a model with convolutions
    (a parameter of 4 or more dimensions, or ``params`` not given), ``"vmap"`` otherwise.

    Both run the copies in ONE jit-compiled step. ``vmap`` batches them; for a
    convolutional network with different weights per copy, XLA turns each
    convolution into a grouped convolution, which cuDNN runs well and XLA's CPU
    backend runs several times slower than the separate convolutions
    (``benchmarks/train_step.py`` measures it). ``unroll`` traces the copies one
    after the other inside the same compiled step: ordinary convolutions, k
    times the compile time.
    """
    v.check_choice("copies_mode", mode, COPIES_MODES)
    if mode == "auto":
        if jax.default_backend() != "cpu":
            return "vmap"
        convolutional = params is None or any(np.ndim(leaf) >= 4 for leaf in jax.tree.leaves(params))
        return "unroll" if convolutional else "vmap"  # benchmarks/lockstep.py: MLPs gain under vmap on CPU
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


def probe_mask(params: Any, probe: str | None) -> tuple[bool, ...]:
    """Which leaves of ``params`` the probe selects: the leaves whose path contains ``probe``
    (``None``: the first 4-D leaf, i.e. the first convolution kernel, else the first leaf of
    two or more dimensions, else the first leaf)."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    paths = [jax.tree_util.keystr(path) for path, _ in flat]
    if probe is None:
        for rank in (4, 2):
            hits = [i for i, (_, leaf) in enumerate(flat) if np.ndim(leaf) >= rank][:1]
            if hits and (rank == 2 or np.ndim(flat[hits[0]][1]) == 4):
                break
        else:
            hits = [0] if flat else []
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


def _flat(tree: Any) -> Array:
    return jnp.concatenate([leaf.reshape(-1) for leaf in jax.tree.leaves(tree)])


def _checksum(leaf: Array) -> Array:
    """A 32-bit sum of the bit patterns of ``leaf`` (wrapping): equal leaves, equal sums."""
    bits = jax.lax.bitcast_convert_type(leaf.astype(jnp.float32) if leaf.dtype.itemsize < 4 else leaf,
                                        jnp.uint32 if leaf.dtype.itemsize == 4 else jnp.uint64)
    return jnp.sum(bits.reshape(-1).astype(jnp.uint32), dtype=jnp.uint32) + jnp.uint32(leaf.size)


def final_epochs(epochs: int) -> int:
    """How many final epochs a run's final metric averages: 5% of them, at least 1.

    The paper averages the last 10 of 200 epochs (appendix C); a short run keeps the
    proportion, so that the average stays inside the last, lowest learning rate.
    """
    return max(1, round(v.check_int("epochs", epochs) / 20))


@dataclasses.dataclass
class TrainResult:
    """History of a lockstep run. Arrays have one column per copy.

    ``test_accuracy`` holds the metric (accuracy by default); ``config`` is the preset's
    :class:`jaxcfl.TrainConfig` for the built-in experiments, ``None`` otherwise
    (``settings`` then says what ran).
    """

    config: Any
    ks: tuple[float, ...]
    seed: int
    epochs_done: int
    test_accuracy: np.ndarray  # (epochs, copies): the metric on the test set
    test_loss: np.ndarray  # (epochs, copies): mean loss on the test set
    train_loss: np.ndarray  # (epochs, copies)
    divergence: np.ndarray  # (epochs, copies): all parameters, end of epoch
    step_divergence: np.ndarray  # (steps, copies): all parameters, after every step
    probe_divergence: np.ndarray  # (steps, copies): the probed layer, after every step
    param_trace: np.ndarray  # (steps, traced): copy 0's traced parameters after every step (empty: none)
    test_predictions: np.ndarray  # (copies, test examples): predicted classes after the last epoch
    lr: np.ndarray  # (epochs,) lr in force during each epoch (empty when unknown)
    fingerprints: tuple[str, ...]  # final parameters and model state of each copy
    seconds: float
    compile_seconds: float
    state: LockstepState | None = dataclasses.field(default=None, repr=False)  # the final copies (not serialised)
    guard_lr: np.ndarray | None = None  # (steps, copies): the CFL guard's effective lr at every step (guard only)
    guard_lambda: np.ndarray | None = None  # (steps, copies): its sharpness estimate at every step (guard only)
    epochs: int | None = None  # the configured epochs (``None``: those of ``config``)
    settings: dict[str, Any] | None = None  # what ran (the folder's identity)
    test_outputs: np.ndarray | None = None  # (copies, test examples, ...): the final outputs (keep_outputs only)
    checksums: np.ndarray | None = None  # (steps, copies, leaves) uint32 (checksums only)
    leaf_paths: tuple[str, ...] = ()  # the parameter paths of the checksums' last axis

    @property
    def configured_epochs(self) -> int:
        return self.epochs if self.epochs is not None else self.config.epochs

    def final_accuracy(self, last: int | None = None) -> np.ndarray:
        """Mean test metric over the last ``min(last, epochs)`` epochs, per copy (appendix C).

        ``last=None``: :func:`final_epochs` of the configured epochs (the paper's 10 of 200).
        """
        return self._final(self.test_accuracy, last)

    final_metric = final_accuracy

    def final_loss(self, last: int | None = None) -> np.ndarray:
        """Mean test loss over the same epochs as :meth:`final_accuracy`, per copy."""
        return self._final(self.test_loss, last)

    def _final(self, history: np.ndarray, last: int | None) -> np.ndarray:
        last = final_epochs(self.configured_epochs) if last is None else v.check_int("last", last)
        return history[-min(last, self.epochs_done):].mean(axis=0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict() if self.config is not None else self.settings,
            "ks": list(self.ks), "seed": self.seed, "epochs_done": self.epochs_done,
            "test_accuracy": self.test_accuracy.tolist(), "test_loss": self.test_loss.tolist(),
            "train_loss": self.train_loss.tolist(),
            "divergence": self.divergence.tolist(), "lr": self.lr.tolist(),
            "final_accuracy": self.final_accuracy().tolist(), "final_loss": self.final_loss().tolist(),
            "fingerprints": list(self.fingerprints),
            "seconds": self.seconds, "compile_seconds": self.compile_seconds,
        }


CHECKPOINT = "checkpoint.npz"
"""The checkpoint of a run: weights, optimiser and RNG state, the last predictions, and how much of
:data:`HISTORY` it vouches for, in one file committed atomically after every epoch (its size does not
grow with the epochs)."""

HISTORY = "history.log"
"""The run's history, one checksummed record per epoch appended to a journal
(:meth:`jaxcfl._core.folder.ResultFolder.append`): the epoch's losses, accuracies and divergences and its
per-step curves. ``metrics.csv`` and ``metrics.json`` are views of it: the CSV gains the epoch's rows after
every epoch, and both are committed whole when the run ends."""

METRICS_CSV, METRICS_JSON = "metrics.csv", "metrics.json"

_STEP_CURVES = ("step_divergence", "probe_divergence", "param_trace", "guard_lr", "guard_lambda", "checksums")
"""Curves with a row per step, appended to :data:`HISTORY` epoch by epoch (``guard_*``: the CFL guard's
effective lr and sharpness estimate, empty without the guard)."""

_LAST_CURVES = ("test_predictions", "test_outputs")
"""Arrays of the last epoch only, kept in the checkpoint."""

_CURVES = _STEP_CURVES + _LAST_CURVES

_HISTORY_ROWS = ("train_loss", "test_accuracy", "test_loss", "divergence", "lr")
"""The per-epoch history: a list of per-copy values per epoch (``lr``: one value per epoch, or none)."""


def _to_host(leaf: Any) -> np.ndarray:
    if isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        leaf = jax.random.key_data(leaf)
    return np.asarray(jax.device_get(leaf))


def _from_host(saved: np.ndarray, like: Any) -> Array:
    if isinstance(like, jax.Array) and jnp.issubdtype(like.dtype, jax.dtypes.prng_key):
        return jax.random.wrap_key_data(jnp.asarray(saved), impl=jax.random.key_impl(like))
    return jnp.asarray(saved)


def _checkpoint_bytes(state: LockstepState, meta: dict[str, Any], last: dict[str, np.ndarray]) -> bytes:
    leaves = [_to_host(leaf) for leaf in jax.tree.leaves(state)]
    meta_bytes = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    return npz_bytes({**last, **{f"leaf_{i}": leaf for i, leaf in enumerate(leaves)}, "meta": meta_bytes})


def _record_bytes(epochs: tuple[int, int], history: Mapping[str, list], steps: Mapping[str, np.ndarray]) -> bytes:
    """One :data:`HISTORY` record: epochs ``[first, stop)``, their history rows and their per-step curves."""
    first, stop = epochs
    arrays = {f"history_{name}": np.asarray(history[name][first:stop] if name != "lr" else
                                            history[name][first:min(stop, len(history[name]))], np.float64)
              for name in _HISTORY_ROWS}
    arrays.update({f"curve_{name}": np.asarray(value) for name, value in steps.items()})
    return npz_bytes({**arrays, "epochs": np.asarray([first, stop], np.int64)})


def _replay(records: Sequence[bytes], empty: Mapping[str, np.ndarray]):
    """``(history, step curves, epochs)`` from :data:`HISTORY` records, or ``None`` when they do not follow
    one another from epoch 0."""
    history: dict[str, list] = {name: [] for name in _HISTORY_ROWS}
    parts: dict[str, list[np.ndarray]] = {name: [empty[name]] for name in _STEP_CURVES}
    done = 0
    for data in records:
        with np.load(io.BytesIO(data)) as z:
            first, stop = (int(e) for e in z["epochs"])
            if first != done or stop <= first:
                return None
            for name in _HISTORY_ROWS:
                history[name].extend(z[f"history_{name}"].tolist())
            for name in _STEP_CURVES:
                if f"curve_{name}" in z.files:
                    parts[name].append(z[f"curve_{name}"])
        done = stop
    return history, {name: np.concatenate(arrays, axis=0) for name, arrays in parts.items()}, done


# Leaves that later versions added to a state, with the value a run written before them resumes with:
# the CFL guard's fail-closed counters (zero: nothing was refused before they existed).
_ADDED_LEAVES = (".failed_estimates", ".refused_steps", ".bad_lr")


def _saved_leaves(z, template: LockstepState, count: int) -> list[np.ndarray]:
    """The checkpoint's leaves in ``template``'s order. A checkpoint written before a leaf of
    :data:`_ADDED_LEAVES` existed has fewer; those take the template's (initial) value."""
    saved = sum(1 for name in z.files if name.startswith("leaf_"))
    if saved == count:
        return [z[f"leaf_{i}"] for i in range(count)]
    paths = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(template)[0]]
    added = [any(path.endswith(name) for name in _ADDED_LEAVES) for path in paths]
    if saved != count - sum(added):
        return [z[f"leaf_{i}"] if f"leaf_{i}" in z.files else np.zeros(0) for i in range(count)]  # refused below
    it = iter(range(saved))
    template_leaves = jax.tree.leaves(template)
    return [_to_host(leaf) if is_added else z[f"leaf_{next(it)}"] for leaf, is_added in zip(template_leaves, added)]


def _load_checkpoint(folder: ResultFolder, template: LockstepState, empty: dict[str, np.ndarray]):
    """The committed run ``(state, epochs_done, curves, history, journal)``, or ``None`` to train from the first epoch.

    ``journal`` is ``(bytes, records)`` of :data:`HISTORY` that the checkpoint vouches for, or ``None`` for a
    checkpoint written before the journal (it holds the whole history itself). A checkpoint or history that
    does not match its checksum (damaged since its commit) is not used: the run starts again, with a warning
    (it is deterministic, so it ends with the same bytes).
    """
    data, status = folder.read(CHECKPOINT)
    if data is None:
        if status in ("missing", "corrupt"):
            warnings.warn(f"out={str(folder.path)!r}: {CHECKPOINT} is {status} (its checksum is in the manifest); "
                          f"training again from the first epoch", stacklevel=4)
        return None
    with np.load(io.BytesIO(data)) as z:
        leaves, treedef = jax.tree.flatten(template)
        saved = _saved_leaves(z, template, len(leaves))
        # guard_* came with the CFL guard: a checkpoint written before it has none, and no guard.
        curves = {name: z[name] if name in z.files else empty[name] for name in _CURVES}
        meta = json.loads(z["meta"].tobytes())
    for new, old in zip(saved, leaves):
        old_host = _to_host(old)
        if new.shape != old_host.shape or new.dtype != old_host.dtype:
            raise ValueError(f"checkpoint in {str(folder.path)!r} does not match the model "
                             f"({new.shape} vs {old_host.shape})")
    state = jax.tree.unflatten(treedef, [_from_host(a, old) for a, old in zip(saved, leaves)])
    done, journal = int(meta["epochs_done"]), meta.get("journal")
    if journal is None:  # the format before the journal: the history and every curve in the checkpoint
        history = {name: list(meta["history"].get(name, [])) for name in _HISTORY_ROWS}
        return state, done, curves, history, None
    records, status = folder.records(HISTORY, int(journal["bytes"]))
    replayed = None if records is None or len(records) != journal["records"] else _replay(records, empty)
    if replayed is None or replayed[2] != done:
        warnings.warn(f"out={str(folder.path)!r}: {HISTORY} is {status if records is None else 'inconsistent'} "
                      f"(the checkpoint vouches for {journal['bytes']} bytes in {journal['records']} records); "
                      f"training again from the first epoch", stacklevel=4)
        return None
    history, steps, _ = replayed
    curves.update(steps)
    return state, done, curves, history, (int(journal["bytes"]), int(journal["records"]))


def _metrics_csv(history: Mapping[str, list], ks: Sequence[float], first: int, stop: int) -> bytes:
    """The rows of ``metrics.csv`` for epochs ``[first, stop)`` (with the header when ``first == 0``)."""
    lines = ["epoch,k,lr,train_loss,test_accuracy,test_loss,divergence"] if first == 0 else []
    for e in range(first, stop):
        lr = f"{history['lr'][e]:.8g}" if e < len(history["lr"]) else ""
        for c, k in enumerate(ks):
            lines.append(f"{e + 1},{k:g},{lr},{history['train_loss'][e][c]:.8g},{history['test_accuracy'][e][c]:.6f},"
                         f"{history['test_loss'][e][c]:.8g},{history['divergence'][e][c]:.8g}")
    return "".join(line + "\n" for line in lines).encode()


def _copy_fingerprints(state: LockstepState) -> tuple[str, ...]:
    host = jax.device_get((state.params, state.model_state))
    copies = state.copies
    return tuple(fingerprint(jax.tree.map(lambda a, i=i: a[i], host)) for i in range(copies))


Data = tuple[Any, Any] | Callable[[int, int], Iterable[tuple[Any, Any]]]


def _array_batches(x: Any, y: Any, batch_size: int) -> Callable[[int, int], Iterable[tuple[np.ndarray, np.ndarray]]]:
    from jaxcfl.nn import _data as datasets
    def batches(seed: int, epoch: int):
        return datasets.batches(x, y, batch_size, seed=seed, epoch=epoch)

    return batches


def _check_arrays(name: str, pair: Any, *, allow_empty: bool = False) -> tuple[np.ndarray, np.ndarray]:
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
        raise TypeError(f"{name} must be a pair (x, y) of arrays, got {type(pair).__name__}")
    x, y = (np.asarray(a) if not isinstance(a, jax.Array) else a for a in pair)
    if x.ndim < 1 or y.ndim < 1 or len(x) != len(y):
        raise ValueError(f"{name}: x and y must have one leading example axis of one length, got shapes "
                         f"{tuple(np.shape(x))} and {tuple(np.shape(y))}")
    if len(x) == 0 and not allow_empty:
        raise ValueError(f"{name} holds no examples")
    return x, y


class StepFunction:
    """One compiled lockstep step, ``(state, x, y, step=0) -> (state, metrics)``
    (:meth:`Lockstep.step_function`). At a step where the CFL guard refreshes its estimate
    (``Lockstep.refresh_every``), the estimate runs first as a program of its own and the step
    after it. ``compile(state, x, y, step)`` compiles ahead of time the programs that ``step``
    runs and returns a step of the same signature; its ``as_text()`` is their optimised HLO
    (the step's, then the estimate's)."""

    def __init__(self, program: Callable[..., tuple[Callable, tuple]],
                 estimate: Callable[..., tuple[Callable, tuple] | None] | None = None,
                 compiled: tuple[Any, Any] = (None, None)):
        self._program = program
        self._estimate = estimate
        self._compiled = compiled

    def _refreshed(self, state: LockstepState, x: Any, y: Any, step: int) -> LockstepState:
        """``state`` with the guard's estimate refreshed when ``step`` is due for one."""
        got = None if self._estimate is None else self._estimate(state, x, y, step)
        if got is None:
            return state
        fn, args = got
        return (self._compiled[1] or fn)(*args)

    def __call__(self, state: LockstepState, x: Any, y: Any, step: int = 0) -> tuple[LockstepState, dict]:
        state = self._refreshed(state, x, y, step)
        fn, args = self._program(state, x, y, step)
        return (self._compiled[0] or fn)(*args)

    def compile(self, state: LockstepState, x: Any, y: Any, step: int = 0) -> StepFunction:
        got = None if self._estimate is None else self._estimate(state, x, y, step)
        estimate = None if got is None else got[0].lower(*got[1]).compile()
        fn, args = self._program(state, x, y, step)  # the estimate keeps the state's shapes
        return StepFunction(self._program, self._estimate, (fn.lower(*args).compile(), estimate))

    def as_text(self) -> str:
        if self._compiled[0] is None:
            raise ValueError("as_text: compile the step first (step.compile(state, x, y))")
        return "\n\n".join(c.as_text() for c in self._compiled if c is not None)


@dataclasses.dataclass(frozen=True, eq=False)
class Lockstep:
    """The lockstep engine for one training set-up: model, optimiser, loss and metric.

    Build it once and call :meth:`fit` with the data and the :class:`Copies`; its compiled
    programs are kept, so runs that differ only in numbers (k, hyperparameters, seeds, data
    of the same shapes) reuse them.

    Args (fields):
      model: anything :func:`as_model` accepts.
      optimizer: anything :func:`as_optimizer` accepts.
      loss: ``(outputs, labels) -> per-example losses`` (or their mean); training minimises
        their mean. Default: :func:`per_example_cross_entropy`.
      metric: ``(outputs, labels) -> per-example values`` (or their mean). Default: :func:`accuracy`.
      predict: ``outputs -> predicted classes`` for churn (``None``: none recorded). Default argmax.
      augment: ``(x, key) -> x``, a JAX augmentation run inside the step with each copy's
        augmentation key (``Copies.augment_seed``, folded with the step); ``None``: none.
      copies_mode: ``"auto"``, ``"vmap"`` or ``"unroll"`` (:func:`resolve_copies_mode`).
      probe: substring of the parameter path whose divergence is logged every step.
      trace_params: record copy 0's values of this many parameter entries after every step.
      checksums: record a 32-bit checksum of every parameter leaf of every copy after every step
        (to find the first step and parameter at which two runs differ).
      keep_outputs: keep every copy's final test outputs (``TrainResult.test_outputs``).
      refresh_every: with :func:`jaxcfl.cfl_guard` in the optimiser, its ``every``: the host
        chooses when the guard refreshes its estimate, and runs the estimate as a compiled
        program of its own before the step (the step itself holds no Lanczos and no branch);
        ``None``: the guard's own in-program schedule.
      steps_per_call: :meth:`fit` runs up to this many consecutive steps of an epoch in one
        compiled loop (``lax.fori_loop`` over a stacked chunk of batches), which saves the
        per-call dispatch and lets XLA reuse buffers; ``1``: one call per step. The steps and
        their bits are the same either way (``tests/test_lockstep_chunks.py``); a chunk never
        crosses an epoch, and a guard refresh chosen by the host (``refresh_every``) starts a
        chunk, its estimate run just before it. Inside a loop XLA's CPU backend runs only
        canonical convolutions fast, so the looped step's are rewritten into that form
        (:func:`jaxcfl._core.canonical.canonical_convs`; same bits): a model built on
        ``lax.conv_general_dilated`` chunks too. One whose own loops or branches hold
        convolutions runs one call per step on a CPU, with a warning.
    """

    model: Any
    optimizer: Any
    loss: Callable[[Array, Array], Array] = per_example_cross_entropy
    metric: Callable[[Array, Array], Array] = accuracy
    predict: Callable[[Array], Array] | None = functools.partial(jnp.argmax, axis=-1)
    augment: Callable[[Array, Array], Array] | None = None
    copies_mode: str = "auto"
    probe: str | None = None
    trace_params: int = 0
    checksums: bool = False
    keep_outputs: bool = False
    refresh_every: int | None = None
    steps_per_call: int = 8

    def __post_init__(self) -> None:
        object.__setattr__(self, "model", as_model(self.model))
        object.__setattr__(self, "optimizer", as_optimizer(self.optimizer))
        for name in ("loss", "metric"):
            if not callable(getattr(self, name)):
                raise TypeError(f"{name} must be a function (outputs, labels) -> values, "
                                f"got {type(getattr(self, name)).__name__}")
        for name in ("predict", "augment"):
            if getattr(self, name) is not None and not callable(getattr(self, name)):
                raise TypeError(f"{name} must be a function or None, got {type(getattr(self, name)).__name__}")
        v.check_choice("copies_mode", self.copies_mode, COPIES_MODES)
        object.__setattr__(self, "trace_params", v.check_int("trace_params", self.trace_params, minimum=0))
        if self.refresh_every is not None:
            v.check_int("refresh_every", self.refresh_every)
        object.__setattr__(self, "steps_per_call", v.check_int("steps_per_call", self.steps_per_call))
        object.__setattr__(self, "_cache", {})

    # -- building the state --

    def _hyper_names(self, copies: Copies) -> None:
        opt: Optimizer = self.optimizer
        known = set(opt.names) | set(opt.injected)
        unknown = [n for n in copies.hyper if n not in known]
        if unknown:
            raise ValueError(f"Copies.hyper names {unknown} that the optimiser does not take; it takes "
                             f"{sorted(known) or 'none'} (a factory's arguments, or numbers of "
                             f"optax.inject_hyperparams)")
        missing = [n for n, d in opt.names.items() if d is None and n not in copies.hyper]
        if missing:
            raise ValueError(f"the optimiser factory needs hyperparameters {missing}: give them in Copies.hyper")

    def _hyper_arrays(self, copies: Copies) -> tuple[dict[str, Array], dict[str, Array]]:
        """``(per_copy, shared)``: the traced numbers; per-copy ones have a leading copy axis."""
        opt: Optimizer = self.optimizer
        per_copy = {"k": jnp.asarray(copies.ks(), jnp.float32)}
        shared = {}
        for name in opt.names:
            if name in copies.hyper:
                x = copies.hyper[name]
                if _is_sequence(x):
                    per_copy[name] = jnp.asarray(np.asarray(x, np.float64), jnp.float32)
                else:
                    shared[name] = jnp.asarray(x, jnp.float32)
            elif opt.names[name] is not None and isinstance(opt.names[name], (int, float)) \
                    and not isinstance(opt.names[name], bool):
                shared[name] = jnp.asarray(opt.names[name], jnp.float32)
        return per_copy, shared

    def _init_fn(self):
        if "init" not in self._cache:
            model: Model = self.model

            def init(seed, ulp_seed, dropout_seed, perturb: bool, reseed: bool):
                params, state = model.init(jax.random.key(seed))
                if perturb:
                    params = ulp_perturb(params, jax.random.key(ulp_seed), count=1)
                if reseed:
                    state = jax.tree.map(
                        lambda a: jax.random.fold_in(a, dropout_seed)
                        if jnp.issubdtype(a.dtype, jax.dtypes.prng_key) else a, state)
                return params, state

            self._cache["init"] = jax.jit(init, static_argnames=("perturb", "reseed"))
        return self._cache["init"]

    def init(self, copies: Copies) -> LockstepState:
        """The stacked initial state of ``copies`` (every copy's model and optimiser state)."""
        if not isinstance(copies, Copies):
            raise TypeError(f"copies must be a jaxcfl.Copies, got {type(copies).__name__}")
        self._hyper_names(copies)
        model: Model = self.model
        if copies.varies("init_seed") and not model.seeded:
            raise ValueError("Copies.init_seed varies, but the model is a ready-built module whose weights do not "
                             "depend on a seed: pass a factory key -> nnx.Module instead")
        init = self._init_fn()
        per_copy, shared = self._hyper_arrays(copies)
        built: dict[tuple, tuple[Any, Any]] = {}
        out = []
        for i in range(copies.count):
            ulp, drop = copies.value("init_ulp", i), copies.value("dropout_seed", i)
            key = (copies.value("init_seed", i), ulp, drop)
            if key not in built:
                params, state = init(np.uint32(key[0]), np.uint32(ulp or 0), np.uint32(drop or 0),
                                     perturb=ulp is not None, reseed=drop is not None)
                if drop is not None and not any(jnp.issubdtype(a.dtype, jax.dtypes.prng_key)
                                                for a in jax.tree.leaves(state)):
                    raise ValueError("Copies.dropout_seed is set, but the model has no RNG stream in its state "
                                     "(no nnx.Dropout or other stochastic layer with rngs)")
                built[key] = params, state
            params, state = built[key]
            hyper = {**shared, **{n: a[i] for n, a in per_copy.items()}}
            opt_state = self.optimizer.build(hyper).init(params)
            if i == 0:
                check_guarded(opt_state)
            opt_state = _set_injected(opt_state, {n: copies.hyper_value(n, i) for n in self.optimizer.injected
                                                  if n in copies.hyper})
            out.append(CopyState(params, state, opt_state))
        return LockstepState.stack(out)

    # -- the compiled step --

    def _objective_of(self) -> Callable[..., Callable[[Any], tuple[Array, Any]]]:
        """``(mstate, x, y, aug_key) -> objective``, ``objective(params) -> (mean loss, model state)``:
        one copy's training objective on its (augmented) batch, shared by the step and the estimate."""
        model: Model = self.model
        loss_fn, augment = self.loss, self.augment

        def objective_of(mstate, x, y, aug_key):
            if augment is not None:
                x = augment(x, aug_key)

            def objective(p):
                outputs, new_state = model.apply(p, mstate, x, True)
                return jnp.mean(loss_fn(outputs, y)), new_state

            return objective

        return objective_of

    def _over_copies(self, one: Callable, per_copy_data: bool) -> Callable:
        """``one(params, mstate, opt_state, hp_copy, x, y, aug_key, hp_shared)`` over the copies."""
        data_axis = 0 if per_copy_data else None
        aug_axis = 0 if self.augment is not None else None
        return over_copies(one, (0, 0, 0, 0, data_axis, data_axis, aug_axis, None), self._mode())

    def _step_fn(self, *, per_copy_data: bool, per_copy_names: tuple[str, ...], shared_names: tuple[str, ...],
                 mask: tuple[bool, ...] | None, guarded: bool, refresh: bool | str):
        """``(step, steps)``: the compiled step and the compiled loop of steps. With host-chosen guard
        refreshes (``refresh_every``) the engine compiles ``refresh=False`` only, and runs the guard's
        estimate as a program of its own (:meth:`_estimate_fn`); ``refresh=True`` builds the step with
        the estimate inside (``benchmarks/guard_compile.py`` measures the guard before 2026-12-08 so)."""
        key = ("step", per_copy_data, per_copy_names, shared_names, mask, guarded, refresh)
        if key in self._cache:
            return self._cache[key]
        optimizer: Optimizer = self.optimizer
        objective_of = self._objective_of()
        trace_params, checksums = self.trace_params, self.checksums

        def one(params, mstate, opt_state, hp_copy, x, y, aug_key, hp_shared):
            objective = objective_of(mstate, x, y, aug_key)
            (loss, new_state), grads = jax.value_and_grad(objective, has_aux=True)(params)
            tx = optimizer.build({**hp_shared, **hp_copy})
            extra = {"value": loss, "grad": grads, "value_fn": lambda p: objective(p)[0]}
            if guarded and self.refresh_every is not None:
                extra["refresh"] = refresh
            updates, opt_state = tx.update(grads, opt_state, params, **extra)
            return optax.apply_updates(params, updates), new_state, opt_state, loss

        batched = self._over_copies(one, per_copy_data)

        def step(state: LockstepState, hp_copy, hp_shared, x, y, aug_keys):
            params, mstate, opt_state, loss = batched(state.params, state.model_state, state.opt_state, hp_copy,
                                                      x, y, aug_keys, hp_shared)
            metrics = {"loss": loss, "divergence": _divergence_to_first(params)}
            if guarded:
                gs = guard_state(opt_state)
                metrics["guard_lr"], metrics["guard_lambda"] = gs.lr, gs.lambda_max
            if mask is not None:
                metrics["probe_divergence"] = _divergence_to_first(params, mask)
            if trace_params:
                first = _flat(jax.tree.map(lambda a: a[0], params))
                metrics["trace"] = first[trace_indices(first.size, trace_params)]
            if checksums:
                metrics["checksums"] = jnp.stack([jax.vmap(_checksum)(leaf) for leaf in jax.tree.leaves(params)],
                                                 axis=-1)
            return LockstepState(params, mstate, opt_state), metrics

        def steps(state: LockstepState, hp_copy, hp_shared, xs, ys, aug_keys, count):
            """``count`` (traced, <= the chunk length) steps over the stacked chunk ``xs, ys``;
            the metrics of step ``i`` in row ``i`` (rows from ``count`` on are zeros)."""
            take = lambda a, i: jax.lax.dynamic_index_in_dim(a, i, keepdims=False)
            keys_at = (lambda i: None) if aug_keys is None else (lambda i: take(aug_keys, i))
            shapes = jax.eval_shape(step, state, hp_copy, hp_shared, xs[0], ys[0], keys_at(0))[1]
            rows = jax.tree.map(lambda s: jnp.zeros((xs.shape[0],) + s.shape, s.dtype), shapes)

            # Its convolutions canonical (_core/canonical.py): in a loop body XLA's CPU backend runs
            # others, as lax.conv_general_dilated's gradients are, as naive loop nests.
            looped = canonical_convs(step)

            def body(i, carry):
                st, rows = carry
                st, metrics = looped(st, hp_copy, hp_shared, take(xs, i), take(ys, i), keys_at(i))
                return st, jax.tree.map(lambda r, m: jax.lax.dynamic_update_index_in_dim(r, m, i, 0), rows, metrics)

            return jax.lax.fori_loop(0, count, body, (state, rows))

        self._cache[key] = xla_cpu.jit(step), xla_cpu.jit(steps)
        return self._cache[key]

    def _estimate_fn(self, *, per_copy_data: bool, per_copy_names: tuple[str, ...], shared_names: tuple[str, ...]):
        """The compiled refresh of the CFL guard's estimate, ``(state, hp_copy, hp_shared, x, y,
        aug_keys) -> state``: every copy's optimiser runs a refresh (``update(..., refresh=True)``) on
        the batch of the coming step, and only the guard's estimate is kept
        (:func:`jaxcfl.nn._guard.adopt_estimate`; XLA drops the rest of the update). The step then
        runs with ``refresh=False``, so a guarded run compiles the plain step and this program,
        which holds the Lanczos loop and nothing of the step (its compile time is the guard's)."""
        key = ("estimate", per_copy_data, per_copy_names, shared_names)
        if key in self._cache:
            return self._cache[key]
        optimizer: Optimizer = self.optimizer
        objective_of = self._objective_of()

        def one(params, mstate, opt_state, hp_copy, x, y, aug_key, hp_shared):
            objective = objective_of(mstate, x, y, aug_key)
            tx = optimizer.build({**hp_shared, **hp_copy})
            zeros = jax.tree.map(jnp.zeros_like, params)  # the update is dropped: no gradient is needed
            _, refreshed = tx.update(zeros, opt_state, params, value=jnp.zeros(()), grad=zeros,
                                     value_fn=lambda p: objective(p)[0], refresh=True)
            return adopt_estimate(opt_state, refreshed)

        batched = self._over_copies(one, per_copy_data)

        def estimate(state: LockstepState, hp_copy, hp_shared, x, y, aug_keys):
            opt_state = batched(state.params, state.model_state, state.opt_state, hp_copy, x, y, aug_keys, hp_shared)
            return LockstepState(state.params, state.model_state, opt_state)

        self._cache[key] = xla_cpu.jit(estimate)
        return self._cache[key]

    def step_function(self, copies: Copies, state: LockstepState, *, per_copy_data: bool | None = None
                      ) -> Callable[..., tuple[LockstepState, dict[str, Array]]]:
        """``(state, x, y, step=0) -> (state, metrics)``: one compiled lockstep step of ``copies``.

        ``x, y`` is one batch shared by every copy, or (``per_copy_data``, default: when the
        copies' ``data_seed`` differ) one batch per copy stacked along axis 0. ``step`` (a
        host int) keys the augmentation and, with ``refresh_every``, the CFL guard's refresh.
        ``metrics`` holds each copy's loss, its divergence from copy 0 (all parameters and
        the probe), and what the engine records (trace, checksums, guard).
        """
        per_copy, shared = self._hyper_arrays(copies)
        first = state.copy(0).params
        mask = probe_mask(first, self.probe)
        guarded = guard_state(state.opt_state) is not None
        per_copy_data = copies.varies("data_seed") if per_copy_data is None else bool(per_copy_data)
        n = copies.count
        if state.copies != n:
            raise ValueError(f"state holds {state.copies} copies, copies describes {n}")

        fn = self._step_fn(per_copy_data=per_copy_data, per_copy_names=tuple(per_copy), shared_names=tuple(shared),
                           mask=mask, guarded=guarded, refresh=False)[0]
        host_refresh = guarded and self.refresh_every is not None

        def arguments(state: LockstepState, x: Any, y: Any, step: int):
            return (state, per_copy, shared, jnp.asarray(x), jnp.asarray(y), self._augment_keys(copies, step))

        def program(state: LockstepState, x: Any, y: Any, step: int):
            return fn, arguments(state, x, y, step)

        def estimate(state: LockstepState, x: Any, y: Any, step: int):
            # Step 0's first estimate and the refreshes are one program (the guard picks the
            # iteration count from its step count).
            if refresh_due(step, self.refresh_every) is False:
                return None
            return (self._estimate_fn(per_copy_data=per_copy_data, per_copy_names=tuple(per_copy),
                                      shared_names=tuple(shared)), arguments(state, x, y, step))

        return StepFunction(program, estimate if host_refresh else None)

    def _augment_keys(self, copies: Copies, step: int) -> Array | None:
        """Each copy's augmentation key of ``step`` (``None``: no augmentation)."""
        if self.augment is None:
            return None
        return jnp.stack([jax.random.fold_in(jax.random.key(copies.augment_seed_of(i)), step)
                          for i in range(copies.count)])

    def _chunk_function(self, copies: Copies, state: LockstepState, *, per_copy_data: bool
                        ) -> Callable[[LockstepState, Sequence[tuple[Any, Any]], int], tuple[LockstepState, dict]]:
        """``(state, batches, first_step) -> (state, metrics)``: ``len(batches)`` consecutive steps
        (a host-chosen guard refresh only at the first: the caller runs its estimate before the
        chunk, :meth:`StepFunction._refreshed`) in one call of a compiled loop over a chunk of
        ``steps_per_call`` stacked batches (a shorter chunk is padded and runs fewer iterations,
        so one program serves every length); ``metrics`` hold one row per step of the chunk, the
        rows from ``len(batches)`` on being padding. The step's convolutions are rewritten into
        XLA:CPU's canonical form (:func:`jaxcfl._core.canonical.canonical_convs`), except those
        inside the model's own loops or branches: if one of those is not canonical, the result is
        ``None`` (and a warning, once) on a CPU, where XLA would run it as a naive loop nest, and
        the caller runs the batches one call each."""
        per_copy, shared = self._hyper_arrays(copies)
        mask = probe_mask(state.copy(0).params, self.probe)
        guarded = guard_state(state.opt_state) is not None
        fn = self._step_fn(per_copy_data=per_copy_data, per_copy_names=tuple(per_copy), shared_names=tuple(shared),
                           mask=mask, guarded=guarded, refresh=False)[1]
        size = self.steps_per_call

        checked = []

        def run(state: LockstepState, batches: Sequence[tuple[Any, Any]], first_step: int):
            count = len(batches)
            if not 1 <= count <= size:
                raise ValueError(f"a chunk holds 1 to {size} batches, got {count}")
            padded = list(batches) + [batches[-1]] * (size - count)
            xs = jnp.asarray(np.stack([np.asarray(b[0]) for b in padded]))
            ys = jnp.asarray(np.stack([np.asarray(b[1]) for b in padded]))
            keys = None
            if self.augment is not None:
                keys = jnp.stack([self._augment_keys(copies, first_step + min(j, count - 1)) for j in range(size)])
            args = (state, per_copy, shared, xs, ys, keys, np.int32(count))
            if not checked:  # once: a convolution XLA:CPU runs as a naive loop nest inside the loop, left over?
                checked.append(jax.default_backend() != "cpu"
                               or non_canonical_convolutions(fn.trace(*args).jaxpr) == 0)  # the call below reuses this trace
                if not checked[0]:
                    warnings.warn("Lockstep.fit: the model has convolutions inside its own loops or branches "
                                  "(lax.scan, lax.cond) whose derivatives XLA's CPU backend would run many times "
                                  "slower inside the compiled loop of steps_per_call steps, so fit runs one call per "
                                  "step; building them with jaxcfl.nn.nets.conv_general_dilated makes their "
                                  "gradients loop-friendly", RuntimeWarning, stacklevel=4)
            if not checked[0]:
                return None
            return fn(*args)  # rows from `count` on: padding

        return run

    def _mode(self) -> str:
        """The copies mode in force (:func:`resolve_copies_mode` of the model's parameter shapes)."""
        if "mode" not in self._cache:
            params = jax.eval_shape(self.model.init, jax.random.key(0))[0] if self.copies_mode == "auto" else None
            self._cache["mode"] = resolve_copies_mode(self.copies_mode, params)
        return self._cache["mode"]

    def _eval_fn(self):
        if "eval" in self._cache:
            return self._cache["eval"]
        model: Model = self.model
        loss_fn, metric_fn, predict, keep = self.loss, self.metric, self.predict, self.keep_outputs

        def one(params, mstate, x, y, mask):
            outputs, _ = model.apply(params, mstate, x, False)
            losses, values = loss_fn(outputs, y), metric_fn(outputs, y)
            count = jnp.sum(mask)
            total = lambda a: (jnp.sum(jnp.where(mask, a, 0.0)) if jnp.ndim(a) == 1 else a * count)
            out = {"metric": total(values), "loss": total(losses)}
            if predict is not None:
                out["predictions"] = predict(outputs)
            if keep:
                out["outputs"] = outputs
            return out

        if self._mode() == "vmap":
            batched = xla_cpu.jit(jax.vmap(one, in_axes=(0, 0, None, None, None)))
            fn = lambda state, x, y, mask: batched(state.params, state.model_state, x, y, mask)
        else:
            single = xla_cpu.jit(one)

            def fn(state, x, y, mask):
                outs = [single(c.params, c.model_state, x, y, mask)
                        for c in (state.copy(i) for i in range(state.copies))]
                return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)

        self._cache["eval"] = fn
        return fn

    def evaluate(self, state: LockstepState, x: Any, y: Any, *, batch_size: int = 500) -> dict[str, np.ndarray]:
        """Every copy's test metric, mean loss, predicted classes (and outputs with ``keep_outputs``).

        Fixed-size (padded, masked) batches when the loss and metric are per-example, so one
        program serves every batch; a loss or metric that returns a mean is evaluated on
        unpadded batches. Returns NumPy arrays with a leading copy axis; NaN metric and loss
        when ``x`` is empty.
        """
        fn = self._eval_fn()
        n, copies = len(x), state.copies
        if n == 0:
            return {"metric": np.full(copies, np.nan), "loss": np.full(copies, np.nan),
                    "predictions": np.zeros((copies, 0), np.int32)}
        size = min(v.check_int("batch_size", batch_size), n)
        if "per_example" not in self._cache:  # per-example loss and metric: padded batches, one program
            labels = jax.ShapeDtypeStruct(np.shape(y[:2]), np.asarray(y[:2]).dtype)
            one = state.copy(0)
            outs = jax.eval_shape(lambda p, m, xb: self.model.apply(p, m, xb, False)[0], one.params,
                                  one.model_state, jnp.asarray(x[:2]))
            shapes = [jax.eval_shape(fn_, outs, labels).shape for fn_ in (self.loss, self.metric)]
            self._cache["per_example"] = all(len(shape) == 1 for shape in shapes)
        pad = self._cache["per_example"]
        metric, loss, predictions, outputs = 0, 0, [], []
        for s in range(0, n, size):
            xb, yb = np.asarray(x[s: s + size]), np.asarray(y[s: s + size])
            valid = len(xb)
            if pad and valid < size:
                xb = np.concatenate([xb, np.zeros((size - valid, *xb.shape[1:]), xb.dtype)])
                yb = np.concatenate([yb, np.zeros((size - valid, *yb.shape[1:]), yb.dtype)])
            mask = jnp.arange(len(xb)) < valid
            out = fn(state, jnp.asarray(xb), jnp.asarray(yb), mask)
            metric, loss = metric + out["metric"], loss + out["loss"]
            if "predictions" in out:
                predictions.append(np.asarray(out["predictions"])[:, :valid])
            if "outputs" in out:
                outputs.append(np.asarray(out["outputs"])[:, :valid])
        result = {"metric": np.asarray(metric, np.float64) / n, "loss": np.asarray(loss, np.float64) / n,
                  "predictions": (np.concatenate(predictions, axis=1).astype(np.int32) if predictions
                                  else np.zeros((copies, 0), np.int32))}
        if outputs:
            result["outputs"] = np.concatenate(outputs, axis=1)
        return result

    # -- training --

    def fit(
        self,
        data: Data,
        copies: Copies | None = None,
        *,
        epochs: int,
        batch_size: int | None = None,
        test: tuple[Any, Any] | None = None,
        out: str | Path | None = None,
        settings: Mapping[str, Any] | None = None,
        progress: bool | None = None,
        on_epoch: Callable[[int, TrainResult], None] | None = None,
        eval_batch_size: int = 500,
        steps_per_epoch: int | None = None,
        lr_at: Callable[[int], float] | None = None,
        config: Any = None,
        description: str | None = None,
    ) -> TrainResult:
        """Train the copies in lockstep for ``epochs`` epochs.

        Args:
          data: ``(x, y)`` arrays (dealt into batches of ``batch_size`` in the order of each
            copy's ``data_seed``, the last partial batch dropped), or a function
            ``(seed, epoch) -> iterable of (x, y)`` batches of one shape.
          copies: what differs between the copies (:class:`Copies`; default one copy).
          epochs: passes over the data.
          batch_size: for array data.
          test: ``(x, y)`` evaluated after every epoch (``None``: no test metrics).
          out: a result folder (``docs/reliability.md``): locked for the run, with
            ``checkpoint.npz`` (weights, optimiser and RNG state, committed as one unit after
            every epoch, of a size that does not grow), ``history.log`` (one checksummed record
            per epoch: :data:`HISTORY`) and ``metrics.csv``/``.json``. An existing checkpoint of
            the same run is resumed bit for bit, after a kill at any instant; a folder of a
            different run is refused.
          settings: the run's identity in the folder (JSON); default: the names of the
            model and optimiser, the copies and the lengths. A caller that changes
            anything else it trains with must say so here.
          progress: tqdm bar over the steps (``None``: when stderr is a terminal).
          on_epoch: ``on_epoch(epoch, partial_result)`` after each epoch's checkpoint.
          eval_batch_size: test examples per evaluation batch.
          steps_per_epoch: for the progress bar of a data function (arrays: known).
          lr_at: ``epoch -> lr`` recorded per epoch (``None``: not recorded).
          config: stored in the result (the preset's :class:`jaxcfl.TrainConfig`).
          description: the progress bar's label.

        Returns:
          :class:`TrainResult`.
        """
        copies = Copies() if copies is None else copies
        if not isinstance(copies, Copies):
            raise TypeError(f"copies must be a jaxcfl.Copies, got {type(copies).__name__}")
        epochs = v.check_int("epochs", epochs)
        eval_batch_size = v.check_int("eval_batch_size", eval_batch_size)
        if callable(data) and not isinstance(data, (tuple, list)):
            batches_of = data
            if batch_size is not None:
                v.check_int("batch_size", batch_size)
        else:
            x, y = _check_arrays("data", data)
            if batch_size is None:
                raise ValueError("batch_size is needed to deal array data into batches")
            batch_size = v.check_int("batch_size", batch_size)
            if batch_size > len(x):
                raise ValueError(f"batch_size must be <= the number of training examples ({len(x)}), got {batch_size}")
            from jaxcfl.nn import _data as datasets
            steps_per_epoch = datasets.num_batches(len(x), batch_size)
            batches_of = _array_batches(x, y, batch_size)
        if test is not None:
            x_test, y_test = _check_arrays("test", test, allow_empty=True)
        start = time.perf_counter()
        n = copies.count
        state = self.init(copies)
        first = state.copy(0).params
        leaf_paths = tuple(jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(first)[0])
        guarded = guard_state(state.opt_state) is not None
        per_copy_data = copies.varies("data_seed")
        data_seeds = [copies.value("data_seed", i) for i in range(n)]
        step_fn = self.step_function(copies, state, per_copy_data=per_copy_data)
        chunk_fn = (self._chunk_function(copies, state, per_copy_data=per_copy_data) if self.steps_per_call > 1
                    else None)
        host_refresh = guarded and self.refresh_every is not None

        num_params = sum(int(np.prod(np.shape(leaf))) for leaf in jax.tree.leaves(first))
        traced = len(trace_indices(num_params, self.trace_params)) if self.trace_params else 0
        empty = {"step_divergence": np.zeros((0, n)), "probe_divergence": np.zeros((0, n)),
                 "param_trace": np.zeros((0, traced), np.float32),
                 "test_predictions": np.zeros((n, 0), np.int32),
                 "guard_lr": np.zeros((0, n)), "guard_lambda": np.zeros((0, n)),
                 "test_outputs": np.zeros((n, 0), np.float32),
                 "checksums": np.zeros((0, n, len(leaf_paths) if self.checksums else 0), np.uint32)}
        curves = dict(empty)
        history = {"test_accuracy": [], "test_loss": [], "train_loss": [], "divergence": [], "lr": []}
        first_epoch = 0
        if settings is None:
            settings = {"model": self.model.name, "optimizer": self.optimizer.name, "copies": copies.to_dict(),
                        "epochs": epochs, "batch_size": batch_size, "trace_params": self.trace_params,
                        "checksums": self.checksums}
        folder = None if out is None else ResultFolder(out, kind="training run", settings=dict(settings)).open()
        compile_seconds = 0.0
        journal: tuple[int, int] | None = (0, 0)  # bytes and records of HISTORY committed (None: not yet written)
        csv_bytes = 0
        try:
            if folder is not None:
                restored = _load_checkpoint(folder, state, empty)
                if restored is not None:
                    state, first_epoch, curves, history, journal = restored

            def result(epochs_done: int) -> TrainResult:
                arr = lambda name: np.asarray(history[name], np.float64).reshape(epochs_done, -1)
                return TrainResult(config, copies.ks(), int(data_seeds[0]), epochs_done, arr("test_accuracy"),
                                   arr("test_loss"), arr("train_loss"), arr("divergence"), curves["step_divergence"],
                                   curves["probe_divergence"], curves["param_trace"], curves["test_predictions"],
                                   np.asarray(history["lr"], np.float64), _copy_fingerprints(state),
                                   time.perf_counter() - start, compile_seconds, state,
                                   curves["guard_lr"] if guarded else None,
                                   curves["guard_lambda"] if guarded else None, epochs, dict(settings),
                                   curves["test_outputs"] if self.keep_outputs else None,
                                   curves["checksums"] if self.checksums else None, leaf_paths)

            bar = None
            if first_epoch < epochs:
                from tqdm.auto import tqdm

                total = None if steps_per_epoch is None else (epochs - first_epoch) * steps_per_epoch
                bar = tqdm(total=total, disable=progress is False if progress is not None else None,
                           desc=description or self.model.name, unit="step", leave=False)
            global_step = first_epoch * steps_per_epoch if steps_per_epoch else None
            if global_step is None and first_epoch:
                global_step = int(curves["step_divergence"].shape[0])
            global_step = global_step or 0
            if folder is not None and first_epoch < epochs:
                for name in (METRICS_CSV, METRICS_JSON):  # views of the history, rewritten by this run
                    folder.forget(name)
                csv_bytes = folder.write_plain(METRICS_CSV, _metrics_csv(history, copies.ks(), 0, first_epoch))
            for epoch in range(first_epoch, epochs):
                recorded: dict[str, list] = {name: [] for name in
                                             ("loss", "divergence", "probe_divergence", "trace", "guard_lr",
                                              "guard_lambda", "checksums")}
                pending: list[tuple[Any, Any]] = []  # batches of the next chunk

                def run(batches, single: bool) -> None:
                    """``batches`` (consecutive steps from ``global_step``; a guard refresh may be due
                    only at the first, and its estimate runs before them) as one call; metrics as rows."""
                    nonlocal state, global_step, compile_seconds, chunk_fn
                    t0 = time.perf_counter()
                    if single:
                        state, metrics = step_fn(state, *batches[0], global_step)
                    else:
                        refreshed = step_fn._refreshed(state, *batches[0], global_step)
                        out = chunk_fn(refreshed, batches, global_step)
                        if out is None:  # a model whose convolutions are slow in a loop: one call per step
                            chunk_fn = None
                            for batch in batches:
                                run([batch], single=True)
                            return
                        state, metrics = out
                    if epoch == first_epoch and compile_seconds == 0.0:
                        jax.block_until_ready(state)
                        compile_seconds = time.perf_counter() - t0
                    for name in recorded:
                        if name in metrics:
                            recorded[name].append((metrics[name], None if single else len(batches)))
                    global_step += len(batches)
                    if bar is not None:
                        bar.update(len(batches))

                for batch in self._epoch_batches(batches_of, data_seeds, per_copy_data, epoch):
                    step_here = global_step + len(pending)
                    if chunk_fn is None:
                        run([batch], single=True)
                        continue
                    if pending and host_refresh and refresh_due(step_here, self.refresh_every) is not False:
                        run(pending, single=False)  # a chunk ends before a refresh: its estimate starts the next
                        pending = []
                    pending.append(batch)
                    if len(pending) == self.steps_per_call:
                        run(pending, single=False)
                        pending = []
                if pending:
                    run(pending, single=False)
                if not recorded["loss"]:
                    raise ValueError(f"data gave no batch in epoch {epoch} (seed {data_seeds[0]})")
                def rows(name: str) -> np.ndarray:  # one row per step, from single steps and chunks
                    got = jax.device_get([a for a, _ in recorded[name]])
                    return np.concatenate([np.asarray(a)[None] if count is None else np.asarray(a)[:count]
                                           for a, (_, count) in zip(got, recorded[name])], axis=0)

                losses = rows("loss")
                added = {}  # this epoch's rows of the per-step curves
                for name, source in (("step_divergence", "divergence"), ("probe_divergence", "probe_divergence"),
                                     ("param_trace", "trace"), ("guard_lr", "guard_lr"),
                                     ("guard_lambda", "guard_lambda"), ("checksums", "checksums")):
                    if recorded[source]:
                        added[name] = rows(source)
                        curves[name] = np.concatenate([curves[name], added[name]], axis=0)
                if test is not None:
                    ev = self.evaluate(state, x_test, y_test, batch_size=eval_batch_size)
                    accuracy_, test_loss = ev["metric"], ev["loss"]
                    curves["test_predictions"] = ev["predictions"]
                    if self.keep_outputs:
                        curves["test_outputs"] = ev["outputs"]
                else:
                    accuracy_, test_loss = np.full(n, np.nan), np.full(n, np.nan)
                history["train_loss"].append(losses.mean(axis=0).tolist())
                history["test_accuracy"].append(accuracy_.tolist())
                history["test_loss"].append(test_loss.tolist())
                history["divergence"].append(np.asarray(_divergence_to_first(state.params)).tolist())
                if lr_at is not None:
                    history["lr"].append(lr_at(epoch))
                if folder is not None:  # what this epoch adds, then the checkpoint that vouches for it
                    if journal is None:  # resumed from a checkpoint that held the whole history: it becomes a record
                        before = {name: curves[name][:len(curves[name]) - len(added.get(name, ()))]
                                  for name in _STEP_CURVES}
                        journal = (folder.append(HISTORY, _record_bytes((0, epoch), history, before), at=0), 1)
                    journal = (folder.append(HISTORY, _record_bytes((epoch, epoch + 1), history, added), at=journal[0]),
                               journal[1] + 1)
                    vouched = {"name": HISTORY, "bytes": journal[0], "records": journal[1]}
                    folder.commit(CHECKPOINT, _checkpoint_bytes(state, {"epochs_done": epoch + 1, "journal": vouched},
                                                                {name: curves[name] for name in _LAST_CURVES}))
                    csv_bytes = folder.write_plain(METRICS_CSV, _metrics_csv(history, copies.ks(), epoch, epoch + 1),
                                                   at=csv_bytes)
                if on_epoch is not None:
                    on_epoch(epoch + 1, result(epoch + 1))
            if bar is not None:
                bar.close()
            if folder is not None and (first_epoch < epochs or not {METRICS_CSV, METRICS_JSON} <= set(folder.files)):
                final = result(epochs)
                folder.commit(METRICS_CSV, _metrics_csv(history, copies.ks(), 0, epochs))
                folder.commit(METRICS_JSON, json.dumps(final.to_dict(), indent=1).encode())
        finally:  # also on an interruption: a resume in the same process must find the folder free
            if folder is not None:
                folder.close()
        if guarded:  # a guard that failed closed (non-finite estimates, refused steps) says so
            warn_guard_problems(guard_state(state.opt_state))
        return result(epochs)

    @staticmethod
    def _epoch_batches(batches_of, data_seeds, per_copy_data: bool, epoch: int):
        """One epoch's batches as host arrays: shared, or stacked along a copy axis."""
        if not per_copy_data:
            for xb, yb in batches_of(int(data_seeds[0]), epoch):
                yield np.asarray(xb), np.asarray(yb)
            return
        distinct = sorted(set(data_seeds))
        iterators = {s: iter(batches_of(int(s), epoch)) for s in distinct}
        while True:
            got = {}
            for s, it in iterators.items():
                try:
                    got[s] = next(it)
                except StopIteration:
                    got[s] = None
            if any(g is None for g in got.values()):
                if not all(g is None for g in got.values()):
                    raise ValueError("data: the seeds' epochs hold different numbers of batches; copies in "
                                     "lockstep need one number")
                return
            xs = [np.asarray(got[s][0]) for s in data_seeds]
            ys = [np.asarray(got[s][1]) for s in data_seeds]
            if len({x.shape for x in xs}) > 1:
                raise ValueError(f"data: batches of different shapes across seeds ({[x.shape for x in xs]})")
            yield np.stack(xs), np.stack(ys)
