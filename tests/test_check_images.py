"""check-images: every bad kind named, same verdict as extract's loader, reports and a reversible quarantine."""
from __future__ import annotations

import csv
import json
import os
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.cli import cli
from pipeline.data.check_images import KINDS, MOVED_LIST, CheckImagesConfig, CheckImagesResult, check_images
from pipeline.data.folders import ImageLoadError, list_image_folder, load_rgb
from pipeline.errors import PipelineError
from tests.badfiles import make_bad_corpus, skipped_by_extract, usable
from tests.conftest import make_image_folder
from tests.fsfaults import make_non_regular, no_hang, unlistable


@pytest.fixture
def dirty(tmp_path):
    """A generated two-class folder with one file of each bad kind mixed in: (root, corpus)."""
    root = make_image_folder(tmp_path / "data", per_class=4)
    return root, make_bad_corpus(root)


def by_path(findings):
    out = {}
    for f in findings:
        out.setdefault(f["path"], []).append(f)
    return out


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*")
            if p.is_file() and not p.name.startswith(MOVED_LIST)}


def test_each_bad_kind_is_named_with_its_severity(dirty):
    root, corpus = dirty
    result = check_images(CheckImagesConfig(str(root), workers=2))
    found = by_path(result.findings)
    for rel, expected in corpus.items():
        kinds = {f["kind"]: f["severity"] for f in found.get(rel, [])}
        assert expected.kind in kinds, (rel, found.get(rel))
        assert kinds[expected.kind] == ("error" if expected.is_error else "note"), rel
    assert set(found) == set(corpus), "the generated good JPEGs must have no findings"
    assert isinstance(result, CheckImagesResult) and result.files == 8 + len(corpus)
    assert result.errors == sum(b.is_error for b in corpus.values())
    assert result.notes == len(usable(corpus))
    assert set(result.by_kind) <= set(KINDS)


def test_details_say_which_mode_format_and_warning(dirty):
    root, _ = dirty
    found = by_path(check_images(CheckImagesConfig(str(root), workers=1)).findings)
    detail = {p: " | ".join(f["detail"] for f in fs) for p, fs in found.items()}
    assert "mode CMYK" in detail["blue/note.cmyk.jpg"]
    assert "mode L," in detail["red/note.gray.jpg"]
    assert "mode RGBA" in detail["blue/note.rgba.png"]
    assert "P with transparency" in detail["red/note.palette-transparent.png"]
    assert "I;16" in detail["blue/note.16bit.png"]
    assert "PNG content named .jpg" in detail["blue/note.png-named.jpg"]
    assert "GIF content named .jpg" in detail["red/note.gif-named.jpg"]
    assert "900000000 pixels" in detail["red/bad.bomb.png"]
    assert "truncated" in detail["red/bad.truncated.jpg"]
    assert "extract ignores it" in detail["red/notes.txt"]


@pytest.mark.filterwarnings("ignore:Truncated File Read")  # the corrupt-EXIF note, loaded directly here
def test_errors_are_exactly_what_extracts_loader_rejects(dirty):
    root, corpus = dirty
    rejected = set()
    for f in list_image_folder(root).files:
        try:
            load_rgb(root / f.path)
        except ImageLoadError:
            rejected.add(f.path)
    assert rejected == skipped_by_extract(corpus)
    errors = {f["path"] for f in check_images(CheckImagesConfig(str(root), workers=1)).findings
              if f["severity"] == "error"}
    listed = {f.path for f in list_image_folder(root).files}
    assert errors & listed == rejected


def test_a_class_folder_linking_to_another_is_not_called_empty(tmp_path):
    """A link `blue2 -> blue` was named a class folder 'extract refuses' (its photos are walked once, under
    blue); extract leaves such a link out, so check-images must not send the user to fix it."""
    data = make_image_folder(tmp_path / "d", per_class=2)
    (data / "blue2").symlink_to("blue", target_is_directory=True)
    assert check_images(CheckImagesConfig(root=str(data))).empty_classes == []


def test_class_folders_extract_would_refuse_are_named(tmp_path):
    """check-images passed a folder extract then refused ('class folder ... holds no images'): an empty class
    folder, or one whose only images are broken (empty once quarantined). Named, with what to do; the others not."""
    data = make_image_folder(tmp_path / "d", per_class=2)
    (data / "empty").mkdir()
    (data / "broken").mkdir()
    (data / "broken" / "x.jpg").write_bytes(b"")
    (data / "broken" / "Thumbs.db").write_bytes(b"junk")  # no image extension: no photo either
    r = CliRunner().invoke(cli, ["check-images", str(data)])
    assert r.exit_code == 0 and check_images(CheckImagesConfig(root=str(data))).empty_classes == ["broken", "empty"]
    assert (f"class folders without a usable image (extract refuses {data} while they are there: add photos or move "
            "them out): broken, empty") in r.stdout
    with pytest.raises(Exception, match="holds no images"):
        list_image_folder(data)


