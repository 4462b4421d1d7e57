"""int8 extraction on the tiny backbone: shapes, closeness to fp32, determinism, fingerprint, resume."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.cache.feature_cache import FeatureCache
from pipeline.data.folders import list_image_folder
from pipeline.errors import UsageError
from pipeline.extraction.extract import ExtractConfig, cache_key, extract
from tests.conftest import make_image_folder

pytest.importorskip("torchao", reason="int8 needs the optional torchao (in the dev extra)")


def cfg(data, tmp_path, **kw) -> ExtractConfig:
    opts = {"n": 0, "backbone": "tiny", "weights": "none", "workers": 0, "batch_size": 5, "dtype": "float32",
            "precision": "int8", "calib_n": 8, "compile": "off", "cache_dir": str(tmp_path / "f"), **kw}
    return ExtractConfig(data=str(data), **opts)


def features(path):
    with FeatureCache(path) as c:
        return c.paths, c.features[:], dict(c.attrs)


def cosines(a, b):
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_int8_rows_match_fp32_in_shape_and_closely_in_value(image_folder, tmp_path):
    q = extract(cfg(image_folder, tmp_path))
    f = extract(cfg(image_folder, tmp_path, precision="fp32"))
    assert q.precision == "int8" and q.cache != f.cache
    qp, qx, attrs = features(q.cache)
    fp, fx, _ = features(f.cache)
    assert qp == fp and qx.shape == fx.shape == (24, 8, 8, 8)
    assert not np.array_equal(qx, fx)  # really quantised ...
    assert cosines(qx, fx).min() > 0.999  # ... and close to the float network
    calibration = json.loads(attrs["calibration"])
    assert calibration["calib_n"] == 8 and len(calibration["images"]) == 8
    assert calibration["images"] == qp[:8]  # the first images of the extraction's own sample
    assert calibration["torchao"] and "X86InductorQuantizer" in calibration["method"]


@pytest.mark.parametrize("calib_n", [8, 17])  # 17: a last calibration batch of one image
def test_int8_extraction_is_deterministic_and_batch_size_free(image_folder, tmp_path, calib_n):
    a = features(extract(cfg(image_folder, tmp_path, cache_dir=str(tmp_path / "a"), calib_n=calib_n)).cache)
    b = features(extract(cfg(image_folder, tmp_path, cache_dir=str(tmp_path / "b"), calib_n=calib_n,
                             batch_size=1)).cache)
    assert a[0] == b[0] and np.array_equal(a[1], b[1])  # bitwise, whatever the batch size (here 5 and 1)


def test_compiled_int8_gives_the_eager_features(image_folder, tmp_path):
    eager = extract(cfg(image_folder, tmp_path, cache_dir=str(tmp_path / "a")))
    compiled = extract(cfg(image_folder, tmp_path, cache_dir=str(tmp_path / "b"), compile="auto"))  # int8 compiles
    assert compiled.compiled and compiled.compile_seconds > 0 and not eager.compiled
    assert features(compiled.cache)[2]["fingerprint"] == features(eager.cache)[2]["fingerprint"]
    a, b = features(eager.cache)[1], features(compiled.cache)[1]
    assert cosines(a, b).min() > 0.9999  # Inductor's fused kernels, the same quantised network


def test_the_fingerprint_covers_the_calibration_and_not_compile(image_folder, tmp_path):
    listing = list_image_folder(str(image_folder))
    other = make_image_folder(tmp_path / "other", seed=5)
    base = cache_key(cfg(image_folder, tmp_path), listing)
    assert cache_key(cfg(image_folder, tmp_path, compile="on"), listing) == base
    assert cache_key(cfg(image_folder, tmp_path, batch_size=3), listing) == base
    for changed in ({"calib_n": 9}, {"seed": 1}, {"calib_data": str(other)}, {"precision": "fp32"}):
        assert cache_key(cfg(image_folder, tmp_path, **changed), listing) != base, changed
    import pipeline.extraction.extract
    import pipeline.extraction.quantize

    versions = ((pipeline.extraction.quantize, "QUANT_VERSION"), (pipeline.extraction.extract, "DECODE_VERSION"))
    for module, name in versions:
        with pytest.MonkeyPatch.context() as mp:  # another quantisation or decoding: another cache
            mp.setattr(module, name, getattr(module, name) + 1)
            assert cache_key(cfg(image_folder, tmp_path), listing) != base, name
    # calib_n only matters to int8
    assert (cache_key(cfg(image_folder, tmp_path, precision="fp32", calib_n=9), listing)
            == cache_key(cfg(image_folder, tmp_path, precision="fp32"), listing))


def test_an_interrupted_int8_extraction_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    from pipeline.extraction.inference import Inference

    data = make_image_folder(tmp_path / "d", per_class=10)
    reference = features(extract(cfg(data, tmp_path, cache_dir=str(tmp_path / "ref"))).cache)
    real, calls = Inference.__call__, []

    def interrupted(self, x):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, x)

    monkeypatch.setattr(Inference, "__call__", interrupted)
    with pytest.raises(KeyboardInterrupt):
        extract(cfg(data, tmp_path))
    monkeypatch.setattr(Inference, "__call__", real)

    def no_calibration(*a, **k):
        raise AssertionError("the resumed run calibrated again instead of reusing the stored calibration")

    monkeypatch.setattr("pipeline.extraction.quantize.calibrated_int8", no_calibration)
    resumed = extract(cfg(data, tmp_path))  # rebuilt from the cache's stored observers: the same network
    assert resumed.resumed_from == 10 and resumed.computed == 10
    got = features(resumed.cache)
    assert got[0] == reference[0] and np.array_equal(got[1], reference[1])


def test_calibration_on_another_folder_skips_undecodable_images(image_folder, tmp_path):
    other = make_image_folder(tmp_path / "other", seed=5)
    (other / "red" / "a-zero.jpg").write_bytes(b"")
    r = extract(cfg(image_folder, tmp_path, calib_data=str(other), calib_n=30))
    calibration = json.loads(features(r.cache)[2]["calibration"])
    assert calibration["calib_root"] == str(other) and len(calibration["images"]) == 24  # all good ones
    assert "red/a-zero.jpg" not in calibration["images"]


def test_int8_usage_errors(image_folder, tmp_path):
    with pytest.raises(UsageError, match="more than the 1024"):
        extract(cfg(image_folder, tmp_path, batch_size=2048))
    with pytest.raises(UsageError, match="--calib-n must be positive"):
        extract(cfg(image_folder, tmp_path, calib_n=0))
    # without torchao: the environment's (exit 1), tests/test_extract.py (it runs where torchao is not installed)


def test_int8_is_refused_on_cuda_and_outside_extraction():
    import torch

    from pipeline.devices import resolve_precision

    with pytest.raises(UsageError, match="CPU only"):
        resolve_precision("int8", torch.device("cuda"), int8_ok=True)
    with pytest.raises(UsageError, match="unknown precision 'int8'"):
        resolve_precision("int8", torch.device("cpu"))
    assert resolve_precision("auto", torch.device("cpu"), int8_ok=True) != "int8"  # int8 is asked for


def test_fit_head_test_data_is_quantised_like_the_training_cache(tmp_path):
    from pipeline.heads.fit_head import FitHeadConfig, fit_head

    train = make_image_folder(tmp_path / "train", per_class=10)
    test = make_image_folder(tmp_path / "test", per_class=4, seed=9)
    cache = extract(cfg(train, tmp_path)).cache
    result = fit_head(FitHeadConfig(head="linear", cache=cache, test_data=str(test), epochs=3,
                                    runs_dir=str(tmp_path / "runs")))
    with FeatureCache(result.test["cache"]) as t, FeatureCache(cache) as c:
        a, b = json.loads(c.attrs["calibration"]), json.loads(t.attrs["calibration"])
    assert b["calib_root"] == str(train.resolve()) and b["images"] == a["images"]
    # a test cache calibrated on its own photos is another network: refused
    own = extract(cfg(test, tmp_path, cache_dir=str(tmp_path / "own"))).cache
    with pytest.raises(UsageError, match="int8 calibration calib_data"):
        fit_head(FitHeadConfig(head="linear", cache=cache, test_cache=own, epochs=3, runs_dir=str(tmp_path / "runs")))


def test_the_cli_extracts_int8_and_names_the_one_off_costs(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from pipeline.cli import cli

    monkeypatch.chdir(tmp_path)
    data = make_image_folder(tmp_path / "data", per_class=6)
    args = ["extract", "--data", str(data), "--n", "0", "--backbone", "tiny", "--weights", "none", "--workers", "0",
            "--precision", "int8", "--calib-n", "4", "--compile", "off"]
    r = CliRunner().invoke(cli, args + ["--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["precision"] == "int8" and out["rows"] == 12 and out["calibration_seconds"] > 0
    assert "int8 calibration " in r.stderr and "compiling" not in r.stderr
    again = CliRunner().invoke(cli, [*args[:4], "10", *args[5:]], catch_exceptions=False)  # another --n
    assert again.exit_code == 0 and "int8 calibration reused" in again.stderr, again.stderr
    bad = CliRunner().invoke(cli, args[:-2] + ["--compile", "sometimes"])
    assert bad.exit_code == 2 and "sometimes" in bad.stderr


@pytest.mark.parametrize("flip", [False, True])
def test_a_head_on_an_int8_cache_predicts_through_that_int8_network(tmp_path, flip):
    """predict, evaluate and the API rebuild the cache's int8 network from the checkpoint's observers (no
    calibration images needed): the rows they compute are the cache's rows."""
    import torch

    import pipeline
    from pipeline.data.image_reader import ImageListDataset
    from pipeline.extraction.quantize import calibration_batches
    from pipeline.heads.fit_head import FitHeadConfig, fit_head
    from pipeline.models.predict import PredictConfig, predict
    from pipeline.models.whole_models import load_model, read_checkpoint

    data = make_image_folder(tmp_path / "d", per_class=8)
    made = extract(cfg(data, tmp_path, flip=flip))
    paths, rows, _ = features(made.cache)
    result = fit_head(FitHeadConfig(head="linear", cache=made.cache, epochs=3, runs_dir=str(tmp_path / "runs")))
    ckpt = read_checkpoint(result.checkpoint)  # weights_only: the observers are plain tensors
    assert ckpt["precision"] == "int8" and ckpt["int8_observers"]
    lm = load_model(result.checkpoint)
    assert lm.precision == "int8"
    images, got_paths = calibration_batches(ImageListDataset(data, [(p, 0) for p in paths], lm.transform),
                                            len(paths), len(paths))
    assert got_paths == paths
    x = images[0].contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        from pipeline.extraction.inference import mirror_mean

        again = (mirror_mean(lm.model.features, x) if flip else lm.model.features(x)).numpy()
    # bitwise the cache's rows (the float network's differ: cosine 0.99999 on this tiny backbone, 0.997 on VGG-16)
    assert np.array_equal(again, rows)
    # predict's probabilities are the head's on the cached rows
    head = pipeline.Head.load(result.checkpoint)
    on_rows = head.predict_proba(rows)
    rows_out = predict(PredictConfig(model=result.checkpoint, paths=[str(data / p) for p in paths], workers=0,
                                     format="json")).rows
    best = on_rows.max(1)
    assert np.allclose([r["probability"] for r in rows_out], best, atol=1e-4)
    # finetune needs the float backbone it can train
    assert load_model(result.checkpoint, trainable=True).precision is None


