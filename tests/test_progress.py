"""Progress where it is shown: periodic lines when stderr is not a terminal, nothing with --quiet."""
import subprocess
import sys

from click.testing import CliRunner

from pipeline import progress as pg
from pipeline.cli import cli
from tests.conftest import ROOT, make_image_folder


def test_log_progress_writes_done_total_rate_and_eta(capsys):
    bar = pg.LogProgress(total=10, desc="extract", unit="img", interval=0.0)
    bar.update(4)
    bar.set_postfix(skipped=1)
    bar.update(1)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("extract: 4/10 (40%), ") and " img/s, eta " in lines[0]
    assert lines[1].startswith("extract: 5/10 (50%)") and lines[1].endswith("skipped=1")


def test_log_progress_waits_for_its_interval(capsys):
    bar = pg.LogProgress(total=10, desc="x", interval=3600.0)
    for _ in range(10):
        bar.update()
    assert capsys.readouterr().err == ""


def test_extract_not_on_a_terminal_logs_progress_lines_and_quiet_silences_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(pg, "LOG_INTERVAL", 0.0)
    data = make_image_folder(tmp_path / "data", per_class=8)
    args = ["extract", "--data", str(data), "--n", "16", "--backbone", "tiny", "--weights", "none",
            "--workers", "0", "--batch-size", "4"]
    r = CliRunner().invoke(cli, args, catch_exceptions=False)  # CliRunner's stderr is not a terminal
    assert r.exit_code == 0, r.output
    lines = [line for line in r.stderr.splitlines() if line.startswith("extract: ")]
    assert [line.split()[1] for line in lines] == ["4/16", "8/16", "12/16", "16/16"]
    r = CliRunner().invoke(cli, ["--quiet", *args[:-2], "--batch-size", "8", "--seed", "1"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert r.stderr == "" and r.stdout.strip().endswith(".h5")


def test_a_piped_cli_prints_progress_while_it_runs(tmp_path):
    """The real thing: stderr is a pipe, as under `| cat` or in a CI log."""
    data = make_image_folder(tmp_path / "data", per_class=6)
    code = ("import sys, tests.tiny; import pipeline.progress as pg; pg.LOG_INTERVAL = 0.0; "
            "sys.argv = ['cli.py'] + sys.argv[1:]; import cli; cli.cli()")
    r = subprocess.run([sys.executable, "-c", code, "extract", "--data", str(data), "--n", "12", "--backbone",
                        "tiny", "--weights", "none", "--workers", "0", "--batch-size", "6",
                        "--cache-dir", str(tmp_path / "f")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "extract: 6/12 (50%)" in r.stderr and "extract: 12/12 (100%)" in r.stderr


def test_in_a_jupyter_kernel_without_ipywidgets_the_bar_falls_back_quietly():
    """tqdm.auto in a kernel wants ipywidgets for its widget; without it, tqdm's text bar, and no warning."""
    import pytest

    pytest.importorskip("IPython")
    code = (
        "import sys, types\n"
        "for m in ('ipykernel', 'ipykernel.zmqshell'):  # what a Jupyter kernel has loaded\n"
        "    sys.modules[m] = types.ModuleType(m)\n"
        "sys.modules['ipywidgets'] = None  # not installed\n"
        "import IPython\n"
        "class Shell: config = {'IPKernelApp': {}}\n"
        "IPython.get_ipython = lambda: Shell()\n"
        "from pipeline.progress import progress\n"
        "bar = progress(total=3, desc='x', unit='img'); bar.update(3); bar.close()\n"
        "print(type(bar).__module__, sum(1 for _ in progress(range(4), desc='y')))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["tqdm.asyncio", "4"]  # tqdm.auto's text bar, not tqdm.notebook's widget
    assert "x: 100%" in r.stderr and "3/3" in r.stderr and "Warning" not in r.stderr and "IProgress" not in r.stderr


def test_still_running_writes_a_line_each_interval_of_a_long_call_and_nothing_when_quiet(capsys, monkeypatch):
    """One long call that reports nothing itself (an SVM fit on 20,000 rows: 74 s of silence in a log) gets a
    line every interval; a call shorter than the interval gets none."""
    import time

    monkeypatch.setattr(pg, "LOG_INTERVAL", 0.1)
    with pg.still_running("fitting the head on 9 rows"):
        time.sleep(0.45)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) >= 2 and all(line.startswith("fitting the head on 9 rows: still running, ") for line in lines)
    # a step right after another's line writes its first an interval after that line, and at least a tenth of one
    # in: 10-100 ms here at 0.1, which a loaded machine took between starting the beat and leaving an empty block
    # ('short: still running, 0 s'); at the default interval, at least 1 s
    monkeypatch.setattr(pg, "LOG_INTERVAL", 10.0)
    with pg.still_running("short"):
        pass
    with pg.quiet(), pg.still_running("silenced"):
        time.sleep(0.3)
    assert capsys.readouterr().err == ""


def test_a_step_right_after_another_goes_on_from_its_last_line():
    """compare-sklearn's two scikit-learn fits each waited their own interval: 19 s between the LogisticRegression's
    last line and the SVC's first. A step starting within two intervals of the module's last line writes an
    interval after that line (not before it has run a tenth of an interval); otherwise an interval after it starts."""
    assert pg.next_line(last=20.0, started=29.0, interval=10.0) == 30.0  # the previous step's line at 20 s
    assert pg.next_line(last=20.0, started=31.0, interval=10.0) == 32.0  # overdue: once this step has run 1 s
    assert pg.next_line(last=float("-inf"), started=31.0, interval=10.0) == 41.0  # the first: its own interval
    assert pg.next_line(last=5.0, started=31.0, interval=10.0) == 41.0  # long ago: the log said other things since


def test_a_still_running_line_goes_above_a_drawn_bar_in_a_terminal_and_whole_elsewhere(monkeypatch):
    """It was a plain print from its thread: over a live bar in a terminal, and text and newline in two writes."""
    written = []

    class Bar:
        @staticmethod
        def write(text, file=None):
            written.append(("bar", text))

    class Stderr:
        def write(self, text):
            written.append(("stderr", text))

        def flush(self):
            pass

    monkeypatch.setattr(pg, "_auto_tqdm", lambda: Bar)
    monkeypatch.setattr(sys, "stderr", Stderr())
    for interactive in (True, False):
        monkeypatch.setattr(pg, "_interactive", lambda: interactive)
        pg.write_line("fit: still running, 10 s")
    assert written == [("bar", "fit: still running, 10 s"), ("stderr", "fit: still running, 10 s\n")]


def test_extracts_rate_starts_after_the_first_batch_so_a_compile_is_not_in_its_eta(tmp_path, monkeypatch):
    """24,000 photos, compiled on the first call (33 s): the first line said 1.0 img/s, eta 24,738 s, for a run
    that took 100 s; the bar (and its clock) now starts once the first batch is computed."""
    import pipeline.extraction.inference as inference

    events = []
    called, made = inference.Inference.__call__, pg.progress
    monkeypatch.setattr(inference.Inference, "__call__", lambda self, x: events.append("batch") or called(self, x))
    monkeypatch.setattr(pg, "progress", lambda *a, **k: events.append(("bar", k.get("initial"))) or made(*a, **k))
    monkeypatch.setattr(pg, "LOG_INTERVAL", 0.0)
    data = make_image_folder(tmp_path / "data", per_class=4)
    r = CliRunner().invoke(cli, ["extract", "--data", str(data), "-n", "0", "--backbone", "tiny", "--weights", "none",
                                 "--workers", "0", "--batch-size", "4", "--cache-dir", str(tmp_path / "f")],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert events[:3] == ["batch", ("bar", 0), "batch"]
    assert [line.split()[1] for line in r.stderr.splitlines() if line.startswith("extract: ")] == ["4/8", "8/8"]


def test_verify_shows_progress_while_it_hashes_the_photos(tmp_path, monkeypatch):
    """extract --verify on a cache hit hashes every row's photo (minutes for 25,000 phone photos on a disk), and
    said nothing until it was done."""
    data = make_image_folder(tmp_path / "data", per_class=4)
    args = ["extract", "--data", str(data), "-n", "0", "--backbone", "tiny", "--weights", "none", "--workers", "0",
            "--cache-dir", str(tmp_path / "f")]
    assert CliRunner().invoke(cli, args, catch_exceptions=False).exit_code == 0
    monkeypatch.setattr(pg, "LOG_INTERVAL", 0.0)
    r = CliRunner().invoke(cli, [*args, "--verify"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "sha256 of the photos: 8/8 (100%)" in r.stderr
