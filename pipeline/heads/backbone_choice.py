"""The choose-backbone stage: which backbone (or fusion of backbones) suits these photos, by cross-validation.

Each candidate extracts the same seeded stratified sample into an ordinary cache (later commands reuse
it; a cache already there costs seconds), and fit-head's default head (``fit_head.fit_on_rows``, with
its own choice of settings inside each training part: nested, so the score is of the whole procedure) is
cross-validated on it, and on the fused views of every combination of candidates
(``fused_views.FusedRows``): repeated stratified k-fold on the same photos in the same folds for every
candidate, so candidates are compared fold by fold. Noise is said as it is: the standard error of a
k-fold mean uses Nadeau and Bengio's correction (the training parts overlap, so the folds are not
independent: var x (1/J + n_test/n_train) over J folds), and a candidate is "within noise" of the best
when their paired difference is under two such standard errors.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np

from ..cache.feature_cache import FeatureCache
from ..config import ChooseBackboneConfig, FitHeadConfig, Placeholder, check_config, option_text
from ..errors import PipelineError, UsageError
from .fused_views import FusedRows, match_rows

if TYPE_CHECKING:
    from ..extraction.extract import ExtractResult

log = logging.getLogger(__name__)

#: a candidate is within noise of the best while their paired difference is under this many standard errors
NOISE_SES = 2.0


@dataclass
class Candidate:
    """One backbone, or a fusion of several, as cross-validated."""

    name: str  # 'vgg16', 'vgg16+tf_efficientnet_lite0'
    backbones: list  # the --backbone values it is made of
    caches: list  # their cache files
    features: int  # length of the row the head reads (a fusion: the sum of its blocks)
    acc: float  # mean accuracy over the folds
    acc_se: float  # its standard error (corrected for overlapping training parts); NaN: every fold scored alike
    log_loss: float  # mean log-loss (the fitted head's, before any temperature)
    log_loss_se: float
    fold_acc: list  # per fold, in the same folds for every candidate
    fold_log_loss: list
    # extraction rate on this machine (a fusion runs each backbone: 1/sum(1/r)); None if unknown
    img_per_s: Optional[float]
    mb_per_1000: float  # cache size per 1,000 photos (a fusion: the sum of its caches')
    diff: float = 0.0  # the best's accuracy minus this one's (mean of the paired fold differences)
    diff_se: float = 0.0  # its standard error (NaN: the same difference in every fold)
    within_noise: bool = True  # of the best: diff < NOISE_SES x diff_se


@dataclass
class BackboneChoice:
    """choose-backbone's answer: every candidate, the best, and the fastest within noise of it."""

    data: str
    rows: int  # photos every candidate was scored on
    classes: int
    folds: int
    repeats: int
    candidates: list = field(default_factory=list)  # Candidate, best first
    best: str = ""
    fastest_within_noise: str = ""  # the recommendation: the fastest candidate indistinguishable from the best
    indistinguishable: list = field(default_factory=list)  # names within noise of the best (the best included)
    extract_seconds: float = 0.0
    cv_seconds: float = 0.0
    note: str = ""  # the recommendation, said in words


def _backbones(value: str = "") -> str:
    """The candidates' option as the caller writes it: ``--backbone NAME=W`` on the command line, from Python
    the ``backbones`` list (``backbones=['NAME=W']``)."""
    if option_text("backbones", cli="--backbone") == "backbones":
        return f"backbones=[{value!r}]" if value else "backbones"
    return f"--backbone {value}" if value else "--backbone"


def parse_candidate(text: str) -> tuple[str, str]:
    """'vgg16=W' -> ('vgg16', 'W'); 'vgg16' -> ('vgg16', 'DEFAULT')."""
    name, sep, weights = str(text).partition("=")
    if not name.strip():
        raise UsageError(f"{_backbones()} {text!r}: expected NAME or NAME=WEIGHTS")
    if sep and not weights.strip():  # 'vgg16=$W' with $W unset: its default weights were loaded (or downloaded)
        raise UsageError(f"{_backbones()} {text!r}: no weights after '=': name them (a file, a weights name, or none), "
                         f"or give {name.strip()} alone for its default weights")
    name, weights = name.strip(), weights.strip() or "DEFAULT"
    check_tag(text, name, weights)
    return name, weights


