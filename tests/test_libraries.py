"""timm and torchvision models as backbones through every command: tiny random timm test models end to end,
and (slow) the real EfficientNet-Lite0 file on real photos."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import pipeline
from pipeline import cli
from pipeline.extraction import libraries
from tests.conftest import SHARED, make_image_folder

pytestmark = pytest.mark.filterwarnings("ignore:.*has random weights", "ignore:no sidecar", "ignore:`torch.jit")

LITE0 = SHARED / "weights" / "tf_efficientnet_lite0_imagenet.pt"
CATSDOGS_TEST = SHARED / "data" / "catsdogs_test"


def run(*args) -> str:
    result = CliRunner().invoke(cli.cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("timm")
    make_image_folder(root / "data", per_class=8, classes=("blue", "green", "red"))
    make_image_folder(root / "test", per_class=3, classes=("blue", "green", "red"), seed=1)
    return root


@pytest.fixture(scope="module")
def timm_head(folders) -> Path:
    """extract (timm's test_efficientnet, random weights) -> fit-head --test-data: its head.pt."""
    root = folders
    out = run("extract", "--data", root / "data", "--n", 0, "--backbone", "timm:test_efficientnet", "--weights",
              "none", "--cache-dir", root / "features", "--workers", 0, "--precision", "fp32", "--json")
    cache = Path(json.loads(out)["cache"])
    assert cache.name.startswith("test_efficientnet-")  # timm:X and X are one name: X only timm has
    out = run("fit-head", "--cache", cache, "--test-data", root / "test", "--runs-dir", root / "runs", "--json")
    result = json.loads(out)
    assert result["test_acc"] == 1.0
    return Path(result["checkpoint"])


def test_a_timm_head_predicts_evaluates_exports_and_serves(timm_head, folders, tmp_path):
    from fastapi.testclient import TestClient

    photos = sorted((folders / "test").rglob("*.jpg"))
    rows = list(pipeline.predict_files(timm_head, photos, precision="fp32", workers=0))
    assert [r["class"] for r in rows] == [p.parent.name for p in photos]
    report = json.loads(run("evaluate", "--model", timm_head, "--data", folders / "test", "--runs-dir", tmp_path,
                            "--workers", 0, "--json"))
    assert report["accuracy"] == 1.0
    exported = pipeline.export_model(timm_head, tmp_path / "m.onnx")
    assert exported.passed and exported.max_abs_diff < 1e-4
    meta = json.loads(Path(f"{tmp_path / 'm.onnx'}.json").read_text())
    assert meta["backbone"] == "test_efficientnet" and meta["preprocessing"]["crop_size"] == 160
    with TestClient(pipeline.serve_app(timm_head, precision="fp32"), base_url="http://localhost") as client:
        answer = client.post("/predict", files=[("files", (photos[0].name, photos[0].read_bytes(), "image/jpeg"))])
    assert answer.status_code == 200 and answer.json()[0]["class"] == photos[0].parent.name


def test_finetune_unfreezes_a_timm_models_last_stages(folders, tmp_path):
    out = run("summary", "--backbone", "test_vit", "--unfreeze", 2)
    assert "6 backbone blocks" in out
    result = json.loads(run("finetune", "--data", folders / "data", "--backbone", "test_vit", "--weights", "none",
                            "--unfreeze", 2, "--epochs", 1, "--batch-size", 8, "--workers", 0,
                            "--runs-dir", tmp_path, "--json"))
    rows = pipeline.predict_files(result["checkpoint"], sorted((folders / "test").rglob("*.jpg")), precision="fp32",
                                  workers=0)
    assert rows.result.errors == 0 and len(rows) == 9
    ckpt = torch.load(result["checkpoint"], weights_only=True)
    assert ckpt["backbone"] == "test_vit" and ckpt["preprocessing"]["crop_size"] == 160


def test_int8_and_compile_extract_a_timm_model(folders, tmp_path):
    pytest.importorskip("torchao")
    out = run("extract", "--data", folders / "data", "--n", 0, "--backbone", "test_convnext", "--weights", "none",
              "--cache-dir", tmp_path, "--workers", 0, "--precision", "int8", "--calib-n", 8, "--json")
    result = json.loads(out)
    assert result["precision"] == "int8" and result["rows"] == 24 and result["feature_shape"] == [64, 5, 5]


def test_an_unknown_backbone_is_a_usage_error_before_anything_runs(folders, tmp_path):
    result = CliRunner().invoke(cli.cli, ["extract", "--data", str(folders / "data"), "--n", "0", "--backbone",
                                          "convnext_tiny2x", "--cache-dir", str(tmp_path / "f")])
    assert result.exit_code == 2 and "close: convnext_tiny" in result.stderr
    assert not list(tmp_path.rglob("*.h5"))


# -- the real EfficientNet-Lite0 file on real photos ------------------------------------------------------
@pytest.fixture
def lite0_available():
    if not (LITE0.is_file() and CATSDOGS_TEST.is_dir()):
        pytest.skip("../shared (the Lite0 weights and catsdogs_test) is not beside the project")


def _subset(root: Path, per_class: int) -> Path:
    for cls in ("Cat", "Dog"):
        (root / cls).mkdir(parents=True)
        for p in sorted((CATSDOGS_TEST / cls).glob("*.jpg"))[:per_class]:
            (root / cls / p.name).symlink_to(p)
    return root


@pytest.mark.slow
def test_lite0_imagenet_classifier_names_cats_and_dogs(lite0_available):
    """imagenet-check with the shared file: its 1000-class classifier names a cat or a dog class."""
    cats = dogs = 0
    photos = sorted((CATSDOGS_TEST / "Cat").glob("*.jpg"))[:10] + sorted((CATSDOGS_TEST / "Dog").glob("*.jpg"))[:10]
    for p in photos:
        top = pipeline.imagenet_check(str(p), backbone="tf_efficientnet_lite0", weights=str(LITE0), top=1,
                                      device="cpu").top[0]
        index = top["index"]
        cats += p.parent.name == "Cat" and 281 <= index <= 293  # ImageNet's cats (domestic and wild)
        dogs += p.parent.name == "Dog" and 151 <= index <= 275  # ImageNet's dogs
    assert cats >= 7 and dogs >= 8


@pytest.mark.slow
def test_lite0_features_fit_an_accurate_head(lite0_available, tmp_path):
    """extract with the shared file, then fit-head on its features: >= 0.9 on held-out real photos."""
    data = _subset(tmp_path / "train", 40)
    test = tmp_path / "test"
    for cls in ("Cat", "Dog"):
        (test / cls).mkdir(parents=True)
        for p in sorted((CATSDOGS_TEST / cls).glob("*.jpg"))[100:130]:
            (test / cls / p.name).symlink_to(p)
    out = run("extract", "--data", data, "--n", 0, "--backbone", "tf_efficientnet_lite0", "--weights", LITE0,
              "--cache-dir", tmp_path / "features", "--json")
    extracted = json.loads(out)
    assert extracted["feature_shape"] == [1280, 7, 7]
    import h5py

    with h5py.File(extracted["cache"], "r") as f:  # the sidecar's preprocessing, in the cache's provenance
        pre = json.loads(f.attrs["preprocessing"])
    assert (pre["resize_size"], pre["crop_size"], pre["interpolation"], pre["mean"]) == (256, 224, "bicubic", [0.5] * 3)
    result = json.loads(run("fit-head", "--cache", extracted["cache"], "--test-data", test,
                            "--runs-dir", tmp_path / "runs", "--json"))
    assert result["test_acc"] >= 0.9


def test_libraries_split_prefixes():
    assert libraries.split_prefix("timm:resnet18") == ("timm", "resnet18")
    assert libraries.split_prefix("torchvision:vgg16") == ("torchvision", "vgg16")
    assert libraries.split_prefix("vgg16") == ("", "vgg16")
    assert libraries.split_prefix("other:vgg16") == ("", "other:vgg16")


def test_a_vgg16_cache_keeps_its_key_whichever_way_it_is_named(image_folder, monkeypatch):
    """Caches made before timm are found again: 'vgg16' and 'torchvision:vgg16' key exactly the fields they
    did (the backbone's bare name, no library field), and their file name is unchanged."""
    from pipeline.cache.feature_cache import cache_file_name
    from pipeline.data.folders import list_image_folder
    from pipeline.extraction import extract as extract_mod
    from pipeline.extraction.backbones import canonical_name

    seen = []
    monkeypatch.setattr(extract_mod, "fingerprint", lambda d: seen.append(d) or "k" * 64)
    listing = list_image_folder(str(image_folder))
    for name in ("vgg16", "torchvision:vgg16"):
        cfg = extract_mod.ExtractConfig(data=str(image_folder), backbone=canonical_name(name), n=0)
        extract_mod.cache_key(cfg, listing)
    assert seen[0] == seen[1] and seen[0]["backbone"] == "vgg16"
    assert set(seen[0]) == {"format", "data", "backbone", "weights", "n", "seed", "dtype", "precision", "pool",
                            "torchvision", "decode_version"}
    assert cache_file_name("vgg16", 0, "k" * 64) == "vgg16-nall-kkkkkkkkkkkk.h5"
    assert cache_file_name("timm:resnet18", 0, "k" * 64) == "timm-resnet18-nall-kkkkkkkkkkkk.h5"


def test_audit_and_finetune_run_on_a_timm_head_and_its_cache(timm_head, folders, tmp_path):
    """audit finds a test photo the training folder also holds in a timm cache (extracting the test folder
    with the cache's own network), and finetune starts from the timm head, its backbone and preprocessing."""
    import shutil

    test = tmp_path / "test"
    shutil.copytree(folders / "test", test)
    leaked = sorted((folders / "data" / "red").glob("*.jpg"))[0]
    shutil.copy(leaked, test / "red" / "copy.jpg")
    cache = torch.load(timm_head, weights_only=True)["cache"]
    report = json.loads(run("audit", "--cache", cache, "--test-data", test, "--cache-dir", folders / "features",
                            "--backbone", "timm:test_efficientnet", "--weights", "none", "--workers", 0,
                            "--runs-dir", tmp_path / "runs", "--json"))
    leaks = {(Path(x["test"]).name, Path(x["train"]).name) for x in report["leaks"]}
    assert ("copy.jpg", leaked.name) in leaks
    result = json.loads(run("finetune", "--data", folders / "data", "--init-head", timm_head, "--unfreeze", 1,
                            "--epochs", 1, "--batch-size", 8, "--workers", 0, "--runs-dir", tmp_path / "runs",
                            "--json"))
    ckpt = torch.load(result["checkpoint"], weights_only=True)
    assert ckpt["backbone"] == "test_efficientnet" and ckpt["preprocessing"]["crop_size"] == 160


@pytest.mark.parametrize("name, says", [("crossvit_tiny_240", "gives a list"),  # two branches' tokens
                                         ("coat_lite_tiny", "gives 50 tokens")])  # a class token timm does not count
def test_a_timm_model_with_no_map_to_cache_is_refused_in_one_line_before_a_cache_is_made(folders, tmp_path, name,
                                                                                          says):
    """CrossViT's forward_features iterates ModuleLists (never called themselves: they were left out of its trunk)
    and gives a list: extract ended in "unexpected AttributeError ... (a bug?)" or "cannot lay 50 patch tokens
    out" (not naming the model), each after making a cache file; now a usage error naming it, and no file."""
    result = CliRunner().invoke(cli.cli, ["extract", "--data", str(folders / "data"), "--backbone", name,
                                          "--weights", "none", "--cache-dir", str(tmp_path / "features")])
    assert result.exit_code == 2, result.output
    assert f"timm's {name} is not supported as a backbone" in result.output and says in result.output
    assert not (tmp_path / "features").exists() or not any((tmp_path / "features").iterdir())


def test_a_timm_trunk_keeps_the_module_lists_forward_features_iterates():
    """Modules called only through a ModuleList (Twins' patch_embeds and blocks) are part of the trunk."""
    used = libraries.timm_used_children("twins_svt_small")
    assert {"patch_embeds", "blocks"} <= used and "head" not in used


def test_a_timm_trunk_keeps_a_module_forward_features_only_reads():
    """EVA-02's forward_features calls self.rope.get_embed(), never rope itself: its trunk replaced rope with an
    Identity and extract ended in "unexpected AttributeError: 'Identity' object has no attribute 'get_embed'"."""
    from pipeline.extraction.backbones import load_backbone

    with pytest.warns(UserWarning, match="random weights"):
        trunk = load_backbone("eva02_tiny_patch14_224", "none").features.eval()
    with torch.no_grad():
        assert tuple(trunk(torch.zeros(1, 3, 224, 224)).shape) == (1, 192, 16, 16)  # 224 / patch 14


@pytest.mark.parametrize("name, instead, why, internal", [
    ("vit_b_16", "use timm's version of it: --backbone vit_base_patch16_224", "a vision transformer", "AssertionError"),
    ("googlenet", "timm has no googlenet; use a timm model", "auxiliary classifiers", "Invalid channel dimensions"),
    ("maxvit_t", "--backbone maxvit_tiny_tf_224", "runs its stages from a list", "missing the required")])
def test_a_torchvision_model_that_is_no_chain_is_refused_naming_timms_version(folders, tmp_path, name, instead, why,
                                                                             internal):
    """The refusal said "use timm's version of it (--backbone timm:NAME)" for every model, googlenet (timm has
    none) too, leaving the user to find vit_b_16's timm name; now it names it, or says there is none. It quoted
    torch's own exception from tracing the model ("AssertionError: Expected (batch_size, seq_length, hidden_dim)
    got torch.Size([1, 768, 14, 14])", and googlenet's init warning before it): now it says in a few words what the
    model does between its layers, and the exception is in the -v log only."""
    args = ["extract", "--data", str(folders / "data"), "--backbone", name, "--weights", "none", "--cache-dir",
            str(tmp_path / "features")]
    result = CliRunner().invoke(cli.cli, args)
    assert result.exit_code == 2 and f"torchvision's {name} is not a chain" in result.stderr
    assert instead in result.stderr and why in result.stderr
    assert internal not in result.stderr and "Error" not in result.stderr.replace("Error: ", "", 1)
    assert "init_weights" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    verbose = CliRunner().invoke(cli.cli, ["-v", *args])
    assert verbose.exit_code == 2 and internal in verbose.stderr  # for whoever debugs it


# -- a timm pretrained tag, however it is written --------------------------------------------------------------
@pytest.fixture
def fake_hub(monkeypatch):
    """timm's pretrained download, offline: each ``MODEL.TAG`` gets random weights seeded by its tag (two tags are
    two networks, one tag is always the same one); the hub probe is off."""
    import zlib

    import timm

    from pipeline.extraction import backbones

    real = timm.create_model

    def create_model(name, pretrained=False, **kwargs):
        if pretrained:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(zlib.crc32(name.encode()))
                return real(name, pretrained=False, **kwargs)
        return real(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", create_model)
    monkeypatch.setattr(backbones, "_hub_unreachable", lambda: None)


def _extract(folders, cache_dir, *backbone) -> dict:
    return json.loads(run("extract", "--data", folders / "data", "--n", 0, "--backbone", *backbone, "--cache-dir",
                          cache_dir, "--workers", 0, "--precision", "fp32", "--json"))


def test_a_pretrained_tag_in_the_backbone_name_is_the_same_cache_as_the_weights_naming_it(fake_hub, folders, tmp_path):
    """--backbone timm:test_efficientnet.r160_in1k ended in "cannot download timm's
    test_efficientnet.r160_in1k.r160_in1k (RuntimeError: Invalid pretrained tag ...); offline?" (the tag twice);
    --weights r160_in1k and the default (DEFAULT, which is r160_in1k) made two caches of one network. Now every
    spelling is one cache, recorded as one backbone and one weights id, and a head fitted on it runs under any."""
    import h5py

    first = _extract(folders, tmp_path, "timm:test_efficientnet.r160_in1k")
    assert not first["hit"]
    for spelling in (["test_efficientnet", "--weights", "r160_in1k"], ["test_efficientnet.r160_in1k", "--weights",
                     "r160_in1k"], ["test_efficientnet"], ["test_efficientnet", "--weights", "DEFAULT"]):
        again = _extract(folders, tmp_path, *spelling)
        assert again["hit"] and again["cache"] == first["cache"], spelling
    assert len(list(tmp_path.glob("*.h5"))) == 1
    with h5py.File(first["cache"], "r") as f:
        assert (f.attrs["backbone"], f.attrs["weights"]) == ("test_efficientnet", "timm:test_efficientnet.r160_in1k")
        assert json.loads(f.attrs["config"])["weights"] == "r160_in1k"
    fitted = json.loads(run("fit-head", "--cache", first["cache"], "--test-data", folders / "test", "--runs-dir",
                            tmp_path / "runs", "--json"))
    assert len(list(tmp_path.glob("*.h5"))) == 2  # the test folder's cache, beside it
    photos = sorted((folders / "test").rglob("*.jpg"))
    rows = list(pipeline.predict_files(fitted["checkpoint"], photos, precision="fp32", workers=0))
    assert len(rows) == len(photos) and all(r["class"] for r in rows)


def test_the_default_tag_named_finds_the_cache_made_with_default(fake_hub, folders, tmp_path):
    """The other order: a cache made with --weights DEFAULT is the cache of --weights <its default tag> (keyed by
    the spelling, so found by what the default resolves to now), not a second run of the network."""
    first = _extract(folders, tmp_path, "test_efficientnet")
    again = _extract(folders, tmp_path, "test_efficientnet", "--weights", "r160_in1k")
    assert again["hit"] and again["cache"] == first["cache"]


def test_two_tags_are_two_caches_and_a_tag_beside_other_weights_is_refused(fake_hub, folders, tmp_path):
    """timm:resnet18.a1_in1k and timm:resnet18.tv_in1k are other weights: never one cache. A tag in the name beside
    another --weights tag names two networks: one line, exit 2, no file; beside --weights none (random weights,
    whatever the tag) it is the plain name's random network."""
    a = _extract(folders, tmp_path, "timm:resnet18.a1_in1k")
    b = _extract(folders, tmp_path, "timm:resnet18", "--weights", "tv_in1k")
    assert not b["hit"] and a["cache"] != b["cache"]
    # a tag is timm's: resnet18.a1_in1k is timm's resnet18 (torchvision's has no tags), not unknown weights of it
    assert _extract(folders, tmp_path, "resnet18.a1_in1k")["cache"] == a["cache"]
    result = CliRunner().invoke(cli.cli, ["extract", "--data", str(folders / "data"), "--backbone",
                                          "timm:resnet18.a1_in1k", "--weights", "tv_in1k", "--cache-dir",
                                          str(tmp_path / "other")])
    assert result.exit_code == 2, result.output
    assert "--backbone timm:resnet18.a1_in1k names timm's pretrained weights 'a1_in1k'" in result.stderr
    assert "--weights tv_in1k names 'tv_in1k'" in result.stderr and not (tmp_path / "other").exists()
    plain = _extract(folders, tmp_path, "test_efficientnet", "--weights", "none")
    tagged = _extract(folders, tmp_path, "test_efficientnet.r160_in1k", "--weights", "none")
    assert tagged["hit"] and tagged["cache"] == plain["cache"]


@pytest.mark.parametrize("backbone", [".r160_in1k", "test_efficientnet.", "timm:.x"])
def test_a_tag_without_a_model_or_a_model_without_a_tag_is_no_name(folders, tmp_path, backbone):
    """'.r160_in1k' was refused as "unknown --backbone ''" (not the value given); 'test_efficientnet.' extracted
    timm's model into a cache of its own name, a second cache of one network."""
    result = CliRunner().invoke(cli.cli, ["extract", "--data", str(folders / "data"), "--n", "0", "--backbone",
                                          backbone, "--weights", "none", "--cache-dir", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert f"unknown --backbone {backbone!r}: a timm model with a pretrained tag is written MODEL.TAG" in result.stderr
    assert not list(tmp_path.rglob("*.h5*"))


@pytest.mark.parametrize("backbone, weights", [("test_efficientnet", "bogus"), ("test_efficientnet.bogus", "DEFAULT")])
def test_an_unknown_timm_tag_is_a_usage_error_naming_the_tags(folders, tmp_path, backbone, weights):
    """An unknown tag was "unexpected RuntimeError: Invalid pretrained tag (bogus) ... (a bug?)"."""
    result = CliRunner().invoke(cli.cli, ["extract", "--data", str(folders / "data"), "--n", "0", "--backbone",
                                          backbone, "--weights", weights, "--cache-dir", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert "timm has no pretrained weights 'bogus' for test_efficientnet; tags: r160_in1k" in result.stderr
    assert not list(tmp_path.rglob("*.h5*"))


def test_a_default_cache_made_when_timm_named_another_default_tag_is_stale(fake_hub, folders, tmp_path):
    """--weights DEFAULT is keyed as written (a hit needs no torch) and timm's version is not in the key: after a
    timm update that moved the model's default tag, DEFAULT's cache of the old default's features was a hit, two
    networks under one cache. Now a cache made with another timm version is checked: stale, said so, extracted
    again (no row reused: other weights)."""
    import h5py

    first = _extract(folders, tmp_path, "test_efficientnet")
    with h5py.File(first["cache"], "r+") as f:  # as if made by a timm whose default tag was another one
        f.attrs["weights"] = "timm:test_efficientnet.old_in1k"
        f.attrs["versions"] = json.dumps({**json.loads(f.attrs["versions"]), "timm": "0.9.2"})
    result = CliRunner().invoke(cli.cli, ["extract", "--data", str(folders / "data"), "--n", "0", "--backbone",
                                          "test_efficientnet", "--cache-dir", str(tmp_path), "--workers", "0",
                                          "--precision", "fp32", "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    again = json.loads(result.stdout)
    assert not again["hit"] and again["computed"] == 24 and again["cache"] == first["cache"]
    assert ("is stale: it holds the features of timm's test_efficientnet.old_in1k, DEFAULT of timm 0.9.2; with timm "
            in result.stderr and "DEFAULT is test_efficientnet.r160_in1k, other weights" in result.stderr)
    with h5py.File(again["cache"], "r") as f:
        assert f.attrs["weights"] == "timm:test_efficientnet.r160_in1k"
    assert [p.name for p in tmp_path.glob("*.h5*")] == [Path(first["cache"]).name]  # the stale one gone once done


def test_finetune_from_a_head_takes_any_spelling_of_its_network_and_refuses_another(fake_hub, folders, tmp_path):
    """finetune --init-head H --backbone test_efficientnet.r160_in1k (or timm:test_efficientnet) on a head fitted
    with --backbone test_efficientnet --weights r160_in1k was refused as "--backbone ... differs from H's
    test_efficientnet" (the names compared as written): one network. Now the request is resolved as extract resolves
    it, and only another network, or other weights, is refused (before any run folder is made)."""
    cache = _extract(folders, tmp_path / "features", "test_efficientnet", "--weights", "r160_in1k")["cache"]
    head = json.loads(run("fit-head", "--cache", cache, "--runs-dir", tmp_path / "heads", "--json"))["checkpoint"]
    for spelling in (["test_efficientnet.r160_in1k"], ["timm:test_efficientnet"],
                     ["timm:test_efficientnet.r160_in1k", "--weights", "r160_in1k"]):
        result = json.loads(run("finetune", "--data", folders / "data", "--init-head", head, "--backbone", *spelling,
                                "--unfreeze", 1, "--epochs", 1, "--batch-size", 8, "--workers", 0, "--runs-dir",
                                tmp_path / "runs", "--json"))
        ckpt = torch.load(result["checkpoint"], weights_only=True)
        assert (ckpt["backbone"], ckpt["weights"]) == ("test_efficientnet", "timm:test_efficientnet.r160_in1k")
    for spelling, says in ((["test_vit"], "--backbone test_vit differs from"),
                           (["test_efficientnet.r160_in1k", "--weights", "none"], "was fitted on other features")):
        result = CliRunner().invoke(cli.cli, ["finetune", "--data", str(folders / "data"), "--init-head", head,
                                              "--backbone", *spelling, "--epochs", "1", "--workers", "0",
                                              "--runs-dir", str(tmp_path / "refused")])
        assert result.exit_code == 2 and says in result.stderr, (spelling, result.output)
        assert not (tmp_path / "refused").exists()


def test_an_int8_calibration_is_found_under_any_spelling_of_its_network(fake_hub, folders, tmp_path):
    """audit's and suggest's int8 calibration reuse (quantize.newest_int8_cache) compared --backbone as written:
    with the tag in the name (test_efficientnet.r160_in1k, or timm:...) the folder's earlier int8 cache of that
    network was not found, and a new calibration (another network: every row computed again) was made. Now the
    request is resolved as extract resolves it; other weights still find nothing."""
    from pipeline.extraction.quantize import newest_int8_cache

    made = _as_int8(_extract(folders, tmp_path, "test_efficientnet", "--weights", "r160_in1k"))
    for backbone, weights in (("test_efficientnet.r160_in1k", "DEFAULT"), ("timm:test_efficientnet.r160_in1k",
                              "DEFAULT"), ("timm:test_efficientnet", "r160_in1k"), ("test_efficientnet", "r160_in1k")):
        assert newest_int8_cache(str(tmp_path), str(folders / "data"), backbone, weights) == made, backbone
    assert newest_int8_cache(str(tmp_path), str(folders / "data"), "test_efficientnet.r160_in1k", "none") == ""
    # made with DEFAULT (its record: timm:test_efficientnet.r160_in1k), found by the tag that DEFAULT was
    default = _as_int8(_extract(folders, tmp_path / "default", "test_efficientnet"))
    assert newest_int8_cache(str(tmp_path / "default"), str(folders / "data"), "test_efficientnet.r160_in1k",
                             "DEFAULT") == default


def _as_int8(made: dict) -> str:
    """An fp32 cache whose record says int8: the calibration lookup reads no more than the record, and a real
    int8 extraction takes minutes on 2 cores (test_quantize runs those)."""
    import h5py

    with h5py.File(made["cache"], "r+") as f:
        f.attrs["precision"] = "int8"
    return made["cache"]


def test_an_int8_cache_made_with_the_default_tag_is_found_for_default_weights(fake_hub, folders, tmp_path):
    """An int8 cache made with test_efficientnet.r160_in1k, then audit (or suggest) with plain test_efficientnet
    (DEFAULT, whose tag is r160_in1k): extract's lookup took it (the other spelling), but the calibration reuse
    (quantize.newest_int8_cache) did not: after a change to the folder a new calibration, another network, every
    row computed again. Now both agree; a cache of another tag is still not DEFAULT's. (Its record made int8's by
    hand: the lookup reads no more, and a real int8 extraction takes minutes here.)"""
    import h5py

    from pipeline.extraction.quantize import newest_int8_cache

    made = _as_int8(_extract(folders, tmp_path, "test_efficientnet.r160_in1k"))
    data = str(folders / "data")
    for backbone in ("test_efficientnet", "timm:test_efficientnet"):
        assert newest_int8_cache(str(tmp_path), data, backbone, "DEFAULT") == made, backbone
    with h5py.File(made, "r+") as f:  # as if made with a tag that is not the default
        f.attrs["weights"] = "timm:test_efficientnet.other_in1k"
        f.attrs["config"] = json.dumps({**json.loads(f.attrs["config"]), "weights": "other_in1k"})
    assert newest_int8_cache(str(tmp_path), data, "test_efficientnet", "DEFAULT") == ""
    assert newest_int8_cache(str(tmp_path), data, "test_efficientnet", "other_in1k") == made


def test_a_tag_finds_the_default_cache_without_asking_timm(fake_hub, folders, tmp_path, monkeypatch):
    """--weights r160_in1k with only DEFAULT's cache: a hit, but timm was asked which tag is the default (torch
    imported, 2-3 s). The DEFAULT cache's record names the weights it holds, and with the timm that made it that
    is what DEFAULT is now: decided from the record. With another timm version timm is still asked."""
    import h5py

    from pipeline.extraction import backbones

    first = _extract(folders, tmp_path, "test_efficientnet")

    def asked(*args, **kwargs):
        raise AssertionError("timm asked")

    with monkeypatch.context() as m:
        for name in ("other_spelling", "load_preprocessing"):
            m.setattr(backbones, name, asked)
        m.setattr(libraries, "timm_pretrained_cfg", asked)
        again = _extract(folders, tmp_path, "test_efficientnet", "--weights", "r160_in1k")
    assert again["hit"] and again["cache"] == first["cache"]
    with h5py.File(first["cache"], "r+") as f:  # made by another timm whose default was another tag: not that one
        f.attrs["weights"] = "timm:test_efficientnet.old_in1k"
        f.attrs["versions"] = json.dumps({**json.loads(f.attrs["versions"]), "timm": "0.9.2"})
    other = _extract(folders, tmp_path, "test_efficientnet", "--weights", "r160_in1k")
    assert not other["hit"] and other["cache"] != first["cache"]


# -- which map a torchvision trunk ends with -------------------------------------------------------------------
def _classifier_input(model, x):
    """What the model's own forward gives its last Linear (the pooled vector its ImageNet classifier reads)."""
    seen = []
    linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    hook = linear.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    try:
        model(x)
    finally:
        hook.remove()
    return seen[0]


def test_densenets_map_is_the_one_its_classifier_pools():
    """DenseNet's forward applies a ReLU to ``features``' output (its last module a BatchNorm), so its trunk's map,
    average-pooled, was not what its classifier reads (7.6 apart on random weights); the ReLU is now the trunk's last
    module (no weights: the state-dict keys are ``features``'). (ConvNeXt's map is the one its classifier pools: the
    LayerNorm opening its classifier is applied to the pooled vector, a head's part, as in timm.)"""
    from pipeline.extraction.backbones import get_spec

    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    spec = get_spec("densenet121")
    with torch.no_grad():
        model = spec.build().eval()
        assert torch.equal(spec.features(model)(x).mean((2, 3)), _classifier_input(model, x))
    assert set(spec.features(model).state_dict()) == {k[len("features."):] for k in model.state_dict()
                                                      if k.startswith("features.")}


def test_a_densenet_cache_made_before_its_trunk_ended_with_the_relu_is_stale_and_its_heads_refused(tmp_path):
    """A DenseNet cache made when its map was taken before that ReLU holds other rows than its trunk gives now:
    extracted again (said why; no row reused), and a head or model made on them is refused in one line. Every other
    backbone's trunk is unchanged: no trunk_version in its caches' attributes, its heads load as before."""
    import h5py

    from pipeline.cache.provenance import Provenance

    make_image_folder(tmp_path / "data", per_class=2, size=(40, 32))
    args = ["extract", "--data", str(tmp_path / "data"), "--n", "0", "--backbone", "densenet121", "--weights", "none",
            "--cache-dir", str(tmp_path / "f"), "--workers", "0", "--precision", "fp32", "--json"]
    first = json.loads(run(*args))
    with h5py.File(first["cache"], "r+") as f:
        assert f.attrs.get("trunk_version") == "2"
        del f.attrs["trunk_version"]  # as made before
    result = CliRunner().invoke(cli.cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    again = json.loads(result.stdout)
    assert not again["hit"] and again["computed"] == 4 and again["cache"] == first["cache"]
    assert ("is stale: it holds rows of trunk_version 1, now 2: DenseNet's map is taken after the ReLU"
            in result.stderr)
    with h5py.File(again["cache"], "r") as f:
        now = Provenance.from_cache_attrs(dict(f.attrs))
    before = Provenance(**{**now.__dict__, "trunk_version": ""})
    assert before.differences(now) == [
        "trunk_version: 1 vs 2 (DenseNet's map is taken after the ReLU its forward applies to `features` (the map its "
        "classifier pools), no longer before it: extract that data again with this version, and fit again a head "
        "made from it)"]
    from pipeline.extraction.backbones import older_trunk
    from pipeline.models.whole_models import check_trunk

    with pytest.raises(pipeline.UsageError, match=r"'h.pt' was made on another map of densenet121 than it gives now "
                                                  r"\(trunk_version 1, now 2: .*\); extract its data again and fit"):
        check_trunk({"kind": "fit-head", "backbone": "densenet121"}, "h.pt")
    check_trunk({"kind": "fit-head", "backbone": "densenet121", "trunk_version": "2"}, "h.pt")
    for name in ("vgg16", "resnet18", "convnext_tiny", "tf_efficientnet_lite0", "timm:densenet121"):
        assert older_trunk(name, "") == ""
        check_trunk({"kind": "finetune", "backbone": name}, "m.pt")
    assert "trunk_version" not in Provenance(**{**now.__dict__, "backbone": "vgg16", "trunk_version": ""}).cache_attrs()