def test_precision_auto_picks_int8_only_where_it_was_measured_to_pay(monkeypatch, tmp_path):
    from pipeline.extraction import extract as stage

    monkeypatch.setattr(stage, "cpu_flags", lambda: {"avx512f", "avx512_vnni", "avx512_bf16"})
    monkeypatch.setattr(stage.Path, "exists", lambda self: False if str(self) == "/dev/nvidia0" else True)
    c = ExtractConfig(data=str(tmp_path))
    many = stage.INT8_AUTO_MIN_IMAGES
    assert stage.auto_precision(c, many)[0] == "int8"
    assert stage.auto_precision(c, many - 1) == ("auto", f"precision auto: bf16 or fp32, not int8: {many - 1} images "
                                                 f"(int8 repays its calibration and compile from {many})")
    for other in ("bf16", "fp32", "int8"):  # asked for: kept
        assert stage.auto_precision(ExtractConfig(data=str(tmp_path), precision=other), many)[0] == other
    assert "CUDA" in stage.auto_precision(ExtractConfig(data=str(tmp_path), device="cuda"), many)[1]
    paid = stage.INT8_AUTO_MIN_IMAGES_PAID  # the one-offs kept from an earlier run: int8 pays sooner
    assert paid < many and stage.auto_precision(c, paid, paid=True)[0] == "int8"
    assert "reused calibration" in stage.auto_precision(c, paid - 1, paid=True)[1]
    # AMX: int8 + compile measured 2.85x bf16 on a 2-core Xeon (issue 35), so int8 there too
    monkeypatch.setattr(stage, "cpu_flags", lambda: {"avx512f", "amx_bf16", "amx_int8", "amx_tile"})
    assert stage.auto_precision(c, many) == ("int8", stage.auto_precision(c, many)[1])
    assert "AMX" in stage.auto_precision(c, many)[1]
    monkeypatch.setattr(stage, "cpu_flags", lambda: {"avx2"})
    assert "VNNI or AMX" in stage.auto_precision(c, many)[1]
    # without torchao: tests/test_extract_auto.py (it runs where torchao is not installed)