def test_the_oss_own_files_are_no_finding_and_never_moved(tmp_path):
    """check-images called Finder's .DS_Store, Explorer's Thumbs.db and desktop.ini and a macOS copy's ._ files
    not-an-image errors and --quarantine moved them out of the class folders, though extract never lists them:
    like __MACOSX, they are no photo and no error. Another file that is no image (notes.txt) is still an error."""
    root = make_image_folder(tmp_path / "data", per_class=2)
    junk = {"blue/.DS_Store": b"\0\0\0\1Bud1", "blue/Thumbs.db": b"\xd0\xcf\x11\xe0", "red/desktop.ini": b"[x]\n",
            "red/THUMBS.DB": b"x", "red/._red.0.jpg": b"\0\5\26\7", ".DS_Store": b"\0\0\0\1Bud1"}
    for rel, data in junk.items():
        (root / rel).write_bytes(data)
    (root / "red" / "notes.txt").write_text("shot in May\n")
    res = CliRunner().invoke(cli, ["check-images", str(root), "--quarantine", "--json"])
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
    assert [f["path"] for f in r["findings"]] == ["red/notes.txt"] and (r["files"], r["errors"]) == (5, 1)
    assert all((root / rel).read_bytes() == data for rel, data in junk.items())
    assert not (root / "red" / "notes.txt").exists() and r["quarantine"]["moved"] == 1
    assert len(list_image_folder(root).files) == 4


def test_an_image_without_image_extension_is_reported(tmp_path):
    root = make_image_folder(tmp_path / "data", per_class=1)
    (root / "blue" / "blue.0.jpg").rename(root / "blue" / "photo.jpeg.bak")
    [f] = check_images(CheckImagesConfig(str(root), workers=1)).findings
    assert (f["path"], f["kind"], f["severity"]) == ("blue/photo.jpeg.bak", "unlisted-image", "note")


def test_quarantine_moves_errors_keeping_paths_and_the_printed_command_restores_them(dirty, tmp_path):
    root, corpus = dirty
    before = snapshot(root)
    report = tmp_path / "report.csv"
    res = CliRunner().invoke(cli, ["check-images", str(root), "--quarantine", "--report", str(report),
                                   "--workers", "2"])
    assert res.exit_code == 0, res.output
    qdir = tmp_path / "data.quarantine"
    errors = {p for p, b in corpus.items() if b.is_error}
    moved = snapshot(qdir)
    assert set(moved) == errors
    assert all(moved[p] == before[p] for p in errors)
    assert snapshot(root) == {p: b for p, b in before.items() if p not in errors}
    assert f"moved {len(errors)} files to {qdir}" in res.stdout

    rows = list(csv.DictReader(report.open()))
    assert {r["path"] for r in rows} == set(corpus)
    assert {(r["path"], r["kind"]) for r in rows} >= {(p, b.kind) for p, b in corpus.items()}

    restore = res.stdout.strip().splitlines()[-1].strip()
    subprocess.run(restore, shell=True, check=True)
    assert snapshot(root) == before


def test_the_restore_command_moves_back_only_what_its_run_moved(tmp_path):
    """audit --apply's removals and other runs' files share a quarantine: the restore command moved every file of
    it (then: every file a check-images run had ever listed there, into whichever folder the command named)."""
    root, other = (make_image_folder(tmp_path / name, per_class=1) for name in ("data", "other"))
    qdir = tmp_path / "q"
    (qdir / "red").mkdir(parents=True)
    (qdir / "red" / "removed by audit.jpg").write_bytes(b"audit's")
    (root / "red" / "empty one.jpg").write_bytes(b"")
    first = check_images(CheckImagesConfig(str(root), workers=1, quarantine_dir=str(qdir)))
    (root / "notes.txt").write_bytes(b"")
    second = check_images(CheckImagesConfig(str(root), workers=1, quarantine_dir=str(qdir)))
    (other / "blue" / "bad.jpg").write_bytes(b"")
    third = check_images(CheckImagesConfig(str(other), workers=1, quarantine_dir=str(qdir)))
    assert snapshot(qdir) == {"red/removed by audit.jpg": b"audit's", "red/empty one.jpg": b"", "notes.txt": b"",
                              "blue/bad.jpg": b""}
    subprocess.run(second.quarantine["restore"], shell=True, check=True)
    assert set(snapshot(qdir)) == {"red/removed by audit.jpg", "red/empty one.jpg", "blue/bad.jpg"}
    assert (root / "notes.txt").exists() and not (root / "blue" / "bad.jpg").exists()
    subprocess.run(third.quarantine["restore"], shell=True, check=True)
    subprocess.run(first.quarantine["restore"], shell=True, check=True)
    assert snapshot(qdir) == {"red/removed by audit.jpg": b"audit's"} and not list(qdir.glob(MOVED_LIST + "*"))
    assert (root / "red" / "empty one.jpg").exists() and (other / "blue" / "bad.jpg").exists()


