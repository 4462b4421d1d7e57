import json
import logging
import os

import pytest
import torch

from pipeline.config import cli_terms
from pipeline.errors import PipelineError, UsageError
from pipeline.extraction import backbones as bb


def test_unknown_backbone_names_close_matches_and_how_to_list():
    with pytest.raises(ValueError) as e:
        bb.get_spec("convnext_tiny2x")
    msg = str(e.value)
    assert "'convnext_tiny2x'" in msg and "close: convnext_tiny" in msg and "timm.list_models" in msg
    assert "\n" not in msg
    with pytest.raises(ValueError, match="timm has no model"):
        bb.get_spec("timm:alexnet9")


@pytest.mark.parametrize("name, library, canonical", [
    ("tf_efficientnet_lite0", "timm", "tf_efficientnet_lite0"),  # only timm has it
    ("timm:tf_efficientnet_lite0", "timm", "tf_efficientnet_lite0"),
    ("resnet18", "torchvision", "resnet18"),  # both have it: torchvision, as before timm
    ("timm:resnet18", "timm", "timm:resnet18"),
    ("torchvision:resnet18", "torchvision", "resnet18"),
    ("mobilenet_v3_small", "torchvision", "mobilenet_v3_small"),
])
def test_names_resolve_to_one_library(name, library, canonical):
    spec = bb.get_spec(name)
    assert (spec.library, spec.name) == (library, canonical)
    assert bb.canonical_name(name) == canonical