def test_precision_auto_as_int8_is_the_int8_cache(monkeypatch, image_folder, tmp_path):
    """When auto picks int8 it makes (or finds) exactly the cache --precision int8 makes: one network, one key."""
    from pipeline.extraction import extract as stage

    monkeypatch.setattr(stage, "auto_precision", lambda cfg, images, paid=False: ("int8", "int8 for the test")
                        if cfg.precision == "auto" else (cfg.precision, ""))
    asked = extract(cfg(image_folder, tmp_path))
    auto = extract(cfg(image_folder, tmp_path, precision="auto"))
    assert auto.hit and auto.cache == asked.cache and auto.precision == "int8"


def test_a_later_extraction_reuses_the_projects_int8_calibration(tmp_path, monkeypatch):
    """Another --n (another cache) in the same project: the calibration kept in the one-offs folder is reused
    (the same network: bitwise the same rows), said on the summary; a photo of the sample rewritten since
    (same size and mtime, so the same key) is refused and calibrated again."""
    import os

    from pipeline.extraction import quantize

    data = make_image_folder(tmp_path / "d", per_class=8)
    first = extract(cfg(data, tmp_path))
    stored = list((tmp_path / "f" / "oneoffs" / "int8").glob("*.pt"))
    assert len(stored) == 1 and first.calibration_reused is None
    real, calibrations = quantize.calibrated_int8, []
    monkeypatch.setattr(quantize, "calibrated_int8", lambda *a, **k: (calibrations.append(1), real(*a, **k))[1])
    again = extract(cfg(data, tmp_path, n=10))
    assert not calibrations and again.calibration_reused.endswith(".json")
    paths, rows, attrs = features(again.cache)
    all_paths, all_rows, first_attrs = features(first.cache)
    assert np.array_equal(rows, all_rows[[all_paths.index(p) for p in paths]])
    assert json.loads(attrs["calibration"]) == json.loads(first_attrs["calibration"])  # the record, as made
    photo = data / json.loads(first_attrs["calibration"])["images"][0]
    st = photo.stat()
    raw = bytearray(photo.read_bytes())
    raw[-3] ^= 0xFF  # another photo, same size and mtime: the listing (and the key) cannot tell
    photo.write_bytes(bytes(raw))
    os.utime(photo, ns=(st.st_atime_ns, st.st_mtime_ns))
    third = extract(cfg(data, tmp_path, n=12))
    assert calibrations == [1] and third.calibration_reused is None