def test_a_restore_that_cannot_move_a_file_back_keeps_its_list(tmp_path):
    root = make_image_folder(tmp_path / "data", per_class=1)
    (root / "red" / "empty.jpg").write_bytes(b"")
    result = check_images(CheckImagesConfig(str(root), workers=1, quarantine=True))
    (root / "red" / "empty.jpg").write_bytes(b"a new file in its place")
    assert subprocess.run(result.quarantine["restore"], shell=True).returncode != 0
    qdir = tmp_path / "data.quarantine"
    assert (root / "red" / "empty.jpg").read_bytes() == b"a new file in its place"
    assert (qdir / "red" / "empty.jpg").read_bytes() == b"" and len(list(qdir.glob(MOVED_LIST + "-*"))) == 1


def test_nothing_to_move_prints_no_restore_command(tmp_path):
    root = make_image_folder(tmp_path / "data", per_class=1)
    res = CliRunner().invoke(cli, ["check-images", str(root), "--quarantine", "--workers", "1"])
    assert res.exit_code == 0 and "moved 0 files" in res.stdout and "move them back" not in res.stdout


def test_quarantine_refuses_to_overwrite(dirty, tmp_path):
    root, _ = dirty
    (tmp_path / "q" / "blue").mkdir(parents=True)
    (tmp_path / "q" / "blue" / "bad.zero.jpg").write_bytes(b"older")
    before = snapshot(root)
    res = CliRunner().invoke(cli, ["check-images", str(root), "--quarantine-dir", str(tmp_path / "q")])
    assert res.exit_code == 1 and "already holds" in res.output
    assert snapshot(root) == before


def test_quarantine_never_replaces_a_file_that_appears_after_the_check(dirty, tmp_path, monkeypatch):
    """The names are checked first, then moved: a file written into the quarantine in between (another
    run, a user) stays, and the photo stays where it was (the old shutil.move replaced it)."""
    from pipeline.data import check_images as ci

    root, corpus = dirty
    qdir = tmp_path / "q"
    bad = sorted(p for p, b in corpus.items() if b.is_error)
    real_mkdir = Path.mkdir

    def mkdir_then_race(self, *a, **kw):
        real_mkdir(self, *a, **kw)
        target = self / Path(bad[0]).name
        if self.parent == qdir and not target.exists() and (root / bad[0]).parent.name == self.name:
            target.write_bytes(b"someone else's")

    monkeypatch.setattr(Path, "mkdir", mkdir_then_race)
    with pytest.raises(PipelineError, match="File exists.*0 of 1 files moved"):
        ci.quarantine(root, qdir, [bad[0]])
    assert (qdir / bad[0]).read_bytes() == b"someone else's"
    assert (root / bad[0]).exists()


def test_a_quarantine_that_cannot_take_a_file_is_one_line_and_a_rerun_goes_on(dirty, tmp_path):
    """A file where the quarantine needs a folder (or a read-only quarantine) was 'unexpected
    FileExistsError ... a bug?'."""
    root, corpus = dirty
    qdir = tmp_path / "q"
    qdir.mkdir()
    (qdir / "red").write_text("in the way")
    args = ["check-images", str(root), "--quarantine-dir", str(qdir), "--workers", "1"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 1 and len(res.output.strip().splitlines()) == 1, res.output
    assert f"cannot move {root}/red/" in res.output and "run the same command again once fixed" in res.output
    assert "bug" not in res.output
    (qdir / "red").unlink()
    assert CliRunner().invoke(cli, args).exit_code == 0
    assert set(snapshot(qdir)) == {p for p, b in corpus.items() if b.is_error}


def test_a_link_inside_the_quarantine_folder_is_refused_before_anything_moves(tmp_path):
    """q/red -> elsewhere: the broken file landed in elsewhere, and the printed restore command moved the
    link itself into the data folder."""
    root = make_image_folder(tmp_path / "data", per_class=1)
    (root / "red" / "empty.jpg").write_bytes(b"")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "red").symlink_to(tmp_path / "elsewhere")
    res = CliRunner().invoke(cli, ["check-images", str(root), "--quarantine-dir", str(tmp_path / "q")])
    assert res.exit_code == 1 and "holds a link on the way to red/empty.jpg" in res.output, res.output
    assert (root / "red" / "empty.jpg").exists() and list((tmp_path / "elsewhere").iterdir()) == []


