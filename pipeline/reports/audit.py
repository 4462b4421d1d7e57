"""The audit stage: what is wrong with a labelled folder, found from its feature cache in seconds.

Likely wrong labels (``label_issues``: out-of-fold probabilities of the default head, ranked by
confident learning), photos like no other (outliers: far from their nearest neighbours), exact and
near duplicates within the training folder, and photos the test folder shares with it (leaks:
``duplicates``). The caches are the ones extract makes (made here when missing, reused when not);
the report goes to a run folder (never into the data): report.json, report.html (self-contained,
thumbnails inlined), gallery.png (where there is a label issue), and fixes.csv, the list to review and pass
to ``--apply``.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import shlex
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Optional

import numpy as np

from ..cache.feature_cache import FeatureCache
from ..config import AuditConfig, ExtractConfig, FitHeadConfig, Placeholder, check_config, option_text, option_value
from ..data.folders import canonical_name
from ..data.moves import rename_to_free
from ..errors import DeviceMissing, PackageMissing, PipelineError, UsageError
from ..files import (SafeCsvWriter, atomic_write, check_output, check_replaceable, header_names, unshown,
                     write_json, writing)
from ..heads.cache_views import CacheViews
from ..heads.fit_head import check_labelled, warn_same_folder
from ..progress import progress
from ..runs.run_folders import moved_paths, new_run_dir, publish_run_dir, staged_run
from . import duplicates as dup
from .label_issues import label_issues

if TYPE_CHECKING:
    from ..data.apply_fixes import FixesResult

log = logging.getLogger(__name__)

#: Nearest training photos shown beside each label issue in the HTML report.
NEIGHBOURS_SHOWN = 4


@dataclass(frozen=True)
class AuditResult:
    """audit's answer (report.json's keys, then where report.json and fixes.csv went)."""

    cache: str
    data_root: str
    rows: int
    classes: list
    head: str  # the default head's setting that made the out-of-fold probabilities
    folds: int
    oof_acc: float
    threshold: float
    label_issues: list  # {path, given, suggested, score, row}, most likely wrong first
    outliers: list  # {path, given, score, row, fence}
    duplicates: list  # groups: {paths, classes, similarity, exact, rows}
    leaks: list  # {train, test, similarity, exact}; [] without a test folder
    unreadable: list  # {path, reason}: the folder's files extract could not decode (skipped, in no other list)
    test_cache: Optional[str]
    unconfirmed: dict  # candidate pairs the layout check refused: duplicates (and leaks with a test folder)
    test_root: Optional[str]  # with a test folder only (not in --json without one)
    test_rows: Optional[int]
    seconds: dict
    html: str
    gallery: Optional[str]  # None (and not in report.json or --json) where there is no label issue: none written
    output: str  # the run folder (or --output)
    report: str  # report.json
    fixes: str  # fixes.csv, the list to review and pass to --apply
    leaks_across_classes: Optional[int] = None  # leaks whose photos are of different classes (with a test folder only)

    def to_dict(self) -> dict:
        """The answer as --json prints it: test_root and test_rows only with a test folder, gallery only where one
        was written."""
        d = asdict(self)
        if self.test_cache is None:
            del d["test_root"], d["test_rows"], d["leaks_across_classes"]
        if self.gallery is None:
            del d["gallery"]
        return d


def validate(cfg: AuditConfig) -> None:
    check_config(cfg)
    if cfg.apply and cfg.undo:
        raise UsageError(f"pass {option_text('apply')} or {option_text('undo')}, not both")
    if cfg.apply or cfg.undo:
        return
    if not (cfg.data or cfg.cache):
        raise UsageError(f"audit needs {option_text('data', Placeholder('DIR'))} "
                         f"(or {option_text('cache', Placeholder('FILE'))})")
    if cfg.data and cfg.cache:
        raise UsageError(f"pass {option_text('data')} or {option_text('cache')}, not both")
    if cfg.test_data and cfg.test_cache:
        raise UsageError(f"pass {option_text('test_data')} or {option_text('test_cache')}, not both")
    for name in ("data", "test_data"):
        v = getattr(cfg, name)
        if v and not Path(v).is_dir():
            raise UsageError(f"{option_value(name, v)} is not a folder")


def training_cache(cfg: AuditConfig) -> Path:
    """--cache, or the cache of every photo of --data as extract makes it (a hit when it exists). Where int8
    (``--precision auto`` on a large folder), with the network of the folder's newest int8 cache: after an
    --apply that is the refreshed cache, a hit; calibrated on the folder as changed, it would be another network
    and every row would be computed again (``quantize.lent_calibration``)."""
    if cfg.cache:
        return Path(cfg.cache)
    from ..extraction.extract import extract
    from ..extraction.quantize import newest_int8_cache

    lender = newest_int8_cache(cfg.cache_dir, cfg.data, cfg.backbone, cfg.weights)
    return Path(extract(ExtractConfig(data=cfg.data, n=0, backbone=cfg.backbone, weights=cfg.weights,
                                      batch_size=cfg.batch_size, device=cfg.device, workers=cfg.workers,
                                      cache_dir=cfg.cache_dir, command=cfg.command, calib_cache=lender)).cache)


def test_cache(cfg: AuditConfig, cache: FeatureCache) -> Optional[Path]:
    """The test folder's cache, extracted exactly like the training cache (as fit-head --test-data does)."""
    if not (cfg.test_data or cfg.test_cache):
        return None
    from ..heads.fit_head import check_test_cache, check_test_data, test_cache_for

    check_test_data(cfg.test_data, cache, cache.path)
    if cfg.test_cache:  # test_cache_for checks the cache it extracts, not the one given
        check_test_cache(cfg.test_cache, cache)
    return test_cache_for(FitHeadConfig(test_data=cfg.test_data, test_cache=cfg.test_cache), cache)


