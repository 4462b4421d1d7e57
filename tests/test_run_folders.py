"""Run folders: one fresh folder per run, even for runs started together."""
from __future__ import annotations

from pathlib import Path

from pipeline.runs import run_folders


def test_runs_started_in_the_same_second_each_get_their_own_folder(tmp_path, monkeypatch):
    """Two evaluates into one --runs-dir in the same second: both saw <stamp>-evaluate free, the second's mkdir
    then failed ("unexpected FileExistsError", 4 rounds of 20 with 4 processes); now it takes the next suffix."""
    monkeypatch.setattr(run_folders.time, "strftime", lambda fmt: "20261206-031500")
    taken = tmp_path / "20261206-031500-evaluate"
    real_exists = Path.exists
    # the other run makes the folder just after this one looked: the check says free, the folder is there
    monkeypatch.setattr(Path, "exists", lambda p: False if p == taken else real_exists(p))
    taken.mkdir()
    got = run_folders.new_run_dir(str(tmp_path), "evaluate")
    assert got == tmp_path / "20261206-031500-evaluate-2" and got.is_dir()