def test_a_name_with_a_newline_or_esc_is_one_escaped_line_of_the_table(tmp_path):
    """A photo named 'bad\\nline.jpg' broke the table in two, and ESC sequences in a name (an unpacked archive's)
    went to the terminal as they were."""
    root = make_image_folder(tmp_path / "data", per_class=1)
    (root / "red" / "bad\nline.jpg").write_bytes(b"")
    (root / "red" / "x\x1b[2Jy.jpg").write_bytes(b"")
    res = CliRunner().invoke(cli, ["check-images", str(root), "--workers", "1"])
    assert res.exit_code == 0 and "\x1b" not in res.stdout
    assert "  red/bad\\nline.jpg: zero-byte file\n" in res.stdout and "  red/x\\x1b[2Jy.jpg: zero-byte" in res.stdout
    assert "zero-byte            error         2  red/bad\\nline.jpg\n" in res.stdout


def test_json_report_and_json_stdout(dirty, tmp_path):
    root, corpus = dirty
    report = tmp_path / "out" / "report.json"
    res = CliRunner().invoke(cli, ["check-images", str(root), "--report", str(report), "--json", "--workers", "1"])
    assert res.exit_code == 0, res.output
    printed, written = json.loads(res.stdout), json.loads(report.read_text())
    assert printed["findings"] == written["findings"]
    assert printed["errors"] == sum(b.is_error for b in corpus.values())
    assert printed["quarantine"] is None


@pytest.mark.parametrize("args, message", [
    (["{missing}"], "does not exist"),
    (["{root}", "--report", "{tmp}/r.txt"], ".csv, .json"),
    (["{root}", "--quarantine-dir", "{root}/q"], "inside the data folder"),
    (["{root}", "--report", "{root}/red/r.csv"], "inside the data folder"),
    (["{root}", "--workers", "-3"], "--workers"),
    (["{root}", "--quarantine-dir", "{tmp}"], "must be apart"),
    (["{root}", "--quarantine-dir", "{tmp}/q", "--report", "{tmp}/q/r.csv"], "inside the quarantine folder"),
    (["{root}", "--quarantine-dir", "{tmp}/r.csv", "--report", "{tmp}/r.csv"], "inside the quarantine folder"),
])
def test_usage_errors_exit_2_with_one_line(tmp_path, args, message):
    root = make_image_folder(tmp_path / "data", per_class=1)
    fill = {"missing": tmp_path / "nope", "root": root, "tmp": tmp_path}
    res = CliRunner().invoke(cli, ["check-images", *[a.format(**fill) for a in args]])
    assert res.exit_code == 2
    assert message in res.output and len(res.output.strip().splitlines()) == 1
    assert not (root / "q").exists()


def entries(root: Path) -> set[str]:
    """Every non-folder entry below root, links and pipes included."""
    return {p.relative_to(root).as_posix() for p in root.rglob("*")
            if (p.is_symlink() or not p.is_dir()) and not p.name.startswith(MOVED_LIST)}


def test_links_and_pipes_are_errors_quarantined_and_restored(tmp_path):
    root = make_image_folder(tmp_path / "data", per_class=2)
    reasons = make_non_regular(root / "red")
    (root / "red" / "plain.txt").symlink_to("/nonexistent")  # not an image name: still checked, still moved
    before = entries(root)
    with no_hang(60):
        result = check_images(CheckImagesConfig(str(root), workers=1, quarantine=True))
    found = by_path(result.findings)
    for name, why in reasons.items():
        [f] = found[f"red/{name}"]
        assert f["kind"] == "not-a-file" and f["severity"] == "error" and why in f["detail"]
    assert found["red/plain.txt"][0]["kind"] == "not-a-file"
    qdir = tmp_path / "data.quarantine"
    assert entries(qdir) == {f"red/{n}" for n in [*reasons, "plain.txt"]}
    subprocess.run(result.quarantine["restore"], shell=True, check=True)
    assert entries(root) == before and entries(qdir) == set()
    assert (root / "red" / "pipe.jpg").is_fifo() and (root / "red" / "loop.jpg").is_symlink()


