"""Every stage's options: one config dataclass per command and the choices each option allows.

Light on purpose (the standard library only): the CLI and the API import it at start-up, so a cache hit
answers without importing torch. Each field declares what it is to users once, as ``option(help, choices=...,
range=...)`` metadata: the CLI's click options, the API's keyword checks, the range and choice checks (in the
caller's terms) and docs/commands.md's tables all come from it. Options several commands share are groups
(``RunnerOptions``, ``SplitOptions``, ``TrustOptions``, ...) the configs inherit; stages check only rules across
fields. How to add an option: docs/layout.md.
"""
from __future__ import annotations

import contextlib
import inspect
import math
import numbers
import os
import re
from dataclasses import dataclass, field
from typing import Optional

from .errors import UsageError

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
SPLITS = ("auto", "val", "all")
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
#: Most images of a class preview draws (a row each): 300 took two minutes for a PNG 66,000 pixels wide.
MAX_PER_CLASS = 32


#: Seeds are stored as HDF5 attributes and given to numpy and torch: 0 .. 2**32 - 1 suits all three.
MAX_SEED = 2**32 - 1

# -- the option spec ---------------------------------------------------------------------------------
#: Ranges, written as intervals ("(0, 10]"; "inf" for no upper bound). The common ones:
POSITIVE = "[1, inf)"  # counts
NON_NEGATIVE = "[0, inf)"
POSITIVE_FLOAT = "(0, inf)"
SEEDS = f"[0, {MAX_SEED}]"
WORKER_COUNTS = "[-1, inf)"
FRACTION = "(0, 1)"
DROPOUT = "[0, 1)"
LEARNING_RATES = f"(0, {MAX_LR:g}]"


@dataclass(frozen=True)
class Option:
    """What one config field is to its users: its help, what it allows, and how the command line spells it.

    The CLI makes its click options from these (``pipeline.cli.options_from``), the API and the stages
    check values with them (``check_options``, ``check_config``), and docs/commands.md's tables are written
    from them (``pipeline.cli.option_table``, run by ``python bench/commands_doc.py``).
    """

    help: str
    choices: Optional[tuple] = None  # the values allowed (None passes: "the default")
    range: Optional[str] = None  # an interval, e.g. "(0, 10]" or "[1, inf)"
    names: tuple = ()  # command-line names, e.g. ("-n", "--n") [default: --field-name]
    negatable: bool = False  # a bool shown as --x/--no-x (a default-True bool without it is --no-x)
    argument: bool = False  # a positional argument on the command line, not an --option
    path: Optional[str] = None  # "file" or "dir": the command line refuses the other kind ("any": either)
    metavar: Optional[str] = None
    required: bool = False  # on the command line (the API takes it as a positional parameter)
    multiple: bool = False  # given once per value on the command line (a list in Python)
    cli: bool = True  # False: a keyword of the API only (no command-line option)
    doc: Optional[str] = None  # docs/commands.md's text, where it says more than help (markdown)
    doc_default: Optional[str] = None  # docs/commands.md's default, where the value alone does not say it


#: what an empty name of a path option is asked to be instead (Option.path; a folder by default)
PATH_KINDS = {"file": "file", "dir": "folder", "any": "file or folder"}


def option(help: str, **spec) -> dict:
    """A config field's metadata: ``field(default=..., metadata=option("What it does.", range="[1, inf)"))``."""
    return {"option": Option(help, **spec)}


def internal(why: str) -> dict:
    """The metadata of a field the user never sets (filled in by the CLI or the API): no option, no check."""
    return {"option": None, "internal": why}


def spec_of(f) -> Optional[Option]:
    """A dataclass field's Option (None for an internal field or a field without a spec)."""
    return f.metadata.get("option")


def ordered_fields(cls) -> list:
    """The fields of a config dataclass, the class's own first, then its groups' (nearest first): the order of
    the command's --help, of its table in docs/commands.md and of the API's list of allowed keywords."""
    from dataclasses import fields

    def place(f) -> tuple:
        for i, c in enumerate(cls.__mro__):
            own = list(inspect.get_annotations(c))
            if f.name in own:
                return i, own.index(f.name)
        return len(cls.__mro__), 0

    return sorted(fields(cls), key=place)


def option_fields(cls) -> list:
    """The fields of a config dataclass that are options (not internal), in ``ordered_fields`` order."""
    return [f for f in ordered_fields(cls) if spec_of(f) is not None]


def cli_name(name: str, opt: Optional[Option] = None) -> str:
    """The command-line spelling of a field: its last declared name, else --field-name."""
    return opt.names[-1] if opt and opt.names else f"--{name.replace('_', '-')}"


#: Whether messages name options as the command line spells them (``cli_terms``: the CLI, around each command)
#: or as the Python API's keywords (the default: a caller of ``Model.predict`` passed ``device='cpu'``).
#: Process-wide, not per thread: a command's worker threads must see it (a CLI command and API calls running in
#: one process at once would share it; only the wording differs).
_CLI_TERMS = False


@contextlib.contextmanager
def cli_terms():
    """Messages in the command line's terms inside the block (``option_text``)."""
    global _CLI_TERMS
    before, _CLI_TERMS = _CLI_TERMS, True
    try:
        yield
    finally:
        _CLI_TERMS = before


class Placeholder(str):
    """A value a message leaves to the reader (PATH, DIR, N): bare in both terms, ``--weights PATH`` on the
    command line and ``weights=PATH`` from Python (``option_text``), never quoted as a value to type."""

    def __repr__(self) -> str:
        return str(self)


def option_text(name: str, *values, cli: str = "") -> str:
    """An option (a config field's name) with the values a message suggests, as its caller writes them:
    ``--precision bf16 or fp32`` on the command line, ``precision='bf16' or 'fp32'`` from Python (``device``
    alone: ``--device`` or ``device``). Deep code (resolve_device) serves both: it said '--device' to both.
    ``cli``: the command line's name where it is not --field-name (``backbones``: ``--backbone``)."""
    if _CLI_TERMS:
        name = cli or cli_name(name)
        return " ".join([name, " or ".join(map(str, values))]) if values else name
    return f"{name}={' or '.join(map(repr, values))}" if values else name


def option_named(text: str) -> str:
    """``text`` that begins with an option as the command line spells it (``--cache-dir``, ``--output's folder``:
    check_output's ``what``), in the caller's terms: as it is on the command line, ``cache_dir`` from Python."""
    if _CLI_TERMS:
        return text
    return re.sub(r"^--([a-z][a-z0-9-]*)", lambda m: m.group(1).replace("-", "_"), text)


def flag_text(name: str) -> str:
    """A flag turned on, as its caller writes it: ``--overwrite`` on the command line, ``overwrite=True``
    from Python."""
    return option_text(name) if _CLI_TERMS else f"{name}=True"


def option_value(name: str, value, cli: str = "") -> str:
    """An option with the value the caller gave, quoted as given: ``--weights 'w.pt'`` on the command line,
    ``weights='w.pt'`` from Python (``option_text``)."""
    return option_text(name, Placeholder(repr(value)), cli=cli)


def _interval(text: str) -> tuple:
    lo, hi = (part.strip() for part in text[1:-1].split(","))
    return float(lo), float(hi), text[0] == "(", text[-1] == ")"