def pooled(cache: FeatureCache) -> tuple[np.ndarray, np.ndarray]:
    """(average-pooled rows for the head, the rows near copies are compared in) of every cache row
    (float32, in memory: 2 KB a row and view for VGG-16), read in one pass."""
    from ..heads.feature_views import allowed_views

    view = dup.VIEW if dup.VIEW in allowed_views(cache.feature_shape) else "avg"
    rows = CacheViews(cache, np.arange(cache.n)).load(["avg", view])
    return rows["avg"], rows[view]


def check_output_dir(cfg: AuditConfig) -> None:
    """--output (or --runs-dir) and --cache-dir refused before any work when inside a photo folder the audit
    reads: --data, --test-data, or the photos of --cache and --test-cache (a file there would join a class)."""
    from ..models.whole_models import cache_reads

    folders = [(cfg.data, "--data"), (cfg.test_data, "--test-data")]
    for option, cache in (("--cache", cfg.cache), ("--test-cache", cfg.test_cache)):
        folders += cache_reads(cache, option)[1] if cache else []
    folder, option = (cfg.output, "--output") if cfg.output else (cfg.runs_dir, "--runs-dir")
    check_output(folder, data=folders, what=option, folder=True)
    if cfg.output and not (cfg.apply or cfg.undo):
        check_earlier(Path(cfg.output))
    # every folder at once: extract checks only its own, so the training cache would land in --test-data first
    check_output(cfg.cache_dir, data=folders, what="--cache-dir", folder=True,
                 written=False)  # its caches may be hits, read where nothing can be written


def audit_files() -> dict:
    """What audit writes into its folder: {name: (how an earlier audit's is known, what it is)}."""
    from .audit_html import is_gallery, is_page, is_report

    return {"report.json": (is_report, "a report audit wrote"), "report.html": (is_page, "a page audit wrote"),
            "gallery.png": (is_gallery, "a gallery audit wrote"),
            "fixes.csv": (lambda p: header_names(p, "path", "action"), "a list of fixes (path, action, ...)")}


