"""choose-backbone: every candidate (and their fusions) cross-validated on the same folds, honest about noise."""
import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

import pipeline
from pipeline.cache.feature_cache import read_info
from pipeline.cli import cli
from pipeline.config import ChooseBackboneConfig
from pipeline.heads.backbone_choice import NOISE_SES, Candidate, _decide, corrected_se
from pipeline.reports.present import choose_backbone_text
from tests.conftest import make_image_folder

pytestmark = pytest.mark.filterwarnings("ignore:.*has random weights")


def test_choose_backbone_end_to_end_json_reuses_its_caches_and_their_rates(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=10, classes=("blue", "green", "red"))
    args = ["choose-backbone", "--data", data, "--backbone", "tiny=none", "--backbone", "tiny_wide=none",
            "--folds", "3", "--repeats", "1", "--cache-dir", tmp_path / "features", "--workers", "0", "--json"]
    out = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert out.exit_code == 0, out.output
    r = json.loads(out.stdout)
    names = [c["name"] for c in r["candidates"]]
    assert sorted(names) == ["tiny", "tiny+tiny_wide", "tiny_wide"] and r["rows"] == 30 and r["classes"] == 3
    by = {c["name"]: c for c in r["candidates"]}
    assert by["tiny+tiny_wide"]["features"] == 8 + 6 and by["tiny"]["features"] == 8
    for c in r["candidates"]:
        # a log-loss of 0: separable rows, where the coupled pairs reach probability 1.0 in float64; acc_se null
        # where every fold scored the same
        assert len(c["fold_acc"]) == 3 and 0 <= c["acc"] <= 1 and c["log_loss"] >= 0
        assert c["acc_se"] is None or c["acc_se"] >= 0
        assert c["img_per_s"] > 0 and c["mb_per_1000"] > 0
    fused = by["tiny+tiny_wide"]  # both networks per photo: slower than either, its caches' sizes together
    assert fused["img_per_s"] == pytest.approx(1 / (1 / by["tiny"]["img_per_s"] + 1 / by["tiny_wide"]["img_per_s"]))
    assert fused["mb_per_1000"] == pytest.approx(by["tiny"]["mb_per_1000"] + by["tiny_wide"]["mb_per_1000"])
    assert r["best"] == names[0] and r["fastest_within_noise"] in r["indistinguishable"] and r["note"]
    # ordinary caches (extract finds them), and the rate they were made at is kept in them
    for c in ("tiny", "tiny_wide"):
        (path,) = by[c]["caches"]
        assert json.loads(read_info(path).attrs["extract_rate"])["img_per_s"] == pytest.approx(by[c]["img_per_s"])
    again = pipeline.choose_backbone(data, ["tiny=none", "tiny_wide=none"], folds=3, repeats=1, fused=False,
                                     cache_dir=tmp_path / "features", workers=0)
    assert [c.name for c in again.candidates if "+" in c.name] == []
    for c in again.candidates:  # the same caches (hits), the same folds and heads: the same scores and rates
        assert c.caches == by[c.name]["caches"] and c.fold_acc == by[c.name]["fold_acc"]
        assert c.img_per_s == pytest.approx(by[c.name]["img_per_s"])
    text = choose_backbone_text(again)
    assert "CV accuracy" in text and "img/s" in text and "MB/1k" in text and again.note in text


def _candidate(name, fold_acc, rate):
    acc = np.asarray(fold_acc, float)
    return Candidate(name, [name], [], 10, float(acc.mean()), corrected_se(acc, 0.2), 0.5, 0.01, list(acc),
                     [0.5] * len(acc), rate, 1.0)


def test_a_clear_winner_is_recommended_and_a_tie_goes_to_the_fastest():
    cfg = ChooseBackboneConfig(data="d", folds=5, repeats=2)
    rng = np.random.default_rng(0)
    base = 0.8 + rng.normal(0, 0.03, 10)
    lead = 0.10 + np.random.default_rng(1).normal(0, 0.01, 10)  # a lead that varies by fold (else its SE is n/a)
    clear = _decide(cfg, [_candidate("slow", base + lead, 10.0), _candidate("fast", base, 100.0)], 200, 5, 0, 0)
    assert clear.best == "slow" and clear.fastest_within_noise == "slow" and clear.indistinguishable == ["slow"]
    assert "by more than 2 standard errors" in clear.note
    tie_acc = base + rng.normal(0, 0.03, 10)
    tie = _decide(cfg, [_candidate("slow", base + 0.005, 10.0), _candidate("fast", tie_acc, 100.0)], 200, 5, 0, 0)
    fast = next(c for c in tie.candidates if c.name == "fast")
    assert fast.within_noise and fast.diff <= NOISE_SES * fast.diff_se
    assert tie.fastest_within_noise == "fast" and "indistinguishable" in tie.note and "10.0x" in tie.note