def describe_range(text: str, integer: bool) -> str:
    """The words of a range: 'positive', '0 or more', 'at least 2', 'between 0 and 65535', 'in (0, 10]'."""
    lo, hi, lo_open, hi_open = _interval(text)
    if hi == math.inf:
        if (lo == 0 and lo_open) or (integer and lo == 1):
            return "positive"
        return f"{lo:g} or more" if lo <= 0 else f"at least {lo:g}"
    if integer and not lo_open and not hi_open:
        return f"between {lo:g} and {hi:.0f}"
    return f"in {text}"


def check_value(opt: Option, value, name: str, integer: bool = False) -> None:
    """A UsageError naming ``name`` (``--lr`` or ``lr``, the caller's terms) when ``value`` is outside the
    option's choices or range. None passes (an optional value left to its default); True and False are no
    number (``n=True`` was taken for 1 and named a cache 'nTrue')."""
    if value is None:
        return
    for v in value if isinstance(value, (list, tuple)) else [value]:
        if opt.choices is not None and v not in opt.choices:
            raise UsageError(f"unknown {name} {v!r}; allowed: {', '.join(map(str, opt.choices))}")
        if opt.range is None:
            continue
        if isinstance(v, bool) or not isinstance(v, numbers.Integral if integer else numbers.Real):
            raise UsageError(f"{name} must be a {'whole ' if integer else ''}number, got {v!r}")
        lo, hi, lo_open, hi_open = _interval(opt.range)
        inside = (lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi)
        if not (inside and math.isfinite(v)):
            raise UsageError(f"{name} must be {describe_range(opt.range, integer)}, got {v}")


def check_flag(value, name: str) -> None:
    """A UsageError unless ``value`` is True, False (numpy's too) or None: the string 'no' is true to Python,
    so ``quarantine='no'`` moved the files it was meant to leave."""
    if value is not None and (isinstance(value, str) or value not in (True, False)):
        raise UsageError(f"{name} must be True or False, got {value!r}")


#: field_kind's names of a text option (a str, a path)
TEXT_KINDS = ("str", "Optional[str]", "str | None")


def check_text(value, name: str) -> None:
    """A UsageError unless a text option from Python is a str, a pathlib.Path or None (an optional option not
    given; the API refuses None where the default is a text, ``api._config``): serve_app(host=3) served without
    its Host check, weights=3 and output=3 ended in TypeErrors."""
    if value is None or isinstance(value, (str, os.PathLike)):
        return
    raise UsageError(f"{name} must be a str, got {value!r:.60}")


def field_kind(f) -> str:
    """'int', 'float', 'bool' (optional or not), or the annotation's text, from a config field's type (a string
    under ``from __future__ import annotations``, a class otherwise)."""
    text = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    text = text.replace("typing.", "")
    return next((k for k in ("bool", "int", "float") if text in (k, f"Optional[{k}]", f"{k} | None")), text)


def check_options(cls, values: dict, python: bool = True, what: str = "") -> None:
    """Every value of ``values`` (field name -> value) within its option's choices and range, in the caller's
    terms: the parameter's name for Python callers (``what: lr must be ...``), else the command line's."""
    from dataclasses import fields

    for f in fields(cls):
        opt = spec_of(f)
        if opt is None or f.name not in values:
            continue
        try:
            name = f.name if python else cli_name(f.name, opt)
            if python and values[f.name] == "" and (opt.path or f.name == "data" or f.name.endswith("_dir")
                                                    or opt.metavar == "DIR"):
                # as the CLI refuses --calib-data '': '' (some options' default: not given) named no folder
                raise UsageError(f"{name} '' is an empty name; give a {PATH_KINDS.get(opt.path, 'folder')}, "
                                 f"or leave {name} out")
            if field_kind(f) == "bool":
                check_flag(values[f.name], name)
            check_value(opt, values[f.name], name, field_kind(f) == "int")
            if python and field_kind(f) in TEXT_KINDS:
                check_text(values[f.name], name)
        except UsageError as e:
            raise UsageError(f"{what}: {e}" if what else str(e)) from None


def check_config(cfg) -> None:
    """A stage's first check: every option of ``cfg`` within its choices and range, named as on the command
    line (the API has checked its callers' keywords in their own terms already)."""
    from dataclasses import fields

    check_options(type(cfg), {f.name: getattr(cfg, f.name) for f in fields(cfg)}, python=False)


# -- options that several commands share -------------------------------------------------------------
DATA_HELP = "ImageFolder root (one folder per class)."
BACKBONE_HELP = ("Any torchvision or timm model: vgg16, resnet50, tf_efficientnet_lite0, convnext_tiny, timm:NAME "
                 "(docs/backbones.md).")
WEIGHTS_HELP = ("DEFAULT, a torchvision weights name (IMAGENET1K_V1) or timm tag (in1k), a state-dict file "
                "(+ .json sidecar), or 'none'.")
WORKERS_HELP = ("Decoding: -1 = on the CPU a thread per core, in turns with the network or beside it (whichever "
                "measures faster); on a GPU a process per core; N processes; 0 in-process.")
HEAD_WEIGHTS_HELP = ("For a head.pt: its backbone weights, if not where the head recorded them (a fused head: one "
                     "of its backbones' files, matched by sha256; the others are looked for beside it).")
DEVICE = option("auto, cpu, cuda or cuda:N.", doc="`auto` (CUDA if available), `cpu`, `cuda`, `cuda:N`")
CACHE_DIR = option("Folder of feature caches.")
RUNS_DIR = option("Where run outputs go.")
TEST_DATA = option("Photos the head never saw (one folder per class, some or all of the head's): extracted like "
                   "the cache, then scored.", path="dir", metavar="DIR")
TEST_CACHE = option("Or a cache of them (made with the same backbone, weights and preprocessing).", path="file",
                    metavar="FILE")
MODEL_PRECISION = option("Compute precision; auto = bf16 where the device supports it.", choices=MODEL_PRECISIONS,
                         doc="`auto` (bf16 where supported), `fp32`, `bf16`, `fp16` (CUDA); no int8")


@dataclass
class DeviceOptions:
    """Where a model runs."""

    device: str = field(default="auto", metadata=DEVICE)


@dataclass
class RunnerOptions(DeviceOptions):
    """How a backbone runs over photos: device, precision, batch size, decoding workers."""

    precision: str = field(default="auto", metadata=MODEL_PRECISION)
    batch_size: int = field(default=32, metadata=option("Images per forward pass.", range=POSITIVE))
    workers: int = field(default=-1, metadata=option(WORKERS_HELP, range=WORKER_COUNTS, doc=(
        "decoding: -1 = with the network on the CPU, a thread per core, taking turns with it or decoding beside it, "
        "whichever this machine measures faster ([performance.md](performance.md#decoding-in-turns-with-the-network-"
        "or-beside-it)); on a GPU a background process per core (at most 8); N = N processes; 0 = in-process")))


@dataclass
class SplitOptions:
    """The seeded, stratified train/validation split."""

    val_fraction: float = field(default=0.125, metadata=option(
        "Share of rows held out for validation (stratified).", range=FRACTION))
    seed: int = field(default=0, metadata=option("Seeds the train/val split.", range=SEEDS))


@dataclass
class KnownShareOption:
    """Where the unknown score's threshold is set: the one option fit-head, train and suggest share."""

    known_share: float = field(default=0.95, metadata=option(
        "Share of held-out known photos kept as known; a photo scoring above them is 'unknown' (0.95: about 1 "
        "in 20 photos of the known classes is flagged too).", range="(0, 1]",
        doc="share of held-out photos (validation rows, and each kept training or labelled row against the others) "
            "whose unknown score stays at or under the threshold; above it a photo is `unknown`: by design about 1 "
            "in 20 photos of the known classes is flagged too at 0.95, 1 in 100 at 0.99 (fewer photos of no class "
            "caught)"))


