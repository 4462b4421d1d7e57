"""Command line: parse options, call one pipeline function per command, print results.

Results go to stdout (``--json`` for scripts), progress and logs to stderr. Defaults live once, in
each stage's config dataclass (``defaults_from``). The library's ``UsageError`` is a usage error
(one line, exit code 2), a ``PipelineError`` exits 1; anything else is a bug, shown as one line, or
with its traceback under ``-v``. ``python cli.py`` (a shim at the top) and the ``transfer-pipeline``
console script both run ``main``.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os
import sys
import warnings

import click

from . import api
from .config import (
    CALIBRATIONS,
    COMPILE,
    DECODERS,
    EXPORT_FORMATS,
    FORMATS,
    HEADS,
    MAX_LR,
    MAX_TOP_K,
    MODEL_PRECISIONS,
    NORMS,
    POOLS,
    PRECISIONS,
    RECIPES,
    SPLITS,
    STORAGE_DTYPES,
    VIEWS,
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
    ImagenetCheckConfig,
    PredictConfig,
    PreviewConfig,
    ServeConfig,
    SummaryConfig,
    TrainConfig,
)
from .errors import PipelineError, UsageError


class FiniteFloat(click.ParamType):
    """A float option that refuses nan and +-inf (click's FLOAT takes them: `--lr inf` trained a NaN head)."""

    name = "float"

    def convert(self, value, param, ctx):
        import math

        try:
            x = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(x):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return x


FINITE = FiniteFloat()

#: help texts shared by several commands
BACKBONE_HELP = ("Any torchvision or timm model: vgg16, resnet50, tf_efficientnet_lite0, convnext_tiny, timm:NAME "
                 "(docs/backbones.md).")
WEIGHTS_HELP = ("DEFAULT, a torchvision weights name (IMAGENET1K_V1) or timm tag (in1k), a state-dict file "
                "(+ .json sidecar), or 'none'.")
WORKERS_HELP = ("Decoding: -1 = on the CPU a thread per core, in turns with the network; on a GPU a process per core; "
                "N processes; 0 in-process.")


class OneLineUsageError(click.UsageError):
    """A usage error shown as a single 'Error: ...' line (exit code 2), without the usage banner."""

    def show(self, file=None):
        click.echo(f"Error: {self.format_message()}", file=file or sys.stderr)


class _OneLineErrors:
    """Click's own usage errors (a bad --lr, a missing argument, an unknown command) as one line too."""

    def _one_line(self, ctx, call, *args):
        try:
            return call(ctx, *args)
        except OneLineUsageError:
            raise
        except click.UsageError as e:
            raise OneLineUsageError(f"{e.format_message()} (see '{ctx.command_path} --help')", ctx) from None

    def parse_args(self, ctx, args):
        return self._one_line(ctx, super().parse_args, args)


class OneLineCommand(_OneLineErrors, click.Command):
    pass


class OneLineGroup(_OneLineErrors, click.Group):
    command_class = OneLineCommand

    def resolve_command(self, ctx, args):
        return self._one_line(ctx, super().resolve_command, args)


def library_errors(fn):
    """Turn library exceptions into click's: UsageError -> exit 2, PipelineError -> exit 1.

    Anything else is a bug: one line and exit 1, or the whole traceback with ``-v``.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UsageError as e:
            raise OneLineUsageError(str(e)) from None
        except PipelineError as e:
            if getattr(e, "fatal", False):  # see paths.disk_error: no clean shutdown is possible
                click.echo(f"Error: {e}", err=True)
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(1)
            raise click.ClickException(str(e)) from None
        except (click.ClickException, click.exceptions.Exit, click.Abort, KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:
            ctx = click.get_current_context(silent=True)
            if ctx is not None and (ctx.find_root().params.get("verbose") or 0):
                raise
            raise click.ClickException(f"unexpected {type(e).__name__}: {e} (a bug? run with -v for the "
                                       "traceback)") from None

    return wrapper


def defaults_from(*sources):
    """Take each option's default from the first config dataclass (or function) that has a field of its name.

    So a default is written once, where the stage is: ``--n`` shows ExtractConfig.n.
    """
    import inspect
    from dataclasses import MISSING, fields, is_dataclass

    table: dict = {}
    for src in reversed(sources):
        if is_dataclass(src):
            table.update({f.name: f.default for f in fields(src) if f.default is not MISSING})
        else:
            table.update({k: v.default for k, v in inspect.signature(src).parameters.items()
                          if v.default is not inspect.Parameter.empty})

    def decorate(cmd: click.Command) -> click.Command:
        for p in cmd.params:
            if isinstance(p, click.Option) and p.name in table and not p.required:
                p.default = table[p.name]
                p.show_default = table[p.name] not in (None, "")
        return cmd

    return decorate


def note(text: str) -> None:
    """An informational line on stderr (silenced by --quiet); results go to stdout."""
    from .progress import is_quiet

    if not is_quiet():
        click.echo(text, err=True)


def plural(k: int, word: str) -> str:
    return f"{k} {word}" if k == 1 else f"{k} {word}s"


def emit(result, as_json: bool, text: str) -> None:
    click.echo(json.dumps(_finite(result), indent=2, default=str, allow_nan=False) if as_json else text)


def _finite(value):
    """``value`` with NaN and infinities as null: JSON has no such numbers, and a bare NaN breaks every parser."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _setup_logging(verbose: int, quiet: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(message)s" if verbose else "%(message)s",
                        stream=sys.stderr, force=True)
    warnings.formatwarning = lambda msg, cat, *a, **k: f"warning: {msg}\n"
    logging.captureWarnings(True)