def test_a_bare_or_torchvision_name_is_canonical_without_torch():
    import subprocess
    import sys

    code = ("import sys; from pipeline.extraction.backbones import canonical_name; "
            "print(canonical_name('torchvision:vgg16'), canonical_name('convnext_tiny'), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["vgg16", "convnext_tiny", "False"]


@pytest.mark.parametrize("name, shape, blocks", [
    ("test_efficientnet", (256, 5, 5), 5),  # timm CNN: forward_features' map, stages from feature_info
    ("test_vit", (64, 10, 10), 6),  # timm ViT: the 10x10 patch tokens as a map, class token dropped
    ("test_convnext", (64, 5, 5), 4),
])
def test_timm_models_give_their_last_map_and_stages(name, shape, blocks):
    loaded = bb.load_backbone(name, "none")
    crop = loaded.transform.crop_size[0]
    assert crop == 160 and bb.feature_shape(name, crop) == shape
    with torch.inference_mode():
        assert tuple(loaded.features(torch.zeros(2, 3, crop, crop)).shape) == (2, *shape)
    assert len(bb.feature_blocks(loaded.spec, loaded.features)) == blocks
    trunk = {k for k in loaded.features.state_dict()}
    assert not any("classifier" in k or k.startswith("net.head.") for k in trunk)  # the classifier is not cut in


def test_vit_map_is_its_patch_tokens_without_the_class_token():
    loaded = bb.load_backbone("test_vit", "none")
    x = torch.randn(1, 3, 160, 160)
    with torch.inference_mode():
        tokens = loaded.model.forward_features(x)
        fmap = loaded.features(x)
    assert tokens.shape[1] == 1 + 100
    assert torch.equal(fmap.flatten(2).transpose(1, 2), tokens[:, 1:])


def test_timm_preprocessing_comes_from_its_pretrained_config():
    import timm
    from timm.data import resolve_data_config

    loaded = bb.load_backbone("test_convnext", "none")
    cfg = resolve_data_config({}, model=timm.create_model("test_convnext"))
    t = loaded.transform
    assert t.crop_size == [cfg["input_size"][-1]] and t.resize_size == [int(cfg["input_size"][-1] / cfg["crop_pct"])]
    assert t.interpolation.value == cfg["interpolation"] == "bicubic"
    assert tuple(t.mean) == tuple(cfg["mean"]) and tuple(t.std) == tuple(cfg["std"])
    pre, weights_id = bb.load_preprocessing("tf_efficientnet_lite0", "DEFAULT")  # no download
    assert (pre.resize_size, pre.crop_size, list(pre.mean)) == ([256], [224], [0.5, 0.5, 0.5])
    assert weights_id.startswith("timm:tf_efficientnet_lite0.")


def test_torchvision_trunks_stop_before_pooling():
    assert bb.get_spec("vgg16").pool == "none" and bb.get_spec("resnet18").pool == "avg"
    vgg = bb.load_backbone("vgg16", "none")
    assert vgg.features is vgg.model.features  # the module today's caches and checkpoints were made with
    assert len(bb.feature_blocks(vgg.spec, vgg.features)) == 5
    resnet = bb.load_backbone("resnet18", "none")
    assert len(bb.feature_blocks(resnet.spec, resnet.features)) == 5  # stem, layer1..layer4
    assert bb.feature_shape("mobilenet_v3_small", 224) == (576, 7, 7)
    with pytest.raises(ValueError, match="not a chain of layers.*timm"):
        bb.get_spec("vit_b_16")


def test_timm_local_file_with_its_sidecar(tmp_path):
    model = bb.load_backbone("test_efficientnet", "none").model
    path = tmp_path / "effnet.pt"
    torch.save(model.state_dict(), path)
    (tmp_path / "effnet.json").write_text(json.dumps({
        "arch": "test_efficientnet", "library": "timm", "mean": [0.5] * 3, "std": [0.5] * 3,
        "interpolation": "bilinear", "resize": 180, "crop": 160}))
    loaded = bb.load_backbone("test_efficientnet", str(path))
    t = loaded.transform
    assert (t.resize_size, t.crop_size, t.interpolation.value, loaded.mean) == ([180], [160], "bilinear", [0.5] * 3)
    assert loaded.covers == "all" and len(bb.imagenet_categories(loaded)) == 1000
    (tmp_path / "effnet.json").write_text(json.dumps({"arch": "test_efficientnet", "library": "torchvision"}))
    with pytest.raises(ValueError, match="timm:test_efficientnet|torchvision's"):
        bb.load_backbone("test_efficientnet", str(path))
    (tmp_path / "effnet.json").write_text(json.dumps({"resize": 0}))
    with pytest.raises(ValueError, match="'resize' must be a positive"):
        bb.load_backbone("test_efficientnet", str(path))


def test_timm_offline_download_is_one_clear_line(monkeypatch, caplog):
    import timm.models._hub as hub

    def offline(*a, **k):  # as the hub does offline: a warning for each retry, then the error
        logging.getLogger("huggingface_hub.utils._http").warning(
            "'[Errno -2] Name or service not known' thrown while requesting HEAD https://huggingface.co/...")
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(bb, "_hub_unreachable", lambda: None)  # no probe of the network
    monkeypatch.setattr(hub, "hf_hub_download", offline)  # where timm's pretrained route downloads
    level = logging.getLogger("huggingface_hub").level
    with caplog.at_level(logging.WARNING), pytest.raises(PipelineError) as e:
        bb.load_backbone("test_efficientnet", "DEFAULT")
    msg = str(e.value)
    assert "cannot download timm's test_efficientnet." in msg and "offline?" in msg and "pass weights=PATH" in msg
    assert "\n" not in msg
    assert not [r for r in caplog.records if "thrown while requesting" in r.getMessage()]  # only the one line
    assert logging.getLogger("huggingface_hub").level == level  # its level given back


def test_unknown_weights_name_lists_allowed():
    with pytest.raises(ValueError, match="allowed: DEFAULT, IMAGENET1K_V1"):
        bb.load_backbone("resnet18", "IMAGENET9K")


@pytest.mark.parametrize("name, shape", [("vgg16", (512, 7, 7)), ("resnet18", (512, 7, 7))])
def test_feature_maps_before_pooling(name, shape):
    loaded = bb.load_backbone(name, "none")
    assert list(loaded.transform.crop_size) == [224]
    with torch.inference_mode():
        assert tuple(loaded.features(torch.zeros(1, 3, 224, 224)).shape[1:]) == shape


def test_local_file_sidecar_and_strict_feature_part(tmp_path):
    model = bb.load_backbone("tiny", "none").model
    feats = {k: v for k, v in model.state_dict().items() if k.startswith("features.")}
    path = tmp_path / "w.pt"
    torch.save(feats, path)
    (tmp_path / "w.json").write_text(json.dumps({"mean": [0.1, 0.2, 0.3], "std": [1, 1, 1], "covers": "features"}))
    loaded = bb.load_backbone("tiny", str(path))
    assert loaded.mean == pytest.approx([0.1, 0.2, 0.3])
    assert loaded.covers == "features" and loaded.weights_id == "file:w.pt" and len(loaded.weights_sha256) == 64
    del feats["features.0.bias"]
    torch.save(feats, path)
    with pytest.raises(ValueError, match="lack 1 keys"):
        bb.load_backbone("tiny", str(path))


def test_weights_for_another_architecture_are_refused(tmp_path):
    path = tmp_path / "r.pt"
    torch.save(bb.load_backbone("tiny", "none").model.state_dict(), path)
    with pytest.raises(ValueError, match="not for vgg16"):
        bb.load_backbone("vgg16", str(path))
    (tmp_path / "r.json").write_text(json.dumps({"arch": "resnet18"}))
    with pytest.raises(ValueError, match="is for 'resnet18'"):
        bb.load_backbone("tiny", str(path))


def test_missing_file_and_pickled_junk(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        bb.load_backbone("tiny", str(tmp_path / "nope.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a loadable state dict"):
        bb.load_backbone("tiny", str(tmp_path / "junk.pt"))


def test_a_weights_file_with_pickled_objects_is_refused_in_one_line(tmp_path):
    import argparse

    import torch

    torch.save({"features.0.weight": argparse.Namespace(evil=True)}, tmp_path / "evil.pt")
    with pytest.raises(ValueError) as e:
        bb.load_backbone("tiny", str(tmp_path / "evil.pt"))
    assert "pickled Python objects, which are never loaded" in str(e.value)
    assert "\n" not in str(e.value) and "weights_only=False" not in str(e.value)


def test_offline_download_names_the_expected_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*a, **k):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(PipelineError) as e:
        bb.load_backbone("resnet18", "DEFAULT")
    msg = str(e.value)
    assert "resnet18-f37072fd.pth" in msg and str(tmp_path) in msg and "pass weights=PATH" in msg  # from Python
    with cli_terms(), pytest.raises(PipelineError, match="or pass --weights PATH to a local state-dict file$"):
        bb.load_backbone("resnet18", "DEFAULT")
    assert "\n" not in msg


def test_a_weights_download_says_so_on_stderr_not_stdout(monkeypatch, capsys):
    """torch.hub writes 'Downloading: ...' to stdout: the first `extract --json` on a machine printed it before
    the JSON object, which a script could then not parse."""
    import torch.hub

    def announce_then_fail(url, *a, **k):
        print(f'Downloading: "{url}" to somewhere')
        raise OSError("offline")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", announce_then_fail)
    with pytest.raises(PipelineError, match="cannot download"):
        bb.load_backbone("vgg16", "DEFAULT")
    out, err = capsys.readouterr()
    assert out == "" and "Downloading:" in err


def test_timm_offline_error_cuts_the_hubs_message_at_a_word_and_keeps_the_advice(monkeypatch):
    """Offline, the hub's message was cut at 160 characters mid-word ('... try aga'); now at a word, with
    ' ...', and the tool's own advice follows whole."""
    import timm.models._hub as hub
    from huggingface_hub.utils import LocalEntryNotFoundError

    said = ("An error happened while trying to locate the file on the Hub and we cannot find the requested files"
            " in the local cache. Please check your connection and try again or make sure your Internet connection"
            " is on.")

    def offline(*a, **k):  # what huggingface_hub raises offline with nothing in its cache
        raise LocalEntryNotFoundError(said)

    monkeypatch.setattr(bb, "_hub_unreachable", lambda: None)  # no probe of the network
    monkeypatch.setattr(hub, "hf_hub_download", offline)
    with pytest.raises(PipelineError) as e:
        bb.load_backbone("test_efficientnet", "DEFAULT")
    msg = str(e.value)
    reason = msg[msg.index("(LocalEntryNotFoundError: ") + 26:msg.index(" ...); offline?")]
    assert said.startswith(reason + " ") and len(reason) <= 160, msg
    assert "weights=PATH to a local state-dict file with its .json sidecar (docs/backbones.md)" in msg  # from Python
    with cli_terms(), pytest.raises(PipelineError) as e:
        bb.load_backbone("test_efficientnet", "DEFAULT")
    assert str(e.value).endswith(" or pass --weights PATH to a local state-dict file with its .json sidecar "
                                 "(docs/backbones.md)")


def _hub_download_recorder(monkeypatch, cached=None):
    """timm's download, recording whether huggingface_hub was in offline mode for each call; it returns
    ``cached`` (a weights file in the hub's cache) or fails as the hub does with nothing cached."""
    import timm.models._hub as hub
    from huggingface_hub import constants
    from huggingface_hub.utils import LocalEntryNotFoundError

    calls = []

    def download(*a, **k):
        calls.append(constants.HF_HUB_OFFLINE)
        if cached is not None and constants.HF_HUB_OFFLINE:
            return str(cached)
        raise LocalEntryNotFoundError("cannot find the requested files in the local cache")

    monkeypatch.setattr(hub, "hf_hub_download", download)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # HF_HUB_OFFLINE unset
    for name in list(os.environ):
        if name.lower().endswith("_proxy"):
            monkeypatch.delenv(name)
    return calls


def test_timm_load_with_the_hub_unreachable_looks_only_in_the_cache(monkeypatch, caplog, tmp_path):
    """Offline with the weights not cached, huggingface_hub retried each file five times (about 47 s) before the
    refusal. Now one short connect to the hub's host fails first and the load runs in the hub's offline mode:
    the refusal comes at once, weights in the cache load, and stderr says the hub was unreachable."""
    import socket

    from huggingface_hub import constants
    from safetensors.torch import save_file
    import timm

    probes = []

    def unreachable(address, timeout=None, *a, **k):
        probes.append((address, timeout))
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    calls = _hub_download_recorder(monkeypatch)
    with caplog.at_level(logging.INFO), pytest.raises(PipelineError) as e:
        bb.load_backbone("test_efficientnet", "DEFAULT")
    assert calls and all(calls), calls  # each download asked in offline mode: no retries
    assert probes == [(("huggingface.co", 443), bb.HUB_PROBE_TIMEOUT)]
    assert "cannot download timm's test_efficientnet." in str(e.value) and "offline?" in str(e.value)
    said = [r.getMessage() for r in caplog.records if r.name == bb.__name__]
    assert len(said) == 1 and "huggingface.co:443) is unreachable" in said[0] and "only in the hub's cache" in said[0]
    assert constants.HF_HUB_OFFLINE is False  # given back

    path = tmp_path / "model.safetensors"
    save_file(timm.create_model("test_efficientnet").state_dict(), str(path))
    calls = _hub_download_recorder(monkeypatch, cached=path)
    loaded = bb.load_backbone("test_efficientnet", "DEFAULT")  # weights in the cache still load
    assert loaded is not None and calls and all(calls)
    assert constants.HF_HUB_OFFLINE is False


def test_timm_load_behind_a_proxy_probes_nothing(monkeypatch):
    """Behind a proxy the hub's host may be reachable only through it: no probe, the hub is asked as before."""
    import socket

    probes = []
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: probes.append(a))
    calls = _hub_download_recorder(monkeypatch)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    with pytest.raises(PipelineError):
        bb.load_backbone("test_efficientnet", "DEFAULT")
    assert probes == [] and calls and not any(calls)


def test_extract_refuses_a_torchvision_prefix_on_a_model_only_timm_has(tmp_path):
    """'extract --backbone torchvision:tf_efficientnet_lite0' extracted timm's Lite0 (its cache name is the bare
    name, which means timm's), or answered with a Lite0 cache already there: the library forced was ignored. It
    is refused in one line, as get_spec refuses it elsewhere, whatever caches --cache-dir holds."""
    from pipeline.cache.feature_cache import cache_file_name
    from pipeline.extraction.extract import ExtractConfig, check_backbone

    cfg = ExtractConfig(data=str(tmp_path), backbone="torchvision:test_efficientnet", cache_dir=str(tmp_path / "f"))
    with pytest.raises(UsageError, match="^unknown backbone='torchvision:test_efficientnet': torchvision has no "):
        check_backbone(cfg)  # from Python, as extract_features says it
    with cli_terms(), pytest.raises(UsageError, match="^unknown --backbone 'torchvision:test_efficientnet': "):
        check_backbone(cfg)
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / cache_file_name("test_efficientnet", 0, "k" * 64)).touch()  # timm's, made before
    with pytest.raises(UsageError, match="torchvision has no model"):
        check_backbone(cfg)
    check_backbone(ExtractConfig(data=str(tmp_path), backbone="torchvision:resnet18", cache_dir=str(tmp_path / "f")))