def check_tag(text: str, name: str, weights: str) -> None:
    """A timm pretrained tag in a candidate's name, refused as extract refuses it (a tag without a model, a tag
    beside other weights: two networks), but in choose-backbone's terms: its weights follow '=' (it has no
    --weights, which extract's refusal named)."""
    from ..extraction import backbones as bb

    try:
        bare, tag = bb.split_tag(name)
    except UsageError:
        raise UsageError(f"{_backbones()} {text!r}: a timm model with a pretrained tag is written MODEL.TAG "
                         "(convnext_tiny.fb_in22k), or give the tag after '=' (convnext_tiny=fb_in22k)") from None
    if (tag and weights.upper() != "DEFAULT" and weights.lower() != "none" and not bb.is_weights_path(weights)
            and bb.timm_tag(weights) != tag):
        model = bb.canonical_name(bare)
        raise UsageError(f"{_backbones()} {text!r} names timm's pretrained weights {tag!r} in the name and "
                         f"{bb.timm_tag(weights)!r} after '=': give one of them ({_backbones(f'{model}={tag}')}, or "
                         f"{_backbones(f'{model}={weights}')})")


def validate(cfg: ChooseBackboneConfig) -> None:
    check_config(cfg)
    if not cfg.backbones:
        raise UsageError(f"name the candidates: {_backbones('NAME[=WEIGHTS]')}, once per candidate (two or more to "
                         "compare)")
    specs = [parse_candidate(b) for b in cfg.backbones]
    check_distinct(cfg.backbones, [same_weights(name, weights) for name, weights in specs])
    if not Path(cfg.data).is_dir():
        raise UsageError(f"data folder {cfg.data!r} does not exist")
    from ..devices import resolve_device

    resolve_device(cfg.device)  # a --device this machine lacks: refused before extraction (a hit skips it)
    check_candidates(specs)


def same_weights(name: str, weights: str) -> tuple[str, str]:
    """A candidate as compared for repeats: a weights file by where it resolves to, so 'vgg16=w.pt' and
    'vgg16=./dir/../w.pt' are one candidate (both were extracted and cross-validated, then the fusion failed);
    a library's weights as extract's cache key names them ('vgg16' and 'torchvision:vgg16=VGG16_Weights.DEFAULT'
    are one: they were refused only after extracting their one cache)."""
    from ..extraction import backbones as bb

    name, weights = bb.canonical_request(name, weights)  # 'X.tag' is 'X=tag'
    path = Path(weights).expanduser()
    if path.is_file():
        return name, str(path.resolve())
    if bb.is_weights_path(weights):  # a missing file: check_candidates names it
        return name, weights
    return name, next(iter(bb.weights_identity(weights).values()))


def check_distinct(given: list, keys: list) -> None:
    """Refuse a candidate named twice (``keys``: what makes each one; ``given``: the --backbone values)."""
    seen = {}
    for text, key in zip(given, keys):
        if key in seen:
            raise UsageError(f"a candidate is named twice: {seen[key]} and {text} are the same network and weights")
        seen[key] = text


def candidate_names(specs: list, given: list) -> list[str]:
    """Each candidate's label in the table: its backbone's name, or where two candidates share it (vgg16 with a
    weights file and with none), name=weights (a file by its name); both were called 'vgg16', and the best's
    mark and 'best' went to each row of that name. A timm tag that names no weights in use (beside none or a
    file: dropped, as extract drops it) is not in the label: 'X.tag=none' ran X's random weights, not X.tag."""
    specs = [(ran_name(name, weights), weights) for name, weights in specs]
    counts = {}
    for name, _ in specs:
        counts[name] = counts.get(name, 0) + 1
    labels = [name if counts[name] == 1 else f"{name}={Path(weights).name}" for name, weights in specs]
    return labels if len(set(labels)) == len(labels) else list(given)


def ran_name(name: str, weights: str) -> str:
    """A candidate's name as written, less a timm tag beside 'none' or a file (``canonical_request`` drops it)."""
    from ..extraction import backbones as bb

    tag = bb.split_tag(name)[1]
    dropped = tag and (weights.lower() == "none" or bb.is_weights_path(weights))
    return name[:-len(tag) - 1] if dropped else name


def check_candidates(specs: list) -> None:
    """Each candidate's name and weights as far as known without loading them (an unknown name, a missing
    file, a sidecar of another model): refused before the first extraction, not after minutes of it."""
    from ..extraction import backbones as bb

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 'no sidecar': extract says it once, later
        for name, weights in specs:
            bb.load_preprocessing(name, weights)


