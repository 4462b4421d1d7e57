"""The demo stage: the whole main job in one command, from nothing to a compared classifier.

fetch (if the data folder is missing) -> check-images (quarantining bad files) -> extract ->
fit-head + compare-sklearn on the same split.
"""
from __future__ import annotations

import json
import logging
import os
import shlex
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from ..config import DemoConfig, option_text
from ..data.check_images import CheckImagesConfig, check_images, default_quarantine_dir
from ..data.fetch import FetchConfig, FetchResult, fetch_data, shown_url, unfinished_unpack
from ..data.folders import list_image_folder
from ..errors import PipelineError, UsageError
from ..extraction.backbones import check_loadable
from ..extraction.extract import ExtractConfig, ExtractResult, check_n, extract, validate
from ..files import check_output
from ..heads.compare import CompareConfig, CompareResult, compare_sklearn
from ..heads.fit_head import FitHeadConfig

log = logging.getLogger(__name__)


#: The only folder demo fetches into when it is missing; any other missing --data is a typo to report.
DEFAULT_DATA = DemoConfig.data


@dataclass(frozen=True)
class DemoResult:
    """demo's answer: each step's, and where the outputs went with the commands to try next."""

    fetch: Optional[FetchResult]  # None when the data folder was already there (nothing fetched)
    check: dict  # check-images' counts: files, good, errors, notes, by_kind, quarantine
    extract: ExtractResult
    compare: CompareResult
    next: dict  # cache, checkpoint, curves, history, and the commands to try next, with real paths

    def to_dict(self) -> dict:
        """The answer as --json prints it: no fetch when nothing was fetched."""
        d = asdict(self)
        d["extract"] = self.extract.to_dict()  # its shape's keys, as extract --json prints them
        if d["fetch"] is None:
            del d["fetch"]
        return d


def demo(cfg: DemoConfig) -> DemoResult:
    """Run every step, logging each to stderr; returns each step's summary and what to try next."""
    data = Path(cfg.data)
    steps: dict = {"fetch": None}
    default = Path(cfg.data) == Path(DEFAULT_DATA)
    if not data.is_dir() and not default:
        raise UsageError(f"data folder {cfg.data!r} does not exist; demo downloads only into the default "
                         f"{DEFAULT_DATA} (leave {option_text('data')} out), or pass an existing ImageFolder root")
    unfinished = unfinished_unpack(data) if data.is_dir() else None  # a stopped demo's (or fetch-data's) unpack
    if unfinished is not None and not default:
        raise PipelineError(f"data folder {cfg.data!r} is half unpacked: unpacking into {unfinished.parent} was "
                            f"stopped ({unfinished.name} there is its record); {finish_command(unfinished)}")
    if not data.is_dir() or unfinished is not None:
        log.info("[1/4] %s is %s: fetching %s", data, "missing" if unfinished is None else "half unpacked",
                 shown_url(cfg.url))
        steps["fetch"] = fetch_data(FetchConfig(dest=str(data.parent), url=cfg.url))
        data = Path(steps["fetch"].unpacked)
    else:
        log.info("[1/4] using the images in %s", data)
    for option, folder in (("--runs-dir", cfg.runs_dir), ("--cache-dir", cfg.cache_dir)):  # before a file moves
        check_output(folder, data=[(data, "--data")], what=option, folder=True, written=option == "--runs-dir")
    extract_cfg = ExtractConfig(data=str(data), n=cfg.n, backbone=cfg.backbone, weights=cfg.weights,
                                workers=cfg.workers, cache_dir=cfg.cache_dir, command=cfg.command)
    validate(extract_cfg)  # a bad --n, --backbone or --weights is refused before check-images moves a file
    log.info("[2/4] checking every image in %s", data)
    quarantine = cfg.quarantine and can_quarantine(data)
    if cfg.quarantine and not quarantine:  # a read-only folder (a shared set): extract skips the bad files
        log.warning("%s cannot be changed (read-only): its unusable files are reported, not moved; extract "
                    "skips them", data)
    checked = check_images(CheckImagesConfig(root=str(data), quarantine=quarantine, workers=cfg.workers),
                           before_moving=lambda found: ready_to_extract(extract_cfg, found, quarantine))
    steps["check"] = {k: getattr(checked, k) for k in ("files", "good", "errors", "notes", "by_kind", "quarantine")}
    moved = checked.quarantine if checked.errors and checked.quarantine else None
    log.info("      %d files, %d unusable%s", checked.files, checked.errors,  # check-images says how to undo: so here
             (f", moved to {moved['dir']}" + (f"; to move them back: {moved['restore']}" if moved["restore"] else ""))
             if moved else "")
    log.info("[3/4] extracting %s features of %s images", cfg.backbone, cfg.n or f"all {checked.good}")  # --n 0
    steps["extract"] = extract(extract_cfg)
    log.info("[4/4] fitting the torch head and scikit-learn on the same split")
    steps["compare"] = compare_sklearn(CompareConfig(cache=steps["extract"].cache,
                                                     head=FitHeadConfig(runs_dir=cfg.runs_dir)))
    steps["next"] = next_steps(steps, data, cfg.runs_dir)
    return DemoResult(**steps)


def ready_to_extract(cfg: ExtractConfig, found, moving: bool) -> None:
    """check-images' last call before it quarantines: --n against the good files, and, when files are about to
    move, the network's weights (offline, the default weights' download failed only once the bad photos were
    moved; nothing moves for a refusal)."""
    check_n(cfg, found.good)
    if moving and found.errors:
        check_loadable(cfg.backbone, cfg.weights)


def finish_command(record: Path) -> str:
    """How to finish the unpack an ``.X.unpacking`` record names: its fetch-data command, with the URL recorded."""
    try:
        source = json.loads(record.with_name(record.name.replace(".unpacking", ".url")).read_text())
        url = shown_url(source["url"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return "run the fetch-data that unpacked it again to finish it"
    # the record keeps no password nor signature (fetch_urls.recorded_url): the command says so rather than hold one
    secret = "" if "salt" not in source and url == source["url"] else \
        " (with its password or token in place of ***, or the signed link anew: the record keeps none)"
    return (f"finish it with: python cli.py fetch-data --dest {shlex.quote(str(record.parent))} "
            f"--url {shlex.quote(url)}{secret}")


def can_quarantine(data: Path) -> bool:
    """Whether check-images may move files out of ``data``'s class folders into the quarantine beside it."""
    qdir = default_quarantine_dir(data)
    folders = [data, *(d for d in data.iterdir() if d.is_dir()), qdir if qdir.is_dir() else data.parent]
    return all(os.access(d, os.W_OK) for d in folders)


def next_steps(steps: dict, data: Path, runs_dir: str) -> dict:
    """Where the outputs went and the commands to try next, with real paths."""
    compared, cache = steps["compare"], steps["extract"].cache
    head, curves = Path(compared.head_run_dir) / "head.pt", compared.curves

    some_image = list_image_folder(data).files[0].path  # one photo: a whole class folder can take minutes
    return {  # the curves are the torch head's: the default head, fitted without epochs, draws none
        "cache": cache, "checkpoint": str(head), "curves": curves,
        "history": str(Path(curves).with_name("history.json")) if curves else None,
        "commands": [
            f"python cli.py predict {shlex.quote(str(data / some_image))} --model {shlex.quote(str(head))}",
            f"python cli.py evaluate --model {shlex.quote(str(head))}",
            f"python cli.py runs --runs-dir {shlex.quote(str(runs_dir))}",
        ],
    }
