"""The suggest stage: which photos of an unlabelled pool to label next, ranked from the caches.

Both folders are extracted as extract does (the pool as one unlabelled class, purpose 'pool': never
a default training cache); rows are found by content (``row_donors``), so a suggested photo moved into
its class folder costs the next extract no forward pass. The default head is fitted on the labelled
rows; among the pool photos it is least sure of (1 - the margin between its two most probable classes),
those farthest (cosine, average-pooled l2 rows) from every photo labelled or picked already are picked
one at a time (``rank_pool``): uncertain photos unlike anything labelled, and never several near copies
of one photo while others are left. Each suggested photo is scored as fit-head's heads score a photo of none
of their classes (``unknown_scores``: ``unknown``, ``ood_score``), and one line on stderr says how many look so;
they are not moved down the list (measured: docs/suggest.md). The list goes to suggestions.csv and
suggestions.html (thumbnails inlined), in a run folder or --output, never among the photos.
"""
from __future__ import annotations

import html
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..cache.feature_cache import FeatureCache
from ..config import ExtractConfig, FitHeadConfig, SuggestConfig, check_config, Placeholder, option_text, option_value
from ..data.folders import POOL
from ..errors import UsageError
from ..files import SafeCsvWriter, atomic_write, check_output, check_replaceable, header_names, starts_with
from ..heads.cache_views import CacheViews
from ..heads.unknown_score import fit_unknown, kept_indices, neighbours, pooled_rows_np, scores_np
from ..progress import still_running

log = logging.getLogger(__name__)

#: Similarities held at once while the distances to the labelled rows are computed (rows x labelled rows).
BLOCK_ROWS = 4096


@dataclass
class SuggestResult:
    """What suggest found: the ranked photos (``rows``: path, rank, predicted class, its probability,
    uncertainty, distance to the nearest labelled photo, ``unknown``: whether it looks like none of the labelled
    classes, its ``ood_score``) and where the list and the page went."""

    rows: list
    csv: Path
    html: Path
    head: str  # the head whose uncertainty ranked the pool (its setting's name)
    rule: str
    labelled: int  # labelled photos (rows of the labelled cache)
    pool: int  # photos in the pool
    skipped: int  # pool photos left out because the labelled folder holds the same bytes
    caches: dict = field(default_factory=dict)  # {"labelled": path, "pool": path}
    seconds: dict = field(default_factory=dict)
    unknown_threshold: float = 1.0  # above it (the ood_score) a photo looks like none of the labelled classes
    unknown: int = 0  # suggested photos flagged unknown
    known_share: float = 0.95  # the threshold keeps this share of held-out labelled photos (--known-share)


def validate(cfg: SuggestConfig) -> None:
    check_config(cfg)
    for name in ("data", "pool"):
        v = getattr(cfg, name)
        if not v:
            raise UsageError(f"suggest needs {option_text(name, Placeholder('DIR'))}")
        if not Path(v).is_dir():
            raise UsageError(f"{option_value(name, v)} is not a folder")
    data, pool = Path(cfg.data).resolve(), Path(cfg.pool).resolve()
    if data.is_relative_to(pool) or pool.is_relative_to(data):
        raise UsageError(f"{option_value('pool', cfg.pool)} and {option_value('data', cfg.data)} overlap: the "
                         "pool's photos would be a class "
                         "of the labelled folder (or the other way round); keep them in separate folders")
    photos = [(cfg.data, "--data"), (cfg.pool, "--pool")]
    folder, option = (cfg.output, "--output") if cfg.output else (cfg.runs_dir, "--runs-dir")
    check_output(folder, data=photos, what=option, folder=True)
    if cfg.output:  # the list and page of an earlier suggest are replaced; a file of the user's so named is not
        check_replaceable(Path(cfg.output) / "suggestions.csv", lambda p: header_names(p, "rank", "path"),
                          "a list suggest wrote")
        check_replaceable(Path(cfg.output) / "suggestions.html", lambda p: starts_with(p, PAGE_HEAD.encode()),
                          "a page suggest wrote")
    # both folders, before either is extracted: extract checks only its own, so a cache inside the pool
    # would be written by the labelled folder's extraction before the pool's refused it
    check_output(cfg.cache_dir, data=photos, what="--cache-dir", folder=True,
                 written=False)  # its caches may be hits, read where nothing can be written


# -- the ranking (arrays only: the benchmark calls it too) --------------------------------------------
def uncertainty(proba: np.ndarray) -> np.ndarray:
    """1 - (the most probable class's probability - the second's): 0 for a sure photo, 1 for a tie."""
    if proba.shape[1] < 2:
        return np.ones(len(proba))
    top2 = -np.partition(-proba, 1, axis=1)[:, :2]
    return 1.0 - (top2[:, 0] - top2[:, 1])