@dataclass
class TrustOptions(KnownShareOption):
    """Calibration (the temperature) and the unknown score: the same four options wherever a model is trained."""

    calibrate: str = field(default="cv", metadata=option(
        "Where the temperature is fitted: cv (out-of-fold training rows + val), val, or none.", choices=CALIBRATIONS,
        doc="where the head's temperature is fitted: `cv` (out-of-fold predictions of the training rows, at most "
            "`--kernel-components` of them, + the validation rows; logreg, kernel and auto heads; linear heads use "
            "`val`), `val`, `none` (T = 1)"))
    unknown_rows: int = field(default=5000, metadata=option(
        "Training rows kept for the unknown score (a seeded sample, 1 KB each); 0 = none.", range=NON_NEGATIVE,
        doc="training rows kept in the checkpoint for the unknown score (a seeded sample; float16, 1 KB a row for "
            "VGG-16; at least 2: each is scored against the others); 0 = no unknown score"))
    unknown_k: int = field(default=10, metadata=option(
        "The unknown score's neighbour: the k-th nearest training row.", range=POSITIVE,
        doc="the unknown score is 1 - cosine similarity to the k-th nearest kept training row (avg-pooled, "
            "l2-normalised)"))


@dataclass
class FetchConfig:
    """Where an archive comes from and where it goes."""

    dest: str = field(default="data", metadata=option("Folder for the archive and its unpacked files.",
                                                      metavar="DIR"))
    url: str = field(default=KAGGLE_CATS_DOGS_URL, metadata=option(
        "A zip or tar archive to download.", doc="a zip or tar archive (http, https or file URL)",
        doc_default="the Microsoft `kagglecatsanddogs_5340.zip`"))
    sha256: str | None = field(default=None, metadata=option(
        "The archive's expected SHA-256 (64 hex digits): checked before unpacking, also on a re-run.",
        metavar="HEX", doc="the archive's expected SHA-256 (64 hex digits, as `sha256sum` prints it): checked "
        "before anything is unpacked, on every run (an archive already in `--dest` too); a mismatch is refused "
        "naming both digests, the file kept aside as `NAME.sha256-DIGEST`, never unpacked", doc_default="unchecked"))
    timeout: float = field(default=60.0, metadata=option(
        "Seconds to wait for the server (connect, or between two reads).", range=POSITIVE_FLOAT, cli=False))
    retries: int = field(default=3, metadata=option(
        "How often an interrupted transfer (or a busy server's 503, 429, ...) is tried again before giving up.",
        range=NON_NEGATIVE, cli=False))
    retry_wait: float = field(default=2.0, metadata=option(
        "Seconds before the first retry; doubles each time.", range="[0, inf)", cli=False))
    overwrite: bool = field(default=False, metadata=option(
        "Unpack over files already in --dest (by default a conflict is refused, naming the file); an archive "
        "unpacked before is unpacked again, restoring its files."))


@dataclass
class CheckImagesConfig:
    """Which folder to check, where to report, and whether to quarantine."""

    root: str = field(metadata=option("The folder to check (every file below it, hidden folders excepted).",
                                      argument=True, metavar="DIR"))
    report: str | None = field(default=None, metadata=option(
        "Write every finding to this file: .csv (one row each) or .json.", path="file", metavar="FILE"))
    quarantine: bool = field(default=False, metadata=option(
        "Move files with errors to the quarantine folder, keeping relative paths (never deletes)."))
    quarantine_dir: str | None = field(default=None, metadata=option(
        "Quarantine folder (implies --quarantine) [default: DIR.quarantine beside DIR].", path="dir", metavar="DIR",
        doc="the quarantine folder (implies `--quarantine`)", doc_default="`DIR.quarantine` beside DIR"))
    workers: int = field(default=-1, metadata=option(
        "Decoding processes; -1 = one per core.", range=WORKER_COUNTS,
        doc="decoding processes; -1 = one per core (at most 8), 0 or 1 = in this process"))


