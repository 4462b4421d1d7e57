"""Safe writes: whole or not at all, and a full or read-only disk as one line (exit 1), resumable."""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.cache import feature_cache as cache_mod
from pipeline.cli import cli
from pipeline.config import cli_terms
from pipeline.errors import DiskFull, UsageError
from pipeline.files import atomic_write, check_output, disk_error, writing
from tests.conftest import ROOT, make_image_folder

TINY = ["--backbone", "tiny", "--weights", "none", "--workers", "0", "--dtype", "float32", "--batch-size", "4"]


def test_atomic_write_leaves_the_old_file_or_the_new_one_never_half(tmp_path):
    out = tmp_path / "rows.csv"
    out.write_text("old\n")

    def fails(tmp):
        tmp.write_text("half of the new")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DiskFull, match=r"rows.csv: no space left on the device"):
        atomic_write(out, fails)
    assert out.read_text() == "old\n" and os.listdir(tmp_path) == ["rows.csv"]  # no temporary file left
    atomic_write(out, lambda tmp: tmp.write_text("new\n"))
    assert out.read_text() == "new\n"


def test_an_output_with_the_longest_name_a_file_may_have_is_written(tmp_path):
    """predict --output NAME.csv, its name 252 characters (a file may have 255): the temporary '.NAME.PID.tmp' beside
    it was longer than that, and the run failed as 'unexpected OSError: [Errno 36] File name too long (a bug?)'."""
    out = tmp_path / ("o" * 248 + ".csv")
    atomic_write(out, lambda tmp: tmp.write_text("new\n"))
    assert out.read_text() == "new\n" and os.listdir(tmp_path) == [out.name]

    def fails(tmp):
        tmp.write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DiskFull):  # the temporary file goes however the write ends
        atomic_write(out, fails)
    assert out.read_text() == "new\n" and os.listdir(tmp_path) == [out.name]


def test_sigterm_mid_write_leaves_no_temporary_file(tmp_path):
    out, ready = tmp_path / "rows.csv", tmp_path / "ready"
    out.write_text("old\n")
    script = (
        "import pathlib, sys, time\n"
        "from pipeline.files import atomic_write\n"
        "def slow(tmp):\n"
        "    tmp.write_text('half of the new')\n"
        f"    pathlib.Path({str(ready)!r}).touch()\n"
        "    time.sleep(60)\n"
        f"atomic_write({str(out)!r}, slow)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT)
    deadline = time.monotonic() + 60
    while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ready.exists(), "the child never started writing"
    proc.terminate()  # SIGTERM
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    assert sorted(os.listdir(tmp_path)) == ["ready", "rows.csv"] and out.read_text() == "old\n"


def test_a_killed_writers_temporary_file_is_removed_by_the_next_write_a_live_ones_kept(tmp_path):
    """kill -9 mid-write leaves '.NAME.PID.tmp' (no handler runs): nothing removed it, one more per killed run (a
    checkpoint's as large as the model). The next write of the same output removes a dead process's; another live
    writer's stays."""
    out = tmp_path / "rows.csv"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / f".rows.csv.{int(dead.stdout)}.tmp").write_text("half of a killed run's")
        (tmp_path / f".rows.csv.{live.pid}.tmp").write_text("another writer, still writing")
        (tmp_path / ".other.csv.1.tmp").write_text("not this output's")
        atomic_write(out, lambda tmp: tmp.write_text("new\n"))
        assert sorted(os.listdir(tmp_path)) == [".other.csv.1.tmp", f".rows.csv.{live.pid}.tmp", "rows.csv"]
    finally:
        live.kill()
        live.wait()


def test_a_killed_writers_temporary_file_is_removed_whether_its_pid_made_its_name_long_or_not(tmp_path):
    """A name near the longest a file may have is written as '.NAME.PID.tmp' or, where that is too long, as
    '.DIGEST.PID.tmp': which one depends on how many digits the writer's PID has. A killed writer whose PID had one
    digit fewer left '.NAME.PID.tmp' for good: the next write looked for the '.DIGEST.' form alone."""
    from pipeline.files import NAME_MAX, process_alive, temporary_name

    digits = len(str(os.getpid()))
    if digits < 2:
        pytest.skip("this process's PID has one digit")
    name = "r" * (NAME_MAX - 9 - digits) + ".csv"  # '.NAME.PID.tmp' one byte too long for this PID, fits one shorter
    out = tmp_path / name
    assert temporary_name(out).name.startswith(f".{name[:5]}") is False
    dead = next(p for p in range(10 ** (digits - 2), 10 ** (digits - 1)) if p > 1 and not process_alive(p))
    killed = tmp_path / f".{name}.{dead}.tmp"
    assert len(os.fsencode(killed.name)) <= NAME_MAX
    killed.write_text("half of a killed run's")
    atomic_write(out, lambda tmp: tmp.write_text("new\n"))
    assert sorted(os.listdir(tmp_path)) == [name]