def test_a_recommendation_over_a_best_of_unknown_speed_is_not_called_also_the_fastest():
    """The best's cache made before rates were kept (n/a), another within noise at 50 img/s: it is recommended,
    and the note said 'Recommended: other, also the fastest of them', as if it were the best too."""
    cfg = ChooseBackboneConfig(data="d", folds=5, repeats=2)
    base = np.full(10, 0.9)
    noise = np.random.default_rng(0).normal(0, 0.03, 10)
    other = base + noise - noise.mean() - 0.002  # 0.2 points behind on average, far within noise
    choice = _decide(cfg, [_candidate("old", base, None), _candidate("other", other, 50.0)], 200, 5, 0, 0)
    assert choice.best == "old" and choice.fastest_within_noise == "other"
    assert "also the fastest" not in choice.note and "the fastest of those whose rate is known" in choice.note
    assert "old's rate is unknown" in choice.note  # not why: a fusion with such a part, or rows copied, too


def test_a_single_candidate_is_not_said_to_beat_others():
    cfg = ChooseBackboneConfig(data="d", folds=5, repeats=2)
    alone = _decide(cfg, [_candidate("only", np.full(10, 0.9), 10.0)], 200, 5, 0, 0)
    assert alone.best == "only" and "The only candidate" in alone.note and "Every other" not in alone.note


def test_the_standard_error_is_corrected_for_overlapping_folds():
    scores = [0.8, 0.9, 0.85, 0.75, 0.95]
    naive = np.std(scores, ddof=1) / math.sqrt(5)
    assert corrected_se(scores, 0.2) == pytest.approx(np.std(scores, ddof=1) * math.sqrt(1 / 5 + 0.25))
    assert corrected_se(scores, 0.2) > naive and math.isnan(corrected_se([0.9], 0.2))


def test_a_standard_error_no_spread_can_estimate_is_na_not_a_fake_zero():
    """--folds 2 --repeats 1 on 30 easy photos: every fold scored 100 %, and the table said '100.0 ±  0.0 %', a
    certainty two folds moving in steps of one photo cannot show. It says n/a now (null in --json); the decision
    is as before: the same scores in every fold are within noise, the same deficit in every fold is not."""
    from dataclasses import asdict

    from pipeline.files import json_text

    cfg = ChooseBackboneConfig(data="d", folds=2, repeats=1)
    choice = _decide(cfg, [_candidate("a", [1.0, 1.0], 10.0), _candidate("b", [1.0, 1.0], 20.0),
                           _candidate("c", [0.9, 0.9], 30.0), _candidate("d", [0.8, 0.9], 5.0)], 30, 3, 0, 0)
    text = choose_backbone_text(choice)
    assert "0.0 %" not in text.replace("100.0 ±  n/a %", "") and "n/a where every fold scored the same" in text
    assert "best: a, 100.0 ± n/a %" in text and "+0.0 ± n/a" in text and "-10.0 ± n/a" in text
    assert " 85.0 ±  6.1 %" in text  # a spread two folds do show: a number
    by = {c.name: c for c in choice.candidates}
    assert by["b"].within_noise and not by["c"].within_noise and choice.fastest_within_noise == "b"
    shown = {c["name"]: c for c in json.loads(json_text(asdict(choice)))["candidates"]}
    assert shown["a"]["acc_se"] is None and shown["d"]["acc_se"] == pytest.approx(0.05 * math.sqrt(1.5))