def test_a_sidecar_naming_its_model_with_a_library_prefix_fits_that_model(tmp_path):
    """A sidecar whose "arch" is written as --backbone forces a library ('timm:tf_efficientnet_lite0') was refused
    for --backbone tf_efficientnet_lite0 ("is for 'timm:tf_efficientnet_lite0', not 'tf_efficientnet_lite0'"), the
    very model; the prefix now names the library, the rest the model, each checked as a "library" field is."""
    w = tmp_path / "w.pt"
    torch.save(bb.load_backbone("timm:test_efficientnet", "none").model.state_dict(), w)
    (tmp_path / "w.json").write_text(json.dumps({"arch": "timm:test_efficientnet"}))
    assert bb.load_backbone("test_efficientnet", str(w)).spec.name == "test_efficientnet"
    (tmp_path / "w.json").write_text(json.dumps({"arch": "timm:test_vit"}))
    with pytest.raises(UsageError, match="is for 'test_vit', not 'test_efficientnet'"):
        bb.load_backbone("test_efficientnet", str(w))
    (tmp_path / "w.json").write_text(json.dumps({"arch": "torchvision:test_efficientnet"}))
    with pytest.raises(UsageError, match="is for torchvision's test_efficientnet, not timm's"):
        bb.load_backbone("test_efficientnet", str(w))


