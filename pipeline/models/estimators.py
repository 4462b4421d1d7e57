"""The scikit-learn face of a checkpoint (the Python API's ``Head`` and ``Model`` build on it): learned state as
attributes ending in ``_``, set in one go by fit or load; ``predict``, ``predict_proba``, ``unknown_score`` and
``score`` on images (through the one loop from images to log-probabilities, ``predict.outputs_of_inputs``) or,
for a head, on arrays of cached features (``heads.cache_views.array_scores``).

Nothing here imports torch at import time: ``import pipeline`` stays light.
"""
from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import numpy as np
from sklearn.exceptions import NotFittedError as SklearnNotFittedError

from ..errors import UsageError
from ..progress import verbosity

PathLike = Any  # a str or an os.PathLike


class NotFittedError(SklearnNotFittedError):
    """A Head or Model used before it was fitted or loaded (scikit-learn's NotFittedError: a ValueError
    and an AttributeError)."""


ImageInput = Any  # a path (file or folder), a PIL image, or a list of them


def check_runner(what: str, batch_size, workers, device, precision) -> None:
    """The image methods' keywords checked by the CLI's own rules (``RunnerOptions``, the device's name):
    ``batch_size=0`` ran as if it were 32, and ``precision='fp64'`` or ``device='gpu'`` failed only once the
    model loaded."""
    from ..config import RunnerOptions, check_options
    from ..devices import check_device_name

    check_options(RunnerOptions, {"batch_size": batch_size, "workers": workers, "device": device,
                                  "precision": precision}, what=what)
    if device is not None:
        check_device_name(device, f"{what}: ")


