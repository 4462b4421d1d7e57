"""audit --apply / --undo: checked before anything moves, journalled, undone byte for byte."""
import errno
import hashlib
import json
import os
import shutil
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

import pipeline.data.apply_fixes as af
from pipeline.data.apply_fixes import FixesResult, apply_fixes, read_journal, undo_fixes
from pipeline.errors import PipelineError, UsageError
from pipeline.reports.audit import write_fixes_csv
from tests.conftest import make_image_folder


def snapshot(root):
    return {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_a_clash_refuses_the_whole_list(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=3)
    shutil.copy(data / "red" / "red.0.jpg", data / "blue" / "red.0.jpg")
    before = snapshot(data)
    fixes = tmp_path / "fixes.csv"
    fixes.write_text("path,action,new_class\nred/red.1.jpg,relabel,blue\nred/red.0.jpg,relabel,blue\n"
                     "blue/blue.0.jpg,relabel,purple\nred/nope.jpg,remove,\n../x.jpg,remove,\n")
    with pytest.raises(UsageError) as e:
        apply_fixes(fixes, data, tmp_path / "run")
    for why in ("red.0.jpg exists already", "'purple' is not a class", "nope.jpg): no such file",
                "not a path inside the data folder"):
        assert why in str(e.value)
    assert snapshot(data) == before and not (tmp_path / "data.quarantine").exists()
    assert str(e.value).startswith("nothing was moved: 4 rows of the list cannot be applied:\n")
    fixes.write_text("path,action,new_class\nred/red.0.jpg,relabel,blue\n")
    with pytest.raises(UsageError, match="^nothing was moved: 1 row of the list cannot be applied:\n  line 2 "):
        apply_fixes(fixes, data, tmp_path / "run")  # it said '1 rows'
    fixes.write_text("path,action,new_class,new_name\nred/red.0.jpg,relabel,blue,red.0-from-red.jpg\n")
    r = apply_fixes(fixes, data, tmp_path / "run")  # the same move under a free name goes through
    assert isinstance(r, FixesResult) and r.relabel == 1
    assert (data / "blue" / "red.0-from-red.jpg").read_bytes() == before[(data / "red" / "red.0.jpg").relative_to(data)]


def test_an_interrupted_apply_is_undone_from_its_journal(tmp_path, monkeypatch):
    data = make_image_folder(tmp_path / "data", per_class=3)
    before = snapshot(data)
    fixes = tmp_path / "fixes.csv"
    fixes.write_text("path,action,new_class\nred/red.1.jpg,relabel,blue\nblue/blue.2.jpg,remove,\n"
                     "red/red.2.jpg,remove,\n")
    import pipeline.data.apply_fixes as af

    real, calls = af.move_no_replace, []

    def dies_on_the_third(a, b):
        calls.append(a)
        if len(calls) == 3:
            raise KeyboardInterrupt
        real(a, b)

    monkeypatch.setattr(af, "move_no_replace", dies_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        apply_fixes(fixes, data, tmp_path / "run")
    monkeypatch.setattr(af, "move_no_replace", real)
    head, moves = read_journal(tmp_path / "run" / "journal.jsonl")
    assert head["root"] == str(data.resolve()) and len(moves) == 3  # the third journalled, never made
    assert [m["confirmed"] for m in moves] == [True, True, False]
    assert all(len(m["sha256"]) == 64 for m in moves)
    undo_fixes(tmp_path / "run" / "journal.jsonl")
    assert snapshot(data) == before and not (tmp_path / "data.quarantine").exists()


def test_undo_refuses_a_file_changed_since(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=3)
    fixes = tmp_path / "fixes.csv"
    fixes.write_text("path,action,new_class\nred/red.1.jpg,relabel,blue\n")
    r = apply_fixes(fixes, data, tmp_path / "run")
    assert json.loads((tmp_path / "run" / "journal.jsonl").read_text().splitlines()[1])["to"].endswith("blue/red.1.jpg")
    (data / "blue" / "red.1.jpg").write_bytes(b"edited")
    with pytest.raises(UsageError, match="changed since it was moved"):
        undo_fixes(r.journal)
    assert (data / "blue" / "red.1.jpg").exists() and not (data / "red" / "red.1.jpg").exists()


def contents(*roots):
    """Every file's bytes under ``roots``, counted: a file lost or replaced shows as a missing entry."""
    return Counter(p.read_bytes() for root in roots if root.exists() for p in root.rglob("*") if p.is_file())


def test_two_applies_at_once_never_lose_a_file(tmp_path, monkeypatch):
    """Two lists relabelling into the same new names, run at once on a slow disk (each fsync waits for the
    other apply: both plan before either moves): one applies, the other is refused; no photo is lost."""
    data = make_image_folder(tmp_path / "data", per_class=7, classes=("blue", "green", "red"))
    before = contents(data)
    lists = {}
    for c in ("green", "red"):
        lists[c] = tmp_path / f"{c}.csv"
        lists[c].write_text("path,action,new_class,new_name\n" +
                            "".join(f"{c}/{c}.{i}.jpg,relabel,blue,new.{i}.jpg\n" for i in range(6)))
    in_step, real_fsync = threading.Barrier(2), os.fsync

    def slow_fsync(fd):
        try:
            in_step.wait(timeout=1)
        except threading.BrokenBarrierError:
            pass
        time.sleep(0.005)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", slow_fsync)
    from pipeline.data import moves

    monkeypatch.setattr(moves, "LOCK_WAIT_S", 60.0)  # the second waits for the first (then finds the names taken)
    outcome = {}

    def run(c):
        try:
            outcome[c] = apply_fixes(lists[c], data, tmp_path / f"run-{c}").moved
        except (UsageError, PipelineError) as e:
            outcome[c] = str(e)

    threads = [threading.Thread(target=run, args=(c,)) for c in lists]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert contents(data) == before and len(list(data.rglob("*.jpg"))) == 21
    assert sorted(map(str, outcome.values()))[0] == "6" and "exists already" in sorted(map(str, outcome.values()))[1]


@pytest.mark.parametrize("renameat2", [True, False], ids=["renameat2", "link-unlink"])
def test_a_move_onto_an_existing_name_fails_and_loses_nothing(tmp_path, monkeypatch, renameat2):
    from pipeline.data import moves

    if not renameat2 or moves.RENAMEAT2 is None:
        monkeypatch.setattr(moves, "RENAMEAT2", None)
    (tmp_path / "a.jpg").write_bytes(b"a")
    (tmp_path / "b.jpg").write_bytes(b"b")
    with pytest.raises(FileExistsError):
        moves.move_no_replace(tmp_path / "a.jpg", tmp_path / "b.jpg")
    assert (tmp_path / "a.jpg").read_bytes() == b"a" and (tmp_path / "b.jpg").read_bytes() == b"b"
    moves.move_no_replace(tmp_path / "a.jpg", tmp_path / "c.jpg")
    assert not (tmp_path / "a.jpg").exists() and (tmp_path / "c.jpg").read_bytes() == b"a"


def test_extract_and_apply_wait_for_each_other_then_refuse(tmp_path, monkeypatch, make_cache):
    from pipeline.data import moves

    data = make_image_folder(tmp_path / "data", per_class=3)
    before = snapshot(data)
    monkeypatch.setattr(moves, "LOCK_WAIT_S", 0.2)
    fixes = tmp_path / "fixes.csv"
    fixes.write_text("path,action,new_class\nred/red.1.jpg,relabel,blue\n")
    with moves.changing_folder(data):  # an apply (or undo) in progress
        with pytest.raises(moves.FolderBusy, match="being changed by audit --apply"):
            make_cache(data)
    with moves.reading_folder(data):  # an extraction in progress
        with pytest.raises(moves.FolderBusy, match="being read by an extract"):
            apply_fixes(fixes, data, tmp_path / "run")
    assert snapshot(data) == before and not (tmp_path / "features").exists()
    assert make_cache(data).rows == 6 and apply_fixes(fixes, data, tmp_path / "run2").moved == 1


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("bad", ["outside", "linked-parent", "made-folder", "other-data"])
def test_undo_moves_nothing_outside_the_journals_folders(tmp_path, bad):
    """A crafted journal (its head copied from a real one) cannot make undo write outside the data folder."""
    data = make_image_folder(tmp_path / "data", per_class=3)
    fixes = tmp_path / "fixes.csv"
    fixes.write_text("path,action,new_class\nred/red.1.jpg,relabel,blue\n")
    journal = tmp_path / "run" / "journal.jsonl"
    apply_fixes(fixes, data, tmp_path / "run")
    head = journal.read_text().splitlines()[0]
    home = tmp_path / "home" / ".ssh"
    home.mkdir(parents=True)
    payload = tmp_path / "anywhere" / "payload.jpg"
    payload.parent.mkdir()
    payload.write_bytes(b"ssh-ed25519 AAAA attacker")
    record = {"action": "remove", "from": str(home / "authorized_keys"), "to": str(payload), "sha256": _sha(payload)}
    if bad == "linked-parent":
        (data / "red" / "ln").symlink_to(home)
        record.update({"action": "relabel", "from": str(data / "red" / "ln" / "keys.jpg"),
                       "to": str(data / "blue" / "blue.0.jpg"), "sha256": _sha(data / "blue" / "blue.0.jpg")})
    elif bad == "made-folder":
        empty = tmp_path / "someone" / "empty"
        empty.mkdir(parents=True)
        record = {**json.loads(journal.read_text().splitlines()[1]), "made_folders": [str(empty)]}
    crafted = tmp_path / "crafted.jsonl"
    crafted.write_text(head + "\n" + json.dumps(record) + "\n")
    other = make_image_folder(tmp_path / "other", per_class=2)
    with pytest.raises(UsageError, match="not of data=" if bad == "other-data" else "outside its data folder"):
        undo_fixes(crafted, **({"data": str(other)} if bad == "other-data" else {}))
    assert not (home / "authorized_keys").exists() and not (home / "keys.jpg").exists() and payload.exists()
    assert (data / "blue" / "red.1.jpg").exists() and not (data / "red" / "red.1.jpg").exists()
    if bad == "made-folder":
        assert (tmp_path / "someone" / "empty").is_dir()
    undo_fixes(journal)  # the real journal still undoes
    assert (data / "red" / "red.1.jpg").exists()


def test_one_file_written_two_ways_is_refused_naming_both_lines(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=3)
    before = snapshot(data)
    fixes = tmp_path / "fixes.csv"
    fixes.write_text("path,action,new_class\nred/red.0.jpg,relabel,blue\nred//red.0.jpg,remove,\n"
                     "red/./red.1.jpg,remove,\n")
    with pytest.raises(UsageError, match=r"line 3 \(red//red.0.jpg\): the same file as line 2"):
        apply_fixes(fixes, data, tmp_path / "run")
    assert snapshot(data) == before and not (tmp_path / "run" / "journal.jsonl").exists()


def test_a_file_vanishing_mid_apply_stops_it_and_the_journal_still_undoes(tmp_path, monkeypatch):
    """The second photo is removed by another program after the plan: the apply stops before journalling it,
    and the undo moves the first back (a failed row once left sha256 '' and made every undo fail)."""
    data = make_image_folder(tmp_path / "data", per_class=3)
    fixes = tmp_path / "fixes.csv"
    fixes.write_text("path,action,new_class\nred/red.0.jpg,relabel,blue\nred/red.1.jpg,relabel,blue\n")
    real, calls = af.file_digest, []

    def vanishing(path):
        calls.append(path)
        if len(calls) == 2:
            os.unlink(path)
        return real(path)

    monkeypatch.setattr(af, "file_digest", vanishing)
    with pytest.raises(PipelineError, match="vanished .* undo what moved with"):
        apply_fixes(fixes, data, tmp_path / "run")
    monkeypatch.setattr(af, "file_digest", real)
    _, moves = read_journal(tmp_path / "run" / "journal.jsonl")
    assert [m["confirmed"] for m in moves] == [True]
    assert undo_fixes(tmp_path / "run" / "journal.jsonl").moved == 1
    assert (data / "red" / "red.0.jpg").exists() and not (data / "blue" / "red.0.jpg").exists()


def test_an_intent_whose_move_failed_is_skipped_by_undo(tmp_path, monkeypatch):
    data = make_image_folder(tmp_path / "data", per_class=3)
    before = snapshot(data)
    fixes = tmp_path / "fixes.csv"
    fixes.write_text("path,action,new_class\nred/red.0.jpg,relabel,blue\nred/red.1.jpg,remove,\n")
    real = af.move_no_replace

    def fails_on_the_second(a, b):
        if str(a).endswith("red.1.jpg"):
            raise PermissionError(errno.EACCES, "Permission denied")
        real(a, b)

    monkeypatch.setattr(af, "move_no_replace", fails_on_the_second)
    with pytest.raises(PipelineError, match="cannot move .*Permission denied; stopped"):
        apply_fixes(fixes, data, tmp_path / "run")
    monkeypatch.setattr(af, "move_no_replace", real)
    assert undo_fixes(tmp_path / "run" / "journal.jsonl").moved == 1
    assert snapshot(data) == before and not (tmp_path / "data.quarantine").exists()


@pytest.fixture
def two_devices(tmp_path, monkeypatch):
    """The data folder and everything else on two "file systems": a rename or hard link between them
    raises EXDEV, as on a real second mount (renameat2 off, so the patched calls are the ones made)."""
    from pipeline.data import moves

    inside = str((tmp_path / "data").resolve())

    def device(p):
        return str(os.path.abspath(p)).startswith(inside + os.sep)

    for name in ("link", "rename"):
        real = getattr(os, name)

        def across(a, b, *args, real=real, **kw):
            if device(a) != device(b):
                raise OSError(errno.EXDEV, "Invalid cross-device link", str(a), None, str(b))
            return real(a, b, *args, **kw)

        monkeypatch.setattr(os, name, across)
    monkeypatch.setattr(moves, "RENAMEAT2", None)
    return moves


def test_a_quarantine_on_another_file_system_is_copied_verified_and_undone(tmp_path, two_devices):
    data = make_image_folder(tmp_path / "data", per_class=3)
    before = snapshot(data)
    mtime = os.stat(data / "red" / "red.1.jpg").st_mtime_ns
    fixes = tmp_path / "fixes.csv"
    fixes.write_text("path,action,new_class\nred/red.0.jpg,relabel,blue\nred/red.1.jpg,remove,\n")
    r = apply_fixes(fixes, data, tmp_path / "run")
    q = tmp_path / "data.quarantine"
    assert r.moved == 2 and not (data / "red" / "red.1.jpg").exists()
    assert (q / "red" / "red.1.jpg").read_bytes() == before[(data / "red" / "red.1.jpg").relative_to(data)]
    assert os.stat(q / "red" / "red.1.jpg").st_mtime_ns == mtime
    undo_fixes(r.journal)
    assert snapshot(data) == before and not q.exists() and os.stat(data / "red" / "red.1.jpg").st_mtime_ns == mtime


def test_a_copy_with_other_bytes_is_removed_and_nothing_moves(tmp_path, two_devices, monkeypatch):
    (tmp_path / "data").mkdir()
    src, dst = tmp_path / "data" / "a.jpg", tmp_path / "q" / "a.jpg"
    src.write_bytes(b"photo")
    dst.parent.mkdir()
    real = two_devices.file_digest
    monkeypatch.setattr(two_devices, "file_digest", lambda p: "0" * 64 if p.name.endswith(".part") else real(p))
    with pytest.raises(PipelineError, match="gave other bytes"):
        two_devices.move_no_replace(src, dst)
    assert src.read_bytes() == b"photo" and list(dst.parent.iterdir()) == []


def test_apply_moves_only_photos_of_the_folder_itself(tmp_path):
    """A linked sub-folder (red/ext -> outside) and a linked class folder: listed for extract, but apply
    refuses to move a file through either, and a file that is not a photo of the listing (notes.txt)."""
    data = make_image_folder(tmp_path / "data", per_class=3)
    outside = make_image_folder(tmp_path / "outside", per_class=2, classes=("green", "red"))
    (outside / "green" / "notes.txt").write_text("not a photo")
    (data / "red" / "ext").symlink_to(outside / "green")
    (data / "purple").symlink_to(outside / "red")
    before, elsewhere = snapshot(data), snapshot(outside)
    fixes = tmp_path / "fixes.csv"
    fixes.write_text("path,action,new_class\nred/ext/notes.txt,relabel,blue\nred/ext/green.0.jpg,relabel,blue\n"
                     "red/red.0.jpg,relabel,purple\nred/.hidden.jpg,remove,\n")
    with pytest.raises(UsageError) as e:
        apply_fixes(fixes, data, tmp_path / "run")
    text = str(e.value)
    assert "line 2 (red/ext/notes.txt): no such file among the folder's photos" in text
    assert "line 3 (red/ext/green.0.jpg): a link on the way (red/ext ->" in text
    assert "line 4 (red/red.0.jpg): a link on the way (purple ->" in text and "4 rows" in text
    assert snapshot(data) == before and snapshot(outside) == elsewhere


def test_a_spreadsheets_utf8_list_is_read_and_other_encodings_refused_by_line(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=3)
    fixes = tmp_path / "fixes.csv"
    fixes.write_bytes("path,action,new_class\r\nred/red.0.jpg,relabel,blue\r\n".encode("utf-8-sig"))
    assert apply_fixes(fixes, data, tmp_path / "run").moved == 1
    fixes.write_bytes("path,action,new_class\nred/red.1.jpg,keep,\nred/caf\u00e9.jpg,remove,\n".encode("cp1252"))
    with pytest.raises(UsageError, match=r"line 3: not UTF-8 text \(byte 0xe9\); save the list as 'CSV UTF-8'"):
        apply_fixes(fixes, data, tmp_path / "run2")


def test_a_new_class_typed_in_another_unicode_form_is_the_folders_class(tmp_path):
    """new_class 'blé' typed e + accent (NFD: the list edited on a Mac) for a folder 'blé' written as one letter
    (NFC) was refused: "new_class 'blé' is not a class; allowed: blé, red". It is that class: the photo moves into
    the folder there is, never into a second folder of the same name."""
    data = make_image_folder(tmp_path / "data", per_class=3)
    (data / "blue").rename(data / "bl\u00e9")
    fixes = tmp_path / "fixes.csv"
    fixes.write_text("path,action,new_class\nred/red.0.jpg,relabel,ble\u0301\n", encoding="utf-8")
    assert apply_fixes(fixes, data, tmp_path / "run").relabel == 1
    assert (data / "bl\u00e9" / "red.0.jpg").is_file() and sorted(p.name for p in data.iterdir()) == ["bl\u00e9", "red"]


def test_audits_own_list_applies_exactly_odd_names_included(tmp_path):
    """fixes.csv as audit writes it, for a class folder with spaces around its name and a photo named like
    a spreadsheet formula: escaped for spreadsheets (a leading quote), read back by --apply as written."""
    data = make_image_folder(tmp_path / "data", per_class=3)
    (data / "blue").rename(data / " blue ")
    odd = "=cmd|' calc'!A0.jpg"
    (data / "red" / "red.0.jpg").rename(data / "red" / odd)
    (data / "=red").mkdir()
    shutil.copy(data / "red" / "red.1.jpg", data / "=red" / "x.jpg")
    result = {"label_issues": [{"path": f"red/{odd}", "suggested": " blue ", "score": 0.9},
                               {"path": "=red/x.jpg", "suggested": " blue ", "score": 0.8}],
              "duplicates": [], "outliers": []}
    write_fixes_csv(result, tmp_path / "fixes.csv")
    lines = (tmp_path / "fixes.csv").read_text().splitlines()
    assert lines[2].startswith("'=red/x.jpg,") and lines[1].startswith(f"red/{odd},")
    r = apply_fixes(tmp_path / "fixes.csv", data, tmp_path / "run")
    assert r.moved == 2 and (data / " blue " / odd).is_file() and (data / " blue " / "x.jpg").is_file()


def test_a_move_stopped_between_its_link_and_unlink_is_undone_to_one_name(tmp_path, monkeypatch):
    """Without renameat2 a move is a hard link, then an unlink: killed in between, the photo has two names.
    The undo drops the new one (the same file: nothing lost) and the folder is as it was."""
    data = make_image_folder(tmp_path / "data", per_class=3)
    before = snapshot(data)
    fixes = tmp_path / "fixes.csv"
    fixes.write_text("path,action,new_class\nred/red.0.jpg,relabel,blue\nred/red.1.jpg,relabel,blue\n")
    real = af.move_no_replace

    def killed_after_the_link(a, b):
        if str(a).endswith("red.1.jpg"):
            os.link(a, b)
            raise KeyboardInterrupt
        real(a, b)

    monkeypatch.setattr(af, "move_no_replace", killed_after_the_link)
    with pytest.raises(KeyboardInterrupt):
        apply_fixes(fixes, data, tmp_path / "run")
    monkeypatch.setattr(af, "move_no_replace", real)
    assert (data / "blue" / "red.1.jpg").samefile(data / "red" / "red.1.jpg")
    assert undo_fixes(tmp_path / "run" / "journal.jsonl").moved == 1
    assert snapshot(data) == before


def test_two_rows_moving_to_one_name_but_for_case_are_refused_naming_both(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=3)
    before = snapshot(data)
    fixes = tmp_path / "fixes.csv"  # hand-edited: on a case-insensitive disk the second move would fail part-way
    fixes.write_text("path,action,new_class,new_name\nred/red.0.jpg,relabel,blue,A.jpg\n"
                     "red/red.1.jpg,relabel,blue,a.jpg\nred/red.2.jpg,relabel,blue,b.jpg\n")
    with pytest.raises(UsageError) as e:
        apply_fixes(fixes, data, tmp_path / "run")
    problems = str(e.value).splitlines()[1:]
    assert len(problems) == 1 and "line 3 (red/red.1.jpg)" in problems[0] and "line 2's" in problems[0]
    assert "A.jpg" in problems[0] and "a.jpg" in problems[0] and "case-insensitive" in problems[0]
    assert snapshot(data) == before and not (tmp_path / "run" / "journal.jsonl").exists()


def test_an_undo_stopped_part_way_is_finished_by_running_it_again(tmp_path, monkeypatch):
    """A kill in the middle of --undo left some files back and some still moved: running the undo again refused
    ('... is missing' for each file already back) and the folder stayed half undone."""
    data = make_image_folder(tmp_path / "data", per_class=4)
    before = snapshot(data)
    fixes = tmp_path / "fixes.csv"
    fixes.write_text("path,action,new_class\nred/red.0.jpg,relabel,blue\nred/red.1.jpg,remove,\n"
                     "red/red.2.jpg,remove,\nblue/blue.0.jpg,relabel,red\n")
    journal = apply_fixes(fixes, data, tmp_path / "run").journal
    real, calls = af.move_no_replace, []

    def killed_on_the_third(a, b):
        calls.append(a)
        if len(calls) == 3:
            raise KeyboardInterrupt
        real(a, b)

    monkeypatch.setattr(af, "move_no_replace", killed_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        undo_fixes(journal)
    monkeypatch.setattr(af, "move_no_replace", real)
    assert snapshot(data) != before
    assert undo_fixes(journal).moved == 4
    assert snapshot(data) == before and not (tmp_path / "data.quarantine").exists()


@pytest.mark.parametrize("stopped", ["apply", "undo"])
def test_a_move_across_file_systems_killed_after_its_copy_leaves_one_photo(tmp_path, monkeypatch, stopped):
    """Killed between a cross-device copy getting its name and the source's removal (or inside the copy, its
    hidden .NAME.PID.part left): the photo was in both places, the undo skipped (apply) or refused (undo) it, and
    the duplicate and the partial copy stayed in the quarantine."""
    data = make_image_folder(tmp_path / "data", per_class=3)
    before = snapshot(data)
    q = tmp_path / "data.quarantine"
    fixes = tmp_path / "fixes.csv"
    fixes.write_text("path,action,new_class\nred/red.0.jpg,remove,\nred/red.1.jpg,remove,\n")
    real = af.move_no_replace

    def killed_after_the_copy(a, b):
        if str(a).endswith("red.1.jpg"):
            shutil.copy2(a, b)  # the checked copy has its name; the source is not removed yet
            b = Path(b)
            (b.parent / f".{b.name}.{os.getpid() + 1}.part").write_bytes(b"half")  # an earlier try's leftover
            raise KeyboardInterrupt
        real(a, b)

    if stopped == "undo":
        journal = apply_fixes(fixes, data, tmp_path / "run").journal
        monkeypatch.setattr(af, "move_no_replace", killed_after_the_copy)
        with pytest.raises(KeyboardInterrupt):
            undo_fixes(journal)
    else:
        monkeypatch.setattr(af, "move_no_replace", killed_after_the_copy)
        with pytest.raises(KeyboardInterrupt):
            apply_fixes(fixes, data, tmp_path / "run")
        journal = tmp_path / "run" / "journal.jsonl"
    monkeypatch.setattr(af, "move_no_replace", real)
    assert (q / "red" / "red.1.jpg").is_file() and (data / "red" / "red.1.jpg").is_file()
    undo_fixes(journal)
    assert snapshot(data) == before and not q.exists()


def test_applying_again_after_a_killed_apply_names_its_journal_and_the_undo(tmp_path, monkeypatch):
    """A killed --apply prints no undo command; the same command again (a new run folder) refused the moved rows as
    'no such file among the folder's photos' with no word of the earlier journal that undoes them."""
    data = make_image_folder(tmp_path / "data", per_class=3)
    before = snapshot(data)
    fixes = tmp_path / "fixes.csv"
    fixes.write_text("path,action,new_class\nred/red.0.jpg,relabel,blue\nred/red.1.jpg,remove,\nred/red.2.jpg,remove,\n")
    real = af.move_no_replace

    def killed_on_the_third(a, b):
        if str(a).endswith("red.2.jpg"):
            raise KeyboardInterrupt
        real(a, b)

    monkeypatch.setattr(af, "move_no_replace", killed_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        apply_fixes(fixes, data, tmp_path / "runs" / "1-audit-apply")
    monkeypatch.setattr(af, "move_no_replace", real)
    with pytest.raises(UsageError) as e:
        apply_fixes(fixes, data, tmp_path / "runs" / "2-audit-apply")
    journal = tmp_path / "runs" / "1-audit-apply" / "journal.jsonl"
    assert (f"2 of these files were moved by an earlier --apply (stopped part-way, or done already; journal "
            f"{journal}): undo it with `python cli.py audit --undo {journal}`") in str(e.value)
    undo_fixes(journal)
    assert snapshot(data) == before
    assert apply_fixes(fixes, data, tmp_path / "runs" / "3-audit-apply").moved == 3


def test_a_path_written_in_another_unicode_form_is_the_folders_file(tmp_path):
    """A list edited on a Mac writes 'blé/café.jpg' with e + accent (NFD) where the folder's names are one letter
    each (NFC), or the other way round: each row was 'no such file among the folder's photos' though the photo is
    there. It is that photo; the same photo named in both forms on two lines is one file, refused as such."""
    data = make_image_folder(tmp_path / "data", per_class=3)
    (data / "blue").rename(data / "bl\u00e9")
    (data / "red" / "red.0.jpg").rename(data / "red" / "caf\u00e9.jpg")
    (data / "red" / "red.1.jpg").rename(data / "red" / "nai\u0308ve.jpg")  # NFD on disk, NFC in the list
    fixes = tmp_path / "fixes.csv"
    fixes.write_text("path,action,new_class\nred/cafe\u0301.jpg,relabel,bl\u00e9\nred/na\u00efve.jpg,remove,\n"
                     "ble\u0301/blue.0.jpg,relabel,red\n", encoding="utf-8")
    result = apply_fixes(fixes, data, tmp_path / "run")
    assert (result.relabel, result.remove) == (2, 1)
    assert (data / "bl\u00e9" / "caf\u00e9.jpg").is_file() and (data / "red" / "blue.0.jpg").is_file()
    assert (Path(result.quarantine) / "red" / "nai\u0308ve.jpg").is_file()
    fixes.write_text("path,action,new_class\nred/red.2.jpg,remove,\nred/red.2.jpg,keep,\n"
                     "bl\u00e9/blue.1.jpg,remove,\nble\u0301/blue.1.jpg,remove,\n", encoding="utf-8")
    with pytest.raises(UsageError, match=r"line 5 \(ble\u0301/blue.1.jpg\): the same file as line 4"):
        apply_fixes(fixes, data, tmp_path / "run2")
