"""One declaration of an experiment's options, from which its command-line flags, the keyword
arguments of its ``run`` and the settings its payload reports all derive.

An experiment declares its options once, as a frozen dataclass that subclasses :class:`Options`;
each field is an :func:`option` carrying its help text, its flag, its command-line syntax
and its check (a :class:`Kind`)::

    @dataclasses.dataclass(frozen=True)
    class Options(_options.Options):
        epochs: int = option(15, "epochs (default {default})", COUNT)
        ks: tuple[float, ...] = option((1.0, 3.0), "perturbation factors", PERTURBATION, nargs="+", flag="--k")

    @_options.entry(Options)
    def run(o: Options, *, out=None, log=stderr) -> dict: ...

Then ``run(epochs=3, ks=(1, 3), out=...)`` is the Python entry point (its signature lists the
fields, with their defaults), ``Options.add_arguments(parser)`` adds ``--epochs`` and ``--k``, and
``run.call(Options.from_args(args), out=args.out)`` runs it from the command line.
``o.settings()`` is what the payload records.

Every value is checked when the dataclass is built, before any work starts: numbers against
their range and in the working dtype (float32 unless ``jax_enable_x64``), counts and seeds
against the integers the computation can hold (:mod:`jaxcfl._core.validate`). A check names the
option as the user wrote it: ``--train-size`` on the command line, ``train_size`` in Python.

The rules for lists (``nargs``): a value given twice in a list is refused (each value is a run of
its own), while a grid (``grid=True``: ``--lr 1e-5:1e-3:3 5e-4``, ``docs/cli.md``) is a set whose
values are merged, sorted and de-duplicated, with a note when values were merged.
"""

from __future__ import annotations

import argparse
import contextvars
import dataclasses
import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from jaxcfl._core import validate as v
from jaxcfl.experiments import _cli_types as types

_KEY = "jaxcfl.option"
UNSET: Any = type("Unset", (), {"__repr__": lambda self: "UNSET"})()
"""No value: the default of :func:`option`'s ``cli_default`` (the flag's default is ``run``'s)."""
_ON_CLI: contextvars.ContextVar[bool] = contextvars.ContextVar("jaxcfl_options_on_cli", default=False)


# --- what a value is: its syntax on the command line and its check ---------------------------------

@dataclasses.dataclass(frozen=True)
class Kind:
    """A kind of value: ``parse``, its command-line syntax (an argparse ``type``, dtype-free: ``--x64``
    is applied after parsing), and ``check(name, value) -> value``, the check of one value shared by the
    API and the command line (it may convert, e.g. to ``float``)."""

    parse: Callable[[str], Any] | None
    check: Callable[[str, Any], Any]