def check_earlier(out: Path) -> None:
    """Before any work: each file audit writes (or removes: gallery.png, where there is no label issue) into
    --output is not there yet, or an earlier audit's; a file of the user's of one of those names (a photo named
    gallery.png, a README.html) is refused, never replaced or deleted (exit 2). An earlier fixes.csv is kept as
    fixes-earlier.csv (``keep_earlier``), the others replaced."""
    for name, (ours, kind) in audit_files().items():
        check_replaceable(out / name, ours, kind)


def output_dir(cfg, kind: str = "audit") -> Path:
    """--output (made when missing), or a new run folder in --runs-dir (``cfg``: a config with both; the
    caller has checked them with check_output)."""
    if not cfg.output:
        return new_run_dir(cfg.runs_dir, kind)
    with writing(cfg.output):
        Path(cfg.output).mkdir(parents=True, exist_ok=True)
    return Path(cfg.output)


def photo_root(folder: Optional[str], cache: FeatureCache) -> str:
    """Where the cache's photos are: the folder asked for (a copy of a folder, names, sizes and times kept,
    hits the original's cache, whose data_root is the original: the report, its pictures and the --apply
    line it prints named the original), else the folder the cache was made from."""
    return str(Path(folder).resolve()) if folder else cache.attrs["data_root"]


def still_there(root: str, skipped: list) -> list[dict]:
    """[{path, reason}] of the cache's skipped files still in the folder. One moved out since is left out: a name
    that is not UTF-8 or a dangling link is in no listing's fingerprint, so the cache stays a hit (as extract
    keeps it) and its record named the file as unreadable, gone though it was."""
    there = [{"path": p, "reason": why} for p, why in skipped
             if os.path.lexists(Path(root) / p) or os.path.lexists(Path(root) / unshown(p))]
    if len(there) < len(skipped):
        gone = len(skipped) - len(there)
        log.info("%d of the files the cache skipped as unreadable %s no longer in %s: not listed", gone,
                 "is" if gone == 1 else "are", root)
    return there


def unreadable_now(root: str, skipped: list) -> list[dict]:
    """[{path, reason}] of the folder's unreadable files: the cache's skipped ones still there (``still_there``),
    then the entries its listing leaves out now that the cache did not skip. A name that is not UTF-8 or a dangling
    link added since the cache was made is in no listing's fingerprint: the cache stays a hit, extract's warning
    named it, and audit's list did not."""
    from ..data.folders import list_image_folder

    there = still_there(root, skipped)
    try:
        bad = list_image_folder(root, min_classes=1).bad  # warned once already when extract listed it
    except (UsageError, PipelineError, OSError):  # --cache of a folder moved or changed: its record alone
        return there
    known = {u["path"] for u in there} | {p for p, _ in skipped}
    return there + [{"path": p, "reason": why} for p, why in bad if p not in known]