def test_a_failed_writes_files_are_closed_even_while_its_error_is_kept(tmp_path):
    """The one-line error of a full disk still led to the failed write's frames (as the exception it replaced): kept
    (a notebook's last error, CliRunner's result), it held their open files, here the deleted temporary file, whose
    room on the full disk was not given back, and a tmpfs filled by the tests could not be unmounted."""
    def full(tmp):
        f = open(tmp, "wb")  # held by the writer's frame, as torch.save's zip writer holds its file
        f.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DiskFull) as kept:
        atomic_write(tmp_path / "model.pt", full)
    held = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
            if os.path.islink(f"/proc/self/fd/{fd}")]
    assert not [f for f in held if str(tmp_path) in f], held
    assert str(kept.value) == f"cannot write {tmp_path / 'model.pt'}: no space left on the device"


@pytest.mark.parametrize("size", [10, 100_000])
def test_torch_save_onto_a_full_disk_is_one_line_naming_the_path(tmp_path, monkeypatch, size):
    """A train checkpoint saved onto a full disk: torch's writer loses the errno and says 'basic_ios::clear: iostream
    error' or '[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598': it was 'unexpected
    RuntimeError ... (a bug?)'. /dev/full fails every write with ENOSPC, as a full disk does."""
    import torch

    with pytest.raises(DiskFull, match=r"^cannot write /dev/full: the write failed \(a full disk\?\)$"):
        with writing("/dev/full"):
            torch.save({"w": torch.zeros(size)}, "/dev/full")
    out = tmp_path / "model.pt"
    out.write_bytes(b"the previous epoch's")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 << 20, 10 << 20, 4096))

    def full(tmp):
        tmp.write_bytes(b"half")
        torch.save({"w": torch.zeros(size)}, "/dev/full")  # torch's own error, as on a full disk

    with pytest.raises(DiskFull, match=rf"^cannot write {out}: no space left on the device$"):  # the disk says so
        atomic_write(out, full)
    assert out.read_bytes() == b"the previous epoch's" and os.listdir(tmp_path) == ["model.pt"]


@pytest.mark.parametrize("error, why", [
    (OSError(errno.ENOSPC, "No space left on device"), "no space left"),
    (OSError(errno.EROFS, "Read-only file system"), "read-only"),
    (PermissionError(errno.EACCES, "Permission denied"), "permission denied"),
    (RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file data/0: "
                  "file write failed"), "the write failed"),
])
def test_disk_errors_become_one_line(error, why):
    err = disk_error(error, "runs/x/head.pt")
    assert isinstance(err, DiskFull)
    assert str(err).startswith("cannot write runs/x/head.pt: ") and why in str(err)
    assert disk_error(ValueError("other"), "x") is None and disk_error(OSError(errno.ENOENT, "gone"), "x") is None


def test_writing_passes_other_errors_through():
    with pytest.raises(FileNotFoundError):
        with writing("x"):
            raise FileNotFoundError("gone")


def _refused(output, **reads) -> str:
    with pytest.raises(UsageError) as e:
        check_output(output, **reads)
    return str(e.value)