@click.group(cls=OneLineGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="Log every committed batch and other details to stderr.")
@click.option("-q", "--quiet", is_flag=True,
              help="No progress bars or progress lines, no informational logs; warnings and errors still show.")
def cli(verbose, quiet):
    """Transfer learning from a folder of labelled photos: cache CNN features once, fit heads in seconds.

    Progress goes to stderr: a bar in a terminal, a line every 10 s in a log file or pipe.
    """
    from .progress import set_quiet

    _setup_logging(verbose, quiet)
    set_quiet(quiet)


def common_cache_options(fn):
    fn = click.option("--cache-dir", help="Folder of feature caches.")(fn)
    fn = click.option("--cache", "cache", type=click.Path(dir_okay=False),
                      help="Cache file to use [default: the newest complete cache].")(fn)
    return fn


def json_option(fn):
    return click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")(fn)


@defaults_from(ExtractConfig)
@cli.command()
@click.option("--data", help="ImageFolder root (one folder per class).")
@click.option("-n", "--n", type=int,
              help="Good images to extract; 0 = all (under torchrun write -n: torchrun takes --n for its own).")
@click.option("--backbone", help=BACKBONE_HELP)
@click.option("--weights", help=WEIGHTS_HELP)
@click.option("--batch-size", type=int)
@click.option("--device", help="auto, cpu, cuda or cuda:N.")
@click.option("--workers", type=int, help=WORKERS_HELP)
@click.option("--seed", type=int, help="Seed of the stratified sample of --n images.")
@click.option("--dtype", type=click.Choice(STORAGE_DTYPES),
              help="Storage dtype of the features.")
@click.option("--precision", type=click.Choice(PRECISIONS),
              help="Compute precision; auto = int8 for CPU runs of 1,000+ images where it pays (AVX-512 VNNI, "
                   "torchao), else bf16 where the device supports it; int8 (CPU, needs torchao) quantises the "
                   "backbone, calibrated on --calib-n images of the sample.")
@click.option("--compile", type=click.Choice(COMPILE),
              help="torch.compile the backbone: a one-off compile (tens of seconds), then faster per image; "
                   "auto = for int8 and long CPU runs. Falls back to eager with a warning.")
@click.option("--calib-n", type=int, help="int8: calibration images (the first of the seeded sample).")
@click.option("--calib-data", help="int8: calibrate on this folder's sample instead of --data's.")
@click.option("--pool", type=click.Choice(POOLS),
              help="avg stores globally pooled C-vectors instead of C x H x W maps.")
@click.option("--flip/--no-flip", default=None,
              help="Store each map as the mean of the photo's and its mirror image's: twice the compute, about "
                   "+1 point on a small fine-grained set (dogbreeds20). Part of the cache key: extract test folders "
                   "with the same option (fit-head --test-data does) [default: off].")
@click.option("--verify", is_flag=True,
              help="On a cache hit or resume, hash every row's photo (sha256) and extract again what was rewritten "
                   "in place with its size and mtime kept [default: only where the rows' photos total at most "
                   "100 MB; about 1.5 s for 25,000 JPEGs].")
@click.option("--decode", type=click.Choice(DECODERS),
              help="device: decode JPEGs with torchvision's decode_jpeg on --device (nvJPEG on a GPU), "
                   "for when CPU decoding is the bottleneck; other files still go through PIL.")
@click.option("--cache-dir")
@click.option("--shard-dir", help="Under torchrun: shards go to SHARD_DIR/<cache name>.shards/ "
              "(e.g. a node-local disk) [default: beside the cache].")
