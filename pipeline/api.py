"""The public Python API: what every CLI command does, as functions and objects for scripts and notebooks.

Re-exported by the package (``import pipeline; pipeline.Head(...)``); ``help(pipeline)`` lists it.
Each function builds the stage's config dataclass from its keyword options and calls the stage
function the CLI calls, so both give the same results and write the same files (caches under
``features/``, runs under ``runs/``, one ledger line per run). The conventions are scikit-learn's
where they fit: parameters in the constructor or the call, learned state on the object in
attributes ending in ``_``, ``fit`` returns the object, no progress printed unless ``verbose=True``
(``verbose=None`` leaves progress output as the process has it: what the CLI passes); warnings about the
data or results (photos skipped, rows scored that the head saw) are printed on stderr whatever ``verbose``.

An option a stage does not have is a ``ValueError`` naming it and the allowed ones; bad values
are ``ValueError``s too (``pipeline.errors.UsageError``), failures of the environment (a full disk,
weights that cannot be found) ``pipeline.errors.PipelineError``.

The names differ from the stage modules' (``extract_features``, not ``extract``): ``pipeline.extraction.extract``
is the module of the extract stage, and a function of the same name would hide it.
"""
from __future__ import annotations

import html
import inspect
import logging
import os
from dataclasses import MISSING, fields, replace
from typing import Iterable, Optional, Sequence, Union

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin

from .cache.handle import Cache, Caches
from .config import (
    AuditConfig,
    CheckImagesConfig,
    ChooseBackboneConfig,
    CompareConfig,
    DemoConfig,
    EvaluateConfig,
    ExportConfig,
    ExtractConfig,
    FeatureMapConfig,
    FetchConfig,
    FinetuneConfig,
    FitHeadConfig,
    PredictConfig,
    PreviewConfig,
    ServeConfig,
    SuggestConfig,
    SummaryConfig,
    TrainConfig,
    check_options,
    field_kind,
    ordered_fields,
)
from .errors import UsageError
from .files import path_text, shown
from .models.estimators import FeatureHead, ImageClassifier, NotFittedError, is_cache, is_features
from .progress import verbosity

#: the stages' result dataclasses -> their stage packages, loaded on first use (``__getattr__`` below); not in
#: ``__all__``, so that ``help(pipeline)`` and ``from pipeline.api import *`` stay without torch
RESULTS = {"FitHeadResult": "heads", "CompareResult": "heads", "BackboneChoice": "heads", "TrainResult": "models",
           "PredictResult": "models", "EvaluateResult": "reports", "SuggestResult": "reports",
           "SummaryResult": "models", "ExportResult": "serving", "CheckImagesResult": "data",
           "ImagenetCheckResult": "models", "FetchResult": "data",
           "DemoResult": "reports", "ConsolidateResult": "cache", "PreviewResult": "reports",
           "FeatureMapResult": "reports", "AuditResult": "reports", "FixesResult": "data",
           "ExtractResult": "extraction"}

__all__ = [
    "Cache", "Head", "Model", "NotFittedError", "Rows",
    "extract_features", "list_caches", "compare_sklearn", "choose_backbone", "train_model", "finetune_model",
    "evaluate_model",
    "predict_files", "preview", "feature_map", "plot_curves", "check_image_folder", "fetch_data", "run_demo",
    "list_runs", "imagenet_check", "model_summary",
    "audit_folder", "suggest",
    "export_model", "exported_metadata", "serve_app", "serve_model",
]

PathLike = Union[str, os.PathLike]
log = logging.getLogger(__name__)


def __getattr__(name: str):
    """The stages' result dataclasses (``RESULTS``: name -> stage package), loaded on first use: their modules
    import torch, and ``import pipeline.api`` must not."""
    if name not in RESULTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"pipeline.{RESULTS[name]}"), name)


# -- plumbing ----------------------------------------------------------------------------------
def _field_names(cls, exclude: Iterable[str] = ()) -> list[str]:
    return [f.name for f in fields(cls) if f.name not in set(exclude)]


def _defaults(cls, exclude: Iterable[str] = ()) -> dict:
    out = {}
    for f in fields(cls):
        if f.name in set(exclude):
            continue
        if f.default is not MISSING:
            out[f.name] = f.default
        elif f.default_factory is not MISSING:  # type: ignore[misc]
            out[f.name] = f.default_factory()  # type: ignore[misc]
    return out