def test_the_output_guard_refuses_every_input_by_any_name_there_or_not(tmp_path):
    weights = tmp_path / "W" / "r18.pt"
    weights.parent.mkdir()
    weights.write_bytes(b"w")
    sidecar = weights.with_suffix(".json")  # not there yet: written, it would change the weights' preprocessing
    inputs = [(weights, "the backbone weights"), (sidecar, "the sidecar of the weights")]
    assert "is one of the inputs (the sidecar of the weights" in _refused(sidecar, inputs=inputs)
    assert "is one of the inputs" in _refused(tmp_path / "W" / ".." / "W" / "r18.pt", inputs=inputs)
    plain = _refused(weights, inputs=[weights])  # an input without a label (a photo) is named once, not twice
    assert plain == f"output {str(weights)!r} is one of the inputs ({weights}); it would be overwritten"  # Python's
    with cli_terms():  # the command line's
        assert _refused(weights, inputs=[weights]).startswith(f"--output {str(weights)!r} is one of the inputs")
    (tmp_path / "link.pt").symlink_to(weights)
    os.link(weights, tmp_path / "hard.pt")
    for name in ("link.pt", "hard.pt"):
        assert "the backbone weights" in _refused(tmp_path / name, inputs=inputs)
    assert not sidecar.exists() and weights.read_bytes() == b"w"
    assert check_output(tmp_path / "out" / "x.onnx", inputs=inputs) == tmp_path / "out" / "x.onnx"


def test_the_output_guard_keeps_outputs_out_of_data_folders_files_and_folders_alike(tmp_path):
    data = make_image_folder(tmp_path / "d", per_class=1)
    photos = [(data, "the head's training photos")]
    message = _refused(data / "blue" / "blue.0.jpg", data=photos)
    assert "is inside the data folder" in message and "(the head's training photos)" in message
    assert "is inside the data folder" in _refused(data / "blue" / "new", data=photos, folder=True, what="--runs-dir")
    assert _refused(data, data=photos, folder=True, what="--runs-dir").startswith("runs_dir ")
    assert "is the data folder" in _refused(data, data=photos, folder=True)
    (tmp_path / "alias").symlink_to(data, target_is_directory=True)
    assert "inside the data folder" in _refused(tmp_path / "alias" / "red" / "p.csv", data=photos)
    assert check_output(tmp_path / "runs", data=photos, folder=True) == tmp_path / "runs"
    assert not (tmp_path / "runs").exists()  # a folder output is made by its writer, when it writes
    assert "must be a folder" in _refused(data / "blue" / "blue.0.jpg", folder=True)


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="no /proc to write in")
@pytest.mark.parametrize("output, folder", [("/proc/nope", True), ("/proc/nope/deeper", True),
                                            ("/proc/nope/x.csv", False), ("/proc/x.csv", False)])
def test_an_output_where_nothing_can_be_written_is_refused_before_the_work(output, folder):
    """--runs-dir /proc/nope passed the guard (it is no data folder, and /proc is a folder): fit-head failed only
    when it made its run folder, after the whole fit, as 'unexpected FileNotFoundError (a bug?)'. A folder made
    in its nearest existing part, and removed, says now whether it can be written (root too: os.access says yes)."""
    with cli_terms(), pytest.raises(DiskFull, match=rf"^cannot write --runs-dir '{output}': nothing can be written in "
                                                    "'/proc' "):
        check_output(output, what="--runs-dir", folder=folder)
    assert check_output("/proc/nope", folder=True, written=False) == Path("/proc/nope")  # a folder only read from


def test_the_write_probe_leaves_nothing_behind(tmp_path):
    (tmp_path / "runs").mkdir()
    for output, folder in ((tmp_path / "runs", True), (tmp_path / "new" / "deeper", True),
                           (tmp_path / "runs" / "x.csv", False)):
        check_output(output, folder=folder)
    assert sorted(os.listdir(tmp_path)) == ["runs"] and os.listdir(tmp_path / "runs") == []


def _extract(tmp_path, data):
    return CliRunner().invoke(cli, ["extract", "--data", str(data), "--n", "0", *TINY,
                                    "--cache-dir", str(tmp_path / "f"), "--json"])


def test_extract_on_a_full_disk_exits_1_then_resumes_to_the_uninterrupted_cache(tmp_path, monkeypatch):
    """A fake disk that fills up after 3 committed batches (no root needed)."""
    data = make_image_folder(tmp_path / "data", per_class=12)
    whole = json.loads(CliRunner().invoke(cli, ["extract", "--data", str(data), "--n", "0", *TINY,
                                                "--cache-dir", str(tmp_path / "whole"), "--json"]).stdout)
    real, calls = shutil.disk_usage, []

    def filling(path):
        calls.append(path)
        usage = real(path)
        return usage._replace(free=0) if len(calls) > 3 else usage

    monkeypatch.setattr(cache_mod.shutil, "disk_usage", filling)
    r = _extract(tmp_path, data)
    assert r.exit_code == 1
    err = [line for line in r.stderr.splitlines() if line.startswith("Error")]
    assert len(err) == 1 and "no space left on the device" in err[0] and "run the same command again" in err[0]
    path = next((tmp_path / "f").glob("*.h5"))
    with h5py.File(path) as f:
        assert int(f.attrs["rows"]) == 12 and not f.attrs["complete"]
    monkeypatch.setattr(cache_mod.shutil, "disk_usage", real)
    again = json.loads(_extract(tmp_path, data).stdout)
    assert again["resumed_from"] == 12 and again["rows"] == 24
    with h5py.File(path) as f, h5py.File(whole["cache"]) as g:
        for name in ("features", "labels", "paths"):
            assert np.array_equal(f[name][:], g[name][:])