def least_certain_first(proba: np.ndarray) -> np.ndarray:
    """Row indices, the least certain first: by ``uncertainty``, then by the second most probable class's
    probability. A stacked default head gives most photos 1.0 - 1e-20: their 1 - margin is exactly 0 in float64,
    and that tie went to the pool's file order (the alphabetically first photos filled the 2k candidates); the
    second class's probability still tells them apart."""
    second = -np.partition(-proba, 1, axis=1)[:, 1] if proba.shape[1] > 1 else np.zeros(len(proba))
    return np.lexsort((-second, -uncertainty(proba)))


def nearest_distance(x: np.ndarray, other: np.ndarray) -> np.ndarray:
    """Each l2-normalised row's cosine distance (1 - similarity, at least 0) to its nearest row of ``other``."""
    if not len(other):
        return np.ones(len(x))
    out = np.empty(len(x))
    for lo in range(0, len(x), BLOCK_ROWS):
        out[lo:lo + BLOCK_ROWS] = 1.0 - (x[lo:lo + BLOCK_ROWS] @ other.T).max(1)
    return np.clip(out, 0.0, None)


def unknown_scores(pool: np.ndarray, labelled: np.ndarray, seed: int = 0,
                   known_share: float | None = None) -> tuple[np.ndarray, float]:
    """The unknown score of each pool row (average view) against the labelled rows, and its threshold: fit-head's
    (``unknown_score.fit_unknown`` with the trust options' defaults: 1 - cosine similarity to the 10th-nearest of
    at most 5,000 kept labelled rows; the threshold keeps ``known_share`` (--known-share, default 95 %) of held-out
    labelled photos, here each kept row scored against the others and up to 5,000 labelled rows not kept). Above it a
    photo looks like none of the classes; so does, by design, about 1 in 20 photos of the labelled classes at 95 %."""
    from ..config import TrustOptions

    opts = TrustOptions()
    keep = kept_indices(np.arange(len(labelled)), opts.unknown_rows, seed)
    rest = kept_indices(np.setdiff1d(np.arange(len(labelled)), keep), opts.unknown_rows, seed + 1)  # held out
    k = neighbours(opts.unknown_k, len(keep))
    fit = fit_unknown(labelled[keep], labelled[rest], k, known_share or opts.known_share)
    return scores_np(pool, fit.known, k), fit.threshold


#: The default rule looks for spread among this many times k of the least certain photos (measured: 2 beat 3
#: and the uncertainty-weighted k-center over the whole pool on scenes6, tied on caltech20; docs/suggest.md).
CANDIDATES = 2


def rank_pool(pool: np.ndarray, labelled: np.ndarray, proba: np.ndarray, k: int, rule: str = "diverse-uncertain",
              seed: int = 0) -> np.ndarray:
    """The ``k`` pool rows to label first, in order. ``pool``, ``labelled``: l2-normalised pooled rows;
    ``proba``: the current head's probabilities of the pool rows.

    'diverse-uncertain': the ``CANDIDATES`` x k least certain rows, then among them one at a time the row
    farthest from every row labelled or picked already (k-center): photos the head is unsure of, and not
    several near copies of one kind while others are left. 'margin': the least certain rows; 'diverse': the
    k-center over the whole pool; 'random': a seeded random order.
    """
    k = min(k, len(pool))
    if rule == "random":
        return np.random.default_rng(seed).permutation(len(pool))[:k]
    by_margin = least_certain_first(proba)
    if rule == "margin":
        return by_margin[:k]
    candidates = by_margin[:CANDIDATES * k] if rule == "diverse-uncertain" else by_margin
    return candidates[k_center(pool[candidates], labelled, k)]


def k_center(x: np.ndarray, labelled: np.ndarray, k: int) -> np.ndarray:
    """Greedy k-center: ``k`` rows of ``x``, each the farthest (cosine) from ``labelled`` and the rows picked
    before it; ties (rows at distance 0, copies of labelled photos) go to the earlier row."""
    dist = nearest_distance(x, labelled)
    chosen = np.empty(k, np.int64)
    for step in range(k):
        i = int(np.argmax(dist))
        chosen[step] = i
        dist = np.minimum(dist, np.clip(1.0 - x @ x[i], 0.0, None))
        dist[chosen[:step + 1]] = -1.0
    return chosen


