"""Every stage's options: one config dataclass per command and the choices each option allows.

Light on purpose (the standard library only): the CLI and the API import it at start-up, so a cache hit
answers without importing torch. Each field's comment is its help text; the stages validate the values.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

# Choices (what an option allows; the CLI's click.Choice lists and the stages' checks use these)
KAGGLE_CATS_DOGS_URL = ("https://download.microsoft.com/download/3/E/1/"
                        "3E1C3F21-ECDB-4869-8368-6DEBA77B919F/kagglecatsanddogs_5340.zip")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")
MODEL_PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # predict, evaluate --data, train, finetune: no int8
STORAGE_DTYPES = ("float16", "float32")
POOLS = ("none", "avg")
DECODERS = ("pil", "device")
COMPILE = ("auto", "on", "off")
VIEWS = ("flat", "avg", "max", "avgmax")
NORMS = ("none", "rms", "l2", "standardize")
POOLED_VIEWS = ("avg", "flat")  # what a (C, 1, 1) cache allows
HEADS = ("auto", "linear", "logreg", "kernel", "svm")
RECIPES = ("default", "seed")
FORMATS = ("table", "csv", "json")
EXPORT_FORMATS = ("onnx", "torchscript")  # export --format
SPLITS = ("val", "all")
#: where a head's temperature is fitted: out-of-fold predictions of the training rows + the validation
#: rows (sklearn heads; others: the validation rows), the validation rows only, or not at all (T = 1)
CALIBRATIONS = ("cv", "val", "none")
#: Learning rates (and weight decays) accepted: beyond these an optimiser's float32 state overflows
#: (1e38 is a RuntimeError inside Adam) and nothing useful was ever trained.
MAX_LR = 10.0
MAX_WEIGHT_DECAY = 10.0
MAX_C = 1e6  # logistic regression's inverse regularisation: past this it is no regularisation at all
#: Most channels feature-map draws over the image: each is one more panel (512 took minutes).
MAX_TOP_K = 32


@dataclass
class FetchConfig:
    """Where an archive comes from and where it goes."""

    dest: str = "data"  # folder that receives the archive and its unpacked contents
    url: str = KAGGLE_CATS_DOGS_URL  # a zip or tar archive (http, https or file URL)
    timeout: float = 60.0  # seconds to wait for the server (connect, or between two reads)
    retries: int = 3  # how often an interrupted transfer resumes by itself before giving up
    retry_wait: float = 2.0  # seconds before the first retry; doubles each time
    overwrite: bool = False  # unpack over files already in dest; by default a conflict is refused, naming the file


@dataclass
class CheckImagesConfig:
    """Which folder to check, where to report, and whether to quarantine."""

    root: str  # the folder to check (every file below it, hidden folders excepted)
    report: str | None = None  # write all findings to this .csv or .json file (by suffix)
    quarantine: bool = False  # move the files with errors under quarantine_dir, keeping relative paths
    quarantine_dir: str | None = None  # where to move them; default '<root>.quarantine' beside root
    workers: int = -1  # decoding processes; -1 = one per CPU core, 1 = in this process


@dataclass
class ExtractConfig:
    """What to extract, from where, and how."""

    data: str = "data/PetImages"  # ImageFolder root: one sub-folder of images per class
    n: int = 800  # how many good images (a seeded stratified sample); 0 = all
    backbone: str = "vgg16"  # any torchvision or timm model name (timm:/torchvision: force one), validated at use
    weights: str = "DEFAULT"  # DEFAULT, a torchvision weights name or timm tag, path to a state-dict file, or 'none'
    batch_size: int = 32  # images per forward pass (and per committed write)
    device: str = "auto"  # 'auto' (CUDA if available), 'cpu', 'cuda', 'cuda:N'
    # -1: with a CPU network, a thread per core in turns with it, else a process per core (<= 8); 0: in-process
    workers: int = -1
    seed: int = 0  # which n images: the seed of the stratified sample
    dtype: str = "float16"  # storage dtype of features: float16 (half the size, same accuracy) or float32
    # compute precision: fp32, bf16, fp16 (CUDA), int8 (CPU), or auto: int8 + compile for CPU runs of 1,000+
    # images where measured to pay (AVX-512 VNNI without AMX, torchao installed), else bf16 where supported
    precision: str = "auto"
    compile: str = "auto"  # torch.compile the backbone: on, off, auto (int8, and long CPU runs: see should_compile)
    calib_n: int = 64  # int8: calibration images, the first of the seeded sample
    calib_data: str = ""  # int8: calibrate on this folder's sample ('' = --data; a test set uses its training data's)
    pool: str = "none"  # 'none' keeps the C x H x W map; 'avg' stores globally averaged C x 1 x 1 vectors
    # store each photo's map as the mean of its and its mirror image's: twice the compute, +1.0 +- 0.4 points for
    # the default head on dogbreeds20 (13 photos per class; docs/heads.md). Opt-in, never decided from the folder:
    # a rule on its size would change what every row means when a photo is added, and a test folder extracted
    # with the training folder's options would not fit its head
    flip: bool = False
    # on a cache hit (or resume), hash every row's photo and compare with the sha256 the cache keeps: a photo
    # rewritten in place with its size and mtime kept is found. Always done where the rows' files total at most
    # 100 MB (cache.freshness.VERIFY_AUTO_MAX_BYTES, about 0.15 s); this asks for it on larger folders
    verify: bool = False
    decode: str = "pil"  # 'pil' (JPEGs decoded by the workers) or 'device' (decode_jpeg on the device: nvJPEG)
    cache_dir: str = "features"  # where caches live
    shard_dir: str = ""  # under torchrun: where each rank's shard files go ('' = <cache_dir>/<cache name>.shards)
    command: str = ""  # the command line, recorded so an incomplete cache can say how to finish it
    # 'test' for a cache fit-head --test-data made, 'pool' for suggest's unlabelled photos (listed without classes):
    # never picked as the default training cache
    purpose: str = ""


@dataclass
class FitHeadConfig:
    """How to train the head, and on which cache. The defaults were chosen by measurement (README)."""

    # cache file; None = the newest complete cache in cache_dir; a list of caches of the same photos: fused features
    cache: Optional[str] = None
    cache_dir: str = "features"  # where to look for the newest cache (and where --test-data's cache goes)
    # auto (RBF SVM or logreg, kind and C by CV), linear (Adam), logreg, kernel, svm (given C, gamma)
    head: str = "auto"
    features: str = "avg"  # view of the cached map: flat, avg, max, avgmax
    normalize: str = "l2"  # l2 (each row), rms (one scale), standardize (per feature) or none
    epochs: int = 100  # linear: at most this many passes over the training split
    patience: int = 5  # linear: stop after this many epochs without a lower val loss (0 = never); best restored
    lr: float = 0.03  # linear: Adam learning rate (l2-normalised rows: unit scale)
    weight_decay: float = 1e-4  # linear: Adam's L2 penalty
    C: float = 100.0  # logreg, kernel, svm: inverse regularisation strength
    gamma: str = "scale"  # kernel, svm: RBF width, a number or 'scale' (1 / (d var)) or 'G*scale'
    kernel_components: int = 2000  # auto, kernel: landmarks; with fewer training rows all are (the exact kernel)
    batch_size: int = 32  # linear: rows per optimisation step
    val_fraction: float = 0.125  # share of rows held out for validation (stratified; 100 of 800)
    dropout: float = 0.0  # linear: dropout before the linear layer when > 0
    seed: int = 0  # seeds the split, the initialisation, the shuffling, CV folds and landmarks
    device: str = "auto"  # 'auto' (CUDA if available), 'cpu', 'cuda'
    block_rows: int = 2048  # rows read from disk at once (bounds memory: block_rows x row size)
    tune: bool = False  # a wider search: head kind, view, C and gamma by CV on the training rows
    refit: bool = True  # auto, --tune: once validated, fit the chosen setting again on every row (val included)
    folds: int = 5  # auto, --tune: stratified cross-validation folds
    test_data: Optional[str] = None  # an ImageFolder of other photos to test on (extracted like the cache)
    test_cache: Optional[str] = None  # or a cache of them, made with the same backbone, weights and preprocessing
    recipe: str = "default"  # 'seed': the tutorial's flat view, rms scale, Adam 0.01 for 10 epochs, nothing else
    runs_dir: str = "runs"  # where the checkpoint, history and curves go (one folder per run)
    # calibration and unknown inputs (the same fields as TrainConfig's)
    calibrate: str = "cv"  # temperature from: cv (out-of-fold training rows + val), val, none (T = 1)
    known_share: float = 0.95  # share of validation photos kept as known; the rest of the score range is 'unknown'
    unknown_rows: int = 5000  # training rows kept for the unknown score (a seeded sample, 1 KB each); 0 = none
    unknown_k: int = 10  # the unknown score compares a photo with its k-th nearest training row


@dataclass
class ChooseBackboneConfig:
    """Which backbones to compare on which photos, and how hard to cross-validate."""

    data: str = "data/PetImages"  # ImageFolder root: one sub-folder of images per class
    backbones: tuple = ()  # candidates, each 'NAME' or 'NAME=WEIGHTS' (a weights name, a file, or 'none')
    n: int = 1000  # photos each candidate extracts (a seeded stratified sample); all when the folder has fewer
    seed: int = 0  # the sample, the folds, the heads
    folds: int = 5  # stratified k-fold ...
    repeats: int = 2  # ... repeated with other shuffles: every candidate on the same folds
    fused: bool = True  # also every combination of two or more candidates, fused (fit-head --cache A --cache B)
    cache_dir: str = "features"  # where the candidates' caches go (ordinary caches: later commands reuse them)
    device: str = "auto"  # extraction and heads
    precision: str = "auto"  # extraction's compute precision (as extract --precision)
    batch_size: int = 32  # extraction's images per forward pass
    workers: int = -1  # extraction's decoding workers (as extract --workers)
    command: str = ""  # the command line, recorded in the caches it makes


@dataclass
class CompareConfig:
    """Which cache and split, and the settings of each model."""

    cache: Optional[str] = None  # cache file; None = the newest complete cache in cache_dir
    cache_dir: str = "features"  # where to look for the newest cache
    val_fraction: float = 0.125  # the same meaning and default as fit-head
    seed: int = 0  # the split seed, shared with fit-head
    C: float = 1.0  # inverse regularisation strength of LogisticRegression
    max_iter: int = 1000  # lbfgs iterations
    scale: bool = True  # standardise features first (lbfgs converges far faster on VGG's unscaled maps)
    head: Optional[FitHeadConfig] = None  # settings for the torch head trained alongside (cache/split filled in)
    block_rows: int = 2048  # rows read from disk at once


@dataclass
class TrainConfig:
    """What to train on, and how (train: frozen backbone, new head)."""

    data: str = "data/PetImages"  # ImageFolder root: one sub-folder of images per class
    n: int = 0  # images to use (a seeded stratified sample, unreadable ones skipped); 0 = all
    # any torchvision or timm model name (timm:/torchvision: force one), validated at use
    backbone: Optional[str] = "vgg16"
    weights: Optional[str] = "DEFAULT"  # DEFAULT, a torchvision weights name or timm tag, a state-dict file, or 'none'
    pool: Optional[str] = None  # head input: 'none' (flattened map), 'avg'; None = the backbone's own
    dropout: float = 0.0  # dropout before the head's linear layer when > 0
    augment: bool = False  # RandomResizedCrop + RandomHorizontalFlip on training images
    epochs: int = 3  # passes over the training split
    lr: float = 1e-3  # Adam learning rate of the head
    batch_size: int = 32  # images per optimisation step
    val_fraction: float = 0.125  # share of images held out for validation (stratified)
    print_every: int = 20  # a running accuracy/loss line every this many minibatches; 0 = never
    workers: int = -1  # decoding processes; -1 = one per CPU core (at most 8), 0 = decode in-process
    device: str = "auto"  # 'auto' (CUDA if available), 'cpu', 'cuda', 'cuda:N'
    precision: str = "auto"  # compute precision: auto (bf16 where supported), fp32, bf16, fp16 (CUDA)
    seed: int = 0  # seeds the sample, the split, the head's initialisation, shuffling and augmentation
    runs_dir: str = "runs"  # where model.pt and history.json go (one folder per run)
    # calibration and unknown inputs (as fit-head's; a whole model's temperature comes from its val images)
    calibrate: str = "val"  # temperature from: val (the validation images) or none (T = 1)
    known_share: float = 0.95  # share of validation photos kept as known; the rest of the score range is 'unknown'
    unknown_rows: int = 5000  # training photos whose pooled features are kept (seeded sample, one more pass); 0 = none
    unknown_k: int = 10  # the unknown score compares a photo with its k-th nearest training photo


@dataclass
class FinetuneConfig(TrainConfig):
    """As TrainConfig, plus which blocks to unfreeze, their learning rate, and where to start."""

    backbone: Optional[str] = None  # None: the --init-head checkpoint's, else vgg16
    weights: Optional[str] = None  # None: the --init-head checkpoint's (found as load_model does), else DEFAULT
    epochs: int = 1  # passes over the training split, head-only epochs included
    lr: float = 1e-4  # Adam learning rate of the head
    backbone_lr: Optional[float] = None  # learning rate of the unfrozen backbone; None = lr / 10
    unfreeze: str = "all"  # 'all' or K: the last K blocks of the backbone (see `summary`)
    head_epochs: int = 0  # staged schedule: train only the head for this many epochs, then unfreeze
    init_head: Optional[str] = None  # start from a fit-head head.pt or a train/finetune model.pt


@dataclass
class PredictConfig:
    """What to classify, with which model, and where the rows go."""

    paths: list = field(default_factory=list)  # image files and/or folders (searched recursively)
    model: str = ""  # a model.pt from train/finetune, or a head.pt from fit-head (+ its backbone weights)
    weights: Optional[str] = None  # head.pt only: the backbone weights, when not where the head recorded them
    batch_size: int = 32  # images per forward pass
    # -1: with a CPU network, a thread per core in turns with it, else a process per core (<= 8); 0: in-process
    workers: int = -1
    device: str = "auto"  # 'auto' (CUDA if available), 'cpu', 'cuda', 'cuda:N'
    precision: str = "auto"  # compute precision: auto (bf16 where supported), fp32, bf16, fp16 (CUDA)
    format: str = "table"  # output format: table, csv or json
    output: Optional[str] = None  # write the rows to this file (streamed for csv); None = return them


@dataclass
class ImagenetCheckConfig:
    """Which image, through which full pretrained model (its ImageNet classifier included)."""

    image: str = ""  # the image file
    backbone: str = "vgg16"  # any torchvision or timm model name (timm:/torchvision: force one), validated at use
    weights: str = "DEFAULT"  # full pretrained weights: a torchvision name or a state-dict file
    top: int = 5  # how many of the best classes to show
    device: str = "auto"  # 'auto' (CUDA if available), 'cpu', 'cuda'


@dataclass
class SummaryConfig:
    """Which model to describe; parameters are counted on the meta device (no weights, no compute)."""

    backbone: str = "vgg16"  # any torchvision or timm model name (timm:/torchvision: force one), validated at use
    classes: int = 2  # outputs of the new head
    pool: Optional[str] = None  # 'none' or 'avg'; None = the backbone's own (VGG none, others avg)
    dropout: float = 0.0  # dropout before the head's linear layer (adds no parameters)
    unfreeze: str = "none"  # 'none' (frozen backbone, as train), 'all' or K (last K blocks, as finetune)
    crop_size: int = 0  # input size; 0 = the backbone's default preprocessing (224 for ImageNet models)


@dataclass
class EvaluateConfig:
    """Which model, on which rows or images, and where the pictures go."""

    model: str = ""  # checkpoint: head.pt from fit-head (other kinds once registered)
    cache: Optional[str] = None  # feature cache to evaluate on; None (and no data) = the checkpoint's own cache
    data: Optional[str] = None  # or an ImageFolder root, run through the backbone on the fly
    split: str = "val"  # cache rows: 'val' (the checkpoint's own validation split) or 'all'
    weights: Optional[str] = None  # backbone weights for --data; None = those the checkpoint names
    top_k: int = 12  # images in the most-confidently-wrong gallery
    device: str = "auto"  # 'auto' (CUDA if available), 'cpu', 'cuda'
    precision: str = "auto"  # --data: compute precision, auto (bf16 where supported), fp32, bf16, fp16 (as predict)
    batch_size: int = 32  # images per forward pass (--data)
    # --data: -1, a thread per core in turns with a CPU network, else a process per core (<= 8); 0: in-process
    workers: int = -1
    block_rows: int = 2048  # cache rows read from disk at once
    runs_dir: str = "runs"  # the pictures and metrics.json go to runs/<stamp>-evaluate/


@dataclass
class PreviewConfig:
    """Which images to show, and with which preprocessing."""

    data: str = "data/PetImages"  # ImageFolder root: one sub-folder of images per class
    per_class: int = 4  # images per class (one row per class)
    seed: int = 0  # which images: a seeded sample of each class
    backbone: str = "vgg16"  # whose preprocessing (resize/crop/normalisation) to apply
    # DEFAULT, a torchvision weights name or timm tag, a state-dict file (+ sidecar), or 'none'
    weights: str = "DEFAULT"
    output: str = "runs/preview.png"  # the PNG to write


@dataclass
class FeatureMapConfig:
    """Which image, through which backbone."""

    image: str = ""  # the image file
    backbone: str = "vgg16"  # any torchvision or timm model name (timm:/torchvision: force one), validated at use
    # DEFAULT, a torchvision weights name or timm tag, a state-dict file (+ sidecar), or 'none'
    weights: str = "DEFAULT"
    top_k: int = 6  # most active channels to upsample over the image
    output: str = "runs/feature-map.png"  # the PNG to write


@dataclass
class DemoConfig:
    """Where the data and weights come from, and the size of the run."""

    data: str = "data/PetImages"  # ImageFolder root; fetched from url into its parent folder if missing
    url: str = KAGGLE_CATS_DOGS_URL  # archive to fetch when data is missing
    weights: str = "DEFAULT"  # DEFAULT, a torchvision weights name or timm tag, a local state-dict file, or 'none'
    backbone: str = "vgg16"  # feature extractor
    n: int = 800  # images to extract (the tutorial's 700 train / 100 val)
    quarantine: bool = True  # move undecodable files out of the data folder (never deleted)
    cache_dir: str = "features"  # feature caches
    runs_dir: str = "runs"  # run outputs
    workers: int = -1  # decoding, as ExtractConfig.workers (-1: on the CPU, in turns with the network)
    command: str = ""  # the command line, recorded in the cache



#: Cosine similarity of max-pooled, l2-normalised rows above which two photos are near copies (audit).
#: Measured on real photos (docs/audit.md, bench/near_duplicates.py): 98-100 % of resized, re-encoded and
#: 10 %-cropped copies score above it, and no two distinct photos of catsdogs do.
NEAR_DUPLICATE = 0.88
AUDIT_ACTIONS = ("relabel", "remove", "keep")  # the actions of an audit --apply CSV row


@dataclass
class AuditConfig:
    """Which folder (or cache) to audit, against which test folder, and what to do with a reviewed list."""

    data: Optional[str] = None  # the labelled training folder (extracted as extract does, all photos; reused)
    test_data: Optional[str] = None  # a test folder to search for photos the training folder also holds (leaks)
    cache: Optional[str] = None  # or the training folder's cache (its rows are audited)
    test_cache: Optional[str] = None  # or the test folder's cache, made like the training cache
    cache_dir: str = "features"  # where caches are looked for and made
    backbone: str = "vgg16"  # --data: the backbone extract runs
    weights: str = "DEFAULT"  # --data: torchvision weights name, a state-dict file, or 'none'
    batch_size: int = 32  # --data: images per forward pass
    device: str = "auto"  # --data: 'auto', 'cpu', 'cuda'
    workers: int = -1  # --data: decoding, as ExtractConfig.workers (-1: on the CPU, in turns with the network)
    folds: int = 5  # out-of-fold probabilities from this many refits of the head
    seed: int = 0  # seeds the folds, the head's landmarks and its choice of C and gamma
    threshold: float = NEAR_DUPLICATE  # max-view cosine from which two photos are near copies (then a layout check)
    top: int = 40  # label issues, outliers and groups shown in the table, the HTML report and the gallery
    output: Optional[str] = None  # folder for report.json, report.html, gallery.png, fixes.csv; default a run folder
    runs_dir: str = "runs"  # where the run folder goes
    apply: Optional[str] = None  # a reviewed CSV (path,action,new_class): move the files; writes a journal
    undo: Optional[str] = None  # a journal of --apply: move every file back where it was
    quarantine_dir: Optional[str] = None  # --apply: where 'remove' moves files; default '<data>.quarantine'
    refresh: bool = True  # --apply/--undo: extract the folder again (rows reused by content: no recomputing)
    command: str = ""  # the command line, recorded in caches it makes


#: How suggest ranks a pool (bench/suggest_curve.py measured them against random picks, docs/suggest.md):
#: 'diverse-uncertain' the 2k least certain photos, then one at a time the one farthest from every photo labelled
#: or picked (k-center); 'margin' the least certain; 'diverse' the k-center over the whole pool; 'random'.
SUGGEST_RULES = ("diverse-uncertain", "margin", "diverse", "random")
SUGGEST_HEADS = ("auto", "logreg")  # fit-head's default head (by CV), or logistic regression with its defaults


@dataclass
class SuggestConfig:
    """Which labelled folder, which pool of unlabelled photos, and how the pool is ranked for labelling."""

    data: Optional[str] = None  # the labelled folder (one sub-folder per class), extracted as extract does
    pool: Optional[str] = None  # a folder of unlabelled photos (at any depth), extracted once (cached like any)
    k: int = 50  # photos to suggest
    rule: str = "diverse-uncertain"  # diverse-uncertain, margin, diverse (k-center) or random
    head: str = "auto"  # the head whose uncertainty counts: auto (fit-head's default, by CV) or logreg
    cache_dir: str = "features"  # where caches are looked for and made
    backbone: str = "vgg16"  # the backbone extract runs on both folders
    weights: str = "DEFAULT"  # torchvision weights name, a state-dict file, or 'none'
    batch_size: int = 32  # images per forward pass
    device: str = "auto"  # 'auto', 'cpu', 'cuda'
    workers: int = -1  # decoding, as ExtractConfig.workers (-1: on the CPU, in turns with the network)
    seed: int = 0  # seeds the head's CV folds and the random rule
    output: Optional[str] = None  # folder for suggestions.csv and suggestions.html; default a run folder
    runs_dir: str = "runs"  # where the run folder goes
    command: str = ""  # the command line, recorded in caches it makes


@dataclass
class ExportConfig:
    """Which model to export, into which file and format, and the parity check it must pass."""

    model: str = ""  # a fit-head head.pt (exported with its backbone) or a train/finetune model.pt
    # onnx (ONNX Runtime and every other ONNX runner) or torchscript (torch.jit.load, C++ libtorch)
    format: str = "onnx"
    output: str = ""  # the file to write; its metadata goes beside it as <output>.json
    weights: Optional[str] = None  # head.pt only: the backbone weights, when not where the head recorded them
    check_data: Optional[str] = None  # photos for the parity check (a folder or a file); None = the training data's
    check_n: int = 16  # photos of check_data compared (the first in sorted order); 0 = all of them
    tolerance: float = 1e-4  # largest allowed |probability difference| between the export and predict (fp32)
    batch_size: int = 16  # images per forward pass in the parity check
    workers: int = 0  # decoding processes for the parity check; 0 = in this process


@dataclass
class ServeConfig:
    """Which model to serve, where, and the limits that keep one client from hurting the others."""

    model: str = ""  # a fit-head head.pt or a train/finetune model.pt
    weights: Optional[str] = None  # head.pt only: the backbone weights, when not where the head recorded them
    host: str = "127.0.0.1"  # the address to listen on; localhost only unless told otherwise
    port: int = 8000  # the TCP port (0 = any free one)
    device: str = "auto"  # 'auto' (CUDA if available), 'cpu', 'cuda', 'cuda:N'
    precision: str = "auto"  # compute precision, as predict: auto (bf16 where supported), fp32, bf16, fp16 (CUDA)
    batch_size: int = 32  # most images in one forward pass (requests arriving together share it)
    max_wait_ms: float = 5.0  # how long a batch waits for more images once its first one came
    max_queue: int = 256  # images waiting for the network; a request that would overflow it gets 503
    max_files: int = 64  # images in one request
    max_file_bytes: int = 20_000_000  # bytes of one image
    max_request_bytes: int = 100_000_000  # bytes of one request body
    max_pixels: int = 40_000_000  # pixels of one image (checked from its header, before decoding)
    drain_seconds: float = 30.0  # on SIGTERM: how long in-flight requests may still take before the exit
