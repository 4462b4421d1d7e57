import numpy as np
import pytest
import torch
from torch import nn

from pipeline.cache.feature_cache import CacheWriter, FeatureCache
from pipeline.heads.cache_views import CacheRows, CacheViews, fit_normalizer_stream
from pipeline.heads.calibration import log_softmax
from pipeline.heads.feature_views import Normalizer, apply_view
from pipeline.heads.linear_trainer import LinearTraining, train_linear
from pipeline.heads.model_selection import CVOptions, expand_grid, fit_setting, format_table, tune
from pipeline.heads.probe_heads import KernelSpec, ProbeHead, from_kernel, from_logreg
from pipeline.heads.sklearn_fits import fit_kernel, fit_logreg, resolve_gamma

SHAPE = (4, 3, 3)


pytestmark = pytest.mark.usefixtures("one_thread")


def maps(n=60, k=2, shape=SHAPE, seed=0, sep=1.5):
    """n raw maps of k classes, class-dependent channel means (VGG-like: non-negative, large scale)."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % k
    centres = rng.normal(0, sep, (k, shape[0]))
    x = rng.normal(0, 1, (n, *shape)) + centres[y][:, :, None, None]
    return (np.abs(x) * 40).astype(np.float32), y.astype(np.int64)


def make_cache(path, x, y):
    attrs = {"fingerprint": "fp", "backbone": "tiny", "weights": "none", "mean": np.zeros(3), "std": np.ones(3),
             "transform": "Resize([256], bilinear, antialias=True) CenterCrop([224]) ToTensor() "
                          "Normalize(mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0])",
             "classes": '["a", "b", "c"]', "seed": 0, "n_requested": 0, "data_root": "/x",
             "data_fingerprint": "d", "dtype": "float32", "created": "2026-01-01T00:00:00+0000", "versions": "{}"}
    with CacheWriter(path, attrs) as w:
        w.append(x, y, [f"{i}.jpg" for i in range(len(y))], len(y))
        w.finish()
    return path


def test_plain_head_equals_flatten_linear_logsoftmax():
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(SHAPE)), 3), nn.LogSoftmax(dim=1))
    head = ProbeHead.from_linear(seq[1].weight.detach(), seq[1].bias.detach(), SHAPE)
    assert head.config["view"] == "flat" and head.config["normalize"] == "none"
    assert head.linear.weight.dtype == torch.float32
    x = torch.from_numpy(maps(8)[0])
    torch.testing.assert_close(head(x), seq(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"takes features of shape \(4, 3, 3\), got \(4, 1, 1\)"):
        head(torch.zeros(2, 4, 1, 1))


def test_checkpoint_round_trips_through_weights_only_load(tmp_path):
    x, y = maps(40, 3)
    head, _ = fit_setting(x, y, {"head": "kernel", "view": "avgmax", "normalize": "standardize",
                                 "gamma": "0.5*scale", "n_components": 20})
    torch.save(head.checkpoint(), tmp_path / "h.pt")
    ck = torch.load(tmp_path / "h.pt", weights_only=True)
    assert ck["config"]["kernel_components"] == 20 and ck["config"]["view"] == "avgmax"
    # K_mm^{-1/2} is folded into the Linear layer: no m x m buffer
    assert set(ck["state_dict"]) == {"norm_mean", "norm_std", "landmarks", "linear.weight", "linear.bias"}
    assert ck["config"]["kernel_norm"] is False and ck["state_dict"]["linear.weight"].shape == (3, 20)
    again = ProbeHead.from_checkpoint(ck["config"], ck["state_dict"])
    xt = torch.from_numpy(x[:5])
    torch.testing.assert_close(again(xt), head(xt), rtol=0, atol=0)
    with pytest.raises(ValueError, match="not a probe-head config"):
        ProbeHead.from_checkpoint({"kind": "other"}, ck["state_dict"])
    # a checkpoint made before the fold (its config has no kernel_norm key) keeps its m x m buffer
    old = ProbeHead((4, 3, 3), 3, "avgmax", "standardize", KernelSpec(20, 0.5))
    config = {k: v for k, v in old.config.items() if k != "kernel_norm"}
    assert "kernel_norm" in ProbeHead.from_checkpoint(config, old.checkpoint()["state_dict"]).state_dict()


def test_pooled_shapes_refuse_spatial_views():
    with pytest.raises(ValueError, match="view 'max'.*allowed views: avg, flat"):
        ProbeHead((4, 1, 1), 2, view="max")
    x, y = maps(30, 2, shape=(4, 1, 1))
    assert {s["view"] for s in expand_grid({"view": ["flat", "avg", "max", "avgmax"]}, (4, 1, 1))} == {"flat", "avg"}
    with pytest.raises(ValueError, match="view 'avgmax'.*allowed views: avg, flat"):
        fit_setting(x, y, {"head": "logreg", "view": "avgmax"})
    grid = {"head": ["logreg", "kernel"], "view": ["avg", "avgmax"], "C": [1.0, 10.0]}
    r = tune(x, y, grid, CVOptions(folds=2))  # on a pooled cache the grid's spatial views are left out
    assert {row["setting"]["view"] for row in r["table"]} == {"avg"} and len(r["table"]) == 4
    with pytest.raises(ValueError, match="view 'max'.*allowed views: avg, flat"):
        tune(x, y, [{"head": "logreg", "view": "max"}], CVOptions(folds=2))


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("view,norm", [("flat", "none"), ("avg", "rms"), ("avgmax", "l2"), ("max", "standardize")])
def test_logreg_conversion_reproduces_predict_proba(k, view, norm):
    x, y = maps(45, k)
    nm = Normalizer(norm).fit(apply_view(x, view))
    z = nm.transform(apply_view(x, view))
    clf = fit_logreg(z, y, C=0.5)
    head = from_logreg(clf, SHAPE, view, nm)
    assert head.linear.weight.shape == (k, z.shape[1]) and head.linear.weight.dtype == torch.float64
    with torch.no_grad():
        p = head(torch.from_numpy(x)).exp().numpy()
    np.testing.assert_allclose(p, clf.predict_proba(z), rtol=0, atol=1e-5)
    assert 0.01 < p.max(1).min()  # not a degenerate all-certain comparison
    head32 = from_logreg(clf, SHAPE, view, nm, dtype=torch.float32)
    with torch.no_grad():
        np.testing.assert_allclose(head32(torch.from_numpy(x)).exp().numpy(), p, atol=1e-5)


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("view,norm,gamma",
                         [("avgmax", "l2", "scale"), ("flat", "rms", "2*scale"), ("avg", "none", None)])
def test_kernel_conversion_reproduces_predict_proba(k, view, norm, gamma):
    x, y = maps(45, k)
    nm = Normalizer(norm).fit(apply_view(x, view))
    z = nm.transform(apply_view(x, view))
    if gamma is None:  # a plain sklearn Nystroem (gamma=None: rbf_kernel's 1/d) converts too
        from sklearn.kernel_approximation import Nystroem

        ny = Nystroem(n_components=30, random_state=0).fit(z.astype(np.float64))
        clf = fit_logreg(ny.transform(z.astype(np.float64)), y, C=10)
    else:
        ny, clf = fit_kernel(z, y, gamma=gamma, n_components=30, C=10, seed=0)
    head = from_kernel(ny, clf, SHAPE, view, nm)
    assert head.config["kernel_components"] == 30
    with torch.no_grad():
        p = head(torch.from_numpy(x)).exp().numpy()
    np.testing.assert_allclose(p, clf.predict_proba(ny.transform(z.astype(np.float64))), rtol=0, atol=1e-5)


@pytest.mark.parametrize("k,scheme", [(2, "ovr"), (3, "ovr"), (3, "ovo"), (4, "ovo")])
def test_svm_conversion_gives_the_svms_scores_and_classes(k, scheme, tmp_path):
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.svm import SVC

    from pipeline.heads.probe_heads import class_pairs, from_svm
    from pipeline.heads.sklearn_fits import fit_svm

    x, y = maps(45, k)
    nm = Normalizer("l2")
    z = nm.transform(apply_view(x, "avg")).astype(np.float64)
    svm = fit_svm(z, y, C=10, gamma="scale", scheme=scheme)
    head = from_svm(svm, SHAPE, "avg", nm, pair_scale=4.0)
    assert head.config["kernel_components"] == len(svm.rows) <= len(z)  # the support rows, no K^-1/2
    with torch.no_grad():
        logp = head(torch.from_numpy(x)).numpy()
    sk = SVC(C=10, gamma="scale")
    if scheme == "ovo":  # SVC's own pairs' margins, coupled: p_i ~ 1 / (1 + sum_j exp(-s f_ij)) (Price et al.)
        f = sk.set_params(decision_function_shape="ovo").fit(z, y).decision_function(z)
        np.testing.assert_allclose(svm.scores(z), f, atol=1e-6)
        inv = np.ones((len(z), k))
        for p, (i, j) in enumerate(class_pairs(k)):
            inv[:, i] += np.exp(-4.0 * f[:, p])
            inv[:, j] += np.exp(4.0 * f[:, p])
        np.testing.assert_allclose(logp, log_softmax(-np.log(inv)), atol=1e-5)
        assert head.config["pairs"] and head.linear.out_features == k * (k - 1) // 2
    else:
        np.testing.assert_allclose(logp, log_softmax(svm.scores(z)), rtol=0, atol=1e-5)  # float32 maps in
    if k == 2:  # scores [0, f]: f is SVC's decision function
        np.testing.assert_allclose(svm.scores(z)[:, 1], sk.fit(z, y).decision_function(z), atol=1e-6)
    elif scheme == "ovr":  # one binary SVM per class: scikit-learn's one-vs-rest
        np.testing.assert_allclose(svm.scores(z), OneVsRestClassifier(sk).fit(z, y).decision_function(z), atol=1e-6)
    torch.save(head.checkpoint(), tmp_path / "h.pt")
    back = ProbeHead.from_checkpoint(**torch.load(tmp_path / "h.pt", weights_only=True))
    with torch.no_grad():
        np.testing.assert_allclose(back(torch.from_numpy(x)).numpy(), logp, atol=1e-12)


@pytest.mark.parametrize("k", [2, 4])
def test_the_stack_is_the_weighted_sum_of_both_svms_and_logreg_in_one_head(k, tmp_path):
    from pipeline.heads.probe_heads import from_stack
    from pipeline.heads.sklearn_fits import fit_logreg, fit_svm

    x, y = maps(45, k)
    nm = Normalizer("l2")
    z = nm.transform(apply_view(x, "avg")).astype(np.float64)
    ovr, ovo = fit_svm(z, y, C=10, scheme="ovr"), fit_svm(z, y, C=1, scheme="ovo")
    clf = fit_logreg(z, y, C=10)
    head = from_stack(ovr, 0.7, clf, 0.4, SHAPE, "avg", nm, pair_scale=3.0, pairs=ovo, pairs_weight=1.5)
    with torch.no_grad():
        logp = head(torch.from_numpy(x)).numpy()
        coupled = from_svm_log_proba(ovo, x, nm, 3.0)
    want = log_softmax(0.7 * ovr.scores(z) + 1.5 * coupled + 0.4 * np.log(clf.predict_proba(z)))
    np.testing.assert_allclose(logp, want, atol=1e-5)
    assert head.kernel_components <= len(ovr.rows) + len(ovo.rows)  # one copy of the rows both SVMs keep
    torch.save(head.checkpoint(), tmp_path / "h.pt")
    back = ProbeHead.from_checkpoint(**torch.load(tmp_path / "h.pt", weights_only=True))
    with torch.no_grad():
        np.testing.assert_allclose(back(torch.from_numpy(x)).numpy(), logp, atol=1e-12)


def from_svm_log_proba(svm, x, nm, scale):
    from pipeline.heads.probe_heads import from_svm

    return from_svm(svm, SHAPE, "avg", nm, pair_scale=scale)(torch.from_numpy(x)).numpy()


def test_gamma_rules():
    z = np.random.default_rng(0).normal(0, 2, (10, 5))
    assert resolve_gamma(0.3, z) == 0.3
    assert resolve_gamma("scale", z) == pytest.approx(1 / (5 * z.var()))
    assert resolve_gamma("0.5*scale", z) == pytest.approx(0.5 / (5 * z.var()))
    with pytest.raises(ValueError, match="'scale' or 'G\\*scale'"):
        resolve_gamma("auto", z)


def test_cache_views_stream_in_blocks(tmp_path):
    x, y = maps(23, 3)
    with FeatureCache(make_cache(tmp_path / "c.h5", x, y)) as c:
        idx = np.array([20, 3, 7, 0, 11, 15])
        views = CacheViews(c, idx, block_rows=4)
        np.testing.assert_array_equal(views["avgmax"], apply_view(x[np.sort(idx)], "avgmax"))
        np.testing.assert_array_equal(views.labels, y[np.sort(idx)])
        cv = CacheViews(c, idx, block_rows=5).load(["avg", "flat"])
        np.testing.assert_array_equal(cv["flat"], x[np.sort(idx)].reshape(6, -1))
        with pytest.raises(ValueError, match="over the 0.0 GB limit; hold fewer rows, a pooled view"):
            CacheViews(c, idx, max_bytes=100)["flat"]
        rows = CacheRows(c, np.arange(23), block_rows=4)
        nm = fit_normalizer_stream(rows, "flat", "rms", batch_size=5)
        assert nm.rms == pytest.approx(Normalizer("rms").fit(x.reshape(23, -1)).rms, rel=1e-9)
        head, history = train_linear(CacheRows(c, np.arange(18), 4), CacheRows(c, np.arange(18, 23), 4),
                                     n_classes=3, in_shape=SHAPE, view="flat", normalize="rms",
                                     training=LinearTraining(lr=0.01, epochs=3))
        assert len(history) == 3 and head.config["normalize"] == "rms"
        cv = CacheViews(c, np.arange(21))
        r = tune(cv, cv.labels, {"view": ["avg", "max"], "C": [1.0]}, CVOptions(folds=3, threads=1))
        assert [row["key"] for row in r["table"]] == ["logreg|avg|l2|C=1", "logreg|max|l2|C=1"]
        head, _ = fit_setting(cv, cv.labels, r["best"]["setting"])
        assert head(torch.from_numpy(x)).shape == (23, 3)


def test_early_stopping_restores_the_best_epoch_and_is_reproducible():
    rng = np.random.default_rng(0)
    xtr, ytr = rng.normal(0, 1, (40, 30)).astype(np.float32), rng.integers(0, 2, 40)  # noise: memorised, not learnt
    xva, yva = rng.normal(0, 1, (40, 30)).astype(np.float32), rng.integers(0, 2, 40)
    kw = dict(n_classes=2, in_shape=(30, 1, 1), view="flat", normalize="none",
              training=LinearTraining(lr=0.05, weight_decay=0.0, epochs=50, patience=3, batch_size=8, seed=3))
    state = torch.random.get_rng_state()
    head, history = train_linear((xtr, ytr), (xva, yva), **kw)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is left alone
    losses = [h["val_loss"] for h in history]
    best = 1 + int(np.argmin(losses))
    assert len(history) == best + 3 < 50 and losses[-1] > min(losses)  # stopped early, 3 epochs after the best
    with torch.no_grad():
        lp = head(torch.from_numpy(xva).reshape(40, 30, 1, 1))
    assert float(nn.NLLLoss()(lp, torch.from_numpy(yva))) == pytest.approx(min(losses), rel=1e-5)
    again, history2 = train_linear((xtr, ytr), (xva, yva), **kw)
    assert torch.equal(again.linear.weight, head.linear.weight) and history2 == [
        {**h, "seconds": h2["seconds"]} for h, h2 in zip(history, history2)]


def test_tune_is_deterministic_for_a_seed_and_fits_the_winner():
    x, y = maps(50, 2, seed=1, sep=0.6)
    grid = {"head": ["logreg", "kernel", "torch"], "view": ["avg", "avgmax"], "normalize": ["l2", "rms"],
            "C": [0.1, 10.0], "gamma": ["scale"], "n_components": [15], "lr": [0.01], "weight_decay": [1e-3],
            "max_epochs": [5]}
    r1, r2 = tune(x, y, grid, CVOptions(folds=3, seed=0)), tune(x, y, grid, CVOptions(folds=3, seed=0))
    drop = lambda r: [{k: v for k, v in row.items() if k != "seconds"} for row in r["table"]]  # noqa: E731
    assert len(r1["table"]) == 2 * 2 * (2 + 2 + 1)
    assert drop(r1) == drop(r2) and r1["best"]["key"] == r2["best"]["key"]
    assert drop(tune(x, y, grid, CVOptions(folds=3, seed=1))) != drop(r1)  # another seed, other folds
    best = r1["best"]
    assert best["log_loss_mean"] == min(r["log_loss_mean"] for r in r1["table"])
    assert r1["ranking"][0] == best["key"] and format_table(r1).splitlines()[2].startswith("* " + best["key"])
    head, info = fit_setting(x, y, best["setting"], seed=0)
    assert info["key"] == best["key"] and head(torch.from_numpy(x)).shape == (50, 2)
    with pytest.raises(ValueError, match="smallest class has 2"):
        tune(x[:5], y[:5], grid, CVOptions(folds=3))


def test_temperature_and_known_rows_round_trip_and_old_checkpoints_load_without_them(tmp_path):
    import torch

    from pipeline.heads.probe_heads import ProbeHead

    torch.manual_seed(0)
    old = ProbeHead((4, 2, 2), 3, "avg", "l2")
    path = tmp_path / "old.pt"
    config = {k: v for k, v in old.config.items() if k not in ("temperature", "known_rows", "unknown_k")}
    torch.save(old.checkpoint() | {"config": config}, path)  # as written before calibration existed
    saved = torch.load(path, weights_only=True)
    again = ProbeHead.from_checkpoint(saved["config"], saved["state_dict"])
    x = torch.rand(5, 4, 2, 2)
    assert not again.calibrated and not again.has_unknown and torch.equal(again(x), old(x))
    assert again.scores(x)[1] is None
    head = ProbeHead.from_checkpoint(saved["config"], saved["state_dict"])
    head.set_temperature(2.0)
    head.set_unknown(torch.nn.functional.normalize(torch.rand(7, 4), dim=1), 3, 0.25)
    assert torch.allclose(head(x), torch.log_softmax(old.linear(old.embed(x)) / 2.0, 1))
    torch.save(head.checkpoint(), path)
    back = torch.load(path, weights_only=True)
    assert back["state_dict"]["known_rows"].dtype == torch.float16 and back["config"]["known_rows"] == 7
    loaded = ProbeHead.from_checkpoint(back["config"], back["state_dict"])
    (lp, ood), (lp2, ood2) = head.scores(x), loaded.scores(x)
    assert torch.equal(lp, lp2) and torch.equal(ood, ood2) and float(loaded.unknown_threshold) == 0.25
    loaded.reset_trust()
    assert not loaded.calibrated and not loaded.has_unknown and torch.equal(loaded(x), old(x))


def test_log_proba_of_rows_takes_a_kernel_head_in_blocks(monkeypatch):
    """suggest scores a whole pool at once: rows x landmarks kernel arrays must stay bounded, same answer."""
    import pipeline.heads.probe_heads as ph
    from pipeline.heads.sklearn_fits import fit_svm

    x, y = maps(300, 3)
    nm = Normalizer("l2")
    z = nm.transform(apply_view(x, "avg")).astype(np.float64)
    head = ph.from_svm(fit_svm(z, y, C=10, scheme="ovr"), SHAPE, "avg", nm)
    whole = head.log_proba_of_rows(z)
    seen = []
    kernel_map = ph.ProbeHead.kernel_map
    monkeypatch.setattr(ph.ProbeHead, "kernel_map", lambda self, rows: seen.append(len(rows)) or kernel_map(self, rows))
    monkeypatch.setattr(ph, "KERNEL_BLOCK_BYTES", 1)  # the smallest block: 256 rows
    np.testing.assert_allclose(head.log_proba_of_rows(z), whole, rtol=0, atol=1e-12)
    assert seen == [256, 44]
    assert head.log_proba_of_rows(z[:0]).shape == (0, 3)
