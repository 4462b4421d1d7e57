"""The evaluate stage: a trained model's accuracy, per-class precision/recall/F1, confusion matrix
and the images it gets most confidently wrong.

Two steps: a *predictor* turns (checkpoint, cache or folder) into ``Predictions`` (image paths,
true labels, log-probabilities), then ``summarize`` and the pictures work on those alone. A
predictor is looked up by the checkpoint's ``kind`` and the source (``cache`` or ``data``), so a
new kind of model (train/finetune's model.pt) plugs in with ``register_predictor``; a folder goes
through ``predict.iter_log_proba``, the loop predict uses too, so both give the same numbers.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from ..cache.feature_cache import CacheBusy, CacheError, FeatureCache
from ..cache.provenance import ROW_FEATURES, Preprocessing, check_cache_fits
from ..config import EvaluateConfig, Placeholder, check_config, option_text, option_value
from ..data.folders import (ImageLoadError, class_index, list_image_folder, load_rgb, near_miss_text, thumbnail,
                            unknown_classes)
from ..devices import resolve_device
from ..errors import UsageError
from ..files import check_output, write_json, writing
from ..heads.cache_views import cache_classes_to_model, head_scores
from ..heads.calibration import before_after, reliability_bins, without_temperature
from ..heads.epoch_loop import split_indices
from ..heads.feature_views import is_pooled
from ..heads.heatmaps import cache_head_maps, normalised, overlay
from ..heads.fused_views import open_head_rows
from ..models.whole_models import (
    cache_reads,
    checkpoint_reads,
    explaining,
    has_map,
    head_from_checkpoint,
    map_grid,
    model_from_checkpoint,
    network,
    read_checkpoint,
    split_extras,
    split_maps,
)
from ..models.predict import ImageOutputs, iter_log_proba, read_images
from ..progress import progress
from ..runs.figures import confusion_matrix_figure, gallery_figure, reliability_figure, save
from ..runs.run_folders import finish_run, publish_run_dir, staged_run

log = logging.getLogger(__name__)


@dataclass
class Predictions:
    """What a model said about each image: all the evaluation needs."""

    classes: list  # class names, the model's order
    root: Path  # image paths are relative to this folder
    paths: list  # one per row
    labels: np.ndarray  # (N,) true class indices; -1 for photos of none of the classes (a foreign folder)
    logp: np.ndarray  # (N, classes) log-probabilities (calibrated: at the head's temperature)
    source: str  # what was evaluated, in words
    cache_fingerprint: str = ""  # of the cache evaluated on, if any
    ood: Optional[np.ndarray] = None  # (N,) unknown scores, when the head has them
    threshold: Optional[float] = None  # above it a photo counts as unknown
    temperature: float = 1.0  # the head's; 1 for a head fitted before calibration existed
    # row indices -> their predicted class's heatmaps ((k, H, W) in [0, 1]), and the preprocessing that made the
    # photos the maps cover; None where there are none (a pooled cache, fused features)
    heatmaps: Optional[Callable[[np.ndarray], np.ndarray]] = None
    preprocessing: Optional[dict] = None
    split: Optional[str] = None  # the cache rows scored: 'val' or 'all' (--split auto decided); None on --data

    @property
    def foreign(self) -> bool:
        return bool(len(self.labels)) and bool((self.labels < 0).all())


Predictor = Callable[[str, dict, EvaluateConfig], Predictions]
PREDICTORS: dict[tuple[str, str], Predictor] = {}


def register_predictor(kind: str, source: str, fn: Predictor) -> None:
    """Make checkpoints of ``kind`` evaluable on ``source`` ('cache' or 'data')."""
    PREDICTORS[(kind, source)] = fn


# -- predictors ----------------------------------------------------------------------------------
def _head(model_path: str, ckpt: dict, device):
    return head_from_checkpoint(ckpt, ckpt["state_dict"], model_path).to(device).eval()


def _trust(head) -> dict:
    """The Predictions fields a head's calibration and unknown score fill in."""
    return {"temperature": head.temperature_used, "threshold": head.threshold_used}


