"""The CLI end to end through click's CliRunner, and its one-line usage errors (exit code 2)."""
import json

import h5py
import pytest
import torch
from click.testing import CliRunner

from pipeline.cli import cli
from pipeline.extraction.backbones import load_backbone
from tests.conftest import make_image_folder

TINY = ["--backbone", "tiny", "--weights", "none", "--workers", "0"]


@pytest.fixture
def run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # features/ and runs/ land in tmp_path

    def invoke(*args):
        return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)

    return invoke


def test_flip_is_off_unless_asked_for(run, tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=4)
    torch.save(load_backbone("tiny", "none").model.state_dict(), tmp_path / "tiny.pt")
    common = ("extract", "--data", data, "--n", 0, "--backbone", "tiny", "--weights", tmp_path / "tiny.pt",
              "--workers", 0, "--json")
    default, on, off = run(*common), run(*common, "--flip"), run(*common, "--no-flip")
    assert default.exit_code == on.exit_code == off.exit_code == 0, default.output + on.output + off.output
    assert [json.loads(r.stdout)["flip"] for r in (default, on, off)] == [False, True, False]
    assert json.loads(off.stdout)["hit"] and json.loads(off.stdout)["cache"] == json.loads(default.stdout)["cache"]
    assert "flip: each map is the mean of the photo's and its mirror image's" in on.stderr
    assert "flip:" not in default.stderr