@dataclass
class ExtractConfig(RunnerOptions):
    """What to extract, from where, and how."""

    data: str = field(default="data/PetImages", metadata=option(DATA_HELP, metavar="DIR"))
    n: int = field(default=800, metadata=option(
        "Good images to extract; 0 = all (under torchrun write -n: torchrun takes --n for its own).",
        names=("-n", "--n"), range=NON_NEGATIVE, metavar="N"))
    backbone: str = field(default="vgg16", metadata=option(BACKBONE_HELP, doc=(
        "any torchvision classification model or timm model (`resnet50`, `tf_efficientnet_lite0`, `convnext_tiny`, "
        "`vit_small_patch14_dinov2`); `timm:NAME` / `torchvision:NAME` force a library where both have NAME "
        "(torchvision's otherwise); an unknown name names close matches ([backbones.md](backbones.md))")))
    weights: str = field(default="DEFAULT", metadata=option(WEIGHTS_HELP, doc=(
        "the library's pretrained weights (`DEFAULT`, a torchvision weights name such as `IMAGENET1K_V1`, or a timm "
        "tag such as `in1k`), a local state-dict file with its `.json` sidecar, or `none` (random, for tests); see "
        "[backbones.md](backbones.md#weights)")))
    precision: str = field(default="auto", metadata=option(
        "Compute precision; auto = int8 for CPU runs of 1,000+ images where it pays (AVX-512 VNNI, torchao), else "
        "bf16 where the device supports it; int8 (CPU, needs torchao) quantises the backbone, calibrated on "
        "--calib-n images of the sample.", choices=PRECISIONS, doc=(
            "compute precision: `auto` (on the CPU, a network with depthwise convolutions such as EfficientNet-Lite, "
            "MobileNet or ConvNeXt runs bf16 where supported, never int8, compiled from 4,000 images: its fastest "
            "path there ([performance.md](performance.md#other-backbones-on-the-cpu)); otherwise int8 + compile for "
            "CPU runs of 1,000+ images on AVX-512 VNNI or AMX when torchao is installed (300+ once the project's "
            "one-offs folder holds the calibration: [performance.md](performance.md#one-offs-paid-once)), else bf16 "
            "where supported), `fp32`, `bf16`, `fp16` (CUDA), `int8` (CPU, needs torchao)")))
    batch_size: int = field(default=32, metadata=option(
        "Images per forward pass (and per committed write).", range=POSITIVE))
    seed: int = field(default=0, metadata=option("Seed of the stratified sample of --n images.", range=SEEDS))
    dtype: str = field(default="float16", metadata=option("Storage dtype of the features.", choices=STORAGE_DTYPES,
                                                          doc="storage dtype: `float16` or `float32` (see "
                                                              "[cache-format.md](cache-format.md#storage-dtype-"
                                                              "float16-by-default))"))
    compile: str = field(default="auto", metadata=option(
        "torch.compile the backbone: a one-off compile (tens of seconds), then faster per image; auto = for int8 "
        "and long CPU runs. Falls back to eager with a warning.", choices=COMPILE))
    calib_n: int = field(default=64, metadata=option(
        "int8: calibration images (the first of the seeded sample).", range=POSITIVE))
    calib_data: str = field(default="", metadata=option(
        "int8: calibrate on this folder's sample instead of --data's [default: the network of --data's newest int8 "
        "cache, calibrated with this --calib-n and --seed, where the folder changed since; else --data's sample].",
        metavar="DIR", doc_default="(`--data`, or its earlier int8 cache's)"))
    pool: str = field(default="none", metadata=option(
        "avg stores globally pooled C-vectors instead of C x H x W maps.", choices=POOLS,
        doc="`none` keeps the C x H x W map; `avg` stores globally averaged C x 1 x 1 vectors"))
    # Opt-in, never decided from the folder: a rule on its size would change what every row means when a photo is
    # added, and a test folder extracted with the training folder's options would not fit its head
    flip: bool = field(default=False, metadata=option(
        "Store each map as the mean of the photo's and its mirror image's: twice the compute, about +1 point on a "
        "small fine-grained set (dogbreeds20). Part of the cache key: extract test folders with the same option "
        "(fit-head --test-data does) [default: off].", negatable=True, doc=(
            "store each photo's map as the mean of its map and its mirror image's map mirrored back (twice the "
            "compute; in the cache key; heads fitted on it run the same network in `predict`/`evaluate --data`, and "
            "`fit-head --test-data` extracts the test folder the same way): +1.0 ± 0.4 points for the default head on "
            "dogbreeds20 (13 photos per class), nothing beyond noise on catsdogs or scenes6 "
            "([heads.md](heads.md#a-second-view-of-each-photo-flip)). Opt-in: never decided from the folder's size, "
            "so an added photo never changes what the rows mean and a test folder extracted with the same command "
            "line fits the head")))
    verify: bool = field(default=False, metadata=option(
        "On a cache hit or resume, hash every row's photo (sha256) and extract again what was rewritten in place "
        "with its size and mtime kept [default: only where the rows' photos total at most 100 MB; about 1.5 s for "
        "25,000 JPEGs].", doc_default="(only where the rows' photos total at most 100 MB)", doc=(
            "on a cache hit or resume, hash every row's photo and extract again the photos rewritten in place with "
            "their size and mtime kept (the listing in the cache's name cannot see them); about 1.5-2 s for 25,000 "
            "JPEGs warm on 2 cores ([cache-format.md](cache-format.md#what-the-name-cannot-see-and-what-extract-"
            "checks))")))
    decode: str = field(default="pil", metadata=option(
        "device: decode JPEGs with torchvision's decode_jpeg on --device (nvJPEG on a GPU), for when CPU decoding "
        "is the bottleneck; other files still go through PIL.", choices=DECODERS,
        doc="`pil` (JPEGs decoded by the workers) or `device` (torchvision's `decode_jpeg` on the device: nvJPEG)"))
    cache_dir: str = field(default="features", metadata=option("Where caches live."))
    shard_dir: str = field(default="", metadata=option(
        "Under torchrun: shards go to SHARD_DIR/<cache name>.shards/ (e.g. a node-local disk) [default: beside the "
        "cache].", metavar="DIR", doc_default="(beside the cache)"))
    command: str = field(default="", metadata=internal("the command line, so an incomplete cache can say how to "
                                                       "finish it"))
    purpose: str = field(default="", metadata=internal(
        "'test' for a cache fit-head --test-data made, 'pool' for suggest's unlabelled photos (listed without "
        "classes): never picked as the default training cache"))
    calib_cache: str = field(default="", metadata=internal(
        "int8: the cache whose calibration (its stored observers) the network is rebuilt from instead of "
        "calibrating on this folder: audit's refresh and fit-head --test-data of a refreshed cache, so that the "
        "changed folder's rows are the earlier cache's (quantize.lent_calibration); a plain extract finds its own "
        "(quantize.own_lender)"))


@dataclass
class FitHeadConfig(SplitOptions, TrustOptions, DeviceOptions):
    """How to train the head, and on which cache. The defaults were chosen by measurement (README)."""

    # None = the newest complete cache in cache_dir; a list of caches of the same photos: one head on fused features
    cache: Optional[str] = field(default=None, metadata=option(
        "Cache file to use [default: the newest complete cache]; given more than once (caches of the same photos "
        "from other backbones), one head on their fused features.", path="file", multiple=True, metavar="FILE",
        doc_default="the newest complete cache", doc=(
            "the cache to fit on (never one made for testing by `--test-data`); given more than once, caches of the "
            "same photos from other backbones: one head on their fused features "
            "([choose-backbone.md](choose-backbone.md#fused-features))")))
    cache_dir: str = field(default="features", metadata=option(
        "Folder of feature caches.",
        doc="where to look for the newest cache (`--test-data`'s cache goes beside the cache fitted on)"))
    head: str = field(default="auto", metadata=option(
        "auto: exact RBF SVMs (one-vs-rest and SVC's one-vs-one) and logistic regression stacked, each C by k-fold "
        "CV; linear: Adam with early stopping; "
        "logreg: scikit-learn LogisticRegression; kernel: an RBF (Nystroem) map + logreg; svm: the exact RBF SVM "
        "(one-vs-rest). Each is saved as the same Linear + LogSoftmax checkpoint.", choices=HEADS,
        doc="`auto` (one-vs-rest SVM, SVC's one-vs-one pairs and logreg stacked, each C by CV), `linear`, `logreg`, "
            "`kernel`, `svm`"))
    features: str = field(default="avg", metadata=option(
        "View of the cached map: flat (C*H*W, the tutorial's), avg / max (global pooling), avgmax.", choices=VIEWS))
    normalize: str = field(default="l2", metadata=option(
        "Feature normalisation.", choices=NORMS,
        doc="`l2` (each row), `rms` (one scale), `standardize` (per feature), `none`"))
    epochs: int = field(default=100, metadata=option("linear: at most this many epochs.", range=POSITIVE))
    patience: int = field(default=5, metadata=option(
        "linear: early stopping after this many epochs without a lower val loss (0 = never); the best epoch's "
        "weights are kept.", range=NON_NEGATIVE))
    lr: float = field(default=0.03, metadata=option("linear: Adam learning rate.", range=LEARNING_RATES))
    weight_decay: float = field(default=1e-4, metadata=option(
        "linear: Adam weight decay.", range=f"[0, {MAX_WEIGHT_DECAY:g}]"))
    C: float = field(default=100.0, metadata=option(
        "logreg, kernel, svm: inverse regularisation strength.", range=f"(0, {MAX_C:g}]", names=("--C",)))
    gamma: str | float = field(default="scale", metadata=option(  # a number from Python too (Head(gamma=0.5))
        "kernel, svm: RBF width, a number, 'scale' or 'G*scale'.",
        doc="kernel, svm: RBF width, a number, `scale` (1 / (d var)) or `G*scale`"))
    kernel_components: int = field(default=2000, metadata=option(
        "kernel: Nystroem landmarks.", range=POSITIVE,
        doc="auto, kernel: Nystroem landmarks; with fewer training rows all are (the exact kernel)"))
    batch_size: int = field(default=32, metadata=option("linear: rows per optimisation step.", range=POSITIVE))
    dropout: float = field(default=0.0, metadata=option(
        "linear: dropout before the linear layer when > 0.", range=DROPOUT))
    block_rows: int = field(default=2048, metadata=option(
        "Rows read from disk at once (bounds memory: block_rows x row size).", range=POSITIVE, cli=False))
    tune: bool = field(default=False, metadata=option(
        "Choose head kind, view, normalisation and C by stratified k-fold CV on the training rows (a table on "
        "stderr), then refit the winner."))
    refit: bool = field(default=True, metadata=option(
        "auto, --tune: once validated, fit the chosen setting again on every row, the validation rows included.",
        negatable=True, doc=(
            "auto, `--tune`: once scored on the validation split, fit the chosen setting again on every row (the "
            "validation rows too; `evaluate`'s val split then scores rows the saved head saw: fit-head's own val "
            "figures come from the fit without them)")))
    folds: int = field(default=5, metadata=option("auto, --tune: folds.", range="[2, inf)",
                                                  doc="auto, `--tune`: stratified cross-validation folds"))
    test_data: Optional[str] = field(default=None, metadata=TEST_DATA)
    test_cache: Optional[str] = field(default=None, metadata=TEST_CACHE)
    recipe: str = field(default="default", metadata=option(
        "seed: the tutorial's exact head (flat, 1/RMS, Adam 0.01, 10 epochs, no early stopping).", choices=RECIPES))
    runs_dir: str = field(default="runs", metadata=option(
        "Where run outputs go.", doc=("where the checkpoint goes (`runs/<stamp>-fit-head/`), and a linear head's "
                                      "history and curves")))