@json_option
@library_errors
def extract(as_json, **options):
    """Run the frozen backbone over the images and stream features to an HDF5 cache (reused when unchanged).

    Under `torchrun --nproc_per_node=K cli.py extract ...` each rank extracts a shard and rank 0
    joins them into one (virtual) cache.
    """
    from .runs.ledger import current_command
    try:
        result = api.extract_features(options.pop("data"), verbose=None, command=current_command(), **options).result
    except KeyboardInterrupt:
        click.echo(f"\ninterrupted; committed rows are kept. Resume with:\n  {current_command()}", err=True)
        sys.exit(130)
    if result["hit"]:
        note(f"cache hit: {result['rows']} rows already extracted, nothing computed"
             f"{' (every photo checked against its sha256)' if result.get('verified') else ''}")
    else:
        one_off = [f"{what} {result[k]:.0f} s" for k, what in (
            ("calibration_seconds", "int8 calibration" + (" reused" if result.get("calibration_reused") else "")),
            ("compile_seconds", "compiling" + (f" (compile cache {result['compile_cache']})"
                                               if result.get("compile_cache") else ""))) if result.get(k)]
        note(f"extracted {result['computed']} images ({result['img_per_s']:.1f} img/s"
             f"{', not counting ' + ' and '.join(one_off) if one_off else ''}), "
             f"{result['skipped']} skipped, {result['rows']} rows in "
             f"{'shards of rank ' + str(result['rank']) if 'rank' in result else 'cache'}")
        if result.get("reused"):
            note(f"reused {result['reused']} rows of earlier caches by content ({result['label_changes']} of them "
                 f"now in another class), computed {result['computed']}")
    if "rank" not in result:  # under torchrun only rank 0 prints the result
        emit(result, as_json, result["cache"])


@defaults_from(ExtractConfig)  # --cache-dir
@cli.command()
@click.option("--cache-dir")
@click.option("--consolidate", type=click.Path(dir_okay=False), metavar="CACHE",
              help="Copy this sharded (torchrun) cache into one ordinary file in its place, instead of listing.")
@json_option
@library_errors
def caches(cache_dir, consolidate, as_json):
    """List the feature caches: path, backbone, rows, classes, size, created."""
    if consolidate:
        result = api.Cache(consolidate).consolidate()
        note(f"{result['rows']} rows copied into one file ({result['size_bytes'] / 1e6:.1f} MB); "
                   f"its {len(result['shards'])} shard files are no longer needed")
        emit(result, as_json, result["cache"])
        return
    found = api.list_caches(cache_dir)
    result = {"caches": [c.summary() for c in found],
              "unreadable": [dict(b) for b in found.unreadable]}  # already {path, why} each
    lines = [f"{'path':<48} {'backbone':<10} {'rows':>6} {'classes':<20} {'size':>9}  created"]
    for c in result["caches"]:
        state = ("" if c["complete"] else "  (incomplete)") + ("  (sharded)" if c.get("sharded") else "")
        lines.append(f"{c['path']:<48} {c['backbone']:<10} {c['rows']:>6} {','.join(c['classes'])[:20]:<20} "
                     f"{c['size_bytes'] / 1e6:>7.1f}MB  {c['created']}{state}")
    lines += [f"not a usable cache: {b['path']}: {b['why']}" for b in result["unreadable"]]
    emit(result, as_json, "\n".join(lines) if result["caches"] or result["unreadable"] else f"no caches in {cache_dir}")


def head_options(fn):
    """Options of the head fit-head trains (compare-sklearn trains every kind with them)."""
    for opt in reversed([
        click.option("--features", type=click.Choice(VIEWS),
                     help="View of the cached map: flat (C*H*W, the tutorial's), avg / max (global pooling), avgmax."),
        click.option("--normalize", type=click.Choice(NORMS), help="Feature normalisation."),
        click.option("--recipe", type=click.Choice(RECIPES),
                     help="seed: the tutorial's exact head (flat, 1/RMS, Adam 0.01, 10 epochs, no early stopping)."),
        click.option("--epochs", type=int, help="linear: at most this many epochs."),
        click.option("--patience", type=int, help="linear: early stopping after this many epochs without a "
                     "lower val loss (0 = never); the best epoch's weights are kept."),
        click.option("--lr", type=FINITE, help="linear: Adam learning rate."),
        click.option("--weight-decay", type=FINITE, help="linear: Adam weight decay."),
        click.option("--batch-size", type=int),
        click.option("--dropout", type=FINITE),
        click.option("--test-data", type=click.Path(file_okay=False),
                     help="Photos the head never saw (one folder per class): extracted like the cache, then scored."),
        click.option("--test-cache", type=click.Path(dir_okay=False),
                     help="Or a cache of them (made with the same backbone, weights and preprocessing)."),
        click.option("--device"),
        click.option("--runs-dir", help="Where run outputs go."),
    ]):
        fn = opt(fn)
    return fn


def trust_options(calibrations):
    """The calibration and unknown-input options of fit-head, train and finetune."""
    def add(fn):
        for opt in reversed([
            click.option("--calibrate", type=click.Choice(calibrations),
                         help="Where the temperature is fitted: cv (out-of-fold training rows + val), val, or none."),
            click.option("--known-share", type=FINITE,
                         help="Share of validation photos kept as known; a photo scoring above them is 'unknown'."),
            click.option("--unknown-rows", type=int,
                         help="Training rows kept for the unknown score (a seeded sample, 1 KB each); 0 = none."),
            click.option("--unknown-k", type=int, help="The unknown score's neighbour: the k-th nearest training row."),
        ]):
            fn = opt(fn)
        return fn
    return add