def check_loadable(specs: list) -> None:
    """What only loading tells (``backbones.check_loadable``), for the candidates still to extract: both failed
    once the candidates before were extracted. A candidate whose cache is there needs neither: its cache key holds
    the file's sha256 (the same bytes loaded once to make it) or the library's weights name, and the
    cross-validation reads rows only (an offline run was refused weights its caches did not need)."""
    from ..extraction import backbones as bb

    for name, weights in specs:
        try:
            bb.check_loadable(name, weights)
        except PipelineError as e:  # offline: a local file is given as the candidate's weights, not --weights
            said = f"pass {option_text('weights', Placeholder('PATH'))}"  # load_backbone's, in the caller's terms
            raise PipelineError(str(e).replace(said, f"give {_backbones(name + '=PATH')}")) from None


def _extract(cfg: ChooseBackboneConfig, backbone: str, weights: str, n: int,
             hit_only: bool = False) -> Optional[ExtractResult]:
    from ..extraction.extract import ExtractConfig, extract

    return extract(ExtractConfig(data=cfg.data, n=n, backbone=backbone, weights=weights, seed=cfg.seed,
                                 cache_dir=cfg.cache_dir, device=cfg.device, precision=cfg.precision,
                                 batch_size=cfg.batch_size, workers=cfg.workers, command=cfg.command), hit_only)


def sample_size(cfg: ChooseBackboneConfig) -> int:
    """The --n every candidate extracts: 0 (all, the cache a plain extract of the folder makes) when the
    folder holds no more than --n photos. Too few photos of a class for the folds is refused here, before
    any extraction (and again on the rows extracted, which may have lost unreadable files)."""
    from ..data.folders import list_image_folder

    listing = list_image_folder(cfg.data)
    n = 0 if not cfg.n or cfg.n >= len(listing.files) else cfg.n
    smallest = int(np.bincount(listing.labels, minlength=len(listing.classes)).min())
    check_folds(cfg.folds, smallest if not n else int(smallest * n / len(listing.files)))
    return n


def check_folds(folds: int, smallest: int) -> None:
    """Enough photos in the smallest class for the folds, and for the default head's own cross-validation
    inside each fold's training part (the photos a stratified fold leaves there: at least s - ceil(s / folds))."""
    if smallest < folds:
        raise UsageError(f"{folds}-fold cross-validation needs at least {folds} photos of every class; the "
                         f"smallest class has {smallest} (fewer folds, or more photos)")
    inner = FitHeadConfig.folds
    if smallest - math.ceil(smallest / folds) < inner:
        need = next(s for s in itertools.count(smallest) if s - math.ceil(s / folds) >= inner)
        better = [k for k in range(folds + 1, smallest + 1) if smallest - math.ceil(smallest / k) >= inner]
        raise UsageError(f"the default head cross-validates {inner}-fold inside each training part, which with "
                         f"{option_text('folds', folds)} holds {smallest - math.ceil(smallest / folds)} photos of the "
                         f"smallest class ({smallest} photos); every class needs at least {need} photos"
                         + (f" (or pass {option_text('folds', better[0])})" if better else ""))


def extraction_rate(cache: FeatureCache, result: ExtractResult) -> Optional[float]:
    """Images a second this machine extracted the cache at, as the cache recorded it (the same figure on a
    later hit), else as this run computed it; None for a cache made before rates were kept."""
    recorded = cache.attrs.get("extract_rate")
    if recorded:
        return float(json.loads(recorded)["img_per_s"])
    return float(result.img_per_s) if not result.hit and result.computed else None


def corrected_se(scores, test_share: float) -> float:
    """The standard error of the mean of repeated k-fold scores, Nadeau and Bengio's corrected form:
    sqrt(var x (1/J + n_test/n_train)); NaN (n/a, null in JSON) where no spread can be estimated: one score,
    or every score alike (each fold 100 % on a small or easy set, where accuracy moves in steps of one photo:
    a '± 0.0' claimed a certainty the folds cannot show)."""
    scores = np.asarray(scores, np.float64)
    if len(scores) < 2 or np.ptp(scores) == 0:
        return math.nan
    return float(math.sqrt(scores.var(ddof=1) * (1 / len(scores) + test_share / (1 - test_share))))


@contextlib.contextmanager
def _fold_workers():
    """Folds fitted side by side, one per core, each on one BLAS and torch thread (set once around them all,
    so no fit's own limit can lift another's: the same numbers as one fold at a time), and fit-head's line
    per fit (which setting won), noise a few dozen times over, left out."""
    import torch
    from threadpoolctl import threadpool_limits

    logger = logging.getLogger("pipeline.heads.fit_head")
    level, threads = logger.level, torch.get_num_threads()
    logger.setLevel(logging.WARNING)
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1), ThreadPoolExecutor(max(1, min(os.cpu_count() or 1, 8))) as pool:
            yield pool
    finally:
        torch.set_num_threads(threads)
        logger.setLevel(level)