def _check_options(cls, options: dict, what: str, exclude: Iterable[str] = ()) -> None:
    """Refuse keywords that are not fields of ``cls`` (those in ``exclude`` are set by the API itself)."""
    allowed = [f.name for f in ordered_fields(cls) if f.name not in set(exclude)]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise UsageError(f"{what}: unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                         f"allowed: {', '.join(allowed)}")


def _plain(options: dict) -> dict:
    """Paths given as Path objects (or Caches, Heads) become strings, as the configs and the ledger expect."""
    return {k: _path(v, k) if isinstance(v, (os.PathLike, Head, Model)) else v for k, v in options.items()}


def _config(cls, what: str, options: dict, **fixed):
    """``cls(**options, **fixed)``, the options checked against the dataclass's fields and their specs' choices
    and ranges, named as the caller wrote them (``lr``, not ``--lr``): a new field of a stage's config is an
    option of its API function, checked, without any change here."""
    _check_options(cls, options, what, exclude=fixed)
    check_options(cls, options, python=True, what=what)
    empty = {k for k, v in _defaults(cls).items() if v == ""}  # None for such an option (not given, as the CLI
    options = {k: "" if v is None and k in empty else v for k, v in options.items()}  # says it) is its default ''
    named = next((f.name for f in fields(cls) if field_kind(f) == "str" and options.get(f.name, "") is None), None)
    if named:  # host=None: an AttributeError; weights=None: random weights (torchvision's) or the default ones?
        raise UsageError(f"{what}: {named} must be a str, got None; leave it out for its default "
                         f"{_defaults(cls)[named]!r}")
    return cls(**_plain({**options, **fixed}))


def _path(x, what: str) -> str:
    """A path given as a str, a PathLike, or an object of this API (a Cache, Head or Model); anything else a
    UsageError naming ``what`` (``files.path_text``), and so is '' (extract_features('') took the working folder
    for the photos: 'class folder 'features' holds no images')."""
    if isinstance(x, (Head, Model)):
        return str(x._checkpoint())
    text = path_text(x, what)
    if not text:
        raise UsageError(f"{what} '' is an empty name; give a path")
    return text


def _call_text(name: str, *args, **kwargs) -> str:
    """How a call looks in Python, recorded in a cache (its 'command') to say how to finish it."""
    parts = [repr(os.fspath(a) if isinstance(a, os.PathLike) else a) for a in args]
    parts += [f"{k}={v!r}" for k, v in kwargs.items()]
    return f"pipeline.{name}({', '.join(parts)})"


class Rows(list):
    """A list of row dicts (one per model, run, ...) that Jupyter shows as a table; ``result`` holds the
    stage's whole answer (its result dataclass: split, cache, run folders) when there is more to it than the rows."""

    def __init__(self, rows=(), result=None):
        super().__init__(rows)
        self.result = result if result is not None else {}

    @staticmethod
    def _cell(v) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        if isinstance(v, dict):
            return ", ".join(f"{k} {Rows._cell(x)}" for k, x in v.items())
        return "" if v is None else str(v)

    def _repr_html_(self) -> str:
        if not self or not all(isinstance(r, dict) for r in self):
            return f"<pre>{html.escape(repr(list(self)))}</pre>"
        cols = list(dict.fromkeys(k for r in self for k in r))
        head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(self._cell(r.get(c)))}</td>" for c in cols) + "</tr>"
                       for r in self)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


# -- caches ------------------------------------------------------------------------------------
def extract_features(data: PathLike, n: int = ExtractConfig.n, *, verbose: Optional[bool] = False,
                     **options) -> Cache:
    """Run the frozen backbone over ``n`` images of the folder ``data`` (0 = all) into a feature cache.

    ``options`` are ExtractConfig's: backbone ('vgg16'), weights ('DEFAULT', a torchvision name, a
    local state-dict file with its .json sidecar, or 'none'), cache_dir ('features'), seed, dtype,
    precision ('auto', 'fp32', 'bf16', 'fp16', or 'int8' on the CPU with torchao: calibrated on
    calib_n images of calib_data or data, or with the network of data's earlier int8 cache where the
    folder changed since, so that only its new photos are computed), compile, pool, flip (False; True: each
    map the mean of the photo's and its mirror image's), verify (hash every row's photo on a hit, as on
    folders up to 100 MB always), batch_size, device, workers, decode.
    The same request again is a cache hit
    (nothing computed); an interrupted one resumes. Returns the Cache (``.result``: an ``ExtractResult``).
    """
    options = {"n": n, **options}
    options.setdefault("command", _call_text("extract_features", data, **options))
    cfg = _config(ExtractConfig, "extract_features", options, data=_path(data, "extract_features: data"))
    from .extraction.extract import extract

    with verbosity(verbose):
        result = extract(cfg)
    return Cache(result.cache, result=result)


def _listed_folder(path: PathLike, name: str, call: str, default: str) -> str:
    """``path`` (``call``'s parameter ``name``: ``runs_dir``), to list: a folder, or the default one not made yet
    (a project before its first run: nothing listed); another path that is not there is a UsageError naming it: a
    mistyped folder listed nothing, as if it held no runs."""
    from .config import option_text

    text = _path(path, f"{call}: {name}")
    if not os.path.lexists(text) and os.path.normpath(text) != os.path.normpath(default):
        raise UsageError(f"{option_text(name)} {text!r} does not exist")  # a file there: 'must be a folder'
    return text


def list_caches(cache_dir: PathLike = ExtractConfig.cache_dir) -> Caches:
    """Every feature cache in ``cache_dir`` (newest first), as Cache objects; unusable files in ``.unreadable``.
    A ``cache_dir`` that is not there is a ValueError, unless it is the default ``features`` (none made yet)."""
    from .cache.feature_cache import list_caches as run

    good, bad = run(_listed_folder(cache_dir, "cache_dir", "list_caches", ExtractConfig.cache_dir))
    return Caches([Cache(i.path) for i in good], [{"path": shown(str(p)), "why": w} for p, w in bad])