def _number(requirement: str) -> Callable[[str, Any], float]:
    def check(name: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
        return float(v.check_in_dtype(name, value, requirement))

    return check


def _perturbation(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    return float(v.check_perturbation(name, value))


def _text(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, got {type(value).__name__} {value!r}")
    return value


def _boolean(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return bool(value)


POSITIVE = Kind(types.positive_float, _number("positive"))
"""A float > 0, normal in the working dtype (a learning rate, a weight decay used as a divisor)."""
NONNEGATIVE = Kind(types.nonnegative_float, _number("nonnegative"))
"""A float >= 0 that survives the cast to the working dtype."""
REAL = Kind(float, _number("finite"))
"""Any finite float that survives the cast to the working dtype."""
MOMENTUM = Kind(float, _number("unit_interval"))
"""A momentum coefficient in [0, 1)."""
SAFETY = Kind(types.positive_float, _number("safety"))
"""A guard's margin in (0, 1]."""
PERTURBATION = Kind(types.positive_float, _perturbation)
"""A perturbation factor ``k``: ``k`` and ``1/k`` normal in the working dtype (:func:`~jaxcfl._core.validate.check_perturbation`)."""
COUNT = Kind(types.positive_int, lambda name, x: v.check_bounded_int(name, x, 1))
"""An integer in [1, 2^31 - 1]."""
COUNT0 = Kind(types.nonnegative_int, lambda name, x: v.check_bounded_int(name, x, 0))
"""An integer in [0, 2^31 - 1]."""
SEED = Kind(types.seed, v.check_seed)
"""A PRNG seed in [0, 2^32 - 1]."""
TEXT = Kind(None, _text)
BOOL = Kind(None, _boolean)


def at_least(minimum: int) -> Kind:
    """An integer in ``[minimum, 2^31 - 1]``."""
    return Kind(types.int_at_least(minimum), lambda name, x: v.check_bounded_int(name, x, minimum))


def choice(values: Sequence[str] | Callable[[], Sequence[str]]) -> Kind:
    """One of ``values`` (a sequence, or a function returning it: imported when first needed)."""
    return Kind(None, lambda name, x: v.check_choice(name, x, _resolve(values)))


def _resolve(values: Any) -> tuple:
    return tuple(values() if callable(values) else values)


# --- the declaration ------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Flag:
    """How one option appears on the command line, and how it is checked (the metadata of :func:`option`)."""

    help: str
    kind: Kind
    flag: str | None = None
    nargs: str | int | None = None
    choices: Any = None
    action: Any = None
    metavar: str | None = None
    group: str | None = None
    required: bool = False
    optional: bool = False
    cli: bool = True
    cli_default: Any = UNSET
    grid: bool = False
    settings: bool = True
    identity: bool = True

    @property
    def many(self) -> bool:
        """Whether the option holds a list of values (``nargs`` ``"+"``, ``"*"`` or a count)."""
        return self.nargs in ("+", "*") or isinstance(self.nargs, int)

    def option_string(self, name: str) -> str:
        return self.flag or "--" + name.replace("_", "-")


def option(default: Any = dataclasses.MISSING, help: str = "", kind: Kind = TEXT, *, flag: str | None = None,
           nargs: str | int | None = None, choices: Any = None, action: Any = None, metavar: str | None = None,
           group: str | None = None, required: bool = False, cli: bool = True, cli_default: Any = UNSET,
           grid: bool = False, settings: bool = True, identity: bool = True) -> Any:
    """A field of an :class:`Options` dataclass.

    Args:
      default: the default of ``run`` and of the flag (omit it for a required option).
      help: the flag's help; ``{default}`` is replaced by the default as the command line writes it.
      kind: what a value is (:class:`Kind`); with ``nargs``, of each value.
      flag: the option string (default ``--`` and the name with dashes); a name without dashes is a positional.
      nargs, metavar, group, required, action: as ``argparse``; ``group`` is an argument group's title.
      choices: the allowed values (a sequence, or a function returning it); checked in Python too.
      cli: ``False``: a keyword argument of ``run`` only, not on the command line.
      cli_default: the flag's default where it differs from ``run``'s (an output folder).
      grid: a grid flag (:data:`~jaxcfl.experiments._cli_types.GRID_SYNTAX`): its tokens are merged into one
        sorted set of values.
      settings: recorded in the payload's ``settings`` (:meth:`Options.settings`).
      identity: part of what defines the run's results (:meth:`Options.identity`, the result folder's
        identity); ``False`` for what only changes how they are computed or shown (a progress bar, the
        copies' layout, a figure's smoothing, a derived statistic that is recomputed on every run).

    A ``None`` default makes ``None`` an allowed value ("all", "off", "the default").
    """
    if choices is not None and kind is TEXT:
        kind = choice(choices)
    spec = Flag(help=help, kind=kind, flag=flag, nargs=nargs, choices=choices, action=action, metavar=metavar,
                group=group, required=required, optional=default is None, cli=cli, cli_default=cli_default,
                grid=grid, settings=settings, identity=identity)
    return dataclasses.field(default=default, metadata={_KEY: spec})


def spec_of(field: dataclasses.Field) -> Flag:
    return field.metadata[_KEY]


def fields_of(cls_or_options: Any) -> list[dataclasses.Field]:
    """The declared options, in declaration order."""
    return [f for f in dataclasses.fields(cls_or_options) if _KEY in f.metadata]


def _show(value: Any, sep: str = " ") -> str:
    if isinstance(value, (tuple, list)):
        return sep.join(_show(x) for x in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


class Options:
    """The base of an experiment's options (a frozen dataclass of :func:`option` fields).

    Building it checks every value (:class:`Kind`) and then :meth:`validate`, the experiment's
    checks across options; :attr:`notes` are what was adjusted (a clamped size, merged grid values),
    logged when ``run`` starts.
    """

    def __post_init__(self) -> None:
        object.__setattr__(self, "_notes", [])
        for field in fields_of(self):
            spec = spec_of(field)
            value = getattr(self, field.name)
            if value is None and spec.optional:
                continue
            name = self.spelled(field.name)
            if spec.many:
                items = value if isinstance(value, (tuple, list, np.ndarray)) else (value,)
                items = tuple(x.item() if isinstance(x, np.generic) else x for x in np.asarray(items, object).ravel())
                if spec.nargs == "+" and not items:
                    raise ValueError(f"{name} is empty; give at least one value")
                value = v.check_distinct(name, tuple(spec.kind.check(name, x) for x in items))
            else:
                value = spec.kind.check(name, value)
            object.__setattr__(self, field.name, value)
        self.validate()

    def validate(self) -> None:
        """Checks across options (an experiment overrides it); raise ``ValueError`` naming :meth:`spelled`."""

    # --- for the experiment's code

    def spelled(self, name: str) -> str:
        """How the user wrote option ``name``: its flag on the command line, its keyword in Python."""
        if _ON_CLI.get():
            for field in fields_of(self):
                if field.name == name and spec_of(field).cli:
                    return spec_of(field).option_string(name)
        return name

    def changed(self, name: str) -> bool:
        """Whether option ``name`` differs from its default (the user chose it)."""
        field = next(f for f in fields_of(self) if f.name == name)
        return getattr(self, name) != field.default

    def note(self, text: str) -> None:
        """Record what was adjusted, for the log."""
        self._notes.append(text)

    @property
    def notes(self) -> tuple[str, ...]:
        return tuple(self._notes)

    def refuse_unused(self, names: Sequence[str], reason: str) -> None:
        """Refuse options that the chosen mode ignores: those of ``names`` that the user changed are an
        error that says ``reason`` (e.g. ``"for the schemes with momentum; --scheme is gd"``)."""
        given = [self.spelled(n) for n in names if self.changed(n)]
        if given:
            one = len(given) == 1
            raise ValueError(f"{', '.join(given)} {'is' if one else 'are'} ignored here ({reason}); leave "
                             f"{'it' if one else 'them'} out")

    def kwargs(self) -> dict[str, Any]:
        """The options as ``run``'s keyword arguments."""
        return {f.name: getattr(self, f.name) for f in fields_of(self)}

    def identity(self) -> dict[str, Any]:
        """The options that define the run's results (``identity=True``): what a result folder records,
        and refuses to mix with another run's."""
        return {f.name: getattr(self, f.name) for f in fields_of(self) if spec_of(f).identity}

    def settings(self, **extra: Any) -> dict[str, Any]:
        """The options the payload records (``settings=True``), JSON-able, in declaration order; ``extra``
        adds entries or replaces some in place (a value resolved at run time)."""
        out = {f.name: list(getattr(self, f.name)) if isinstance(getattr(self, f.name), tuple) else getattr(self, f.name)
               for f in fields_of(self) if spec_of(f).settings}
        out.update(extra)
        return out

    def replace(self, **changes: Any) -> Options:
        return dataclasses.replace(self, **changes)

    # --- the command line

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """One flag per declared option (``cli=True``), in declaration order."""
        groups: dict[str, Any] = {g.title: g for g in parser._action_groups if g.title}  # --image's, say
        for field in fields_of(cls):
            spec = spec_of(field)
            if not spec.cli:
                continue
            target = parser
            if spec.group is not None:
                if spec.group not in groups:
                    groups[spec.group] = parser.add_argument_group(spec.group)
                target = groups[spec.group]
            default = field.default if spec.cli_default is UNSET else spec.cli_default
            if default is dataclasses.MISSING:
                default = None
            listed = spec.many and isinstance(default, tuple)  # else one value: LO:HI
            kwargs: dict[str, Any] = dict(default=list(default) if listed else default,
                                          help=spec.help.replace("{default}", _show(default, " " if listed else ":")))
            if spec.action is not None:
                kwargs["action"] = spec.action
            else:
                kwargs.update(type=spec.kind.parse, nargs=spec.nargs, metavar=spec.metavar)
                if spec.choices is not None:
                    kwargs["choices"] = _resolve(spec.choices)
                if spec.grid:
                    kwargs["metavar"] = spec.metavar or "GRID"
            string = spec.option_string(field.name)
            if string.startswith("-"):
                if spec.action is None and spec.choices is None and kwargs.get("metavar") is None:  # --k K
                    kwargs["metavar"] = string.lstrip("-").upper().replace("-", "_")
                if spec.required:
                    kwargs["required"] = True
                target.add_argument(string, dest=field.name, **kwargs)
            else:  # a positional
                target.add_argument(field.name, **kwargs)

    @classmethod
    def from_args(cls, args: argparse.Namespace, **overrides: Any) -> Options:
        """The options of parsed ``args`` (checks name the flags), with ``overrides``."""
        values: dict[str, Any] = {}
        merged: list[str] = []
        for field in fields_of(cls):
            spec = spec_of(field)
            if not spec.cli or not hasattr(args, field.name):
                continue
            value = getattr(args, field.name)
            if spec.grid and value is not None:
                tokens = [np.atleast_1d(np.asarray(t, np.float64)) for t in value]
                given = sum(t.size for t in tokens)
                value = tuple(float(x) for x in types.merge_grid(tokens))
                if len(value) < given:
                    merged.append(f"{spec.option_string(field.name)}: {given - len(value)} repeated value(s) merged "
                                  f"(a grid is a set: its values are merged, sorted and de-duplicated)")
            values[field.name] = value
        token = _ON_CLI.set(True)
        try:
            options = cls(**{**values, **overrides})
        finally:
            _ON_CLI.reset(token)
        for text in merged:
            options.note(text)
        return options


# --- run, from the declaration ----------------------------------------------------------------------

def entry(cls: type[Options]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Make ``body(options, *positionals, **runtime)`` the experiment's ``run``.

    ``run``'s signature is ``body``'s positional parameters, then the declared options (those without
    a default first, positional or keyword, then the others, keyword-only, with their defaults), then
    ``body``'s keyword parameters (``out``, ``progress``, ``log``, ...). ``run(**kwargs)`` builds and checks
    ``cls`` before it calls ``body``; ``run.call(options, ...)`` runs prepared options (the command
    line's, from :meth:`Options.from_args`); ``run.options`` is ``cls``. The options' :attr:`~Options.notes`
    go to ``log`` first.
    """

    def wrap(body: Callable[..., Any]) -> Callable[..., Any]:
        P = inspect.Parameter
        params = list(inspect.signature(body).parameters.values())[1:]
        positional = [p for p in params if p.kind is P.POSITIONAL_OR_KEYWORD]
        keyword = [p for p in params if p.kind is P.KEYWORD_ONLY]
        var = [p for p in params if p.kind is P.VAR_KEYWORD]
        declared = fields_of(cls)
        names = {f.name for f in declared}
        shadowed = names & {name for name in dir(Options) if not name.startswith("__")}
        if shadowed:
            raise TypeError(f"{cls.__qualname__}: the options {sorted(shadowed)} would hide Options' methods")
        clash = names & {p.name for p in params}
        if clash:
            raise TypeError(f"{body.__qualname__}: {sorted(clash)} are declared options; take them from the options")
        required = [P(f.name, P.POSITIONAL_OR_KEYWORD, annotation=f.type) for f in declared
                    if f.default is dataclasses.MISSING]
        optional = [P(f.name, P.KEYWORD_ONLY, default=f.default, annotation=f.type) for f in declared
                    if f.default is not dataclasses.MISSING]
        signature = inspect.Signature(positional + required + optional + keyword + var,
                                      return_annotation=inspect.signature(body).return_annotation)
        log_default = next((p.default for p in keyword if p.name == "log"), None)

        def call(options: Options, *args: Any, **runtime: Any) -> Any:
            log = runtime.get("log", log_default)
            if log is not None:
                for text in options.notes:
                    log(f"note: {text}")
            return body(options, *args, **runtime)

        @functools.wraps(body)
        def run(*args: Any, **kwargs: Any) -> Any:
            given = dict(signature.bind(*args, **kwargs).arguments)
            extra = given.pop(var[0].name, {}) if var else {}
            options = cls(**{name: given.pop(name) for name in list(given) if name in names})
            return call(options, **given, **extra)

        run.__signature__ = signature
        run.options = cls
        run.call = call
        return run

    return wrap


def add_out(parser: argparse.ArgumentParser, default: str | None, help: str) -> None:
    """``--out`` (the result folder; not an option of the experiment, the place its results go)."""
    parser.add_argument("--out", default=default, help=help)


# --- options several training experiments share -----------------------------------------------------

def _networks() -> tuple[str, ...]:
    from jaxcfl.nn.nets import NETWORKS

    return NETWORKS


def _datasets() -> tuple[str, ...]:
    from jaxcfl.nn._data import DATASETS

    return tuple(DATASETS)


def _copies_modes() -> tuple[str, ...]:
    from jaxcfl.nn._lockstep import COPIES_MODES

    return COPIES_MODES


def network(default: str, help: str) -> Any:
    """``--model``: one of :data:`jaxcfl.nn.nets.NETWORKS`."""
    return option(default, help, choices=_networks)


def dataset(help: str = "dataset (default: the built-in digits, no files needed)") -> Any:
    """``--dataset``: one of :data:`jaxcfl.data.DATASETS`, default the built-in digits."""
    return option("builtin", help, choices=_datasets)


def data_root(help: str = "folder with the dataset's files (default $JAXCFL_DATA or ./data)", **kwargs: Any) -> Any:
    return option(None, help, TEXT, **kwargs)


def split_size(split: str, help: str | None = None) -> Any:
    """``--train-size`` / ``--test-size``: the first N images of a split (``None``: all); clamped to the
    split by :func:`clamp_sizes`, which records the size used."""
    return option(None, help or f"use the first N {split} images (default: all)", COUNT)


def copies_mode(help: str = "how the k copies share one compiled step (auto: vmap on GPU, unroll on CPU)") -> Any:
    """``--copies-mode``: the lockstep engine's ``COPIES_MODES`` (bit-identical results either way)."""
    return option("auto", help, choices=_copies_modes, identity=False)


def activation(default: str = "relu", help: str = "activation (default {default})") -> Any:
    return option(default, help, choices=("relu", "swish"))


def clamp_sizes(options: Options, dataset: str, names: Sequence[tuple[str, str]] = (("train_size", "train"),
                                                                                    ("test_size", "test"))) -> None:
    """Clamp ``train_size`` / ``test_size`` to the size of ``dataset``'s split, so that what is recorded
    (the run's identity, the payload) is the number of images used, with a note saying so."""
    from jaxcfl.nn import _data

    meta = _data.info(dataset)
    for name, split in names:
        size, available = getattr(options, name), getattr(meta, f"{split}_size")
        if size is not None and size > available:
            object.__setattr__(options, name, available)
            options.note(f"{options.spelled(name)} {size} is more than the {available} {split} images of {dataset}; "
                         f"using (and recording) {available}")


def refuse_unused_beta(options: Options) -> None:
    """``beta`` is Swish's: refused when changed with ``activation="relu"``."""
    if options.activation == "relu":
        options.refuse_unused(["beta"], f"Swish's beta; {options.spelled('activation')} is relu")


def train_default(name: str) -> Any:
    """The default of :class:`jaxcfl.TrainConfig`'s field ``name`` (the paper's optimiser lives there)."""
    from jaxcfl.nn._preset import TrainConfig

    return {f.name: f.default for f in dataclasses.fields(TrainConfig)}[name]


def train_config_kwargs(options: Options, **overrides: Any) -> dict[str, Any]:
    """The options that are :class:`jaxcfl.TrainConfig` fields, as its keyword arguments, with ``overrides``."""
    from jaxcfl.nn._preset import TrainConfig

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return {**{f.name: getattr(options, f.name) for f in fields_of(options) if f.name in names}, **overrides}


# --- the results before the figures -----------------------------------------------------------------

def figure_file(path: Any, draw: Callable[[], Any], log: Callable[[str], None]) -> str | None:
    """``draw()``'s figure saved to ``path``; call it after the results are written. A figure that cannot be
    drawn (nothing positive on a log axis, a missing font, ...) is a warning in ``log``, not a lost run."""
    from jaxcfl import plot

    try:
        return plot.save(draw(), path)
    except Exception as err:  # noqa: BLE001 - matplotlib raises many kinds; the numbers are already on disk
        log(f"warning: the figure {path} was not drawn ({type(err).__name__}: {err}); the results are written")
        return None


def default_of(function: Callable[..., Any], name: str) -> Any:
    """The default of ``function``'s parameter ``name``: an experiment's option takes the library's default
    from the one place it is written."""
    return inspect.signature(function).parameters[name].default


def pde_default(name: str) -> Any:
    """The default of the PDE side's option ``name``: a field of :class:`jaxcfl.pde.Setup` (the model, the
    scheme and their constants), else a parameter of :func:`jaxcfl.sweep` (``steps``, ``operator``, ...)."""
    from jaxcfl.pde import Setup, sweep

    defaults = {f.name: f.default for f in dataclasses.fields(Setup)}
    return defaults[name] if name in defaults else default_of(sweep, name)


def refuse_reference_k(options: Options, name: str) -> None:
    """A perturbation factor compared with the reference copy ``k = 1`` must not be 1 itself: the
    comparison would be of a copy with itself (a divergence of 0 by construction, nothing to plot)."""
    if getattr(options, name) == 1:
        raise ValueError(f"{options.spelled(name)} 1 is the reference copy itself (its divergence from k = 1 is 0 by "
                         f"construction); compare another k, e.g. 3")
