"""The extract stage: image folder -> frozen CNN -> HDF5 feature cache, resumable and reused.

The cache's name is a fingerprint of everything that changes its contents, so the same request
is answered from disk without importing torch. The work itself is ``extract_range``: reader
(``reader``) -> model (``inference.Inference``) -> writer (``feature_cache.CacheWriter``); under torchrun,
``distributed`` runs it once per shard.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Optional

from ..cache.feature_cache import cache_file_name, claim_for_training, fingerprint
from ..cache.freshness import set_aside, stale_reason
from ..cache.provenance import installed, package_version
from ..config import ExtractConfig, Placeholder, check_config, option_text
from ..data.folders import POOL, TEST, ImageFolderListing, list_folder
from ..data.image_reader import DECODE_VERSION
from ..data.moves import reading_folder
from ..devices import cpu_flags
from ..errors import UsageError
from ..files import check_output, check_writable
from . import backbones as bb
from . import distributed, libraries
from .extract_range import existing_cache, extract_range, hit_summary

log = logging.getLogger(__name__)


def validate(cfg: ExtractConfig) -> None:
    check_config(cfg)
    if cfg.precision == "int8":
        from .quantize import MAX_BATCH, require_torchao

        require_torchao()
        if cfg.batch_size > MAX_BATCH:
            raise UsageError(f"{option_text('batch_size', cfg.batch_size)} is more than the {MAX_BATCH} an int8 "
                             "network takes")
        if cfg.calib_data and not Path(cfg.calib_data).is_dir():
            raise UsageError(f"calibration folder {cfg.calib_data!r} does not exist")
    check_backbone(cfg)
    if not Path(cfg.data).is_dir():
        raise UsageError(f"data folder {cfg.data!r} does not exist; `python cli.py fetch-data` downloads the Kaggle "
                         f"cats-vs-dogs set to data/PetImages, or pass {option_text('data', Placeholder('DIR'))}")
    photos = [(cfg.data, "--data"), (cfg.calib_data, "--calib-data")]
    # written=False: a complete cache there is a hit, read from a read-only folder too
    check_output(cfg.cache_dir, data=photos, what="--cache-dir", folder=True, written=False)
    if cfg.shard_dir:
        check_output(cfg.shard_dir, data=photos, what="--shard-dir", folder=True)
    if bb.is_weights_path(cfg.weights) and not Path(cfg.weights).is_file():
        raise UsageError(f"weights file {cfg.weights!r} does not exist")


def check_n(cfg: ExtractConfig, total: int) -> None:
    """--n within the ``total`` images there are, refused before any work (demo: before any file moves)."""
    if cfg.n > total:
        raise UsageError(f"{option_text('n', cfg.n)} is more than the {total} images in {cfg.data}")


def check_backbone(cfg: ExtractConfig) -> None:
    """An unknown --backbone is a usage error before anything else; resolving a name imports torch, so a
    name with caches of its own in --cache-dir (it resolved when they were made) is left for a hit."""
    name = bb.canonical_request(cfg.backbone, cfg.weights)[0]  # a timm tag beside other --weights: refused now
    if libraries.split_prefix(cfg.backbone)[0] == "torchvision":  # its canonical name is bare: timm's X would do
        libraries.library_of(cfg.backbone)
    if not any(Path(cfg.cache_dir).glob(cache_file_name(name, 0, "*").replace("-nall-", "-n*-"))):
        bb.get_spec(name)


#: ``--precision auto`` picks int8 + compile for CPU runs of at least this many images. Its one-off costs
#: (calibration about 20 s, compiling about 15 s cold: docs/performance.md) are repaid at 0.036-0.05 s
#: saved per image (int8 + compile 42 vs bf16 17 img/s end to end on a 2-core AVX-512 VNNI EPYC; 21.6 vs
#: 10.4 on another), i.e. after 700-1,000 images; on a 2-core AMX Xeon (issue 35: bf16 21.7, int8 + compile
#: 61.9 img/s, 0.030 s saved per image; 19.1 s calibration + 13.6 s compile) after about 1,100, less the 6 s
#: a compiled run no longer spends lowering. Held-out accuracy on int8 rows matched bf16's on the proxies.
INT8_AUTO_MIN_IMAGES = 1000
#: ... and from this many once the project has paid them (``oneoffs``: the calibration kept, the compile's
#: kernels cached): rebuilding the network from its observers (about 3 s) and a warm compile (about 5 s on the
#: EPYC) are repaid after 170 images there and about 270 at the AMX Xeon's saving.
INT8_AUTO_MIN_IMAGES_PAID = 300
#: CPU flags of int8 dot products int8 + compile was measured fast on: AVX-512 VNNI (EPYC) and AMX (Xeon)
INT8_FLAGS = ("avx512_vnni", "amx_int8")


def auto_precision(cfg: ExtractConfig, images: int, paid: bool = False) -> tuple[str, str]:
    """What ``--precision auto`` means for this run, and why: int8 where it is measured to pay on the CPU
    (torchao present, int8 dot products: AVX-512 VNNI or AMX, no CUDA device, a run long enough to repay the
    calibration and compile: ``paid``, the project holds them already, shortens it), else 'auto' (bf16 or
    fp32, decided with the device). Decided from the request alone and without torch, so that a cache hit is
    still answered without importing it."""
    if cfg.precision != "auto":
        return cfg.precision, ""
    flags = cpu_flags()
    gpu = cfg.device != "cpu" and (cfg.device.startswith("cuda") or Path("/dev/nvidia0").exists())
    least = INT8_AUTO_MIN_IMAGES_PAID if paid else INT8_AUTO_MIN_IMAGES
    why_not = ("a CUDA device" if gpu else
               "no torchao" if not installed("torchao") else
               "no int8 dot products (AVX-512 VNNI or AMX)" if not flags & set(INT8_FLAGS) else
               f"{images} images (int8 repays its {'reused ' if paid else ''}calibration and compile from {least})"
               if images < least else "")
    if why_not:
        return "auto", f"precision auto: bf16 or fp32, not int8: {why_not}"
    unit = "AMX" if "amx_int8" in flags else "AVX-512 VNNI"
    return "int8", (f"precision auto: int8 + compile ({images} images on a CPU with {unit}: 2-3x bf16 after a "
                    f"one-off calibration and compile{', both kept from an earlier run' if paid else ''}); "
                    f"{option_text('precision', 'bf16')} keeps the float network")


def one_offs_paid(cfg: ExtractConfig, listing: ImageFolderListing) -> bool:
    """Whether the project's one-offs folder holds this request's int8 calibration (without torch)."""
    from .oneoffs import has_calibration, oneoffs_dir, request_key
    from .quantize import lent_calibration, request_identity

    if cfg.precision != "auto" or not installed("torchao"):
        return False
    if lent_calibration(cfg)[0] is not None:  # rebuilt from a cache's observers: no calibration to pay
        return True
    identity = request_identity(cfg, listing)
    request = request_key(identity, cfg.backbone, bb.weights_identity(cfg.weights))
    return has_calibration(oneoffs_dir(cfg.cache_dir), request)


def with_own_lender(cfg: ExtractConfig, listing: ImageFolderListing) -> ExtractConfig:
    """``cfg`` lending itself its folder's earlier int8 calibration (``quantize.own_lender``) where it may quantise
    to int8 (--precision int8 or auto) and says nothing of what to calibrate on: so a folder with photos added or
    relabelled since keeps its network, and only the photos new to it are computed. Without torch."""
    if cfg.precision not in ("int8", "auto") or not installed("torchao"):
        return cfg
    from .quantize import own_lender

    lender = own_lender(cfg, listing)
    return replace(cfg, calib_cache=lender) if lender else cfg


def prefers_float(cfg: ExtractConfig) -> bool:
    """Whether ``--precision auto`` runs this backbone in float rather than int8 (imports torch): a network
    with depthwise convolutions does. EfficientNet-Lite0 on 1,000 photos (docs/performance.md): int8 +
    compile 23.3 img/s after 104 s of calibration and compiling, bf16 21.9 eager and 30.4 compiled; so
    bf16, compiled from ``COMPILE_MIN_IMAGES_DEPTHWISE`` images."""
    return bb.has_depthwise(bb.bare_features(cfg.backbone, "meta"))


def cache_key(cfg: ExtractConfig, listing: ImageFolderListing) -> str:
    """Fingerprint of everything that changes the cache's contents (not batch size, workers or --compile:
    they change speed and at most the last bits of a row, see ``compiled``).

    int8 adds its calibration (method, sample, torch and torchao versions): another calibration
    quantises the network differently. One lent by ``calib_cache`` is named as that cache names it, so rows
    are reused between them, and a folder put back as it was (audit --undo) is the earlier cache again.
    """
    from .quantize import request_identity

    int8 = cfg.precision == "int8"
    return fingerprint({
        "format": 1, "data": listing.fingerprint(), "backbone": cfg.backbone, **bb.weights_identity(cfg.weights),
        "n": cfg.n, "seed": cfg.seed, "dtype": cfg.dtype, "precision": cfg.precision, "pool": cfg.pool,
        "torchvision": package_version("torchvision"),
        # how files become pixels (PIL's reduced decoding of large JPEGs; another decoder): other pixels
        "decode_version": DECODE_VERSION, **({"decode": cfg.decode} if cfg.decode != "pil" else {}),
        **({"flip": "mirror-mean"} if cfg.flip else {}),
        **({"purpose": POOL} if cfg.purpose == POOL else {}),  # the same folder listed without its classes
        **({"int8": request_identity(cfg, listing)} if int8 else {}),
    })


@dataclass(frozen=True)
class ExtractResult:
    """extract's answer: the cache, and what this run did to make it (nothing on a hit). Five shapes, whose
    --json keys ``to_dict`` gives in their order: a hit, a computed cache, torchrun's rank 0 (the joined
    cache, each rank's counts) and its other ranks (their shards: ``rank`` set; a hit's too)."""

    cache: str
    hit: bool
    rows: int
    skipped: int  # files that could not be decoded (no row)
    feature_shape: Optional[list] = None  # not on torchrun's other ranks
    classes: Optional[list] = None
    precision: Optional[str] = None
    flip: Optional[bool] = None
    seconds: Optional[float] = None
    verified: Optional[bool] = None  # a hit: every photo checked against its sha256 (not under torchrun)
    rank: Optional[int] = None  # torchrun's ranks other than 0: their own shards' counts, printed by none
    computed: Optional[int] = None  # computed: rows the network made this run
    resumed_from: Optional[int] = None
    reused: Optional[int] = None  # rows of earlier caches found by content (not under torchrun)
    label_changes: Optional[int] = None
    device: Optional[str] = None
    img_per_s: Optional[float] = None
    wall_img_per_s: Optional[float] = None
    stage_seconds: Optional[dict] = None  # where the time went: reading, the model, writing
    compile_seconds: Optional[float] = None
    compiled: Optional[bool] = None
    compile_cache: Optional[str] = None
    decoding: Optional[str] = None
    calibration_seconds: Optional[float] = None  # int8: what the calibration (or reusing one) took
    calibration_reused: Optional[bool] = None
    world_size: Optional[int] = None  # torchrun's rank 0: the joined cache's shards and each rank's counts
    shard_dir: Optional[str] = None
    shards: Optional[int] = None
    ranks: Optional[list] = None

    #: each shape's keys in --json's order; those of OPTIONAL only where they have a value
    HIT = ("cache", "hit", "rows", "skipped", "feature_shape", "classes", "precision", "flip", "seconds", "verified",
           "rank")
    COMPUTED = ("cache", "hit", "rows", "computed", "resumed_from", "reused", "label_changes", "skipped",
                "feature_shape", "classes", "device", "precision", "flip", "seconds", "img_per_s", "wall_img_per_s",
                "stage_seconds", "compile_seconds", "compiled", "compile_cache", "decoding", "calibration_seconds",
                "calibration_reused")
    SHARDED = ("cache", "hit", "rows", "computed", "resumed_from", "skipped", "feature_shape", "classes", "device",
               "precision", "flip", "seconds", "img_per_s", "world_size", "shard_dir", "shards", "ranks")
    RANK = ("cache", "hit", "rank", "skipped", "rows", "computed", "resumed_from", "seconds", "device", "precision",
            "img_per_s")
    OPTIONAL = ("verified", "rank", "calibration_seconds", "calibration_reused")

    @classmethod
    def of(cls, summary: dict) -> ExtractResult:
        """From the summary extract_range, a hit or torchrun's ranks put together (keys: the fields')."""
        known = {f.name for f in fields(cls)}
        unknown = set(summary) - known
        if unknown:
            raise ValueError(f"ExtractResult has no field for {sorted(unknown)}")
        return cls(**summary)

    def to_dict(self) -> dict:
        """The answer as --json prints it: this shape's keys (a rank's device and precision where it ran)."""
        keys = (self.HIT if self.hit else self.SHARDED if self.world_size is not None
                else self.RANK if self.rank is not None else self.COMPUTED)
        optional = (*self.OPTIONAL, "device", "precision") if keys is self.RANK else self.OPTIONAL
        return {k: getattr(self, k) for k in keys if k not in optional or getattr(self, k) is not None}


def extract(cfg: ExtractConfig, hit_only: bool = False) -> Optional[ExtractResult]:
    """Run (or reuse, or resume) one extraction; returns what it did, with the cache path. The data folder
    is held for reading meanwhile (``moves.reading_folder``): never listed or read halfway through an
    audit --apply, which waits (or is refused) until the extraction ends. ``hit_only``: a hit's answer, or None
    where the network would run (nothing loaded or written): choose-backbone loads only the weights it needs."""
    with reading_folder(cfg.data):
        summary = extract_held(cfg, hit_only)
        return None if summary is None else ExtractResult.of(summary)


def say_why(why: str, cfg: ExtractConfig, images: int) -> None:
    """auto_precision's line, said when it matters (what was chosen, or why a long run is not int8), by the run that
    hits or extracts: not by hit_only's miss too (choose-backbone said it twice for each candidate it extracted)."""
    if why:
        log.log(logging.INFO if cfg.precision == "int8" or images >= INT8_AUTO_MIN_IMAGES else logging.DEBUG,
                "%s", why)


