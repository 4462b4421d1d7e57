"""audit --apply / --undo: a reviewed list of fixes done as file moves that lose nothing.

``relabel`` moves a photo into another class folder, ``remove`` moves it under the quarantine folder
(``<data>.quarantine/``, relative path kept, as check-images does), ``keep`` does nothing. Nothing is
ever deleted or overwritten: every row is checked before the first move (the file exists, the class
does, no destination is taken, no two rows move to one place), and a clash refuses the whole list,
naming it. Each move is appended to a journal (JSON lines, fsynced before the move is made, so an
interrupted run can be undone too) holding both places and the file's sha256; ``undo_fixes`` moves everything back
in reverse order, checking the bytes are the ones that were moved.
"""
from __future__ import annotations

import csv
import json
import os
import shlex
import time
from pathlib import Path
from typing import Optional

from ..config import AUDIT_ACTIONS
from ..errors import UsageError
from ..files import check_output
from .check_images import default_quarantine_dir
from .folders import list_image_folder
from .image_reader import file_digest

JOURNAL_KIND = "transfer-pipeline-audit-journal"


def read_fixes(csv_path) -> list[dict]:
    """The CSV's rows (path, action, new_class, optional new_name), checked for their columns and actions."""
    p = Path(csv_path)
    if not p.is_file():
        raise UsageError(f"--apply {str(csv_path)!r} is not a file")
    with open(p, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"path", "action"} - set(reader.fieldnames or ())
        if missing:
            raise UsageError(f"{p}: needs the columns path, action (and new_class for relabel); "
                             f"missing {', '.join(sorted(missing))}")
        rows = []
        for n, row in enumerate(reader, start=2):
            action = (row.get("action") or "").strip().lower()
            if action not in AUDIT_ACTIONS:
                raise UsageError(f"{p} line {n}: action {row.get('action')!r}; allowed: {', '.join(AUDIT_ACTIONS)}")
            rows.append({"line": n, "path": (row.get("path") or "").strip(), "action": action,
                         "new_class": (row.get("new_class") or "").strip(),
                         "new_name": (row.get("new_name") or "").strip()})
    return [r for r in rows if r["action"] != "keep"]


def plan_moves(rows: list[dict], root: Path, qdir: Path) -> list[dict]:
    """(action, from, to) for every row, or UsageError naming every problem before anything moves."""
    classes = set(list_image_folder(root).classes)
    problems, moves, taken, seen = [], [], set(), set()
    for r in rows:
        rel = r["path"]
        src = root / rel
        where = f"line {r['line']} ({rel})"
        parts = Path(rel).parts
        if not rel or Path(rel).is_absolute() or ".." in parts or len(parts) < 2:
            problems.append(f"{where}: not a path inside the data folder (class/name)")
            continue
        if rel in seen:
            problems.append(f"{where}: listed twice")
            continue
        seen.add(rel)
        if not src.is_file() or src.is_symlink():
            problems.append(f"{where}: no such file")
            continue
        name = r["new_name"] or src.name
        if "/" in name or name in ("", ".", ".."):
            problems.append(f"{where}: new_name {name!r} is not a file name")
            continue
        if r["action"] == "relabel":
            if r["new_class"] not in classes:
                problems.append(f"{where}: new_class {r['new_class']!r} is not a class; allowed: "
                                f"{', '.join(sorted(classes))}")
                continue
            if r["new_class"] == parts[0]:
                problems.append(f"{where}: already in class {r['new_class']!r}")
                continue
            dst = root / r["new_class"] / name
        else:
            dst = qdir / Path(rel).parent / name
        if os.path.lexists(dst) or dst in taken:
            problems.append(f"{where}: {dst} exists already (or another row moves there); give this row a "
                            "new_name column value")
            continue
        taken.add(dst)
        moves.append({"action": r["action"], "from": str(src), "to": str(dst)})
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise UsageError(f"nothing was moved: {len(problems)} rows of the list cannot be applied:\n  {shown}{more}")
    return moves


def _append(journal, record: dict) -> None:
    journal.write(json.dumps(record) + "\n")
    journal.flush()
    os.fsync(journal.fileno())