@dataclass
class ChooseBackboneConfig(RunnerOptions):
    """Which backbones to compare on which photos, and how hard to cross-validate."""

    data: str = field(default="data/PetImages", metadata=option(DATA_HELP, metavar="DIR"))
    backbones: tuple = field(default=(), metadata=option(
        "A candidate: a backbone name, with its weights (a name, a file, or none) after '='; once per candidate.",
        names=("--backbone",), multiple=True, metavar="NAME[=WEIGHTS]", doc_default="(required, repeatable)", doc=(
            "a candidate: any name `extract --backbone` takes, its weights (a name, a file with its sidecar, or "
            "`none`) after `=` (default `DEFAULT`)")))
    n: int = field(default=1000, metadata=option(
        "Photos each candidate extracts (a seeded stratified sample; all when the folder has fewer).",
        names=("-n", "--n"), range=NON_NEGATIVE))
    folds: int = field(default=5, metadata=option("Stratified cross-validation folds ...", range="[2, inf)"))
    repeats: int = field(default=2, metadata=option(
        "... repeated with other shuffles (every candidate on the same folds).", range=POSITIVE))
    fused: bool = field(default=True, metadata=option(
        "Also cross-validate every combination of two or more candidates' fused features.", negatable=True))
    seed: int = field(default=0, metadata=option("Seeds the sample, the folds and the heads.", range=SEEDS))
    cache_dir: str = field(default="features", metadata=option(
        "Where the candidates' caches go (later commands reuse them)."))
    precision: str = field(default="auto", metadata=option(
        "Extraction's compute precision (as extract's).", choices=PRECISIONS))
    batch_size: int = field(default=32, metadata=option("Extraction's images per forward pass.", range=POSITIVE))
    workers: int = field(default=-1, metadata=option("Extraction's decoding workers (as extract's).",
                                                     range=WORKER_COUNTS))
    command: str = field(default="", metadata=internal("the command line, recorded in the caches it makes"))


@dataclass
class CompareConfig(SplitOptions):
    """Which cache and split, and the settings of each model."""

    cache: Optional[str] = field(default=None, metadata=option(
        "Cache file to use [default: the newest complete cache].", path="file", metavar="FILE",
        doc_default="the newest complete cache"))
    cache_dir: str = field(default="features", metadata=CACHE_DIR)
    C: float = field(default=1.0, metadata=option("LogisticRegression C.", range=POSITIVE_FLOAT, names=("--C",),
                                                  doc="the scikit-learn baseline's LogisticRegression C"))
    max_iter: int = field(default=1000, metadata=option("lbfgs iterations of the baseline.", range=POSITIVE))
    # standardise features first (lbfgs converges far faster on VGG's unscaled maps)
    scale: bool = field(default=True, metadata=option("Do not standardise features before LogisticRegression.",
                                                      names=("--no-scale",)))
    head: Optional[FitHeadConfig] = field(default=None, metadata=internal(
        "settings for the torch head trained alongside (cache/split filled in): the API's head=, the CLI's head "
        "options"))
    block_rows: int = field(default=2048, metadata=option("Rows read from disk at once.", range=POSITIVE, cli=False))


@dataclass
class TrainConfig(RunnerOptions, SplitOptions, TrustOptions):
    """What to train on, and how (train: frozen backbone, new head)."""

    data: str = field(default="data/PetImages", metadata=option(DATA_HELP, metavar="DIR"))
    n: int = field(default=0, metadata=option("Images to use (seeded stratified sample); 0 = all.",
                                              range=NON_NEGATIVE))
    backbone: Optional[str] = field(default="vgg16", metadata=option(BACKBONE_HELP))
    weights: Optional[str] = field(default="DEFAULT", metadata=option(WEIGHTS_HELP))
    pool: Optional[str] = field(default=None, metadata=option(
        "Head input: flattened map (none) or global average (avg) [default: the backbone's].", choices=POOLS,
        doc_default="the backbone's own"))
    dropout: float = field(default=0.0, metadata=option("Dropout before the head's linear layer when > 0.",
                                                        range=DROPOUT))
    augment: bool = field(default=False, metadata=option("Random resized crop + horizontal flip on training images."))
    epochs: int = field(default=3, metadata=option("Passes over the training split.", range=POSITIVE))
    lr: float = field(default=1e-3, metadata=option(f"Adam learning rate of the head, up to {MAX_LR:g}.",
                                                    range=LEARNING_RATES, doc="Adam learning rate of the head"))
    batch_size: int = field(default=32, metadata=option("Images per optimisation step.", range=POSITIVE))
    print_every: int = field(default=20, metadata=option(
        "Running train accuracy/loss every this many minibatches; 0 = never.", range=NON_NEGATIVE))
    workers: int = field(default=-1, metadata=option("Decoding processes; -1 = one per core.", range=WORKER_COUNTS))
    seed: int = field(default=0, metadata=option(
        "Seeds the train/val split.", range=SEEDS,
        doc="seeds the split; also the sample, initialisation, shuffling and augmentation"))
    runs_dir: str = field(default="runs", metadata=RUNS_DIR)
    calibrate: str = field(default="val", metadata=option(
        "Where the temperature is fitted: the validation images (val) or none (T = 1).", choices=("val", "none"),
        doc="the temperature from the validation images (`val`) or none (T = 1)"))
    resume: Optional[str] = field(default=None, metadata=option(
        "The run folder of a stopped run (the same command): its epochs are kept, training goes on from the next.",
        path="dir", metavar="RUN_DIR", doc=(
            "the run folder of a stopped run of the same command and options (`--epochs` may grow): its saved "
            "epochs are kept (model, optimiser and random states after each) and training goes on from the next, "
            "as if never stopped (bit for bit with `--workers 0`; decoding processes shuffle and augment anew)")))