def split_options(fn):
    fn = click.option("--seed", type=int, help="Seeds the train/val split.")(fn)
    fn = click.option("--val-fraction", type=FINITE)(fn)
    return fn


@defaults_from(FitHeadConfig)
@cli.command("fit-head")
@click.option("--cache-dir", help="Folder of feature caches.")
@click.option("--cache", "cache", type=click.Path(dir_okay=False), multiple=True,
              help="Cache file to use [default: the newest complete cache]; given more than once (caches of the "
                   "same photos from other backbones), one head on their fused features.")
@split_options
@click.option("--head", type=click.Choice(HEADS),
              help="auto: the exact RBF SVM or logistic regression, kind and C by k-fold CV; linear: Adam with "
                   "early stopping; logreg: scikit-learn LogisticRegression; kernel: an RBF (Nystroem) map + logreg; "
                   "svm: the exact RBF SVM (one-vs-rest). Each is saved as the same Linear + LogSoftmax checkpoint.")
@click.option("--C", "C", type=FINITE, help="logreg, kernel, svm: inverse regularisation strength.")
@click.option("--gamma", help="kernel, svm: RBF width, a number, 'scale' or 'G*scale'.")
@click.option("--kernel-components", type=int, help="kernel: Nystroem landmarks.")
@click.option("--tune", is_flag=True, help="Choose head kind, view, normalisation and C by stratified k-fold CV "
              "on the training rows (a table on stderr), then refit the winner.")
@click.option("--folds", type=int, help="auto, --tune: folds.")
@click.option("--refit/--no-refit", default=None, help="auto, --tune: once validated, fit the chosen setting again on "
              "every row, the validation rows included.")
@head_options
@trust_options(CALIBRATIONS)
@json_option
@library_errors
def fit_head_cmd(as_json, **options):
    """Fit a Linear + LogSoftmax head on cached features (one line per epoch for --head linear)."""
    from .heads.fit_head import format_result

    cache = options.pop("cache")
    rows = list(cache) if len(cache) > 1 else cache[0] if cache else None
    result = api.Head(verbose=None, **options).fit(rows).result_
    emit(result, as_json, format_result(result))


@defaults_from(ChooseBackboneConfig)
@cli.command("choose-backbone")
@click.option("--data", help="ImageFolder root (one folder per class).")
@click.option("--backbone", "backbones", multiple=True, metavar="NAME[=WEIGHTS]",
              help="A candidate: a backbone name, with its weights (a name, a file, or none) after '='; once per "
                   "candidate.")
@click.option("-n", "--n", type=int, help="Photos each candidate extracts (a seeded stratified sample; all when "
              "the folder has fewer).")
@click.option("--folds", type=int, help="Stratified cross-validation folds ...")
@click.option("--repeats", type=int, help="... repeated with other shuffles (every candidate on the same folds).")
@click.option("--fused/--no-fused", default=None,
              help="Also cross-validate every combination of two or more candidates' fused features.")
@click.option("--seed", type=int, help="Seeds the sample, the folds and the heads.")
@click.option("--cache-dir", help="Where the candidates' caches go (later commands reuse them).")
@click.option("--device", help="auto, cpu, cuda or cuda:N.")
@click.option("--precision", type=click.Choice(PRECISIONS), help="Extraction's compute precision (as extract's).")
@click.option("--batch-size", type=int, help="Extraction's images per forward pass.")
@click.option("--workers", type=int, help="Extraction's decoding workers (as extract's).")
@json_option
@library_errors
def choose_backbone_cmd(as_json, data, backbones, **options):
    """Which backbone (or fusion of backbones) suits these photos: cross-validated accuracy, log-loss,
    extraction speed and cache size of each, and the fastest within noise of the best."""
    from dataclasses import asdict

    from .heads.backbone_choice import format_choice
    from .runs.ledger import current_command

    options = {k: v for k, v in options.items() if v is not None}
    choice = api.choose_backbone(data, list(backbones), verbose=None, command=current_command(), **options)
    emit(asdict(choice), as_json, format_choice(choice))


@defaults_from(CompareConfig, FitHeadConfig)
@cli.command("compare-sklearn")
@common_cache_options
@split_options
@click.option("--C", "C", type=FINITE, help="LogisticRegression C.")
@click.option("--max-iter", type=int)
@click.option("--no-scale", is_flag=True, help="Do not standardise features before LogisticRegression.")
@head_options
@json_option
@library_errors
def compare_sklearn_cmd(as_json, cache, cache_dir, val_fraction, seed, C, max_iter, no_scale, **head):
    """Fit the torch head and scikit-learn LogisticRegression on the same split; print both."""
    from .heads.compare import format_table

    result = api.compare_sklearn(cache, verbose=None, cache_dir=cache_dir, val_fraction=val_fraction, seed=seed, C=C,
                                 max_iter=max_iter, scale=not no_scale, **head).result
    emit(result, as_json, format_table(result))