# -- the stage ----------------------------------------------------------------------------------------
def extract_both(cfg: SuggestConfig) -> tuple[Path, Path]:
    """The caches of the labelled folder and of the pool (extract's: hits when they exist, rows by content).

    Where int8 (``--precision auto`` on a large folder), both are made with one network: the labelled folder's
    earlier cache's (``calib_cache``), the pool's that of the labelled cache (else its own earlier one). Each
    calibrated on its folder as it is, a labelled photo moved out of the pool would change both networks, and
    every row of both folders would be computed again (labelling costs no forward pass only with one network)."""
    from ..extraction.extract import extract
    from ..extraction.quantize import newest_int8_cache

    common = dict(n=0, backbone=cfg.backbone, weights=cfg.weights, batch_size=cfg.batch_size, device=cfg.device,
                  workers=cfg.workers, cache_dir=cfg.cache_dir, command=cfg.command)
    labelled = extract(ExtractConfig(data=cfg.data, **common,
                                     calib_cache=newest_int8_cache(cfg.cache_dir, cfg.data, cfg.backbone, cfg.weights)))
    lender = (labelled.cache if labelled.precision == "int8" else
              newest_int8_cache(cfg.cache_dir, cfg.pool, cfg.backbone, cfg.weights, POOL))
    pool = extract(ExtractConfig(data=cfg.pool, purpose=POOL, calib_cache=lender, **common)).cache
    return Path(labelled.cache), Path(pool)


def fit_head(cfg: SuggestConfig, avg: np.ndarray, labels: np.ndarray, n_classes: int):
    """The head whose uncertainty counts: fit-head's default (``--head auto``) or a logistic regression."""
    from ..heads.fit_head import default_head_on_rows
    from ..heads.model_selection import fit_setting

    shape = (avg.shape[1], 1, 1)
    if cfg.head == "logreg":
        head, info = fit_setting({"avg": avg}, labels, {"head": "logreg"}, in_shape=shape, n_classes=n_classes,
                                 seed=cfg.seed)
        return head.eval(), info["key"]
    return default_head_on_rows({"avg": avg}, labels, n_classes, shape, FitHeadConfig(seed=cfg.seed))


def classes_with_rows(classes: list, labels: np.ndarray, data: str) -> tuple[list, np.ndarray]:
    """The classes that have a labelled row, and the labels renumbered among them. A class folder whose every
    file was unreadable has none: no head can be fitted with it (suggest stopped on 'unexpected ValueError ...
    a bug?'); it is left out, said once, and no pool photo is guessed as it."""
    present = np.unique(labels)
    if len(present) == len(classes):
        return classes, labels
    empty = [c for i, c in enumerate(classes) if i not in set(present.tolist())]
    log.warning("%s: no readable photo of %s; left out of the head (no pool photo is guessed as %s)", data,
                ", ".join(empty), "it" if len(empty) == 1 else "them")
    return [classes[i] for i in present], np.searchsorted(present, labels)


def suggest(cfg: SuggestConfig) -> SuggestResult:
    """Rank the pool's photos for labelling and write the list (CSV) and its page (HTML)."""
    from .audit import output_dir

    validate(cfg)
    t0 = time.time()
    lab_path, pool_path = extract_both(cfg)
    with FeatureCache(lab_path) as lc, FeatureCache(pool_path) as pc:
        classes, labels = classes_with_rows(list(lc.classes), np.asarray(lc.labels, np.int64), cfg.data)
        if len(set(labels.tolist())) < 2:
            raise UsageError(f"{cfg.data}: at least two classes with photos are needed to rank a pool")
        avg = CacheViews(lc, np.arange(lc.n)).load(["avg"])["avg"]
        pool_avg = CacheViews(pc, np.arange(pc.n)).load(["avg"])["avg"]
        paths, root = pc.paths, str(Path(cfg.pool).resolve())  # not the cache's: a copy of a pool hits its cache
        known = set(d for d in lc.row_digests() if d)
        fresh = np.array([not d or d not in known for d in pc.row_digests()], bool)
    seconds = {"extract": time.time() - t0}
    t = time.time()
    head, key = fit_head(cfg, avg, labels, len(classes))
    with still_running(f"suggest: scoring the {len(pool_avg)} pool photos"):  # 20,000 against 6,000 support rows: 8 s
        proba = np.exp(head.log_proba_of_rows(pool_avg))
    seconds["head"] = time.time() - t
    t = time.time()
    keep = np.flatnonzero(fresh)  # a photo the labelled folder holds already teaches nothing
    labelled = pooled_rows_np(avg)
    order = keep[rank_pool(pooled_rows_np(pool_avg[keep]), labelled, proba[keep], cfg.k, cfg.rule, cfg.seed)]
    dist = nearest_distance(pooled_rows_np(pool_avg[order]), labelled)
    u = uncertainty(proba[order])
    ood, threshold = unknown_scores(pool_avg[order], avg, cfg.seed, cfg.known_share)
    rows = [{"rank": r + 1, "path": paths[i], "predicted": classes[int(proba[i].argmax())],
             "probability": round(float(proba[i].max()), 4), "uncertainty": round(float(u[r]), 4),
             "distance": round(float(dist[r]), 4), "unknown": bool(ood[r] > threshold),
             "ood_score": round(float(ood[r]), 4)} for r, i in enumerate(order)]
    seconds["rank"] = time.time() - t
    out = output_dir(cfg, "suggest")
    result = SuggestResult(rows, out / "suggestions.csv", out / "suggestions.html", key, cfg.rule, len(labels),
                           len(paths), int((~fresh).sum()), {"labelled": str(lab_path), "pool": str(pool_path)},
                           seconds, threshold, sum(r["unknown"] for r in rows), cfg.known_share)
    if result.unknown:
        log.warning("%s", unknown_warning(result, cfg.data))
    write_csv(rows, result.csv)
    write_page(result, root, cfg.data)
    result.seconds["total"] = time.time() - t0
    return result


