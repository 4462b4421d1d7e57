"""audit --apply / --undo: a reviewed list of fixes done as file moves that lose nothing.

``relabel`` moves a photo into another class folder, ``remove`` moves it under the quarantine folder
(``<data>.quarantine/``, relative path kept, as check-images does), ``keep`` does nothing. Nothing is
ever deleted or overwritten: the folder is held (``moves.changing_folder``: one changer, no extraction
reading it) while every row is checked before the first move (a photo of the folder's own listing,
not reached through a link, named once; the class exists; no destination is taken, no two rows move
to one place, names that differ only in case included), and a clash refuses the whole list, naming it.
Every move is one step that never replaces a file (``moves.move_no_replace``, across file systems
too). Each move is journalled (JSON lines) as an intent, fsynced before the move, then confirmed once
made, with both places and the file's sha256; ``undo_fixes`` moves everything that moved back in reverse
order, checking the bytes are the ones that were moved, and only within the journal's data folder and quarantine.
"""
from __future__ import annotations

import csv
import io
import json
import os
import shlex
import time
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Optional, Union

from ..config import AUDIT_ACTIONS, option_text, option_value
from ..errors import PipelineError, UsageError
from ..files import check_output, csv_cell_read, json_text
from .check_images import check_apart, default_quarantine_dir
from .folders import canonical_name, class_index, is_image_name, is_skipped_folder, list_image_folder
from .image_reader import file_digest
from .moves import changing_folder, link_on_the_way, move_no_replace, partial_copies

JOURNAL_KIND = "transfer-pipeline-audit-journal"
#: 2: each move journalled as an intent (fsynced before it), then confirmed ({"moved": n}) once made
JOURNAL_VERSION = 2
FIXES_COLUMNS = ("path", "action", "new_class", "new_name")


def csv_text(p: Path) -> str:
    """The list as text: UTF-8, with or without the byte-order mark a spreadsheet's "CSV UTF-8" writes;
    any other encoding (cp1252, UTF-16) a usage error naming the line."""
    raw = p.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise UsageError(f"{p} line {line}: not UTF-8 text (byte 0x{raw[e.start]:02x}); save the list as "
                         "'CSV UTF-8'") from None


def read_fixes(csv_path) -> list[dict]:
    """The CSV's rows (path, action, new_class, optional new_name), checked for their columns and actions.

    Names are kept exactly as written (a class folder ' dogs' keeps its space); only the action is
    trimmed. Cells are read back from ``SafeCsvWriter``'s escaping (``files.csv_cell_read``)."""
    p = Path(csv_path)
    if not p.is_file():
        raise UsageError(f"{option_value('apply', str(csv_path))} is not a file")
    reader = csv.DictReader(io.StringIO(csv_text(p), newline=""))
    missing = {"path", "action"} - set(reader.fieldnames or ())
    if missing:
        raise UsageError(f"{p}: needs the columns path, action (and new_class for relabel); "
                         f"missing {', '.join(sorted(missing))}")
    rows = []
    for row in reader:
        cells = {k: csv_cell_read(row.get(k) or "") for k in FIXES_COLUMNS}
        action = cells["action"].strip().lower()
        if action not in AUDIT_ACTIONS:
            raise UsageError(f"{p} line {reader.line_num}: action {cells['action']!r}; allowed: "
                             f"{', '.join(AUDIT_ACTIONS)}")
        rows.append({**cells, "line": reader.line_num, "action": action})
    return [r for r in rows if r["action"] != "keep"]