def test_extract_fit_head_compare_and_caches(run, tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=16)
    r = run("extract", "--data", data, "--n", 24, *TINY)
    assert r.exit_code == 0, r.output
    path = r.stdout.strip()
    assert path.startswith("features/tiny-n24-") and path.endswith(".h5")
    again = run("extract", "--data", data, "--n", 24, *TINY, "--json")
    assert json.loads(again.stdout)["hit"] is True and "cache hit" in again.stderr
    r = run("fit-head", "--head", "linear", "--epochs", 3, "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["val_acc"] == 1.0 and out["train_rows"] + out["val_rows"] == 24
    assert r.stderr.count("Epoch ") == 3
    # the cache picked by default is named, on stderr and in the JSON
    assert f"using the newest cache {path} (24 rows, tiny, created " in r.stderr
    assert out["default_cache"]["path"] == path and out["default_cache"]["rows"] == 24
    assert json.loads(run("fit-head", "--epochs", 1, "--cache", path, "--json").stdout)["default_cache"] is None
    r = run("compare-sklearn", "--epochs", 2)
    assert r.exit_code == 0 and "sklearn LogisticRegression" in r.stdout
    assert f"using the newest cache {path}" in r.stderr
    r = run("caches", "--json")
    listed = json.loads(r.stdout)["caches"]
    assert len(listed) == 1 and listed[0]["rows"] == 24 and listed[0]["classes"] == ["blue", "red"]
    assert "tiny" in run("caches").stdout


@pytest.mark.parametrize("args, message", [
    (["extract", "--data", "nowhere"], "does not exist"),
    (["extract", "--n", "-1"], "--n must be 0"),
    (["extract", "--n", "99"], "more than the 24 images"),
    (["extract", "--backbone", "alexnet9"], "unknown --backbone 'alexnet9': neither torchvision nor timm"),
    (["extract", "--backbone", "tiny", "--weights", "missing.pt"], "does not exist"),
    (["fit-head", "--cache", "missing.h5"], "does not exist"),
    (["fit-head"], "no complete feature cache"),
    (["compare-sklearn", "--cache", "foreign.h5"], "not a feature cache"),
    (["fit-head", "--cache", "junk.h5"], "not an HDF5 file"),
    (["fit-head", "--cache", "missing.h5", "--val-fraction", "2"], "--val-fraction"),
    (["extract", "--data", "empty"], "holds no images"),
    (["extract", "--n", "4", "--backbone", "vgg16", "--weights", "tiny.pt"], "not for vgg16"),
    (["fit-head", "--cache", "damaged.h5"], "cannot be read as a feature cache"),
    (["extract", "--cache-dir", "junk.h5", *TINY], "--cache-dir 'junk.h5' must be a folder"),
    (["fit-head", "--cache", "c2.h5", "--runs-dir", "junk.h5/runs"], "--runs-dir 'junk.h5/runs' must be a folder"),
    (["extract", "--weights", "listed.pt", "--backbone", "tiny", "--n", 4], "must hold a JSON object, not a list"),
    (["extract", "--seed", "99999999999999999999", *TINY], "--seed must be between 0 and 4294967295"),
    (["fit-head", "--seed", "-1", "--cache", "c2.h5"], "--seed must be between 0 and 4294967295"),
    (["extract", "--weights", "nan.pt", "--backbone", "tiny", "--n", 4], "'mean' must be a list of 3 finite numbers"),
    (["fit-head", "--lr", "nan", "--cache", "c2.h5"], "'nan' is not a finite number"),
    (["fit-head", "--lr", "inf", "--cache", "c2.h5"], "'inf' is not a finite number"),
    (["compare-sklearn", "--C", "-inf", "--cache", "c2.h5"], "'-inf' is not a finite number"),
    # click kept the last of an option given twice: compare-sklearn then compared c2.h5 alone, without a word
    (["compare-sklearn", "--cache", "foreign.h5", "--cache", "c2.h5"], "--cache given 2 times; it takes one value"),
    (["extract", "--flip", "--no-flip", *TINY], "--flip/--no-flip given 2 times; it takes one value"),
    (["fit-head", "--cache", "missing.h5", "--cache", "c2.h5"], "does not exist"),  # fit-head fuses several
    # cli.py's own options after a command were "No such option '-q'", whatever the docs' "predict -q" meant
    (["predict", "x.jpg", "-q"], "-q goes before the command: python cli.py -q predict ..."),
    (["fit-head", "--verbose"], "--verbose goes before the command: python cli.py --verbose fit-head ..."),
])
def test_errors_are_one_line_with_exit_code_2(run, tmp_path, make_cache, args, message):
    make_image_folder(tmp_path / "data" / "PetImages", per_class=12)
    with h5py.File(tmp_path / "foreign.h5", "w") as f:
        f["x"] = [1]
    (tmp_path / "junk.h5").write_text("junk")
    (tmp_path / "empty" / "a").mkdir(parents=True)
    torch.save(load_backbone("tiny", "none").model.state_dict(), tmp_path / "tiny.pt")
    data = make_image_folder(tmp_path / "d2", per_class=2)
    cache = make_cache(data, cache_dir=str(tmp_path / "c2")).cache
    raw = open(cache, "rb").read()
    (tmp_path / "damaged.h5").write_bytes(raw[: len(raw) // 2])  # a real cache, cut off halfway
    (tmp_path / "c2.h5").write_bytes(raw)
    (tmp_path / "listed.pt").write_bytes((tmp_path / "tiny.pt").read_bytes())
    (tmp_path / "listed.json").write_text("[0.5, 0.5, 0.5]")
    (tmp_path / "nan.pt").write_bytes((tmp_path / "tiny.pt").read_bytes())
    (tmp_path / "nan.json").write_text('{"mean": [NaN, 0, 0], "std": [1, 1, 1]}')
    r = run(*args)
    assert r.exit_code == 2, r.output
    err = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("Error: ") and message in err[0], r.stderr
    assert "Traceback" not in r.output


def test_a_single_class_folder_is_a_usage_error(run, tmp_path):
    make_image_folder(tmp_path / "one", classes=("red",))
    r = run("extract", "--data", tmp_path / "one", *TINY)
    assert r.exit_code == 2 and "need at least two class sub-folders" in r.stderr


def test_a_link_or_pipe_in_the_data_folder_is_skipped_with_its_reason(run, tmp_path):
    from tests.fsfaults import make_non_regular

    data = make_image_folder(tmp_path / "data", per_class=6)
    expected = make_non_regular(data / "red")
    r = run("extract", "--data", data, "--n", 0, *TINY, "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["rows"] == 12 and out["skipped"] == 3
    from pipeline.cache.feature_cache import read_skipped

    reasons = dict(read_skipped(out["cache"]))
    for name, why in expected.items():
        assert why in reasons[f"red/{name}"]
    assert run("fit-head", "--cache", out["cache"], "--epochs", 1).exit_code == 0  # the freshness check copes


def test_a_diverging_fit_exits_1_and_saves_nothing(run, tmp_path, make_cache):
    cache = make_cache(make_image_folder(tmp_path / "data", per_class=8), dtype="float32").cache
    with h5py.File(cache, "a") as f:
        f["features"][3] = float("nan")  # one hand-edited row
    r = run("fit-head", "--cache", cache, "--head", "linear", "--runs-dir", tmp_path / "runs", "--epochs", 2)
    assert r.exit_code == 2 and "cache rows hold non-finite features" in r.stderr  # refused where rows are read
    r = run("fit-head", "--cache", cache, "--head", "linear", "--features", "flat", "--runs-dir", tmp_path / "runs",
            "--epochs", 2)  # the flat view streams: the NaN reaches the loss
    assert r.exit_code == 1 and ("training diverged: the loss became nan" in r.stderr
                                 or "validation loss is nan" in r.stderr)
    assert not list((tmp_path / "runs").glob("*/head.pt"))


def test_json_output_is_always_valid_json_nan_and_infinity_as_null(capsys):
    from pipeline.cli import emit

    emit({"val_loss": float("nan"), "history": [{"loss": float("inf")}], "ok": 1.5}, True, "")
    assert json.loads(capsys.readouterr().out) == {"val_loss": None, "history": [{"loss": None}], "ok": 1.5}


def test_ctrl_c_in_any_command_is_exit_130_not_the_code_of_a_failed_environment(tmp_path, monkeypatch):
    from pipeline import api

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(api, "list_caches", ctrl_c)
    r = CliRunner().invoke(cli, ["caches", "--cache-dir", str(tmp_path)])
    assert r.exit_code == 130 and r.stderr.strip() == "interrupted" and "Aborted" not in r.output


def test_a_no_flag_switched_off_by_default_says_so():
    """`--no-scale` (scaling on, the flag off by default) showed '[default: True]' in --help and 'on' in
    docs/commands.md: read as 'no scaling by default', the opposite of what compare-sklearn does."""
    from pipeline.cli import option_table

    help_text = CliRunner().invoke(cli, ["compare-sklearn", "--help"]).output
    block = help_text[help_text.index("--no-scale"):help_text.index("--val-fraction")]
    assert "default" not in block
    row = next(line for line in option_table("compare-sklearn").splitlines() if "`--no-scale`" in line)
    assert row.split("|")[2].strip() == "off"
    refit = next(line for line in option_table("fit-head").splitlines() if "`--refit`" in line)
    assert refit.split("|")[2].strip() == "on"


@pytest.mark.parametrize("args", [["extract", "--data", ""], ["extract", "--cache-dir", ""],
                                  ["fit-head", "--runs-dir", ""], ["runs", "--runs-dir", ""],
                                  ["evaluate", "--data", "", "--model", "m.pt"]])
def test_an_empty_folder_name_is_refused_not_taken_for_the_working_folder(tmp_path, monkeypatch, args):
    """``--runs-dir "$RUNS"`` with RUNS unset wrote the runs into the working folder, ``--data ''`` listed it."""
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 2 and "'' is an empty name; give a folder" in r.stderr, r.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args", [["extract", "--calib-data", ""], ["extract", "--shard-dir", ""],
                                  ["audit", "--test-data", ""], ["suggest", "--pool", ""]])
def test_an_empty_name_of_a_folder_option_whose_default_is_none_given_is_refused(tmp_path, monkeypatch, args):
    """``--calib-data "$CALIB"`` with CALIB unset calibrated on --data, ``--shard-dir ''`` put the shards beside
    the cache and ``audit --test-data ''`` audited no test folder, each exiting 0 as if the option were not given
    (its default is ''); ``suggest --pool ''`` said only that it needs --pool. Now refused as --data '' is, naming
    the option; left out, each is still not given."""
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(cli, [*args, "--data", "d"])
    assert r.exit_code == 2 and f"Invalid value for '{args[1]}': '' is an empty name; give a folder" in r.stderr, \
        r.output
    assert list(tmp_path.iterdir()) == []
    seen = {}  # the config the stage gets (the CLI passes None, not given, which the API takes for '')
    monkeypatch.setattr("pipeline.extraction.extract.extract", lambda cfg: seen.update(vars(cfg)) or 1 / 0)
    CliRunner().invoke(cli, ["extract", "--data", "d"])
    assert seen["calib_data"] == "" and seen["shard_dir"] == ""


@pytest.mark.parametrize("args, hint", [
    (["predict", "-dash/x.jpg", "--model", "m.pt"], "; for a file named '-dash/x.jpg', put -- before it: "
                                                    "python cli.py predict --model m.pt -- -dash/x.jpg"),
    (["predict", "a.jpg", "--output=-o.csv", "-x.png"], "put -- before it: python cli.py predict a.jpg "
                                                        "--output=-o.csv -- -x.png"),
    (["predict", "-a.jpg", "--model", "m.pt", "--", "-b.jpg"], "put -- before it: python cli.py predict --model m.pt "
                                                                "-- -a.jpg -b.jpg"),  # was '... -b.jpg -- -a.jpg'
    (["predict", "-z"], None),  # no file's name: click's words alone
    (["fit-head", "-x.jpg"], None),  # a command that takes no files
])
def test_a_photo_named_with_a_leading_dash_is_hinted_to_follow_a_double_dash(run, args, hint):
    """'predict -dash/x.jpg' was "No such option '-d'" with no word of how to give such a file."""
    r = run(*args)
    err = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.exit_code == 2 and len(err) == 1 and "No such option" in err[0], r.stderr
    assert (hint in err[0]) if hint else "put -- before it" not in err[0], err[0]