def head_on_cache(model_path: str, ckpt: dict, cfg: EvaluateConfig, labelled: bool = True) -> Predictions:
    """A fit-head checkpoint on cached features: its validation split, or all rows. A cache none of whose
    classes is the model's (photos of something else) is scored as ``--data`` scores such a folder: labels -1,
    only the share flagged unknown measured. ``labelled=False`` (predictions, no score: the API's ``predict``,
    ``predict_proba``, ``unknown_score``): the cache's classes are not checked, a row of a class the model does
    not know has label -1."""

    device = resolve_device(cfg.device)
    with open_head_rows(ckpt, cfg.cache) as cache:  # one cache, or a fused head's caches fused as then
        path = cache.path
        if not cfg.cache:
            log.info("using the cache the model was trained on: %s (%d rows, %s, created %s); %s picks another",
                     path, cache.n, cache.attrs["backbone"], cache.attrs["created"], option_text("cache"))
        check_cache_fits(ckpt, cache, ROW_FEATURES)
        head = _head(model_path, ckpt, device)
        to_model = np.array([class_index(ckpt["classes"], c) for c in cache.classes], dtype=np.int64)
        if not labelled or is_foreign(cache.classes, ckpt["classes"], head.has_unknown):
            if labelled:
                log.info("none of the classes of %s is the model's: measuring how many of its rows are flagged "
                         "unknown", path)
        else:
            to_model = cache_classes_to_model(ckpt["classes"], cache)
        own = cache.attrs["fingerprint"] == ckpt["cache_fingerprint"]
        split = cfg.split if cfg.split != "auto" else "val" if own else "all"  # a held-out cache: a val slice of
        seen = ""  # said where the figures are read too (stdout, --json's source), not only in the warning
        if split == "val":  # it scored 50 of its 400 rows by default
            c = ckpt["config"]
            rows = split_indices(cache.labels, c["val_fraction"], c["seed"])[1]
            if not own:  # first: the refit note is of its own cache
                seen = warn_val_of_another_cache(ckpt, cache, rows)
            elif c.get("refit") and ckpt.get("tuning"):
                refit = "fit-head --refit" if option_text("refit") == "--refit" else "refit=True"  # Head.score's
                log.warning("the head was refitted on every row of its cache, the validation rows included "
                            "(%s): these 'val' rows are rows it saw; fit-head's own val figures "
                            "came from the fit without them. Use %s on a held-out cache", refit,
                            option_text("split", "all"))
                seen = ", rows the refitted head saw"
        else:
            rows = np.arange(cache.n)
            if own:  # as --data on its training folder is
                log.warning("%s is the cache the model was trained on: %s scores its training rows too, which "
                            "flatters every figure; use it on a held-out cache", path, option_text("split", "all"))
                seen = ", the head's training rows among them"
            elif not ckpt.get("fused"):
                seen = warn_if_cache_seen(ckpt, cache)
        logp, ood = head_scores(head, cache, rows, device, cfg.block_rows)
        rows = np.sort(rows)
        paths = cache.paths
        spatial = not ckpt.get("fused") and not is_pooled(cache.feature_shape)
        return Predictions(list(ckpt["classes"]), Path(cache.attrs["data_root"]), [paths[i] for i in rows],
                           to_model[cache.labels[rows]], logp, f"{split} rows of {path}{seen}",
                           cache.attrs["fingerprint"],
                           ood=ood, **_trust(head), heatmaps=cached_heatmaps(head, path, rows) if spatial else None,
                           preprocessing=ckpt["preprocessing"] if spatial else None, split=split)


