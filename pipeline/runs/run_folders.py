"""Run folders: where each fit-head, train, finetune and evaluate run leaves its outputs.

``runs/<time>-<kind>/`` holds the checkpoint, ``history.json`` and ``curves.png`` (evaluate: its
pictures and ``metrics.json``); ``finish_run`` writes them and the ledger line in one place.

A fit-head, train or finetune folder appears only with its checkpoint in it (an evaluate or audit folder only
with all its files: ``staged_run``): it is made as a hidden
``.<time>-<kind>.<n>.<host>.<PID>.tmp`` (``staged_run_dir``), and renamed once the checkpoint is written
(``publish_run_dir``). A ``kill -9`` in between left an empty run folder for good; it now leaves the hidden one,
removed by the next run into the same --runs-dir on the same machine once its process is gone (a --runs-dir
shared by several machines: another machine's PIDs are not known here, its hidden folders are left alone).
"""
from __future__ import annotations

import contextlib
import errno
import itertools
import os
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Callable, Optional

from ..files import process_alive, write_json, writing
from .ledger import append_run

#: ``staged_run_dir``'s hidden folders: stamp and kind, a number, the machine and PID of the process that made it
_STAGED = re.compile(r"^\.(\d{8}-\d{6}-[a-z][a-z-]*)\.\d+\.([A-Za-z0-9-]*)\.(\d+)\.tmp$")


def _host() -> str:
    """This machine's name as a staged folder carries it (letters, digits and '-' alone, at most 64)."""
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:64]


def _numbered(base: Path):
    """``base``, then ``base-2``, ``base-3``, ...: a run folder's names, in the order taken when the second's is."""
    yield base
    for k in itertools.count(2):
        yield base.with_name(f"{base.name}-{k}")


def new_run_dir(runs_dir: str, kind: str) -> Path:
    """A fresh ``runs_dir/<stamp>-<kind>`` folder (suffixed -2, -3, ... when the second is taken)."""
    return _first_made(_numbered(Path(runs_dir) / f"{time.strftime('%Y%m%d-%H%M%S')}-{kind}"))


def staged_run_dir(runs_dir: str, kind: str) -> Path:
    """A fresh hidden ``runs_dir/.<stamp>-<kind>.<n>.<host>.<PID>.tmp`` folder, for the run's checkpoint before
    ``publish_run_dir`` gives it its name; the ones of this machine's processes that are gone (``kill -9``) are
    removed first."""
    clear_dead_staged(runs_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return _first_made(Path(runs_dir) / f".{stamp}-{kind}.{k}.{_host()}.{os.getpid()}.tmp" for k in itertools.count(1))


def _first_made(names) -> Path:
    """The first of ``names`` made as a new folder (not exist_ok: a run started in the same second, or another
    thread of this process, may take one first); another error is raised as it is."""
    for d in names:
        try:
            with writing(d):
                d.mkdir(parents=True)
            return d
        except FileExistsError as e:
            if e.filename != str(d):  # not this folder taken by another run
                raise


def is_staged(d: Optional[Path]) -> bool:
    """Whether ``d`` is a ``staged_run_dir`` folder not published yet."""
    return d is not None and _STAGED.match(d.name) is not None


def publish_run_dir(staged: Path, before: Optional[Callable[[Path], None]] = None) -> Path:
    """Rename ``staged`` (its checkpoint written) to ``<stamp>-<kind>`` beside it (suffixed -2, -3, ... when
    the name is taken: a rename never replaces another run's folder) and return the new name. ``before(name)``
    runs just before each rename, to write the files that name the folder: it never appears naming another."""
    for d in _numbered(staged.with_name(_STAGED.match(staged.name).group(1))):
        if os.path.lexists(d):  # an empty folder there (an older version's, killed) is not replaced
            continue
        if before:
            before(d)
        try:
            with writing(d):
                os.rename(staged, d)
            return d
        except OSError as e:  # another run took the name between the look and the rename
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise


@contextlib.contextmanager
def staged_run(runs_dir: str, kind: str):
    """A run folder whose files are all written before it appears: yields the hidden ``staged_run_dir`` to write
    into, which the block ends by publishing (``publish_run_dir``, its ``before`` writing what names the folder);
    removed where the block fails."""
    staged = staged_run_dir(runs_dir, kind)
    try:
        yield staged
    except BaseException:
        drop_staged(staged)
        raise


def moved_paths(value, old: Path, new: Path):
    """``value`` (a result: dicts, lists, strings) with each path inside ``old`` named inside ``new`` instead."""
    if isinstance(value, dict):
        return {k: moved_paths(v, old, new) for k, v in value.items()}
    if isinstance(value, list):
        return [moved_paths(v, old, new) for v in value]
    if isinstance(value, str) and (value == str(old) or value.startswith(str(old) + os.sep)):
        return str(new) + value[len(str(old)):]
    return value


def drop_staged(staged: Path) -> None:
    """Remove a ``staged_run_dir`` folder whose run failed before its checkpoint was written."""
    shutil.rmtree(staged, ignore_errors=True)


def clear_dead_staged(runs_dir) -> None:
    """Remove the ``staged_run_dir`` folders (and the partial checkpoint in one) of this machine's processes that
    are gone; a live process's, or another machine's, is left alone."""
    host = _host()
    with contextlib.suppress(OSError):
        for entry in os.scandir(runs_dir):
            m = _STAGED.match(entry.name)
            if (m and m.group(2) == host and entry.is_dir(follow_symlinks=False)
                    and not process_alive(int(m.group(3)))):
                drop_staged(Path(entry.path))


def finish_run(out_dir: Path, runs_dir: str, kind: str, history: Optional[list], outputs: list,
               commit: Optional[Callable[[], object]] = None, **ledger) -> Optional[Path]:
    """Write ``history.json`` and ``curves.png`` (when there is a history) and the run's ledger line.

    ``outputs``: files the run wrote (checkpoint, pictures), recorded in the ledger with the curves;
    ``commit``: writes the run's checkpoint, after the pictures and just before the ledger line, so a run
    stopped while they are drawn still has its resumable checkpoint, and a finished one its line;
    ``ledger``: the rest of the line (cache, backbone, params, metrics; see ``ledger.append_run``).
    Returns the curves' path, if drawn.
    """

    curves = None
    with writing(out_dir):
        if history:
            from . import figures as plots

            write_json(out_dir / "history.json", history)
            curves = plots.curves(history, out_dir / "curves.png")
        if commit is not None:
            commit()
        append_run(runs_dir, kind, outputs=[*outputs, *([curves] if curves else [])], **ledger)
    return curves