def cross_validate(rows, order: np.ndarray, folds: list, seed: int, device, name: str = "") -> tuple[list, list]:
    """(accuracy, log-loss) per fold of fit-head's default head on ``rows`` (a cache or fused rows); ``order``
    maps the reference rows the folds index to ``rows``'s rows. One progress bar over the folds (``name``'s),
    the fits' own bars and lines (one per fold thread, interleaved) left out."""
    from ..devices import resolve_device
    from ..progress import Advancing, progress, quiet
    from .fit_head import fit_on_rows

    cfg = FitHeadConfig(seed=seed, calibrate="none", unknown_rows=0, device=device)  # the default head, bare
    if isinstance(rows, FusedRows):
        cfg = rows.head_config(cfg)
    dev = resolve_device(device)
    bar = progress(total=len(folds), desc=f"choose-backbone: {name or 'cross-validation'}", unit="fold")
    with _fold_workers() as pool, quiet():
        fits = list(Advancing(pool.map(lambda fold: fit_on_rows(cfg, rows, order[fold[0]], order[fold[1]], dev),
                                    folds), bar))
    return [f.val["acc"] for f in fits], [f.val["loss"] for f in fits]


def _fused_rate(rates: list) -> Optional[float]:
    return None if any(r is None or r <= 0 for r in rates) else 1.0 / sum(1.0 / r for r in rates)


def choose_backbone(cfg: ChooseBackboneConfig) -> BackboneChoice:
    """Extract the sample with each candidate, cross-validate the default head on each and on their fusions,
    and say which is best and which is the fastest within noise of it."""
    from sklearn.model_selection import RepeatedStratifiedKFold

    validate(cfg)
    specs = [parse_candidate(b) for b in cfg.backbones]
    n = sample_size(cfg)
    t0 = time.time()
    made = [_extract(cfg, name, weights, n, hit_only=True) for name, weights in specs]  # None: to extract
    check_loadable([spec for spec, hit in zip(specs, made) if hit is None])  # before the first extraction
    for i, (name, weights) in enumerate(specs):
        log.info("choose-backbone: the sample's features with %s (%s): %s", name, weights,
                 "read from its cache" if made[i] else "extracting")
        made[i] = made[i] or _extract(cfg, name, weights, n)
    extract_seconds = time.time() - t0
    # other spellings of the same weights (a copy of the file, a name for the same download): one cache
    check_distinct(cfg.backbones, [str(Path(r.cache).resolve()) for r in made])
    caches = []
    try:
        for r in made:
            caches.append(FeatureCache(r.cache))
        ref = caches[0]
        orders = [np.arange(ref.n)] + [match_rows(ref, c) for c in caches[1:]]  # the same photos in every cache
        labels = ref.labels
        check_folds(cfg.folds, int(np.bincount(labels, minlength=len(ref.classes)).min()))
        folds = list(RepeatedStratifiedKFold(n_splits=cfg.folds, n_repeats=cfg.repeats, random_state=cfg.seed)
                     .split(np.zeros(len(labels)), labels))
        rates = [extraction_rate(c, r) for c, r in zip(caches, made)]
        sizes = [c.info.size_bytes / c.n * 1000 / 1e6 for c in caches]
        names = candidate_names(specs, cfg.backbones)
        t1 = time.time()
        found = []
        for i, c in enumerate(caches):
            log.info("choose-backbone: cross-validating the default head on %s (%d folds)", names[i], len(folds))
            acc, loss = cross_validate(c, orders[i], folds, cfg.seed, cfg.device, names[i])
            found.append(_candidate(names[i], [cfg.backbones[i]], [str(c.path)], c.feature_shape[0],
                                    acc, loss, cfg.folds, rates[i], sizes[i]))
        if cfg.fused:
            for k in range(2, len(caches) + 1):
                for combo in itertools.combinations(range(len(caches)), k):
                    label = "+".join(names[i] for i in combo)
                    log.info("choose-backbone: cross-validating the default head on %s's fused features", label)
                    with FusedRows([caches[i].path for i in combo]) as fused:
                        acc, loss = cross_validate(fused, orders[combo[0]], folds, cfg.seed, cfg.device, label)
                        found.append(_candidate(label, [cfg.backbones[i] for i in combo],
                                                [str(caches[i].path) for i in combo], fused.feature_shape[0], acc,
                                                loss, cfg.folds, _fused_rate([rates[i] for i in combo]),
                                                sum(sizes[i] for i in combo)))
        cv_seconds = time.time() - t1
    finally:
        for c in caches:
            c.close()
    return _decide(cfg, found, len(labels), len(ref.classes), extract_seconds, cv_seconds)