# -- models ------------------------------------------------------------------------------------
class _Classifier(ImageClassifier):
    """What a fit-head head and a train/finetune model share (``models.estimators.ImageClassifier``), and
    scoring a folder as ``evaluate_model(data=...)`` does."""

    def _score_folder(self, data: PathLike, device, precision, batch_size: int, workers: int) -> float:
        from .reports.evaluate import predict_folder

        lm, model = self._model(device, precision)
        cfg = EvaluateConfig(model=str(self._checkpoint()), data=os.fspath(data), batch_size=batch_size,
                             workers=workers)
        with verbosity(self._verbose):
            pred = predict_folder(os.fspath(data), lm.classes, lm.transform, model, cfg, ckpt=self._read(cfg.model))
        return float((pred.logp.argmax(1) == pred.labels).mean())


class Head(ClassifierMixin, BaseEstimator, FeatureHead, _Classifier):
    """A Linear + LogSoftmax classifier on cached features (fit-head), a scikit-learn estimator.

    ``Head(**params)``: params are fit-head's options (FitHeadConfig: head='auto', features='avg',
    normalize='l2', epochs=100, patience=5, lr=0.03, C=100, tune=False, test_data=None,
    recipe='default', val_fraction=0.125, seed=0, runs_dir='runs', cache_dir='features', ...);
    ``verbose=True`` shows progress and epoch lines. ``get_params``/``set_params``/``clone`` and
    ``is_classifier`` work as for any scikit-learn classifier.

    - ``fit(cache)``: train on a Cache (or a cache path; None = the newest complete cache in
      ``cache_dir``); returns the head. Writes ``runs/<stamp>-fit-head/head.pt``, history.json and
      curves.png, and a ledger line, as ``python cli.py fit-head``.
    - ``fit(X, y)``: train on arrays of cached features ((N, d) rows or (N, C, H, W) maps) and labels,
      in memory (no run folder): the same split and fit as on a cache; ``classes_`` are y's labels.
    - learned: ``classes_``, ``history_`` (one dict per epoch), ``metrics_`` (val_acc, val_loss,
      per-class val acc, ...), ``checkpoint_`` (the head.pt), ``run_dir_``, ``curves_``, ``cache_``,
      ``result_`` (fit-head's answer, a ``FitHeadResult``; None when fitted on arrays or loaded)
    - ``predict(X)``, ``predict_proba(X)``: X image paths, folders, PIL images (through the backbone the
      cache was made with), or a Cache / an array of cached features (through the head only); the
      probabilities are calibrated (``temperature_``); ``predict(X, unknown=True)`` names 'unknown' the
      inputs whose ``unknown_score(X)`` is above ``unknown_threshold_`` (photos of none of the classes)
    - ``score(cache)``: accuracy on a Cache (its validation split when it is the cache the head was fitted
      on, else every row), or on an image folder; ``score(X, y)`` against labels
    - ``save(path)`` / ``Head.load(path)``: the checkpoint (``python cli.py predict --model`` takes it too)
    - ``plot_curves()``: the training curves as a matplotlib Figure
    """

    _kinds = ("fit-head",)
    _EXCLUDE = ("cache",)  # given to fit, not the constructor

    class _Parameters:
        """``Head``'s signature, read from fit-head's options whenever asked (``inspect.signature(Head)``,
        ``help(Head)``, scikit-learn's checks): the constructor takes ``**params`` so that a misspelt one is a
        ValueError naming the allowed ones, and a new field of FitHeadConfig is a parameter at once."""

        def __get__(self, obj, cls) -> inspect.Signature:
            params = {**_defaults(FitHeadConfig, cls._EXCLUDE), "verbose": False}
            return inspect.Signature([inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default)
                                      for name, default in params.items()])

    __signature__ = _Parameters()

    def __init__(self, **params):
        super().__init__()
        _check_options(FitHeadConfig, {k: v for k, v in params.items() if k != "verbose"}, "Head",
                       exclude=self._EXCLUDE)
        for name, default in {**_defaults(FitHeadConfig, self._EXCLUDE), "verbose": False, **params}.items():
            setattr(self, name, default)

    @classmethod
    def _get_param_names(cls) -> list[str]:
        """fit-head's options (the config dataclass's fields, so a new field is a parameter at once) and verbose."""
        return sorted([*_field_names(FitHeadConfig, cls._EXCLUDE), "verbose"])

    @property
    def _verbose(self) -> bool:
        return self.verbose

    def _config_params(self) -> dict:
        """The parameters that are fit-head's options (all but verbose)."""
        return {k: v for k, v in self.get_params().items() if k != "verbose"}

    def _config(self, **fixed) -> "FitHeadConfig":
        return _config(FitHeadConfig, "Head", self._config_params(), **fixed)

    def fit(self, X: Union[Cache, PathLike, np.ndarray, None] = None, y=None, *,
            verbose: Optional[bool] = None) -> "Head":
        """Train on a Cache or cache file (None = the newest complete cache in cache_dir), on a list of
        caches of the same photos from other backbones (one head on their fused features: each cache's
        view l2-normalised, side by side; predicting runs every backbone; the default head keeps one cache
        alone where that wins its CV), or on arrays of cached features
        ``X`` with labels ``y``; returns self, fitted. ``verbose`` (default: the head's own) shows the
        progress bars and a line per epoch for this fit only."""
        several = isinstance(X, (list, tuple)) and bool(X) and all(isinstance(x, (Cache, str, os.PathLike)) for x in X)
        if X is not None and not several and not isinstance(X, (Cache, str, os.PathLike)):  # arrays of features
            with verbosity(self.verbose if verbose is None else verbose):
                return self._fit_arrays(self._config(), X, y)
        if y is not None:
            raise UsageError("fit(cache) takes its labels from the cache; pass y only with arrays of features X")
        from .heads.fit_head import fit_head

        # several caches of the same photos: one head on their fused features (heads/fused_views.py)
        cfg = self._config(cache=None if X is None else [_path(x, "Head.fit: X") for x in X] if several
                           else _path(X, "Head.fit: X"))
        with verbosity(self.verbose if verbose is None else verbose):
            result = fit_head(cfg)
        self._set_state(result.checkpoint, result=result)
        return self

    @classmethod
    def load(cls, path: PathLike, *, weights: Optional[str] = None, verbose: bool = False) -> "Head":
        """A fitted Head from a head.pt (fit-head's checkpoint, or one ``save`` wrote). ``weights``: the
        backbone weights file when it is no longer where the head recorded it (only for images)."""
        path = _path(path, "Head.load: path")
        ckpt = cls._read(path)
        names = _field_names(FitHeadConfig, cls._EXCLUDE)
        head = cls(verbose=verbose, **{k: v for k, v in (ckpt.get("config") or {}).items() if k in names})
        head._set_state(path, ckpt)
        head._weights = weights
        return head

    # features through the head alone
    def _cache_predictions(self, cache: Union[Cache, PathLike], split: str, device: Optional[str],
                           labelled: bool = True):
        """``labelled=False``: predictions only, on a cache of any classes (photos of other things among them)."""
        from .reports.evaluate import head_on_cache

        ckpt_path = str(self._checkpoint())
        check_options(EvaluateConfig, {"split": split}, what="Head.score")  # a misspelt split is no silent 'auto'
        cfg = EvaluateConfig(model=ckpt_path, cache=_path(cache, "Head.score: X"), split=split,
                             device=device or self.device)
        with verbosity(self.verbose):
            return head_on_cache(ckpt_path, self._read(ckpt_path), cfg, labelled=labelled)

    def _refuse_caches_if_fused(self, X, what: str) -> None:
        """A fused head given a cache, or a list of caches: said in the API's terms (it was told 'no --cache' or
        '--data DIR', or that score(X) takes an image folder, though fit took that list)."""
        if not (is_cache(X) or (isinstance(X, (list, tuple)) and bool(X) and all(map(is_cache, X)))):
            return
        ckpt = self._read(self._checkpoint())
        if ckpt.get("fused"):
            raise UsageError(f"Head.{what}: this head is on the fused features of {len(ckpt['caches'])} caches "
                             f"({ckpt['backbone']}), so it runs on photos (a folder or image files: every backbone "
                             "on each); pipeline.evaluate_model(head.checkpoint_) scores it on the validation rows "
                             "of the caches it was fitted on")

    def _scores(self, X, batch_size, workers, device, precision):
        self._refuse_caches_if_fused(X, "predict")
        if is_cache(X):
            pred = self._cache_predictions(X, "all", device, labelled=False)
            return pred.logp.astype(np.float64), pred.ood
        if is_features(X):
            return self._feature_scores(X, batch_size, device)
        if self.__sklearn_is_fitted__() and self._head is not None:
            raise UsageError("this Head was fitted on arrays of features: it has no backbone to run images "
                             "through; predict arrays of features, or fit it on a Cache")
        return self._image_scores(X, batch_size, workers, device, precision)

    def score(self, X, y=None, *, split: str = "auto", device: Optional[str] = None, precision: str = "auto",
              batch_size: int = 32, workers: int = -1) -> float:
        """Accuracy on a Cache (or cache file): ``split='val'`` its validation split, 'all' every row,
        'auto' (default) the validation split of the cache the head was fitted on and every row of any
        other; on an image folder: every image through the backbone; ``score(X, y)``: against labels."""
        if y is None:
            self._refuse_caches_if_fused(X, "score")
        if y is None and is_cache(X):
            pred = self._cache_predictions(X, split, device)  # 'auto': evaluate's (--split auto)
            if pred.foreign:  # every label -1: an accuracy of 0.0 that says nothing
                raise UsageError(f"Head.score: {pred.source} are photos of none of the head's classes "
                                 f"({', '.join(pred.classes)}): there is no accuracy to measure; unknown_score(X) "
                                 "or evaluate_model(head, cache=X) says how many are flagged unknown")
            return float((pred.logp.argmax(1) == pred.labels).mean())
        return _Classifier.score(self, X, y, device=device, precision=precision, batch_size=batch_size,
                                 workers=workers)

    def __repr__(self) -> str:
        defaults = _defaults(FitHeadConfig, self._EXCLUDE)
        params = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items()
                           if k != "verbose" and (k not in defaults or defaults[k] != v))
        if not self.__sklearn_is_fitted__():
            return f"Head({params})"
        acc = self.metrics_.get("val_acc")
        where = self.checkpoint_ or "in memory"
        return (f"Head({params})  # fitted: classes {list(self.classes_)}"
                f"{f', val acc {acc:.3f}' if acc is not None else ''}, {where}")


