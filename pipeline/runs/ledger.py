"""The experiment ledger: one JSON line per run in ``runs/ledger.jsonl``, to compare runs side by side.

A feature cache exists to run many experiments; the ledger keeps what each one was (command,
cache, backbone, hyperparameters) beside what it scored. Lines are appended with ``O_APPEND``,
one ``os.write`` per line, under an exclusive ``flock``: processes appending at once never
interleave a line. Reading skips a damaged line (a write cut off by a crash) with a warning saying that
the line may be deleted.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import time
from pathlib import Path
from typing import Optional

from ..errors import UsageError
from ..files import json_text, require_folder, writing

try:
    import fcntl
except ImportError:  # Windows: O_APPEND alone
    fcntl = None

log = logging.getLogger(__name__)

LEDGER_NAME = "ledger.jsonl"
#: The type each record field must have when present; a line that breaks this is skipped when read.
FIELD_TYPES = {"time": str, "kind": str, "command": str, "cache": str, "cache_fingerprint": str, "backbone": str,
               "params": dict, "metrics": dict, "outputs": list, "part_of": str}


def ledger_path(runs_dir: str | os.PathLike) -> Path:
    """The ledger file of ``runs_dir``; ValueError when --runs-dir names a file, not a folder."""
    return require_folder(runs_dir, "--runs-dir") / LEDGER_NAME


def _write_line(path: Path, data: bytes) -> None:
    """Append ``data`` (one line) as a single write, starting a fresh line after a cut-off one."""
    with writing(path):  # a full disk: one line naming the ledger
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                size = os.fstat(fd).st_size
                if size and os.pread(fd, 1, size - 1) != b"\n":
                    data = b"\n" + data  # the last writer died mid-line: do not glue onto its fragment
                try:
                    written = os.write(fd, data)
                    if written != len(data):  # a full disk: the rest would not fit
                        raise OSError(errno.ENOSPC, f"{written} of the line's {len(data)} bytes written")
                except OSError:
                    os.ftruncate(fd, size)  # no half line left behind (later lines would follow it)
                    raise
            finally:
                if fcntl is not None:
                    fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


def current_command() -> str:
    """This process's command line, as a user would type it again: the resume command that Ctrl-C and SIGTERM
    print, and the ledger's record. Under torchrun, torchrun's (``python cli.py`` there would start one process,
    whose cache is not the shards'); the installed ``transfer-pipeline`` by its name (``python PATH`` needs
    the interpreter it was installed for)."""
    import shlex
    import shutil
    import sys

    script, *args = sys.argv or [""]
    if os.environ.get("TORCHELASTIC_RUN_ID") and os.environ.get("LOCAL_WORLD_SIZE"):
        nodes = int(os.environ.get("WORLD_SIZE", "1")) // max(int(os.environ["LOCAL_WORLD_SIZE"]), 1)
        start = ["torchrun", *([f"--nnodes={nodes}"] if nodes > 1 else []),
                 f"--nproc_per_node={os.environ['LOCAL_WORLD_SIZE']}", script]
    elif script and not script.endswith(".py") and os.access(script, os.X_OK) and os.path.isfile(script):
        name = os.path.basename(script)  # a console script: itself, by name where PATH finds this one
        found = shutil.which(name)
        start = [name if found and os.path.samefile(found, script) else script]
    else:
        python = os.path.basename(sys.executable) if sys.executable else "python"  # the interpreter that ran
        start = [python, script]
    return " ".join(shlex.quote(a) for a in [*start, *args])


def append_run(runs_dir: str | os.PathLike, kind: str, *, cache_fingerprint: Optional[str] = None,
               backbone: Optional[str] = None, params: dict, metrics: dict, outputs: list,
               cache: Optional[str] = None, command: Optional[str] = None, part_of: Optional[str] = None) -> dict:
    """Append one run to the ledger and return the record.

    Each stage calls this once at its end. With ``cache`` (a cache file) and no fingerprint or
    backbone, both are read from the cache's attributes. ``command`` defaults to this process's.
    ``part_of``: the command that made this run among others (compare-sklearn's heads), recorded so that
    ``runs`` does not show them as fit-head's own runs.
    """
    if cache and (cache_fingerprint is None or backbone is None):
        from ..cache.feature_cache import read_info

        attrs = read_info(cache).attrs
        cache_fingerprint = attrs["fingerprint"] if cache_fingerprint is None else cache_fingerprint
        backbone = attrs["backbone"] if backbone is None else backbone
    record = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "kind": kind, "command": command or current_command(),
        "cache": str(cache) if cache else "", "cache_fingerprint": cache_fingerprint or "",
        "backbone": backbone or "", "params": params, "metrics": metrics, "outputs": [str(o) for o in outputs],
        **({"part_of": part_of} if part_of else {}),
    }
    line = json_text(record, default=str, ensure_ascii=False) + "\n"
    _write_line(ledger_path(runs_dir), line.encode("utf-8"))
    return record


def _lower_is_better(metric: str) -> bool:
    """Losses, times and errors, the calibration error (ece, test_ece, test_ece_uncalibrated) among them."""
    return "loss" in metric or metric.endswith(("seconds", "error")) or "ece" in metric.split("_")


def _matches_cache(record: dict, cache: str) -> bool:
    """``cache`` is a cache file (matched by fingerprint) or a fingerprint prefix."""
    if Path(cache).is_file():
        from ..cache.feature_cache import read_info

        return record.get("cache_fingerprint") == read_info(cache).attrs["fingerprint"]
    return bool(record.get("cache_fingerprint", "").startswith(cache)) or record.get("cache") == cache


def record_problem(rec) -> Optional[str]:
    """Why a parsed ledger line is not a usable record (wrong field types: a hand edit), or None."""
    if not isinstance(rec, dict):
        return "not a JSON object"
    for key, want in FIELD_TYPES.items():
        if key in rec and not isinstance(rec[key], want):
            return f"{key!r} is {rec[key]!r}, not a {want.__name__}"
    return None


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def read_runs(runs_dir: str | os.PathLike, sort_by: Optional[str] = None, cache: Optional[str] = None,
              backbone: Optional[str] = None) -> list[dict]:
    """The ledger's runs, newest first (or best first by metric ``sort_by``), optionally filtered.

    Losses, calibration errors and times sort lowest first, everything else highest first; runs without the metric
    come last. A line that does not parse is skipped with a warning.
    """
    path = ledger_path(runs_dir)
    if not path.is_file():
        return []
    records = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
                problem = record_problem(rec)
                if problem:
                    raise UsageError(problem)
            except ValueError as e:
                log.warning("%s line %d is damaged and skipped (%s): that run's record is lost (its run folder is "
                            "not); delete the line to stop this warning", path, number, e)
                continue
            records.append(rec)
    records.reverse()  # appended in time order: newest last
    if backbone:
        records = [r for r in records if r.get("backbone") == backbone]
    if cache:
        records = [r for r in records if _matches_cache(r, cache)]
    if sort_by is not None:  # --sort '' (an unset shell variable) is refused as any unknown metric is
        have = [r for r in records if _number(r.get("metrics", {}).get(sort_by))]
        if records and not have:  # the metrics runs have as numbers: a hand-edited 'high' is none
            known = sorted({k for r in records for k, v in r.get("metrics", {}).items() if _number(v)})
            raise UsageError(f"no run has the metric {sort_by!r}; known metrics: {', '.join(known) or 'none'}")
        sign = 1 if _lower_is_better(sort_by) else -1
        have.sort(key=lambda r: sign * r["metrics"][sort_by])
        ranked = {id(r) for r in have}
        records = have + [r for r in records if id(r) not in ranked]
    return records