def test_a_later_candidates_bad_weights_are_refused_before_any_extraction(tmp_path):
    """The second candidate's weights file is missing, or its sidecar names another model: refused in one line
    before the first candidate is extracted (it was extracted first, minutes for a real backbone)."""
    import json as json_module

    data = make_image_folder(tmp_path / "data", per_class=10)
    other = tmp_path / "w" / "other.pt"
    other.parent.mkdir()
    other.write_bytes(b"")
    other.with_suffix(".json").write_text(json_module.dumps({"arch": "vgg16"}))
    for weights, message in ((tmp_path / "missing.pt", "does not exist"),
                             (other, "is for 'vgg16', not 'tiny_wide' (its sidecar says so)")):
        out = CliRunner().invoke(cli, ["choose-backbone", "--data", str(data), "--cache-dir", str(tmp_path / "f"),
                                       "--workers", "0", "--backbone", "tiny=none", "--backbone",
                                       f"tiny_wide={weights}"])
        assert out.exit_code == 2 and message in out.output and out.output.count("\n") == 1, out.output
        assert not (tmp_path / "f").exists()  # nothing extracted


def test_one_weights_file_spelled_two_ways_or_copied_is_one_candidate_refused_before_cross_validation(
        tmp_path, monkeypatch):
    """'tiny=w/tiny.pt' and 'tiny=/abs/w/tiny.pt' (or a copy of the file) passed the 'named twice' check: both were
    extracted and cross-validated, then the fusion failed naming the same cache twice. Now one line, exit 2: the
    spellings before anything is extracted, the copy (the same cache) before any cross-validation."""
    import shutil

    import torch

    from tests.tiny import TinyNet

    data = make_image_folder(tmp_path / "data", per_class=10)
    (tmp_path / "w").mkdir()
    torch.save(TinyNet().state_dict(), tmp_path / "w" / "tiny.pt")
    shutil.copy(tmp_path / "w" / "tiny.pt", tmp_path / "w" / "copy.pt")
    monkeypatch.chdir(tmp_path)
    fitted = []
    monkeypatch.setattr("pipeline.heads.backbone_choice.cross_validate", lambda *a, **k: fitted.append(a))
    for other, extracted in (("./w/../w/tiny.pt", False), (str(tmp_path / "w" / "copy.pt"), True)):
        out = CliRunner().invoke(cli, ["choose-backbone", "--data", str(data), "--cache-dir", "f", "--workers", "0",
                                       "--backbone", "tiny=w/tiny.pt", "--backbone", f"tiny={other}"])
        assert out.exit_code == 2 and "named twice" in out.output and other in out.output, out.output
        last = out.output.splitlines()[-1]
        assert last.startswith("Error: a candidate is named twice") and "Traceback" not in out.output
        assert (tmp_path / "f").exists() == extracted and not fitted


def test_a_later_candidate_that_only_loading_refuses_is_refused_before_any_extraction(tmp_path, monkeypatch):
    """A weights file with no sidecar holding another model's tensors, and torchvision weights not downloaded
    that cannot be (offline): both failed only when their candidate's turn came, after the first was extracted."""
    import torch

    from pipeline.errors import PipelineError
    from pipeline.extraction import backbones as bb
    from tests.tiny import WideNet

    data = make_image_folder(tmp_path / "data", per_class=10)
    wrong = tmp_path / "w" / "wide.pt"
    wrong.parent.mkdir()
    torch.save(WideNet().state_dict(), wrong)  # tiny_wide's tensors, named for tiny, no sidecar to say so

    def offline(w):
        raise PipelineError(f"cannot download {w} (URLError: offline)")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))  # nothing downloaded yet
    monkeypatch.setattr(bb, "_download_state_dict", offline)
    for second, code, message in ((f"tiny={wrong}", 2, "are not for tiny"), ("vgg16", 1, "cannot download")):
        out = CliRunner().invoke(cli, ["choose-backbone", "--data", str(data), "--cache-dir", str(tmp_path / "f"),
                                       "--workers", "0", "--backbone", "tiny_wide=none", "--backbone", second])
        assert out.exit_code == code and message in out.output, out.output
        assert not (tmp_path / "f").exists()  # nothing extracted