class Model(_Classifier):
    """A whole model (backbone + head) from ``train_model`` / ``finetune_model``, or any checkpoint loaded
    with ``Model.load`` (a train/finetune model.pt, or a fit-head head.pt put on its backbone).

    The same as a Head for images: ``predict``, ``predict_proba``, ``score(folder)`` or ``score(X, y)``,
    ``save``, ``plot_curves``; learned state in ``classes_``, ``history_``, ``metrics_``, ``checkpoint_``,
    ``run_dir_``, ``config_`` (the options it was trained with).
    """

    def __init__(self, *, verbose: bool = False):
        super().__init__()
        self.verbose = verbose

    @property
    def _verbose(self) -> bool:
        return self.verbose

    @classmethod
    def load(cls, path: PathLike, *, weights: Optional[str] = None, verbose: bool = False) -> "Model":
        """A model from any checkpoint of this tool; ``weights``: a head.pt's backbone weights, if moved."""
        path = _path(path, "Model.load: path")
        model = cls(verbose=verbose)
        model._set_state(path, cls._read(path))
        model._weights = weights
        return model

    def __repr__(self) -> str:
        if not self.__sklearn_is_fitted__():
            return "Model()"
        acc = self.metrics_.get("val_acc")
        return (f"Model({self.kind_}, {self.backbone_}, classes {self.classes_}"
                f"{f', val acc {acc:.3f}' if acc is not None else ''}: {self.checkpoint_})")