def test_an_unreadable_stored_calibration_is_calibrated_again(tmp_path, caplog):
    data = make_image_folder(tmp_path / "d", per_class=6)
    extract(cfg(data, tmp_path))
    (stored,) = (tmp_path / "f" / "oneoffs" / "int8").glob("*.pt")
    stored.write_bytes(b"not a tensor file")
    r = extract(cfg(data, tmp_path, n=8))
    assert r.calibration_reused is None and "unreadable" in caplog.text


def test_precision_auto_knows_when_the_projects_one_offs_are_paid(tmp_path, monkeypatch):
    """After an int8 run, auto's shorter threshold applies to the same calibration (another --n), not to
    another calibration sample (another --seed) or another --cache-dir's project."""
    from pipeline.extraction import extract as stage

    data = make_image_folder(tmp_path / "d", per_class=6)
    listing = list_image_folder(data)
    auto = cfg(data, tmp_path, precision="auto", n=6)
    assert not stage.one_offs_paid(auto, listing)
    extract(cfg(data, tmp_path))
    assert stage.one_offs_paid(auto, listing)
    assert not stage.one_offs_paid(cfg(data, tmp_path, precision="auto", seed=1), listing)
    assert not stage.one_offs_paid(cfg(data, tmp_path, precision="auto", cache_dir=str(tmp_path / "g")), listing)
    monkeypatch.setattr(stage, "cpu_flags", lambda: {"avx512_vnni"})
    monkeypatch.setattr(stage, "INT8_AUTO_MIN_IMAGES_PAID", 6)
    r = extract(auto)
    assert r.precision == "int8" and r.calibration_reused


