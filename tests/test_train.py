"""train and finetune on generated images with tiny backbones; one fine-tuning run on real photos."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from pipeline import cli
from pipeline.config import cli_terms
from pipeline.cache.feature_cache import FeatureCache
from pipeline.data.folders import list_image_folder
from pipeline.extraction import backbones as bb
from pipeline.heads.fit_head import FitHeadConfig, fit_head
from pipeline.models.train import FinetuneConfig, TrainConfig, TrainResult, finetune, sample_split, train
from pipeline.models.whole_models import load_model
from tests.conftest import SHARED_CATSDOGS, SHARED_WEIGHTS, make_image_folder

pytestmark = pytest.mark.filterwarnings("ignore:.*has random weights")

FAST = dict(weights="none", workers=0, batch_size=8, print_every=0, precision="fp32")


def _features(checkpoint) -> dict:
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith("features.")}


def _initial_features(backbone) -> dict:
    return {f"features.{k}": v for k, v in bb.load_backbone(backbone, "none").features.state_dict().items()}


def _same(a: dict, b: dict) -> dict:
    return {k: torch.equal(a[k], b[k]) for k in a}


def test_train_lowers_the_loss_and_leaves_the_backbone_bit_identical(tmp_path, image_folder):
    result = train(TrainConfig(data=str(image_folder), backbone="tiny_bn", epochs=4, lr=0.05,
                               runs_dir=str(tmp_path / "runs"), **FAST))
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < losses[0]
    assert all(_same(_features(result.checkpoint), _initial_features("tiny_bn")).values())  # BN stats too
    assert (result.metrics["train_rows"], result.metrics["val_rows"]) == (20, 4)  # 12 + 12 images, 1/8 of each held out
    assert json.loads((Path(result.run_dir) / "history.json").read_text()) == result.history


def test_finetune_changes_the_backbone(tmp_path, image_folder):
    result = finetune(FinetuneConfig(data=str(image_folder), backbone="tiny", epochs=1, lr=1e-2,
                                     runs_dir=str(tmp_path / "runs"), **FAST))
    assert result.history[0]["stage"] == "finetune"
    assert not any(_same(_features(result.checkpoint), _initial_features("tiny")).values())


def test_finetune_last_k_blocks_keeps_the_others_frozen(tmp_path, image_folder):
    result = finetune(FinetuneConfig(data=str(image_folder), backbone="tiny_bn", unfreeze="1", epochs=1, lr=1e-2,
                                     runs_dir=str(tmp_path / "runs"), **FAST))
    same = _same(_features(result.checkpoint), _initial_features("tiny_bn"))
    first = [k for k in same if k.split(".")[1] in ("0", "1")]  # conv + BatchNorm of block 0 (stats included)
    assert first and all(same[k] for k in first)
    assert not any(v for k, v in same.items() if k not in first and not k.endswith("num_batches_tracked"))


def test_staged_schedule_switches_at_the_right_epoch(tmp_path, image_folder):
    common = dict(data=str(image_folder), backbone="tiny_bn", head_epochs=2, lr=1e-2, runs_dir=str(tmp_path / "r"),
                  **FAST)
    head_only = finetune(FinetuneConfig(epochs=2, **common))
    assert all(_same(_features(head_only.checkpoint), _initial_features("tiny_bn")).values())
    staged = finetune(FinetuneConfig(epochs=3, **common))
    assert [h["stage"] for h in staged.history] == ["head", "head", "finetune"]
    trainable = [h["trainable_params"] for h in staged.history]
    assert trainable[0] == trainable[1] == 16 * 2 + 2 and trainable[2] == 1491 - 51 + 34
    assert not any(_same(_features(staged.checkpoint), _initial_features("tiny_bn")).values())


def test_three_classes_with_a_bad_file(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=10, classes=("blue", "green", "red"))
    (data / "green" / "broken.jpg").write_bytes(b"")
    result = train(TrainConfig(data=str(data), backbone="tiny", epochs=3, lr=0.01, val_fraction=0.2,
                               runs_dir=str(tmp_path / "runs"), **FAST))
    assert set(result.metrics["per_class_val_acc"]) == {"blue", "green", "red"}
    assert result.val_acc >= 0.8
    assert result.metrics["skipped"] == 1 and result.skipped_files[0]["why"] == "zero-byte file"
    assert load_model(result.checkpoint).classes == ["blue", "green", "red"]


def test_a_model_trained_on_a_relative_data_folder_finds_its_photos_from_any_folder(tmp_path, monkeypatch):
    """train --data d (relative) recorded 'd' in model.pt: from another folder export found no training photos
    for its parity check ('not reachable; pass --check-data'). The checkpoint now records the folder's path."""
    from pipeline.heads.checkpoints import read_checkpoint
    from pipeline.serving.export import training_photos

    make_image_folder(tmp_path / "project" / "d", per_class=6)
    monkeypatch.chdir(tmp_path / "project")
    result = train(TrainConfig(data="d", backbone="tiny", epochs=1, runs_dir="runs", **FAST))
    monkeypatch.chdir(tmp_path)
    ckpt = read_checkpoint(tmp_path / "project" / result.checkpoint)
    assert ckpt["config"]["data"] == str(tmp_path / "project" / "d")
    assert len(training_photos(ckpt, 2)) == 2


def test_n_takes_a_stratified_sample_split_like_fit_head():
    import numpy as np

    labels = np.array([0] * 30 + [1] * 10)
    train_idx, val_idx = sample_split(labels, 20, 0.25, seed=0)
    assert len(train_idx) + len(val_idx) == 20 and not set(train_idx) & set(val_idx)
    assert np.bincount(labels[np.r_[train_idx, val_idx]]).tolist() == [15, 5]
    with pytest.raises(ValueError, match="^n=41 is more than the 40 images"):  # train_model(data, n=41)
        sample_split(labels, 41, 0.25, seed=0)
    with cli_terms(), pytest.raises(ValueError, match="^--n 41 is more than the 40 images"):
        sample_split(labels, 41, 0.25, seed=0)


def test_validation_images_are_those_fit_head_holds_out(tmp_path, make_cache):
    from pipeline.cache.feature_cache import FeatureCache
    from pipeline.data.folders import list_image_folder
    from pipeline.heads.epoch_loop import split_indices

    data = make_image_folder(tmp_path / "data", per_class=15, classes=("blue", "green", "red"))
    cache = make_cache(data, n=30, seed=3).cache
    with FeatureCache(cache) as c:
        _, val_rows = split_indices(c.labels, 0.25, 3)
        paths = c.paths
        held_out = sorted(paths[i] for i in val_rows)
    assert len(held_out) == 6  # 10 of each class in the sample, round(2.5) = 2 held out
    listing = list_image_folder(data)
    _, val_idx = sample_split(listing.labels, 30, 0.25, seed=3)
    assert sorted(listing.files[i].path for i in val_idx) == held_out


