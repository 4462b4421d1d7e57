"""Blocked similarity search, exact pairs and union-find groups, on vectors whose answer is known by construction."""
import numpy as np

from pipeline.reports import duplicates as dup


def _rows(n=300, d=32, seed=0):
    return dup.l2_rows(np.random.default_rng(seed).normal(size=(n, d)))


def test_similar_pairs_match_the_full_matrix_whatever_the_block(monkeypatch):
    x = _rows()
    x[17] = dup.l2_rows(x[[3]] + 0.01)[0]  # a near copy of row 3
    x[250] = x[40]  # an exact one of row 40
    full = x @ x.T
    want = {(i, j) for i, j in zip(*np.nonzero(full >= 0.9)) if i < j}
    for block_bytes in (4 * 300 * 16, 1 << 30):  # 16-row blocks, and everything at once
        monkeypatch.setattr(dup, "BLOCK_BYTES", block_bytes)
        found = dup.similar_pairs(x, threshold=0.9, k=3)
        pi, pj, ps = found["pairs"]
        assert set(zip(pi.tolist(), pj.tolist())) == want
        assert {(3, 17), (40, 250)} <= want
        np.testing.assert_allclose(ps, full[pi, pj], rtol=1e-5)
        np.fill_diagonal(full, -np.inf)
        np.testing.assert_array_equal(found["knn"][:, 0], full.argmax(1))
        full = x @ x.T


def test_pairs_against_other_rows_are_cross_pairs_only():
    train, test = _rows(100, seed=1), _rows(20, seed=2)
    test[5] = train[60]
    found = dup.similar_pairs(test, train, threshold=0.99, k=1)
    pi, pj, _ = found["pairs"]
    assert list(zip(pi.tolist(), pj.tolist())) == [(5, 60)]
    assert found["knn"][5, 0] == 60


def test_exact_pairs_and_groups():
    digests = ["a", "b", "a", "", "c", "a", ""]
    assert dup.exact_pairs(digests) == [(0, 2), (0, 5)]  # '' (unknown) never matches
    assert dup.exact_pairs(["c", "x", ""], digests) == [(0, 4)]
    assert dup.groups(8, [(0, 2), (5, 2), (6, 7)]) == [[0, 2, 5], [6, 7]]


def test_an_isolated_row_is_an_outlier():
    x = dup.l2_rows(np.random.default_rng(0).normal(size=(200, 8)) * 0.1 + 1)  # one tight cloud
    x[50] = dup.l2_rows(-np.ones((1, 8)))[0]  # the opposite direction
    scores = dup.outlier_scores(dup.similar_pairs(x, threshold=2.0, k=10)["knn_sim"])
    flagged = np.flatnonzero(scores > dup.outlier_threshold(scores))
    assert 50 in flagged and scores.argmax() == 50 and len(flagged) < 10


def test_layout_similarity_sees_where_things_are_and_takes_mirror_images_as_copies():
    rng = np.random.default_rng(0)
    a = np.zeros((3, 8, 5, 5))
    a[:, :, :2, :3] = np.abs(rng.normal(size=(3, 8, 2, 3)))  # something in the upper left of each photo
    moved = np.roll(a, 3, axis=2)  # the same thing lower down: the max view cannot tell
    np.testing.assert_allclose(moved.max((2, 3)), a.max((2, 3)))
    mirrored = a[..., ::-1]
    sims = dup.layout_similarity(np.concatenate([a, a, a]), np.concatenate([a, mirrored, moved]))
    np.testing.assert_allclose(sims[:6], 1.0, rtol=1e-5)
    assert (sims[6:] < dup.SAME_LAYOUT).all()
    assert dup.has_layout((512, 7, 7)) and not dup.has_layout((512, 1, 1))


def test_a_folder_of_near_copies_keeps_each_photos_closest_candidates_and_one_group(monkeypatch):
    x = _rows(200, seed=3)
    rng = np.random.default_rng(4)
    x[:120] = dup.l2_rows(x[[0]] + 0.05 * rng.normal(size=(120, x.shape[1])))  # 120 near copies of one photo
    full = x @ x.T
    above = {(i, j) for i, j in zip(*np.nonzero(full >= 0.9)) if i < j}
    monkeypatch.setattr(dup, "BLOCK_BYTES", 4 * 200 * 16)  # 16-row blocks
    found = dup.similar_pairs(x, threshold=0.9, k=3, per_row=4)
    pi, pj, ps = found["pairs"]
    kept = set(zip(pi.tolist(), pj.tolist()))
    assert kept <= above and len(above) > 6000 and len(kept) <= 4 * 200
    assert found["left_out"] == len(above) - len(kept)
    assert max(np.bincount(pi, minlength=200)) <= 4
    for i in range(119):  # each copy's kept candidates are its most similar later rows
        later = np.sort(full[i, i + 1:][full[i, i + 1:] >= 0.9])[::-1][:4]
        np.testing.assert_allclose(np.sort(ps[pi == i])[::-1], later, rtol=1e-5)
    assert dup.groups(200, kept) == [list(range(120))]


def test_the_similarity_search_holds_about_block_bytes_whatever_it_finds(monkeypatch):
    """A block sized on its float32 similarities alone peaked at 6-7x BLOCK_BYTES (its negation and argpartition's
    int64 indices beside it): 740 MB on 25,000 photos of near copies."""
    import tracemalloc

    import pipeline.reports.duplicates as dup

    rng = np.random.default_rng(0)
    x = dup.l2_rows(np.abs(rng.normal(1, 0.05, (2000, 16))).astype(np.float32))  # every pair above the threshold
    whole = dup.similar_pairs(x, threshold=0.5, k=10)  # one block of 4096 rows
    monkeypatch.setattr(dup, "BLOCK_BYTES", 1 << 20)
    tracemalloc.start()
    try:
        blocked = dup.similar_pairs(x, threshold=0.5, k=10)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3.5 * (1 << 20)  # the block's 1 MB, and the answer: 32,000 pairs and 2,000 x 10 neighbours
    assert blocked["left_out"] == whole["left_out"] > 0 and len(blocked["pairs"][0]) == len(whole["pairs"][0])
    np.testing.assert_allclose(blocked["knn_sim"], whole["knn_sim"], atol=1e-6)  # a block's matmul: last bits
