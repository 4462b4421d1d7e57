"""Out-of-fold refits and cleanlab's ranking: flipped labels of well-separated classes come first."""
import numpy as np

from pipeline.reports.label_issues import label_issues, out_of_fold, recall_at


def clusters(n_per=60, k=3, d=16, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (k, d)) * 3
    x = np.concatenate([np.abs(c + rng.normal(0, 0.7, (n_per, d))) for c in centres]).astype(np.float32)
    return x, np.repeat(np.arange(k), n_per)


def test_flipped_labels_rank_first():
    x, y = clusters()
    flipped = np.array([5, 70, 130, 150])
    noisy = y.copy()
    noisy[flipped] = (y[flipped] + 1) % 3
    r = label_issues(x, noisy, ["a", "b", "c"], folds=5)
    assert recall_at(r["ranking"], flipped, len(flipped)) == 1.0
    assert set(flipped) <= set(r["flagged"].tolist())
    assert (r["proba"][flipped].argmax(1) == y[flipped]).all()  # the suggested class is the true one
    np.testing.assert_allclose(r["proba"].sum(1), 1.0)


def test_out_of_fold_rows_never_come_from_a_fit_that_saw_them():
    from sklearn.model_selection import StratifiedKFold

    from pipeline.heads.feature_views import Normalizer
    from pipeline.heads.sklearn_fits import fit_logreg

    x, y = clusters(n_per=20)
    setting = {"head": "logreg", "view": "avg", "normalize": "l2", "C": 10.0}
    p = out_of_fold(x, y, 3, setting, folds=4, seed=3)
    for tr, te in StratifiedKFold(4, shuffle=True, random_state=3).split(x, y):  # each fold: a fit without it
        nm = Normalizer("l2")
        want = fit_logreg(nm.transform(x[tr]), y[tr], 10.0, 3).predict_proba(nm.transform(x[te]))
        np.testing.assert_allclose(p[te], want, rtol=1e-6)
        assert not np.allclose(p[te], fit_logreg(nm.transform(x), y, 10.0, 3).predict_proba(nm.transform(x[te])))


def test_byte_copies_are_held_out_together_so_twins_do_not_vouch_for_each_other(tmp_path):
    """A photo saved twice more into a wrong class: with the copies in other folds, each held-out copy was
    predicted by its twins' labels, so the correctly labelled original was flagged (relabel to the wrong class)
    and the copies were not. Copies now share a fold: the copies are flagged, the original is not."""
    import shutil

    import pipeline
    from tests.test_audit import TINY, photos

    data = photos(tmp_path / "data", per_class=12)
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        shutil.copy(data / "blue" / "blue.1.jpg", data / "red" / name)
    r = pipeline.audit_folder(data, folds=3, threshold=0.999, cache_dir=str(tmp_path / "features"),
                              runs_dir=str(tmp_path / "runs"), **TINY)
    flagged = {i["path"]: i["suggested"] for i in r.label_issues}
    assert "blue/blue.1.jpg" not in flagged, flagged
    assert {flagged.get(f"red/{n}") for n in ("a.jpg", "b.jpg", "c.jpg")} == {"blue"}, flagged


def test_fold_splits_put_every_copy_in_one_fold():
    from pipeline.reports.label_issues import fold_splits

    y = np.repeat([0, 1], 10)
    copies = [f"d{i}" for i in range(20)]
    copies[3] = copies[12] = copies[15] = "same"
    for _, te in fold_splits(y, 3, 0, copies):
        assert len({3, 12, 15} & set(te.tolist())) in (0, 3)
    plain = [te.tolist() for _, te in fold_splits(y, 3, 0)]
    assert [te.tolist() for _, te in fold_splits(y, 3, 0, [f"d{i}" for i in range(20)])] == plain  # no copy: as before
    assert [te.tolist() for _, te in fold_splits(y, 3, 0, ["a"] * 10 + ["b"] * 10)] == plain  # 2 photos, 3 folds


def test_one_copy_moves_only_itself_not_every_fold():
    """Holding copies together by StratifiedGroupKFold reshuffled every fold as soon as one copy existed (the whole
    label-issue list changed) and took 10 s on 25,000 rows; only the copy moves now, into its first copy's fold."""
    from pipeline.reports.label_issues import fold_splits

    y = np.repeat(np.arange(4), 50)
    plain = np.empty(len(y), int)
    for k, (_, te) in enumerate(fold_splits(y, 5, 0)):
        plain[te] = k
    copies = [f"d{i}" for i in range(len(y))]
    copies[7] = copies[199] = "same"
    moved = np.empty(len(y), int)
    for k, (_, te) in enumerate(fold_splits(y, 5, 0, copies)):
        moved[te] = k
    assert moved[199] == moved[7] == plain[7]
    assert np.flatnonzero(moved != plain).tolist() in ([], [199])


def test_a_class_of_copies_of_one_photo_keeps_a_refit_for_every_fold():
    """A class whose photos were all copies of one photo went into one fold whole: that fold's refit saw one class
    only, and audit ended in 'unexpected ValueError: This solver needs samples of at least 2 classes'. Such
    copies are now split as before the copies were held out together."""
    from pipeline.reports.label_issues import fold_splits, out_of_fold

    y = np.repeat([0, 1], [6, 3])
    x = np.random.default_rng(0).normal(size=(9, 8))
    copies = [f"d{i}" for i in range(6)] + ["same"] * 3
    assert all(set(y[tr]) == {0, 1} for tr, _ in fold_splits(y, 3, 0, copies))
    p = out_of_fold(x, y, 2, {"head": "logreg", "view": "avg", "normalize": "l2", "C": 1.0}, 3, 0, copies=copies)
    np.testing.assert_allclose(p.sum(1), 1.0)


def test_choosing_the_heads_setting_shows_its_progress(monkeypatch, capsys):
    """audit on 23,976 rows was silent for its first minute: the kernel head's C and gamma by 5-fold CV on 2,000
    rows, before the refits' progress; the search now has its own progress lines (interval shortened)."""
    import pipeline.progress as pg

    monkeypatch.setattr(pg, "LOG_INTERVAL", 0.0)
    x, y = clusters(n_per=20)
    label_issues(x, y, ["a", "b", "c"], folds=3)
    assert "audit: C and gamma by CV on 60 rows: 1/" in capsys.readouterr().err