def _candidate(name, backbones, caches, features, acc, loss, folds, rate, mb) -> Candidate:
    share = 1 / folds
    return Candidate(name, backbones, caches, int(features), float(np.mean(acc)), corrected_se(acc, share),
                     float(np.mean(loss)), corrected_se(loss, share), [float(a) for a in acc],
                     [float(x) for x in loss], rate, float(mb))


def _decide(cfg, found: list, rows: int, classes: int, extract_seconds: float, cv_seconds: float) -> BackboneChoice:
    """The best (highest mean accuracy; the lower log-loss on a tie), each one's paired difference from it,
    and the fastest of those within noise."""
    best = max(found, key=lambda c: (c.acc, -c.log_loss))
    for c in found:
        d = np.asarray(best.fold_acc) - np.asarray(c.fold_acc)
        c.diff, c.diff_se = float(d.mean()), 0.0 if c is best else corrected_se(d, 1 / cfg.folds)
        # the same difference in every fold (no spread): within noise only when it is none
        c.within_noise = c is best or c.diff <= NOISE_SES * (0.0 if math.isnan(c.diff_se) else c.diff_se)
    close = [c for c in found if c.within_noise]
    timed = [c for c in close if c.img_per_s]
    fastest = max(timed, key=lambda c: c.img_per_s) if timed else best
    found = sorted(found, key=lambda c: (-c.acc, c.log_loss))
    choice = BackboneChoice(cfg.data, rows, classes, cfg.folds, cfg.repeats, found, best.name, fastest.name,
                            [c.name for c in close], extract_seconds, cv_seconds)
    choice.note = recommendation(choice, best, fastest)
    return choice


def plus_minus(se: float, spec: str) -> str:
    """A standard error as ``spec`` formats it, or 'n/a' as wide where it cannot be estimated (``corrected_se``)."""
    text = format(se, spec)
    return f"{'n/a':>{len(text)}}" if math.isnan(se) else text


def recommendation(choice: BackboneChoice, best: Candidate, fastest: Candidate) -> str:
    """The recommendation in words, honest about what these photos can tell apart."""
    one = 100.0 / choice.rows
    lines = [f"best: {best.name}, {100 * best.acc:.1f} ± {plus_minus(100 * best.acc_se, '.1f')} % cross-validated "
             "accuracy on "
             f"{choice.rows} photos (one photo = {one:.2f} points)."]
    others = [n for n in choice.indistinguishable if n != best.name]
    if len(choice.candidates) == 1:
        again = "--backbone again" if _backbones() == "--backbone" else "in backbones"
        lines.append(f"The only candidate: name two or more ({again}) to compare them.")
        return " ".join(lines)
    if not others:
        steady = all(math.isnan(c.diff_se) for c in choice.candidates if c.name != best.name)
        lines.append(f"Every other candidate scores lower in every fold, by the same amount: use {best.name}." if steady
                     else f"Every other candidate scores lower by more than {NOISE_SES:g} standard errors of the "
                     f"paired difference: use {best.name}.")
        return " ".join(lines)
    lines.append(f"Within noise of it (paired difference under {NOISE_SES:g} standard errors): {', '.join(others)}; "
                 "on these photos they are indistinguishable from the best.")
    if fastest is not best and best.img_per_s:
        lines.append(f"Recommended: {fastest.name}, the fastest of them ({fastest.img_per_s:.1f} img/s, "
                     f"{fastest.img_per_s / best.img_per_s:.1f}x {best.name}'s); more photos would tell them apart.")
    elif fastest is not best:  # the best's rate unknown: not 'also the fastest', which it may not be
        lines.append(f"Recommended: {fastest.name}, the fastest of those whose rate is known ({fastest.img_per_s:.1f} "
                     f"img/s; {best.name}'s rate is unknown); more photos would tell them apart.")
    else:
        lines.append(f"Recommended: {fastest.name}" + (", also the fastest of them." if fastest.img_per_s else "."))
    return " ".join(lines)