def test_a_network_rebuilt_from_stored_observers_says_so_not_two_calibration_images(tmp_path, caplog):
    """Reusing the one-offs' calibration logged 'quantised to int8 on 2 calibration images' (the rebuild's example
    batch of two zeros) right after 'int8 calibration reused (... 64 photos ...)'."""
    import logging

    data = make_image_folder(tmp_path / "d", per_class=8)
    extract(cfg(data, tmp_path))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pipeline"):
        extract(cfg(data, tmp_path, n=12))  # another request: the calibration of the same sample reused
    said = [r.getMessage() for r in caplog.records if "int8" in r.getMessage()]
    assert any(m.startswith("int8 calibration reused") for m in said)
    assert any(m.startswith("int8 network rebuilt from ") for m in said)
    assert not any("calibration images" in m for m in said)


def test_a_head_on_an_int8_cache_exports_with_its_backbone_in_float_and_says_how_far_from_predict(tmp_path, caplog):
    """extract --precision auto picks int8 from 1,000 photos on the CPU, and export refused every head fitted on
    such a cache ('fit the head on a float cache'): the classic PetImages flow could not export without extracting
    again. Now the file runs the backbone in float, passes its parity check against that float model, and the
    warning, the result and the metadata say how far it is from predict, which runs the int8 network."""
    import logging

    import pipeline
    from pipeline.heads.fit_head import FitHeadConfig, fit_head

    pytest.importorskip("onnxruntime", reason="the export extra (onnx, onnxruntime) is not installed")
    data = make_image_folder(tmp_path / "d", per_class=8)
    made = extract(cfg(data, tmp_path))
    head = fit_head(FitHeadConfig(head="logreg", cache=made.cache, runs_dir=str(tmp_path / "runs"))).checkpoint
    with caplog.at_level(logging.WARNING):
        result = pipeline.export_model(head, tmp_path / "int8.onnx", check_data=data)
    assert result.passed and result.output
    gap = result.parity["int8_cache"]["vs_predict"]
    assert gap["images"] == 16 and gap["same_class"] >= 15 and 0 < gap["max_abs_diff"] < 0.05
    assert json.loads((tmp_path / "int8.onnx.json").read_text())["int8_cache"]["vs_predict"] == gap
    assert "fitted on its cache's int8 features; the export runs tiny in float" in caplog.text


def by_photo(path) -> dict:
    """{sha256 of a row's photo: its int8 row} of a cache."""
    with FeatureCache(path) as c:
        return dict(zip(c.row_digests(), c.features[:]))


