"""The ledger: round trip, sorting and filters, damaged lines, concurrent appends, CLI wiring."""
from __future__ import annotations

import json
import multiprocessing
import os
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline import cli
from pipeline.reports.present import runs_table
from pipeline.runs.ledger import append_run, ledger_path, read_runs


def _add(runs, kind="fit-head", fp="aaaa1111", backbone="vgg16", **metrics):
    return append_run(runs, kind, command=f"python cli.py {kind}", cache_fingerprint=fp, backbone=backbone,
                      params={"lr": 0.01}, metrics=metrics, outputs=[f"{runs}/x/head.pt"])


def test_round_trip_newest_first(tmp_path):
    first = _add(tmp_path, val_acc=0.8, val_loss=0.5)
    second = _add(tmp_path, kind="compare-sklearn", fp="bbbb2222", backbone="resnet18", val_acc=0.9, val_loss=0.7)
    runs = read_runs(tmp_path)
    assert runs == [second, first]
    assert runs[1]["params"] == {"lr": 0.01} and runs[1]["outputs"] == [f"{tmp_path}/x/head.pt"]
    assert set(first) >= {"time", "kind", "command", "cache_fingerprint", "backbone", "params", "metrics", "outputs"}


def test_filters_matching_nothing_say_so_rather_than_that_there_are_no_runs(tmp_path):
    _add(tmp_path, val_acc=0.8)
    res = CliRunner().invoke(cli.cli, ["runs", "--runs-dir", str(tmp_path), "--backbone", "resnet50"])
    assert res.exit_code == 0 and res.stdout.strip() == f"no runs in {ledger_path(tmp_path)} match --backbone resnet50"
    res = CliRunner().invoke(cli.cli, ["runs", "--runs-dir", str(tmp_path), "--cache", "zz", "--backbone", "vgg16"])
    assert res.stdout.strip().endswith("match --cache zz and --backbone vgg16")


def test_sorting_by_a_metric_no_run_has_as_a_number_names_only_numeric_ones(tmp_path):
    """A hand-edited val_acc of 'high' (or true) was listed as known while refused: 'no run has the metric
    'val_acc'; known metrics: val_acc'."""
    _add(tmp_path, val_acc="high", val_loss=True, accuracy=0.5)
    with pytest.raises(ValueError, match="no run has the metric 'val_acc'; known metrics: accuracy$"):
        read_runs(tmp_path, sort_by="val_acc")
    with pytest.raises(ValueError, match="no run has the metric 'val_loss'"):
        read_runs(tmp_path, sort_by="val_loss")


def test_sorting_by_an_empty_metric_name_is_refused_naming_the_known_ones(tmp_path):
    """runs --sort '' (an unset $METRIC) listed the runs newest first, as if no --sort had been given."""
    _add(tmp_path, val_acc=0.8)
    res = CliRunner().invoke(cli.cli, ["runs", "--runs-dir", str(tmp_path), "--sort", ""])
    assert res.exit_code == 2 and res.output.strip() == "Error: no run has the metric ''; known metrics: val_acc"


def test_sort_and_filters(tmp_path):
    _add(tmp_path, val_acc=0.8, val_loss=0.3)
    _add(tmp_path, fp="bbbb2222", backbone="resnet18", val_acc=0.95, val_loss=0.6)
    _add(tmp_path, val_acc=0.9, val_loss=0.1)
    _add(tmp_path, kind="evaluate", accuracy=0.7)
    assert [r["metrics"].get("val_acc") for r in read_runs(tmp_path, sort_by="val_acc")] == [0.95, 0.9, 0.8, None]
    assert [r["metrics"].get("val_loss") for r in read_runs(tmp_path, sort_by="val_loss")][:3] == [0.1, 0.3, 0.6]
    assert [r["backbone"] for r in read_runs(tmp_path, backbone="resnet18")] == ["resnet18"]
    assert len(read_runs(tmp_path, cache="aaaa")) == 3
    with pytest.raises(ValueError, match="known metrics: accuracy, val_acc, val_loss"):
        read_runs(tmp_path, sort_by="f1")
    table = runs_table(read_runs(tmp_path, sort_by="val_acc"), "val_acc")
    assert table.splitlines()[2].split()[-3] == "val_acc=0.95"


def test_calibration_errors_sort_lowest_first(tmp_path):
    """--sort ece (evaluate) and test_ece (fit-head --test-data) listed the worst-calibrated run first."""
    _add(tmp_path, ece=0.01, test_ece=0.2, test_ece_uncalibrated=0.3)
    _add(tmp_path, ece=0.2, test_ece=0.01, test_ece_uncalibrated=0.02)
    for metric in ("ece", "test_ece", "test_ece_uncalibrated"):
        values = [r["metrics"][metric] for r in read_runs(tmp_path, sort_by=metric)]
        assert values == sorted(values), metric


