"""Command line: parse options, call one pipeline function per command, print its result (``reports/present``).

Results go to stdout (``--json`` for scripts), progress and logs to stderr. The option of every config field is
made from its spec in ``pipeline/config.py`` (``options_from``): help, choices, range and default live there
once. The library's ``UsageError`` is a usage error (one line, exit code 2), a ``PipelineError`` exits 1;
anything else is a bug, shown as one line, or with its traceback under ``-v``. ``python cli.py`` (a shim at
the top) and the ``transfer-pipeline`` console script both run ``main``.
"""
from __future__ import annotations

import functools
import logging
import math
import os
import re
import shlex
import sys
import warnings

import click

from . import api
from .config import (
    SEEDS,
    AuditConfig,
    CachesConfig,
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
    RunsConfig,
    ServeConfig,
    SuggestConfig,
    SummaryConfig,
    TrainConfig,
    check_value,
    cli_name,
    cli_terms,
    describe_range,
    field_kind,
    option_fields,
    spec_of,
)
from .errors import PipelineError, UsageError
from .files import json_text
from .reports import present


class FiniteFloat(click.ParamType):
    """A float option that refuses nan and +-inf (click's FLOAT takes them: `--lr inf` trained a NaN head)."""

    name = "float"

    def convert(self, value, param, ctx):
        try:
            x = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(x):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return x


FINITE = FiniteFloat()


class NamedPath(click.Path):
    """A file or folder option that refuses an empty name in click's words, as click refuses a file given for a
    folder: ``--explain "$DIR"`` with DIR unset wrote no heatmap and exited 0, ``--output ''`` wrote to stdout."""

    def convert(self, value, param, ctx):
        if value == "":
            what = "file or folder" if self.dir_okay and self.file_okay else "folder" if self.dir_okay else "file"
            self.fail(f"{value!r} is an empty name; give a {what}", param, ctx)
        return super().convert(value, param, ctx)


class FolderName(click.ParamType):
    """A folder option declared as text (--data, --cache-dir, --runs-dir, a DIR): an empty name refused as NamedPath
    refuses it: ``--runs-dir "$RUNS"`` with RUNS unset wrote the runs into the working folder, ``--calib-data ''``
    (default '': not given) calibrated on --data without a word."""

    name = "text"

    def convert(self, value, param, ctx):
        if value == "":
            self.fail("'' is an empty name; give a folder", param, ctx)
        return value


class OneLineUsageError(click.UsageError):
    """A usage error shown as a single 'Error: ...' line (exit code 2), without the usage banner."""

    def show(self, file=None):
        click.echo(f"Error: {self.format_message()}", file=file or sys.stderr)


def _own_options(root) -> set:
    """The option names of cli.py itself (its group's -q, -v ...), not of its commands."""
    return {name for p in root.command.params for name in (*p.opts, *p.secondary_opts)}


def _dash_file_hint(ctx, option: str, args) -> str:
    """'; for a file named ..., put -- before it: COMMAND' where the unknown option is the start of a file name given
    to a command that takes files (``predict -dash/x.jpg`` was "No such option '-d'" with no word of how to name
    such a file), or ''. COMMAND is the one given, those names moved behind ``--``."""
    if not any(isinstance(p, click.Argument) for p in ctx.command.params):
        return ""
    args = [str(a) for a in args]
    cut = args.index("--") if "--" in args else len(args)
    given, after = args[:cut], args[cut + 1:]  # those after a -- given are files already, and stay there
    takes_value = {o for p in ctx.command.params if isinstance(p, click.Option) and not p.is_flag and not p.count
                   for o in p.opts}
    files = [t for i, t in enumerate(given) if t.startswith("-") and _file_like(t)
             and t.split("=")[0] not in takes_value and not (i and given[i - 1] in takes_value)]
    if not any(t.startswith(option) for t in files):
        return ""
    rest = [t for t in given if t not in files]
    line = shlex.join(["python", "cli.py", ctx.info_name, *rest, "--", *files, *after])
    return f"; for a file named {files[0]!r}, put -- before it: {line}"


def _file_like(token: str) -> bool:
    """Whether a word is more likely a file's name than an option: it exists, or holds a '/' or a file suffix."""
    return os.path.lexists(token) or "/" in token or os.path.splitext(token)[1][1:].isalpha()