def spelled_otherwise(cfg: ExtractConfig, listing: ImageFolderListing, key: str, path: Path, info) -> tuple:
    """(cfg, key, path, info) of the request's cache; where it has none (``info`` None), of its cache made with the
    same library weights named the other way: ``--weights DEFAULT`` and the default's own name (timm's default tag,
    ``in1k``; torchvision's ``IMAGENET1K_V1``) are one network, whose caches were keyed by the spelling. Such a cache
    is taken only where its record names the weights this request resolves to now (a library update may have
    moved the default). Imports torch, so only on a miss (a hit of the request's own key stays torch-free), and
    only where the DEFAULT cache's record cannot answer (``default_spelled``)."""
    if info is not None or cfg.weights.lower() == "none" or bb.is_weights_path(cfg.weights):
        return cfg, key, path, info
    found = default_spelled(cfg, listing)
    if found is not None:
        return found
    try:
        spelling = bb.other_spelling(cfg.backbone, cfg.weights)
    except UsageError:  # weights the library does not have: said by the extraction that follows
        spelling = ""
    if not spelling:
        return cfg, key, path, info
    other = replace(cfg, weights=spelling)
    other_key = cache_key(other, listing)
    other_path = Path(cfg.cache_dir) / cache_file_name(cfg.backbone, cfg.n, other_key)
    other_info = existing_cache(other_path, other_key)
    if other_info is None or other_info.attrs.get("weights") != bb.load_preprocessing(cfg.backbone, cfg.weights)[1]:
        return cfg, key, path, info
    log.info("%s: made with %s, the same weights as %s", other_path, option_text("weights", spelling),
             option_text("weights", cfg.weights))
    return other, other_key, other_path, other_info