def analyse(cfg: AuditConfig) -> dict:
    """The audit of one training cache (and a test cache): label issues, outliers, duplicates, leaks."""
    t0 = time.time()
    path = training_cache(cfg)
    seconds: dict = {}
    with FeatureCache(path) as cache:
        classes, labels, paths = cache.classes, np.asarray(cache.labels, np.int64), cache.paths
        root = photo_root(cfg.data, cache)
        check_labelled(cache, path, "the audit")  # a pool's cache (suggest's): no labels to doubt
        counts = np.bincount(labels, minlength=len(classes))
        smallest = int(counts.min())
        if smallest < cfg.folds:
            fix = f"pass --folds {smallest}" if smallest >= 2 else "add photos to it or move it out of the folder"
            raise UsageError(f"{cfg.folds}-fold out-of-fold probabilities need at least {cfg.folds} photos of every "
                             f"class; class {classes[int(counts.argmin())]!r} of {path} has {smallest} ({fix})")
        avg, near_rows = pooled(cache)
        digests = cache.row_digests()
        unreadable = unreadable_now(root, cache.skipped())  # said on a hit too, not only once
        tpath = test_cache(cfg, cache)
        test = None
        if tpath is not None:
            with FeatureCache(tpath) as tc:
                test = {"cache": str(tpath), "root": photo_root(cfg.test_data, tc), "paths": tc.paths,
                        "near": pooled(tc)[1], "digests": tc.row_digests(), "labels": np.asarray(tc.labels, np.int64),
                        "classes": tc.classes}
            warn_same_folder(cfg.test_data, cfg.test_cache, root, test["root"],
                             "its photos are listed as leaks of themselves")
    seconds["read"] = time.time() - t0
    t = time.time()
    issues = label_issues(avg, labels, classes, folds=cfg.folds, seed=cfg.seed, copies=digests)
    seconds["label_issues"] = time.time() - t
    t = time.time()
    x = dup.l2_rows(near_rows)
    near = dup.similar_pairs(x, threshold=cfg.threshold, k=10)
    warn_left_out(near["left_out"], "near-copy candidate pairs")
    near["pairs"], unconfirmed = confirmed(near["pairs"], path, path)
    seconds["duplicates"] = time.time() - t
    result = {
        "cache": str(path), "data_root": root, "rows": len(labels), "classes": list(classes),
        "head": issues["setting"], "folds": cfg.folds, "oof_acc": issues["oof_acc"], "threshold": cfg.threshold,
        "label_issues": _label_issues(issues, labels, classes, paths),
        "outliers": _outliers(near, labels, classes, paths),
        "duplicates": _duplicate_groups(near, digests, labels, classes, paths),
        "leaks": [], "unreadable": unreadable, "test_cache": None, "unconfirmed": {"duplicates": unconfirmed},
    }
    warn_chained(result["duplicates"], len(labels), cfg.threshold)
    if test is not None:
        t = time.time()
        xt = dup.l2_rows(test["near"])
        cross = dup.similar_pairs(xt, x, threshold=cfg.threshold, k=1, desc="audit: test vs training")
        warn_left_out(cross["left_out"], "test-training candidate pairs")
        cross["pairs"], result["unconfirmed"]["leaks"] = confirmed(cross["pairs"], tpath, path)
        result["leaks"] = _leaks(cross, test, digests, paths)
        given = dict(zip(test["paths"], (test["classes"][y] for y in test["labels"])))  # by name: a subset of classes
        trained = dict(zip(paths, (classes[y] for y in labels)))
        across = [lk for lk in result["leaks"]  # 'café' the same class in either Unicode form (NFC, a Mac's NFD)
                  if canonical_name(given[lk["test"]]) != canonical_name(trained[lk["train"]])]
        result["leaks_across_classes"] = len(across)
        warn_across_classes(result["leaks"], across, cfg.threshold)
        result["test_cache"], result["test_root"], result["test_rows"] = test["cache"], test["root"], len(test["paths"])
        seconds["leaks"] = time.time() - t
    # for the HTML report only (not in report.json): each row's nearest photos, every path and class
    result.update(knn=near["knn"][:, :NEIGHBOURS_SHOWN], _paths=paths, _given=[classes[y] for y in labels])
    result["seconds"] = {**seconds, "total": time.time() - t0}
    return result


#: Candidate pairs whose maps are read at once for the second check (100 KB a map for VGG-16).
CONFIRM_BLOCK = 512


def warn_left_out(count: int, what: str) -> None:
    if count:
        log.warning("%d more %s left out: at most %d a photo, its most similar (the folder holds many near copies "
                    "of each other, or %s is low)", count, what, dup.PAIRS_PER_ROW, option_text("threshold"))


#: A near-copy group of at least this share of the folder's photos (and CHAINED_MIN) is said to be suspect.
CHAINED_SHARE, CHAINED_MIN = 0.05, 20