def test_quarantine_never_moves_a_file_out_of_a_linked_folder_elsewhere(tmp_path):
    """A linked sub-folder (or class folder) is checked, but its files lie outside the checked folder:
    quarantining them moved them out of the folder elsewhere."""
    root = make_image_folder(tmp_path / "data", per_class=2)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "broken.jpg").write_bytes(b"")
    (root / "red" / "linked").symlink_to(elsewhere)
    (root / "blue" / "empty.jpg").write_bytes(b"")
    (root / "red" / "sub").mkdir()
    (root / "red" / "sub" / "empty.jpg").write_bytes(b"")
    (root / "blue" / "alias").symlink_to(root / "red" / "sub")  # linked, but inside the checked folder: moved
    res = CliRunner().invoke(cli, ["check-images", str(root), "--quarantine", "--workers", "1"])
    assert res.exit_code == 0, res.output
    assert "red/linked/broken.jpg: zero-byte file" in res.stdout
    assert (elsewhere / "broken.jpg").is_file(), "a file outside the checked folder was moved"
    assert entries(tmp_path / "data.quarantine") == {"blue/empty.jpg", "blue/alias/empty.jpg"}
    assert "left 1 file in place: they are in linked folders" in res.stdout and "red/linked/broken.jpg)" in res.stdout


def test_quarantining_one_class_folder_never_adds_a_class_to_its_parent(tmp_path):
    """check-images data/red --quarantine puts data/red.quarantine beside it: extract of data took it for
    a third class (of broken files only)."""
    root = make_image_folder(tmp_path / "data", per_class=2)
    (root / "red" / "empty.jpg").write_bytes(b"")
    res = CliRunner().invoke(cli, ["check-images", str(root / "red"), "--quarantine", "--workers", "1"])
    assert res.exit_code == 0 and (root / "red.quarantine" / "empty.jpg").is_file(), res.output
    assert list_image_folder(root).classes == ("blue", "red")
    again = check_images(CheckImagesConfig(str(root), workers=1))
    assert again.errors == 0 and again.files == 4