@dataclass
class FinetuneConfig(TrainConfig):
    """As TrainConfig, plus which blocks to unfreeze, their learning rate, and where to start."""

    init_head: Optional[str] = field(default=None, metadata=option(
        "Start from a fit-head head.pt or a train/finetune model.pt.", path="file", metavar="FILE"))
    backbone: Optional[str] = field(default=None, metadata=option(
        "[default: the --init-head checkpoint's, else vgg16]", doc="the backbone",
        doc_default="the `--init-head` checkpoint's, else `vgg16`"))
    weights: Optional[str] = field(default=None, metadata=option(
        "Backbone weights [default: the --init-head checkpoint's, else DEFAULT].", doc="the backbone's weights",
        doc_default="the `--init-head` checkpoint's (found as load_model does), else `DEFAULT`"))
    unfreeze: str = field(default="all", metadata=option(
        "'all', or K: the last K blocks of the backbone (see summary)."))
    epochs: int = field(default=1, metadata=option("Epochs in all, head-only ones included.", range=POSITIVE))
    head_epochs: int = field(default=0, metadata=option(
        "Staged schedule: train only the head for this many epochs, then unfreeze.", range=NON_NEGATIVE))
    lr: float = field(default=1e-4, metadata=option(f"Adam learning rate of the head, up to {MAX_LR:g}.",
                                                    range=LEARNING_RATES, doc="Adam learning rate of the head"))
    backbone_lr: Optional[float] = field(default=None, metadata=option(
        f"Learning rate of the backbone, up to {MAX_LR:g} [default: lr / 10].", range=LEARNING_RATES,
        doc="learning rate of the unfrozen backbone", doc_default="lr / 10"))


@dataclass
class PredictConfig(RunnerOptions):
    """What to classify, with which model, and where the rows go."""

    paths: list = field(default_factory=list, metadata=option(
        "Image files and/or folders (searched recursively).", argument=True, multiple=True, required=True))
    model: str = field(default="", metadata=option(
        "A model.pt from train/finetune, or a head.pt from fit-head.", path="file", required=True, metavar="FILE"))
    weights: Optional[str] = field(default=None, metadata=option(HEAD_WEIGHTS_HELP,
                                                                 doc_default="where the head recorded them"))
    format: str = field(default="table", metadata=option(
        "Output format (the table into an --output named .csv or .json: csv or json).", choices=FORMATS,
        doc="output format; the table into an `--output` named `.csv` or `.json` is written as csv or json"))
    output: Optional[str] = field(default=None, metadata=option(
        "Write the rows to FILE.", path="file", metavar="FILE", doc=(
            "write the rows to FILE (streamed for csv; refused if it names an input, the model or what it reads, is "
            "named as an image, or lies in a photo folder)")))
    explain: Optional[str] = field(default=None, metadata=option(
        "Write each photo's heatmap (where its class was decided) over it into DIR, one PNG per photo.", path="dir",
        metavar="DIR", doc=(
            "write each photo's heatmap over it (where its class was decided: [heatmaps.md](heatmaps.md)) into DIR as "
            "`NNNNN-name.png` (its number in the input order, the name's stem with anything but letters, digits, `-`, "
            "`_`, `.` as `_`; never over a file: a name an earlier run left gets `-2`, `-3`...), named in the rows' "
            "`heatmap` column; from the same forward pass as the rows. Refused "
            "where `--output` is (inside a photo folder, over an input), in the folder of a photo named alone and in "
            "a folder holding a folder predicted (`predict DIR/in --explain DIR`: `predict DIR` would read the "
            "heatmaps)")))


@dataclass
class ImagenetCheckConfig(DeviceOptions):
    """Which image, through which full pretrained model (its ImageNet classifier included)."""

    image: str = field(default="", metadata=option("The image file.", argument=True, path="file", required=True))
    backbone: str = field(default="vgg16", metadata=option(BACKBONE_HELP))
    weights: str = field(default="DEFAULT", metadata=option(
        "Full pretrained weights (with the ImageNet classifier): a torchvision name or a file."))
    top: int = field(default=5, metadata=option("How many of the best classes to show.", range=POSITIVE))


@dataclass
class CachesConfig:
    """Which folder's caches to list, or which sharded cache to turn into one file instead."""

    cache_dir: str = field(default="features", metadata=CACHE_DIR)
    consolidate: Optional[str] = field(default=None, metadata=option(
        "Copy this sharded (torchrun) cache into one ordinary file in its place, instead of listing.", path="file",
        metavar="CACHE"))


@dataclass
class RunsConfig:
    """Which runs of the ledger (runs/ledger.jsonl) to show, and in which order."""

    runs_dir: str = field(default="runs", metadata=option("The folder holding ledger.jsonl."))
    sort_by: Optional[str] = field(default=None, metadata=option(
        "Best first by this metric (val_acc, accuracy, ...; losses and calibration errors (ece) lowest first) "
        "[default: newest first].",
        names=("--sort",), metavar="METRIC", doc_default="newest first"))
    cache: Optional[str] = field(default=None, metadata=option(
        "Only runs on this cache (a cache file or a fingerprint prefix)."))
    backbone: Optional[str] = field(default=None, metadata=option("Only runs with this backbone."))


@dataclass
class SummaryConfig:
    """Which model to describe; parameters are counted on the meta device (no weights, no compute)."""

    backbone: str = field(default="vgg16", metadata=option(BACKBONE_HELP))
    classes: int = field(default=2, metadata=option("Outputs of the new head.", range="[2, inf)"))
    pool: Optional[str] = field(default=None, metadata=option("[default: the backbone's]", choices=POOLS,
                                                              doc="head input", doc_default="the backbone's"))
    dropout: float = field(default=0.0, metadata=option(
        "Dropout before the head's linear layer (adds no parameters).", range=DROPOUT))
    unfreeze: str = field(default="none", metadata=option(
        "'none' (frozen backbone, as train), 'all', or K: the last K blocks (as finetune)."))
    crop_size: int = field(default=0, metadata=option("Input size; 0 = the backbone's default.", range=NON_NEGATIVE))


@dataclass
class EvaluateConfig(RunnerOptions):
    """Which model, on which rows or images, and where the pictures go."""

    model: str = field(default="", metadata=option(
        "A fit-head head.pt (on --cache or --data) or a train/finetune model.pt (on --data).", path="file",
        required=True, metavar="FILE"))
    cache: Optional[str] = field(default=None, metadata=option(
        "Feature cache to evaluate on [default: the one the model was trained on].", path="file", metavar="FILE",
        doc_default="the one the model was trained on"))
    data: Optional[str] = field(default=None, metadata=option(
        "Or an ImageFolder root, run through the backbone.", metavar="DIR"))
    split: str = field(default="auto", metadata=option(
        "Cache rows: the model's validation split (val), every row (all), or auto: val on the cache the model was "
        "fitted on, all on another (a held-out cache).", choices=SPLITS))
    weights: Optional[str] = field(default=None, metadata=option(
        "Backbone weights for --data [default: those the model names].", doc_default="those the model names"))
    top_k: int = field(default=12, metadata=option("Images in the misclassified gallery.", range=POSITIVE))
    precision: str = field(default="auto", metadata=option(
        "--data: compute precision; auto = bf16 where the device supports it.", choices=MODEL_PRECISIONS))
    workers: int = field(default=-1, metadata=option("Decoding for --data, as predict's --workers.",
                                                     range=WORKER_COUNTS))
    block_rows: int = field(default=2048, metadata=option("Cache rows read from disk at once.", range=POSITIVE,
                                                          cli=False))
    runs_dir: str = field(default="runs", metadata=option(
        "Where run outputs go.", doc="the pictures and `metrics.json` go to `runs/<stamp>-evaluate/`"))