def test_audit_refreshes_an_int8_cache_with_its_network_computing_only_new_photos(tmp_path, monkeypatch):
    """audit --apply relabelling 2 of 20,009 photos said '0 rows reused by content, 20009 computed', and --undo
    computed all again: the refresh calibrated int8 on the changed folder (another calibration, named by the
    folder's listing), so no earlier row could be reused. It now rebuilds the earlier cache's network from its
    stored observers: a relabel computes nothing, its rows are the earlier ones, an undo is the earlier cache
    again, and a new photo is computed with that same network."""
    from click.testing import CliRunner

    from pipeline.cli import cli
    from pipeline.reports.audit import AuditConfig, refresh

    data = make_image_folder(tmp_path / "d", per_class=10)
    first = extract(cfg(data, tmp_path))
    before = by_photo(first.cache)
    (tmp_path / "fixes.csv").write_text("path,action,new_class\nred/red.3.jpg,relabel,blue\n"
                                        "blue/blue.4.jpg,relabel,red\n")
    args = ["--data", str(data), "--cache-dir", str(tmp_path / "f"), "--runs-dir", str(tmp_path / "runs"), "--json"]
    applied = CliRunner().invoke(cli, ["audit", "--apply", str(tmp_path / "fixes.csv"), *args])
    assert applied.exit_code == 0, applied.output
    made = json.loads(applied.stdout)["refreshed"]
    assert not made["hit"] and made["computed"] == 0 and made["reused"] == 20 and made["label_changes"] == 2
    after = by_photo(made["cache"])
    assert after.keys() == before.keys() and all(np.array_equal(after[d], before[d]) for d in before)
    with FeatureCache(made["cache"]) as c:
        assert dict(zip(c.paths, c.labels.tolist()))["blue/red.3.jpg"] == c.classes.index("blue")
        lent = json.loads(c.attrs["calibration"])
    assert lent["observers_from"] == str((tmp_path / "f" / first.cache.split("/")[-1]).resolve())
    journal = json.loads(applied.stdout)["journal"]
    undone = CliRunner().invoke(cli, ["audit", "--undo", journal, *args[:4], "--json"])
    assert undone.exit_code == 0, undone.output
    assert json.loads(undone.stdout)["refreshed"]["hit"]  # the folder as it was: the first cache, not a third
    assert json.loads(undone.stdout)["refreshed"]["cache"] == first.cache

    make_image_folder(tmp_path / "new", per_class=1, classes=("red",), seed=9)
    (tmp_path / "new" / "red" / "red.0.jpg").rename(data / "red" / "added.jpg")
    added = refresh(AuditConfig(data=str(data), cache_dir=str(tmp_path / "f")), str(data))
    assert added["computed"] == 1 and added["reused"] == 20
    assert all(np.array_equal(by_photo(added["cache"])[d], row) for d, row in before.items())

    plain = extract(cfg(data, tmp_path))  # a plain extract lends itself the same network: the refreshed cache
    assert plain.hit and plain.cache == added["cache"]
    forced = extract(cfg(data, tmp_path, calib_data=str(data)))  # --calib-data: calibrated on it, all computed
    assert not forced.hit and forced.computed == 21 and forced.cache != added["cache"]
    assert "observers_from" not in json.loads(features(forced.cache)[2]["calibration"])


def test_fit_head_test_data_of_a_refreshed_int8_cache_borrows_its_network(tmp_path):
    """A refreshed int8 cache's network is the earlier cache's, calibrated on the folder before the relabel: calibrating
    --test-data again on the folder as it is now would be another network (refused as 'changed since'); the test
    folder's rows are made with the refreshed cache's own observers, the network its head was fitted on."""
    from pipeline.data.apply_fixes import apply_fixes
    from pipeline.heads.fit_head import FitHeadConfig, fit_head
    from pipeline.reports.audit import AuditConfig, refresh

    train = make_image_folder(tmp_path / "train", per_class=10)
    test = make_image_folder(tmp_path / "test", per_class=4, seed=9)
    first = extract(cfg(train, tmp_path)).cache
    (tmp_path / "fixes.csv").write_text("path,action,new_class\nred/red.3.jpg,relabel,blue\n")
    apply_fixes(str(tmp_path / "fixes.csv"), str(train), tmp_path / "applied", "")
    refreshed = refresh(AuditConfig(data=str(train), cache_dir=str(tmp_path / "f")), str(train))
    assert refreshed["computed"] == 0
    result = fit_head(FitHeadConfig(head="linear", cache=refreshed["cache"], test_data=str(test), epochs=3,
                                    runs_dir=str(tmp_path / "runs")))
    with FeatureCache(result.test["cache"]) as t, FeatureCache(first) as c:
        a, b = json.loads(c.attrs["calibration"]), json.loads(t.attrs["calibration"])
    assert b["observers_from"] == refreshed["cache"] and {**b, "observers_from": None} == {**a, "observers_from": None}