def plan_moves(rows: list[dict], root: Path, qdir: Path) -> list[dict]:
    """(action, from, to) for every row, or UsageError naming every problem before anything moves."""
    listing = list_image_folder(root)
    classes, listed = set(listing.classes), {f.path for f in listing.files}
    forms = listed_forms(listed)
    problems, moves, taken, line_of = [], [], {}, {}
    for r in rows:
        rel = r["path"]
        where = f"line {r['line']} ({rel})"
        parts = PurePosixPath(rel).parts
        if not rel or PurePosixPath(rel).is_absolute() or ".." in parts or len(parts) < 2:
            problems.append(f"{where}: not a path inside the data folder (class/name)")
            continue
        key = listed_name(PurePosixPath(rel).as_posix(), listed, forms)  # 'a//b' and 'a/./b' are 'a/b'
        if key in line_of:
            problems.append(f"{where}: the same file as line {line_of[key]}")
            continue
        line_of[key] = r["line"]
        if key not in listed:
            problems.append(f"{where}: no such file among the folder's photos (missing, not an image, hidden, "
                            "or not a regular file)")
            continue
        src = root / key
        name = r["new_name"] or src.name
        if "/" in name or "\\" in name or not is_image_name(name):
            problems.append(f"{where}: new_name {name!r} is not an image file name")
            continue
        if r["action"] == "relabel":
            k = class_index(listing.classes, r["new_class"])  # 'café' typed in either Unicode form: the folder's
            if k < 0:
                problems.append(f"{where}: new_class {r['new_class']!r} is not a class; allowed: "
                                f"{', '.join(sorted(classes))}")
                continue
            new_class = listing.classes[k]
            if new_class == PurePosixPath(key).parts[0]:
                problems.append(f"{where}: already in class {new_class!r}")
                continue
            dst = root / new_class / name
        else:
            dst = qdir / PurePosixPath(key).parent / name
        link = link_on_the_way(src, root) or link_on_the_way(dst.parent, root if r["action"] == "relabel" else qdir)
        if link:
            problems.append(f"{where}: a link on the way ({link}); apply moves files only within the folders "
                            "themselves")
            continue
        # one place on a case-insensitive disk (blue/A.jpg, blue/a.jpg): the second move would fail part-way
        other = taken.get(str(dst).casefold())
        if other:
            same = f"as line {other[0]} does" if other[1] == dst else \
                f"the same place as line {other[0]}'s {other[1]} on a case-insensitive disk"
            problems.append(f"{where}: moves to {dst}, {same}; give one of them a new_name column value")
            continue
        if os.path.lexists(dst):
            problems.append(f"{where}: {dst} exists already; give this row a new_name column value")
            continue
        taken[str(dst).casefold()] = (r["line"], dst)
        moves.append({"action": r["action"], "from": str(src), "to": str(dst)})
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        rows = "1 row of the list cannot" if len(problems) == 1 else f"{len(problems)} rows of the list cannot"
        raise UsageError(f"nothing was moved: {rows} be applied:\n  {shown}{more}")
    return moves


def listed_forms(listed) -> dict:
    """Each listed path's composed (NFC) form, and the listed paths of it."""
    forms: dict = {}
    for path in listed:
        forms.setdefault(canonical_name(path), []).append(path)
    return forms


def listed_name(key: str, listed, forms: dict) -> str:
    """The folder's own name of the file ``key`` names: itself, else the one listed file that is the same text in
    other Unicode code points (a list edited on a Mac writes 'café.jpg' e + accent, NFD; it was 'no such file' for a
    'café.jpg' written as one letter, and so the other way round). ``key`` where there is none, or several."""
    if key in listed:
        return key
    same = forms.get(canonical_name(key), [])
    return same[0] if len(same) == 1 else key


def _append(journal, record: dict, sync: bool = True) -> None:
    journal.write(json_text(record) + "\n")
    journal.flush()
    if sync:
        os.fsync(journal.fileno())


def undo_command(journal: Path) -> str:
    return f"python cli.py audit --undo {shlex.quote(str(journal))}"


@dataclass(frozen=True)
class FixesResult:
    """audit --apply's and --undo's answer: what moved, the journal, and (--apply) how to undo it."""

    what: str  # "moved" (--apply) or "moved back" (--undo)
    root: str
    moved: int
    relabel: Optional[int]  # --apply only (None after --undo, and not in --json): the moves of each action
    remove: Optional[int]
    quarantine: Optional[str]  # --apply only: where removed files went
    journal: str
    undo: Optional[str]  # --apply only: the command that moves every file back
    moves: Optional[list]  # --apply only: {action, from, to, ...} each
    #: audit's refresh: the folder's new cache ({cache, hit, rows, computed, reused, label_changes}), None when it
    #: had none to refresh; False with --no-refresh (and not in --json)
    refreshed: Union[dict, None, bool] = False

    def to_dict(self) -> dict:
        """The answer as --json prints it: an undo's without the apply-only keys, refreshed only when asked."""
        return {k: v for k, v in asdict(self).items() if not (v is None and k != "refreshed" or v is False)}