def unknown_advice(known_share: float) -> str:
    """What to do with a suggested photo flagged unknown (the stderr line and the page say it), with how often a photo
    of a labelled class is flagged by design: the threshold keeps ``known_share`` of held-out labelled photos."""
    rate = (f"about 1 in {round(1 / (1 - known_share))}" if known_share < 1 else "few") + " are flagged"
    return ("look at each; one of no class goes into a new class folder or out of the pool, an odd photo of a class "
            f"({rate} by design, {option_text('known_share', known_share)}) into its class")


def unknown_warning(result: SuggestResult, data: str) -> str:
    """The one line said when suggested photos look like none of the labelled classes: how many, which, what to do."""
    ranks = [r["rank"] for r in result.rows if r["unknown"]]
    shown = ", ".join(map(str, ranks[:10])) + (", ..." if len(ranks) > 10 else "")
    n = len(ranks)
    return (f"suggest: {n} of the {len(result.rows)} suggested photos (rank{'s' if n > 1 else ''} {shown}) "
            f"look{'s' if n == 1 else ''} like none of the classes of {data} (ood_score above "
            f"{result.unknown_threshold:.4f}; unknown = true in {result.csv.name}): "
            f"{unknown_advice(result.known_share)}")


#: How the page begins (``validate`` knows an earlier suggest's by it).
PAGE_HEAD = "<!doctype html><html><head><meta charset='utf-8'><title>photos to label next</title>"
COLUMNS = ("rank", "path", "predicted", "probability", "uncertainty", "distance", "unknown", "ood_score")


def write_csv(rows: list, path: Path) -> Path:
    from ..models.predict import cell

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            w = SafeCsvWriter(f, list(COLUMNS))
            w.writeheader()
            w.writerows({c: cell(r[c]) for c in COLUMNS} for r in rows)

    return atomic_write(path, write)


def render(result: SuggestResult, root: str, data: str) -> str:
    """The page: each suggested photo (thumbnail inlined), its rank, the head's guess and how unsure it is."""
    from .audit_html import STYLE, photo_figure

    esc = html.escape
    parts = [f"{PAGE_HEAD}<style>{STYLE}</style></head><body><h1>Photos to label next</h1>",
             f"<p>{len(result.rows)} of the {result.pool} photos of {esc(root)}, ranked by the rule "
             f"<b>{esc(result.rule)}</b> (the uncertainty of {esc(result.head)}, fitted on the {result.labelled} "
             f"photos of {esc(data)}, and the distance to the nearest labelled or suggested photo). Move each into its "
             f"class folder of {esc(data)}: the next extract reuses its features.</p>"]
    if result.unknown:
        parts.append(f"<p><b>{result.unknown} of these {len(result.rows)} look like none of the classes of "
                     f"{esc(data)}</b> (unknown score above {result.unknown_threshold:.4f}, marked <i>none of the "
                     f"classes</i>): {esc(unknown_advice(result.known_share))}.</p>")
    parts.append("<table><tr><th>rank</th><th>photo</th><th>the head's guess</th><th>uncertainty</th>"
                 "<th>distance</th><th>looks like</th></tr>")
    for r in result.rows:
        looks = (f"<b class='given'>none of the classes</b> ({r['ood_score']:.3f})" if r["unknown"] else
                 f"a labelled class ({r['ood_score']:.3f})")
        parts.append(f"<tr><td>{r['rank']}</td><td>{photo_figure(root, r['path'], r['path'])}</td>"
                     f"<td>{esc(r['predicted'])} ({r['probability']:.3f})</td><td>{r['uncertainty']:.3f}</td>"
                     f"<td>{r['distance']:.3f}</td><td>{looks}</td></tr>")
    parts.append("</table></body></html>")
    return "\n".join(parts)


def write_page(result: SuggestResult, root: str, data: str) -> Path:
    text = render(result, root, data)
    return atomic_write(result.html, lambda tmp: tmp.write_text(text, encoding="utf-8"))