def cached_heatmaps(head, path, rows: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """Row indices (of ``rows``, the cache rows evaluated) -> their heatmaps, from the cached maps: the head
    alone runs again on those few rows (the gallery's), never the backbone."""

    def heatmaps(picked: np.ndarray) -> np.ndarray:
        wanted = rows[np.asarray(picked, np.int64)]
        unique = np.unique(wanted)  # the maps come in sorted row order
        with FeatureCache(path) as cache:
            maps = cache_head_maps(head, cache, unique)
        return normalised(maps[np.searchsorted(unique, wanted)])

    return heatmaps


def predict_folder(data: str, classes: list, transform, model, cfg: EvaluateConfig, head=None,
                   ckpt: Optional[dict] = None) -> Predictions:
    """Every decodable image of an ImageFolder through ``model`` (an ``inference.Inference``; of a
    ``WithExtras`` model when ``head`` is given, whose unknown score and temperature then come along).
    ``ckpt``: the checkpoint of ``cfg.model``, whose training photos among the folder's are said
    (``warn_if_trained_on``), in a warning and in the source of the figures.

    The folder's classes must be among the model's ``classes`` (matched by name), or none of them (a
    folder of foreign photos: then only the share flagged unknown is measured); unreadable images are
    skipped with a warning.
    """

    listing = list_image_folder(data, min_classes=1)
    foreign = check_folder_classes(data, listing.classes, classes, head is not None and head.has_unknown)
    if foreign:
        log.info("none of the classes of %s is the model's: measuring how many of its photos are flagged unknown",
                 data)
    seen = warn_if_trained_on(cfg.model, ckpt, data, listing) if ckpt is not None and not foreign else ""
    to_model = [-1 if foreign else class_index(classes, c) for c in listing.classes]
    items = read_images([(f.path, to_model[f.label]) for f in listing.files], transform, model, cfg.batch_size,
                        cfg.workers, listing.root)
    got = ImageOutputs().collect(progress(iter_log_proba(model, items, cfg.batch_size), total=len(listing.files),
                                          unit="img", desc="evaluate"))
    out, labels = got.arrays(f"no image in {data} could be decoded")
    got.warn_first_frames()
    logp, ood = split_extras(out, len(classes))
    trust = _trust(head) if head is not None else {}
    return Predictions(list(classes), listing.root, got.paths, labels, logp,
                       f"images of {data}{seen}", ood=ood if trust.get("threshold") is not None else None, **trust)


def check_folder_classes(data: str, folder_classes: list, classes: list, has_unknown: bool) -> bool:
    """Whether the folder is of photos of none of the model's ``classes`` (foreign: scored by its unknown score);
    a class of the folder the model does not know is refused otherwise, one line naming them."""
    foreign = is_foreign(folder_classes, classes, has_unknown)
    unknown = unknown_classes(folder_classes, classes)
    if unknown and not foreign:
        raise UsageError(f"data folder {data!r} has classes {unknown} the model does not know; "
                         f"its classes: {', '.join(classes)}{near_miss_text(unknown, classes)}")
    return foreign


def is_foreign(theirs: list, classes: list, has_unknown: bool) -> bool:
    """Whether a folder's (or cache's) classes ``theirs`` are none of the model's ``classes``, none of them one of
    the model's but for case or spaces ('Cat' for 'cat': refused, naming the two), and the model has an unknown
    score to measure them by."""
    unknown = unknown_classes(theirs, classes)
    return has_unknown and len(unknown) == len(theirs) and not near_miss_text(unknown, classes)


def model_on_folder(model_path: str, ckpt: dict, cfg: EvaluateConfig) -> Predictions:
    """Any checkpoint (fit-head head + its backbone, or a train/finetune model) on raw images."""

    lm = model_from_checkpoint(ckpt, model_path, cfg.weights)
    model = network(lm, cfg.device, cfg.precision)
    pred = predict_folder(cfg.data, lm.classes, lm.transform, model, cfg, lm.model.head, ckpt)
    if has_map(lm):  # fused features: no one map to explain; a 1 x 1 map (PiT's class token): no place in it
        pred.heatmaps, pred.preprocessing = photo_heatmaps(lm, model, pred, cfg), lm.info["preprocessing"]
    return pred


def photo_heatmaps(lm, first, pred: Predictions, cfg: EvaluateConfig) -> Callable[[np.ndarray], np.ndarray]:
    """Row indices -> their heatmaps: those photos (the gallery's few) once more through the network, now with
    the head's gradient (computing every photo's map in the first pass would cost the head's gradient on
    all of them for a dozen maps); a photo no longer readable gets an empty map."""

    def heatmaps(picked: np.ndarray) -> np.ndarray:
        grid = map_grid(lm)
        model = explaining(first)  # the first pass's network, device and precision
        files = [(pred.paths[i], -1) for i in np.asarray(picked, np.int64)]
        items = read_images(files, lm.transform, model, cfg.batch_size, 0, pred.root)
        maps = [split_maps(out, grid)[1] if out is not None else np.zeros(grid, np.float32)
                for _, out in iter_log_proba(model, items, cfg.batch_size)]
        return normalised(np.array(maps, np.float32).reshape(len(files), *grid))

    return heatmaps


register_predictor("fit-head", "cache", head_on_cache)
for _kind in ("fit-head", "train", "finetune"):
    register_predictor(_kind, "data", model_on_folder)


# -- the report ----------------------------------------------------------------------------------
def unknown_report(pred: Predictions) -> dict:
    """How many photos the unknown score flags (none when the model has no unknown score)."""
    if pred.ood is None:
        return {"unknown": None}
    flagged = pred.ood > pred.threshold
    return {"unknown": {"threshold": pred.threshold, "flagged": int(flagged.sum()),
                        "share": float(flagged.mean()), "median_score": float(np.median(pred.ood))}}


def summarize_foreign(pred: Predictions) -> dict:
    """Photos of none of the model's classes: the share flagged unknown, and what the rest were called."""
    best = pred.logp.argmax(1)
    top = np.exp(pred.logp.max(1))
    return {"rows": int(len(best)), "foreign": True, "classes": list(pred.classes), **unknown_report(pred),
            "called": {c: int((best == i).sum()) for i, c in enumerate(pred.classes)},
            "median_top_probability": float(np.median(top))}


def summarize(pred: Predictions, top_k: int) -> dict:
    """Accuracy, mean NLL, per-class precision/recall/F1, confusion counts, the most confident errors,
    calibration before and after the temperature, and the share flagged unknown."""

    if pred.foreign:
        return summarize_foreign(pred)
    k = len(pred.classes)
    y, p = pred.labels, pred.logp.argmax(1)
    precision, recall, f1, support = precision_recall_fscore_support(y, p, labels=range(k), zero_division=0)
    # macro F1 over the classes the photos hold or were called (scikit-learn's own set): a class of the model
    # that neither is nor is called anywhere here (a test folder of some classes) has no F1 to average
    present = (support > 0) | (np.bincount(p, minlength=k) > 0)
    wrong = np.flatnonzero(p != y)
    conf = np.exp(pred.logp[wrong, p[wrong]])
    worst = wrong[np.argsort(-conf, kind="stable")[:top_k]]
    return {
        "rows": int(len(y)), "accuracy": float((p == y).mean()),
        "loss": float(-pred.logp[np.arange(len(y)), y].mean()) + 0.0, "macro_f1": float(f1[present].mean()),
        "per_class": {c: {**_scored(present[i], precision=precision[i], recall=recall[i], f1=f1[i]),
                          "support": int(support[i])} for i, c in enumerate(pred.classes)},
        "classes": list(pred.classes),
        "confusion_matrix": confusion_matrix(y, p, labels=range(k)).tolist(),
        "wrong": [{"path": pred.paths[i], "true": pred.classes[y[i]], "pred": pred.classes[p[i]],
                   "prob": float(np.exp(pred.logp[i, p[i]])), **heat}
                  for i, heat in zip(worst, _heatmaps(pred, worst))],
        **({"preprocessing": pred.preprocessing} if pred.heatmaps is not None else {}),
        "errors": int(len(wrong)),
        "calibration": {**before_after(pred.logp, y, pred.temperature),
                        "bins": reliability_bins(pred.logp, y),
                        "bins_before": reliability_bins(without_temperature(pred.logp, pred.temperature), y)},
        **unknown_report(pred),
    }


def _scored(present: bool, **figures) -> dict:
    """A class's precision, recall and F1, or None each for a class neither in the photos nor called (a folder
    of some of the model's classes): it has none, and the 0s scikit-learn puts there read as a class always
    missed, beside a macro F1 that leaves it out."""
    return {k: float(v) if present else None for k, v in figures.items()}


def _heatmaps(pred: Predictions, rows: np.ndarray) -> list[dict]:
    """{'heatmap': H x W nested list in [0, 1]} of each row's predicted class (kept in metrics.json, so the
    gallery can be drawn from the result alone), or {} each when the predictions have none."""
    if pred.heatmaps is None:
        return [{} for _ in rows]
    return [{"heatmap": np.round(m, 3).tolist()} for m in pred.heatmaps(rows)]


def _gallery_image(root: Path, item: dict, transform):
    """A gallery cell: the photo under its heatmap (as the model saw it: resized, cropped), or its thumbnail."""
    if transform is None or "heatmap" not in item:
        return _thumbnail(root / item["path"])
    try:
        x = transform(load_rgb(root / item["path"]))
    except (ImageLoadError, OSError):
        log.warning("gallery: cannot show %s (moved, or no longer readable)", root / item["path"])
        return None
    return overlay(transform, x, np.asarray(item["heatmap"], np.float32))


def _thumbnail(path: Path, size: int = 256):
    im = thumbnail(path, size)
    if im is None:
        log.warning("gallery: cannot show %s (moved, or no longer readable)", path)
    return im


@dataclass(frozen=True)
class EvaluateResult:
    """evaluate's answer: one model's scores on a cache's rows or a folder's photos, and where its pictures and
    metrics.json went. On photos of none of its classes (``foreign``) only the share flagged unknown and what
    they were called: the scores and pictures are None."""

    rows: int
    classes: list
    unknown: Optional[dict]  # how many photos the unknown score flags; None for a model without one
    model: str
    kind: str
    source: str  # the rows scored, in words (the cache's validation rows, a folder)
    split: str
    backbone: str
    cache_fingerprint: Optional[str]
    data_root: str  # where the photos are: the gallery reads them from there
    run_dir: str
    foreign: bool = False  # photos of none of the model's classes: only unknown, called, median_top_probability
    accuracy: Optional[float] = None
    loss: Optional[float] = None
    macro_f1: Optional[float] = None
    per_class: Optional[dict] = None
    confusion_matrix: Optional[list] = None
    wrong: Optional[list] = None  # the most confidently wrong photos, with their heatmaps where there are any
    preprocessing: Optional[dict] = None  # how the model saw the photos: the gallery lays the heatmaps over them
    errors: Optional[int] = None
    calibration: Optional[dict] = None
    called: Optional[dict] = None  # foreign photos: how many each class took
    median_top_probability: Optional[float] = None
    confusion_png: Optional[str] = None
    gallery_png: Optional[str] = None
    reliability_png: Optional[str] = None
    figures: dict = field(default_factory=dict)  # the API's matplotlib Figures (evaluate_model(figures=True))

    #: the keys of --json and metrics.json, in their order; those of OPTIONAL only where they have a value
    KEYS = ("rows", "foreign", "accuracy", "loss", "macro_f1", "per_class", "classes", "confusion_matrix", "wrong",
            "preprocessing", "errors", "calibration", "unknown", "called", "median_top_probability", "model", "kind",
            "source", "split", "backbone", "cache_fingerprint", "data_root", "run_dir", "confusion_png",
            "gallery_png", "reliability_png")
    OPTIONAL = ("foreign", "accuracy", "loss", "macro_f1", "per_class", "confusion_matrix", "wrong", "preprocessing",
                "errors", "calibration", "called", "median_top_probability", "confusion_png", "gallery_png",
                "reliability_png")

    def to_dict(self) -> dict:
        """The answer as --json prints it (metrics.json's keys): a foreign folder's without the scores."""
        return {k: getattr(self, k) for k in self.KEYS
                if k not in self.OPTIONAL or not (getattr(self, k) is None or getattr(self, k) is False)}


def check_runs_dir(cfg: EvaluateConfig, ckpt: dict) -> None:
    """--runs-dir refused where its pictures would replace or join what is evaluated: the model's cache and
    photos, --cache's, --data (a picture in a class folder is one more training photo)."""
    files, folders = checkpoint_reads(ckpt, cfg.model, cfg.weights)
    more = cache_reads(cfg.cache, "--cache") if cfg.cache else ([], [])
    check_output(cfg.runs_dir, [*files, *more[0]], [*folders, *more[1], (cfg.data, "--data")], what="--runs-dir",
                 folder=True)


def evaluate(cfg: EvaluateConfig) -> EvaluateResult:
    """Evaluate one checkpoint; write confusion.png, gallery.png (where an image is misclassified),
    reliability.png and metrics.json to a run folder."""

    check_config(cfg)
    if cfg.cache and cfg.data:
        raise UsageError(f"pass {option_text('cache')} or {option_text('data')}, not both")
    if cfg.data and cfg.split == "val":  # --data scores every photo of the folder: 'val' would be a false label
        raise UsageError(f"{option_text('split', 'val')} picks rows of a cache; {option_value('data', cfg.data)} "
                         "scores "
                         f"every photo of the folder (use {option_text('split', 'auto', 'all')}, or "
                         f"{option_text('cache')} with {option_text('split', 'val')})")
    ckpt = read_checkpoint(cfg.model)
    check_runs_dir(cfg, ckpt)
    source = "data" if cfg.data else "cache"
    predictor = PREDICTORS.get((ckpt["kind"], source))
    if predictor is None and not (cfg.cache or cfg.data):  # nothing named: say what this checkpoint needs
        raise UsageError(f"a {ckpt['kind']!r} checkpoint is evaluated on photos: pass "
                         f"{option_text('data', Placeholder('DIR'))}")
    if predictor is None:
        known = sorted(f"{k} on {option_text(s)}" for k, s in PREDICTORS)
        raise UsageError(f"cannot evaluate a {ckpt['kind']!r} checkpoint on {option_text(source)}; known: "
                         f"{', '.join(known)}")
    if cfg.data:  # a class it does not know is refused first: before the model is loaded, and any warning of its
        listing = list_image_folder(cfg.data, min_classes=1)  # overlap with training
        check_folder_classes(cfg.data, listing.classes, list(ckpt["classes"]),
                             bool((ckpt.get("head") or {}).get("known_rows")))
    pred = predictor(cfg.model, ckpt, cfg)  # on --data, it says which photos the model was trained on
    result = summarize(pred, cfg.top_k)
    result.update({"model": cfg.model, "kind": ckpt["kind"], "source": pred.source, "split": pred.split or cfg.split,
                   "backbone": ckpt.get("backbone", ""), "cache_fingerprint": pred.cache_fingerprint,
                   "data_root": str(pred.root)})
    pictures = {}
    # the run folder appears with every file in it (a kill -9 while the pictures were drawn left half of them)
    with staged_run(cfg.runs_dir, "evaluate") as staged:
        if not pred.foreign:
            with writing(staged):
                pictures = _pictures(pred, result, staged)

        def name_it(d: Path) -> None:  # metrics.json names the folder as it is about to be called
            result.update(run_dir=str(d), **{f"{name}_png": str(d / p.name) for name, p in pictures.items()})
            write_json(staged / "metrics.json", result)

        out_dir = publish_run_dir(staged, before=name_it)
    pictures = {name: out_dir / p.name for name, p in pictures.items()}
    keys = ("rows",) if pred.foreign else ("accuracy", "loss", "macro_f1", "rows")
    finish_run(out_dir, cfg.runs_dir, "evaluate", None, list(pictures.values()),
               cache_fingerprint=pred.cache_fingerprint, backbone=result["backbone"], params=asdict(cfg),
               metrics={**{k: result[k] for k in keys},
                        **({"unknown_share": result["unknown"]["share"]} if result["unknown"] else {}),
                        **({"ece": result["calibration"]["after"]["ece"]} if "calibration" in result else {})})
    return EvaluateResult(**result)


def warn_if_trained_on(model: str, ckpt: dict, data: str, listing=None) -> str:
    """--data holding photos the model was trained on scores them too, which flatters every figure. The folder it
    was trained on: a finetuned model read accuracy 1.000 on dogbreeds20 with nothing said. Copies of its photos
    anywhere, found by content (``models.trained_on``: a head's from its cache's digests, as fit-head's --test-data
    finds them; a train or finetune model's from the record its model.pt keeps): a copy of four of dogbreeds20's
    classes read 1.000 on 50 photos, nothing said. Where neither is there, a note says nobody can tell. Returns
    what the source of the figures adds (``warn_seen``'s), '' where nothing was found."""
    from ..models import trained_on

    trained = ckpt.get("data_root") or (ckpt.get("config") or {}).get("data") or ""
    if trained and Path(trained).resolve() == Path(data).resolve():
        log.warning("%s is the folder the model was trained on: its training images are scored too, which "
                    "flatters every figure; evaluate a folder of photos it never saw", data)
        return ", the model's training images among them"
    record = trained_on.of_checkpoint(ckpt)
    if record is None:
        why = (f"its cache {ckpt.get('cache')} is gone or cannot be read" if ckpt["kind"] == "fit-head" else
               f"{model} was written before train and finetune kept a record of their photos")
        log.info("cannot tell whether photos of %s are ones the model was trained on (%s): any such photo is "
                 "scored too, which would flatter every figure", data, why)
        return ""
    seen = trained_on.images_in(listing or list_image_folder(data, min_classes=1), record)
    return warn_seen(sorted(seen), data, "image")


def warn_seen(seen: list, where, unit: str) -> str:
    """The one warning of ``seen``, images of a folder or rows of a cache (``unit``) ``where`` with the content of
    photos the model was fitted on (nothing when there are none); returns what the figures' source adds."""
    if not seen:
        return ""
    log.warning("%s of %s %s the same content as images the head was fitted on (e.g. %s): %s scored too, "
                "which flatters every figure", f"1 {unit}" if len(seen) == 1 else f"{len(seen)} {unit}s", where,
                "has" if len(seen) == 1 else "have", ", ".join(seen[:3]), "it is" if len(seen) == 1 else "they are")
    return f", {len(seen)} of them with the content of images the head was fitted on"


def cache_rows_seen(ckpt: dict, cache, rows=None) -> tuple[Optional[list], str]:
    """(the paths of ``cache``'s ``rows``, all by default, whose content is a photo the head was fitted on, sorted;
    '') from the digests of the head's own cache (``fit_head.overlap``'s rule), or (None, why nobody can tell):
    the head's cache gone, busy or unreadable."""
    from ..heads.fit_head import overlap
    from ..models.train import refitted

    mine = ckpt.get("cache") or ""
    try:
        with FeatureCache(mine) as own:
            train_rows, val_rows = split_indices(own.labels, ckpt["config"]["val_fraction"], ckpt["config"]["seed"])
            return overlap(own, np.concatenate([train_rows, val_rows]) if refitted(ckpt) else train_rows, cache,
                           rows), ""
    except CacheBusy:  # the warning is told why it is vague, the evaluation goes on
        return None, f"its cache {mine} is being written by another process"
    except (CacheError, KeyError, OSError) as e:
        gone = not mine or not Path(mine).exists()
        return None, f"its cache {mine or '(none recorded)'} " + ("is gone" if gone else f"cannot be read ({e})")


def warn_if_cache_seen(ckpt: dict, cache) -> str:
    """--cache of another cache holding photos the head was fitted on (a larger --n of its folder, a copy of it)
    scores them too: signdigits10, a head on 301 photos read accuracy 1.000 on a --n 120 cache of the same folder,
    nothing said, where --data and fit-head --test-cache find them by content. Said, with how many (returned: what
    the figures' source adds); where the head's cache is gone, a note says nobody can tell (as for --data)."""
    seen, why = cache_rows_seen(ckpt, cache)
    if seen is None:
        log.info("cannot tell whether rows of %s are photos the head was fitted on (%s): any such row is scored "
                 "too, which would flatter every figure", cache.path, why)
        return ""
    return warn_seen(seen, cache.path, "row")


def warn_val_of_another_cache(ckpt: dict, cache, rows: np.ndarray) -> str:
    """--split val of a cache not the head's: its rows split as the head's cache was, which are not the head's
    validation photos. It said they 'may include training images'; now counted by content where the head's cache
    can be read (how many, and a few), and where it cannot, said why not. Returns what the figures' source adds."""
    head = (f"{cache.path} is not the cache the model was trained on: 'val' scores {len(rows)} of its {cache.n} rows "
            "(split as the model's cache was)")
    held_out = f"use {option_text('split', 'all')} on a held-out cache"
    seen, why = cache_rows_seen(ckpt, cache, rows) if not ckpt.get("fused") else (None, "a head on fused features")
    if seen is None:
        log.warning("%s, which may include training images: they cannot be counted (%s); %s", head, why, held_out)
        return ""
    if not seen:
        log.warning("%s; none of them has the content of an image the head was fitted on; %s", head, held_out)
        return ""
    log.warning("%s, %d of them with the content of images the head was fitted on (e.g. %s): scored too, which "
                "flatters every figure; %s", head, len(seen), ", ".join(seen[:3]), held_out)
    return f", {len(seen)} of them with the content of images the head was fitted on"


def figures(result: dict, root=None) -> dict:
    """The evaluation's pictures as matplotlib Figures: {'confusion', 'gallery', 'reliability'} (none for a
    folder of foreign photos).

    ``result`` is what ``summarize`` (or ``evaluate``) returned; the gallery's thumbnails are read
    from ``root`` (default: the result's ``data_root``), a missing file drawn as 'unreadable'.
    """

    if result.get("foreign"):
        return {}
    root = Path(result["data_root"] if root is None else root)
    confusion = confusion_matrix_figure(np.array(result["confusion_matrix"]), result["classes"],
                                        title=f"accuracy {result['accuracy']:.3f} on {result['rows']} images")
    transform = Preprocessing.from_dict(result["preprocessing"]).to_transform() if "preprocessing" in result else None
    items = [{**w, "image": _gallery_image(root, w, transform)} for w in result["wrong"]]
    gallery = gallery_figure(items, suptitle=f"most confidently wrong: {len(items)} of {result['errors']} errors")
    cal = result["calibration"]
    reliability = reliability_figure(cal["bins_before"], cal["bins"], cal["before"]["ece"], cal["after"]["ece"],
                                     cal["temperature"], title=f"reliability on {result['rows']} images")
    return {"confusion": confusion, "gallery": gallery, "reliability": reliability}


def _pictures(pred: Predictions, result: dict, out_dir: Path) -> dict[str, Path]:
    """{name: path} of one evaluation's confusion.png, gallery.png and reliability.png; no gallery.png where no
    image is misclassified (it was a picture of nothing but 'no misclassified images'), a line on stderr instead."""

    figs = figures(result, pred.root)
    names = ("confusion", "gallery", "reliability") if result["wrong"] else ("confusion", "reliability")
    if not result["wrong"]:
        log.info("no misclassified images: no gallery.png")
    return {name: save(figs[name], out_dir / f"{name}.png") for name in names}