def picture_options():
    def decorate(fn):
        for opt in reversed([
            click.option("--backbone", help="Whose preprocessing/features."),
            click.option("--weights", help="DEFAULT, a torchvision weights name or timm tag, a state-dict file "
                                           "(+ .json sidecar), or 'none'."),
            click.option("--output", type=click.Path(dir_okay=False),
                         help="PNG to write."),
        ]):
            fn = opt(fn)
        return fn
    return decorate


@defaults_from(PreviewConfig)
@cli.command()
@click.option("--data", help="ImageFolder root (one folder per class).")
@click.option("--per-class", type=int, help="Images per class.")
@click.option("--seed", type=int, help="Seeds which images are shown.")
@picture_options()
@json_option
@library_errors
def preview(as_json, **options):
    """A PNG grid of sample images per class, resized/cropped as for extraction (de-normalised)."""
    result = api.preview(options.pop("data"), **options).info
    emit(result, as_json, result["output"])


@defaults_from(FeatureMapConfig)
@cli.command("feature-map")
@click.argument("image", type=click.Path(dir_okay=False))
@click.option("--top-k", type=int, help=f"Most active channels shown over the image (1 to {MAX_TOP_K}).")
@picture_options()
@json_option
@library_errors
def feature_map_cmd(as_json, **options):
    """A PNG of IMAGE beside its feature map (channels x positions) and its most active channels."""
    result = api.feature_map(options.pop("image"), **options).info
    note(f"feature map {' x '.join(map(str, result['feature_shape']))}, "
               f"top channels {result['top_channels']}")
    emit(result, as_json, result["output"])


@defaults_from(EvaluateConfig)
@cli.command()
@click.option("--model", required=True, type=click.Path(dir_okay=False),
              help="A fit-head head.pt (on --cache or --data) or a train/finetune model.pt (on --data).")
@click.option("--cache", type=click.Path(dir_okay=False),
              help="Feature cache to evaluate on [default: the one the model was trained on].")
@click.option("--data", help="Or an ImageFolder root, run through the backbone.")
@click.option("--split", type=click.Choice(SPLITS),
              help="Cache rows: the model's validation split, or all.")
@click.option("--weights", help="Backbone weights for --data [default: those the model names].")
@click.option("--top-k", type=int, help="Images in the misclassified gallery.")
@click.option("--batch-size", type=int)
@click.option("--device")
@click.option("--precision", type=click.Choice(MODEL_PRECISIONS),
              help="--data: compute precision; auto = bf16 where the device supports it.")
@click.option("--workers", type=int, help="Decoding for --data, as predict's --workers.")
@click.option("--runs-dir", help="Where run outputs go.")
@json_option
@library_errors
def evaluate(as_json, **options):
    """Accuracy, per-class precision/recall/F1, a confusion-matrix PNG and a gallery of confident errors."""
    from .reports.evaluate import format_report

    result = api.evaluate_model(options.pop("model"), options.pop("cache"), options.pop("data"), figures=False,
                                verbose=None, **options)
    emit(result, as_json, format_report(result))


@defaults_from(FitHeadConfig)  # --runs-dir
@cli.command()
@click.option("--runs-dir")
@click.option("--sort", "sort_by", metavar="METRIC", default=None,
              help="Best first by this metric (val_acc, accuracy, ...; losses lowest first) [default: newest first].")
@click.option("--cache", help="Only runs on this cache (a cache file or a fingerprint prefix).")
@click.option("--backbone", default=None, help="Only runs with this backbone.")
@json_option
@library_errors
def runs(runs_dir, sort_by, cache, backbone, as_json):
    """The experiment ledger (runs/ledger.jsonl) as a table."""
    from .runs.ledger import format_runs, ledger_path

    records = list(api.list_runs(runs_dir, sort_by=sort_by, cache=cache, backbone=backbone))
    table = format_runs(records, sort_by) if records else f"no runs in {ledger_path(runs_dir)}"
    emit({"runs": records}, as_json, table)


@defaults_from(FetchConfig)
@cli.command("fetch-data")
@click.option("--overwrite", is_flag=True,
              help="Unpack over files already in --dest (by default a conflict is refused, naming the file).")
@click.option("--dest", help="Folder for the archive and its unpacked files.")
@click.option("--url", help="A zip or tar archive to download.")
@json_option
@library_errors
def fetch_data_cmd(as_json, **options):
    """Download an image archive (resuming a partial download) and unpack it safely; prints the folder."""
    result = api.fetch_data(verbose=None, **options)
    state = "downloaded" if result["downloaded"] else "already complete"
    note(f"{result['archive']}: {result['bytes'] / 1e6:.1f} MB, {state}; "
               f"{'unpacked' if result['unpacked_now'] else 'already unpacked'} to {result['unpacked']}")
    emit(result, as_json, result["unpacked"])