def test_a_calibration_is_lent_only_by_an_int8_cache_whose_network_can_be_rebuilt(image_folder, tmp_path, caplog):
    """Only a cache whose stored observers make its very network lends them: another precision, a cache without
    observers, another backbone or another quantisation method is refused, and the request calibrates as a plain one."""
    from dataclasses import replace

    import h5py

    from pipeline.extraction import quantize

    fp32 = extract(cfg(image_folder, tmp_path, precision="fp32")).cache
    int8 = extract(cfg(image_folder, tmp_path)).cache
    request = replace(cfg(image_folder, tmp_path), backbone="tiny")
    assert quantize.lent_calibration(replace(request, calib_cache=int8))[1] == ""
    assert quantize.lent_calibration(replace(request, calib_cache=fp32)) == (None, "it is not an int8 cache")
    assert quantize.lent_calibration(replace(request, calib_cache=int8, backbone="resnet18"))[1] == \
        "it was made with another backbone or weights"
    old = tmp_path / "old.h5"
    old.write_bytes(Path(int8).read_bytes())
    with h5py.File(old, "r+") as f:
        del f["int8_observers"]
    assert "keeps no calibrated observers" in quantize.lent_calibration(replace(request, calib_cache=str(old)))[1]
    other = tmp_path / "other.h5"
    other.write_bytes(Path(int8).read_bytes())
    with h5py.File(other, "r+") as f:
        f.attrs["calibration"] = f.attrs["calibration"].replace('"version": 1', '"version": 0')
    assert quantize.lent_calibration(replace(request, calib_cache=str(other))) == \
        (None, "it was quantised otherwise (version)")
    listing = list_image_folder(image_folder)
    assert quantize.request_identity(replace(request, calib_cache=str(other)), listing) == \
        quantize.request_identity(request, listing)  # refused: calibrated on the folder, as a plain request
    assert cache_key(replace(request, calib_cache=int8), listing) == cache_key(request, listing)  # the same folder


def add_photo(data: Path, tmp_path: Path, name: str = "added.jpg", seed: int = 9) -> None:
    """One new photo in data/red (a JPEG unlike the folder's others)."""
    make_image_folder(tmp_path / f"new{seed}", per_class=1, classes=("red",), seed=seed)
    (tmp_path / f"new{seed}" / "red" / "red.0.jpg").rename(data / "red" / name)


def test_a_plain_extract_after_a_photo_is_added_computes_only_that_photo(tmp_path, caplog):
    """A plain int8 extract calibrated on the folder as it is, a calibration named by its listing: after 10 photos
    were added to 25,000, another network, and all 25,010 rows computed (about an hour for VGG-16). It now lends
    itself the folder's earlier int8 cache's network (its stored observers): the new photo is computed, every
    other row copied bitwise, the same request again is a hit, and --calib-data still calibrates on its folder."""
    import logging

    data = make_image_folder(tmp_path / "d", per_class=10)
    first = extract(cfg(data, tmp_path))
    before = by_photo(first.cache)
    add_photo(data, tmp_path)
    with caplog.at_level(logging.INFO, logger="pipeline"):
        second = extract(cfg(data, tmp_path))
    assert not second.hit and second.computed == 1 and second.reused == 20
    after = by_photo(second.cache)
    assert len(after) == 21 and all(np.array_equal(after[d], row) for d, row in before.items())
    record = json.loads(features(second.cache)[2]["calibration"])
    assert record["observers_from"] == str(Path(first.cache).resolve())
    assert {**record, "observers_from": None} == {**json.loads(features(first.cache)[2]["calibration"]),
                                                  "observers_from": None}
    said = [r.getMessage() for r in caplog.records if "calibration of" in r.getMessage()]
    assert len(said) == 1 and first.cache in said[0]  # which cache's calibration, once
    again = extract(cfg(data, tmp_path))
    assert again.hit and again.cache == second.cache
    forced = extract(cfg(data, tmp_path, calib_data=str(data)))
    assert not forced.hit and forced.computed == 21 and forced.cache not in (first.cache, second.cache)
    assert "observers_from" not in json.loads(features(forced.cache)[2]["calibration"])