def test_an_unknown_names_listing_hint_is_of_its_own_family():
    """'--backbone tf_efficientnet_lit0' was told to list timm.list_models('*convnext*'), whatever the name: the
    hint now lists the family the name was meant to be in."""
    with pytest.raises(UsageError) as e:
        bb.get_spec("tf_efficientnet_lit0")
    assert "timm.list_models('*efficientnet*')" in str(e.value) and "convnext" not in str(e.value)
    with pytest.raises(UsageError, match=r"timm.list_models\('\*convnext\*'\)"):  # no family timm knows: the example
        bb.get_spec("zzqx_9")


def test_a_sidecar_without_mean_and_std_is_named_as_there(tmp_path):
    """A sidecar holding other keys only was warned of as 'no sidecar w.json with mean/std': it is there."""
    import torchvision

    w = tmp_path / "w.pt"
    torch.save(torchvision.models.resnet18().state_dict(), w)
    with pytest.warns(UserWarning, match="^no sidecar w.json with mean/std"):
        bb.load_preprocessing("resnet18", str(w))
    (tmp_path / "w.json").write_text(json.dumps({"note": "mine"}))
    with pytest.warns(UserWarning, match="^sidecar w.json has no mean/std; using the model's defaults"):
        bb.load_preprocessing("resnet18", str(w))
