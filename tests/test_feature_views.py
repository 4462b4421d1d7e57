import numpy as np
import pytest
import torch

from pipeline.heads.feature_views import (
    Normalizer,
    allowed_views,
    apply_view,
    apply_view_torch,
    check_view,
    view_dim,
)
from pipeline.heads.probe_heads import ProbeHead

# (4, 3, 2, 2): row r, channel c holds r*100 + c*10 + [0, 1, 2, 3] over the 2x2 positions
X = (np.arange(4)[:, None, None, None] * 100 + np.arange(3)[None, :, None, None] * 10
     + np.arange(4).reshape(1, 1, 2, 2)).astype(np.float32)


def test_views_of_a_known_array():
    assert apply_view(X, "flat").shape == (4, 12)
    assert apply_view(X, "flat")[1].tolist() == X[1].ravel().tolist()
    avg = apply_view(X, "avg")
    assert avg.shape == (4, 3) and avg[2].tolist() == [201.5, 211.5, 221.5]
    mx = apply_view(X, "max")
    assert mx[3].tolist() == [303, 313, 323]
    am = apply_view(X, "avgmax")
    assert am.shape == (4, 6) and am[0].tolist() == [1.5, 11.5, 21.5, 3, 13, 23]
    assert [view_dim(v, (3, 2, 2)) for v in ("flat", "avg", "max", "avgmax")] == [12, 3, 3, 6]
    assert apply_view(X.astype(np.float16), "avg").dtype == np.float32


@pytest.mark.parametrize("view", ["flat", "avg", "max", "avgmax"])
def test_torch_views_agree_with_numpy(view):
    np.testing.assert_allclose(apply_view_torch(torch.from_numpy(X), view).numpy(), apply_view(X, view), rtol=1e-6)


def test_pooled_cache_allows_only_avg_and_flat():
    pooled = np.ones((2, 5, 1, 1), np.float32)
    assert allowed_views((5, 1, 1)) == ("avg", "flat")
    np.testing.assert_array_equal(apply_view(pooled, "avg"), apply_view(pooled, "flat"))
    for v in ("max", "avgmax"):
        with pytest.raises(ValueError, match=rf"view '{v}'.*pooling.*allowed views: avg, flat"):
            apply_view(pooled, v)
        with pytest.raises(ValueError, match="allowed views: avg, flat"):
            apply_view_torch(torch.from_numpy(pooled), v)
    with pytest.raises(ValueError, match="unknown view 'mean'; allowed views: flat, avg, max, avgmax"):
        check_view("mean", (3, 2, 2))


@pytest.mark.parametrize("kind", ["none", "rms", "l2", "standardize"])
def test_normalisation_numpy_torch_agree_and_statistics_come_from_training_rows(kind):
    rng = np.random.default_rng(0)
    tr = (rng.normal(50, 30, (20, 6)) * [1, 1, 1, 1, 1, 0]).astype(np.float32)  # last feature constant 0
    te = rng.normal(50, 30, (5, 6)).astype(np.float32)
    te[0] = 0  # a zero row: l2 leaves it alone
    nm = Normalizer(kind).fit(tr)
    out = nm.transform(te)
    assert out.dtype == np.float32
    head = ProbeHead((6, 1, 1), 2, "avg", kind)  # the torch side: what a checkpoint computes
    head.set_normalizer(nm)
    np.testing.assert_allclose(head.norm(torch.from_numpy(te)).detach().numpy(), out, rtol=1e-5, atol=1e-6)
    if kind == "rms":
        assert nm.rms == pytest.approx(float(np.sqrt(np.mean(tr.astype(np.float64) ** 2))))
        np.testing.assert_allclose(out, te / nm.rms, rtol=1e-6)
    if kind == "l2":
        np.testing.assert_allclose(np.linalg.norm(out[1:], axis=1), 1, rtol=1e-6)
        assert not out[0].any()
    if kind == "standardize":
        from sklearn.preprocessing import StandardScaler

        np.testing.assert_allclose(out, StandardScaler().fit(tr).transform(te), rtol=1e-5, atol=1e-5)


def test_streamed_fit_equals_one_shot_fit():
    rng = np.random.default_rng(1)
    x = rng.normal(300, 20, (50, 4))
    one = Normalizer("standardize").fit(x)
    streamed = Normalizer("standardize").fit_batches([x[:7], x[7:30], x[30:]])
    np.testing.assert_allclose(streamed.mean, one.mean, rtol=1e-12)
    np.testing.assert_allclose(streamed.std, one.std, rtol=1e-9)
    np.testing.assert_allclose(one.std, x.std(0), rtol=1e-9)
    assert Normalizer("rms").fit_batches([x[:10], x[10:]]).rms == pytest.approx(Normalizer("rms").fit(x).rms)
    with pytest.raises(ValueError, match="not fitted"):
        Normalizer("rms").transform(x)
    with pytest.raises(ValueError, match="unknown normalisation 'zscore'"):
        Normalizer("zscore")