@defaults_from(CheckImagesConfig)
@cli.command("check-images")
@click.argument("root", metavar="DIR")
@click.option("--report", type=click.Path(dir_okay=False),
              help="Write every finding to this file: .csv (one row each) or .json.")
@click.option("--quarantine", is_flag=True,
              help="Move files with errors to the quarantine folder, keeping relative paths (never deletes).")
@click.option("--quarantine-dir", type=click.Path(file_okay=False),
              help="Quarantine folder (implies --quarantine) [default: DIR.quarantine beside DIR].")
@click.option("--workers", type=int, help="Decoding processes; -1 = one per core.")
@json_option
@library_errors
def check_images_cmd(as_json, **options):
    """Fully decode every file below DIR and report unusable ones (errors) and converted ones (notes)."""
    from .data.check_images import format_summary

    result = api.check_image_folder(options.pop("root"), verbose=None, **options)
    emit(result, as_json, format_summary(result))


@defaults_from(DemoConfig)
@cli.command()
@click.option("--data", help="ImageFolder root; fetched (Kaggle cats vs dogs) into its parent when missing.")
@click.option("--url", help="Archive to fetch when --data is missing.")
@click.option("--weights", help="DEFAULT, a torchvision weights name or timm tag, or a local file.")
@click.option("--backbone")
@click.option("--n", type=int)
@click.option("--no-quarantine", "quarantine", flag_value=False, default=True,
              help="Only report bad files; do not move them out of the data folder.")
@click.option("--cache-dir")
@click.option("--runs-dir")
@click.option("--workers", type=int)
@json_option
@library_errors
def demo(as_json, **options):
    """The main job in one go: fetch if missing, check images, extract, fit the head, compare with sklearn."""
    from .heads.compare import format_table
    from .reports.demo import format_next
    from .runs.ledger import current_command
    result = api.run_demo(verbose=None, command=current_command(), **options)
    emit(result, as_json, format_table(result["compare"]) + "\n\n" + format_next(result["next"]))


def image_train_options(fn):
    """Options train and finetune share (data, sample, model, optimisation, output)."""
    for opt in reversed([
        click.option("--data", help="ImageFolder root (one folder per class)."),
        click.option("--n", type=int,
                     help="Images to use (seeded stratified sample); 0 = all."),
        click.option("--pool", type=click.Choice(POOLS),
                     help="Head input: flattened map (none) or global average (avg) [default: the backbone's]."),
        click.option("--dropout", type=FINITE),
        click.option("--augment", is_flag=True, help="Random resized crop + horizontal flip on training images."),
        click.option("--batch-size", type=int),
        click.option("--print-every", type=int,
                     help="Running train accuracy/loss every this many minibatches; 0 = never."),
        click.option("--workers", type=int,
                     help="Decoding processes; -1 = one per core."),
        click.option("--device", help="auto, cpu, cuda or cuda:N."),
        click.option("--precision", type=click.Choice(MODEL_PRECISIONS),
                     help="Compute precision; auto = bf16 where the device supports it."),
        click.option("--runs-dir", help="Where run outputs go."),
    ]):
        fn = opt(fn)
    return fn


def train_text(result: dict) -> str:
    from .heads.fit_head import trust_lines

    per_class = ", ".join(f"{c} {a:.3f}" if a is not None else f"{c} -" for c, a in result["per_class_val_acc"].items())
    return "\n".join([f"val acc {result['val_acc']:.3f}, val loss {result['val_loss']:.4f} ({result['train_rows']} "
                      f"train / {result['val_rows']} val images, {result['skipped']} skipped, "
                      f"{result['fit_seconds']:.1f} s)", f"per-class val acc: {per_class}", *trust_lines(result),
                      f"checkpoint: {result['checkpoint']}"])


@defaults_from(TrainConfig)
@cli.command()
@image_train_options
@click.option("--backbone", help=BACKBONE_HELP)
@click.option("--weights", help=WEIGHTS_HELP)
@click.option("--epochs", type=int)
@click.option("--lr", type=FINITE, help=f"Adam learning rate of the head, up to {MAX_LR:g}.")
@split_options
@trust_options(("val", "none"))
@json_option
@library_errors
def train(as_json, **options):
    """Train a new head on images end to end, backbone frozen; saves runs/<stamp>-train/model.pt."""
    result = api.train_model(options.pop("data"), verbose=None, **options).result_
    emit(result, as_json, train_text(result))


@defaults_from(FinetuneConfig)
@cli.command()
@image_train_options
@click.option("--init-head", type=click.Path(dir_okay=False),
              help="Start from a fit-head head.pt or a train/finetune model.pt.")
@click.option("--backbone", help="[default: the --init-head checkpoint's, else vgg16]")
@click.option("--weights", help="Backbone weights [default: the --init-head checkpoint's, else DEFAULT].")
@click.option("--unfreeze", help="'all', or K: the last K blocks of the backbone (see summary).")
@click.option("--epochs", type=int, help="Epochs in all, head-only ones included.")
@click.option("--head-epochs", type=int,
              help="Staged schedule: train only the head for this many epochs, then unfreeze.")