def test_finetune_starts_from_a_fit_head_checkpoint(tmp_path, image_folder, make_cache):
    cache = make_cache(image_folder).cache
    head = fit_head(FitHeadConfig(head="linear", cache=cache, epochs=5, runs_dir=str(tmp_path / "runs")))
    result = CliRunner().invoke(cli.cli, [
        "finetune", "--data", str(image_folder), "--init-head", head.checkpoint, "--epochs", "2",
        "--head-epochs", "1", "--workers", "0", "--batch-size", "8", "--print-every", "1",
        "--runs-dir", str(tmp_path / "runs"), "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["history"][0]["val_acc"] == pytest.approx(head.val_acc)  # the same head on the same split
    assert "Epoch 1, batch 1: running train acc=" in result.stderr
    assert "Epoch 2, Train acc=" in result.stderr and "Val loss=" in result.stderr
    ckpt = torch.load(out["checkpoint"], weights_only=True)
    assert ckpt["kind"] == "finetune" and ckpt["init_from"] == head.checkpoint
    assert Path(out["curves"]).is_file()
    from pipeline.runs.ledger import read_runs

    last = read_runs(tmp_path / "runs")[0]
    assert last["kind"] == "finetune" and last["metrics"]["val_acc"] == out["val_acc"]


def test_finetune_on_a_folder_of_other_classes_names_only_the_differences(tmp_path, image_folder, make_cache):
    """A head of blue and red finetuned on a folder that adds green and writes red as 'Red': the refusal printed
    both lists whole ("the model's classes ['blue', 'red'] differ from the data's [...]": 37 breeds twice for
    one added folder); now one line names what the folder lacks and adds, and the name that is the model's but
    for case."""
    head = fit_head(FitHeadConfig(head="logreg", cache=make_cache(image_folder).cache, runs_dir=str(tmp_path / "runs")))
    other = make_image_folder(tmp_path / "other", per_class=2, classes=("blue", "green", "red"))
    (other / "red").rename(other / "Red")
    out = CliRunner().invoke(cli.cli, ["finetune", "--data", str(other), "--init-head", head.checkpoint,
                                       "--workers", "0", "--runs-dir", str(tmp_path / "ft")])
    assert out.exit_code == 2 and out.output == (
        f"Error: data folder {str(other)!r} has other classes than the starting model's 2: it lacks 'red' of the "
        "model's; it has 'Red', 'green', which the model has not; 'Red' is the model's 'red' but for case or spaces: "
        "rename the folder to its class name\n"), out.output
    assert not (tmp_path / "ft").exists()


def test_cli_rejects_bad_values(tmp_path, image_folder):
    runner = CliRunner()
    bad = runner.invoke(cli.cli, ["finetune", "--data", str(image_folder), "--backbone", "tiny", "--weights", "none",
                                  "--epochs", "1", "--head-epochs", "2"])
    assert bad.exit_code == 2 and "--head-epochs must be between 0 and --epochs (1)" in bad.output
    bad = runner.invoke(cli.cli, ["finetune", "--data", str(image_folder), "--backbone", "tiny", "--weights", "none",
                                  "--unfreeze", "none"])
    assert bad.exit_code == 2 and "--unfreeze none leaves nothing of the backbone" in bad.output
    bad = runner.invoke(cli.cli, ["finetune", "--data", str(image_folder), "--backbone", "tiny", "--weights", "none",
                                  "--unfreeze", "0"])  # was called '--unfreeze none', a value not typed
    assert bad.exit_code == 2 and "--unfreeze 0 leaves nothing of the backbone" in bad.output
    bad = runner.invoke(cli.cli, ["finetune", "--data", str(image_folder), "--backbone", "tiny", "--weights", "none",
                                  "--unfreeze", "99"])  # named 'none' among the allowed values, which finetune refuses
    assert bad.exit_code == 2 and bad.output.strip().splitlines()[-1].endswith("(allowed: all, or 1..3)")
    bad = runner.invoke(cli.cli, ["train", "--data", str(tmp_path / "nope"), "--backbone", "tiny"])
    assert bad.exit_code == 2 and "does not exist" in bad.output


@pytest.mark.parametrize("per_class, extra", [(1, []), (1, ["--val-fraction", "0.9"]), (3, ["--n", "2"])])
def test_one_photo_a_class_says_it_cannot_be_split_not_to_change_the_val_fraction(tmp_path, per_class, extra):
    """One photo a class said '--val-fraction 0.125 leaves an empty split of 2 rows', as if another
    --val-fraction would do: none does (0.9 emptied the training side instead)."""
    data = make_image_folder(tmp_path / "data", per_class=per_class)
    r = CliRunner().invoke(cli.cli, ["train", "--data", str(data), "--backbone", "tiny", "--weights", "none",
                                     "--workers", "0", "--runs-dir", str(tmp_path / "runs"), *extra])
    assert r.exit_code == 2 and r.output.strip().splitlines()[-1] == (
        "Error: 2 rows, no class with 2 of them, cannot be split into training and validation rows (whatever "
        "--val-fraction): a class needs at least 2 photos, one for each; add photos (or take a larger --n)"), r.output
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("case", ["unreadable", "not in the split"])
def test_a_class_with_no_training_image_to_learn_from_is_refused(tmp_path, case):
    """A class whose photos were all unreadable (zero-byte files) trained 'fine': val acc 1.000 and a model.pt with an
    output for a class it never saw; a --n leaving a class out of the training split did the same."""
    data = make_image_folder(tmp_path / "data", per_class=3, classes=("red",))
    (data / "blue").mkdir()
    for i in range(4):
        (data / "blue" / f"b{i}.jpg").write_bytes(b"" if case == "unreadable" else (data / "red" / "red.0.jpg")
                                                  .read_bytes())
    extra = [] if case == "unreadable" else ["--n", "3", "--val-fraction", "0.9"]
    r = CliRunner().invoke(cli.cli, ["train", "--data", str(data), "--backbone", "tiny", "--weights", "none",
                                     "--workers", "0", "--epochs", "2", "--runs-dir", str(tmp_path / "runs"), *extra])
    assert r.exit_code == 2, r.output
    assert r.output.strip().splitlines()[-1] == (
        "Error: class 'blue' has no training image to learn from: all 3 of its training photos are unreadable (e.g. "
        "blue/b1.jpg: zero-byte file); fix or remove its folder" if case == "unreadable" else
        "Error: class 'red' has no photo among the 1 training images: its 1 photo of --n 3 went to validation "
        "(--val-fraction 0.9); a class needs at least 2 photos, one for each: add photos (or take a larger --n)")
    assert not (tmp_path / "runs").exists() or not any(p.is_dir() for p in (tmp_path / "runs").iterdir())


def test_a_class_whose_one_photo_goes_to_validation_is_refused_naming_the_val_fraction_not_n(tmp_path):
    """Every photo (--n 0) and a class of one photo that --val-fraction 0.6 put in validation said 'has no photo
    among the 1 training images of --n 0: ... take a larger --n', of an --n that already takes them all."""
    data = make_image_folder(tmp_path / "data", per_class=3)
    for p in sorted((data / "blue").iterdir())[1:]:
        p.unlink()
    r = CliRunner().invoke(cli.cli, ["train", "--data", str(data), "--backbone", "tiny", "--weights", "none",
                                     "--workers", "0", "--val-fraction", "0.6", "--runs-dir", str(tmp_path / "runs")])
    assert r.exit_code == 2 and r.output.strip().splitlines()[-1] == (
        "Error: class 'blue' has no photo among the 1 training images: its 1 photo went to validation "
        "(--val-fraction 0.6); a class needs at least 2 photos, one for each: add photos"), r.output


def test_a_runs_dir_inside_the_training_photos_is_refused_before_training(tmp_path, image_folder, make_cache):
    tiny = ["--backbone", "tiny", "--weights", "none", "--epochs", "1", "--workers", "0"]
    for command in (["train", "--data", str(image_folder)],
                    ["finetune", "--data", str(make_image_folder(tmp_path / "copy")), "--init-head",
                     fit_head(FitHeadConfig(head="linear", cache=make_cache(image_folder).cache, epochs=1,
                                            runs_dir=str(tmp_path / "runs"))).checkpoint]):
        r = CliRunner().invoke(cli.cli, [*command, *tiny, "--runs-dir", str(image_folder / "red" / "runs")])
        assert r.exit_code == 2 and "--runs-dir" in r.output and "inside the data folder" in r.output, r.output
    assert not (image_folder / "red" / "runs").exists()


@pytest.mark.slow
def test_finetune_real_vgg16_on_real_photos_lowers_the_loss(tmp_path, shared_available):
    result = finetune(FinetuneConfig(data=str(SHARED_CATSDOGS), n=18, weights=str(SHARED_WEIGHTS), unfreeze="1",
                                     epochs=3, lr=1e-4, batch_size=8, workers=0, print_every=0, val_fraction=0.125,
                                     runs_dir=str(tmp_path / "runs")))
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < losses[0], losses


def test_finetune_never_validates_on_images_its_starting_head_was_fitted_on(tmp_path, make_cache):
    """A head fitted on all 32 images (n=0), fine-tuned on the same folder with its own split of n=16."""
    data = make_image_folder(tmp_path / "data", per_class=16)
    cache = make_cache(data).cache
    head = fit_head(FitHeadConfig(head="linear", cache=cache, epochs=2, val_fraction=0.5,
                                  runs_dir=str(tmp_path / "runs")))
    with FeatureCache(cache) as c:
        from pipeline.heads.epoch_loop import split_indices

        seen = {c.paths[i] for i in split_indices(c.labels, 0.5, 0)[0]}
    r = CliRunner().invoke(cli.cli, ["finetune", "--data", str(data), "--init-head", head.checkpoint, "--n", "16",
                                     "--val-fraction", "0.5", "--seed", "1", "--epochs", "1", "--workers", "0",
                                     "--runs-dir", str(tmp_path / "runs"), "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["val_left_out_seen_by_head"] > 0 and "were training images of the starting head" in r.stderr
    assert out["val_rows"] + out["val_left_out_seen_by_head"] == 8
    assert len(seen) == 16  # the head trained on half of the 32 images; finetune's val half overlaps them


def test_running_lines_go_to_stderr_under_a_drawn_bar_too(tmp_path, image_folder, monkeypatch):
    """In a terminal or a notebook the bar is tqdm's, whose write() goes to stdout: --json must stay alone there."""
    from pipeline import progress

    monkeypatch.setattr(progress, "_interactive", lambda: True)
    result = CliRunner().invoke(cli.cli, [
        "train", "--data", str(image_folder), "--backbone", "tiny", "--weights", "none", "--epochs", "1",
        "--workers", "0", "--batch-size", "8", "--print-every", "1", "--runs-dir", str(tmp_path / "runs"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["history"][0]["epoch"] == 1
    assert "Epoch 1, batch 1: running train acc=" in result.stderr


@pytest.mark.parametrize("how", ["copy", "move"])
def test_finetune_finds_its_head_training_images_in_a_copied_or_moved_folder_by_content(tmp_path, make_cache, how):
    import shutil

    from pipeline.models.train import head_training_images

    data = make_image_folder(tmp_path / "data", per_class=10)
    cache = make_cache(data).cache
    head = fit_head(FitHeadConfig(head="linear", cache=cache, epochs=1, val_fraction=0.5,
                                  runs_dir=str(tmp_path / "runs")))
    same = head_training_images(head.checkpoint, list_image_folder(data))
    (shutil.copytree if how == "copy" else shutil.move)(str(data), str(tmp_path / "copy"))
    assert len(same) == 10 and head_training_images(head.checkpoint, list_image_folder(tmp_path / "copy")) == same
    if how == "move":  # the head's folder is gone: the cache's digests still find a renamed one by content
        old = sorted(same)[0]
        new = str(Path(old).with_name("renamed" + Path(old).suffix))
        (tmp_path / "copy" / old).rename(tmp_path / "copy" / new)
        assert head_training_images(head.checkpoint, list_image_folder(tmp_path / "copy")) == same - {old} | {new}


@pytest.mark.parametrize("command, option", [("train", "--lr"), ("finetune", "--lr"), ("finetune", "--backbone-lr")])
def test_a_learning_rate_past_the_range_is_a_usage_error_naming_it(tmp_path, image_folder, command, option):
    r = CliRunner().invoke(cli.cli, [command, "--data", str(image_folder), "--backbone", "tiny", "--weights", "none",
                                     option, "1e300", "--epochs", "1", "--runs-dir", str(tmp_path / "runs")])
    assert r.exit_code == 2 and f"{option} must be in (0, 10]" in r.output, r.output


def test_a_trained_model_is_calibrated_and_flags_a_third_colour(tmp_path, make_cache):
    from pipeline.models.predict import PredictConfig, predict

    data = make_image_folder(tmp_path / "data", per_class=16, classes=("blue", "red"))
    green = make_image_folder(tmp_path / "green", per_class=6, classes=("green",), seed=3)
    result = train(TrainConfig(data=str(data), backbone="tiny", epochs=2, lr=0.05, unknown_rows=20, unknown_k=5,
                               runs_dir=str(tmp_path / "runs"), **FAST))
    m = result.metrics
    assert isinstance(result, TrainResult) and m["calibration_rows"] == m["val_rows"] and m["temperature"] > 0
    assert m["known_rows"] == 20 and m["known_rows_bytes"] == 20 * 8 * 2  # 8 channels, float16
    assert list(result.to_dict())[:5] == ["run_dir", "checkpoint", "curves", "backbone", "epoch"]
    state = torch.load(result.checkpoint, weights_only=True)["state_dict"]
    assert {"head.temperature", "head.known_rows", "head.unknown_threshold"} <= set(state)
    lm = load_model(result.checkpoint)
    assert lm.model.head.calibrated and float(lm.model.head.temperature) == pytest.approx(m["temperature"])
    rows = predict(PredictConfig(paths=[str(green)], model=result.checkpoint, workers=0)).rows
    assert all(r["unknown"] for r in rows) and all(r["ood_score"] > m["unknown_threshold"] for r in rows)


def test_a_stopped_finetune_resumes_where_it_stopped_as_if_never_stopped(tmp_path, image_folder, monkeypatch):
    import pipeline.models.train as train_mod
    args = ["finetune", "--data", str(image_folder), "--backbone", "tiny_bn", "--head-epochs", "1", "--lr", "0.01",
            "--augment", "--weights", "none", "--workers", "0", "--batch-size", "8", "--print-every", "0",
            "--precision", "fp32", "--runs-dir", str(tmp_path / "runs"), "--json"]
    whole = CliRunner().invoke(cli.cli, [*args, "--epochs", "4"])
    assert whole.exit_code == 0, whole.output
    whole = json.loads(whole.stdout)

    real = train_mod.train_one_epoch

    def ctrl_c_in_epoch_3(*a):
        if a[-1] == 3:
            raise KeyboardInterrupt
        return real(*a)

    monkeypatch.setattr(train_mod, "train_one_epoch", ctrl_c_in_epoch_3)
    stopped = CliRunner().invoke(cli.cli, [*args, "--epochs", "4"])
    assert stopped.exit_code == 130
    run_dir = next(d for d in (tmp_path / "runs").iterdir() if str(d) != whole["run_dir"] and d.is_dir())
    assert f"2 epochs of 4 kept in {run_dir}/model.pt" in stopped.stderr and f"--resume {run_dir}" in stopped.stderr
    assert load_model(run_dir / "model.pt").model is not None  # the epochs so far: a usable model already
    monkeypatch.setattr(train_mod, "train_one_epoch", real)

    faster = [a if a != "0.01" else "0.02" for a in args]  # --lr 0.02 (an option given twice is refused)
    changed = CliRunner().invoke(cli.cli, [*faster, "--epochs", "4", "--resume", str(run_dir)])
    assert changed.exit_code == 2 and "--lr 0.02 (the run had 0.01)" in changed.output
    resumed = CliRunner().invoke(cli.cli, [*args, "--epochs", "4", "--resume", str(run_dir)])
    assert resumed.exit_code == 0, resumed.output
    resumed = json.loads(resumed.stdout)
    assert resumed["run_dir"] == str(run_dir) and [h["epoch"] for h in resumed["history"]] == [1, 2, 3, 4]
    assert [h["stage"] for h in resumed["history"]] == ["head", "finetune", "finetune", "finetune"]
    a, b = (torch.load(r["checkpoint"], weights_only=True) for r in (whole, resumed))
    assert "resume" not in b and all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert resumed["val_loss"] == whole["val_loss"]
    again = CliRunner().invoke(cli.cli, [*args, "--epochs", "4", "--resume", str(run_dir)])
    assert again.exit_code == 2 and "a finished run's; nothing to resume" in again.output


def _stop_in_epoch(monkeypatch, epoch: int):
    """Ctrl-C inside ``epoch``'s training pass (a KeyboardInterrupt where the signal would raise it)."""
    import pipeline.models.train as train_mod
    real = train_mod.train_one_epoch

    def stop(*a):
        if a[-1] == epoch:
            raise KeyboardInterrupt
        return real(*a)

    monkeypatch.setattr(train_mod, "train_one_epoch", stop)
    return lambda: monkeypatch.setattr(train_mod, "train_one_epoch", real)


def _train_args(tmp_path, image_folder, *extra) -> list:
    """A 3-epoch train of the tiny backbone, as a command line, its runs in tmp_path/runs."""
    return ["train", "--data", str(image_folder), "--backbone", "tiny_bn", "--epochs", "3", "--weights", "none",
            "--workers", "0", "--batch-size", "8", "--print-every", "0", "--runs-dir", str(tmp_path / "runs"), *extra]


def _stopped_train_run(tmp_path, image_folder, monkeypatch, *extra) -> tuple[list, Path]:
    """That train stopped by Ctrl-C in epoch 2: its command line and its run folder (epoch 1 kept)."""
    args = _train_args(tmp_path, image_folder, *extra)
    go_on = _stop_in_epoch(monkeypatch, 2)
    assert CliRunner().invoke(cli.cli, args).exit_code == 130
    go_on()
    return args, next(d for d in (tmp_path / "runs").iterdir() if d.is_dir())


def test_a_run_stopped_with_a_relative_weights_file_resumes_from_another_folder(tmp_path, image_folder,
                                                                               monkeypatch):
    """The model.pt recorded --weights as typed ('w/t.pt'): resumed from w/ with '--weights t.pt', the same file,
    it was refused as 'other options than the stopped run's: --weights 't.pt' (the run had 'w/t.pt')' (and
    a 't.pt' of another folder passed), while --data is recorded absolute."""
    (tmp_path / "w").mkdir()
    model = bb.load_backbone("tiny_bn", "none").model
    torch.save({k: v for k, v in model.state_dict().items() if k.startswith("features.")}, tmp_path / "w" / "t.pt")
    (tmp_path / "w" / "t.json").write_text(json.dumps({"mean": [0.5] * 3, "std": [0.2] * 3, "covers": "features"}))
    monkeypatch.chdir(tmp_path)
    args = [a if a != "none" else "w/t.pt" for a in _train_args(tmp_path, image_folder)]
    go_on = _stop_in_epoch(monkeypatch, 2)
    assert CliRunner().invoke(cli.cli, args).exit_code == 130
    go_on()
    run_dir = next(d for d in (tmp_path / "runs").iterdir() if d.is_dir())
    assert torch.load(run_dir / "model.pt", weights_only=True)["config"]["weights"] == str(tmp_path / "w" / "t.pt")
    monkeypatch.chdir(tmp_path / "w")
    resumed = CliRunner().invoke(cli.cli, [a if a != "w/t.pt" else "t.pt" for a in args] + ["--resume", str(run_dir)])
    assert resumed.exit_code == 0, resumed.output


def test_a_weights_file_recorded_as_typed_by_an_older_run_is_taken_from_the_folder_resumed_in(tmp_path,
                                                                                              monkeypatch):
    from pipeline.models.resume import _same_option
    monkeypatch.chdir(tmp_path)
    assert _same_option("weights", "w/t.pt", str(tmp_path / "w" / "t.pt"))
    assert not _same_option("weights", "w/t.pt", str(tmp_path / "x" / "t.pt"))
    assert not _same_option("weights", "DEFAULT", "none") and not _same_option("seed", 1, 2)


def test_an_interrupted_api_run_says_where_its_epochs_are_and_how_to_resume(tmp_path, image_folder, monkeypatch):
    """As the docs say, `except pipeline.TrainingInterrupted` (it was importable only from pipeline.models.resume)."""
    import pipeline
    _stop_in_epoch(monkeypatch, 2)
    with pytest.raises(pipeline.TrainingInterrupted) as stopped:
        pipeline.train_model(image_folder, backbone="tiny_bn", epochs=3, runs_dir=tmp_path / "runs", **FAST)
    run_dir = stopped.value.run_dir
    assert str(stopped.value) == (f"1 of 3 epochs kept in {run_dir}/model.pt; resume with resume={str(run_dir)!r} "
                                  "(--resume on the command line)")


def test_ctrl_c_in_the_first_save_or_the_last_steps_leaves_no_false_claim_and_one_finished_run(
        tmp_path, image_folder, monkeypatch):
    import pipeline.models.train as train_mod
    import pipeline.runs.figures as figures
    runs = tmp_path / "runs"
    args = ["train", "--data", str(image_folder), "--backbone", "tiny_bn", "--epochs", "2", "--weights", "none",
            "--workers", "0", "--batch-size", "8", "--print-every", "0", "--runs-dir", str(runs), "--json"]
    real_save, real_curves = train_mod.save_model, figures.curves

    def cut_short(*a, **k):  # Ctrl-C while the first epoch's model.pt is written (its temporary file removed)
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "save_model", cut_short)
    first = CliRunner().invoke(cli.cli, args)
    assert first.exit_code == 130 and "nothing was saved" in first.stderr and "--resume" not in first.stderr
    assert not runs.exists() or not [d for d in runs.iterdir() if d.is_dir()]  # no empty folder claiming epochs
    monkeypatch.setattr(train_mod, "save_model", real_save)

    def stop_drawing(*a, **k):  # Ctrl-C while the curves are drawn, after calibration
        monkeypatch.setattr(figures, "curves", real_curves)
        raise KeyboardInterrupt

    monkeypatch.setattr(figures, "curves", stop_drawing)
    last = CliRunner().invoke(cli.cli, args)
    assert last.exit_code == 130 and "2 epochs of 2 kept" in last.stderr, last.output
    run_dir = next(d for d in runs.iterdir() if d.is_dir())
    resumed = CliRunner().invoke(cli.cli, [*args, "--resume", str(run_dir)])
    assert resumed.exit_code == 0, resumed.output
    assert "resume" not in torch.load(run_dir / "model.pt", weights_only=True)
    assert (run_dir / "history.json").is_file() and (run_dir / "curves.png").is_file()
    assert len((runs / "ledger.jsonl").read_text().splitlines()) == 1


def test_a_train_killed_in_its_first_save_leaves_no_run_folder(tmp_path, image_folder, monkeypatch):
    """kill -9 while the first epoch's model.pt was written left runs/<stamp>-train empty (but for the save's
    temporary file) for good; nothing resumes from it. The run folder now appears with its first model.pt."""
    import pipeline.models.train as train_mod
    from pipeline.files import temporary_name

    def killed(lm, path, *a, **k):
        temporary_name(path).write_bytes(b"PK" * 100)  # torch.save part-way
        raise SystemExit(137)  # the process ends here, as at a kill -9: no handler of the run's runs

    monkeypatch.setattr(train_mod, "save_model", killed)
    runs = tmp_path / "runs"
    assert CliRunner().invoke(cli.cli, _train_args(tmp_path, image_folder)).exit_code == 137
    assert [p.name for p in runs.iterdir() if not p.name.startswith(".")] == []  # was ['<stamp>-train']
    monkeypatch.undo()
    real = train_mod.save_model

    def stopped_after_the_first(*a, **k):  # Ctrl-C once epoch 1's model.pt is in (the folder not renamed yet)
        real(*a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "save_model", stopped_after_the_first)
    stopped = CliRunner().invoke(cli.cli, _train_args(tmp_path, image_folder))
    (run_dir,) = [p for p in runs.iterdir() if not p.name.startswith(".")]
    assert stopped.exit_code == 130 and f"1 epoch of 3 kept in {run_dir}/model.pt" in stopped.stderr, stopped.output


def test_ctrl_c_right_after_an_epochs_save_counts_that_epoch(tmp_path, image_folder, monkeypatch):
    """Ctrl-C landing after epoch 2's model.pt was renamed into place, before the run counted it, said '1 epoch
    of 3 kept' of a model.pt holding 2 (and the resume then went on 'after epoch 2')."""
    import pipeline.models.train as train_mod
    real, saves = train_mod.save_model, []

    def stopped_after_the_second(*a, **k):
        path = real(*a, **k)
        saves.append(path)
        if len(saves) == 2:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(train_mod, "save_model", stopped_after_the_second)
    args = _train_args(tmp_path, image_folder)
    stopped = CliRunner().invoke(cli.cli, args)
    run_dir = next(d for d in (tmp_path / "runs").iterdir() if d.is_dir())
    assert stopped.exit_code == 130 and f"2 epochs of 3 kept in {run_dir}/model.pt" in stopped.stderr, stopped.output
    assert len(torch.load(run_dir / "model.pt", weights_only=True)["history"]) == 2
    monkeypatch.setattr(train_mod, "save_model", real)
    resumed = CliRunner().invoke(cli.cli, [*args, "--resume", str(run_dir), "--json"])
    assert resumed.exit_code == 0 and f"resuming {run_dir} after epoch 2 of 3" in resumed.stderr, resumed.output


def test_a_full_disk_at_an_epoch_save_says_what_is_kept_and_how_to_resume(tmp_path, image_folder, monkeypatch):
    import errno

    import pipeline.heads.checkpoints as checkpoints
    real, saves = checkpoints.torch.save, []

    def second_save_fails(obj, f, *a, **k):
        saves.append(f)
        if len(saves) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *a, **k)

    monkeypatch.setattr(checkpoints.torch, "save", second_save_fails)
    runs = tmp_path / "my runs"  # the --resume it gives is quoted as Ctrl-C's is (it was not: two words in a shell)
    args = [*_train_args(tmp_path, image_folder)[:-2], "--runs-dir", str(runs)]
    full = CliRunner().invoke(cli.cli, args)
    run_dir = next(d for d in runs.iterdir() if d.is_dir())
    assert full.exit_code == 1 and "no space left on the device" in full.stderr
    assert (f"1 of 3 epochs are kept in {run_dir}/model.pt: make room, then run the same command with "
            f"--resume '{run_dir}'") in full.stderr
    monkeypatch.setattr(checkpoints.torch, "save", real)
    assert CliRunner().invoke(cli.cli, [*args, "--resume", str(run_dir)]).exit_code == 0


def test_a_run_folder_is_trained_into_by_one_process_at_a_time(tmp_path, image_folder, monkeypatch):
    import pipeline.models.train as train_mod
    from pipeline.data.moves import FolderBusy, folder_lock
    args = _train_args(tmp_path, image_folder)
    real, seen = train_mod.train_one_epoch, []

    def second_epoch_finds_its_folder_held(*a):
        if a[-1] == 2:
            run_dir = next(d for d in (tmp_path / "runs").iterdir() if d.is_dir())
            with pytest.raises(FolderBusy):  # as a second process trying the folder would
                with folder_lock(run_dir, True, "busy", wait_s=0):
                    pass
            seen.append(run_dir)
            raise KeyboardInterrupt
        return real(*a)

    monkeypatch.setattr(train_mod, "train_one_epoch", second_epoch_finds_its_folder_held)
    assert CliRunner().invoke(cli.cli, args).exit_code == 130 and seen
    monkeypatch.setattr(train_mod, "train_one_epoch", real)
    run_dir = seen[0]
    with folder_lock(run_dir, True, "busy", wait_s=0):  # another --resume of it still running
        twice = CliRunner().invoke(cli.cli, [*args, "--resume", str(run_dir)])
    assert twice.exit_code == 1 and f"{run_dir} is being trained into by another process" in twice.stderr
    assert CliRunner().invoke(cli.cli, [*args, "--resume", str(run_dir)]).exit_code == 0
    assert len((tmp_path / "runs" / "ledger.jsonl").read_text().splitlines()) == 1  # one run, one line


def test_a_photo_rewritten_in_place_since_the_stop_refuses_the_resume(tmp_path, image_folder, monkeypatch):
    args, run_dir = _stopped_train_run(tmp_path, image_folder, monkeypatch)
    (image_folder / "red" / "red.3.jpg").write_bytes((image_folder / "blue" / "blue.3.jpg").read_bytes())
    resumed = CliRunner().invoke(cli.cli, [*args, "--resume", str(run_dir)])
    assert resumed.exit_code == 2, resumed.output  # it went on with the new bytes, unnoticed
    assert f"1 photo of {str(image_folder)!r} differs from the stopped run's: red/red.3.jpg (rewritten: other " \
           "bytes)" in resumed.stderr and "--quarantine" in resumed.stderr


def test_a_photo_rewritten_with_its_size_and_mtime_kept_refuses_the_resume(tmp_path, image_folder, monkeypatch):
    """A photo rewritten in place with its size and mtime kept (os.utime, some sync tools) passed the listing's
    digest: the resume trained on the new bytes, unnoticed. Each photo's sha256 is checked, as extract does."""
    import os
    args, run_dir = _stopped_train_run(tmp_path, image_folder, monkeypatch)
    photo = image_folder / "red" / "red.3.jpg"
    st, data = photo.stat(), bytearray(photo.read_bytes())
    data[len(data) // 2] ^= 0xFF
    photo.write_bytes(bytes(data))
    os.utime(photo, ns=(st.st_atime_ns, st.st_mtime_ns))
    resumed = CliRunner().invoke(cli.cli, [*args, "--resume", str(run_dir)])
    assert resumed.exit_code == 2, resumed.output
    assert "red/red.3.jpg (rewritten: other bytes)" in resumed.stderr


def test_a_resume_refused_for_photos_gone_bad_names_them_and_what_to_do(tmp_path, image_folder, monkeypatch):
    """A photo corrupt, made unreadable, moved away or added since the stop: the refusal said 'the images ...
    differ from the stopped run's (added, removed or rewritten since)' naming none of them (in a folder of
    thousands), and a photo made unreadable (chmod) was not refused at all: the run went on without it."""
    import pipeline.data.folders as folders
    from pipeline.data.folders import ImageLoadError
    args, run_dir = _stopped_train_run(tmp_path, image_folder, monkeypatch)
    real_open = folders.open_regular

    def blue_2_refused(path):  # as a chmod 000 photo of another user's: root here reads any file
        if Path(path).name == "blue.2.jpg":
            raise ImageLoadError("unreadable image: Permission denied", "unreadable")
        return real_open(path)

    monkeypatch.setattr(folders, "open_regular", blue_2_refused)
    resumed = CliRunner().invoke(cli.cli, [*args, "--resume", str(run_dir)])
    assert resumed.exit_code == 2, resumed.output  # it trained on without it, saying nothing
    assert "1 photo of" in resumed.stderr and "blue/blue.2.jpg (unreadable image: Permission denied)" in resumed.stderr
    assert "permissions fixed" in resumed.stderr and "--quarantine" not in resumed.stderr
    (image_folder / "red" / "red.3.jpg").write_bytes(b"not a jpeg any more")
    (image_folder / "blue" / "blue.1.jpg").rename(tmp_path / "blue.1.jpg")
    (image_folder / "red" / "red.new.jpg").write_bytes((tmp_path / "blue.1.jpg").read_bytes())
    resumed = CliRunner().invoke(cli.cli, [*args, "--resume", str(run_dir)])
    assert resumed.exit_code == 2, resumed.output
    line = next(li for li in resumed.stderr.splitlines() if li.startswith("Error:"))
    assert f"4 photos of {str(image_folder)!r} differ from the stopped run's: blue/blue.1.jpg (gone: " in line
    assert "blue/blue.2.jpg (unreadable image: Permission denied); red/red.3.jpg (rewritten: other bytes); and 1 " \
           "more; a resumed run must train on the same photos: put the folder back as it was" in line
    assert f"start a fresh run without --resume (check-images {image_folder} --quarantine" in line
    monkeypatch.setattr(folders, "open_regular", real_open)
    (image_folder / "red" / "red.new.jpg").unlink()
    (tmp_path / "blue.1.jpg").rename(image_folder / "blue" / "blue.1.jpg")
    resumed = CliRunner().invoke(cli.cli, [*args, "--resume", str(run_dir)])
    assert resumed.exit_code == 2 and "1 photo of" in resumed.stderr and "red/red.3.jpg (rewritten" in resumed.stderr


def test_a_photo_touched_since_the_stop_resumes_as_if_never_stopped(tmp_path, image_folder, monkeypatch):
    """`touch` (or a copy that did not keep times) changes a photo's mtime, not its bytes: the resume was refused
    as if the photo were rewritten ('the images ... differ'), without naming it; extract reuses such a photo's
    row by its sha256. The run records each photo's sha256, so the resume goes on, bit for bit."""
    import os
    whole = train(TrainConfig(data=str(image_folder), backbone="tiny_bn", epochs=3, runs_dir=str(tmp_path / "w"),
                              **FAST))
    args, run_dir = _stopped_train_run(tmp_path, image_folder, monkeypatch, "--precision", "fp32")
    photo = image_folder / "red" / "red.3.jpg"
    os.utime(photo, ns=(photo.stat().st_atime_ns, photo.stat().st_mtime_ns + 5_000_000_000))
    resumed = CliRunner().invoke(cli.cli, [*args, "--resume", str(run_dir), "--json"])
    assert resumed.exit_code == 0, resumed.output
    assert "touched since the run stopped (mtime changed) hold the same bytes" in resumed.stderr
    a, b = (torch.load(c, weights_only=True)["state_dict"] for c in (whole.checkpoint, run_dir / "model.pt"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_finetune_resumes_with_its_init_head_moved_and_says_so_when_it_is_gone(tmp_path, image_folder, make_cache,
                                                                                  monkeypatch):
    """The --init-head moved after the stop: resumed with its old path it failed with 'model file ... does not
    exist' (not saying the resume needs it, nor how to go on); with its new path it was refused as 'other options
    than the stopped run's: --init-head NEW (the run had OLD); resume with its options', the options of a file
    gone: no way on but moving it back. The run records the head's sha256: the same bytes anywhere resume."""
    import shutil
    cache = make_cache(image_folder).cache
    head = fit_head(FitHeadConfig(head="linear", cache=cache, epochs=5, runs_dir=str(tmp_path / "heads")))
    other = fit_head(FitHeadConfig(head="linear", cache=cache, epochs=2, runs_dir=str(tmp_path / "heads")))
    args = ["finetune", "--data", str(image_folder), "--init-head", head.checkpoint, "--epochs", "3",
            "--workers", "0", "--batch-size", "8", "--print-every", "0", "--runs-dir", str(tmp_path / "runs")]
    go_on = _stop_in_epoch(monkeypatch, 2)
    assert CliRunner().invoke(cli.cli, args).exit_code == 130
    go_on()
    run_dir = next(d for d in (tmp_path / "runs").iterdir() if d.is_dir())
    moved = Path(shutil.move(head.checkpoint, tmp_path / "moved.pt"))
    gone = CliRunner().invoke(cli.cli, [*args, "--resume", str(run_dir)])
    assert gone.exit_code == 2, gone.output
    assert (f"--init-head {head.checkpoint!r} does not exist; to resume {str(run_dir)!r}, give --init-head the file "
            "the run started from, where it is now") in gone.stderr
    wrong = CliRunner().invoke(cli.cli, [a if a != head.checkpoint else other.checkpoint for a in args]
                               + ["--resume", str(run_dir)])
    assert wrong.exit_code == 2 and f"--init-head {other.checkpoint!r} (the run had {head.checkpoint!r}, gone " \
                                    "since; the file given has other bytes" in wrong.stderr, wrong.output
    resumed = CliRunner().invoke(cli.cli, [a if a != head.checkpoint else str(moved) for a in args]
                                 + ["--resume", str(run_dir), "--json"])
    assert resumed.exit_code == 0, resumed.output
    assert [h["epoch"] for h in json.loads(resumed.stdout)["history"]] == [1, 2, 3]
    assert torch.load(run_dir / "model.pt", weights_only=True)["config"]["init_head"] == str(moved)


def test_a_run_folder_moved_into_the_data_folder_is_not_resumed_there(tmp_path, image_folder, monkeypatch):
    args, run_dir = _stopped_train_run(tmp_path, image_folder, monkeypatch)
    inside = run_dir.rename(image_folder / "red" / run_dir.name)  # its curves.png would become a red photo
    resumed = CliRunner().invoke(cli.cli, [*args, "--resume", str(inside)])
    assert resumed.exit_code == 2 and "--resume" in resumed.stderr and "inside the data folder" in resumed.stderr
    assert sorted(p.name for p in inside.iterdir()) == ["model.pt"]


def test_a_resume_removes_the_temporary_model_pt_a_killed_save_left(tmp_path, image_folder, monkeypatch):
    args, run_dir = _stopped_train_run(tmp_path, image_folder, monkeypatch)
    (run_dir / ".model.pt.99999.tmp").write_bytes(b"\0" * 1000)  # kill -9 in the middle of a save
    assert CliRunner().invoke(cli.cli, [*args, "--resume", str(run_dir)]).exit_code == 0
    assert sorted(p.name for p in run_dir.iterdir()) == ["curves.png", "history.json", "model.pt"]


def test_a_resumed_run_on_a_gpu_gets_the_gpus_random_state_back(tmp_path, image_folder, monkeypatch):
    """Dropout on a GPU draws from the GPU's generator: a resumed run must go on with its state, not the seed's
    (the GPU stood in for: its states are saved with the epoch and set again on resuming)."""
    import pipeline.models.resume as resume
    state, restored = [torch.tensor([7, 8, 9], dtype=torch.uint8)], []
    monkeypatch.setattr(resume, "gpu_rng_states", lambda: state)
    monkeypatch.setattr(resume, "set_gpu_rng_states", restored.append)
    args, run_dir = _stopped_train_run(tmp_path, image_folder, monkeypatch, "--device", "cpu", "--precision", "fp32")
    assert CliRunner().invoke(cli.cli, [*args, "--resume", str(run_dir)]).exit_code == 0
    assert len(restored) == 1 and [t.tolist() for t in restored[0]] == [[7, 8, 9]]


def test_sigterm_during_training_says_what_is_kept_and_the_command_that_resumes_and_exits_143(
        tmp_path, image_folder, monkeypatch):
    """SIGTERM's line named the Python API's resume='RUN' where Ctrl-C's names the command line that resumes."""
    import os
    import signal
    import sys

    import pipeline.models.train as train_mod
    real = train_mod.train_one_epoch

    def sigterm_in_epoch_2(*a):
        if a[-1] == 2:
            if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:  # it would end the process, and pytest with it
                raise AssertionError("SIGTERM would end the run without a word")
            signal.raise_signal(signal.SIGTERM)  # a scheduler stopping the job
        return real(*a)

    monkeypatch.setattr(train_mod, "train_one_epoch", sigterm_in_epoch_2)
    args = _train_args(tmp_path, image_folder)
    monkeypatch.setattr(sys, "argv", ["cli.py", *args])  # the command line the user typed
    stopped = CliRunner().invoke(cli.cli, args)
    run_dir = next(d for d in (tmp_path / "runs").iterdir() if d.is_dir())
    assert stopped.exit_code == 143
    assert stopped.stderr.strip().splitlines()[-1] == (
        f"terminated; 1 epoch of 3 kept in {run_dir}/model.pt. Resume with: {os.path.basename(sys.executable)} "
        f"cli.py {' '.join(args)} --resume {run_dir}")
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_a_diverged_run_names_the_epochs_it_kept_instead_of_saying_nothing_was_saved(tmp_path, image_folder,
                                                                                    monkeypatch):
    import torch.nn.functional as F
    real, calls = F.nll_loss, []

    def nan_in_epoch_3(*a, **k):  # 20 training images in minibatches of 8: call 7 is epoch 3's first
        calls.append(1)
        return real(*a, **k) * (float("nan") if len(calls) == 7 else 1.0)

    monkeypatch.setattr(F, "nll_loss", nan_in_epoch_3)
    args = ["train", "--data", str(image_folder), "--backbone", "tiny_bn", "--epochs", "4", "--weights", "none",
            "--workers", "0", "--batch-size", "8", "--print-every", "0", "--precision", "fp32",
            "--runs-dir", str(tmp_path / "runs")]
    diverged = CliRunner().invoke(cli.cli, args)
    run_dir = next(d for d in (tmp_path / "runs").iterdir() if d.is_dir())
    assert diverged.exit_code == 1 and "the loss became nan at epoch 3, minibatch 1" in diverged.stderr
    assert "nothing was saved" not in diverged.stderr  # it was: the epochs before it
    assert f"epochs 1-2 are kept in {run_dir}/model.pt" in diverged.stderr


@pytest.mark.parametrize("edit, field", [
    (lambda c: c.update(resume="x"), "'resume'"),
    (lambda c: c["resume"].pop("rng"), "'resume.rng'"),
    (lambda c: c["resume"].update(optimizer={}), "'resume.optimizer'"),
    (lambda c: c["resume"].update(shuffle=torch.zeros(3)), "'resume.shuffle'"),
    (lambda c: c.update(history=5), "'history'"),
    (lambda c: c["resume"]["photos"]["sha256"].pop(), "'resume.photos'"),
])
def test_a_hand_edited_stopped_checkpoint_is_refused_naming_the_field(tmp_path, image_folder, monkeypatch, edit,
                                                                      field):
    args, run_dir = _stopped_train_run(tmp_path, image_folder, monkeypatch)
    ckpt = torch.load(run_dir / "model.pt", weights_only=True)
    edit(ckpt)
    torch.save(ckpt, run_dir / "model.pt")
    resumed = CliRunner().invoke(cli.cli, [*args, "--resume", str(run_dir)])
    assert resumed.exit_code == 2 and f"field {field} is not" in resumed.stderr, resumed.output


def test_sigterm_to_a_run_with_decoding_processes_says_what_is_kept_and_nothing_else(tmp_path):
    """A scheduler's SIGTERM reaches the decoding processes too: torch's shutdown of the killed workers
    used to follow the one line with tracebacks ('DataLoader worker ... is killed by signal')."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import ROOT
    data = make_image_folder(tmp_path / "data", per_class=100, size=(120, 100))
    runs = tmp_path / "runs"
    proc = subprocess.Popen(
        [sys.executable, "-c", "import tests.tiny, cli; cli.cli()", "-q", "train", "--data", str(data),
         "--backbone", "tiny_bn", "--weights", "none", "--workers", "1", "--batch-size", "8", "--print-every", "0",
         "--epochs", "1000", "--runs-dir", str(runs)],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=subprocess.PIPE, text=True,
        start_new_session=True)
    deadline = time.monotonic() + 120
    while not list(runs.glob("*/model.pt")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(1)
    os.killpg(proc.pid, signal.SIGTERM)  # as a scheduler stops a job: every process of it
    _, stderr = proc.communicate(timeout=60)
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("warning: --weights")]
    assert proc.returncode == 143 and len(lines) == 1 and lines[0].startswith("terminated; "), stderr[-3000:]


def test_finetune_from_a_default_refitted_head_says_its_validation_photos_were_fitted_or_leaves_them_out(
        tmp_path, make_cache):
    """fit-head's default head is refitted on every row, its validation rows too; finetune left only the head's
    training split out of its validation, so it validated on photos the head had fitted, silently (val acc 1.000
    from the first epoch on dogbreeds20, a temperature fitted on them). Now those rows are left out when others
    remain, and when none would (the head's own folder and split) kept with a warning and counted in the JSON."""
    from pipeline.models.train import head_training_images

    data = make_image_folder(tmp_path / "data", per_class=12)
    cache = make_cache(data).cache
    listing = list_image_folder(data)
    refit = fit_head(FitHeadConfig(cache=cache, val_fraction=0.25, runs_dir=str(tmp_path / "runs")))
    kept = fit_head(FitHeadConfig(cache=cache, val_fraction=0.25, refit=False, runs_dir=str(tmp_path / "runs")))
    assert head_training_images(refit.checkpoint, listing) == {f.path for f in listing.files}
    assert len(head_training_images(kept.checkpoint, listing)) == kept.train_rows < len(listing.files)

    def finetune_from(head, *more):
        r = CliRunner().invoke(cli.cli, ["finetune", "--data", str(data), "--init-head", head.checkpoint,
                                         "--epochs", "1", "--workers", "0", "--val-fraction", "0.25", "--json",
                                         "--runs-dir", str(tmp_path / "runs"), *more])
        assert r.exit_code == 0, r.output
        return json.loads(r.stdout), r.stderr

    out, err = finetune_from(refit)  # the head's own split: all 6 were fitted by the refit
    assert out["val_seen_by_head_refit"] == out["val_rows"] == 6 and "are flattered" in err
    assert "--no-refit" in err and out["val_left_out_seen_by_head"] == 0
    out, err = finetune_from(kept)  # its validation photos never fitted: validated on, nothing said
    assert out["val_rows"] == 6 and out["val_seen_by_head_refit"] == 0 and "flattered" not in err
    sample = fit_head(FitHeadConfig(cache=make_cache(data, n=16).cache, val_fraction=0.25,
                                    runs_dir=str(tmp_path / "runs")))  # a head on 16 of the 24 photos, refitted
    out, err = finetune_from(sample)  # photos it never saw remain: its refit's rows are left out like the rest
    assert out["val_seen_by_head_refit"] == 0 and "flattered" not in err
    assert out["val_left_out_seen_by_head"] > 0 and out["val_rows"] + out["val_left_out_seen_by_head"] == 6


def test_a_finetune_from_a_stopped_runs_model_pt_keeps_none_of_that_runs_resume_state(tmp_path, image_folder,
                                                                                       monkeypatch):
    """finetune --init-head on a stopped train run's model.pt (a usable model already) copied that run's resume
    state (its optimiser, random states, photos) into its own model.pt: the finished finetune looked resumable, and
    --resume of it stopped on 'unexpected RuntimeError: Error(s) in loading state_dict' instead of saying the run is
    finished; a stopped finetune would have resumed from the train run's state. Now none of it is carried over."""
    _, stopped = _stopped_train_run(tmp_path, image_folder, monkeypatch)
    args = ["finetune", "--data", str(image_folder), "--init-head", str(stopped / "model.pt"), "--epochs", "1",
            "--workers", "0", "--batch-size", "8", "--print-every", "0", "--runs-dir", str(tmp_path / "ft"), "--json"]
    done = CliRunner().invoke(cli.cli, args)
    assert done.exit_code == 0, done.output
    done = json.loads(done.stdout)
    assert "resume" not in torch.load(done["checkpoint"], weights_only=True)
    again = CliRunner().invoke(cli.cli, [*args, "--resume", done["run_dir"]])
    assert again.exit_code == 2 and "a finished run's; nothing to resume" in again.output, again.output


@pytest.mark.parametrize("command", ["train", "finetune"])
def test_animated_photos_are_said_once_a_run_not_once_an_epoch(tmp_path, caplog, command):
    """train and finetune decode every photo each epoch; an animated GIF or a multi-page TIFF among them became
    its first frame without a word (extract, predict and evaluate warn). Now one warning a run, after the first
    epoch has read every photo, naming how many (training and validation photos alike) and an example."""
    import logging

    from tests.test_image_reader import several_frames

    data = make_image_folder(tmp_path / "data", per_class=6)
    several_frames(data / "red" / "anim.gif", "GIF", 4)
    several_frames(data / "blue" / "pages.tif", "TIFF", 2)
    config = (TrainConfig if command == "train" else FinetuneConfig)(
        data=str(data), backbone="tiny", epochs=3, lr=0.01, runs_dir=str(tmp_path / "runs"), **FAST)
    with caplog.at_level(logging.WARNING):
        result = (train if command == "train" else finetune)(config)
    said = [r.getMessage() for r in caplog.records if "frame" in r.getMessage()]
    assert said == ["2 files hold more than one frame (an animated GIF, PNG or WebP, a multi-page TIFF) and were read "
                    "from the first frame alone (e.g. blue/pages.tif: 2 frames); save the frame you mean as its own "
                    "photo to use another"], said
    assert len(result.history) == 3 and result.metrics["skipped"] == 0


def test_resuming_a_run_killed_before_its_ledger_line_appends_the_line_once(tmp_path, image_folder, monkeypatch):
    """train killed (kill -9) after writing the finished model.pt, before appending its ledger line: the run was
    finished with no line ('runs' never showed it), and --resume RUN said only "a finished run's; nothing to
    resume". Now that --resume appends the line (and says so); another --resume finds it and appends none. The
    --resume that appended it did all there was to do: exit 0 (it exited 2, as a refused resume), with --json one
    object on stdout saying so (it printed nothing: a script reading stdout found no JSON); the next ones are refused
    as any resume of a finished run (exit 2)."""
    from pipeline.runs import run_folders
    from pipeline.runs.ledger import read_runs

    def killed(*a, **k):
        raise SystemExit(137)  # the process ends here, as at a kill -9: nothing after it runs

    monkeypatch.setattr(run_folders, "append_run", killed)
    runs = tmp_path / "runs"
    args = ["train", "--data", str(image_folder), "--backbone", "tiny", "--weights", "none", "--epochs", "1",
            "--workers", "0", "--batch-size", "8", "--print-every", "0", "--runs-dir", str(runs), "--json"]
    assert CliRunner().invoke(cli.cli, args).exit_code == 137
    monkeypatch.undo()
    run_dir = next(d for d in runs.iterdir() if d.is_dir())
    assert "resume" not in torch.load(run_dir / "model.pt", weights_only=True) and read_runs(runs) == []
    plain = CliRunner().invoke(cli.cli, [*[a for a in args if a != "--json"], "--resume", str(run_dir)])
    said = (f"--resume '{run_dir}': a finished run whose ledger line was missing (stopped between writing model.pt and "
            f"the line): appended it to {runs / 'ledger.jsonl'}; nothing left to train")
    assert plain.exit_code == 0 and plain.stdout == "" and plain.stderr.strip().splitlines()[-1] == said, plain.output
    (runs / "ledger.jsonl").unlink()  # lost again: the same resume with --json
    again = CliRunner().invoke(cli.cli, [*args, "--resume", str(run_dir)])
    assert again.exit_code == 0, again.output
    assert again.stderr.strip().splitlines()[-1] == said
    assert json.loads(again.stdout) == {"run_dir": str(run_dir), "checkpoint": str(run_dir / "model.pt"),
                                        "finished": True, "epochs_run": 0, "ledger_line_appended": True,
                                        "ledger": str(runs / "ledger.jsonl"), "message": said}
    (line,) = read_runs(runs)
    assert line["kind"] == "train" and line["backbone"] == "tiny" and line["params"]["epochs"] == 1
    assert str(run_dir / "model.pt") in line["outputs"] and set(line["metrics"]) >= {"val_acc", "val_loss"}
    third = CliRunner().invoke(cli.cli, [*args, "--resume", str(run_dir)])
    assert third.exit_code == 2 and "ledger line was missing" not in third.output and len(read_runs(runs)) == 1
    other = tmp_path / "other"  # resumed with another --runs-dir, a run's line is in that one's ledger: found there
    other.mkdir()
    (runs / "ledger.jsonl").rename(other / "ledger.jsonl")
    elsewhere = [a if a != str(runs) else str(other) for a in args]
    fourth = CliRunner().invoke(cli.cli, [*elsewhere, "--resume", str(run_dir)])
    assert fourth.exit_code == 2 and "ledger line was missing" not in fourth.output and read_runs(runs) == []