def test_one_backbone_with_two_weights_is_two_candidates_told_apart(tmp_path):
    """vgg16 with a weights file and vgg16 with none: both rows were called 'vgg16' (and the fusion 'vgg16+vgg16'),
    so nobody could tell which scored what, and the recommendation's '*' and 'best' marked every row of that name."""
    import torch

    from tests.tiny import TinyNet

    data = make_image_folder(tmp_path / "data", per_class=10)
    weights = tmp_path / "w" / "trained.pt"
    weights.parent.mkdir()
    torch.manual_seed(1)
    torch.save(TinyNet().state_dict(), weights)
    choice = pipeline.choose_backbone(data, ["tiny=none", f"tiny={weights}"], folds=2, repeats=1,
                                      cache_dir=tmp_path / "features", workers=0)
    names = sorted(c.name for c in choice.candidates)
    assert names == ["tiny=none", "tiny=none+tiny=trained.pt", "tiny=trained.pt"]
    text = choose_backbone_text(choice)
    rows = text.splitlines()[2:2 + len(choice.candidates)]
    assert sum(r.startswith("* ") for r in rows) == 1 and sum(" best " in r for r in rows) == 1


def test_a_tag_beside_random_weights_is_not_in_the_label():
    """'test_efficientnet.r160_in1k=none' ran test_efficientnet's random weights (the tag dropped, as extract drops
    it) but its row was labelled 'test_efficientnet.r160_in1k', as if the pretrained weights had run. Its label
    (choose_backbone's candidate_names) now says what ran; beside the plain name's other weights both say which."""
    from pipeline.heads.backbone_choice import candidate_names

    assert candidate_names([("test_efficientnet.r160_in1k", "none"), ("tiny", "none")],
                           ["test_efficientnet.r160_in1k=none", "tiny=none"]) == ["test_efficientnet", "tiny"]
    assert candidate_names([("timm:test_efficientnet.r160_in1k", "none"), ("test_efficientnet", "DEFAULT")],
                           ["timm:test_efficientnet.r160_in1k=none", "test_efficientnet"]) == [
        "timm:test_efficientnet", "test_efficientnet"]
    assert candidate_names([("test_efficientnet.r160_in1k", "w.pt"), ("test_efficientnet", "DEFAULT")],
                           ["test_efficientnet.r160_in1k=w.pt", "test_efficientnet"]) == [
        "test_efficientnet=w.pt", "test_efficientnet=DEFAULT"]


@pytest.mark.parametrize("args, message", [
    ([], "name the candidates"),
    (["--backbone", "tiny=none", "--backbone", "tiny=none"], "named twice"),
    (["--backbone", "vgg16", "--backbone", "torchvision:vgg16=VGG16_Weights.DEFAULT"], "named twice"),
    # a timm tag in the name is the weights: both name one network (they were two candidates, two caches)
    (["--backbone", "timm:test_efficientnet.r160_in1k", "--backbone", "test_efficientnet=r160_in1k"], "named twice"),
    # in choose-backbone's terms (weights follow '='): it said "but --weights in1k names 'in1k'", an option it has not
    (["--backbone", "test_efficientnet.r160_in1k=in1k", "--backbone", "tiny=none"],
     "--backbone 'test_efficientnet.r160_in1k=in1k' names timm's pretrained weights 'r160_in1k' in the name and "
     "'in1k' after '=': give one of them (--backbone test_efficientnet=r160_in1k, or "
     "--backbone test_efficientnet=in1k)"),
    (["--backbone", "test_efficientnet.=r160_in1k", "--backbone", "tiny=none"],
     "or give the tag after '=' (convnext_tiny=fb_in22k)"),
    (["--backbone", "tiny=none", "--folds", "11"], "at least 11 photos of every class"),
    (["--backbone", "=none"], "expected NAME or NAME=WEIGHTS"),
    # 'vgg16=$W' with $W unset in the shell: the default weights were loaded, or downloaded (528 MB for VGG-16)
    (["--backbone", "tiny=", "--backbone", "tiny_wide=none"], "--backbone 'tiny=': no weights after '='"),
    # 5 of 10 photos a class in each training part: the default head's own 5-fold CV fits; --n 12 leaves 3
    # (it failed after extracting, naming fit-head's '--head auto', an option choose-backbone has not)
    (["--backbone", "tiny=none", "--n", "12", "--folds", "2"], "every class needs at least 10 photos"),
])
def test_usage_errors_are_one_line(tmp_path, args, message):
    data = make_image_folder(tmp_path / "data", per_class=10)
    out = CliRunner().invoke(cli, ["choose-backbone", "--data", str(data), "--cache-dir", str(tmp_path / "f"),
                                   "--workers", "0", *args])
    assert out.exit_code == 2 and message in out.output and out.output.count("\n") == 1, out.output
    assert "--weights" not in out.output  # choose-backbone has none