@click.option("--lr", type=FINITE, help=f"Adam learning rate of the head, up to {MAX_LR:g}.")
@click.option("--backbone-lr", type=FINITE, help=f"Learning rate of the backbone, up to {MAX_LR:g} [default: lr / 10].")
@split_options
@trust_options(("val", "none"))
@json_option
@library_errors
def finetune(as_json, **options):
    """Unfreeze the backbone (or its last K blocks) and train at a low rate; saves runs/<stamp>-finetune/model.pt."""
    result = api.finetune_model(options.pop("data"), options.pop("init_head"), verbose=None, **options).result_
    emit(result, as_json, train_text(result))


@defaults_from(PredictConfig)
@cli.command()
@click.argument("paths", nargs=-1, required=True)
@click.option("--model", "model", required=True, type=click.Path(dir_okay=False),
              help="A model.pt from train/finetune, or a head.pt from fit-head.")
@click.option("--weights", help="For a head.pt: its backbone weights, if not where the head recorded them.")
@click.option("--format", "format", type=click.Choice(FORMATS))
@click.option("--output", type=click.Path(dir_okay=False), help="Write the rows to FILE.")
@click.option("--batch-size", type=int)
@click.option("--workers", type=int, help=WORKERS_HELP)
@click.option("--device", help="auto, cpu, cuda or cuda:N.")
@click.option("--precision", type=click.Choice(MODEL_PRECISIONS))
@library_errors
def predict(paths, **options):
    """Classify images and folders of images: class and probability per file; unreadable files get an error."""
    from .models.predict import Interrupted, format_rows

    try:
        result = api.predict_files(options.pop("model"), list(paths), verbose=None, **options).result
    except Interrupted as e:  # the rows computed so far are kept: written (--output) or shown
        if not e.result["output"]:
            click.echo(format_rows(e.result["rows"], options["format"]))
        sys.exit(130)
    note(f"{plural(result['images'], 'image')}, {result['errors']} unreadable, "
               f"{result['img_per_s']:.1f} img/s")
    click.echo(result["output"] if result["output"] else format_rows(result["rows"], options["format"]))
    if result["errors"] == result["images"]:
        raise click.ClickException(f"none of the {plural(result['images'], 'input')} could be classified")


@defaults_from(ImagenetCheckConfig)
@cli.command("imagenet-check")
@click.argument("image", type=click.Path(dir_okay=False))
@click.option("--backbone")
@click.option("--weights", help="Full pretrained weights (with the ImageNet classifier): a torchvision name or a file.")
@click.option("--top", type=int)
@click.option("--device")
@json_option
@library_errors
def imagenet_check_cmd(as_json, **options):
    """Sanity check: the top ImageNet classes of IMAGE from the full pretrained model."""

    result = api.imagenet_check(options.pop("image"), **options)
    emit(result, as_json, "\n".join(f"{t['rank']}. {t['class']:<30} {t['probability']:.4f}" for t in result["top"]))


@defaults_from(SummaryConfig)
@cli.command()
@click.option("--backbone")
@click.option("--classes", type=int, help="Outputs of the new head.")
@click.option("--pool", type=click.Choice(POOLS), help="[default: the backbone's]")
@click.option("--dropout", type=FINITE)
@click.option("--unfreeze", help="'none' (frozen backbone, as train), 'all', or K: the last K blocks (as finetune).")
@click.option("--crop-size", type=int, help="Input size; 0 = the backbone's default.")
@json_option
@library_errors
def summary(as_json, **options):
    """Layer-by-layer table and total/trainable parameter counts of backbone + head under a freeze setting."""
    from .models.summary import format_summary

    result = api.model_summary(**options)
    emit(result, as_json, format_summary(result))


@defaults_from(AuditConfig)
@cli.command()
@click.option("--data", help="The labelled training folder (extracted as extract does when it has no cache yet); "
              "with --undo, the folder the journal must be of.")
@click.option("--test-data", help="A test folder: its photos that the training folder also holds are leaks.")
@click.option("--cache", type=click.Path(dir_okay=False), help="Or the training folder's cache.")
@click.option("--test-cache", type=click.Path(dir_okay=False), help="Or the test folder's cache.")
@click.option("--cache-dir")
@click.option("--backbone")
@click.option("--weights",
              help="--data: DEFAULT, a torchvision weights name or timm tag, a state-dict file, or 'none'.")