def test_damaged_last_line_is_skipped_and_not_glued_to(tmp_path, caplog):
    """The warning said only 'line 2 is damaged and skipped': now also what is lost and that it may go."""
    _add(tmp_path, val_acc=0.5)
    with open(ledger_path(tmp_path), "a") as f:
        f.write('{"kind": "fit-head", "metr')  # a writer killed mid-line
    assert len(read_runs(tmp_path)) == 1
    (said,) = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert said.startswith(f"{ledger_path(tmp_path)} line 2 is damaged and skipped (") and "\n" not in said
    assert said.endswith("that run's record is lost (its run folder is not); delete the line to stop this warning")
    _add(tmp_path, val_acc=0.6)
    assert [r["metrics"]["val_acc"] for r in read_runs(tmp_path)] == [0.6, 0.5]


def test_a_full_disk_leaves_no_half_line_and_names_the_ledger(tmp_path, monkeypatch):
    """A line cut short by a full disk stayed in the ledger ('short write', an 'unexpected OSError ... (a bug?)'
    naming no file); now it is taken back and the one line names the ledger, no space left (exit 1)."""
    from pipeline.errors import DiskFull
    from pipeline.runs import ledger

    _add(tmp_path, val_acc=0.5)
    before = ledger_path(tmp_path).read_bytes()
    real_write = os.write

    def full(fd, data):
        return real_write(fd, data[:100])  # what the disk had room for

    monkeypatch.setattr(ledger.os, "write", full)
    with pytest.raises(DiskFull, match=r"cannot write .*ledger\.jsonl: no space left on the device"):
        _add(tmp_path, val_acc=0.6)
    monkeypatch.undo()
    assert ledger_path(tmp_path).read_bytes() == before
    _add(tmp_path, val_acc=0.7)
    assert [r["metrics"]["val_acc"] for r in read_runs(tmp_path)] == [0.7, 0.5]


def _append_many(args):
    runs, worker, count = args
    for i in range(count):
        append_run(runs, "fit-head", command="x", cache_fingerprint="f", backbone="b",
                   params={"worker": worker, "i": i, "pad": "x" * 20000}, metrics={"val_acc": i / count},
                   outputs=[])


def test_concurrent_appends_never_interleave(tmp_path):
    workers, count = 4, 40
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        pool.map(_append_many, [(str(tmp_path), w, count) for w in range(workers)])
    lines = ledger_path(tmp_path).read_text().splitlines()
    assert len(lines) == workers * count
    seen = {(r["params"]["worker"], r["params"]["i"]) for r in map(json.loads, lines)}
    assert seen == {(w, i) for w in range(workers) for i in range(count)}


def test_runs_command_shows_fit_head_and_compare(tmp_path, tiny_cache):
    runs = str(tmp_path / "runs")
    runner = CliRunner()
    fit = runner.invoke(cli.cli, ["fit-head", "--cache", str(tiny_cache), "--epochs", "2", "--runs-dir", runs,
                                  "--json"])
    assert fit.exit_code == 0, fit.output
    cmp = runner.invoke(cli.cli, ["compare-sklearn", "--cache", str(tiny_cache), "--epochs", "2", "--runs-dir", runs])
    assert cmp.exit_code == 0, cmp.output
    out = runner.invoke(cli.cli, ["runs", "--runs-dir", runs, "--json"])
    records = json.loads(out.stdout)["runs"]
    # compare-sklearn records the four heads it fits (auto, linear, logreg, kernel), then itself
    assert [r["kind"] for r in records] == ["compare-sklearn"] + ["fit-head"] * 5  # newest first: the first fit last
    # which command made each: compare-sklearn's heads read as fit-head's own runs
    assert [r.get("part_of") for r in records] == [None] + ["compare-sklearn"] * 4 + [None]
    assert records[5]["metrics"]["val_acc"] == json.loads(fit.stdout)["val_acc"]
    assert "sklearn_val_acc" in records[0]["metrics"] and records[0]["backbone"] == "tiny"
    assert records[5]["outputs"][0].endswith("head.pt")
    assert records[0]["outputs"] == [str(Path(r["outputs"][0]).parent) for r in records[1:5][::-1]]
    table = runner.invoke(cli.cli, ["runs", "--runs-dir", runs, "--sort", "val_acc", "--backbone", "tiny"]).stdout
    kinds = [line.split("  ")[1].strip() for line in table.splitlines()[2:]]
    assert sorted(kinds) == ["compare-sklearn", "fit-head"] + ["fit-head (compare-sklearn)"] * 4 and "val_acc=" in table
    bad = runner.invoke(cli.cli, ["runs", "--runs-dir", runs, "--sort", "nope"])
    assert bad.exit_code == 2 and "known metrics" in bad.stderr


