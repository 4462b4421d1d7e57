"""audit --apply / --undo: checked before anything moves, journalled, undone byte for byte."""
import json
import shutil

import pytest

from pipeline.data.apply_fixes import apply_fixes, read_journal, undo_fixes
from pipeline.errors import UsageError
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
    fixes.write_text("path,action,new_class,new_name\nred/red.0.jpg,relabel,blue,red.0-from-red.jpg\n")
    r = apply_fixes(fixes, data, tmp_path / "run")  # the same move under a free name goes through
    assert r["relabel"] == 1 and (data / "blue" / "red.0-from-red.jpg").read_bytes() == before[
        (data / "red" / "red.0.jpg").relative_to(data)]


def test_an_interrupted_apply_is_undone_from_its_journal(tmp_path, monkeypatch):
    data = make_image_folder(tmp_path / "data", per_class=3)
    before = snapshot(data)
    fixes = tmp_path / "fixes.csv"
    fixes.write_text("path,action,new_class\nred/red.1.jpg,relabel,blue\nblue/blue.2.jpg,remove,\n"
                     "red/red.2.jpg,remove,\n")
    import pipeline.data.apply_fixes as af

    real, calls = af.os.rename, []

    def dies_on_the_third(a, b):
        calls.append(a)
        if len(calls) == 3:
            raise KeyboardInterrupt
        real(a, b)

    monkeypatch.setattr(af.os, "rename", dies_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        apply_fixes(fixes, data, tmp_path / "run")
    monkeypatch.setattr(af.os, "rename", real)
    head, moves = read_journal(tmp_path / "run" / "journal.jsonl")
    assert head["root"] == str(data.resolve()) and len(moves) == 3  # the third journalled, never made
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
        undo_fixes(r["journal"])
    assert (data / "blue" / "red.1.jpg").exists() and not (data / "red" / "red.1.jpg").exists()