def apply_fixes(csv_path, data: str, out_dir: Path, quarantine_dir: Optional[str] = None) -> FixesResult:
    """Move the files of a reviewed list, journalled in ``out_dir/journal.jsonl``; returns what moved."""
    root = Path(data).resolve()
    if not root.is_dir():
        raise UsageError(f"{option_value('data', data)} is not a folder")
    qdir = Path(quarantine_dir).resolve() if quarantine_dir else default_quarantine_dir(root)
    check_output(qdir, data=[(root, "--data")], what="--quarantine-dir", folder=True)
    check_apart(root, qdir)
    rows = read_fixes(csv_path)
    journal = Path(out_dir) / "journal.jsonl"
    if journal.exists():
        raise UsageError(f"{journal} exists already; choose another {option_text('output')}")
    with changing_folder(root):  # planned and moved with no other changer or reader of the folder
        try:
            moves = plan_moves(rows, root, qdir)
        except UsageError as e:
            raise UsageError(f"{e}{moved_by_earlier(rows, root, Path(out_dir))}") from None
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        with open(journal, "x") as j:
            _append(j, {"kind": JOURNAL_KIND, "version": JOURNAL_VERSION, "root": str(root), "quarantine": str(qdir),
                        "list": str(Path(csv_path).resolve()), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
            for n, m in enumerate(moves):
                move_journalled(j, n, m, journal)
    counts = {a: sum(m["action"] == a for m in moves) for a in ("relabel", "remove")}
    return FixesResult(what="moved", root=str(root), moved=len(moves), **counts, quarantine=str(qdir),
                       journal=str(journal), undo=undo_command(journal), moves=moves)


def moved_by_earlier(rows: list[dict], root: Path, out_dir: Path) -> str:
    """A line for a refused list whose files an earlier --apply of the folder moved (its journal beside ``out_dir``,
    in the runs folder, not undone): an apply killed part-way printed no undo command, and applying the list again
    refused its moved rows as 'no such file' with no word of that journal. '' where there is none."""
    for journal in sorted(out_dir.parent.glob("*/journal.jsonl"), reverse=True):  # the newest first
        try:
            head, moves = read_journal(journal)
        except (UsageError, OSError):
            continue
        if head.get("root") != str(root) or Path(f"{journal}.undone").exists():
            continue
        moved = {m["from"] for m in moves if was_moved(m)}
        hits = [r for r in rows if str(root / PurePosixPath(r["path"])) in moved]
        if hits:
            return (f"\n  {len(hits)} of these files were moved by an earlier --apply (stopped part-way, or done "
                    f"already; journal {journal}): undo it with `{undo_command(journal)}`, then apply the list again")
    return ""


def move_journalled(j, n: int, m: dict, journal: Path) -> None:
    """One move: its intent journalled (fsynced) before it, its confirmation after; a move that cannot be
    made stops the apply with the undo command (what moved before it is journalled and confirmed)."""
    src, dst = Path(m["from"]), Path(m["to"])
    stopped = f"stopped; undo what moved with `{undo_command(journal)}`"
    digest = file_digest(src)
    if not digest:
        raise PipelineError(f"{src} vanished or became unreadable while applying; {stopped}")
    made = [str(p) for p in reversed(dst.parents) if not p.exists()]
    dst.parent.mkdir(parents=True, exist_ok=True)
    _append(j, {**m, "n": n, "sha256": digest, "made_folders": made})  # before the move: no move unrecorded
    try:
        move_no_replace(src, dst)
    except FileExistsError:
        raise PipelineError(f"{dst} appeared while applying (another program?); {stopped}") from None
    except OSError as e:
        raise PipelineError(f"cannot move {src} to {dst}: {e.strerror or e}; {stopped}") from None
    _append(j, {"moved": n}, sync=False)  # lost in a crash? undo then looks at the files themselves


def read_journal(path) -> tuple[dict, list[dict]]:
    """The journal's head and its moves, each with ``confirmed`` (its move is known to have been made)."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{option_value('undo', str(path))} is not a file")
    try:
        lines = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{p} is not an audit journal ({e})") from None
    if not lines or not isinstance(lines[0], dict) or lines[0].get("kind") != JOURNAL_KIND:
        raise UsageError(f"{p} is not an audit journal (written by audit --apply)")
    records = [r for r in lines[1:] if isinstance(r, dict)]
    confirmed = {r["moved"] for r in records if isinstance(r.get("moved"), int)}
    moves = [{**m, "confirmed": isinstance(m.get("n"), int) and m["n"] in confirmed}
             for m in records if "from" in m and "to" in m]
    return lines[0], moves


def journal_places(head: dict, journal, data: Optional[str]) -> tuple[Path, Path]:
    """The journal's data folder and quarantine (links resolved), checked: absolute, apart, and the
    data folder the one ``--data`` names when given."""
    root, qdir = head.get("root"), head.get("quarantine")
    if not (isinstance(root, str) and isinstance(qdir, str) and os.path.isabs(root) and os.path.isabs(qdir)):
        raise UsageError(f"{journal} names no data folder and quarantine (not written by audit --apply)")
    root, qdir = Path(os.path.realpath(root)), Path(os.path.realpath(qdir))
    if data is not None and root != Path(data).resolve():
        raise UsageError(f"{journal} is the journal of {root}, not of {option_text('data', data)}; nothing was "
                         "moved back")
    if not root.is_dir():
        raise UsageError(f"the journal's data folder {root} is not a folder; nothing was moved back")
    check_apart(root, qdir)
    return root, qdir


def resolved_inside(path, base: Path) -> bool:
    """Whether ``path``, its folders' links resolved, is an image file name inside ``base`` below a folder of
    it (a class, or the quarantine's copy of one), with no hidden or metadata folder on the way."""
    if not isinstance(path, str) or not os.path.isabs(path):
        return False
    p = Path(path)
    real = Path(os.path.realpath(p.parent)) / p.name
    if not real.is_relative_to(base):
        return False
    parts = real.relative_to(base).parts
    return len(parts) >= 2 and is_image_name(parts[-1]) and not any(is_skipped_folder(x) for x in parts[:-1])


def outside_places(m: dict, root: Path, qdir: Path) -> list[str]:
    """What of one journalled move lies outside the places an undo may touch (empty: nothing)."""
    action = m.get("action")
    if action not in ("relabel", "remove"):
        return [f"action {action!r}"]
    out = [f"{m[k]!r}" for k, base in (("from", root), ("to", root if action == "relabel" else qdir))
           if not resolved_inside(m[k], base)]
    folders = m.get("made_folders", [])
    if not isinstance(folders, list):
        return [*out, f"made_folders {folders!r}"]
    for f in folders:
        real = Path(os.path.realpath(f)) if isinstance(f, str) and os.path.isabs(f) else None
        if real is None or not (real.is_relative_to(root) or real.is_relative_to(qdir) or qdir.is_relative_to(real)):
            out.append(f"folder {f!r}")
    return out


def undo_fixes(journal_path, data: Optional[str] = None) -> FixesResult:
    """Move every journalled file back (last move first); refuses, moving nothing, when the journal names
    a place outside its data folder (or ``data``) and quarantine, or a file is missing, changed, or its old
    place is taken. Folders the apply made and left empty are removed again."""
    head, moves = read_journal(journal_path)
    if Path(str(journal_path) + ".undone").exists():  # written beside the journal by a finished undo
        raise UsageError(f"{journal_path} was undone already")
    root, qdir = journal_places(head, journal_path, data)
    outside = [f"move {i + 1}: {w}" for i, m in enumerate(moves) for w in outside_places(m, root, qdir)]
    if outside:
        raise UsageError(f"nothing was moved back: {journal_path} names places outside its data folder {root} and "
                         f"quarantine {qdir}: {'; '.join(outside[:5])}"
                         f"{f' (and {len(outside) - 5} more)' if len(outside) > 5 else ''}")
    with changing_folder(root):
        for m in moves:
            clear_partial_copies(m)
        done = {i for i, m in enumerate(moves) if was_moved(m)}
        # undone already by an undo that was stopped (killed) part-way, or stopped in the middle of that move
        back = {i for i in done if moved_back(moves[i]) or is_second_name(moves[i]) or is_verified_copy(moves[i])}
        problems = [p for i in sorted(done - back) for p in cannot_move_back(moves[i])]
        if problems:
            raise UsageError(f"nothing was moved back: {'; '.join(problems[:10])}"
                             f"{f' (and {len(problems) - 10} more)' if len(problems) > 10 else ''}")
        for i, m in reversed(list(enumerate(moves))):
            if i in done - back:
                Path(m["from"]).parent.mkdir(parents=True, exist_ok=True)
                move_no_replace(m["to"], m["from"])
            elif is_second_name(m) or is_verified_copy(m):
                os.unlink(m["to"])  # the photo under both names (one file, or a checked copy): the new name goes
            for folder in reversed(m.get("made_folders", [])):
                try:
                    os.rmdir(folder)  # only an empty one
                except OSError:
                    pass
    Path(str(journal_path) + ".undone").write_text(time.strftime("%Y-%m-%dT%H:%M:%S%z") + "\n")
    return FixesResult(what="moved back", root=str(root), moved=len(done), relabel=None, remove=None,
                       quarantine=None, journal=str(journal_path), undo=None, moves=None)


def was_moved(m: dict) -> bool:
    """Whether a journalled move was made: confirmed, or (an intent whose confirmation a crash lost) its file
    is at the new place and not at the old one. An unconfirmed intent is otherwise skipped."""
    return m["confirmed"] or (os.path.isfile(m["to"]) and not os.path.lexists(m["from"]))


def is_second_name(m: dict) -> bool:
    """Whether a move (or its undo) stopped between its hard link and its unlink (``moves.rename_no_replace``
    without renameat2): the photo is under both names, one file."""
    try:
        return os.path.samefile(m["from"], m["to"])
    except OSError:
        return False


def moved_back(m: dict) -> bool:
    """Whether a move was undone already, by an undo stopped part-way (killed): its file is at its old place again,
    with the bytes that were moved, and no longer at the new one. Such an undo is finished by running it again."""
    src, dst = m["from"], m["to"]
    return (not os.path.lexists(dst) and os.path.isfile(src) and not os.path.islink(src)
            and (not m.get("sha256") or file_digest(src) == m["sha256"]))


def is_verified_copy(m: dict) -> bool:
    """Whether a move between file systems (``moves.copy_across``, either way) was stopped after its checked copy
    got its name but before the source was removed: both places hold the journalled bytes, as two files."""
    src, dst = m["from"], m["to"]
    try:
        if os.path.islink(src) or os.path.islink(dst) or os.path.samefile(src, dst):
            return False
    except OSError:
        return False
    return bool(m.get("sha256")) and file_digest(src) == m["sha256"] == file_digest(dst)


def clear_partial_copies(m: dict) -> None:
    """Remove the hidden partial copies (``moves.partial_copies``) a move between file systems left beside either
    place when it was killed: never a photo (the source was still whole), and in a class folder a stray file."""
    for place in (m["from"], m["to"]):
        if isinstance(place, str):
            for tmp in partial_copies(Path(place)):
                tmp.unlink(missing_ok=True)


def cannot_move_back(m: dict) -> list[str]:
    src, dst = Path(m["from"]), Path(m["to"])
    if dst.is_symlink() or not dst.is_file():
        return [f"{dst} is missing"]
    if os.path.lexists(src):
        return [f"{src} exists again"]
    if m.get("sha256") and file_digest(dst) != m["sha256"]:
        return [f"{dst} changed since it was moved"]
    return []
