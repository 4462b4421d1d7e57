import json
import shlex
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.cli import cli
from tests.conftest import make_image_folder


def test_demo_runs_every_step_and_quarantines_bad_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = make_image_folder(tmp_path / "pets", per_class=12)
    (data / "red" / "broken.jpg").write_bytes(b"")
    r = CliRunner().invoke(cli, ["demo", "--data", str(data), "--backbone", "tiny", "--weights", "none",
                                 "--n", "24", "--workers", "1", "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert "fetch" not in out  # the folder was there
    assert out["check"]["errors"] == 1 and (tmp_path / "pets.quarantine" / "red" / "broken.jpg").is_file()
    assert not (data / "red" / "broken.jpg").exists()
    assert out["extract"]["rows"] == 24 and out["extract"]["skipped"] == 0
    assert [m["val_acc"] for m in out["compare"]["models"]] == [1.0] * 7  # 4 head kinds, 3 sklearn recipes
    assert "[4/4]" in r.stderr
    # how to undo the move, as check-images says it (demo said only where the files went): it runs as printed
    back = [line.split("; to move them back: ", 1)[1] for line in r.stderr.splitlines() if "to move them back" in line]
    assert len(back) == 1
    subprocess.run(back[0], shell=True, check=True)
    assert (data / "red" / "broken.jpg").is_file()
    assert not (tmp_path / "pets.quarantine" / "red" / "broken.jpg").exists()


def test_demo_n_0_says_it_extracts_all_the_images(tmp_path, monkeypatch):
    """--n 0 (all, as extract's) was announced as 'extracting tiny features of 0 images', then extracted 16."""
    monkeypatch.chdir(tmp_path)
    data = make_image_folder(tmp_path / "pets", per_class=8)
    r = CliRunner().invoke(cli, ["demo", "--data", str(data), "--backbone", "tiny", "--weights", "none",
                                 "--n", "0", "--workers", "1", "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["extract"]["rows"] == 16
    assert "[3/4] extracting tiny features of all 16 images" in r.stderr


def test_demo_refuses_outputs_inside_the_data_folder_before_moving_a_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = make_image_folder(tmp_path / "pets", per_class=2)
    (data / "red" / "broken.jpg").write_bytes(b"")
    for option in ("--runs-dir", "--cache-dir"):
        r = CliRunner().invoke(cli, ["demo", "--data", str(data), option, str(data / "red"), "--backbone", "tiny",
                                     "--weights", "none"])
        assert r.exit_code == 2 and option in r.output and "inside the data folder" in r.output, r.output
    assert (data / "red" / "broken.jpg").exists() and not (tmp_path / "pets.quarantine").exists()


def test_demo_refuses_bad_extract_options_before_moving_a_file(tmp_path, monkeypatch):
    """--n 1000 of a folder of 5, or a misspelt --weights file, was refused by extract after check-images had
    quarantined the broken files."""
    monkeypatch.chdir(tmp_path)
    data = make_image_folder(tmp_path / "pets", per_class=2)
    (data / "red" / "broken.jpg").write_bytes(b"")
    for args, message in ((["--n", "1000", "--weights", "none"], "--n 1000 is more than the 4 images"),
                          (["--n", "5", "--weights", "none"], "--n 5 is more than the 4 images"),  # 5 files, 1 broken
                          (["--weights", str(tmp_path / "nope.pt")], "does not exist")):
        r = CliRunner().invoke(cli, ["demo", "--data", str(data), "--backbone", "tiny", *args])
        assert r.exit_code == 2 and message in r.output, r.output
    assert (data / "red" / "broken.jpg").exists() and not (tmp_path / "pets.quarantine").exists()


@pytest.mark.parametrize("read_only", [".", "red", ".."])
def test_demo_on_a_read_only_folder_reports_the_bad_files_and_goes_on(tmp_path, monkeypatch, read_only):
    """A read-only data folder (a shared set, as the README's offline demo) stopped the demo at its first step:
    the quarantine could move nothing; so did a read-only class folder or a folder beside which no quarantine
    can be made."""
    import os

    monkeypatch.chdir(tmp_path)
    data = make_image_folder(tmp_path / "pets", per_class=12)
    (data / "red" / "broken.jpg").write_bytes(b"")
    real, locked = os.access, (data / read_only).resolve()
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if (mode & os.W_OK and Path(p).resolve() == locked)
                        else real(p, mode, **kw))
    r = CliRunner().invoke(cli, ["demo", "--data", str(data), "--backbone", "tiny", "--weights", "none",
                                 "--n", "24", "--workers", "1", "--json"])
    assert r.exit_code == 0, r.output
    assert "cannot be changed (read-only): its unusable files are reported, not moved" in r.stderr
    out = json.loads(r.stdout)
    assert out["check"]["errors"] == 1 and out["check"]["quarantine"] is None and out["extract"]["rows"] == 24
    assert (data / "red" / "broken.jpg").exists() and not (tmp_path / "pets.quarantine").exists()


def test_demo_fetches_a_missing_folder(tmp_path, monkeypatch):
    import shutil

    monkeypatch.chdir(tmp_path)
    src = make_image_folder(tmp_path / "src" / "PetImages", per_class=12)
    archive = shutil.make_archive(str(tmp_path / "pets"), "zip", root_dir=src.parent)
    r = CliRunner().invoke(cli, ["demo", "--url", f"file://{archive}",  # the default --data, data/PetImages
                                 "--backbone", "tiny", "--weights", "none", "--n", "24", "--workers", "1",
                                 "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["fetch"]["unpacked"].endswith("PetImages") and out["extract"]["rows"] == 24


def test_demo_refuses_a_missing_folder_that_is_not_the_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(cli, ["demo", "--data", "data/PetImagse", "--url", "http://127.0.0.1:9/never.zip"])
    assert r.exit_code == 2
    assert "data/PetImagse" in r.stderr and "does not exist" in r.stderr
    assert not (tmp_path / "data").exists()  # nothing fetched, nothing created


def test_demo_ends_with_its_outputs_and_the_next_commands(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = make_image_folder(tmp_path / "my pets", per_class=12)  # printed bare, a path with a space was two words
    r = CliRunner().invoke(cli, ["demo", "--data", str(data), "--backbone", "tiny", "--weights", "none",
                                 "--n", "24", "--workers", "0"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    tail = r.stdout.splitlines()
    head = [line.split(": ", 1)[1].strip() for line in tail if line.startswith("head checkpoint:")][0]
    assert Path(head).is_file() and head.endswith("head.pt")
    curves = [line.split(": ", 1)[1].strip() for line in tail if line.startswith("training curves:")]
    assert len(curves) == 1 and curves[0].endswith(" (the linear head's, compared above: the checkpoint's default "
                                                   "head fits without epochs)")  # not the checkpoint's: another run
    curves = curves[0].split(" (")[0]
    assert Path(curves).is_file() and Path(curves).parent != Path(head).parent  # the torch head's (was the default's)
    commands = [line.strip() for line in tail[tail.index("next, try:") + 1:]]
    assert [c.split()[2] for c in commands] == ["predict", "evaluate", "runs"]
    assert all(head in c for c in commands[:2])
    # the suggested predict command runs as printed, as a shell splits it
    r2 = CliRunner().invoke(cli, shlex.split(commands[0])[2:], catch_exceptions=False)
    assert r2.exit_code == 0, r2.output


def test_the_result_is_a_dataclass_whose_dict_leaves_out_fetch_when_nothing_was_fetched():
    """--json prints to_dict(): the steps as before, every step a plain object, no fetch unless one ran."""
    from pipeline.extraction.extract import ExtractResult
    from pipeline.heads.compare import CompareResult
    from pipeline.reports.demo import DemoResult

    compare = CompareResult(cache="c.h5", split={}, models=[], head_run_dir="runs/x", test_cache=None,
                            source_changed=None, default_cache=None)
    extract = ExtractResult(cache="c.h5", hit=True, rows=2, skipped=0, feature_shape=[4], classes=["a"],
                            precision="fp32", flip=False, seconds=0.1, verified=False)
    r = DemoResult(fetch=None, check={"files": 1}, extract=extract, compare=compare, next={})
    assert list(r.to_dict()) == ["check", "extract", "compare", "next"]
    assert list(r.to_dict()["extract"]) == [*ExtractResult.HIT[:-1]]  # a hit's keys, as extract --json prints them
    assert r.to_dict()["compare"]["head_run_dir"] == "runs/x" and r.compare.head_run_dir == "runs/x"


def _half_unpacked(tmp_path, monkeypatch) -> Path:
    """data/ holding the default archive (24 photos under PetImages/) whose unpack a Ctrl-C stopped after 5 files."""
    import zipfile

    from pipeline.config import KAGGLE_CATS_DOGS_URL
    from pipeline.data.fetch import FetchConfig, archive_name, fetch_data
    photos = make_image_folder(tmp_path / "src" / "PetImages", per_class=12)
    archive = tmp_path / "data" / archive_name(KAGGLE_CATS_DOGS_URL)
    archive.parent.mkdir()
    with zipfile.ZipFile(archive, "w") as z:
        for p in sorted(photos.rglob("*.jpg")):
            z.write(p, p.relative_to(photos.parent).as_posix())
    real, calls = zipfile.ZipFile.extract, []

    def ctrl_c_at_the_sixth(self, member, *a, **k):
        calls.append(member)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return real(self, member, *a, **k)

    monkeypatch.setattr(zipfile.ZipFile, "extract", ctrl_c_at_the_sixth)
    with pytest.raises(KeyboardInterrupt):
        fetch_data(FetchConfig(dest=str(archive.parent), url=KAGGLE_CATS_DOGS_URL))
    monkeypatch.setattr(zipfile.ZipFile, "extract", real)
    assert len(list((tmp_path / "data" / "PetImages").rglob("*.jpg"))) == 5
    return tmp_path / "data" / "PetImages"


def test_demo_finishes_a_stopped_unpack_instead_of_taking_the_half_folder_for_the_data(tmp_path, monkeypatch):
    """A demo (or fetch-data) stopped while unpacking left data/PetImages with part of the photos; the next demo
    saw the folder and used it as it was: 5 of 24 photos, said nowhere (or '--n 24 is more than the 5 images')."""
    monkeypatch.chdir(tmp_path)
    data = _half_unpacked(tmp_path, monkeypatch)
    r = CliRunner().invoke(cli, ["demo", "--backbone", "tiny", "--weights", "none", "--n", "24", "--workers", "1",
                                 "--json"])
    assert r.exit_code == 0, r.output
    assert "data/PetImages is half unpacked: fetching" in r.stderr
    out = json.loads(r.stdout)
    assert out["fetch"]["unpacked_now"] and not out["fetch"]["downloaded"] and out["fetch"]["unpacked"] == str(
        Path("data/PetImages"))
    assert out["check"]["files"] == 24 and out["extract"]["rows"] == 24
    assert len(list(data.rglob("*.jpg"))) == 24 and not list((tmp_path / "data").glob(".*.unpacking"))


def test_demo_on_another_half_unpacked_folder_says_how_to_finish_it(tmp_path, monkeypatch):
    import shutil

    _half_unpacked(tmp_path, monkeypatch)
    mine = tmp_path / "mine"
    shutil.move(tmp_path / "data", mine)
    (mine / ".kagglecatsanddogs_5340.zip.url").write_text(json.dumps({"url": "file:///x/pets.zip"}))
    r = CliRunner().invoke(cli, ["demo", "--data", str(mine / "PetImages"), "--backbone", "tiny", "--weights", "none",
                                 "--n", "4", "--workers", "1"])
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1, r.output
    assert f"data folder '{mine / 'PetImages'}' is half unpacked: unpacking into {mine} was stopped" in r.output
    assert f"finish it with: python cli.py fetch-data --dest {mine} --url file:///x/pets.zip" in r.output
    assert not (mine / "PetImages.quarantine").exists() and len(list((mine / "PetImages").rglob("*.jpg"))) == 5


def test_demo_offline_refuses_undownloadable_weights_before_moving_a_file(tmp_path, monkeypatch):
    """Offline with a library's default weights not downloaded yet, demo quarantined the broken photos (and said
    how to move them back) and only then failed on the download: now it fails first, and nothing moves."""
    import torch

    from pipeline.errors import PipelineError
    from pipeline.extraction import backbones as bb

    def offline(w):
        raise PipelineError(f"cannot download {w} (URLError: offline); or pass --weights PATH")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))  # nothing downloaded yet
    monkeypatch.setattr(bb, "_download_state_dict", offline)
    data = make_image_folder(tmp_path / "pets", per_class=2)
    (data / "red" / "broken.jpg").write_bytes(b"")
    r = CliRunner().invoke(cli, ["demo", "--data", str(data), "--backbone", "resnet18", "--n", "0", "--cache-dir",
                                 str(tmp_path / "f")])
    assert r.exit_code == 1 and "cannot download" in r.output and "--weights PATH" in r.output, r.output
    assert (data / "red" / "broken.jpg").exists() and not (tmp_path / "pets.quarantine").exists()
    assert not (tmp_path / "f").exists()


@pytest.mark.parametrize("record", [{"url": "http://ann:s3cret@host/pets.zip"},  # an older fetch-data's
                                    {"url": "http://ann:sha256-0f0f@host/pets.zip", "salt": "ab"}])
def test_the_finish_command_holds_no_password(tmp_path, monkeypatch, record):
    """'finish it with: ... --url http://ann:s3cret@host/pets.zip' printed the password the record held."""
    import shutil

    _half_unpacked(tmp_path, monkeypatch)
    mine = tmp_path / "mine"
    shutil.move(tmp_path / "data", mine)
    (mine / ".kagglecatsanddogs_5340.zip.url").write_text(json.dumps(record))
    r = CliRunner().invoke(cli, ["demo", "--data", str(mine / "PetImages"), "--backbone", "tiny", "--weights", "none",
                                 "--n", "4", "--workers", "1"])
    assert r.exit_code == 1 and "s3cret" not in r.output and "sha256" not in r.output, r.output
    assert (f"finish it with: python cli.py fetch-data --dest {mine} --url 'http://ann:***@host/pets.zip' (with its "
            "password or token in place of ***") in r.output


def test_demo_says_what_it_fetches_without_the_password(tmp_path, monkeypatch):
    """'[1/4] data/PetImages is missing: fetching http://ann:s3cret@...' went to stderr (and to any log kept)."""
    import socket

    monkeypatch.chdir(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = CliRunner().invoke(cli, ["demo", "--url", f"http://ann:s3cret@127.0.0.1:{port}/pets.zip", "--backbone", "tiny",
                                 "--weights", "none", "--n", "4", "--workers", "1"])
    assert r.exit_code == 1 and f"fetching http://ann:***@127.0.0.1:{port}/pets.zip" in r.stderr, r.output
    assert "s3cret" not in r.output
