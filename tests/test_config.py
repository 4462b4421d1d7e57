"""The option spec (pipeline/config.py): every field declares itself once, and the click options, the range
and choice checks (in the caller's terms) and docs/commands.md's tables all come from it."""
import json
from dataclasses import dataclass, field, fields, is_dataclass

import click
import pytest
from click.testing import CliRunner

import pipeline
from pipeline import config
from pipeline.cli import cli, option_table, options_from
from pipeline.config import Option, SummaryConfig, check_value, describe_range, option
from pipeline.errors import UsageError

CONFIGS = [c for c in vars(config).values()
           if isinstance(c, type) and is_dataclass(c) and c.__name__.endswith("Config")]
#: command-line options that are no config field: how to print (--json)
CLI_ONLY = {"as_json"}


def test_every_config_field_is_an_option_or_marked_internal():
    assert len(CONFIGS) >= 18
    bare = [f"{c.__name__}.{f.name}" for c in CONFIGS for f in fields(c) if "option" not in f.metadata]
    assert not bare, f"fields without option(...) or internal(...) metadata: {bare}"


def test_every_option_of_every_command_is_made_from_a_spec():
    hand_written = [f"{name} {p.name}" for name, cmd in cli.commands.items() for p in cmd.params
                    if isinstance(p, click.Option) and not hasattr(p, "spec_field")
                    and p.name not in CLI_ONLY and (name, p.name) not in CLI_ONLY]
    assert not hand_written, hand_written


def test_the_shared_groups_are_one_declaration():
    """train and fit-head take the same trust options from one group, with train's own calibrate choices."""
    spec = {c: {f.name: f.metadata["option"] for f in fields(c)} for c in (config.FitHeadConfig, config.TrainConfig)}
    for name in ("known_share", "unknown_rows", "unknown_k"):
        assert spec[config.FitHeadConfig][name] is spec[config.TrainConfig][name]
    assert spec[config.TrainConfig]["calibrate"].choices == ("val", "none")
    assert "cv" not in spec[config.TrainConfig]["calibrate"].help  # train --help offered cv, a refused choice
    assert issubclass(config.ExtractConfig, config.RunnerOptions)
    assert issubclass(config.TrainConfig, config.TrustOptions)


@pytest.mark.parametrize("interval, integer, words", [
    ("[1, inf)", True, "positive"), ("(0, inf)", False, "positive"), ("[0, inf)", True, "0 or more"),
    ("[-1, inf)", True, "-1 or more"), ("[2, inf)", True, "at least 2"), ("[0, 65535]", True, "between 0 and 65535"),
    ("(0, 10]", False, "in (0, 10]"), ("(0, 1)", False, "in (0, 1)")])
def test_a_range_in_words(interval, integer, words):
    assert describe_range(interval, integer) == words


def test_check_value_refuses_the_edges_nan_and_other_kinds():
    lr = Option("rate", range="(0, 10]")
    check_value(lr, 10.0, "--lr")
    for bad in (0.0, 10.5, float("nan"), float("inf")):
        with pytest.raises(UsageError, match=r"^--lr must be in \(0, 10\], got"):
            check_value(lr, bad, "--lr")
    with pytest.raises(UsageError, match="n must be a whole number, got 1.5"):
        check_value(Option("count", range="[0, inf)"), 1.5, "n", integer=True)
    with pytest.raises(UsageError, match="unknown --pool 'max'; allowed: none, avg"):
        check_value(Option("pool", choices=("none", "avg")), "max", "--pool")
    check_value(Option("pool", choices=("none", "avg")), None, "--pool")  # None: the default's own


@pytest.mark.parametrize("args, message", [
    (["fit-head", "--lr", "20"], "Error: --lr must be in (0, 10], got 20.0"),
    (["fit-head", "--known-share", "0"], "Error: --known-share must be in (0, 1], got 0.0"),
    (["train", "--unknown-rows", "-1"], "Error: --unknown-rows must be 0 or more, got -1"),
    (["feature-map", "x.jpg", "--top-k", "33"], "Error: --top-k must be between 1 and 32, got 33"),
    (["choose-backbone", "--folds", "1"], "Error: --folds must be at least 2, got 1"),
    (["serve", "--model", "m.pt", "--max-wait-ms", "2000"], "Error: --max-wait-ms must be in [0, 1000], got 2000.0"),
    (["extract", "--workers", "-2"], "Error: --workers must be -1 or more, got -2"),
])
def test_the_command_line_names_its_options(args, message):
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 2 and r.output.strip() == message, r.output