class _OneLineErrors:
    """Click's own usage errors (a bad --lr, a missing argument, an unknown command) as one line too."""

    def _one_line(self, ctx, call, *args):
        try:
            return call(ctx, *args)
        except OneLineUsageError:
            raise
        except click.NoSuchOption as e:
            if ctx.parent is not None and e.option_name in _own_options(ctx.find_root()):  # 'predict -q' 
                raise OneLineUsageError(f"{e.option_name} goes before the command: python cli.py {e.option_name} "
                                        f"{ctx.info_name} ...", ctx) from None
            raise OneLineUsageError(f"{e.format_message()} (see '{ctx.command_path} --help')"
                                    f"{_dash_file_hint(ctx, e.option_name, args[0] if args else ())}", ctx) from None
        except click.UsageError as e:
            raise OneLineUsageError(f"{e.format_message()} (see '{ctx.command_path} --help')", ctx) from None

    def parse_args(self, ctx, args):
        return self._one_line(ctx, super().parse_args, args)


class OneLineCommand(_OneLineErrors, click.Command):
    def parse_args(self, ctx, args):
        return self._one_line(ctx, self._given_once, args)

    def _given_once(self, ctx, args):
        """click keeps the last value of an option given twice: 'compare-sklearn --cache A --cache B' (fit-head
        fuses the two) compared B alone without a word. An option that takes one value is refused given twice."""
        _, _, order = self.make_parser(ctx).parse_args(args=list(args))
        for param in order:
            if isinstance(param, click.Option) and not (param.multiple or param.count) and order.count(param) > 1:
                names = "/".join(param.opts + param.secondary_opts)
                raise click.UsageError(f"{names} given {order.count(param)} times; it takes one value")
        return click.Command.parse_args(self, ctx, args)


class OneLineGroup(_OneLineErrors, click.Group):
    command_class = OneLineCommand

    def resolve_command(self, ctx, args):
        return self._one_line(ctx, super().resolve_command, args)