@dataclass
class PreviewConfig:
    """Which images to show, and with which preprocessing."""

    data: str = field(default="data/PetImages", metadata=option(DATA_HELP, metavar="DIR"))
    per_class: int = field(default=4, metadata=option(
        f"Images per class, a row each (1 to {MAX_PER_CLASS}).", range=f"[1, {MAX_PER_CLASS}]",
        doc="images per class, a row each"))
    seed: int = field(default=0, metadata=option("Seeds which images are shown.", range=SEEDS))
    backbone: str = field(default="vgg16", metadata=option("Whose preprocessing/features."))
    weights: str = field(default="DEFAULT", metadata=option(WEIGHTS_HELP))
    output: str = field(default="runs/preview.png", metadata=option("PNG to write.", path="file", metavar="FILE"))


@dataclass
class FeatureMapConfig:
    """Which image, through which backbone."""

    image: str = field(default="", metadata=option("The image file.", argument=True, path="file", required=True))
    top_k: int = field(default=6, metadata=option(
        f"Most active channels shown over the image (1 to {MAX_TOP_K}).", range=f"[1, {MAX_TOP_K}]",
        doc="most active channels shown over the image"))
    backbone: str = field(default="vgg16", metadata=option("Whose preprocessing/features."))
    weights: str = field(default="DEFAULT", metadata=option(WEIGHTS_HELP))
    output: str = field(default="runs/feature-map.png", metadata=option("PNG to write.", path="file",
                                                                        metavar="FILE"))


@dataclass
class DemoConfig:
    """Where the data and weights come from, and the size of the run."""

    data: str = field(default="data/PetImages", metadata=option(
        "ImageFolder root; fetched (Kaggle cats vs dogs) into its parent when missing.", doc=(
            "ImageFolder root; the Kaggle archive is fetched into its parent when it is missing (only for this "
            "default: any other folder must exist)")))
    url: str = field(default=KAGGLE_CATS_DOGS_URL, metadata=option(
        "Archive to fetch when --data is missing.", doc_default="the Microsoft `kagglecatsanddogs_5340.zip`"))
    weights: str = field(default="DEFAULT", metadata=option(
        "DEFAULT, a torchvision weights name or timm tag, or a local file."))
    backbone: str = field(default="vgg16", metadata=option("Feature extractor."))
    n: int = field(default=800, metadata=option("Images to extract (the tutorial's 700 train / 100 val); 0 = all.",
                                                range=NON_NEGATIVE))
    quarantine: bool = field(default=True, metadata=option(
        "Only report bad files; do not move them out of the data folder.", doc_default="(quarantine)"))
    cache_dir: str = field(default="features", metadata=option("Feature caches."))
    runs_dir: str = field(default="runs", metadata=RUNS_DIR)
    workers: int = field(default=-1, metadata=option("Decoding, as extract's --workers.", range=WORKER_COUNTS))
    command: str = field(default="", metadata=internal("the command line, recorded in the cache"))


#: Cosine similarity of max-pooled, l2-normalised rows above which two photos are near copies (audit).
#: Measured on real photos (docs/audit.md, bench/near_duplicates.py): 98-100 % of resized, re-encoded and
#: 10 %-cropped copies score above it, and no two distinct photos of catsdogs do.
NEAR_DUPLICATE = 0.88
AUDIT_ACTIONS = ("relabel", "remove", "keep")  # the actions of an audit --apply CSV row


@dataclass
class AuditConfig(DeviceOptions):
    """Which folder (or cache) to audit, against which test folder, and what to do with a reviewed list."""

    data: Optional[str] = field(default=None, metadata=option(
        "The labelled training folder (extracted as extract does when it has no cache yet); with --undo, the folder "
        "the journal must be of.", metavar="DIR"))
    test_data: Optional[str] = field(default=None, metadata=option(
        "A test folder: its photos that the training folder also holds are leaks.", metavar="DIR"))
    cache: Optional[str] = field(default=None, metadata=option("Or the training folder's cache.", path="file",
                                                               metavar="FILE"))
    test_cache: Optional[str] = field(default=None, metadata=option("Or the test folder's cache.", path="file",
                                                                    metavar="FILE"))
    cache_dir: str = field(default="features", metadata=option("Where caches are looked for and made."))
    backbone: str = field(default="vgg16", metadata=option("--data: the backbone extract runs."))
    weights: str = field(default="DEFAULT", metadata=option(
        "--data: DEFAULT, a torchvision weights name or timm tag, a state-dict file, or 'none'."))
    batch_size: int = field(default=32, metadata=option("--data: images per forward pass.", range=POSITIVE))
    workers: int = field(default=-1, metadata=option("--data: decoding, as extract's --workers.",
                                                     range=WORKER_COUNTS))
    folds: int = field(default=5, metadata=option("Out-of-fold probabilities from this many refits of the head.",
                                                  range="[2, inf)"))
    seed: int = field(default=0, metadata=option(
        "Seeds the folds, the head's landmarks and its choice of C and gamma.", range=SEEDS))
    threshold: float = field(default=NEAR_DUPLICATE, metadata=option(
        "Max-view cosine similarity from which two photos are near copies (then a layout check).", range="(0, 1]",
        doc=("cosine similarity (max-pooled, l2-normalised rows) from which two photos are near copies, each then "
             "confirmed by the layout of their cached maps (measured: docs/audit.md)")))
    top: int = field(default=40, metadata=option("Issues shown in the table, the HTML report and the gallery.",
                                                 range=POSITIVE))
    output: Optional[str] = field(default=None, metadata=option(
        "Folder for the report [default: a run folder].", path="dir", metavar="DIR",
        doc_default="a run folder `runs/<stamp>-audit/`",
        doc=("where report.json, report.html, gallery.png, fixes.csv go (never inside a data folder); an earlier "
             "audit's fixes.csv there, edited, is kept as fixes-earlier.csv")))
    runs_dir: str = field(default="runs", metadata=option("Where the run folder goes."))
    apply: Optional[str] = field(default=None, metadata=option(
        "Apply a reviewed list (path,action,new_class; relabel/remove/keep): files moved, never deleted.",
        path="file", metavar="FIXES.csv",
        doc="columns path, action (relabel, remove, keep), new_class, optional new_name: files moved, journalled"))
    undo: Optional[str] = field(default=None, metadata=option(
        "Move back every file of an --apply journal.", path="file", metavar="JOURNAL", doc=(
            "move back every file of an `--apply` journal (checked first: refused, moving nothing, if one is "
            "missing, changed or its place taken, or if the journal names a place outside its data folder and "
            "quarantine; with `--data DIR`, a journal of another folder)")))
    quarantine_dir: Optional[str] = field(default=None, metadata=option(
        "--apply: where removed files go [default: DATA.quarantine beside DATA].", path="dir", metavar="DIR",
        doc_default="`DATA.quarantine`"))
    refresh: bool = field(default=True, metadata=option(
        "--apply/--undo: do not extract the folder again afterwards.", doc_default="(refresh)",
        doc="`--apply`/`--undo`: do not extract the folder again afterwards (rows are reused by content either way)"))
    command: str = field(default="", metadata=internal("the command line, recorded in caches it makes"))


#: How suggest ranks a pool (bench/suggest_curve.py measured them against random picks, docs/suggest.md):
#: 'diverse-uncertain' the 2k least certain photos, then one at a time the one farthest from every photo labelled
#: or picked (k-center); 'margin' the least certain; 'diverse' the k-center over the whole pool; 'random'.
SUGGEST_RULES = ("diverse-uncertain", "margin", "diverse", "random")
SUGGEST_HEADS = ("auto", "logreg")  # fit-head's default head (by CV), or logistic regression with its defaults


