import json

from click.testing import CliRunner

from cli import cli
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
    assert [m["val_acc"] for m in out["compare"]["models"]] == [1.0, 1.0]
    assert "[4/4]" in r.stderr


def test_demo_fetches_a_missing_folder(tmp_path, monkeypatch):
    import shutil

    monkeypatch.chdir(tmp_path)
    src = make_image_folder(tmp_path / "src" / "Pets", per_class=12)
    archive = shutil.make_archive(str(tmp_path / "pets"), "zip", root_dir=src.parent)
    r = CliRunner().invoke(cli, ["demo", "--data", str(tmp_path / "data" / "Pets"), "--url", f"file://{archive}",
                                 "--backbone", "tiny", "--weights", "none", "--n", "24", "--workers", "1",
                                 "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["fetch"]["unpacked"].endswith("Pets") and out["extract"]["rows"] == 24