class ImageClassifier:
    """What a fit-head head and a train/finetune model share: learned state, and predicting images from a
    checkpoint (the one loop: ``predict.outputs_of_inputs``)."""

    _kinds: tuple = ()

    def __init__(self):
        self._weights: Optional[str] = None
        self._loaded = None  # (LoadedModel, Inference, (device, precision, maps) asked) once predict ran
        self._head = None  # a head fitted on arrays, in memory (no checkpoint)

    # -- learned state ---------------------------------------------------------------------------
    def _learn(self, state: dict, head=None) -> None:
        """Set what fit or load learned, all of it at once, as attributes ending in ``_`` (scikit-learn's
        convention); ``head``: a head fitted in memory (on arrays), which has no checkpoint."""
        for name, value in state.items():
            setattr(self, name, value)
        self._head, self._loaded = head, None

    def _set_state(self, checkpoint: PathLike, ckpt: Optional[dict] = None, result=None) -> None:
        """Learn what a checkpoint (read now unless given) and the run that wrote it (``result``) say."""
        from .whole_models import learned_state, read_checkpoint

        self._learn(learned_state(checkpoint, read_checkpoint(checkpoint) if ckpt is None else ckpt, result))

    def __getstate__(self) -> dict:
        """Pickled (joblib, a copy for another process) without the network loaded for predict: a timm backbone's
        class is made at load and cannot be pickled ("Can't pickle local object ... TimmTrunk"); it is loaded
        again from the checkpoint when next asked."""
        return {**self.__dict__, "_loaded": None}

    def __sklearn_is_fitted__(self) -> bool:
        return hasattr(self, "classes_")

    def _check_fitted(self) -> None:
        if not self.__sklearn_is_fitted__():
            raise NotFittedError(f"this {type(self).__name__} is not fitted yet: call fit() or "
                                 f"{type(self).__name__}.load(path) first")

    def _checkpoint(self) -> Path:
        self._check_fitted()
        if self.checkpoint_ is None:
            raise UsageError(f"this {type(self).__name__} was fitted on arrays of features, in memory: it has no "
                             "checkpoint (fit it on a Cache to save it or run it on images)")
        return self.checkpoint_

    @classmethod
    def _read(cls, path: PathLike) -> dict:
        from .whole_models import read_checkpoint

        ckpt = read_checkpoint(path)
        if cls._kinds and ckpt["kind"] not in cls._kinds:
            hint = "Model.load" if ckpt["kind"] != "fit-head" else "Head.load"
            raise UsageError(f"{os.fspath(path)!r} is a {ckpt['kind']} checkpoint, not a {cls.__name__}'s; use {hint}")
        return ckpt

    # -- predicting ------------------------------------------------------------------------------
    def _model(self, device: Optional[str], precision: str, maps: bool = False):
        """The whole model (backbone + head) from the checkpoint, loaded once, on ``device`` (``maps``: with
        each photo's heatmap in its output, ``whole_models.network``)."""
        from .whole_models import load_model, network

        asked = (device or getattr(self, "device", "auto") or "auto", precision, maps)
        if self._loaded is None or self._loaded[2] != asked:
            lm = load_model(self._checkpoint(), self._weights)
            self._loaded = (lm, network(lm, *asked[:2], maps=maps), asked)
        return self._loaded[0], self._loaded[1]

    def _image_scores(self, X, batch_size: int, workers: Optional[int], device, precision):
        """(log-probabilities, unknown scores or None) of images X."""
        from .whole_models import split_extras

        out = self._image_outputs(X, batch_size, workers, device, precision)
        return split_extras(out, len(self.classes_))

    def _image_outputs(self, X, batch_size: int, workers: Optional[int], device, precision,
                       maps: bool = False) -> np.ndarray:
        from .predict import outputs_of_inputs

        if is_cache(X):  # else its .h5 went to the image reader: '0 x 0 pixels: an empty image'
            raise UsageError(f"{os.fspath(X)!r} is a feature cache: a whole model takes photos (the folder the "
                             "cache was made from); a fit-head head.pt runs on a cache as pipeline.Head.load(path)")
        lm, model = self._model(device, precision, maps)
        with verbosity(self._verbose):
            return outputs_of_inputs(lm, model, X, batch_size, workers)

    def _scores(self, X, batch_size: int, workers: Optional[int], device, precision):
        return self._image_scores(X, batch_size, workers, device, precision)

    def explain(self, X: ImageInput, *, batch_size: int = 32, workers: Optional[int] = None,
                device: Optional[str] = None, precision: str = "auto") -> np.ndarray:
        """Heatmaps, (N, H, W) in [0, 1]: where in each photo its predicted class was decided (Grad-CAM on the
        backbone's last H x W feature map, ``pipeline.heads.heatmaps``); 1 at the hottest place. A map covers
        the photo as the backbone saw it (resized and centre-cropped). One forward pass per photo, the head's
        own gradient at the map. ``X`` as ``predict_proba``'s."""
        from ..heads.heatmaps import normalised
        from .whole_models import map_grid, split_maps

        check_runner("explain", batch_size, workers, device, precision)
        out = self._image_outputs(X, batch_size, workers, device, precision, maps=True)
        return normalised(split_maps(out, map_grid(self._loaded[0]))[1])

    def _log_proba(self, X, batch_size: int, workers: Optional[int], device, precision) -> np.ndarray:
        return self._scores(X, batch_size, workers, device, precision)[0]

    def unknown_score(self, X: ImageInput, *, batch_size: int = 32, workers: Optional[int] = None,
                      device: Optional[str] = None, precision: str = "auto") -> np.ndarray:
        """How unlike the training photos each input is, (N,): 1 - cosine similarity of its pooled features
        to the k-th nearest training photo's; above ``unknown_threshold_`` it counts as unknown."""
        check_runner("unknown_score", batch_size, workers, device, precision)
        ood = self._scores(X, batch_size, workers, device, precision)[1]
        if ood is None:
            self._no_unknown_score()
        return np.asarray(ood, np.float64)

    def _no_unknown_score(self):
        raise UsageError(f"{self.checkpoint_ or 'this head'} has no unknown score (fitted before it existed, or "
                         "with unknown_rows=0); fit it again")

    def predict_proba(self, X: ImageInput, *, batch_size: int = 32, workers: Optional[int] = None,
                      device: Optional[str] = None, precision: str = "auto") -> np.ndarray:
        """Class probabilities, (N, len(classes_)), columns in ``classes_`` order.

        ``X``: an image path, a folder (its images, sorted, recursively: the order ``predict_files``
        lists), a PIL image, or a list of any of these. Images go through the backbone with the
        checkpoint's own preprocessing; an unreadable file is a ValueError naming it.
        """
        check_runner("predict_proba", batch_size, workers, device, precision)
        return np.exp(self.predict_log_proba(X, batch_size=batch_size, workers=workers, device=device,
                                             precision=precision))

    def predict_log_proba(self, X: ImageInput, *, batch_size: int = 32, workers: Optional[int] = None,
                          device: Optional[str] = None, precision: str = "auto") -> np.ndarray:
        """Log-probabilities, as ``predict_proba``: the model's output, normalised again in float64 (in
        bf16 it sums to 1 only within 1e-3), so each row's probabilities sum to 1."""
        check_runner("predict_log_proba", batch_size, workers, device, precision)
        logp = self._log_proba(X, batch_size, workers, device, precision)
        top = logp.max(1, keepdims=True)
        return logp - (top + np.log(np.exp(logp - top).sum(1, keepdims=True)))

    def predict(self, X: ImageInput, unknown: bool = False, **options) -> np.ndarray:
        """The most probable class name of each image of ``X`` (options and inputs: see ``predict_proba``);
        with ``unknown=True``, 'unknown' for the inputs that look like none of the classes (see
        ``unknown_score``)."""
        from ..config import check_flag

        self._check_fitted()
        check_flag(unknown, "predict: unknown")
        stray = sorted(set(options) - {"batch_size", "workers", "device", "precision"})
        if stray:
            raise TypeError(f"predict() got an unexpected keyword argument {stray[0]!r}")
        runner = (options.get("batch_size", 32), options.get("workers"), options.get("device"),
                  options.get("precision", "auto"))
        check_runner("predict", *runner)
        if not unknown:
            return np.asarray(self.classes_)[self.predict_log_proba(X, **options).argmax(1)]
        logp, ood = self._scores(X, *runner)
        if ood is None:
            self._no_unknown_score()
        labels = np.asarray(self.classes_, dtype=object)[np.asarray(logp).argmax(1)]
        labels[np.asarray(ood, np.float64) > self.unknown_threshold_] = "unknown"
        return labels

    def score(self, X, y=None, *, device: Optional[str] = None, precision: str = "auto", batch_size: int = 32,
              workers: int = -1) -> float:
        """Accuracy: on an image folder ``X`` (every image, labels from its class folders, as
        ``evaluate_model(data=...)``), or of ``predict(X)`` against labels ``y`` (see ``_class_labels``)."""
        if y is not None:
            pred = self.predict(X, device=device, precision=precision, batch_size=batch_size)
            return float((pred == self._class_labels(y, len(pred))).mean())
        if isinstance(X, (str, os.PathLike)) and Path(os.fspath(X)).is_dir():
            return self._score_folder(X, device, precision, batch_size, workers)
        raise UsageError("score(X) takes an image folder (class sub-folders), or images X with their labels y")

    def _class_labels(self, y, n: int) -> np.ndarray:
        """``y`` as labels of ``classes_``, checked, so a wrong label is an error rather than a silent miss: one
        per prediction (``n``), each a class, or an index into ``classes_`` where the classes are not numbers
        themselves (a head fitted on ``y = [3, 7]`` is scored against 3 and 7, never against indices)."""
        y = np.asarray(y)
        if y.ndim != 1 or len(y) != n:
            raise UsageError(f"y holds {y.size} labels (shape {y.shape}); score needs one label per image ({n})")
        classes = np.asarray(self.classes_, dtype=object)
        names, values = set(classes.tolist()), y.tolist()
        if all(v in names for v in values):
            return y.astype(object)
        numbered = any(isinstance(c, (int, np.integer)) for c in classes.tolist())
        if y.dtype.kind in "iu" and not numbered:
            wrong = [v for v in values if not 0 <= v < len(classes)]
            if not wrong:
                return classes[y]
            raise UsageError(f"y holds the class index {wrong[0]}; classes_ has {len(classes)} classes "
                             f"(indices 0 to {len(classes) - 1}: {', '.join(map(str, classes))})")
        wrong = next(v for v in values if v not in names)
        raise UsageError(f"y holds {wrong!r}, which is not one of the classes: {', '.join(map(repr, classes))}")

    # -- files -----------------------------------------------------------------------------------
    def save(self, path: PathLike) -> Path:
        """Copy the checkpoint (the same safe dict the CLI writes: ``torch.load(weights_only=True)``
        reads it) to ``path``; returns the path. ``load`` reads it back."""
        import shutil

        from ..files import atomic_write, check_output, check_replaceable, path_text
        from ..heads.checkpoints import is_checkpoint
        from .whole_models import checkpoint_reads

        text = path_text(path, "save: path")  # save(None) was os.fspath's TypeError, naming no parameter
        if not text:  # Path('') is '.': "save's path '.' is a folder"
            raise UsageError("save: path '' is an empty name; give a file")
        src, dst = self._checkpoint(), Path(text)
        if dst.is_file() and os.path.samefile(src, dst):
            return dst
        files, folders = checkpoint_reads({"config": self.config_, "cache": self.cache_}, src, self._weights)
        check_output(dst, files, folders, what="save's path")
        check_replaceable(dst, is_checkpoint, "a checkpoint of this tool", what="save's path", other="path")
        return atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))

    def plot_curves(self, title: str = ""):
        """Accuracy and loss per epoch, train vs validation (a matplotlib Figure)."""
        self._check_fitted()
        if not self.history_:
            raise UsageError(f"no training curves for {self.checkpoint_}: only heads trained by epochs have them "
                             "(head='linear', train, finetune; fit-head's default 'auto' fits SVMs and logistic "
                             "regression by CV), with their history.json beside them")
        from ..runs.figures import curves_figure

        return curves_figure(list(self.history_), title=title)


