"""``ProbeHead``: every head kind as one torch module on raw cached maps, and its conversions from scikit-learn.

view -> normalisation -> optional RBF map -> Linear -> LogSoftmax; the checkpoint is plain tensors plus a
small config dict (``torch.load(weights_only=True)`` reads it). ``from_logreg`` and ``from_kernel`` give
the same probabilities as the scikit-learn estimators they come from.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import nn

from .feature_views import (
    Normalizer,
    apply_view_torch,
    check_norm,
    check_view,
    view_dim,
)

log = logging.getLogger(__name__)

CONFIG_KIND = "probe-head"
CONFIG_VERSION = 1
#: Bytes of one (rows x landmarks) kernel array ``log_proba_of_rows`` holds at once: a pool of 20,000 photos
#: against an SVM's 5,000 support rows was 0.8 GB an array (a few at once), growing with both folders.
KERNEL_BLOCK_BYTES = 64 << 20


@dataclass(frozen=True)
class KernelSpec:
    """The RBF map in front of a ProbeHead's Linear layer (``components`` 0: none): its landmarks' number and
    gamma; Nystroem's K_mm^{-1/2} as its own buffer (``separate_norm``) or folded into the Linear layer; the
    normalised rows beside the kernel features (``linear_skip``: a kernel and a linear model summed); the Linear
    layer's first outputs as one-vs-one pairs' margins, coupled into class scores (``pairs``)."""

    components: int = 0
    gamma: Optional[float] = None
    separate_norm: bool = True
    linear_skip: bool = False
    pairs: bool = False


@dataclass(frozen=True)
class TrustParts:
    """The optional parts a checkpoint's head holds (their numbers come with its state): a temperature, and
    ``known_rows`` training rows for the unknown score of its ``unknown_k`` nearest."""

    temperature: bool = False
    known_rows: int = 0
    unknown_k: int = 10


# -- one-vs-one class pairs ----------------------------------------------------------------------
def class_pairs(k: int) -> list[tuple[int, int]]:
    """The class pairs (i, j), i < j, in scikit-learn's SVC order: (0, 1), (0, 2) ... (1, 2) ..."""
    return [(i, j) for i in range(k) for j in range(i + 1, k)]


def pair_columns(k: int) -> torch.Tensor:
    """(K, K-1) indices into [-z, z] (z: the K(K-1)/2 pair margins, > 0 for the pair's first class): for each
    class, the minus log-odds of its K-1 pairwise wins."""
    pairs = class_pairs(k)
    first = [[p for p, (i, _) in enumerate(pairs) if i == c] for c in range(k)]
    second = [[len(pairs) + p for p, (_, j) in enumerate(pairs) if j == c] for c in range(k)]
    cols = [a + b for a, b in zip(first, second)]
    return torch.tensor(cols, dtype=torch.long)


def couple_pairs(z, columns):
    """Class log-scores from pair margins z (B, K(K-1)/2): Price et al.'s coupling of the pairwise probabilities
    r_ij = sigmoid(z_ij), p_i proportional to 1 / (sum_j 1 / r_ij - (K - 2)) = 1 / (1 + sum_j exp(-z_ij)): closed form
    (one logsumexp, so every export runs it), and a class that wins all its pairs clearly gets nearly all the mass,
    as SVC's votes would give it the photo."""
    u = torch.cat([-z, z], 1)[:, columns]  # (B, K, K-1)
    return -torch.logsumexp(torch.cat([torch.zeros_like(u[:, :, :1]), u], 2), 2)