@pytest.mark.parametrize("line", ['{"kind": 5}', '{"metrics": [1, 2]}', '{"outputs": "x"}', '[1]', '{"time": null}'])
def test_a_line_of_wrong_types_is_skipped_with_a_warning(tmp_path, caplog, line):
    _add(tmp_path, val_acc=0.5)
    with open(ledger_path(tmp_path), "a") as f:
        f.write(line + "\n")
    _add(tmp_path, val_acc=0.6)
    runs = read_runs(tmp_path, sort_by="val_acc")
    assert [r["metrics"]["val_acc"] for r in runs] == [0.6, 0.5]
    assert "line 2 is damaged and skipped" in caplog.text
    assert "val_acc=0.6" in runs_table(runs, "val_acc")
    res = CliRunner().invoke(cli.cli, ["runs", "--runs-dir", str(tmp_path)])
    assert res.exit_code == 0 and "val_acc=0.5" in res.stdout


def test_runs_table_takes_odd_outputs(tmp_path):
    assert "7" in runs_table([{"kind": "x", "outputs": [7]}])


def test_a_line_without_time_or_kind_shows_a_question_mark_not_a_blank_row(tmp_path):
    """A line added by hand or another tool ('{"metrics": {"val_acc": 0.9}}') is a record the ledger takes (its
    fields are checked when present): its row was blank but for the metric, its time and kind empty."""
    _add(tmp_path, val_acc=0.5)
    with open(ledger_path(tmp_path), "a") as f:
        f.write('{"metrics": {"val_acc": 0.9}}\n{}\n')
    res = CliRunner().invoke(cli.cli, ["runs", "--runs-dir", str(tmp_path)])
    rows = [line.split() for line in res.stdout.splitlines()[2:]]
    assert res.exit_code == 0 and rows[0] == ["?", "?"] and rows[1] == ["?", "?", "val_acc=0.9"], res.stdout
    assert rows[2][2] == "fit-head" and "damaged" not in res.stderr


def test_runs_dir_that_is_a_file_is_a_usage_error(tmp_path):
    (tmp_path / "runs").write_text("x")
    with pytest.raises(ValueError, match="^runs_dir '.*runs' must be a folder"):
        _add(tmp_path / "runs", val_acc=0.5)
    res = CliRunner().invoke(cli.cli, ["runs", "--runs-dir", str(tmp_path / "runs")])
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1 and "must be a folder" in res.output


def test_current_command_under_torchrun_is_torchruns_so_the_resume_uses_the_shards(monkeypatch):
    """Printed 'python cli.py extract ...' under torchrun: one process, a new cache, the shards' rows unused."""
    from pipeline.runs.ledger import current_command

    monkeypatch.setattr(sys, "argv", ["cli.py", "extract", "-n", "100"])
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert current_command() == "torchrun --nproc_per_node=4 cli.py extract -n 100"
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert current_command() == "torchrun --nnodes=2 --nproc_per_node=4 cli.py extract -n 100"
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    assert current_command() == f"{os.path.basename(sys.executable)} cli.py extract -n 100"


def test_current_command_names_the_installed_script_itself_not_python_and_its_path(tmp_path, monkeypatch):
    """'python /venv/bin/transfer-pipeline extract ...' failed where 'python' is not the venv's interpreter."""
    from pipeline.runs.ledger import current_command

    script = tmp_path / "bin" / "transfer-pipeline"
    script.parent.mkdir()
    script.write_text("#!/usr/bin/env python\n")
    script.chmod(0o755)
    monkeypatch.setattr(sys, "argv", [str(script), "extract", "--data", "my photos"])
    monkeypatch.setenv("PATH", "/nonexistent")
    assert current_command() == f"{script} extract --data 'my photos'"
    monkeypatch.setenv("PATH", str(script.parent))
    assert current_command() == "transfer-pipeline extract --data 'my photos'"


def test_a_folder_that_is_not_there_is_named_not_listed_as_empty(tmp_path, monkeypatch):
    """runs --runs-dir runz (a typo) said 'no runs in runz/ledger.jsonl', and pipeline.list_runs('runz') and
    list_caches('featurs') were empty lists, as if the folder held nothing: a usage error naming the path now. An
    empty folder, and the default folder before the first run, still list nothing and say so."""
    import pipeline

    monkeypatch.chdir(tmp_path)
    for args, option in ((["runs", "--runs-dir", "runz"], "--runs-dir 'runz'"),
                         (["caches", "--cache-dir", "featurs"], "--cache-dir 'featurs'")):
        res = CliRunner().invoke(cli.cli, args)
        assert res.exit_code == 2 and res.output == f"Error: {option} does not exist\n"
    with pytest.raises(ValueError, match=r"^runs_dir 'runz' does not exist$"):
        pipeline.list_runs("runz")
    with pytest.raises(ValueError, match=r"^cache_dir 'featurs' does not exist$"):
        pipeline.list_caches(Path("featurs"))
    assert list(pipeline.list_runs()) == [] and list(pipeline.list_caches()) == []  # runs/, features/ not made yet
    (tmp_path / "empty").mkdir()
    assert list(pipeline.list_runs("empty")) == [] and list(pipeline.list_caches("empty")) == []
    assert CliRunner().invoke(cli.cli, ["runs"]).stdout == f"no runs in {ledger_path('runs')}\n"
    assert CliRunner().invoke(cli.cli, ["caches", "--cache-dir", "empty"]).stdout == "no caches in empty\n"