def warn_chained(groups: list[dict], rows: int, threshold: float) -> None:
    """Say when the largest near-copy group is a good part of the folder: photos all alike (one plain background,
    the same hands: signdigits10's 756 of 1,444 photos, of 9 classes, in one group at 0.88 with
    EfficientNet-Lite0) pass the threshold pair by pair and union-find chains them into one group, which the
    report then showed as copies, said nothing about."""
    near = [g for g in groups if not g["exact"]]
    if not near:
        return
    big = max(near, key=lambda g: len(g["paths"]))
    if len(big["paths"]) >= max(CHAINED_MIN, CHAINED_SHARE * rows):
        log.warning("a near-copy group holds %d of the %d photos, of %d classes (e.g. %s): more likely photos this "
                    "alike chained pair by pair than copies of one photo; %s may be low for these features (raise "
                    "it, docs/audit.md)", len(big["paths"]), rows, len(set(big["classes"])),
                    ", ".join(big["paths"][:2]), option_value("threshold", threshold))


#: Leaks are said to be more likely photos alike than copies when at least this share of the test photos reported (and
#: ACROSS_MIN of them) has a leak of another class (measured, docs/audit.md).
ACROSS_SHARE, ACROSS_MIN = 0.25, 10


def warn_across_classes(leaks: list[dict], across: list[dict], threshold: float) -> None:
    """Say when many leaks join photos of different classes: a copy keeps its class (a mislabelled one does not, but
    those are few), photos merely alike need not. signdigits10 with EfficientNet-Lite0 at 0.88: 2,152 leaks of 360
    of the 618 test photos, 400 of them (of 155 test photos) across classes, listed as copies without a word; a
    test folder of 30 real copies, 2 of them in the wrong class, has 2 of 30."""
    photos = len({lk["test"] for lk in leaks})
    crossing = len({lk["test"] for lk in across if not lk["exact"]})  # a byte copy in another class: a copy mislabelled
    if crossing >= max(ACROSS_MIN, ACROSS_SHARE * photos):
        log.warning("%d of the %d leaks join photos of different classes (%d of the %d test photos reported, e.g. test "
                    "%s = train %s): a copy keeps its class, so at %s these features more likely find photos alike "
                    "than copies; raise it to where leaks across classes stop (docs/audit.md), or look at the pairs "
                    "(report.html)", len(across), len(leaks), crossing, photos, across[0]["test"], across[0]["train"],
                    option_value("threshold", threshold))


def confirmed(pairs: tuple, path_a: Path, path_b: Path) -> tuple[tuple, int]:
    """The near-copy candidates ``pairs`` (rows i of the cache ``path_a``, j of ``path_b``, similarity) that
    the second check confirms (``duplicates.layout_similarity`` at least ``SAME_LAYOUT``: the whole maps
    agree, straight or mirrored), and how many it refused. Caches of pooled vectors (no layout) keep every candidate."""
    i, j, s = pairs
    with FeatureCache(path_a) as a, FeatureCache(path_b) as b:
        if not (dup.has_layout(a.feature_shape) and len(i)):
            return pairs, 0
        keep = []
        with progress(total=len(i), desc="audit: second check of near copies", unit="pair") as bar:
            for lo in range(0, len(i), CONFIRM_BLOCK):
                keep.append(dup.layout_similarity(read_maps(a, i[lo:lo + CONFIRM_BLOCK]),
                                                  read_maps(b, j[lo:lo + CONFIRM_BLOCK])) >= dup.SAME_LAYOUT)
                bar.update(len(keep[-1]))
        keep = np.concatenate(keep)
    return (i[keep], j[keep], s[keep]), int((~keep).sum())


def read_maps(cache: FeatureCache, rows: np.ndarray) -> np.ndarray:
    """The cached maps of ``rows`` (in their order, repeats allowed) as float32, each run of consecutive rows
    read as one slice: h5py's list indexing took 20x as long for scattered rows (1 s for 512 VGG-16 maps, so
    25,000 photos' 400,000 candidate pairs took a quarter of an hour)."""
    unique, inverse = np.unique(np.asarray(rows, np.int64), return_inverse=True)
    runs = np.split(unique, np.flatnonzero(np.diff(unique) != 1) + 1) if len(unique) else []
    maps = np.empty((len(unique), *cache.feature_shape), np.float32)
    at = 0
    for run in runs:
        maps[at:at + len(run)] = cache.features[int(run[0]):int(run[-1]) + 1]
        at += len(run)
    return maps[inverse]