@pytest.mark.skipif(__import__("torch").cuda.device_count() > 7, reason="8 GPUs here")
def test_a_device_this_machine_lacks_is_refused_before_anything_is_extracted(tmp_path):
    """With every cache a hit, it was found only after them; the environment's, so exit 1 (it was 2)."""
    data = make_image_folder(tmp_path / "data", per_class=10)
    out = CliRunner().invoke(cli, ["choose-backbone", "--data", str(data), "--cache-dir", str(tmp_path / "f"),
                                   "--workers", "0", "--backbone", "tiny=none", "--device", "cuda:7"])
    assert out.exit_code == 1 and "cuda:7" in out.output and out.output.count("\n") == 1, out.output
    assert not (tmp_path / "f").exists()


def test_cross_validation_shows_one_bar_over_the_folds_not_each_folds_own(tmp_path, monkeypatch, capsys):
    """choose-backbone said nothing while it cross-validated a candidate (10 folds fitted side by side); with a
    bar inside each fold's fit there would be one per thread, interleaved. One line per fold done instead."""
    import pipeline.progress as pg

    data = make_image_folder(tmp_path / "data", per_class=10, classes=("blue", "green", "red"))
    monkeypatch.setattr(pg, "LOG_INTERVAL", 0.0)
    pipeline.choose_backbone(data, ["tiny=none", "tiny_wide=none"], folds=3, repeats=1, fused=False,
                             cache_dir=tmp_path / "features", workers=0, verbose=True)
    err = capsys.readouterr().err.splitlines()
    for name in ("tiny", "tiny_wide"):
        done = [line.split()[2] for line in err if line.startswith(f"choose-backbone: {name}: ")]
        assert done == ["1/3", "2/3", "3/3"]
    assert not [line for line in err if line.startswith("cross-validation: ") or "still running" in line]


def test_a_candidate_whose_rows_all_came_from_an_earlier_cache_keeps_that_caches_rate(tmp_path, make_cache):
    """After `extract -n 0` of the folder, choose-backbone's sample of it copies every row by content and computes
    none: its cache recorded no rate, so the candidate showed 'n/a' ('a cache made before rates were kept') and was
    never the fastest within noise. The copied rows keep the rate of the cache they came from."""
    data = make_image_folder(tmp_path / "data", per_class=10, classes=("blue", "green", "red"))
    whole = make_cache(data)  # tmp_path/features, as choose-backbone's below
    rate = json.loads(read_info(whole.cache).attrs["extract_rate"])
    choice = pipeline.choose_backbone(data, ["tiny=none", "tiny_wide=none"], n=24, folds=3, repeats=1, fused=False,
                                      cache_dir=tmp_path / "features", workers=0)
    tiny = next(c for c in choice.candidates if c.name == "tiny")
    (path,) = tiny.caches
    assert path != whole.cache and json.loads(read_info(path).attrs["reuse"])["computed"] == 0
    assert tiny.img_per_s == pytest.approx(rate["img_per_s"])


def test_candidates_whose_caches_are_there_need_no_weights_loaded(tmp_path, monkeypatch):
    """Offline, with every candidate's cache there (extract of each is a hit): choose-backbone was refused
    'cannot download ResNet18_Weights...': it checked that torchvision weights load before extracting, hits too.
    A cache's key already names its weights (a file's sha256, a library's weights name)."""
    import torch
    import torchvision

    from pipeline.errors import PipelineError
    from pipeline.extraction import backbones as bb

    data = make_image_folder(tmp_path / "data", per_class=10)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))  # nothing downloaded, ever
    monkeypatch.setattr(bb, "_download_state_dict", lambda w: torchvision.models.resnet18().state_dict())
    args = ["choose-backbone", "--data", str(data), "--cache-dir", str(tmp_path / "f"), "--workers", "0",
            "--folds", "3", "--repeats", "1", "--backbone", "tiny=none", "--backbone", "resnet18"]
    first = CliRunner().invoke(cli, args)
    assert first.exit_code == 0, first.output

    def offline(w):
        raise PipelineError(f"cannot download {w} (URLError: offline)")

    monkeypatch.setattr(bb, "_download_state_dict", offline)
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 0, again.output
    assert "read from its cache" in again.stderr and "extracting" not in again.stderr