def library_errors(fn):
    """Turn library exceptions into click's: UsageError -> exit 2, PipelineError -> exit 1, Ctrl-C -> 130.

    Anything else is a bug: one line and exit 1, or the whole traceback with ``-v``.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            with cli_terms():  # the library's messages name options as here: --device cpu, not device='cpu'
                return fn(*args, **kwargs)
        except UsageError as e:
            raise OneLineUsageError(str(e)) from None
        except PipelineError as e:
            if getattr(e, "fatal", False):  # see files.disk_error: no clean shutdown is possible
                click.echo(f"Error: {e}", err=True)
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(1)
            raise click.ClickException(str(e)) from None
        except KeyboardInterrupt:  # click's own "Aborted!" exits 1, the code of a failed environment
            click.echo("\ninterrupted", err=True)
            sys.exit(130)
        except (click.ClickException, click.exceptions.Exit, click.Abort, SystemExit):
            raise
        except Exception as e:
            ctx = click.get_current_context(silent=True)
            if ctx is not None and (ctx.find_root().params.get("verbose") or 0):
                raise
            raise click.ClickException(f"unexpected {type(e).__name__}: {e} (a bug? run with -v for the "
                                       "traceback)") from None

    return wrapper


def _click_type(f, opt):
    """The click type of a config field: its choices, a file or a folder, int, a finite float, or text."""
    if opt.choices is not None:
        return click.Choice(opt.choices)
    if opt.path:
        return NamedPath(dir_okay=opt.path != "file", file_okay=opt.path != "dir")
    if f.name == "data" or f.name.endswith("_dir") or opt.metavar == "DIR":
        return FolderName()
    return {"int": int, "float": FINITE}.get(field_kind(f))


def _range_check(f, opt):
    """A click callback refusing a value outside the option's range, in the command line's terms (exit 2)."""
    def callback(ctx, param, value):
        try:
            check_value(opt, value, cli_name(f.name, opt), integer=field_kind(f) == "int")
        except UsageError as e:
            raise OneLineUsageError(str(e), ctx) from None
        return value
    return callback if opt.range else None


def _default(f):
    from dataclasses import MISSING

    return f.default_factory() if f.default is MISSING and f.default_factory is not MISSING else f.default


def click_param(f):
    """The click option (or argument) of one config field, from its Option spec: names, type, default, help."""
    opt = spec_of(f)
    if opt.argument:
        return click.argument(f.name, nargs=-1 if opt.multiple else 1, required=opt.required or not opt.multiple,
                              type=_click_type(f, opt), metavar=opt.metavar)
    default = _default(f)
    names = list(opt.names) or [cli_name(f.name)]
    kw = {} if opt.required else {"default": default, "show_default": default not in (None, "")}
    if field_kind(f) == "bool":
        if opt.negatable:
            names = [f"{names[0]}/--no-{names[0][2:]}"]
        elif default:  # a default-True bool is switched off: --no-NAME
            names = list(opt.names) or [f"--no-{f.name.replace('_', '-')}"]
            kw["flag_value"] = False
            kw["show_default"] = False  # '--no-scale [default: True]' read as: scaling is off by default
        else:
            kw["is_flag"] = True
        return click.option(*names, f.name, help=opt.help, **kw)
    kind, callback = _click_type(f, opt), _range_check(f, opt)
    if isinstance(kind, FolderName) and default == "" and not opt.required:  # '' is "not given": passed as None
        kw["default"] = None  # (click's default is not checked; the API refuses '' given and takes None for '')
    return click.option(*names, f.name, type=kind, required=opt.required, multiple=opt.multiple,
                        metavar=opt.metavar, help=opt.help, callback=callback, **kw)


def options_from(cls, only: tuple = ()):
    """The click options of a command, made from its config dataclass's option specs (``only``: just these).

    A field's help, choices, range, default, names and kind are written once, in ``pipeline/config.py``:
    adding a field there adds the option here (docs/layout.md, "Adding an option").
    """
    chosen = [f for f in option_fields(cls) if spec_of(f).cli and (not only or f.name in only)]

    def decorate(fn):
        for f in reversed(chosen):
            fn = click_param(f)(fn)
            fn.__click_params__[-1].spec_field = f  # docs/commands.md's tables read the spec back (option_table)
        return fn

    return decorate


def note(text: str) -> None:
    """An informational line on stderr (silenced by --quiet); results go to stdout."""
    from .progress import is_quiet

    if not is_quiet():
        click.echo(text, err=True)


def emit(result, as_json: bool, text: str) -> None:
    """``text`` for people, or with --json the result as JSON: a stage's result dataclass as its ``to_dict()``
    (where some keys are only there sometimes) or every field."""
    if as_json:
        from dataclasses import asdict, is_dataclass

        data = result.to_dict() if hasattr(result, "to_dict") else asdict(result) if is_dataclass(result) else result
        click.echo(json_text(data, indent=2, default=str))
    else:
        click.echo(text)


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


def json_option(fn):
    return click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")(fn)


@cli.command()
@options_from(ExtractConfig)
@json_option
@library_errors
def extract(as_json, **options):
    """Run the frozen backbone over the images and stream features to an HDF5 cache (reused when unchanged).

    Under `torchrun --nproc_per_node=K cli.py extract ...` each rank extracts a shard and rank 0
    joins them into one (virtual) cache.
    """
    from .files import Terminated, unwinding_on_signals
    from .runs.ledger import current_command
    try:
        with unwinding_on_signals():  # SIGTERM or SIGHUP: what is kept is said, as on Ctrl-C
            result = api.extract_features(options.pop("data"), verbose=None, command=current_command(),
                                          **options).result
    except (KeyboardInterrupt, Terminated) as e:  # what is kept, and the command that goes on
        click.echo(present.extract_interrupted(current_command(), e), err=True)
        if isinstance(e, KeyboardInterrupt):
            sys.exit(130)
        leave_terminated(e)
    for line in present.extract_notes(result):
        note(line)
    if result.rank is None:  # under torchrun only rank 0 prints the result
        emit(result, as_json, result.cache)


@cli.command()
@options_from(CachesConfig)
@json_option
@library_errors
def caches(cache_dir, consolidate, as_json):
    """List the feature caches: path, backbone, rows, classes, size, created."""
    if consolidate:
        result = api.Cache(consolidate).consolidate()
        note(present.consolidate_note(result))
        emit(result, as_json, result.cache)
        return
    found = api.list_caches(cache_dir)
    result = {"caches": [c.summary() for c in found],
              "unreadable": [dict(b) for b in found.unreadable]}  # already {path, why} each
    emit(result, as_json, present.caches_text(result, cache_dir))


@cli.command("fit-head")
@options_from(FitHeadConfig)
@json_option
@library_errors
def fit_head_cmd(as_json, **options):
    """Fit a Linear + LogSoftmax head on cached features (one line per epoch for --head linear)."""
    cache = options.pop("cache")
    rows = list(cache) if len(cache) > 1 else cache[0] if cache else None
    result = api.Head(verbose=None, **options).fit(rows).result_
    emit(result, as_json, present.fit_head_text(result))


@cli.command("choose-backbone")
@options_from(ChooseBackboneConfig)
@json_option
@library_errors
def choose_backbone_cmd(as_json, data, backbones, **options):
    """Which backbone (or fusion of backbones) suits these photos: cross-validated accuracy, log-loss,
    extraction speed and cache size of each, and the fastest within noise of the best."""
    from .runs.ledger import current_command

    options = {k: v for k, v in options.items() if v is not None}
    choice = api.choose_backbone(data, list(backbones), verbose=None, command=current_command(), **options)
    emit(choice, as_json, present.choose_backbone_text(choice))


#: fit-head's options that compare-sklearn's heads take from its command line (the API takes all of them)
COMPARED_HEAD_OPTIONS = ("features", "normalize", "recipe", "epochs", "patience", "lr", "weight_decay", "batch_size",
                         "dropout", "test_data", "test_cache", "device", "runs_dir")


@cli.command("compare-sklearn")
@options_from(CompareConfig)
@options_from(FitHeadConfig, only=COMPARED_HEAD_OPTIONS)
@json_option
@library_errors
def compare_sklearn_cmd(as_json, cache, **options):
    """Fit every kind of head and the plain scikit-learn recipes on the same split; print them side by side."""
    result = api.compare_sklearn(cache, verbose=None, **options).result
    emit(result, as_json, present.compare_text(result))


@cli.command()
@options_from(PreviewConfig)
@json_option
@library_errors
def preview(as_json, **options):
    """A PNG grid of sample images per class, resized/cropped as for extraction (de-normalised)."""
    result = api.preview(options.pop("data"), **options).info
    emit(result, as_json, result.output)


@cli.command("feature-map")
@options_from(FeatureMapConfig)
@json_option
@library_errors
def feature_map_cmd(as_json, **options):
    """A PNG of IMAGE beside its feature map (channels x positions) and its most active channels."""
    result = api.feature_map(options.pop("image"), **options).info
    note(present.feature_map_note(result))
    emit(result, as_json, result.output)


@cli.command()
@options_from(EvaluateConfig)
@json_option
@library_errors
def evaluate(as_json, **options):
    """Accuracy, per-class precision/recall/F1, a confusion-matrix PNG and a gallery of confident errors."""
    result = api.evaluate_model(options.pop("model"), options.pop("cache"), options.pop("data"), figures=False,
                                verbose=None, **options)
    emit(result, as_json, present.evaluate_text(result))


@cli.command()
@options_from(RunsConfig)
@json_option
@library_errors
def runs(runs_dir, sort_by, cache, backbone, as_json):
    """The experiment ledger (runs/ledger.jsonl) as a table."""
    records = list(api.list_runs(runs_dir, sort_by=sort_by, cache=cache, backbone=backbone))
    emit({"runs": records}, as_json, present.runs_text(records, sort_by, runs_dir, cache, backbone))


@cli.command("fetch-data")
@options_from(FetchConfig)
@json_option
@library_errors
def fetch_data_cmd(as_json, **options):
    """Download an image archive (resuming a partial download) and unpack it safely; prints the folder."""
    result = api.fetch_data(verbose=None, **options)
    note(present.fetch_note(result))
    emit(result, as_json, result.unpacked)


@cli.command("check-images")
@options_from(CheckImagesConfig)
@json_option
@library_errors
def check_images_cmd(as_json, **options):
    """Fully decode every file below DIR and report unusable ones (errors) and converted ones (notes)."""
    result = api.check_image_folder(options.pop("root"), verbose=None, **options)
    emit(result, as_json, present.check_images_text(result))


@cli.command()
@options_from(DemoConfig)
@json_option
@library_errors
def demo(as_json, **options):
    """The main job in one go: fetch if missing, check images, extract, fit the head, compare with sklearn."""
    from .runs.ledger import current_command
    result = api.run_demo(verbose=None, command=current_command(), **options)
    emit(result, as_json, present.demo_text(result))


@cli.command()
@options_from(TrainConfig)
@json_option
@library_errors
def train(as_json, **options):
    """Train a new head on images end to end, backbone frozen; saves runs/<stamp>-train/model.pt."""
    result = interruptible_training(lambda: api.train_model(options.pop("data"), verbose=None, **options), as_json)
    emit(result, as_json, present.train_text(result))


@cli.command()
@options_from(FinetuneConfig)
@json_option
@library_errors
def finetune(as_json, **options):
    """Unfreeze the backbone (or its last K blocks) and train at a low rate; saves runs/<stamp>-finetune/model.pt."""
    result = interruptible_training(lambda: api.finetune_model(options.pop("data"), options.pop("init_head"),
                                                               verbose=None, **options), as_json)
    emit(result, as_json, present.train_text(result))


def interruptible_training(run, as_json: bool = False):
    """A train / finetune run's result; on Ctrl-C, what was kept and the command that resumes it (exit 130);
    SIGTERM or SIGHUP (a scheduler's stop) says what was kept too, then exits 143 or 129. A --resume of a finished
    run that only appended its missing ledger line says so on stderr and exits 0; with --json, one object on stdout
    says so too (``RunFinished.to_dict``: it printed nothing, and a script reading stdout found no JSON)."""
    from .errors import RunFinished
    from .files import Terminated, unwinding_on_signals
    from .models.resume import TrainingInterrupted, TrainingTerminated
    from .runs.ledger import current_command
    try:
        with unwinding_on_signals():
            return run().result_
    except RunFinished as e:
        if not e.line_appended:
            raise
        click.echo(str(e), err=True)
        if as_json:
            click.echo(json_text(e.to_dict(), indent=2, default=str))
        sys.exit(0)
    except TrainingTerminated as e:  # what was kept is said, with the command that resumes, as on Ctrl-C
        click.echo(present.train_interrupted(e, current_command()), err=True)
        leave_terminated(e)
    except Terminated as e:
        leave_terminated(e)
    except TrainingInterrupted as e:
        click.echo(present.train_interrupted(e, current_command()), err=True)
        sys.exit(130)


def leave_terminated(e):
    """End the process SIGTERM or SIGHUP stopped (``files.Terminated``, its line said): decoding processes killed
    with us would only add torch's tracebacks while they are shut down, so with any alive it leaves at once."""
    import multiprocessing

    if multiprocessing.active_children():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(e.code)
    raise e


@cli.command()
@options_from(PredictConfig)
@click.option("--json", "as_json", is_flag=True, help="The rows as JSON on stdout: --format json.")
@library_errors
def predict(paths, as_json, **options):
    """Classify images and folders of images: class and probability per file; unreadable files get an error."""
    from .models.predict import Interrupted

    if as_json:  # as every command's --json: the rows as JSON (--format json)
        if options["format"] not in ("table", "json"):
            raise OneLineUsageError(f"--json and --format {options['format']} ask for two formats: give one")
        options["format"] = "json"
    try:
        result = api.predict_files(options.pop("model"), list(paths), verbose=None, **options).result
    except Interrupted as e:  # the rows computed so far are kept: written (--output) or shown
        if not e.result.output:
            click.echo(present.predict_rows_text(e.result.rows, options["format"]))
        sys.exit(130)
    note(present.predict_note(result))
    click.echo(result.output if result.output else present.predict_rows_text(result.rows, options["format"]))
    if result.errors == result.images:
        raise click.ClickException(f"none of the {present.plural(result.images, 'input')} could be classified")


@cli.command("imagenet-check")
@options_from(ImagenetCheckConfig)
@json_option
@library_errors
def imagenet_check_cmd(as_json, **options):
    """Sanity check: the top ImageNet classes of IMAGE from the full pretrained model."""
    result = api.imagenet_check(options.pop("image"), **options)
    emit(result, as_json, present.imagenet_check_text(result))


@cli.command()
@options_from(SummaryConfig)
@json_option
@library_errors
def summary(as_json, **options):
    """Layer-by-layer table and total/trainable parameter counts of backbone + head under a freeze setting."""
    result = api.model_summary(**options)
    emit(result, as_json, present.summary_text(result))


@cli.command()
@options_from(AuditConfig)
@json_option
@library_errors
def audit(as_json, **options):
    """Find wrong labels, outliers, duplicates and train/test leaks from the cache; --apply fixes, --undo them."""
    from .runs.ledger import current_command

    result = api.audit_folder(options.pop("data"), verbose=None, command=current_command(), **options)
    emit(result, as_json, present.audit_text(result, options.get("top") or AuditConfig.top,
                                             options.get("cache_dir"), options.get("runs_dir")))


@cli.command()
@options_from(SuggestConfig)
@json_option
@library_errors
def suggest(as_json, **options):
    """Which photos of an unlabelled pool to label next: a ranked CSV and an HTML page with thumbnails."""
    from .runs.ledger import current_command

    result = api.suggest(options.pop("data"), options.pop("pool"), verbose=None, command=current_command(), **options)
    emit(result, as_json, present.suggest_text(result))


@cli.command()
@options_from(ExportConfig)
@json_option
@library_errors
def export(as_json, **options):
    """Write a model as one ONNX or TorchScript file (images in, class probabilities out) + its .json metadata,
    after checking that it gives predict's probabilities on sample photos (exit 1 when it does not)."""
    result = api.export_model(options.pop("model"), options.pop("output"), verbose=None, **options)
    emit(result, as_json, present.export_text(result))
    if not result.passed:
        raise click.exceptions.Exit(1)


@cli.command()
@options_from(ServeConfig)
@library_errors
def serve(**options):
    """Serve a model over HTTP: a page at / to drop photos on, POST /predict (multipart field 'files'; the rows
    of predict --format json), GET /info, GET /health. Stops on SIGTERM or Ctrl-C, answering what is in flight."""
    api.serve_model(options.pop("model"), verbose=None, **options)


# -- docs/commands.md's option tables, written from the same specs --------------------------------------
OPTION_TABLE = re.compile(r"(<!-- options: (?P<command>[\w-]+) .*?-->\n)(?P<table>.*?)(<!-- end options -->)", re.S)


def _doc_text(text: str) -> str:
    """A help text as a table cell: no '[default: ...]' (the default has its column), lower case, no final stop."""
    text = re.sub(r"\s*\[default: [^\]]*\]", "", text or "").strip().rstrip(".").strip()
    if re.match(r"[A-Z][a-z]*\b", text):
        text = text[0].lower() + text[1:]
    return text.replace("|", "\\|")


def _doc_default(p: click.Parameter, opt) -> str:
    if opt is not None and opt.doc_default is not None:
        return opt.doc_default
    given = re.search(r"\[default: ([^\]]*)\]", p.help or "")
    if p.required:
        return "(required)"
    if given:
        return given.group(1)
    value = p.default
    if isinstance(value, bool):  # whether the flag as named is in effect: `--no-scale` (default True) is off
        on = value if p.secondary_opts else value == p.flag_value
        return ("on" if on else "off") if p.is_flag else ""
    if value is None or value == "" or value == () or not isinstance(value, (str, int, float)):
        return ""
    return f"`{value}`" if isinstance(value, str) else f"{value:g}" if isinstance(value, float) else str(value)


def _doc_names(p: click.Option, opt) -> str:
    metavar = f" {p.metavar}" if p.metavar else ""
    names = [f"`{n}`" for n in p.opts[:-1]] + [f"`{p.opts[-1]}{metavar}`"]
    return ", ".join(names) + "".join(f" / `{n}`" for n in p.secondary_opts)


def option_table(command: str) -> str:
    """The markdown table of a command's options (docs/commands.md): names, default, what each does, from the
    config specs the options are made of (``doc`` and ``doc_default`` where the docs say more than --help)."""
    rows = ["| option | default | what it does |", "|---|---|---|"]
    for p in cli.commands[command].params:
        if isinstance(p, click.Option):
            f = getattr(p, "spec_field", None)
            opt = spec_of(f) if f is not None else None
            what = opt.doc if opt is not None and opt.doc else _doc_text(opt.help if opt is not None else p.help)
            if opt is not None and opt.range and opt.range != SEEDS and "or more" not in (
                    allowed := describe_range(opt.range, field_kind(f) == "int")) and allowed != "positive":
                what += f" ({allowed})"
            rows.append(f"| {_doc_names(p, opt)} | {_doc_default(p, opt)} | {what} |")
    return "\n".join(rows) + "\n"


def with_option_tables(markdown: str) -> str:
    """``markdown`` with every ``<!-- options: COMMAND -->`` ... ``<!-- end options -->`` block's table written
    again from the specs (``python bench/commands_doc.py`` does it to docs/commands.md; a test checks it is)."""
    return OPTION_TABLE.sub(lambda m: m.group(1) + option_table(m.group("command")) + m.group(4), markdown)


def main() -> None:
    """The console-script entry point (``transfer-pipeline``), and what ``python cli.py`` runs."""
    cli()


if __name__ == "__main__":
    main()