def test_fit_head_on_a_full_disk_exits_1_and_leaves_no_half_checkpoint(tmp_path, make_cache, monkeypatch):
    import torch

    cache = make_cache(make_image_folder(tmp_path / "data", per_class=6)).cache
    real_save = torch.save

    def full(obj, f, *a, **k):
        real_save(obj, f, *a, **k)  # a part is written ...
        raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")

    monkeypatch.setattr(torch, "save", full)
    r = CliRunner().invoke(cli, ["fit-head", "--cache", cache, "--epochs", "1", "--runs-dir", str(tmp_path / "runs")])
    assert r.exit_code == 1 and r.stderr.strip().splitlines()[-1].startswith("Error: cannot write ")
    assert "head.pt: the write failed" in r.stderr
    assert not list((tmp_path / "runs").rglob("*.pt")) and not list((tmp_path / "runs").rglob(".*tmp"))


def _mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True).returncode == 0


def test_a_real_full_tmpfs(tmp_path):
    """The real thing where the machine lets us mount (root): a 1 MB tmpfs, then a read-only one."""
    small = tmp_path / "small"
    if not _mount_tmpfs(small, "1m"):
        pytest.skip("cannot mount a tmpfs here (not root, or no permission)")
    try:
        data = make_image_folder(tmp_path / "data", per_class=40)
        args = ["extract", "--data", str(data), "--n", "0", *TINY, "--cache-dir", str(small / "f")]
        code = "import sys, tests.tiny; sys.argv = ['cli.py'] + sys.argv[1:]; import cli; cli.main()"
        r = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 1, r.stderr  # not a segfault (139)
        assert r.stderr.strip().splitlines()[-1].startswith("Error: cannot write ") and "no space left" in r.stderr
        subprocess.run(["mount", "-o", "remount,size=32m", str(small)], check=True)
        r = subprocess.run([sys.executable, "-c", code, *args, "--json"], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0 and json.loads(r.stdout)["rows"] == 80, r.stderr
        subprocess.run(["mount", "-o", "remount,ro", str(small)], check=True)
        r = subprocess.run([sys.executable, "-c", code, "fit-head", "--cache", json.loads(r.stdout)["cache"],
                            "--epochs", "1", "--runs-dir", str(small / "runs")], cwd=ROOT, capture_output=True,
                           text=True)
        assert r.returncode == 1 and "read-only" in r.stderr.strip().splitlines()[-1], r.stderr
    finally:
        subprocess.run(["umount", "--lazy", str(small)])  # detached even if a file there is still open


def test_fit_head_into_a_full_tmpfs_says_no_space_and_leaves_no_empty_run(tmp_path, make_cache):
    """torch.save into a full disk failed as '[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0'
    (torch 2.x): 'unexpected RuntimeError ... (a bug?)', an empty run folder left behind at each try."""
    small = tmp_path / "small"
    if not _mount_tmpfs(small, "64k"):
        pytest.skip("cannot mount a tmpfs here (not root, or no permission)")
    try:
        cache = make_cache(make_image_folder(tmp_path / "data", per_class=6)).cache
        (small / "runs").mkdir()
        (small / "room").mkdir()  # the disk full but for one folder's room: the run folder fits, head.pt does not
        fd = os.open(small / "filler", os.O_WRONLY | os.O_CREAT)
        while True:
            try:
                os.write(fd, b"\0" * 512)
            except OSError:
                break
        os.close(fd)
        (small / "room").rmdir()
        r = CliRunner().invoke(cli, ["fit-head", "--cache", cache, "--head", "logreg",
                                     "--runs-dir", str(small / "runs")])
        assert r.exit_code == 1, r.output
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith("Error: cannot write ") and "head.pt: no space left on the device" in last, last
        assert os.listdir(small / "runs") == []  # no empty run folder, no ledger line
    finally:
        subprocess.run(["umount", "--lazy", str(small)])  # detached even if a file there is still open


@pytest.mark.parametrize("cell", ["=cmd|' calc'!A0.jpg", "+1", "-x", "@SUM(A1)", "\tx", "\rx", "'=a", "''+b",
                                  "'plain", "plain", "'", "", "a=b"])
def test_csv_cells_are_safe_for_spreadsheets_and_read_back_exactly(cell):
    from pipeline.files import csv_cell, csv_cell_read

    written = csv_cell(cell)
    assert written[:1] not in ("=", "+", "-", "@", "\t", "\r")  # a spreadsheet never sees a formula
    assert csv_cell_read(written) == cell
    assert csv_cell(0.5) == 0.5 and csv_cell(-1.5) == -1.5  # numbers stay numbers


def test_the_one_json_writer_writes_nan_and_infinities_as_null(tmp_path):
    import json
    import math

    import numpy as np

    from pipeline.files import json_text, write_json

    value = {"a": math.nan, "b": [1.5, -math.inf, {"c": np.float32("nan")}], "d": (2, True), "e": np.float64(0.5)}
    assert json.loads(json_text(value)) == {"a": None, "b": [1.5, None, {"c": None}], "d": [2, True], "e": 0.5}
    path = write_json(tmp_path / "r.json", value, indent=1)
    assert "NaN" not in path.read_text() and json.loads(path.read_text())["a"] is None


def test_the_one_json_writer_never_writes_a_negative_zero():
    """compare-sklearn --json gave a log-loss of -0.0 where a model gave every photo probability 1 (its text
    already read 0.0000)."""
    import numpy as np

    from pipeline.files import json_text

    assert json_text({"log_loss": -0.0, "rows": [np.float64(-0.0), -1.5], "n": 0}) == \
        '{"log_loss": 0.0, "rows": [0.0, -1.5], "n": 0}'


def test_the_ledger_and_history_files_hold_no_bare_nan(tmp_path):
    import json
    import math

    from pipeline.runs.run_folders import finish_run

    out = tmp_path / "runs" / "x"
    out.mkdir(parents=True)
    history = [{"epoch": 1, "train_loss": math.nan, "val_loss": 0.5, "train_acc": 0.5, "val_acc": 0.5}]
    finish_run(out, str(tmp_path / "runs"), "fit-head", history, [], params={}, metrics={"val_loss": math.inf})
    for f in (out / "history.json", tmp_path / "runs" / "ledger.jsonl"):
        assert "NaN" not in f.read_text() and "Infinity" not in f.read_text()
    assert json.loads((out / "history.json").read_text())[0]["train_loss"] is None


@pytest.mark.parametrize("make, said", [
    (lambda p: p.symlink_to(p.name), "it is a symlink loop"),
    (lambda p: p.symlink_to("/nonexistent/runs"), "it is a dangling link (to '/nonexistent/runs')"),
    (lambda p: p.write_text("x"), "it is a file"),
])
def test_a_folder_option_says_what_stands_in_its_place(tmp_path, make, said):
    """A dangling link 'runs' (to an unmounted drive) or a looping one was called 'a file'."""
    from click.testing import CliRunner

    make(tmp_path / "runs")
    res = CliRunner().invoke(cli, ["runs", "--runs-dir", str(tmp_path / "runs")])
    assert res.exit_code == 2 and res.output.strip().endswith(f"must be a folder, but {said}"), res.output


def test_a_process_forked_while_signals_unwind_dies_of_sigterm_as_by_default():
    """A DataLoader's decoding worker is forked inside ``unwinding_on_signals`` and inherits its handler: a
    scheduler's SIGTERM to the whole job made the worker unwind too, and its threads' tracebacks (shut down
    mid-accept) followed the one line the main process prints."""
    import multiprocessing

    from pipeline.files import unwinding_on_signals

    ctx = multiprocessing.get_context("fork")
    running = ctx.Event()

    def wait_for_the_signal():
        running.set()
        time.sleep(30)

    with unwinding_on_signals():
        child = ctx.Process(target=wait_for_the_signal)
        child.start()
        # a SIGTERM that comes before the child's interpreter has finished forking is lost (Python clears a new
        # child's pending signals; 38 of 40 sent right after start() were): wait until it runs, not a fixed 0.5 s
        assert running.wait(60), "the child never ran"
        os.kill(child.pid, signal.SIGTERM)
        child.join(10)
    assert child.exitcode == -signal.SIGTERM  # killed by the signal (unwinding gave exit code 143)


def test_a_decoding_worker_that_dies_while_sigterm_unwinds_leaves_terminated_as_it_is():
    """A scheduler's SIGTERM reaches train's decoding worker too. When the worker died while the main process was
    in a long forward pass, torch's SIGCHLD handler ran in the middle of the unwinding and raised 'DataLoader
    worker (pid ...) is killed by signal' in place of Terminated: a traceback instead of train's one line."""
    from torch.utils.data import DataLoader

    from pipeline.files import Terminated, unwinding_on_signals

    loader = iter(DataLoader(list(range(8)), batch_size=2, num_workers=1))
    next(loader)
    torch_handler = signal.getsignal(signal.SIGCHLD)  # installed by the loader: it raises for a killed worker
    worker = loader._workers[0].pid
    try:
        signal.signal(signal.SIGCHLD, lambda *a: None)  # the death is held back for the test to say when it comes
        os.kill(worker, signal.SIGKILL)
        os.waitid(os.P_PID, worker, os.WEXITED | os.WNOWAIT)  # dead, left for torch's handler to find
        time.sleep(0.05)
        signal.signal(signal.SIGCHLD, torch_handler)
        with pytest.raises(Terminated):
            with unwinding_on_signals():
                try:
                    signal.raise_signal(signal.SIGTERM)
                finally:
                    signal.raise_signal(signal.SIGCHLD)  # the worker's death, while the main process unwinds
    finally:
        del loader
        signal.signal(signal.SIGCHLD, torch_handler)


@pytest.mark.parametrize("installed_inside", [False, True])
@pytest.mark.parametrize("unwinding_fails", [False, True])
def test_the_sigchld_handler_quieted_while_sigterm_unwinds_is_put_back_after(installed_inside, unwinding_fails):
    """SIGTERM replaced a Python SIGCHLD handler (torch's) by one that does nothing, for the unwinding, and never
    put it back: for the rest of the process (a notebook, a test session) a killed decoding worker went
    unreported. Put back however the unwinding ends, for a handler installed before or inside (torch installs
    its own at a loader's first iterator)."""
    from pipeline.files import Terminated, unwinding_on_signals

    def previous(signum, frame):
        pass

    before = signal.signal(signal.SIGCHLD, signal.SIG_DFL if installed_inside else previous)
    try:
        with pytest.raises(OSError if unwinding_fails else Terminated):
            with unwinding_on_signals():
                if installed_inside:
                    signal.signal(signal.SIGCHLD, previous)
                try:
                    signal.raise_signal(signal.SIGTERM)
                finally:
                    if unwinding_fails:
                        raise OSError("the unwinding failed too")
        assert signal.getsignal(signal.SIGCHLD) is previous
    finally:
        signal.signal(signal.SIGCHLD, before)


def test_a_signal_inside_signals_deferred_reaches_its_handler_only_after_the_block(ctrl_c_raises):
    import signal

    from pipeline.files import signals_deferred

    done = []
    with pytest.raises(KeyboardInterrupt):
        with signals_deferred():
            signal.raise_signal(signal.SIGINT)
            done.append("the rest of the block")
    assert done == ["the rest of the block"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_quoted_writes_a_name_that_is_not_utf8_as_shown_writes_it():
    """repr(shown(name)) doubled the backslash of shown's escape ('caf\\\\xe9.jpg' in predict's refusal); quoted is
    repr with those bytes as shown writes them, a literal backslash in a name still doubled as repr does."""
    from pipeline.files import quoted, shown

    latin1 = os.fsdecode(b"caf\xe9.jpg")
    assert quoted(latin1) == "'caf\\xe9.jpg'" == repr(shown(latin1)).replace("\\\\", "\\")
    assert quoted("café\n.jpg") == repr("café\n.jpg")
    assert quoted("a\\udce9") == repr("a\\udce9")  # the text \udce9 in a name: not an escape
    assert quoted(os.fsdecode(b"a\\\xe9")) == "'a\\\\\\xe9'"


def test_an_output_named_longer_than_a_file_system_takes_is_refused_before_the_work(tmp_path, image_folder):
    """predict/check-images/preview --output, --explain or --runs-dir with a name of 300 bytes ran the whole command,
    then failed at the rename as 'unexpected OSError: [Errno 36] File name too long' (exit 1, a bug's words); refused
    now before any work, in one line (exit 2), for a file and for a folder on its way."""
    long = "a" * 300
    for output, folder in ((tmp_path / f"{long}.csv", False), (tmp_path / long / "maps", True)):
        message = r"^--x is named with 30\d bytes \('a+'\.\.\.\): a file or folder name may have at most 255; name"
        with cli_terms(), pytest.raises(UsageError, match=message + " it with 255 or fewer$"):
            check_output(output, what="--x", folder=folder)
    r = CliRunner().invoke(cli, ["check-images", str(image_folder), "--workers", "0", "--report",
                                     str(tmp_path / f"{long}.csv")])
    assert r.exit_code == 2 and "--report is named with 304 bytes" in r.stderr and "unexpected" not in r.output, \
        r.output
    assert len(r.stderr.strip().splitlines()) == 1 and sorted(os.listdir(tmp_path)) == ["data"]


def test_only_devices_pipes_and_names_in_dev_are_written_in_place(tmp_path):
    """atomic_write renames onto a regular file; a pipe, a device or /dev/stdout (whatever it leads to) is written
    into: a rename there replaced the device itself. A regular file in /dev/shm keeps the rename."""
    from pipeline.files import in_place

    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "file.csv").write_text("x\n")
    assert in_place(tmp_path / "pipe") and in_place("/dev/stdout") and in_place(os.devnull)
    assert not in_place(tmp_path / "file.csv") and not in_place(tmp_path / "missing.csv")
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        shm = Path("/dev/shm") / f"in-place-test-{os.getpid()}.csv"
        shm.write_text("x\n")
        try:
            assert not in_place(shm)
        finally:
            shm.unlink()


def test_a_file_output_ending_in_a_slash_is_refused_not_written_as_a_file_named_like_the_folder(tmp_path, image_folder):
    """predict/check-images --output new/ (a folder meant, not there yet) wrote a file named 'new': a later mkdir
    new, or an output into new/, then failed. Refused now (exit 2), nothing made."""
    with cli_terms(), pytest.raises(UsageError, match=r"^--output '.*new/' names a folder \(it ends in '/'\); name a "
                                                      r"file$"):
        check_output(f"{tmp_path}/new/")
    r = CliRunner().invoke(cli, ["check-images", str(image_folder), "--workers", "0", "--report",
                                 f"{tmp_path}/report.csv/"])
    assert r.exit_code == 2 and "names a folder (it ends in '/')" in r.stderr, r.output
    assert sorted(os.listdir(tmp_path)) == ["data"]


def test_an_output_that_is_a_link_is_written_through_it_as_a_shell_writes(tmp_path):
    """An output named by a symbolic link to a user's file (latest.csv -> results/2026-12-07.csv) was replaced by a
    regular file, the link gone and its file left as it was. Now written through the link, as '>' writes: the file
    it leads to gets the new content (whole or not at all, its permission bits kept), the link stays; a dangling
    link's file is made; a link whose folder is not there, or a loop, is refused before any work (exit 2)."""
    results = tmp_path / "results"
    results.mkdir()
    mine = results / "2026-12-07.csv"
    mine.write_text("old\n")
    mine.chmod(0o640)
    link = tmp_path / "latest.csv"
    link.symlink_to(os.path.join("results", mine.name))  # relative, as ln -s makes it
    assert check_output(link) == link
    atomic_write(link, lambda tmp: tmp.write_text("new\n"))
    assert link.is_symlink() and os.readlink(link) == os.path.join("results", mine.name)
    assert mine.read_text() == "new\n" and (mine.stat().st_mode & 0o777) == 0o640
    assert sorted(os.listdir(results)) == [mine.name]  # the temporary file was beside the target, and is gone

    def fails(tmp):
        tmp.write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DiskFull):
        atomic_write(link, fails)
    assert link.is_symlink() and mine.read_text() == "new\n" and sorted(os.listdir(results)) == [mine.name]
    dangling = tmp_path / "next.csv"
    dangling.symlink_to(results / "new.csv")
    check_output(dangling)
    atomic_write(dangling, lambda tmp: tmp.write_text("made\n"))
    assert dangling.is_symlink() and (results / "new.csv").read_text() == "made\n"
    nowhere = tmp_path / "nowhere.csv"
    nowhere.symlink_to(tmp_path / "gone" / "x.csv")
    with pytest.raises(UsageError, match=r"is a link to '.*gone/x.csv', whose folder does not exist"):
        check_output(nowhere)
    loop = tmp_path / "loop.csv"
    loop.symlink_to(loop)
    with pytest.raises(UsageError, match="is a symlink loop"):
        check_output(loop)
    assert not (tmp_path / "gone").exists() and loop.is_symlink()


