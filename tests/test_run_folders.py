"""Run folders: one fresh folder per run, even for runs started together; none left empty by a kill."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from pipeline.config import FitHeadConfig
from pipeline.heads.fit_head import fit_head
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


def test_a_fit_head_killed_while_writing_head_pt_leaves_no_run_folder(tmp_path, tiny_cache):
    """kill -9 between making runs/<stamp>-fit-head and writing its head.pt left that folder, empty (but for the
    killed save's temporary file), for good: no ledger line, no head. The folder now appears with its head.pt;
    the kill leaves a hidden folder, which the next run into the same --runs-dir removes."""
    from pipeline.files import temporary_name
    from pipeline.heads import fit_head as fit_module

    runs = tmp_path / "runs"

    def killed(path, kind, fields):
        temporary_name(path).write_bytes(b"PK" * 100)  # torch.save part-way
        os.kill(os.getpid(), signal.SIGKILL)

    assert _in_a_killed_child(lambda: (setattr(fit_module, "write_checkpoint", killed),
                                       fit_head(FitHeadConfig(cache=str(tiny_cache), runs_dir=str(runs), epochs=1))))
    assert [p.name for p in runs.iterdir() if not p.name.startswith(".")] == []  # was ['<stamp>-fit-head']
    result = fit_head(FitHeadConfig(cache=str(tiny_cache), runs_dir=str(runs), epochs=1))
    assert sorted(p.name for p in runs.iterdir()) == sorted([Path(result.run_dir).name, "ledger.jsonl"])
    assert "head.pt" in os.listdir(result.run_dir)


def _in_a_killed_child(work) -> bool:
    """Whether ``work()``, run in a forked process (one thread, as a DataLoader worker), ended by SIGKILL."""
    import torch

    pid = os.fork()
    if pid == 0:  # the child: ends however work() does, never returning into pytest
        try:
            torch.set_num_threads(1)
            work()
        finally:
            os._exit(3)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return False


def test_a_staged_run_folder_is_removed_only_once_its_process_is_gone(tmp_path, monkeypatch):
    """The hidden folders of this machine's dead processes go, a live process's or another machine's stays;
    publishing never takes a name in use."""
    monkeypatch.setattr(run_folders.time, "strftime", lambda fmt: "20261206-031500")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = run_folders._host()
    dead = tmp_path / f".20261206-031400-train.1.{host}.{int(gone.stdout)}.tmp"
    live = tmp_path / f".20261206-031400-train.1.{host}.{os.getppid()}.tmp"
    elsewhere = tmp_path / f".20261206-031400-train.1.other-machine.{int(gone.stdout)}.tmp"  # a shared --runs-dir
    for d in (dead, live, elsewhere):
        d.mkdir()
        (d / ".model.pt.1.tmp").write_bytes(b"x")
    (tmp_path / "20261206-031500-train").mkdir()  # an empty folder (an older version's killed run): not replaced
    staged = run_folders.staged_run_dir(str(tmp_path), "train")
    assert not dead.exists() and live.exists() and elsewhere.exists() and run_folders.is_staged(staged)
    (staged / "model.pt").write_bytes(b"x")
    published = run_folders.publish_run_dir(staged)
    assert published == tmp_path / "20261206-031500-train-2" and (published / "model.pt").is_file()
    assert not staged.exists() and not run_folders.is_staged(published)