def test_a_plain_extract_lends_itself_only_a_calibration_made_as_it_asks(tmp_path):
    """The lender is the folder's newest int8 cache calibrated with this --calib-n and --seed (another asks for
    another calibration, and gets one), and never a float cache: rows of two networks never mix."""
    data = make_image_folder(tmp_path / "d", per_class=6)
    first = extract(cfg(data, tmp_path))
    extract(cfg(data, tmp_path, precision="fp32"))
    add_photo(data, tmp_path)
    other_n = extract(cfg(data, tmp_path, calib_n=9))
    assert other_n.computed == 13 and "observers_from" not in json.loads(features(other_n.cache)[2]["calibration"])
    lent = extract(cfg(data, tmp_path))  # calib_n 8 again: the first cache's network, not the calib_n 9 one
    assert lent.computed == 1
    assert json.loads(features(lent.cache)[2]["calibration"])["observers_from"] == str(Path(first.cache).resolve())


def test_a_lent_calibration_counts_as_paid_for_precision_auto(tmp_path, monkeypatch):
    """--precision auto after photos were added to an int8 folder: the earlier cache's network is rebuilt from its
    observers (no calibration to pay), so auto's shorter threshold applies and it stays int8, computing the new
    photo only, where it chose float (and computed every photo in it) for want of this folder's calibration."""
    from pipeline.extraction import extract as stage

    monkeypatch.setattr(stage, "cpu_flags", lambda: {"avx512_vnni"})
    monkeypatch.setattr(stage, "INT8_AUTO_MIN_IMAGES_PAID", 13)
    data = make_image_folder(tmp_path / "d", per_class=6)
    extract(cfg(data, tmp_path))
    add_photo(data, tmp_path)
    auto = extract(cfg(data, tmp_path, precision="auto"))
    assert auto.precision == "int8" and auto.computed == 1 and auto.reused == 12
    monkeypatch.setattr(stage, "INT8_AUTO_MIN_IMAGES_PAID", 14)  # too few for int8: a float cache, lent nothing
    made = json.loads(features(extract(cfg(data, tmp_path, precision="auto")).cache)[2]["config"])
    assert made["precision"] == "auto" and made["calib_cache"] == ""


def test_a_stale_cache_that_lent_its_own_calibration_is_extracted_again_with_its_network(tmp_path):
    """A lent cache whose photo was rewritten in place (same size and mtime: the same key) is stale: set aside, it
    still lends its observers, so the rewritten photo is computed with that network and the other rows copied."""
    import os

    data = make_image_folder(tmp_path / "d", per_class=6)
    extract(cfg(data, tmp_path))
    add_photo(data, tmp_path)
    lent = extract(cfg(data, tmp_path))
    before = by_photo(lent.cache)
    photo = data / "blue" / "blue.2.jpg"
    st = photo.stat()
    raw = bytearray(photo.read_bytes())
    raw[-3] ^= 0xFF
    photo.write_bytes(bytes(raw))
    os.utime(photo, ns=(st.st_atime_ns, st.st_mtime_ns))
    again = extract(cfg(data, tmp_path, verify=True))
    assert not again.hit and again.cache == lent.cache and again.computed == 1 and again.reused == 12
    assert json.loads(features(again.cache)[2]["calibration"])["observers_from"]  # the network its key names
    after = by_photo(again.cache)
    assert sum(any(np.array_equal(row, old) for old in before.values()) for row in after.values()) == 12