def _label_issues(issues: dict, labels, classes, paths) -> list[dict]:
    proba, score = issues["proba"], issues["score"]
    return [{"path": paths[i], "given": classes[labels[i]], "suggested": classes[int(proba[i].argmax())],
             "score": round(float(score[i]), 4), "row": int(i)} for i in issues["flagged"]]


def _outliers(near: dict, labels, classes, paths) -> list[dict]:
    scores = dup.outlier_scores(near["knn_sim"])
    if not len(scores):
        return []
    fence = dup.outlier_threshold(scores)
    rows = np.flatnonzero(scores > fence)
    rows = rows[np.argsort(-scores[rows], kind="stable")]
    return [{"path": paths[i], "given": classes[labels[i]], "score": round(float(scores[i]), 4), "row": int(i),
             "fence": round(fence, 4)} for i in rows]


def _duplicate_groups(near: dict, digests, labels, classes, paths) -> list[dict]:
    pi, pj, ps = near["pairs"]
    sim = {(int(a), int(b)): float(s) for a, b, s in zip(pi, pj, ps)}
    exact = dup.exact_pairs(digests)
    for a, b in exact:
        sim[(a, b)] = 1.0
    found = dup.groups(len(paths), list(sim))
    group_of = {i: n for n, g in enumerate(found) for i in g}
    lowest, all_exact = [1.0] * len(found), [True] * len(found)
    for (a, b), v in sim.items():  # each pair once: a group's weakest link, and whether all are byte copies
        n = group_of[a]
        lowest[n] = min(lowest[n], v)
        all_exact[n] = all_exact[n] and bool(digests[a]) and digests[a] == digests[b]  # not only (first, other)
    out = [{"paths": [paths[i] for i in g], "classes": [classes[labels[i]] for i in g],
            "similarity": round(lowest[n], 4), "exact": all_exact[n], "rows": g} for n, g in enumerate(found)]
    out.sort(key=lambda d: (-d["similarity"], d["rows"][0]))
    return out


def _leaks(cross: dict, test: dict, digests, paths) -> list[dict]:
    found = {}
    ti, tj, ts = cross["pairs"]
    for a, b, s in zip(ti.tolist(), tj.tolist(), ts.tolist()):
        found[(a, b)] = max(found.get((a, b), 0.0), s)
    exact = set(dup.exact_pairs(test["digests"], digests))
    for pair in exact:
        found[pair] = 1.0
    out = [{"train": paths[b], "test": test["paths"][a], "similarity": round(min(s, 1.0), 4),
            "exact": (a, b) in exact} for (a, b), s in found.items()]
    out.sort(key=lambda d: (-d["similarity"], d["test"], d["train"]))
    return out


# -- outputs ------------------------------------------------------------------------------------------
def write_fixes_csv(result: dict, path: Path) -> None:
    """The list to review: each label issue as 'relabel' to its suggested class, each extra copy of an
    exact duplicate as 'remove', each outlier as 'keep' (change the action to act on it). Each path once, so
    that --apply takes the list as written: of a group of exact copies the one kept is the first whose label
    is not in doubt (else the first), and a copy removed is not also relabelled."""
    doubted = {r["path"] for r in result["label_issues"]}
    removed = []
    for g in result["duplicates"]:
        if g["exact"]:
            kept = next((p for p in g["paths"] if p not in doubted), g["paths"][0])
            removed += [{"path": p, "action": "remove", "new_class": "", "why": f"exact copy of {kept}"}
                        for p in g["paths"] if p != kept]
    gone = {r["path"] for r in removed}
    taken = {p.casefold() for p in [*result.get("_paths", ()), *(u["path"] for u in result.get("unreadable", ()))]}
    rows = [{"path": r["path"], "action": "relabel", "new_class": r["suggested"],
             "new_name": free_name(r["path"], r["suggested"], taken), "why": f"label issue {r['score']}"}
            for r in result["label_issues"] if r["path"] not in gone] + removed
    rows += [{"path": r["path"], "action": "keep", "new_class": "", "why": f"outlier {r['score']}"}
             for r in result["outliers"]]

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            w = SafeCsvWriter(f, ["path", "action", "new_class", "new_name", "why"])
            w.writeheader()
            w.writerows(rows)

    earlier = keep_earlier(path)
    atomic_write(path, write)
    if earlier is not None:
        if earlier.read_bytes() == path.read_bytes():  # the same list again: nothing to keep
            earlier.unlink()
        else:
            log.warning("kept the earlier fixes.csv of %s %s (another list than this audit's: perhaps "
                        "edited) as %s", option_text("output"), path.parent, earlier.name)


