"""Each experiment declares its options once (``Options``, :mod:`jaxcfl.experiments._options`): its flags,
the keyword arguments of its ``run`` and the settings its payload records all come from that declaration,
and the flags, defaults and payload keys it had before the declaration are all still there."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect

import numpy as np
import pytest

from jaxcfl import cli
from jaxcfl.experiments import COMMANDS, EXPERIMENTS, _options

MODULES = {name: module for name, (module, _) in {**EXPERIMENTS, **COMMANDS}.items()}

# The flags of every command before its options were declared (git history: the hand-written
# ``add_arguments``), and their defaults: none may disappear or change.
FLAGS = {
    "table5": {"--kernel-size": [16, 32, 64], "--size": 256, "--steps": 1000, "--rtol": 1e-3, "--out": "jaxcfl-table5",
               "--no-map": None, "--operator": "auto"},
    "fig2": {"--n": [1, 4, 16, 64, 256], "--base-lr": 0.3, "--epochs-per-n": 4, "--k": 3.0, "--model": "cnn",
             "--dataset": "builtin", "--data-root": None, "--train-size": None, "--test-size": None, "--batch-size": 16,
             "--activation": "swish", "--beta": 5.0, "--weight-decay": 5e-4, "--augment": False, "--probe": None,
             "--seed": 1, "--init-seed": 0, "--window": 0, "--copies-mode": "auto", "--no-sharpness": None,
             "--out": "jaxcfl-fig2"},
    "fig4": {"--lr": [0.01, 0.03, 0.05, 0.07, 0.09, 0.1, 0.11, 0.13], "--alpha": 20.0, "--size": 256,
             "--kernel-size": 32, "--steps": 1000, "--k": 3.0, "--window": 100, "--seed": 0, "--chunk-size": 2,
             "--out": "jaxcfl-fig4"},
    "appendix-f": {"--models": ["mlp", "cnn", "resnet20"], "--alphas": [1.0, 10.0, 100.0, 1000.0], "--train-size": None,
                   "--steps": None, "--rtol": 0.05, "--seed": 0, "--out": "jaxcfl-appendix-f"},
    "pde-guard": {"--lr": [0.01, 0.03, 0.05, 0.07, 0.09, 0.1, 0.11, 0.13], "--alpha": 20.0, "--map-lr": None,
                  "--map-alpha": None, "--size": 256, "--kernel-size": 32, "--steps": 1000, "--k": 3.0, "--safety": 0.9,
                  "--every": 10, "--warmup": 20, "--seed": 0, "--chunk-size": 16, "--out": "jaxcfl-pde-guard"},
    "open-question": {"--model": "cnn", "--dataset": "builtin", "--data-root": None, "--activation": "relu", "--beta": 1.0,
                      "--epochs": 15, "--k": [1.0, 3.0, 5.0, 7.0, 9.0, 11.0], "--seeds": [1, 2, 3, 4, 5], "--lr": 0.1,
                      "--batch-size": 32, "--weight-decay": 5e-4, "--train-size": None, "--test-size": None,
                      "--safety": 0.9, "--every": 20, "--iterations": 4, "--first-iterations": 20, "--last-epochs": None,
                      "--trace-params": 4096, "--resamples": 2000, "--copies-mode": "auto",
                      "--out": "jaxcfl-open-question"},
    "variance": {"--model": "cnn", "--dataset": "builtin", "--data-root": None, "--epochs": 15,
                 "--k": [1.0, 3.0, 5.0, 7.0, 9.0, 11.0], "--seeds": [1, 2, 3, 4, 5], "--activation": "relu", "--beta": 1.0,
                 "--lr": 0.1, "--batch-size": 32, "--weight-decay": 5e-4, "--train-size": None, "--test-size": None,
                 "--last-epochs": None, "--trace-params": 4096, "--resamples": 2000, "--copies-mode": "auto",
                 "--out": "jaxcfl-variance"},
    "determinism": {"--model": "cnn", "--epochs": 3, "--train-size": None, "--batch-size": 32, "--seed": 1,
                    "--processes": 2, "--out": "jaxcfl-determinism"},
    "sweep": {"--image": "checkerboard", "--size": None, "--kernel-size": 16, "--seed": 0, "--scheme": "gd",
              "--model": "linear", "--pool": "sum", "--momentum": 0.9, "--a": -0.5, "--beta": 1.0, "--label": 1.0,
              "--bias": 0.0, "--operator": "auto", "--lr": None, "--alpha": None, "--steps": 1000, "--compare-k": None,
              "--record-points": 100, "--chunk-size": 256, "--no-theory": None, "--safety": 0.9, "--every": 10,
              "--warmup": 20, "--out": "jaxcfl-sweep", "--no-progress": None},
    "sensitivity": {"spec": "jaxcfl.examples.digits:training", "--sources": None, "--runs": 8, "--epochs": 8,
                    "--batch-size": None, "--seed": 0, "--no-determinism": None, "--copies-mode": "auto",
                    "--resamples": 2000, "--progress": None, "--out": "jaxcfl-sensitivity"},
    "bounds": {"--image": "checkerboard", "--size": None, "--kernel-size": [16], "--seed": 0, "--scheme": "gd",
               "--model": "linear", "--pool": "sum", "--momentum": 0.9, "--a": -0.5, "--beta": 1.0, "--label": 1.0,
               "--bias": 0.0, "--operator": "auto", "--lr": None, "--steps": 1000, "--rtol": 1e-3,
               "--alpha-range": (1e-3, 1e12), "--out": None, "--no-progress": None},
}
"""Flag -> its default (``None`` where the default is not compared: a switch, a long computed list)."""

RUNTIME = {"out", "help", "image", "size", "no_progress"}
"""What the command line adds beside the declared options: where the input comes from and the results go."""


def _parser(name: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    importlib.import_module(MODULES[name]).add_arguments(parser)
    return parser


def _actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {(a.option_strings[0] if a.option_strings else a.dest): a for a in parser._actions}


def test_every_command_is_covered():
    assert set(FLAGS) == set(MODULES)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_flag_and_default_of_before_is_kept(name):
    actions = _actions(_parser(name))
    assert set(actions) == set(FLAGS[name])
    for flag, default in FLAGS[name].items():
        if default is not None:
            got = actions[flag].default
            assert (list(got) if isinstance(got, tuple) and isinstance(default, list) else got) == default, flag


@pytest.mark.parametrize("name", sorted(MODULES))
def test_flags_come_from_the_declaration(name):
    module = importlib.import_module(MODULES[name])
    options = module.Options
    assert issubclass(options, _options.Options) and dataclasses.is_dataclass(options)
    assert options.__dataclass_params__.frozen
    actions = {a.dest: a for a in _parser(name)._actions}
    declared = {f.name: f for f in _options.fields_of(options) if _options.spec_of(f).cli}
    assert set(declared) <= set(actions) and set(actions) - set(declared) <= RUNTIME
    for field_name, field in declared.items():
        spec, action = _options.spec_of(field), actions[field_name]
        assert spec.option_string(field_name) in (action.option_strings or [action.dest])
        default = field.default if spec.cli_default is _options.UNSET else spec.cli_default
        if default is not dataclasses.MISSING:
            got = action.default
            assert (tuple(got) if isinstance(got, list) else got) == default, field_name
        if spec.choices is not None:
            assert tuple(action.choices) == _options._resolve(spec.choices)
        help_text = action.help or ""
        assert "{default}" not in help_text and (spec.help.split("{default}")[0] in help_text)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_run_keywords_come_from_the_declaration(name):
    module = importlib.import_module(MODULES[name])
    assert module.run.options is module.Options
    params = inspect.signature(module.run).parameters
    for field in _options.fields_of(module.Options):
        assert field.name in params
        expected = inspect.Parameter.empty if field.default is dataclasses.MISSING else field.default
        assert params[field.name].default == expected, field.name
    runtime = set(params) - {f.name for f in _options.fields_of(module.Options)}
    assert runtime <= {"image", "out", "progress", "log", "image_info", "train_options"}, runtime


@pytest.mark.parametrize("name", sorted(MODULES))
def test_parsed_arguments_become_the_options_and_the_settings(name):
    """The command line's defaults build the same options as ``run``'s defaults (but the grid, which
    has none, and the output folder), and the settings are the declared fields marked for the payload."""
    module = importlib.import_module(MODULES[name])
    argv = ["--lr", "1e-3", "--alpha", "1"] if name == "sweep" else ["--lr", "1e-3"] if name == "bounds" else []
    args = _parser(name).parse_args(argv)
    from_cli = module.Options.from_args(args)
    required = {f.name: getattr(from_cli, f.name) for f in _options.fields_of(module.Options)
                if f.default is dataclasses.MISSING}
    assert from_cli == module.Options(**required)
    settings = from_cli.settings()
    assert list(settings) == [f.name for f in _options.fields_of(module.Options) if _options.spec_of(f).settings]
    assert settings == {k: list(v) if isinstance(v, tuple) else v for k, v in from_cli.kwargs().items() if k in settings}


def test_cli_and_python_name_the_option_as_the_user_wrote_it():
    from jaxcfl.experiments import variance

    with pytest.raises(ValueError, match="^train_size must be"):
        variance.Options(train_size=0)
    args = cli.build_parser().parse_args(["variance", "--k", "1", "3", "--seeds", "1", "1"])
    with pytest.raises(ValueError, match="^--seeds repeats 1"):
        variance.Options.from_args(args)


def test_a_clamped_size_records_the_size_used_and_says_so():
    from jaxcfl.experiments import variance
    from jaxcfl.nn import _data

    available = _data.info("builtin").train_size
    args = cli.build_parser().parse_args(["variance", "--train-size", "100000", "--test-size", "50"])
    options = variance.Options.from_args(args)
    assert options.train_size == available and options.test_size == 50
    assert _options.train_config_kwargs(options)["train_size"] == available  # the run's identity
    assert options.settings()["train_size"] == available  # and the payload
    (note,) = options.notes
    assert "--train-size 100000" in note and str(available) in note
    logged = []
    with pytest.raises(RuntimeError, match="stop"):  # the note is logged before the work starts
        variance.run.call(options, out=None, log=lambda line: (logged.append(line), _stop()))
    assert logged == [f"note: {note}"]


def _stop():
    raise RuntimeError("stop")


def test_grid_values_given_twice_are_merged_with_a_note_and_lists_are_refused():
    from jaxcfl.experiments import fig4, image_sweep

    args = cli.build_parser().parse_args(["sweep", "--lr", "1e-3", "1e-4,1e-3", "--alpha", "1", "1"])
    options = image_sweep.Options.from_args(args)
    assert options.lr == (1e-4, 1e-3) and options.alpha == (1.0,)
    assert [n.split(":")[0] for n in options.notes] == ["--lr", "--alpha"]
    with pytest.raises(ValueError, match="lr repeats"):  # a list of runs is not a grid
        fig4.Options(lr=(0.01, 0.01))
    with pytest.raises(ValueError, match="lr repeats"):  # nor is run()'s argument, which is not merged
        image_sweep.Options(lr=(1e-3, 1e-3), alpha=(1.0,))


def test_an_option_may_not_hide_a_method_of_options():
    @dataclasses.dataclass(frozen=True)
    class Bad(_options.Options):
        settings: int = _options.option(1, "x", _options.COUNT)

    with pytest.raises(TypeError, match="hide"):
        _options.entry(Bad)(lambda o: None)


def test_the_guard_defaults_come_from_one_place():
    from jaxcfl.experiments import image_sweep, open_question, pde_guard
    from jaxcfl.nn._guard import DEFAULTS
    from jaxcfl.pde import GuardSchedule, Setup

    oq = open_question.Options()
    assert (oq.safety, oq.every, oq.iterations, oq.first_iterations) == tuple(DEFAULTS)
    for options in (pde_guard.Options(), image_sweep.Options(lr=(1e-3,), alpha=(1.0,))):
        assert options.safety == Setup().safety
        assert (options.every, options.warmup) == (GuardSchedule().every, GuardSchedule().warmup)


def test_copies_mode_choices_are_the_engine_s():
    from jaxcfl.nn._lockstep import COPIES_MODES

    for name in ("variance", "open-question", "fig2", "sensitivity"):
        assert tuple(_actions(_parser(name))["--copies-mode"].choices) == tuple(COPIES_MODES)


def test_sequences_accept_a_scalar_and_numpy_values():
    from jaxcfl.experiments import fig4

    assert fig4.Options(lr=0.05).lr == (0.05,)
    options = fig4.Options(lr=np.array([0.01, 0.02]), seed=np.int64(3))
    assert options.lr == (0.01, 0.02) and type(options.lr[0]) is float and options.seed == 3


def test_the_identity_leaves_out_what_only_changes_how_results_are_computed_or_shown():
    from jaxcfl.experiments import fig2, table5, variance

    assert set(variance.Options().identity()) == set(variance.Options().kwargs()) - {"copies_mode", "resamples"}
    assert "window" not in fig2.Options().identity() and "seed" in fig2.Options().identity()
    assert {"operator", "stability_map"}.isdisjoint(table5.Options().identity())