def test_links_and_pipes_are_quarantined_onto_another_file_system_too(tmp_path, monkeypatch):
    """Between file systems a move is a copy of the bytes: a dangling link had none ('unexpected
    FileNotFoundError'), and opening a pipe to copy it blocked forever."""
    import errno

    from pipeline.data import moves

    def across(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link", str(src), None, str(dst))

    monkeypatch.setattr(moves, "rename_no_replace", across)
    root = make_image_folder(tmp_path / "data", per_class=1)
    reasons = make_non_regular(root / "red")
    with no_hang(20):
        result = check_images(CheckImagesConfig(str(root), workers=1, quarantine=True))
    qdir = tmp_path / "data.quarantine"
    assert entries(qdir) == {f"red/{n}" for n in reasons} and result.quarantine["moved"] == len(reasons)
    assert os.readlink(qdir / "red" / "dangling.jpg") == "/nonexistent/x.jpg" and (qdir / "red" / "pipe.jpg").is_fifo()
    assert not any(os.path.lexists(root / "red" / n) for n in reasons)


def test_a_name_that_is_not_utf8_is_an_error_shown_escaped_in_every_output(tmp_path):
    import os

    root = make_image_folder(tmp_path / "data", per_class=2)
    (root / "red" / "red.0.jpg").rename(root / "red" / os.fsdecode(b"caf\xe9.jpg"))
    report = tmp_path / "r.csv"
    result = CliRunner().invoke(cli, ["check-images", str(root), "--report", str(report)])
    assert result.exit_code == 0, result.output
    assert "red/caf\\xe9.jpg" in result.output and "red/caf\\xe9.jpg,bad-name,error" in report.read_text()


def test_csv_report_cells_never_start_a_formula(tmp_path):
    """A class folder named like a spreadsheet formula: the report's path cells start with a single quote."""
    root = make_image_folder(tmp_path / "data", per_class=2)
    odd = root / "@SUM(1+1)"
    odd.mkdir()
    (root / "red" / "red.0.jpg").rename(odd / "good.jpg")
    (odd / "empty.jpg").write_bytes(b"")
    report = tmp_path / "report.csv"
    check_images(CheckImagesConfig(str(root), report=str(report), workers=1))
    rows = list(csv.DictReader(report.open()))
    assert [r["path"] for r in rows] == ["'@SUM(1+1)/empty.jpg"] and rows[0]["kind"] == "zero-byte"


def test_an_unreadable_exif_block_is_a_note_and_the_photo_is_good(tmp_path, monkeypatch):
    """Pillow cannot read the EXIF block: the photo still decodes, as stored (not turned upright), which
    check-images says in a note; a readable block says nothing."""
    import numpy as np
    from PIL import Image

    from pipeline.data.check_images import check_file
    from tests.test_image_reader import STORED_AS, asymmetric, save_turned

    root = make_image_folder(tmp_path / "data", per_class=1)
    rel = "red/phone.png"
    save_turned(asymmetric(), root / rel, 6)
    assert check_file(str(root), rel) == []

    def broken(self):
        raise SyntaxError("not a TIFF file")

    monkeypatch.setattr(Image.Image, "getexif", broken)
    found = check_file(str(root), rel)
    assert [(f["kind"], f["severity"]) for f in found] == [("exif-unreadable", "note")]
    assert "SyntaxError: not a TIFF file" in found[0]["detail"] and "not turned upright" in found[0]["detail"]
    stored = asymmetric().transpose(STORED_AS[6])
    assert np.array_equal(np.asarray(load_rgb(root / rel)), np.asarray(stored))


def test_folders_the_walk_leaves_out_are_named_and_never_moved(tmp_path, monkeypatch):
    """A sub-folder the OS would not list and a link back up the tree were left out in silence: check-images said
    the folder was clean while extract missed the locked folder's photos. The first is an error, the second a note
    (its photos are checked once, by their own path); --quarantine moves neither."""
    root = make_image_folder(tmp_path / "data", per_class=1)
    (root / "red" / "locked").mkdir()
    (root / "red" / "locked" / "x.jpg").write_bytes((root / "red" / "red.0.jpg").read_bytes())
    (root / "blue" / "up").symlink_to("..", target_is_directory=True)
    unlistable(monkeypatch, root / "red" / "locked")
    r = CliRunner().invoke(cli, ["check-images", str(root), "--quarantine", "--workers", "1"])
    assert r.exit_code == 0, r.output
    assert "red/locked: cannot be read (Permission denied): its files are left out" in r.stdout
    # the summary said '0 with errors' above a table of one error: it counts files, and now names the folder apart
    assert "0 with errors, 0 with notes only; 1 folder the OS will not list, its files unseen" in r.stdout
    result = check_images(CheckImagesConfig(str(root)))
    found = {f["path"]: (f["kind"], f["severity"]) for f in result.findings}
    assert found == {"red/locked": ("unreadable-folder", "error"), "blue/up": ("folder-reached-twice", "note")}
    assert result.unreadable_folders == ["red/locked"] and result.errors == 0
    assert (root / "red" / "locked" / "x.jpg").is_file() and (root / "blue" / "up").is_symlink()


def test_a_class_folder_the_os_will_not_list_is_not_also_an_empty_class(tmp_path, monkeypatch):
    """It was named twice, the second time as a class without a usable image, 'add photos or move them out', of a
    folder full of photos: extract says 'cannot be read ...; fix its permissions'. Its unreadable-folder error alone."""
    root = make_image_folder(tmp_path / "data", per_class=1)
    (root / "green").mkdir()
    unlistable(monkeypatch, root / "red")
    r = CliRunner().invoke(cli, ["check-images", str(root), "--workers", "1"])
    assert r.exit_code == 0, r.output
    assert "red: cannot be read (Permission denied)" in r.stdout
    [line] = [x for x in r.stdout.splitlines() if x.startswith("class folders without a usable image")]
    assert line.endswith("move them out): green")
    assert check_images(CheckImagesConfig(str(root))).empty_classes == ["green"]


def test_an_empty_folder_is_refused_as_extract_refuses_it(tmp_path, monkeypatch):
    """check-images on an empty folder (a mistyped path, a download that unpacked nothing) said 'checked 0 files
    ... 0 with errors' and exit 0, where extract and audit refuse it: now one usage line. A folder the OS will not
    list is still reported, not called empty."""
    (tmp_path / "empty" / "class").mkdir(parents=True)
    r = CliRunner().invoke(cli, ["check-images", str(tmp_path / "empty")])
    assert r.exit_code == 2 and f"folder {str(tmp_path / 'empty')!r} holds no files to check" in r.output, r.output
    (tmp_path / "partly" / "locked").mkdir(parents=True)
    unlistable(monkeypatch, tmp_path / "partly" / "locked")
    assert check_images(CheckImagesConfig(str(tmp_path / "partly"))).unreadable_folders == ["locked"]


@pytest.mark.parametrize("workers, said", [("0", "in this process"), ("1", "in this process"), ("2", "2 workers")])
def test_the_summary_says_how_the_files_were_decoded(tmp_path, workers, said):
    """--workers 0 printed '0 workers' and 1 '1 workers', both decoding in this process."""
    root = make_image_folder(tmp_path / "data", per_class=2)
    r = CliRunner().invoke(cli, ["check-images", str(root), "--workers", workers])
    assert r.exit_code == 0 and f"s, {said}): 0 with errors" in r.stdout, r.output


def test_a_file_of_several_frames_is_a_note_naming_its_frames(tmp_path):
    """An animated GIF or a multi-page TIFF was a good file without a word (a GIF: 'non-rgb-mode' alone), though
    extract uses its first frame alone; now a 'first-frame-only' note says so. A multi-picture JPEG (MPO: a photo
    and its preview) is no such note."""
    from PIL import Image

    from pipeline.data.check_images import check_file

    root = tmp_path / "d"
    (root / "red").mkdir(parents=True)
    frames = [Image.new("RGB", (40, 32), c) for c in [(250, 20, 20), (20, 250, 20), (20, 20, 250)]]
    frames[0].save(root / "red" / "pages.tif", save_all=True, append_images=frames[1:])
    frames[0].save(root / "red" / "stereo.jpg", "MPO", save_all=True, append_images=frames[1:2])
    assert check_file(str(root), "red/pages.tif") == [
        {"path": "red/pages.tif", "kind": "first-frame-only", "severity": "note",
         "detail": "a TIFF of 3 frames: only the first is used"}]
    assert check_file(str(root), "red/stereo.jpg") == []


def restore_all(root: Path, qdir: Path) -> None:
    """Run the restore command of every run's list in ``qdir`` (what a user does after runs that were killed)."""
    from pipeline.data.check_images import restore_command

    for listing in sorted(qdir.glob(MOVED_LIST + "-*")):
        subprocess.run(restore_command(root, qdir, listing.name), shell=True, check=True)


@pytest.mark.parametrize("killed", ["after the move", "after another disk's copy"])
def test_a_quarantine_killed_mid_move_is_finished_by_a_rerun_and_fully_restored(dirty, tmp_path, monkeypatch, killed):
    """kill -9 right after a file moved, before its run listed it: the restore commands never moved it back (a
    photo stranded in the quarantine). Killed between a copy to another disk getting its name and the source's
    removal: the file was in both places and every rerun refused ('quarantine folder ... already holds')."""
    from pipeline.data import check_images as ci

    root, corpus = dirty
    before = snapshot(root)
    qdir = tmp_path / "q"
    errors = sorted(p for p, b in corpus.items() if b.is_error and (root / p).is_file()
                    and not (root / p).is_symlink())
    real = ci.move_no_replace

    def killed_mid_move(a, b):
        if Path(a) == root / errors[1]:
            if killed == "after the move":
                real(a, b)
            else:
                subprocess.run(["cp", "-p", str(a), str(b)], check=True)
                Path(b).with_name(f".{Path(b).name}.{os.getpid() + 1}.part").write_bytes(b"half")
            raise KeyboardInterrupt  # the state a kill -9 at that moment leaves
        real(a, b)

    monkeypatch.setattr(ci, "move_no_replace", killed_mid_move)
    cfg = CheckImagesConfig(str(root), workers=1, quarantine_dir=str(qdir))
    with pytest.raises(KeyboardInterrupt):
        check_images(cfg)
    monkeypatch.setattr(ci, "move_no_replace", real)
    again = check_images(cfg)
    assert set(snapshot(qdir)) == {p for p, b in corpus.items() if b.is_error}
    assert not [p for p in qdir.rglob(".*.part")] and errors[1] not in snapshot(root)
    assert again.quarantine["restore"]
    restore_all(root, qdir)
    assert snapshot(root) == before and snapshot(qdir) == {}


def test_two_quarantines_of_one_folder_at_once_move_each_file_once_without_an_error(dirty, tmp_path, caplog):
    """Two check-images --quarantine of one folder at once: the second, once the first had moved the files, failed
    with 'cannot move ...: No such file or directory; 0 of 11 files moved' (or 'quarantine folder ... already holds')
    (exit 1). Now it leaves out the files gone meanwhile, saying so, and ends without an error."""
    root, corpus = dirty
    before = snapshot(root)
    cfg = CheckImagesConfig(str(root), workers=1, quarantine=True)
    first = {}

    def the_other_run_moves_first(summary):
        first["result"] = check_images(cfg)

    second = check_images(cfg, before_moving=the_other_run_moves_first)
    errors = {p for p, b in corpus.items() if b.is_error}
    assert first["result"].quarantine["moved"] == len(errors) and second.quarantine["moved"] == 0
    assert f"{len(errors)} of the {len(errors)} files to quarantine were gone" in caplog.text
    assert set(snapshot(tmp_path / "data.quarantine")) == errors
    subprocess.run(first["result"].quarantine["restore"], shell=True, check=True)
    assert snapshot(root) == before


def test_a_quarantine_filling_its_disk_stops_in_one_line_and_lists_only_what_moved(dirty, tmp_path, monkeypatch):
    """A quarantine on a disk that fills: 'cannot move ...: No space left on device (None); ...' (the OSError names no
    file). Now no '(None)'; the run's list names exactly the files moved, and the same command goes on once fixed."""
    import errno

    from pipeline.data import check_images as ci

    root, corpus = dirty
    before = snapshot(root)
    qdir = tmp_path / "q"
    real, moved = ci.move_no_replace, []

    def fills_at_the_third(a, b):
        if len(moved) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(a, b)
        moved.append(b)

    monkeypatch.setattr(ci, "move_no_replace", fills_at_the_third)
    cfg = CheckImagesConfig(str(root), workers=1, quarantine_dir=str(qdir))
    with pytest.raises(PipelineError) as e:
        check_images(cfg)
    assert "No space left on device; 2 of " in str(e.value) and "None" not in str(e.value)
    (listing,) = qdir.glob(MOVED_LIST + "-*")
    assert listing.read_bytes().split(b"\0")[:-1] == [os.fsencode(Path(b).relative_to(qdir)) for b in moved]
    monkeypatch.setattr(ci, "move_no_replace", real)
    check_images(cfg)
    restore_all(root, qdir)
    assert snapshot(root) == before


def test_a_photo_named_near_the_longest_name_is_quarantined_onto_another_file_system(tmp_path, monkeypatch):
    """Between file systems a photo is copied to a hidden '.NAME.PID.part' first: for a name of 244 bytes (one a
    file may have) that was longer than a name may be, and the move failed 'File name too long'. The hidden copy is
    named as every temporary file is now (files.temporary_name: the name's digest where it would be too long)."""
    import errno

    from pipeline.data import moves

    real = moves.rename_no_replace

    def across(src, dst):  # the photo's own move crosses file systems; the hidden copy's rename beside it does not
        if not Path(src).name.endswith(moves.PART):
            raise OSError(errno.EXDEV, "Invalid cross-device link", str(src), None, str(dst))
        real(src, dst)

    monkeypatch.setattr(moves, "rename_no_replace", across)
    root = make_image_folder(tmp_path / "data", per_class=2)
    long = root / "red" / ("x" * 240 + ".jpg")
    (root / "red" / "red.0.jpg").rename(long)
    long.write_bytes(b"not an image")
    result = check_images(CheckImagesConfig(str(root), workers=1, quarantine=True))
    qdir = tmp_path / "data.quarantine"
    assert result.quarantine["moved"] == 1 and (qdir / "red" / long.name).read_bytes() == b"not an image"
    assert not long.exists() and [p.name for p in (qdir / "red").iterdir()] == [long.name]


@pytest.mark.parametrize("killed", ["mid-copy", "after the copy"])
def test_a_restore_from_another_disk_killed_mid_copy_is_finished_whole_by_a_rerun(tmp_path, killed):
    """The restore command moved each file back with 'mv -n': from another disk that is a copy, and a kill -9 in
    the middle of it left part of the photo under its own name, which the rerun did not replace (-n): the partial
    file stayed in the data folder and the restore failed for good. Now the copy goes to a hidden name beside it,
    renamed once whole; a rerun copies again over a partial one, or renames a whole one."""
    root = make_image_folder(tmp_path / "data", per_class=1)
    photo = root / "red" / "big.jpg"
    photo.write_bytes(os.urandom(50_000))  # not an image: quarantined
    before = photo.read_bytes()
    qdir = tmp_path / "q"
    qdir.mkdir()  # another disk where the machine lets us mount (root); the killed copy is the same elsewhere
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(qdir)],
                             capture_output=True).returncode == 0
    try:
        result = check_images(CheckImagesConfig(str(root), workers=1, quarantine_dir=str(qdir)))
        assert not photo.exists() and (qdir / "red" / "big.jpg").read_bytes() == before
        bin_dir, mark = tmp_path / "bin", tmp_path / "killed-once"
        bin_dir.mkdir()
        real_mv = subprocess.run(["sh", "-c", "command -v mv"], capture_output=True, text=True).stdout.strip()
        copy = 'head -c 1000 "$src" > "$dst"' if killed == "mid-copy" else f'{real_mv} "$@"'
        (bin_dir / "mv").write_text(  # the first mv is killed (with its shell) part-way, as by a kill -9
            f'#!/bin/sh\nfor a; do src=$dst; dst=$a; done\n[ -e {mark} ] && exec {real_mv} "$@"\n: > {mark}\n'
            f'{copy}\nkill -9 $PPID $$\n')
        (bin_dir / "mv").chmod(0o755)
        env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
        assert subprocess.run(result.quarantine["restore"], shell=True, env=env).returncode != 0
        assert not photo.exists() or photo.read_bytes() == before  # was: its first 1,000 bytes, left by the rerun
        assert subprocess.run(result.quarantine["restore"], shell=True, env=env).returncode == 0
        assert photo.read_bytes() == before and not list(root.rglob(".restoring-*"))
        assert not (qdir / "red" / "big.jpg").exists() and not list(qdir.glob(MOVED_LIST + "*"))
    finally:
        if mounted:
            subprocess.run(["umount", "--lazy", str(qdir)])