# -- stages that return rows or reports --------------------------------------------------------
def choose_backbone(data: PathLike, backbones: Sequence[str], *, verbose: Optional[bool] = False, **options):
    """Which backbone suits the photos of ``data``: each of ``backbones`` ('NAME' or 'NAME=WEIGHTS')
    extracts the same seeded sample (ordinary caches, reused later), fit-head's default head is
    cross-validated on each and on their fused features (repeated stratified k-fold, the same folds
    for every candidate), and the answer (a ``BackboneChoice``: ``candidates`` best first with accuracy,
    log-loss, their standard errors, extraction img/s and cache MB per 1,000 photos; ``best``;
    ``fastest_within_noise``, the recommendation; ``note``) says which are indistinguishable on these
    photos. ``options``: ChooseBackboneConfig's (n, folds, repeats, fused, seed, cache_dir, device, ...),
    as ``python cli.py choose-backbone``."""
    from .heads.backbone_choice import choose_backbone as run

    if isinstance(backbones, str):
        backbones = [backbones]
    cfg = _config(ChooseBackboneConfig, "choose_backbone", options, data=_path(data, "choose_backbone: data"),
                  backbones=tuple(backbones))
    with verbosity(verbose):
        return run(cfg)


def compare_sklearn(cache: Union[Cache, PathLike, None] = None, *, head: Union[Head, dict, None] = None,
                    verbose: Optional[bool] = False, **options) -> Rows:
    """Fit the torch head and scikit-learn's StandardScaler + LogisticRegression on the same seeded split.

    ``options``: CompareConfig's (C, max_iter, scale, val_fraction, seed, cache_dir, block_rows) and any
    of fit-head's (epochs, lr, ...) for the torch head, or ``head=Head(...)`` (its parameters).
    Returns one row dict per model (model, val_acc, val_loss, fit_seconds, per_class_val_acc, ...);
    ``rows.result``, a ``CompareResult``, holds the split, the cache and the head's run folder.
    """
    compare_fields = set(_field_names(CompareConfig, ("head",)))
    head_fields = set(_field_names(FitHeadConfig, ("cache",)))
    unknown = sorted(set(options) - compare_fields - head_fields)
    if unknown:
        raise UsageError(f"compare_sklearn: unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                         f"allowed: {', '.join(sorted(compare_fields | head_fields))}")
    head_params = dict(head._config_params() if isinstance(head, Head) else head or {})
    _check_options(FitHeadConfig, head_params, "compare_sklearn(head=...)", exclude=("cache",))
    # an option both configs have (C, seed, val_fraction, cache_dir) is compare-sklearn's: its C is the
    # scikit-learn baseline's, never the heads'; the split is shared by the stage itself
    head_params.update({k: v for k, v in options.items() if k in head_fields - compare_fields})
    # values in the caller's keywords, as _config checks them (the stage's own check said '--lr must be ...')
    check_options(CompareConfig, {k: v for k, v in options.items() if k in compare_fields}, what="compare_sklearn")
    check_options(FitHeadConfig, head_params, what="compare_sklearn")
    head_params, options = _plain(head_params), _plain(options)
    cfg = CompareConfig(**{k: v for k, v in options.items() if k in compare_fields},
                        cache=None if cache is None else _path(cache, "compare_sklearn: cache"),
                        head=FitHeadConfig(**{k: v for k, v in head_params.items() if k != "cache"}))
    from .heads.compare import compare_sklearn as run

    with verbosity(verbose):
        result = run(cfg)
    return Rows(result.models, result)


def train_model(data: PathLike, *, verbose: Optional[bool] = False, **options) -> Model:
    """Train a new head on the images of ``data`` end to end, the backbone frozen (``python cli.py train``).

    ``options``: TrainConfig's (backbone, weights, n, epochs=3, lr, batch_size, augment, pool, dropout,
    val_fraction, seed, device, precision, workers, print_every, runs_dir, resume). Returns the fitted Model
    (``model.result_``: the run's ``TrainResult``).
    Ctrl-C raises ``TrainingInterrupted`` (a KeyboardInterrupt) naming the run folder ``resume`` continues.
    """
    from .models.train import train
    cfg = _config(TrainConfig, "train_model", options, data=_path(data, "train_model: data"))
    with verbosity(verbose):
        result = train(cfg)
    model = Model(verbose=bool(verbose))
    model._set_state(result.checkpoint, result=result)
    return model


def finetune_model(data: PathLike, init: Union[Head, Model, PathLike, None] = None, *,
                   verbose: Optional[bool] = False, **options) -> Model:
    """Unfreeze the backbone (or its last K blocks) and train at a low rate (``python cli.py finetune``),
    starting from ``init`` (a Head, a Model or a checkpoint path; None: a new head).

    ``options``: FinetuneConfig's (unfreeze='all' or K, epochs, head_epochs, lr, backbone_lr, and train's).
    """
    from .models.train import finetune
    fixed = {"data": _path(data, "finetune_model: data")}
    if init is not None:
        fixed["init_head"] = _path(init, "finetune_model: init")
    cfg = _config(FinetuneConfig, "finetune_model", options, **fixed)
    with verbosity(verbose):
        result = finetune(cfg)
    model = Model(verbose=bool(verbose))
    model._set_state(result.checkpoint, result=result)
    return model


def evaluate_model(model: Union[Head, Model, PathLike], cache: Union[Cache, PathLike, None] = None,
                   data: Optional[PathLike] = None, *, figures: bool = True, verbose: Optional[bool] = False,
                   **options):
    """Accuracy, loss, macro F1, per-class precision/recall/F1, the confusion matrix and the most
    confidently wrong images of ``model`` (``python cli.py evaluate``).

    On ``cache`` (a head only; by default the cache it was fitted on; ``split='auto'`` its validation
    rows there and every row of another cache, 'val' or 'all'), or on the image folder ``data`` (any
    model). ``options``: EvaluateConfig's (split, top_k, weights, batch_size, device, precision, workers,
    runs_dir). Writes confusion.png, gallery.png (where an image is misclassified), reliability.png
    and metrics.json to a run folder. Returns an ``EvaluateResult`` (``accuracy``, ``per_class``, ...;
    ``to_dict()``: metrics.json's keys); with ``figures`` its ``figures`` are
    ``{'confusion': Figure, 'gallery': Figure, 'reliability': Figure}``. It also holds
    ``calibration`` (ECE, log-loss, Brier without and with the temperature) and ``unknown`` (the share
    flagged); on a folder of photos of none of the model's classes, only the latter.
    """
    from .reports.evaluate import evaluate
    from .reports.evaluate import figures as draw

    cfg = _config(EvaluateConfig, "evaluate_model", options, model=_path(model, "evaluate_model: model"),
                  cache=None if cache is None else _path(cache, "evaluate_model: cache"),
                  data=None if data is None else _path(data, "evaluate_model: data"))
    with verbosity(verbose):
        result = evaluate(cfg)
    return replace(result, figures=draw(result.to_dict())) if figures else result


def predict_files(model: Union[Head, Model, PathLike], paths: Union[PathLike, Sequence[PathLike]], *,
                  verbose: Optional[bool] = False, **options) -> Rows:
    """One row per image file (folders searched recursively): {path, class, probability, unknown, ood_score,
    error}, an unreadable file getting its error instead of a class (``python cli.py predict``).

    ``options``: PredictConfig's (weights, batch_size, workers, device, precision, format, output: the
    rows written to a file as csv/json/table). ``rows.result``, a ``PredictResult``: images, errors, img/s, output.
    """
    from .models.predict import predict

    one = isinstance(paths, (str, bytes, os.PathLike)) or not hasattr(paths, "__iter__")  # b'/x': one path, no list
    paths = [paths] if one else list(paths)
    cfg = _config(PredictConfig, "predict_files", options, model=_path(model, "predict_files: model"),
                  paths=[path_text(p, "predict_files: paths") for p in paths])  # '': predict's own refusal
    with verbosity(verbose):
        result = predict(cfg)
    return Rows(result.rows, result)


# -- pictures ----------------------------------------------------------------------------------
def preview(data: PathLike, *, output: Optional[PathLike] = None, **options):
    """A grid of sample images per class as the backbone sees them (resized, cropped, de-normalised):
    a matplotlib Figure (shown inline in Jupyter), also saved as a PNG when ``output`` is given.

    ``options``: PreviewConfig's (per_class=4, seed, backbone, weights: only the preprocessing is read).
    ``fig.info``: a ``PreviewResult``, the classes and images shown.
    """
    from .reports.pictures import preview as preview_figure

    fig, info = preview_figure(_config(PreviewConfig, "preview", options, data=_path(data, "preview: data"),
                                       output=_path(output, "preview: output") if output else ""))
    return _finish_figure(fig, info, output)


def feature_map(image: PathLike, *, output: Optional[PathLike] = None, **options):
    """One image beside its feature map (channels x positions) and its most active channels over it:
    a matplotlib Figure, also saved as a PNG when ``output`` is given.

    ``options``: FeatureMapConfig's (backbone, weights, top_k=6). ``fig.info``: a
    ``FeatureMapResult`` (feature_shape, top_channels).
    """
    from .reports.pictures import feature_map as feature_map_figure

    fig, info = feature_map_figure(_config(FeatureMapConfig, "feature_map", options,
                                           image=_path(image, "feature_map: image"),
                                           output=_path(output, "feature_map: output") if output else ""))
    return _finish_figure(fig, info, output)


def _finish_figure(fig, info, output: Optional[PathLike]):
    """``fig`` with ``fig.info`` (the stage's PreviewResult or FeatureMapResult), saved as a PNG when asked."""
    from dataclasses import replace

    from .runs.figures import save

    fig.info = replace(info, output=str(save(fig, info.output or output))) if output else info
    return fig


def plot_curves(history: Union[Head, Model, Sequence[dict]], title: str = ""):
    """Accuracy and loss per epoch, train vs validation: a matplotlib Figure of a history (a list of
    per-epoch dicts, as in history.json) or of a fitted Head or Model."""
    from .runs.figures import curves_figure

    if isinstance(history, _Classifier):
        return history.plot_curves(title=title)  # says why a fitted head has none
    if not history:
        raise UsageError("no epochs to plot")
    keys = ("epoch", "train_acc", "val_acc", "train_loss", "val_loss")
    for row in history:  # a KeyError from inside matplotlib's loop would not say which epoch or key
        missing = [k for k in keys if not isinstance(row, dict) or k not in row]
        if missing:
            raise UsageError(f"plot_curves: {row!r} is not an epoch of a history.json: it lacks "
                             f"{', '.join(missing)} (each epoch needs {', '.join(keys)})")
    return curves_figure(list(history), title=title)


# -- data, ledger, odds and ends ---------------------------------------------------------------
def check_image_folder(root: PathLike, *, verbose: Optional[bool] = False, **options):
    """Fully decode every file below ``root`` as extract would: a ``CheckImagesResult`` of counts, findings
    (errors: files extract cannot use; notes: converted ones) and, with ``quarantine=True``, the files with errors
    moved aside (``python cli.py check-images``). ``options``: CheckImagesConfig's (report, quarantine, quarantine_dir,
    workers)."""
    from .data.check_images import check_images

    cfg = _config(CheckImagesConfig, "check_image_folder", options, root=_path(root, "check_image_folder: root"))
    with verbosity(verbose):
        return check_images(cfg)


def fetch_data(*, verbose: Optional[bool] = False, **options):
    """Download an image archive (resuming) and unpack it safely (``python cli.py fetch-data``);
    ``options``: FetchConfig's (dest, url, sha256, overwrite, timeout, retries). A ``FetchResult``: ``unpacked`` is the
    folder."""
    from .data.fetch import fetch_data as run

    cfg = _config(FetchConfig, "fetch_data", options)
    with verbosity(verbose):
        return run(cfg)


def run_demo(*, verbose: Optional[bool] = False, **options):
    """The main job in one go: fetch if missing, check, extract, fit-head, compare-sklearn
    (``python cli.py demo``), a ``DemoResult`` of each step's; ``options``: DemoConfig's (data, weights, n,
    backbone, cache_dir, runs_dir, ...)."""
    from .reports.demo import demo

    options.setdefault("command", _call_text("run_demo", **options))
    cfg = _config(DemoConfig, "run_demo", options)
    with verbosity(verbose):
        return demo(cfg)


def list_runs(runs_dir: PathLike = FitHeadConfig.runs_dir, *, sort_by: Optional[str] = None,
              cache: Union[Cache, str, None] = None, backbone: Optional[str] = None) -> Rows:
    """The experiment ledger (``runs/ledger.jsonl``): one row per run, newest first or best first by
    ``sort_by`` (val_acc, accuracy, ...), optionally only on ``cache`` or with ``backbone`` (``python cli.py runs``).
    A ``runs_dir`` that is not there is a ValueError, unless it is the default ``runs`` (no run yet)."""
    from .runs.ledger import read_runs

    return Rows(read_runs(_listed_folder(runs_dir, "runs_dir", "list_runs", FitHeadConfig.runs_dir), sort_by=sort_by,
                          cache=None if cache is None else _path(cache, "list_runs: cache"),
                          backbone=backbone))


def imagenet_check(image: PathLike, **options):
    """Top ImageNet classes of one image from the full pretrained model (``python cli.py imagenet-check``), an
    ``ImagenetCheckResult``;
    ``options``: backbone, weights (with the classifier), top, device."""
    import inspect

    from .models.predict import imagenet_check as run

    allowed = [p for p in inspect.signature(run).parameters if p != "image"]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise UsageError(f"imagenet_check: unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                         f"allowed: {', '.join(allowed)}")
    return run(_path(image, "imagenet_check: image"), **options)


def model_summary(**options):
    """Layer-by-layer shapes and total/trainable parameters of backbone + head under a freeze setting
    (``python cli.py summary``), a ``SummaryResult``; ``options``: SummaryConfig's (backbone, classes, pool,
    dropout, unfreeze, crop_size)."""
    from .models.summary import summarize

    return summarize(_config(SummaryConfig, "model_summary", options))


# -- audit ---------------------------------------------------------------------------------------
def audit_folder(data: Optional[PathLike] = None, *, verbose: Optional[bool] = False, **options):
    """What is wrong with a labelled folder (``python cli.py audit``): likely wrong labels (out-of-fold
    probabilities of the default head, ranked by cleanlab's confident learning: given and suggested class,
    score), outliers, exact and near duplicates, and with ``test_data`` the test photos the training
    folder also holds (leaks). Writes report.json, report.html, gallery.png (where there is a label issue) and
    fixes.csv to a run folder; returns an ``AuditResult``.

    ``options``: AuditConfig's (cache, test_data, test_cache, cache_dir, backbone, weights, folds,
    threshold, top, output, ...); ``apply='fixes.csv'`` moves the files of a reviewed list instead (journalled,
    undone with ``undo='journal.jsonl'``), then extracts the folder again reusing every unchanged row: a
    ``FixesResult`` (what moved, the journal, the undo command, the refreshed cache).
    """
    from .reports.audit import audit as run

    fixed = {"data": _path(data, "audit_folder: data")} if data is not None else {}
    cfg = _config(AuditConfig, "audit_folder", _plain(options), **fixed)
    with verbosity(verbose):
        return run(cfg)


def suggest(data: PathLike, pool: PathLike, *, verbose: Optional[bool] = False, **options):
    """Which photos of ``pool`` (a folder of unlabelled photos) to label next for the labelled folder ``data``
    (``python cli.py suggest``): both extracted (cached; rows found by content, so a suggested photo moved
    into its class folder costs no second forward pass), the default head fitted on ``data``'s rows, the pool
    ranked by its uncertainty and by distance to what is labelled. Returns a ``SuggestResult`` (``rows``: rank,
    path, predicted class, probability, uncertainty, distance, ``unknown``: whether the photo looks like none of
    the labelled classes, its ``ood_score``; ``csv``, ``html``: the list and its page).
    ``options``: SuggestConfig's (k=50, rule, head, cache_dir, backbone, weights, output, ...)."""
    from .reports.suggest import suggest as run

    cfg = _config(SuggestConfig, "suggest", options, data=_path(data, "suggest: data"),
                  pool=_path(pool, "suggest: pool"))
    with verbosity(verbose):
        return run(cfg)


# -- taking a model elsewhere ------------------------------------------------------------------
def export_model(model: Union[Head, Model, PathLike], output: PathLike, *, verbose: Optional[bool] = False,
                 **options):
    """A head (with its backbone) or a whole model as one ONNX or TorchScript file that maps preprocessed
    images to class probabilities, its metadata beside it (``<output>.json``), after a parity check
    against predict (``python cli.py export``). ``options``: ExportConfig's (format='onnx', check_data,
    check_n, tolerance, weights, ...). Returns an ``ExportResult``: ``passed`` False (and nothing written) when
    the export's probabilities differ from predict's by more than ``tolerance``; ``max_abs_diff`` by how much.
    """
    from .serving.export import export

    cfg = _config(ExportConfig, "export_model", options, model=_path(model, "export_model: model"),
                  output=_path(output, "export_model: output"))
    with verbosity(verbose):
        return export(cfg)


def exported_metadata(path: PathLike) -> dict:
    """What a program needs to feed an exported file (classes, preprocessing, decoding, the unknown threshold),
    read from inside it, with its sidecar's parity check; a sidecar of another export beside it is refused
    (PipelineError), never used."""
    from .serving.export import read_metadata

    return read_metadata(_path(path, "exported_metadata: path"))


def serve_app(model: Union[Head, Model, PathLike], **options):
    """The prediction service as a FastAPI app, in this process (for tests and for mounting in another app:
    ``TestClient(pipeline.serve_app("head.pt"), base_url="http://localhost")``: a loopback app answers
    its own Host names only). ``options``: ServeConfig's (batch_size,
    max_wait_ms, limits, device, precision, weights); host and port are the server's, not the app's, and so is
    the deadline for a request's line and headers (``header_seconds``): only a server whose HTTP protocol keeps it,
    as ``pipeline.serving.service.server_config(app)``'s uvicorn Config does, bounds slow headers."""
    from .serving.service import build_app

    return build_app(_config(ServeConfig, "serve_app", options, model=_path(model, "serve_app: model")))


def serve_model(model: Union[Head, Model, PathLike], *, verbose: Optional[bool] = None, **options) -> dict:
    """Serve ``model`` over HTTP until SIGTERM or Ctrl-C (``python cli.py serve``): the page at ``/``,
    ``POST /predict``, ``GET /info``, ``GET /health``. ``options``: ServeConfig's (host='127.0.0.1', port=8000, ...)."""
    from .serving.service import serve

    cfg = _config(ServeConfig, "serve_model", options, model=_path(model, "serve_model: model"))
    with verbosity(verbose):
        return serve(cfg)