def default_spelled(cfg: ExtractConfig, listing: ImageFolderListing) -> Optional[tuple]:
    """(cfg, key, path, info) of the request's --weights DEFAULT cache where the request names DEFAULT's weights by
    their own name and the cache's record says so without torch: it names the weights the cache holds (timm's
    ``timm:X.tag``, torchvision's ``X_Weights.NAME``), and that is what DEFAULT is now where the library that made
    it is this one (torchvision's version is in the key; timm's is in the record). Else None."""
    if cfg.weights.upper() == "DEFAULT":
        return None
    other = replace(cfg, weights="DEFAULT")
    other_key = cache_key(other, listing)
    other_path = Path(cfg.cache_dir) / cache_file_name(cfg.backbone, cfg.n, other_key)
    other_info = existing_cache(other_path, other_key)
    made = str(other_info.attrs.get("weights", "")) if other_info is not None else ""
    if (made.split(".")[-1] != cfg.weights.split(".")[-1]
            or made.startswith("timm:") and timm_made(other_info) != package_version("timm")):
        return None
    log.info("%s: made with %s, the same weights as %s", other_path, option_text("weights", "DEFAULT"),
             option_text("weights", cfg.weights))
    return other, other_key, other_path, other_info


def timm_made(info) -> Optional[str]:
    """The version of timm that made a cache, as its record says (None where it does not)."""
    try:
        return json.loads(info.attrs.get("versions") or "{}").get("timm")
    except ValueError:
        return None