def keep_earlier(path: Path) -> Optional[Path]:
    """An earlier audit's fixes.csv in the same --output moved to a second name, never one that exists, before the
    new list is written: the list a person reviewed and edited is not lost to a new audit of the folder (the report
    beside it is audit's own, and replaced). None where there is none."""
    if not path.is_file():
        return None
    names = (path.with_name(f"{path.stem}-earlier{'' if i == 1 else f'-{i}'}{path.suffix}") for i in itertools.count(1))
    with writing(path):
        return rename_to_free(path, names)  # never over a file, with or without hard links


def free_name(path: str, new_class: str, taken: set) -> str:
    """'' where the photo keeps its name in ``new_class``; else a name no photo there has (``IMG_1-sea.jpg``,
    then ``IMG_1-sea-2.jpg``...): two class folders each holding an IMG_1.jpg made --apply refuse the list as
    written. ``taken`` (the folder's paths, and the places given so far, casefolded) gets the place: a name equal to
    one there but for case (``IMG_1.JPG`` beside ``img_1.jpg``) is the same file on a case-insensitive disk."""
    name, given = PurePosixPath(path).name, PurePosixPath(path).parts[0]
    stem, ext = PurePosixPath(name).stem, PurePosixPath(name).suffix
    n, i = name, 1
    while f"{new_class}/{n}".casefold() in taken:
        i += 1
        n = f"{stem}-{given}{ext}" if i == 2 else f"{stem}-{given}-{i - 1}{ext}"
    taken.add(f"{new_class}/{n}".casefold())
    return "" if n == name else n


def public(result: dict) -> dict:
    """The result without the arrays only the pictures need (what report.json and --json hold)."""
    return {k: v for k, v in result.items() if k != "knn" and not k.startswith("_")}


def audit(cfg: AuditConfig) -> AuditResult | FixesResult:
    """The audit command: analyse (the default), or --apply a reviewed list, or --undo one."""
    validate(cfg)
    if not cfg.undo:
        check_output_dir(cfg)
    if cfg.apply or cfg.undo:
        from ..data.apply_fixes import apply_fixes, undo_fixes

        if cfg.apply:
            if not cfg.data:
                raise UsageError(f"{option_text('apply')} needs {option_text('data', Placeholder('DIR'))}, the folder "
                                 "the list's paths are relative to")
            made = not cfg.output or not os.path.lexists(cfg.output)  # an --output already there is the user's
            out = output_dir(cfg, "audit-apply")
            try:
                result = apply_fixes(cfg.apply, cfg.data, out, cfg.quarantine_dir)
                if cfg.refresh and cfg.cache_dir != AuditConfig.cache_dir:  # the undo's refresh: the same caches
                    result = replace(result, undo=f"{result.undo} --cache-dir {shlex.quote(str(cfg.cache_dir))}")
            except Exception:
                if made and not any(out.iterdir()):
                    out.rmdir()  # a refused list leaves no empty run folder (or --output audit made) behind
                raise
        else:
            result = undo_fixes(cfg.undo, cfg.data)
        return replace(result, refreshed=refresh(cfg, result.root)) if cfg.refresh else result
    result = analyse(cfg)
    if cfg.output:
        out = output_dir(cfg)
        report = write_report(result, out, cfg.top)
    else:  # the run folder appears with every file in it (a kill -9 while they were written left half of them)
        with staged_run(cfg.runs_dir, "audit") as staged:
            report = write_report(result, staged, cfg.top)
            out = publish_run_dir(staged, before=lambda d: write_json(  # report.json names the folder it is in
                staged / "report.json", moved_paths(report, staged, d), indent=1))
        report = moved_paths(report, staged, out)
    return AuditResult(**{"test_root": None, "test_rows": None, "gallery": None, **report},
                       report=str(out / "report.json"),
                       fixes=str(out / "fixes.csv"))