class FeatureHead:
    """A head's own ways with arrays of cached features: fitting on them in memory, scoring them through the
    head alone (mixed into the API's ``Head`` beside ``ImageClassifier``)."""

    def _fit_arrays(self, cfg, X, y):
        """Fit on arrays of cached features ``X`` and labels ``y``, in memory, as fit-head on a cache (``cfg``:
        its options); returns self, fitted."""
        from sklearn.utils.multiclass import check_classification_targets
        from sklearn.utils.validation import check_array, column_or_1d

        from ..devices import resolve_device
        from ..heads.cache_views import FeatureArray
        from ..heads.epoch_loop import split_indices
        from ..heads.fit_head import fit_on_rows, validate, with_recipe

        if y is None:
            raise ValueError("Head requires y to be passed, but the target y is None (or pass a Cache as X)")
        X = check_array(X, allow_nd=True, dtype=(np.float64, np.float32), ensure_min_samples=2)
        y = column_or_1d(y, warn=True)
        check_classification_targets(y)
        if len(X) != len(y):
            raise ValueError(f"X has {len(X)} rows but y has {len(y)} labels")
        labels, y_idx = np.unique(y, return_inverse=True)
        if len(labels) < 2:
            raise ValueError(f"a classifier needs at least 2 classes; y has 1 class ({labels[0]!r})")
        rows = FeatureArray(X, y_idx, [str(c) for c in labels])
        validate(cfg)
        cfg = with_recipe(cfg)
        device = resolve_device(cfg.device)
        train_idx, val_idx = split_indices(y_idx, cfg.val_fraction, cfg.seed)
        fit = fit_on_rows(cfg, rows, train_idx, val_idx, device)
        h = fit.head.cpu().eval()
        metrics = {"val_acc": fit.val["acc"], "val_loss": fit.val["loss"], "per_class_val_acc": fit.val["per_class"],
                   "train_rows": len(train_idx), "val_rows": len(val_idx), "fit_seconds": fit.fit_seconds}
        self._learn({"temperature_": h.temperature_used, "unknown_threshold_": h.threshold_used, "checkpoint_": None,
                     "kind_": "fit-head", "classes_": labels, "backbone_": None, "weights_": None,
                     "feature_shape_": rows.feature_shape, "n_features_in_": int(np.prod(X.shape[1:])),
                     "history_": fit.history, "metrics_": metrics, "config_": asdict(cfg), "cache_": None,
                     "run_dir_": None, "curves_": None, "result_": None}, head=h)
        return self

    def _feature_scores(self, X, batch_size: int, device: Optional[str]):
        """(log-probabilities, unknown scores or None) of arrays of cached features, through the head alone."""
        from sklearn.utils.validation import check_array

        from ..devices import resolve_device
        from ..heads.cache_views import array_scores

        self._check_fitted()
        X = self._checked_features(check_array(X, allow_nd=True, dtype=(np.float64, np.float32)))
        dev = resolve_device(device or self.device)
        return array_scores(self._feature_head(dev), X, self.feature_shape_, dev, max(batch_size, 256))

    def _checked_features(self, X: np.ndarray) -> np.ndarray:
        """``X`` when its rows have as many features as the head's cached maps, else ValueError (as sklearn's)."""
        if int(np.prod(X.shape[1:])) != self.n_features_in_:
            raise ValueError(f"X has {int(np.prod(X.shape[1:]))} features, but Head is expecting "
                             f"{self.n_features_in_} features as input (cached maps of shape {self.feature_shape_})")
        return X

    def _feature_head(self, dev, ckpt: Optional[dict] = None):
        """The head alone, on ``dev``: the one fitted in memory, or its checkpoint's (``ckpt`` when read already)."""
        from .whole_models import head_from_checkpoint

        if self._head is not None:
            return self._head.to(dev).eval()
        ckpt = ckpt or self._read(self._checkpoint())
        return head_from_checkpoint(ckpt, ckpt["state_dict"], self._checkpoint()).to(dev).eval()

    def explain(self, X, *, batch_size: int = 32, workers: Optional[int] = None, device: Optional[str] = None,
                precision: str = "auto") -> np.ndarray:
        """Heatmaps, (N, H, W) in [0, 1], of each photo's predicted class (see ``ImageClassifier.explain``); from
        a Cache (or cache file: every row, in its order) or an array of cached maps, the head alone runs (no
        backbone, no second pass over the photos). A cache made with ``--pool avg`` has no map to explain."""
        from ..heads.heatmaps import normalised
        from .whole_models import FUSED_NO_MAP

        # as predict_proba: the keywords checked for a cache or an array too (batch_size=-3 gave no map at all)
        check_runner("explain", batch_size, workers, device, precision)
        self._check_fitted()
        if "+" in (self.backbone_ or ""):  # fused features ('tiny+tiny_wide'): said so whatever X is; a cache of
            raise UsageError(FUSED_NO_MAP)  # one backbone got 'does not fit ... older rule 3+3', an array 'pooled'
        if is_cache(X):
            return normalised(self._cache_maps(X, batch_size, device))
        if is_features(X):
            return normalised(self._feature_maps(X, batch_size, device))
        return super().explain(X, batch_size=batch_size, workers=workers, device=device, precision=precision)

    def _feature_maps(self, X, batch_size: int, device: Optional[str]) -> np.ndarray:
        """Signed maps of arrays of cached maps, through the head alone."""
        from sklearn.utils.validation import check_array

        from ..devices import resolve_device
        from ..heads.heatmaps import check_spatial, head_maps

        self._check_fitted()  # NaN or inf refused as predict_proba refuses them (they gave NaN maps)
        X = self._checked_features(check_array(X, allow_nd=True, dtype=(np.float64, np.float32)))
        check_spatial(self.feature_shape_, "this head's cache")
        head = self._feature_head(resolve_device(device or self.device))
        return head_maps(head, X.reshape(len(X), *self.feature_shape_), batch_size=batch_size)[1]

    def _cache_maps(self, cache, batch_size: int, device: Optional[str]) -> np.ndarray:
        """Signed maps of every row of a Cache (or cache file), in its order, through the head alone."""
        from ..cache.feature_cache import FeatureCache
        from ..cache.provenance import check_cache_fits
        from ..devices import resolve_device
        from ..heads.heatmaps import cache_head_maps, check_spatial

        ckpt = self._read(self._checkpoint())
        with FeatureCache(os.fspath(cache)) as rows:
            check_spatial(rows.feature_shape, f"cache {rows.path}")
            check_cache_fits(ckpt, rows)
            head = self._feature_head(resolve_device(device or self.device), ckpt)
            return cache_head_maps(head, rows, np.arange(rows.n), batch_size)


def is_cache(X) -> bool:
    """A Cache, or the path of a cache file."""
    from ..cache.handle import Cache

    return isinstance(X, Cache) or (isinstance(X, (str, os.PathLike)) and str(os.fspath(X)).endswith(".h5"))


def is_features(X) -> bool:
    """An array (or nested lists) of cached features, rather than image paths, folders or PIL images."""
    if hasattr(X, "__array__"):
        return not isinstance(X, (str, os.PathLike))
    return isinstance(X, (list, tuple)) and bool(X) and isinstance(X[0], (list, tuple, np.ndarray))
