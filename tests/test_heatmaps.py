"""Class-activation maps (pipeline/heads/heatmaps.py) light the part of the input that decides the class:
crafted cached maps through every fit-head head kind, and generated photos through whole models."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.cache.feature_cache import CacheWriter
from pipeline.errors import UsageError
from pipeline.heads.fit_head import FitHeadConfig, fit_head
from pipeline.heads.heatmaps import check_spatial, grad_cam, head_maps, log_odds, normalised
from pipeline.models.whole_models import head_from_checkpoint, read_checkpoint

SHAPE = (9, 6, 6)  # C, H, W
CLASSES = ("a", "b", "c")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny problems: thread pools only add contention on a shared machine."""
    from threadpoolctl import threadpool_limits

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(n)


def region_maps(n: int, seed: int = 0):
    """(maps, labels, corners): non-negative noise everywhere (as a ReLU backbone gives) and, in one 2 x 2 block
    at a random place per map, the evidence of its class (its three channels raised): only that block decides."""
    rng = np.random.default_rng(seed)
    c, h, w = SHAPE
    x = np.abs(rng.normal(0, 1, (n, c, h, w))).astype(np.float32)
    y = np.arange(n) % len(CLASSES)
    corners = rng.integers(0, h - 1, (n, 2))
    for i, (r, s) in enumerate(corners):
        x[i, 3 * y[i]:3 * y[i] + 3, r:r + 2, s:s + 2] += 4.0
    return x, y.astype(np.int64), corners


def write_cache(path, x, y):
    attrs = {"fingerprint": "fp", "backbone": "tiny", "weights": "none", "mean": np.zeros(3), "std": np.ones(3),
             "transform": "Resize([36], bilinear, antialias=True) CenterCrop([32]) ToTensor() "
                          "Normalize(mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0])",
             "classes": '["a", "b", "c"]', "seed": 0, "n_requested": 0, "data_root": str(path.parent / "photos"),
             "data_fingerprint": "d", "dtype": "float32", "created": "2026-01-01T00:00:00+0000", "versions": "{}"}
    with CacheWriter(path, attrs) as w:
        w.append(x, y, [f"{CLASSES[k]}/{i}.jpg" for i, k in enumerate(y)], len(y))
        w.finish()
    return path


def lit_share(maps: np.ndarray, corners: np.ndarray) -> float:
    """The share of maps whose hottest cell lies in their deciding 2 x 2 block."""
    hits = 0
    for m, (r, s) in zip(maps, corners):
        i, j = np.unravel_index(int(np.argmax(m)), m.shape)
        hits += r <= i < r + 2 and s <= j < s + 2
    return hits / len(maps)


@pytest.fixture(scope="module")
def region_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("region")
    x, y, _ = region_maps(90)
    return write_cache(root / "cache.h5", x, y), root


@pytest.mark.parametrize("kind,options", [
    ("auto", {}), ("linear", {"epochs": 30}), ("logreg", {}), ("kernel", {"kernel_components": 40}),
    ("svm", {}), ("logreg", {"features": "flat", "normalize": "rms"}), ("svm", {"features": "avgmax"}),
])
def test_every_head_kind_lights_the_region_that_decides_the_class(region_cache, kind, options):
    cache, root = region_cache
    fitted = fit_head(FitHeadConfig(cache=str(cache), head=kind, runs_dir=str(root / "runs" / kind),
                                    calibrate="none", unknown_rows=0, **options))
    ckpt = read_checkpoint(fitted["checkpoint"])
    head = head_from_checkpoint(ckpt, ckpt["state_dict"], fitted["checkpoint"]).eval()
    x, y, corners = region_maps(30, seed=1)  # photos it never saw
    logp, maps = head_maps(head, x)
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(logp), head(torch.from_numpy(x)).double())  # the same pass
    assert (logp.argmax(1) == y).mean() >= 0.9
    assert lit_share(maps, corners) >= 0.9, kind


def test_cam_of_a_linear_head_on_the_average_is_its_weights_over_the_map():
    """Grad-CAM of a head linear on the average (no l2 step) is CAM: the class's weights dotted with each cell."""
    from pipeline.heads.probe_heads import ProbeHead

    torch.manual_seed(0)
    w, b = torch.randn(2, 4, dtype=torch.float64), torch.randn(2, dtype=torch.float64)
    head = ProbeHead.from_linear(w, b, (4, 3, 3), view="avg")
    x = torch.rand(5, 4, 3, 3, dtype=torch.float64)
    logp, maps = grad_cam(head, x)
    cls = logp.argmax(1)
    sign = torch.where(cls == 1, 1.0, -1.0).double()  # binary: the log-odds is the logit difference
    cam = torch.einsum("bc,bchw->bhw", sign[:, None] * (w[1] - w[0])[None], x) / 9
    torch.testing.assert_close(maps, cam)


def test_log_odds_stays_finite_and_exact_at_certainty():
    logp = torch.log_softmax(torch.tensor([[0.0, 60.0, -5.0]], dtype=torch.float32), 1)
    odds = log_odds(logp, torch.tensor([1]))
    assert torch.isfinite(odds).all() and abs(float(odds) - (60 - np.logaddexp(0, -5))) < 1e-3


def test_grad_cam_works_under_inference_mode():
    from pipeline.heads.probe_heads import ProbeHead

    head = ProbeHead.from_linear(torch.randn(3, 4), torch.zeros(3), (4, 2, 2), view="avg")
    with torch.inference_mode():
        logp, maps = grad_cam(head, torch.rand(2, 4, 2, 2))
    assert maps.shape == (2, 2, 2) and logp.shape == (2, 3)


def test_a_pooled_cache_has_no_map_to_explain():
    with pytest.raises(UsageError, match=r"pooled features \(512, 1, 1\).*without --pool avg"):
        check_spatial((512, 1, 1))
    check_spatial((512, 7, 7))


def test_normalised_maps_peak_at_one_and_drop_counter_evidence():
    m = normalised(np.array([[[-2.0, 1.0], [0.5, 2.0]], [[-1.0, -3.0], [-0.5, -2.0]]]))
    assert m[0].max() == 1 and m[0, 0, 0] == 0 and m[0, 1, 0] == 0.25 and not m[1].any()