def undo_command(journal: Path) -> str:
    return f"python cli.py audit --undo {shlex.quote(str(journal))}"


def apply_fixes(csv_path, data: str, out_dir: Path, quarantine_dir: Optional[str] = None) -> dict:
    """Move the files of a reviewed list, journalled in ``out_dir/journal.jsonl``; returns what moved."""
    root = Path(data).resolve()
    if not root.is_dir():
        raise UsageError(f"--data {data!r} is not a folder")
    qdir = Path(quarantine_dir).resolve() if quarantine_dir else default_quarantine_dir(root)
    check_output(qdir, data=[(root, "--data")], what="--quarantine-dir", folder=True)
    moves = plan_moves(read_fixes(csv_path), root, qdir)
    journal = Path(out_dir) / "journal.jsonl"
    if journal.exists():
        raise UsageError(f"{journal} exists already; choose another --output")
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    with open(journal, "x") as j:
        _append(j, {"kind": JOURNAL_KIND, "version": 1, "root": str(root), "quarantine": str(qdir),
                    "list": str(Path(csv_path).resolve()), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        for m in moves:
            src, dst = Path(m["from"]), Path(m["to"])
            made = [str(p) for p in reversed(dst.parents) if not p.exists()]
            dst.parent.mkdir(parents=True, exist_ok=True)
            digest = file_digest(src)
            if os.path.lexists(dst):  # appeared since the plan was made: stop here, undo-able
                raise UsageError(f"{dst} appeared while applying; stopped (undo with `{undo_command(journal)}`)")
            _append(j, {**m, "sha256": digest, "made_folders": made})  # before the move: no move unrecorded
            os.rename(src, dst)
    counts = {a: sum(m["action"] == a for m in moves) for a in ("relabel", "remove")}
    return {"what": "moved", "root": str(root), "moved": len(moves), **counts, "quarantine": str(qdir),
            "journal": str(journal), "undo": undo_command(journal), "moves": moves}


def read_journal(path) -> tuple[dict, list[dict]]:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--undo {str(path)!r} is not a file")
    try:
        lines = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise UsageError(f"{p} is not an audit journal ({e})") from None
    if not lines or lines[0].get("kind") != JOURNAL_KIND:
        raise UsageError(f"{p} is not an audit journal (written by audit --apply)")
    return lines[0], [m for m in lines[1:] if "from" in m and "to" in m]


def undo_fixes(journal_path) -> dict:
    """Move every journalled file back (last move first); refuses, moving nothing, when a file is missing,
    changed, or its old place is taken. Folders the apply made and left empty are removed again."""
    head, moves = read_journal(journal_path)
    if Path(str(journal_path) + ".undone").exists():  # written beside the journal by a finished undo
        raise UsageError(f"{journal_path} was undone already")
    problems, done = [], set()  # indices of the moves that happened
    for i, m in enumerate(moves):
        src, dst = Path(m["from"]), Path(m["to"])
        if not os.path.lexists(dst) and src.is_file() and file_digest(src) == m.get("sha256"):
            continue  # journalled, then interrupted before the move: nothing to undo
        done.add(i)
        if not dst.is_file():
            problems.append(f"{dst} is missing")
        elif os.path.lexists(src):
            problems.append(f"{src} exists again")
        elif m.get("sha256") and file_digest(dst) != m["sha256"]:
            problems.append(f"{dst} changed since it was moved")
    if problems:
        raise UsageError(f"nothing was moved back: {'; '.join(problems[:10])}"
                         f"{f' (and {len(problems) - 10} more)' if len(problems) > 10 else ''}")
    for i, m in reversed(list(enumerate(moves))):
        src, dst = Path(m["from"]), Path(m["to"])
        if i in done:
            src.parent.mkdir(parents=True, exist_ok=True)
            os.rename(dst, src)
        for folder in reversed(m.get("made_folders", [])):
            try:
                os.rmdir(folder)  # only an empty one
            except OSError:
                pass
    Path(str(journal_path) + ".undone").write_text(time.strftime("%Y-%m-%dT%H:%M:%S%z") + "\n")
    return {"what": "moved back", "root": head["root"], "moved": len(done), "journal": str(journal_path)}