@dataclass
class SuggestConfig(KnownShareOption, DeviceOptions):
    """Which labelled folder, which pool of unlabelled photos, and how the pool is ranked for labelling."""

    data: Optional[str] = field(default=None, metadata=option(
        "The labelled folder (one sub-folder per class), extracted as extract does.", metavar="DIR", required=True))
    pool: Optional[str] = field(default=None, metadata=option(
        "A folder of unlabelled photos (loose or in sub-folders), extracted once as one unlabelled class (never the "
        "default training cache).", metavar="DIR", required=True))
    k: int = field(default=50, metadata=option("Photos to suggest.", range=POSITIVE))
    rule: str = field(default="diverse-uncertain", metadata=option(
        "How the pool is ranked: diverse-uncertain = k-center among the 2k least certain (measured in "
        "docs/suggest.md).", choices=SUGGEST_RULES))
    head: str = field(default="auto", metadata=option(
        "The head whose uncertainty counts: auto (fit-head's default, by CV) or logreg (faster).",
        choices=SUGGEST_HEADS))
    cache_dir: str = field(default="features", metadata=option("Where caches are looked for and made."))
    backbone: str = field(default="vgg16", metadata=option(BACKBONE_HELP))
    weights: str = field(default="DEFAULT", metadata=option(WEIGHTS_HELP))
    batch_size: int = field(default=32, metadata=option("Images per forward pass.", range=POSITIVE))
    workers: int = field(default=-1, metadata=option("Decoding, as extract's --workers.", range=WORKER_COUNTS))
    seed: int = field(default=0, metadata=option("Seeds the head's CV folds and the random rule.", range=SEEDS))
    output: Optional[str] = field(default=None, metadata=option(
        "Folder for suggestions.csv and suggestions.html [default: a run folder].", path="dir", metavar="DIR",
        doc_default="a run folder `runs/<stamp>-suggest/`",
        doc="where suggestions.csv and suggestions.html go (never inside either photo folder)"))
    runs_dir: str = field(default="runs", metadata=option("Where the run folder goes."))
    command: str = field(default="", metadata=internal("the command line, recorded in caches it makes"))


@dataclass
class ExportConfig:
    """Which model to export, into which file and format, and the parity check it must pass."""

    model: str = field(default="", metadata=option(
        "A fit-head head.pt (exported with its backbone) or a train/finetune model.pt.", path="file", required=True,
        metavar="FILE"))
    format: str = field(default="onnx", metadata=option("onnx or torchscript.", choices=EXPORT_FORMATS, doc=(
        "`onnx` (ONNX Runtime and other ONNX runners) or `torchscript` (`torch.jit.load`, C++ libtorch)")))
    output: str = field(default="", metadata=option(
        "The file to write (not named for the other format: .onnx, .pt, .ts); its metadata goes beside it as "
        "FILE.json. Only an earlier export there is replaced.", path="file", required=True, metavar="FILE"))
    weights: Optional[str] = field(default=None, metadata=option(HEAD_WEIGHTS_HELP,
                                                                 doc_default="where the head recorded them"))
    check_data: Optional[str] = field(default=None, metadata=option(
        "Photos (a folder or a file) for the parity check [default: the training data's].", path="any", metavar="DIR",
        doc_default="the training data", doc=(
            "photos for the parity check (a folder or a file); by default the first rows of the head's training "
            "cache (their photos), or photos of a model's training folder")))
    check_n: int = field(default=16, metadata=option("Photos of --check-data compared, spread over them; 0 = all.",
                                                     range=NON_NEGATIVE))
    tolerance: float = field(default=1e-4, metadata=option(
        "Largest allowed probability difference from predict (fp32).", range=POSITIVE_FLOAT))
    batch_size: int = field(default=16, metadata=option("Images per forward pass in the parity check.",
                                                        range=POSITIVE))
    workers: int = field(default=0, metadata=option("Decoding processes for the parity check; 0 = in-process.",
                                                    range=WORKER_COUNTS))


@dataclass
class ServeConfig(DeviceOptions):
    """Which model to serve, where, and the limits that keep one client from hurting the others."""

    model: str = field(default="", metadata=option("A fit-head head.pt or a train/finetune model.pt.", path="file",
                                                   required=True, metavar="FILE"))
    weights: Optional[str] = field(default=None, metadata=option(HEAD_WEIGHTS_HELP,
                                                                 doc_default="where the head recorded them"))
    host: str = field(default="127.0.0.1", metadata=option(
        "Address to listen on (localhost unless told otherwise).",
        doc="the address to listen on (another one is warned about: no authentication)"))
    port: int = field(default=8000, metadata=option("TCP port (0 = any free one).", range="[0, 65535]"))
    precision: str = field(default="auto", metadata=MODEL_PRECISION)
    batch_size: int = field(default=32, metadata=option(
        "Most images in one forward pass (concurrent requests share it).", range=POSITIVE))
    max_wait_ms: float = field(default=5.0, metadata=option(
        "How long a batch waits for more images once the first came.", range="[0, 1000]"))
    max_queue: int = field(default=256, metadata=option(
        "Images waiting for the network; past it a request gets 503.", range=POSITIVE))
    max_requests: int = field(default=32, metadata=option(
        "POST requests read and answered at once; past it 503.", range=POSITIVE,
        doc="POST requests read and answered at once (more: 503 before their body is read; each costs up to 1 MB "
            "of memory a file while its form is read)"))
    max_files: int = field(default=64, metadata=option("Images in one request.", range=POSITIVE,
                                                       doc="images in one request (more: 400)"))
    max_file_bytes: int = field(default=20_000_000, metadata=option(
        "Bytes of one image.", range=POSITIVE,
        doc="bytes of one image (more: that file's row says so; 413 when no file is usable)"))
    max_request_bytes: int = field(default=100_000_000, metadata=option(
        "Bytes of one request.", range=POSITIVE, doc="bytes of one request body (413, checked as it streams in)"))
    max_pixels: int = field(default=40_000_000, metadata=option(
        "Pixels of one image (from its header, before decoding).", range=POSITIVE))
    header_seconds: float = field(default=10.0, metadata=option(
        "Seconds a request's line and headers may take (then 408 and closed).", range=POSITIVE_FLOAT,
        doc="seconds a connection may take to send a request's line and headers, from its opening (on a kept-alive "
            "connection: from the next request's first byte); then 408 and closed: a client sending its headers "
            "a byte now and then, or nothing, holds its connection that long, not for ever"))
    body_seconds: float = field(default=20.0, metadata=option(
        "Seconds a request body may go without a byte, or lag --min-body-rate (then 408).", range=NON_NEGATIVE,
        doc="seconds a request body may go without a byte arriving, and may lag behind --min-body-rate (then 408: a "
            "stalled client holds no connection; 0 = no time limit on a body at all)"))
    min_body_rate: int = field(default=10_000, metadata=option(
        "Bytes/s a request body must keep up, --body-seconds of lag allowed (then 408).", range=NON_NEGATIVE,
        doc="bytes a second a request body must keep up, --body-seconds of lag allowed (then 408: a client sending "
            "a byte now and then holds no connection; 0 = no minimum)"))
    drain_seconds: float = field(default=30.0, metadata=option(
        "On SIGTERM: how long requests in flight may still take.", range="[0, inf)",
        doc="on SIGTERM: how long requests in flight may still take (then a clean 503; 0 = no limit)"))