@click.option("--batch-size", type=int)
@click.option("--device")
@click.option("--workers", type=int)
@click.option("--folds", type=int, help="Out-of-fold probabilities from this many refits of the head.")
@click.option("--seed", type=int)
@click.option("--threshold", type=FINITE, help="Cosine similarity from which two photos are near copies.")
@click.option("--top", type=int, help="Issues shown in the table, the HTML report and the gallery.")
@click.option("--output", type=click.Path(file_okay=False), help="Folder for the report [default: a run folder].")
@click.option("--runs-dir")
@click.option("--apply", type=click.Path(dir_okay=False), metavar="FIXES.csv",
              help="Apply a reviewed list (path,action,new_class; relabel/remove/keep): files moved, never deleted.")
@click.option("--undo", type=click.Path(dir_okay=False), metavar="JOURNAL",
              help="Move back every file of an --apply journal.")
@click.option("--quarantine-dir", type=click.Path(file_okay=False),
              help="--apply: where removed files go [default: DATA.quarantine beside DATA].")
@click.option("--no-refresh", "refresh", flag_value=False, default=True,
              help="--apply/--undo: do not extract the folder again afterwards.")
@json_option
@library_errors
def audit(as_json, **options):
    """Find wrong labels, outliers, duplicates and train/test leaks from the cache; --apply fixes, --undo them."""
    from .reports.audit import format_report
    from .runs.ledger import current_command

    result = api.audit_folder(options.pop("data"), verbose=None, command=current_command(), **options)
    emit(result, as_json, format_report(result, options.get("top") or AuditConfig.top))


@defaults_from(ExportConfig)
@cli.command()
@click.option("--model", required=True, type=click.Path(dir_okay=False),
              help="A fit-head head.pt (exported with its backbone) or a train/finetune model.pt.")
@click.option("--format", "format", type=click.Choice(EXPORT_FORMATS), help="onnx or torchscript.")
@click.option("--output", required=True, type=click.Path(dir_okay=False),
              help="The file to write; its metadata goes beside it as FILE.json.")
@click.option("--weights", help="For a head.pt: its backbone weights, if not where the head recorded them.")
@click.option("--check-data", help="Photos (a folder or a file) for the parity check [default: the training data's].")
@click.option("--check-n", type=int, help="Photos of --check-data compared, spread over them; 0 = all.")
@click.option("--tolerance", type=FINITE, help="Largest allowed probability difference from predict (fp32).")
@click.option("--batch-size", type=int, help="Images per forward pass in the parity check.")
@click.option("--workers", type=int, help="Decoding processes for the parity check; 0 = in-process.")
@json_option
@library_errors
def export(as_json, **options):
    """Write a model as one ONNX or TorchScript file (images in, class probabilities out) + its .json metadata,
    after checking that it gives predict's probabilities on sample photos (exit 1 when it does not)."""
    result = api.export_model(options.pop("model"), options.pop("output"), verbose=None, **options)
    p = result["parity"]
    text = (f"max |probability difference| vs predict: {result['max_abs_diff']:.3g} on {plural(p['images'], 'photo')}"
            f" ({p['same_class']} same class; tolerance {p['tolerance']:g})\n"
            + (f"{result['output']} ({result['bytes'] / 1e6:.1f} MB), metadata {result['metadata']}" if result["passed"]
               else "nothing written: the export does not predict as predict does"))
    emit(result, as_json, text)
    if not result["passed"]:
        raise click.exceptions.Exit(1)


@defaults_from(ServeConfig)
@cli.command()
@click.option("--model", required=True, type=click.Path(dir_okay=False),
              help="A fit-head head.pt or a train/finetune model.pt.")
@click.option("--weights", help="For a head.pt: its backbone weights, if not where the head recorded them.")
@click.option("--host", help="Address to listen on (localhost unless told otherwise).")
@click.option("--port", type=int, help="TCP port (0 = any free one).")
@click.option("--device", help="auto, cpu, cuda or cuda:N.")
@click.option("--precision", type=click.Choice(MODEL_PRECISIONS))
@click.option("--batch-size", type=int, help="Most images in one forward pass (concurrent requests share it).")
@click.option("--max-wait-ms", type=FINITE, help="How long a batch waits for more images once the first came.")
@click.option("--max-queue", type=int, help="Images waiting for the network; past it a request gets 503.")
@click.option("--max-files", type=int, help="Images in one request.")
@click.option("--max-file-bytes", type=int, help="Bytes of one image.")
@click.option("--max-request-bytes", type=int, help="Bytes of one request.")
@click.option("--max-pixels", type=int, help="Pixels of one image (from its header, before decoding).")
@click.option("--drain-seconds", type=FINITE, help="On SIGTERM: how long requests in flight may still take.")
@library_errors
def serve(**options):
    """Serve a model over HTTP: a page at / to drop photos on, POST /predict (multipart field 'files'; the rows
    of predict --format json), GET /info, GET /health. Stops on SIGTERM or Ctrl-C, answering what is in flight."""
    api.serve_model(options.pop("model"), verbose=None, **options)


def main() -> None:
    """The console-script entry point (``transfer-pipeline``), and what ``python cli.py`` runs."""
    cli()


if __name__ == "__main__":
    main()