def write_report(result: dict, folder: Path, top: int) -> dict:
    """report.html, gallery.png, report.json and fixes.csv written into ``folder``; returns the report."""
    with_pictures(result, folder, top)
    result["output"] = str(folder)
    report = public(result)
    write_json(folder / "report.json", report, indent=1)
    write_fixes_csv(result, folder / "fixes.csv")
    return report


def with_pictures(result: dict, out: Path, top: int) -> None:
    """report.html, and gallery.png where there is a label issue (it was a picture of nothing but 'no label issues
    found'); without one, a line on stderr and no 'gallery' key, as evaluate does with nothing misclassified."""
    from .audit_html import is_gallery, write_gallery, write_html

    result["html"] = str(write_html(result, out / "report.html", top))
    if not result["label_issues"]:
        gallery = out / "gallery.png"
        if is_gallery(gallery):
            gallery.unlink()  # an earlier audit's in the same --output: its issues, not these
        elif os.path.lexists(gallery):  # put there during the analysis (check_earlier refused one before)
            log.warning("left %s: not a gallery audit wrote", gallery)
        log.info("no label issues: no gallery.png")
        return
    result["gallery"] = str(write_gallery(result, out / "gallery.png", top))


def refresh(cfg: AuditConfig, root: str) -> Optional[dict]:
    """Extract the changed folder again as its newest cache was made, so the next fit-head trains on the
    new labels: rows are found by content in the old cache (``row_donors``), so only photos whose bytes no
    cache holds (none, after a relabel or a removal) are computed. An int8 cache lends its network (its stored
    calibration: ``quantize.lent_calibration``); calibrated again on the changed folder it would be another
    network, whose every row is computed."""
    from ..cache.feature_cache import list_caches
    from ..extraction.extract import extract

    good, _ = list_caches(cfg.cache_dir) if Path(cfg.cache_dir).is_dir() else ([], [])
    made = [i for i in good if i.complete and Path(i.attrs["data_root"]) == Path(root).resolve()
            and not i.attrs.get("purpose")]
    if not made:
        log.info("no cache of %s in %s to refresh; the next extract reuses rows by content", root, cfg.cache_dir)
        return None
    config = json.loads(made[0].attrs.get("config") or "{}")
    keep = {k: config[k] for k in ("n", "backbone", "weights", "dtype", "precision", "pool", "decode", "seed",
                                   "calib_n", "calib_data", "flip", "batch_size", "device", "workers")
            if k in config}
    try:
        if keep.get("precision") == "int8":
            keep["calib_cache"] = str(made[0].path)
        r = extract(ExtractConfig(data=root, cache_dir=cfg.cache_dir, command=cfg.command, **keep))
    except (UsageError, DeviceMissing, PackageMissing) as e:  # made on a GPU machine, or with torchao: not here
        log.warning("could not extract %s again as %s was made (%s); run extract yourself: rows are reused by "
                    "content", root, made[0].path, e)
        return None
    if r.hit:  # the folder is as an older cache saw it (an undo): that one, not the newer, is the default again
        from ..cache.feature_cache import claim_default

        claim_default(cfg.cache_dir, r.cache)
    return {k: getattr(r, k) for k in ("cache", "hit", "rows", "computed", "reused", "label_changes")}