def default_moved(cfg: ExtractConfig, info) -> Optional[str]:
    """Why a cache of ``--weights DEFAULT`` of a timm model holds other weights than DEFAULT means now, or None.
    Its key names the weights as written, and timm's version is not in it (torchvision's is), so a timm update that
    moved the model's default tag would find it: checked where the cache was made with another timm version (read
    without torch; only then is timm asked what DEFAULT means now)."""
    made = str(info.attrs.get("weights", ""))
    if cfg.weights.upper() != "DEFAULT" or not made.startswith("timm:"):
        return None
    then = timm_made(info)
    if then == package_version("timm"):
        return None
    now = bb.load_preprocessing(cfg.backbone, cfg.weights)[1]
    if now == made:
        return None
    return (f"it holds the features of timm's {made[5:]}, DEFAULT of timm {then}; with timm "
            f"{package_version('timm')} DEFAULT is {now[5:]}, other weights")


def older_map(cfg: ExtractConfig, info) -> Optional[str]:
    """Why a cache of ``cfg.backbone`` holds another map than its trunk gives now (made before a change of that
    trunk: ``provenance.TRUNK_CHANGES``), or None. Without torch; every other backbone's caches have none."""
    older = bb.older_trunk(cfg.backbone, str(info.attrs.get("trunk_version", "")))
    return f"it holds rows of {older}" if older else None