def test_the_folders_left_out_files_are_said_once_not_once_per_listing(tmp_path, caplog):
    """A dangling link among the photos was warned about five times for two candidates (the sample's listing, then
    each candidate's hit check and extraction): once per call now, and again by the next call."""
    data = make_image_folder(tmp_path / "data", per_class=10, classes=("blue", "green", "red"))
    (data / "blue" / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    args = dict(folds=3, repeats=1, fused=False, cache_dir=tmp_path / "features", workers=0)
    for _ in range(2):  # extracting, then every cache a hit
        caplog.clear()
        pipeline.choose_backbone(data, ["tiny=none", "tiny_wide=none"], **args)
        said = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
        assert len(said) == 1 and "blue/gone.jpg: a dangling symlink" in said[0], said


def test_a_timm_candidate_offline_is_refused_before_any_extraction_saying_how_to_give_a_file(tmp_path, monkeypatch):
    """timm weights not in the hub's cache, offline: the first candidate was extracted, then the timm one failed
    saying 'pass --weights PATH', an option choose-backbone does not have; from Python, in Python's terms."""
    import timm

    def offline(*a, **k):
        if k.get("pretrained"):
            raise OSError("We couldn't connect to 'https://huggingface.co' (offline)")
        return real(*a, **k)

    real = timm.create_model
    monkeypatch.setattr(timm, "create_model", offline)
    from pipeline.extraction import backbones as bb

    monkeypatch.setattr(bb, "_hub_unreachable", lambda: None)  # no probe of the network
    data = make_image_folder(tmp_path / "data", per_class=10)
    with pytest.raises(pipeline.PipelineError, match=r"give backbones=\['test_efficientnet=PATH'\]") as e:
        pipeline.choose_backbone(data, ["tiny=none", "test_efficientnet"], folds=2, repeats=1, workers=0,
                                 cache_dir=tmp_path / "f")
    assert "--weights" not in str(e.value) and not (tmp_path / "f").exists()  # nothing extracted
    out = CliRunner().invoke(cli, ["choose-backbone", "--data", str(data), "--cache-dir", str(tmp_path / "f"),
                                   "--workers", "0", "--backbone", "tiny=none", "--backbone", "test_efficientnet"])
    assert out.exit_code == 1 and "give --backbone test_efficientnet=PATH to a local" in out.output, out.output
    assert not (tmp_path / "f").exists()


def test_choose_backbones_refusals_name_its_keywords_from_python(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=6)
    with pytest.raises(pipeline.UsageError, match=r"with folds=2 holds 3 photos .* \(or pass folds=6\)$"):
        pipeline.choose_backbone(data, ["tiny=none"], folds=2, repeats=1)
    with pytest.raises(pipeline.UsageError, match=r"^name the candidates: backbones=\['NAME\[=WEIGHTS\]'\], once"):
        pipeline.choose_backbone(data, [])
    with pytest.raises(pipeline.UsageError, match=r"^backbones 'tiny=': no weights after '='"):
        pipeline.choose_backbone(data, ["tiny="])
    out = CliRunner().invoke(cli, ["choose-backbone", "--data", str(data), "--backbone", "tiny=none", "--folds", "2"])
    assert out.exit_code == 2 and "with --folds 2 holds 3 photos" in out.output and "pass --folds 6" in out.output


def test_every_other_candidate_behind_by_the_same_amount_in_every_fold_is_said_so():
    """Each other candidate lower by the same amount in every fold (its standard error n/a): the note said 'by more
    than 2 standard errors', a number it could not have."""
    cfg = ChooseBackboneConfig(data="d", folds=2, repeats=1)
    choice = _decide(cfg, [_candidate("a", [1.0, 1.0], 10.0), _candidate("c", [0.9, 0.9], 30.0)], 30, 3, 0, 0)
    text = choose_backbone_text(choice)
    assert "Every other candidate scores lower in every fold, by the same amount: use a." in text, text
    assert "standard errors of the paired difference" not in text
    spread = _decide(cfg, [_candidate("a", [1.0, 1.0], 10.0), _candidate("d", [0.6, 0.7], 5.0)], 30, 3, 0, 0)
    assert "lower by more than 2 standard errors of the paired difference: use a." in choose_backbone_text(spread)