def test_a_dangling_link_is_replaceable_as_it_is_writable(tmp_path):
    """check_output lets a dangling link be written through (its file made), but check_replaceable refused it as
    "exists and is not an earlier export (a dangling link ...)": nothing would be replaced. Now they agree; a link
    to a file of the user's, and a loop, are still refused."""
    from pipeline.files import check_replaceable

    dangling = tmp_path / "next.onnx"
    dangling.symlink_to(tmp_path / "made.onnx")
    check_output(dangling)
    check_replaceable(dangling, lambda p: False, "an earlier export")
    (tmp_path / "made.onnx").write_text("a user's file\n")
    with pytest.raises(UsageError, match=r"exists and is not an earlier export \(a link to a file\)"):
        check_replaceable(dangling, lambda p: False, "an earlier export")
    loop = tmp_path / "loop.onnx"
    loop.symlink_to(loop)
    with pytest.raises(UsageError, match=r"\(a symlink loop\)"):
        check_replaceable(loop, lambda p: True, "an earlier export")


def test_a_link_into_a_read_only_folder_is_refused_naming_the_link_and_the_folder(tmp_path):
    """A link whose file is in a read-only folder: refused before any work (the file is replaced by a rename in its
    folder), in one line that named only the folder, which is not the link's own: now it says where the link
    leads too."""
    ro = tmp_path / "ro"
    if not _mount_tmpfs(ro, "1m"):
        pytest.skip("cannot mount a tmpfs here (not root, or no permission)")
    try:
        (ro / "rows.csv").write_text("old\n")
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
        link = tmp_path / "out" / "rows.csv"
        link.parent.mkdir()
        link.symlink_to(ro / "rows.csv")
        with cli_terms(), pytest.raises(DiskFull) as e:
            check_output(link)
        assert str(e.value) == (f"cannot write --output '{link}' (a link to '{ro / 'rows.csv'}'): nothing can be "
                                f"written in '{ro}' (the file system is read-only)")
    finally:
        subprocess.run(["umount", "--lazy", str(ro)], check=False)