@pytest.mark.parametrize("call, message", [
    (lambda: pipeline.train_model("data", lr=20.0), r"^train_model: lr must be in \(0, 10\], got 20.0$"),
    (lambda: pipeline.preview("data", per_class=0), "^preview: per_class must be between 1 and 32, got 0$"),
    (lambda: pipeline.extract_features("data", dtype="float64"),
     "^extract_features: unknown dtype 'float64'; allowed: float16, float32$"),
    (lambda: pipeline.serve_app("m.pt", port=70000), "^serve_app: port must be between 0 and 65535, got 70000$"),
    # a bool is no number: n=True was taken for 1 and made a cache named 'nTrue' that its reader then refused
    (lambda: pipeline.extract_features("data", n=True), "^extract_features: n must be a whole number, got True$"),
    (lambda: pipeline.train_model("data", lr=False), "^train_model: lr must be a number, got False$"),
])
def test_the_api_names_its_parameters(call, message):
    """Python callers read their own keyword (lr=...), never the command line's --lr."""
    with pytest.raises(UsageError, match=message):
        call()


def test_adding_a_field_adds_a_checked_option():
    """What 'adding an option is one field' means: the field alone gives the option, its check and its row."""

    @dataclass
    class WithDepth(SummaryConfig):
        depth: int = field(default=3, metadata=option("Blocks to keep.", range="[1, 8]"))

    @click.command()
    @options_from(WithDepth)
    def probe(**options):
        click.echo(json.dumps(options))

    ok = CliRunner().invoke(probe, ["--depth", "2"])
    assert ok.exit_code == 0 and json.loads(ok.output) == {**{f.name: f.default for f in fields(SummaryConfig)},
                                                           "depth": 2}
    bad = CliRunner().invoke(probe, ["--depth", "9"])
    assert bad.exit_code == 2 and "--depth must be between 1 and 8, got 9" in bad.output
    assert "Blocks to keep." in CliRunner().invoke(probe, ["--help"]).output
    with pytest.raises(UsageError, match="depth must be between 1 and 8"):
        config.check_options(WithDepth, {"depth": 0})


def test_a_commands_table_lists_every_option_with_its_default():
    table = option_table("fit-head")
    assert "| `--lr` | 0.03 | linear: Adam learning rate (in (0, 10]) |" in table
    assert "| `--refit` / `--no-refit` | on |" in table and "| `--json` |" in table
    assert len(table.splitlines()) == 2 + len(cli.commands["fit-head"].params)


def test_fit_head_help_says_auto_is_the_stack_it_fits():
    """--help said auto was 'the exact RBF SVM or logistic regression' (one of the two) after the default had
    become their stack: it names the members commands.md names."""
    out = " ".join(CliRunner().invoke(cli, ["fit-head", "--help"]).output.split())
    assert "auto: exact RBF SVMs (one-vs-rest and SVC's one-vs-one) and logistic regression stacked" in out


def test_messages_name_options_as_their_caller_writes_them():
    """Deep messages said the command line's '--weights PATH', '--n 800', '--cache-dir' to Python callers too,
    who pass weights=, n=, cache_dir=; each helper gives the caller's spelling (the CLI sets cli_terms)."""
    cases = [(lambda: config.option_text("weights", config.Placeholder("PATH")), "weights=PATH", "--weights PATH"),
             (lambda: config.option_text("n", 800), "n=800", "--n 800"),
             (lambda: config.option_value("test_data", "t d"), "test_data='t d'", "--test-data 't d'"),
             (lambda: config.option_named("--cache-dir's folder"), "cache_dir's folder", "--cache-dir's folder"),
             (lambda: config.option_named("the checked folder"), "the checked folder", "the checked folder"),
             (lambda: config.flag_text("overwrite"), "overwrite=True", "--overwrite")]
    for said, python, command_line in cases:
        assert said() == python
        with config.cli_terms():
            assert said() == command_line