# -- ProbeHead -----------------------------------------------------------------------------------
class ProbeHead(nn.Module):
    """view -> normalisation -> optional RBF (Nystroem) map -> Linear -> LogSoftmax, on raw cached maps.

    Input: (B, C, H, W) features as the cache stores them (any float dtype: cast to the head's).
    Output: (B, classes) log-probabilities. All numbers live in ``state_dict`` (buffers
    ``norm_rms`` / ``norm_mean`` + ``norm_std``, ``landmarks`` (+ ``kernel_norm``), the Linear);
    ``config`` is plain Python. Two optional parts, present once set (older checkpoints lack them and load
    as before): ``temperature`` divides the logits (``set_temperature``: calibration), and ``known_rows``
    + ``unknown_threshold`` score how unlike the training photos an input is (``set_unknown``, ``scores``).
    ``checkpoint()`` / ``from_checkpoint()`` round-trip through
    ``torch.save`` / ``torch.load(weights_only=True)``. With view 'flat', normalisation 'none'
    and no kernel it computes exactly the tutorial's Flatten + Linear(C*H*W) + LogSoftmax.
    """

    def __init__(self, in_shape, n_classes: int, view: str = "flat", normalize: str = "none",
                 kernel: KernelSpec = KernelSpec(), dropout: float = 0.0, dtype=None, trust: TrustParts = TrustParts()):
        super().__init__()
        kernel_components, gamma, kernel_norm = kernel.components, kernel.gamma, kernel.separate_norm
        linear_skip, pairs = kernel.linear_skip, kernel.pairs
        temperature, known_rows, unknown_k = trust.temperature, trust.known_rows, trust.unknown_k
        self.in_shape = tuple(int(s) for s in in_shape)
        check_view(view, self.in_shape)
        check_norm(normalize)
        if n_classes < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got {n_classes}")
        if kernel_components and (gamma is None or gamma <= 0):
            raise ValueError(f"an RBF kernel map needs gamma > 0, got {gamma}")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        dtype = dtype or torch.float32
        self.view, self.normalize, self.n_classes = view, normalize, int(n_classes)
        self.kernel_components = int(kernel_components)
        self.gamma = float(gamma) if self.kernel_components else None
        # Nystroem's K_mm^{-1/2} as its own m x m buffer, or folded into the Linear layer (kernel_norm=False:
        # the same function, m x m fewer numbers; what from_kernel makes)
        self.kernel_norm_separate = bool(kernel_norm) and self.kernel_components > 0
        self.dropout_p = float(dropout)
        d = view_dim(view, self.in_shape)
        if normalize == "rms":
            self.register_buffer("norm_rms", torch.ones((), dtype=dtype))
        elif normalize == "standardize":
            self.register_buffer("norm_mean", torch.zeros(d, dtype=dtype))
            self.register_buffer("norm_std", torch.ones(d, dtype=dtype))
        if self.kernel_components:
            m = self.kernel_components
            self.register_buffer("landmarks", torch.zeros(m, d, dtype=dtype))
            if self.kernel_norm_separate:
                self.register_buffer("kernel_norm", torch.zeros(m, m, dtype=dtype))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # the normalised rows themselves beside the kernel features (a kernel and a linear model summed: ``from_stack``)
        self.linear_skip = bool(linear_skip) and self.kernel_components > 0
        # one-vs-one: the Linear layer's first K(K-1)/2 outputs are the class pairs' margins, coupled into class
        # scores (``couple_pairs``) and weighted by ``pair_weight``; with linear_skip K logits follow, added after
        self.pairs = bool(pairs) and self.kernel_components > 0 and self.n_classes > 2
        self.n_pairs = self.n_classes * (self.n_classes - 1) // 2 if self.pairs else 0
        outputs = self.n_pairs + self.n_classes * (not self.pairs or self.linear_skip)
        self.linear = nn.Linear(self.kernel_components + d * self.linear_skip or d, outputs, dtype=dtype)
        if self.pairs:
            self.register_buffer("pair_weight", torch.ones((), dtype=dtype))
            self.register_buffer("pair_columns", pair_columns(self.n_classes), persistent=False)
        self.log_softmax = nn.LogSoftmax(dim=1)
        self.unknown_k = int(unknown_k)
        if temperature:
            self.set_temperature(1.0)
        if known_rows:
            self.set_unknown(torch.zeros(int(known_rows), self.in_shape[0], dtype=torch.float16), unknown_k, 0.0)

    # -- the plain description ------------------------------------------------------------
    @property
    def config(self) -> dict:
        return {"kind": CONFIG_KIND, "version": CONFIG_VERSION, "in_shape": list(self.in_shape),
                "n_classes": self.n_classes, "view": self.view, "normalize": self.normalize,
                "kernel": "rbf" if self.kernel_components else None,
                "kernel_components": self.kernel_components, "gamma": self.gamma, "dropout": self.dropout_p,
                "kernel_norm": self.kernel_norm_separate, "linear_skip": self.linear_skip, "pairs": self.pairs,
                "temperature": self.calibrated,
                "known_rows": len(self.known_rows) if self.has_unknown else 0, "unknown_k": self.unknown_k}

    def describe(self) -> str:
        k = f", RBF m={self.kernel_components} gamma={self.gamma:.4g}" if self.kernel_components else ""
        k += " one-vs-one" if self.pairs else ""
        k += " + linear" if self.linear_skip else ""
        t = f", T={float(self.temperature):.3g}" if self.calibrated else ""
        u = f", unknown: {len(self.known_rows)} rows k={self.unknown_k}" if self.has_unknown else ""
        return f"ProbeHead(view={self.view}, normalize={self.normalize}{k}, classes={self.n_classes}{t}{u})"

    def checkpoint(self) -> dict:
        """{"config": plain dict, "state_dict": CPU tensors}: what a head.pt needs to rebuild this head."""
        return {"config": self.config, "state_dict": {k: v.detach().cpu() for k, v in self.state_dict().items()}}

    @classmethod
    def from_checkpoint(cls, config: dict, state_dict: dict) -> "ProbeHead":
        """Rebuild from ``checkpoint()``'s two parts (dtype taken from the saved Linear weights)."""
        if config.get("kind") != CONFIG_KIND or config.get("version") != CONFIG_VERSION:
            raise ValueError(f"not a probe-head config (kind {config.get('kind')!r}, "
                             f"version {config.get('version')!r}; this code reads version {CONFIG_VERSION})")
        kernel = KernelSpec(config.get("kernel_components") or 0, config.get("gamma"),
                            separate_norm=config.get("kernel_norm", True), linear_skip=bool(config.get("linear_skip")),
                            pairs=bool(config.get("pairs")))
        trust = TrustParts(temperature=bool(config.get("temperature")), known_rows=int(config.get("known_rows") or 0),
                           unknown_k=int(config.get("unknown_k") or 10))
        head = cls(config["in_shape"], config["n_classes"], config["view"], config["normalize"], kernel,
                   config.get("dropout", 0.0), dtype=state_dict["linear.weight"].dtype, trust=trust)
        head.load_state_dict(state_dict)
        return head

    @classmethod
    def from_linear(cls, weight, bias, in_shape, view: str = "flat", normalizer: Optional[Normalizer] = None,
                    dropout: float = 0.0, dtype=None) -> "ProbeHead":
        """A head from a (classes, d) weight and (classes,) bias over ``view`` rows normalised by ``normalizer``."""
        weight, bias = torch.as_tensor(weight), torch.as_tensor(bias)
        normalizer = normalizer or Normalizer("none")
        head = cls(in_shape, weight.shape[0], view, normalizer.kind, dropout=dropout,
                   dtype=dtype or (weight.dtype if weight.is_floating_point() else None))
        head.set_normalizer(normalizer)
        head.set_linear(weight, bias)
        return head

    # -- filling in the numbers -----------------------------------------------------------
    def set_normalizer(self, normalizer: Normalizer) -> None:
        if normalizer.kind != self.normalize:
            raise ValueError(f"this head normalises with {self.normalize!r}, not {normalizer.kind!r}")
        if not normalizer.fitted:
            raise ValueError(f"the {normalizer.kind!r} normalisation is not fitted")
        with torch.no_grad():
            if self.normalize == "rms":
                self.norm_rms.fill_(normalizer.rms)
            elif self.normalize == "standardize":
                self.norm_mean.copy_(torch.as_tensor(np.asarray(normalizer.mean)))
                self.norm_std.copy_(torch.as_tensor(np.asarray(normalizer.std)))

    def normalizer(self) -> Normalizer:
        """The numpy ``Normalizer`` this head applies (float64 copies of its buffers)."""
        if self.normalize == "rms":
            return Normalizer("rms", rms=float(self.norm_rms))
        if self.normalize == "standardize":
            return Normalizer("standardize", mean=self.norm_mean.double().cpu().numpy(),
                              std=self.norm_std.double().cpu().numpy())
        return Normalizer(self.normalize)

    def set_kernel(self, landmarks, kernel_norm=None) -> None:
        with torch.no_grad():
            self.landmarks.copy_(torch.as_tensor(landmarks))
            if self.kernel_norm_separate:
                self.kernel_norm.copy_(torch.as_tensor(kernel_norm))

    @property
    def calibrated(self) -> bool:
        return hasattr(self, "temperature")

    @property
    def has_unknown(self) -> bool:
        return hasattr(self, "known_rows")

    @property
    def temperature_used(self) -> float:
        """The temperature the logits are divided by (1.0 when not calibrated)."""
        return float(self.temperature) if self.calibrated else 1.0

    @property
    def threshold_used(self):
        """The unknown score above which a photo is unknown, or None without an unknown score."""
        return float(self.unknown_threshold) if self.has_unknown else None

    def set_temperature(self, t: float) -> None:
        """Divide the logits by ``t`` from now on (1 = the fitted head unchanged)."""
        if not (t > 0 and np.isfinite(t)):
            raise ValueError(f"a temperature must be a positive number, got {t}")
        value = torch.tensor(float(t), dtype=self.linear.weight.dtype, device=self.linear.weight.device)
        if self.calibrated:
            self.temperature = value
        else:
            self.register_buffer("temperature", value)

    def set_unknown(self, known_rows, k: int, threshold: float) -> None:
        """Keep ``known_rows`` ((N, C) l2-normalised pooled training rows, float16) and the score above which
        an input is unknown (``unknown_score``)."""
        rows = torch.as_tensor(known_rows).to(torch.float16)
        if rows.dim() != 2 or rows.shape[1] != self.in_shape[0] or not len(rows):
            raise ValueError(f"known rows must be (N >= 1, {self.in_shape[0]}), got {tuple(rows.shape)}")
        self.unknown_k = int(k)
        threshold = torch.tensor(float(threshold), dtype=torch.float64)
        for name, value in (("known_rows", rows), ("unknown_threshold", threshold)):
            if hasattr(self, name):
                delattr(self, name)
            self.register_buffer(name, value)

    def reset_trust(self) -> None:
        """Forget the temperature and the unknown score (fine-tuning changes what they were fitted on)."""
        for name in ("temperature", "known_rows", "unknown_threshold"):
            if hasattr(self, name):
                delattr(self, name)

    def set_linear(self, weight, bias) -> None:
        with torch.no_grad():
            self.linear.weight.copy_(torch.as_tensor(weight))
            self.linear.bias.copy_(torch.as_tensor(bias))

    # -- computing ------------------------------------------------------------------------
    def norm(self, z):
        """The fitted normalisation of (B, d) view rows."""
        if self.normalize == "rms":
            return z / self.norm_rms
        if self.normalize == "l2":
            n = z.norm(dim=1, keepdim=True)
            return z / torch.where(n == 0, torch.ones_like(n), n)
        if self.normalize == "standardize":
            return (z - self.norm_mean) / self.norm_std
        return z

    def kernel_map(self, z):
        """Nystroem's transform: exp(-gamma ||z - landmark||^2) @ K_mm^{-1/2}^T (as sklearn computes it), or
        only its kernel part when K_mm^{-1/2} is folded into the Linear layer."""
        lm = self.landmarks
        d2 = (z * z).sum(1, keepdim=True) - 2.0 * (z @ lm.T) + (lm * lm).sum(1)[None, :]
        k = torch.exp(-self.gamma * d2.clamp_min(0.0))
        return k @ self.kernel_norm.T if self.kernel_norm_separate else k

    def embed(self, x):
        """Raw (B, C, H, W) maps -> what the Linear layer sees."""
        if tuple(x.shape[1:]) != self.in_shape:
            raise ValueError(f"this head takes features of shape {self.in_shape}, got {tuple(x.shape[1:])}")
        return self.features(self.norm(apply_view_torch(x.to(self.linear.weight.dtype), self.view)))

    def features(self, z):
        """Normalised view rows -> what the Linear layer sees: the rows, their kernel features, or both."""
        if not self.kernel_components:
            return z
        k = self.kernel_map(z)
        return torch.cat([k, z], 1) if self.linear_skip else k

    def classify(self, z):
        """Log-probabilities from embedded rows (what ``train_linear`` optimises), at the temperature if set."""
        logits = self.linear(self.dropout(z))
        if self.pairs:
            coupled = self.pair_weight * couple_pairs(logits[:, :self.n_pairs], self.pair_columns)
            logits = coupled + logits[:, self.n_pairs:] if self.linear_skip else coupled
        return self.log_softmax(logits / self.temperature if self.calibrated else logits)

    def forward(self, x):
        return self.classify(self.embed(x))

    def scores(self, x):
        """(log-probabilities, unknown score or None) of raw (B, C, H, W) maps: one pass, two answers."""
        from .unknown_score import knn_distance, pooled_rows

        logp = self(x)
        if not self.has_unknown:
            return logp, None
        return logp, knn_distance(pooled_rows(x), self._known_float32(), self.unknown_k)

    def _known_float32(self):
        """``known_rows`` widened once (per device) and kept: widening 25,000 rows on every call cost
        20 ms a photo; the float32 copy is not saved (the checkpoint keeps float16)."""
        rows = self.known_rows
        cached = getattr(self, "_known_cache", None)
        if cached is None or cached[0] is not rows:
            cached = self._known_cache = (rows, rows.float())
        return cached[1]

    def log_proba_of_rows(self, rows) -> np.ndarray:
        """Log-probabilities of (N, d) rows of this head's view (not raw maps), as a float64 array; a kernel
        head takes them in blocks (``row_block``), so its rows x landmarks arrays stay bounded."""
        rows = np.asarray(rows)
        block = self.row_block()
        if len(rows) <= block:
            return self._log_proba(rows)
        return np.concatenate([self._log_proba(rows[lo:lo + block]) for lo in range(0, len(rows), block)])

    def _log_proba(self, rows: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            z = self.norm(torch.as_tensor(rows).to(self.linear.weight.dtype))
            return self.classify(self.features(z)).double().cpu().numpy()

    def row_block(self) -> int:
        """Rows per block whose kernel values (rows x landmarks) fit ``KERNEL_BLOCK_BYTES`` (at least 256)."""
        if not self.kernel_components:
            return 1 << 62
        return max(256, KERNEL_BLOCK_BYTES // (self.kernel_components * self.linear.weight.element_size()))


# -- scikit-learn -> ProbeHead -------------------------------------------------------------------
def _logreg_linear(clf) -> tuple[np.ndarray, np.ndarray]:
    """(classes, d) weights and (classes,) biases whose softmax is ``clf.predict_proba``.

    Binary: sklearn's p(class 1) = sigmoid(w.x + b), and softmax([0, w.x + b]) is exactly
    [1 - sigmoid, sigmoid]. Multiclass (multinomial): softmax(W x + b) directly.
    """
    classes = np.asarray(clf.classes_)
    k = len(classes)
    if not np.array_equal(classes, np.arange(k)):
        raise ValueError(f"the classifier was fitted on labels {classes.tolist()}; a head needs every class "
                         f"0..K-1 in its training rows")
    coef = np.asarray(clf.coef_, np.float64)
    b = np.asarray(clf.intercept_, np.float64).reshape(-1)
    if k == 2:
        return np.vstack([np.zeros_like(coef), coef]), np.array([0.0, b[0]])
    if getattr(clf, "multi_class", "multinomial") == "ovr" or getattr(clf, "solver", "") == "liblinear":
        raise ValueError("one-vs-rest logistic regression is not a softmax; fit a multinomial one (lbfgs)")
    return coef, b


def from_logreg(clf, in_shape, view: str = "flat", normalizer: Optional[Normalizer] = None, dtype=None):
    """A ProbeHead giving ``clf.predict_proba`` (clf fitted on ``normalizer``-normalised ``view`` rows).

    float64 by default, so its probabilities match scikit-learn's to ~1e-12, not float32's ~1e-6.
    """

    w, b = _logreg_linear(clf)
    return ProbeHead.from_linear(w, b, in_shape, view, normalizer, dtype=dtype or torch.float64)


def from_kernel(nystroem, clf, in_shape, view: str = "flat", normalizer: Optional[Normalizer] = None, dtype=None):
    """A ProbeHead giving ``clf.predict_proba(nystroem.transform(rows))`` for an RBF Nystroem map.

    Nystroem's transform is K(x, landmarks) @ N^T, so the Linear layer's W @ (K N^T)^T is (W N) @ K^T:
    the head stores W N (classes x m) instead of N (m x m), the same function in far fewer numbers.
    """

    if nystroem.kernel != "rbf":
        raise ValueError(f"only the RBF kernel converts to a ProbeHead, not {nystroem.kernel!r}")
    landmarks = np.asarray(nystroem.components_, np.float64)
    gamma = nystroem.gamma if nystroem.gamma is not None else 1.0 / landmarks.shape[1]  # rbf_kernel's default
    normalizer = normalizer or Normalizer("none")
    w, b = _logreg_linear(clf)
    head = ProbeHead(in_shape, w.shape[0], view, normalizer.kind,
                     KernelSpec(len(landmarks), float(gamma), separate_norm=False), dtype=dtype or torch.float64)
    if landmarks.shape[1] != view_dim(view, in_shape):
        raise ValueError(f"the Nystroem map was fitted on {landmarks.shape[1]}-d rows; the {view!r} view "
                         f"of {tuple(in_shape)} maps is {view_dim(view, in_shape)}-d")
    head.set_normalizer(normalizer)
    head.set_kernel(landmarks)
    head.set_linear(w @ np.asarray(nystroem.normalization_, np.float64), b)
    return head




def from_svm(expansion, in_shape, view: str = "flat", normalizer: Optional[Normalizer] = None, dtype=None,
             pair_scale: float = 1.0):
    """A ProbeHead whose scores are an SVM's (``sklearn_fits.fit_svm``'s ``KernelExpansion``, fitted on
    ``normalizer``-normalised ``view`` rows): its support rows are the kernel stage's landmarks (no
    K_mm^{-1/2}: the identity), the expansion's coefficients the Linear layer. Its softmax is a probability
    once a temperature (fitted on out-of-fold scores) scales it. One-vs-one pairs' margins are multiplied by
    ``pair_scale`` (fitted on out-of-fold margins) and coupled into class scores (``couple_pairs``)."""
    normalizer = normalizer or Normalizer("none")
    rows, w = np.asarray(expansion.rows, np.float64), np.asarray(expansion.weight, np.float64)
    if rows.shape[1] != view_dim(view, in_shape):
        raise ValueError(f"the SVM was fitted on {rows.shape[1]}-d rows; the {view!r} view of {tuple(in_shape)} "
                         f"maps is {view_dim(view, in_shape)}-d")
    k = svm_classes(expansion)
    head = ProbeHead(in_shape, k, view, normalizer.kind,
                     KernelSpec(len(rows), float(expansion.gamma), separate_norm=False, pairs=expansion.pairs),
                     dtype=dtype or torch.float64)
    head.set_normalizer(normalizer)
    head.set_kernel(rows)
    scale = pair_scale if expansion.pairs else 1.0
    head.set_linear(scale * w, scale * np.asarray(expansion.bias, np.float64))
    return head


def svm_classes(expansion) -> int:
    """How many classes an SVM's expansion scores (K, or the K of its K(K-1)/2 pairs)."""
    n = len(expansion.bias)
    return int(round((1 + math.sqrt(1 + 8 * n)) / 2)) if expansion.pairs else n


def from_stack(expansion, svm_weight: float, clf, logreg_weight: float, in_shape, view: str = "flat",
               normalizer: Optional[Normalizer] = None, dtype=None, pair_scale: float = 1.0, pairs=None,
               pairs_weight: float = 0.0):
    """A ProbeHead whose logits are ``svm_weight`` x an SVM's scores + ``logreg_weight`` x a logistic
    regression's logits (+ ``pairs_weight`` x a one-vs-one SVM's coupled pairs, ``pairs``), all fitted on the
    same ``normalizer``-normalised ``view`` rows: one Linear layer over the kernel features of both SVMs'
    support rows and the rows themselves (``linear_skip``). With pairs (from either SVM) the Linear layer's first
    outputs are their margins times ``pair_scale`` (from the kernel features), coupled and weighted by
    ``pair_weight``; the class logits follow."""
    normalizer = normalizer or Normalizer("none")
    parts = [(e, w) for e, w in ((expansion, svm_weight), (pairs, pairs_weight)) if e is not None]
    rows, inverse = np.unique(np.concatenate([np.asarray(e.rows, np.float64) for e, _ in parts]), axis=0,
                              return_inverse=True)
    k = svm_classes(expansion)
    w_lr, b_lr = _logreg_linear(clf)
    pair_part = next(((e, w) for e, w in parts if e.pairs), None)
    n_pairs = len(pair_part[0].bias) if pair_part else 0
    weight, bias = np.zeros((n_pairs + k, len(rows) + w_lr.shape[1])), np.zeros(n_pairs + k)
    start = 0
    for e, w in parts:  # each expansion's support rows, placed at their column in the union
        cols = inverse.reshape(-1)[start:start + len(e.rows)]
        start += len(e.rows)
        target = slice(0, n_pairs) if e.pairs else slice(n_pairs, None)
        factor = pair_scale if e.pairs else w
        np.add.at(weight[target], (slice(None), cols), factor * np.asarray(e.weight, np.float64))
        bias[target] += factor * np.asarray(e.bias, np.float64)
    weight[n_pairs:, len(rows):] = logreg_weight * w_lr
    bias[n_pairs:] += logreg_weight * b_lr
    stacked = ProbeHead(in_shape, k, view, normalizer.kind,
                        KernelSpec(len(rows), float(expansion.gamma), separate_norm=False, linear_skip=True,
                                   pairs=pair_part is not None), dtype=dtype or torch.float64)
    stacked.set_normalizer(normalizer)
    stacked.set_kernel(rows)
    stacked.set_linear(weight, bias)
    if pair_part is not None:
        with torch.no_grad():
            stacked.pair_weight.fill_(pair_part[1])
    return stacked