def test_predict_check_images_preview_and_feature_map_write_through_a_link(tmp_path, image_folder):
    """Every command's file output goes through the one helper: a link named as predict --output, check-images
    --report, preview or feature-map --output is written through (its file gets the rows, the report, the PNG);
    it was replaced by a regular file and the file it led to was left stale."""
    from pipeline.models.whole_models import build_model, save_model

    model_pt = tmp_path / "model.pt"  # a tiny random model: predict's rows are all this needs
    save_model(build_model("tiny", "none", ["blue", "red"]), model_pt, "train", {}, {}, [])
    keep = tmp_path / "keep"
    keep.mkdir()
    cases = {"rows.csv": ["predict", str(image_folder / "red"), "--model", str(model_pt), "--workers", "0"],
             "report.csv": ["check-images", str(image_folder)],
             "preview.png": ["preview", "--data", str(image_folder), "--backbone", "tiny", "--weights", "none",
                             "--per-class", "1"],
             "map.png": ["feature-map", str(image_folder / "red" / "red.0.jpg"), "--backbone", "tiny", "--weights",
                         "none", "--top-k", "2"]}
    for name, args in cases.items():
        (keep / name).write_bytes(b"a user's file\n")
        link = tmp_path / f"link-{name}"
        link.symlink_to(keep / name)
        option = "--report" if args[0] == "check-images" else "--output"
        r = CliRunner().invoke(cli, [*args, option, str(link)])
        assert r.exit_code == 0, (name, r.output)
        assert link.is_symlink(), f"{args[0]}: the link was replaced"
        written = (keep / name).read_bytes()
        assert written.startswith(b"\x89PNG" if name.endswith(".png") else b"path,"), (name, written[:40])
    assert sorted(os.listdir(keep)) == sorted(cases)  # nothing left beside them