def extract_held(cfg: ExtractConfig, hit_only: bool = False) -> Optional[dict]:
    started = time.time()
    validate(cfg)
    # timm:X and X name one cache, and so do --backbone X.tag and --backbone X --weights tag
    cfg = replace(cfg, **dict(zip(("backbone", "weights"), bb.canonical_request(cfg.backbone, cfg.weights))))
    listing = list_folder(cfg.data, cfg.purpose)  # a pool to label (suggest): its photos, unlabelled
    total = len(listing.files)
    check_n(cfg, total)
    images = cfg.n or total
    lent = with_own_lender(cfg, listing)
    precision, why = auto_precision(lent, images, one_offs_paid(lent, listing))
    # --precision auto's float choice, when the network runs faster in float (see below); None where not auto's int8
    float_cfg = cfg if precision != cfg.precision else None
    if precision == "int8":  # a float network has no calibration to lend
        cfg = lent
    if precision != cfg.precision:  # the same cache, key and network as --precision int8
        cfg = replace(cfg, precision=precision)
        validate(cfg)
    key = cache_key(cfg, listing)
    path = Path(cfg.cache_dir) / cache_file_name(cfg.backbone, cfg.n, key)
    if distributed.world_size() > 1:  # started by torchrun: this rank extracts its shard
        return distributed.extract_sharded(cfg, listing, key, path, started)
    cfg, key, path, info = spelled_otherwise(cfg, listing, key, path, existing_cache(path, key))
    if (info is None or not info.complete) and float_cfg is not None:
        # auto's int8 is for dense networks; one with depthwise convolutions (EfficientNet, MobileNet) runs
        # faster in bf16: its cache is auto's answer too (found without torch on a hit)
        float_cfg = replace(float_cfg, weights=cfg.weights)
        float_key = cache_key(float_cfg, listing)
        float_path = Path(cfg.cache_dir) / cache_file_name(cfg.backbone, cfg.n, float_key)
        float_cfg, float_key, float_path, float_info = spelled_otherwise(float_cfg, listing, float_key, float_path,
                                                                         existing_cache(float_path, float_key))
        if (float_info is not None and float_info.complete) or (info is None and prefers_float(cfg)):
            why = f"precision auto: float, not int8: {cfg.backbone} has depthwise convolutions"
            cfg, key, path, info = float_cfg, float_key, float_path, float_info
    verified = False
    if info is not None:
        moved = default_moved(cfg, info) or older_map(cfg, info)
        stale, verified = (moved, False) if moved else stale_reason(info, listing, cfg.verify)
        if stale and hit_only:  # a miss: set aside (and said) by the extraction that follows, if it follows
            return None
        if stale:  # extracted again, its rows reused by content: only what changed is computed
            log.warning("%s is stale: %s; extracting again%s", path, stale,
                        "" if moved else " (its rows are reused where the photo's bytes are the same)")
            aside = set_aside(path)
            if aside is not None and cfg.calib_cache and Path(cfg.calib_cache).resolve() == path.resolve():
                cfg = replace(cfg, calib_cache=str(aside))  # its own lender: the network is still its observers'
            info = None
    if info is not None and info.complete:
        say_why(why, cfg, images)
        if info.attrs.get("purpose") == TEST and cfg.purpose != TEST:
            claim_for_training(info)  # what the user extracts is what fit-head then trains on by default
        return {**hit_summary(info, started), "verified": verified}
    if hit_only:
        return None
    say_why(why, cfg, images)
    bb.get_spec(cfg.backbone)  # an unknown name: a usage error before anything is written
    if info is not None:
        log.info("resuming %s from row %d", path, info.rows)
    # a hit needs no writing (a complete cache in a read-only folder); a miss does: one line, not "a bug?"
    check_writable(path.parent, "--cache-dir", cfg.cache_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    return extract_range(cfg, listing, key, path, resumed=info)
