"""The check-images stage: fully decode every file of a folder in parallel and report what is wrong.

It applies extract's own loading rules (``folders.decode_image``), so an *error* here is exactly a
file extract cannot use, and a *note* a file extract uses after converting it or despite a warning.
``--quarantine`` moves the files with errors aside (keeping relative paths); nothing is deleted.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shlex
import tempfile
import time
import warnings
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Callable, Optional

from ..config import CheckImagesConfig, check_config, option_text, option_value
from ..devices import resolve_workers
from ..errors import PipelineError, UsageError
from ..files import SafeCsvWriter, atomic_write, check_output, is_utf8, json_text, shown
from .folders import (
    CANNOT_LIST,
    FRAMES,
    NOT_UTF8,
    QUARANTINE_SUFFIX,
    ImageLoadError,
    class_folders,
    decode_image,
    distinct_classes,
    exif_problem,
    is_image_name,
    walk,
)
from .image_reader import file_digest
from .moves import changing_folder, link_on_the_way, move_no_replace, partial_copies

log = logging.getLogger(__name__)

#: Every kind check-images reports, with its severity. Errors are files extract cannot use.
KINDS = {
    "zero-byte": "error",  # empty file
    "truncated": "error",  # the image data ends early
    "unreadable": "error",  # corrupt image data
    "not-an-image": "error",  # text, a PDF, ...: no known image format (the OS's own files, Thumbs.db, .DS_Store,
    # are no finding at all: folders.is_os_file)
    "not-a-file": "error",  # a dangling or looping symlink, a named pipe, a device: never opened
    "decompression-bomb": "error",  # the header claims more than folders.MAX_IMAGE_PIXELS pixels
    "extreme-aspect": "error",  # e.g. 30000 x 1: resizing its short side would build a huge image
    "bad-name": "error",  # a name that is not UTF-8: extract leaves the file out
    "extension-mismatch": "note",  # e.g. PNG or GIF content named .jpg: decodes fine
    "non-rgb-mode": "note",  # grayscale, CMYK, RGBA, palette, 16-bit: converted to RGB at load
    "decode-warning": "note",  # PIL warned while decoding (e.g. possibly corrupt EXIF data)
    "exif-unreadable": "note",  # its EXIF block cannot be read: decoded as stored, not turned upright
    "first-frame-only": "note",  # an animated GIF, PNG or WebP, a multi-page TIFF: its first frame alone is used
    "unlisted-image": "note",  # a good image extract ignores (no image extension, or a hidden name)
    "unreadable-folder": "error",  # a folder the OS will not list (not permitted, an I/O error): its photos unseen
    "folder-reached-twice": "note",  # a link to a folder walked already (a loop, a second link): its photos once
}
REPORT_SUFFIXES = (".csv", ".json")
#: Formats that share an extension family (a multi-picture JPEG decodes as MPO).
FORMAT_ALIASES = {"MPO": "JPEG"}


def finding(path: str, kind: str, detail: str) -> dict:
    return {"path": path, "kind": kind, "severity": KINDS[kind], "detail": detail}


def _mode_detail(im) -> str:
    mode = "P with transparency" if im.mode == "P" and "transparency" in im.info else im.mode
    return f"mode {mode}, converted to RGB at load"


def check_file(root: str, rel: str) -> list[dict]:
    """Decode one file as extract would and return its findings (none for a good RGB image)."""
    from PIL import Image

    if not is_utf8(rel):
        return [finding(shown(rel), "bad-name", NOT_UTF8)]
    listed = is_image_name(Path(rel).name)
    ignored = "" if listed else " (extract ignores it: no image extension or a hidden name)"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            im, rgb = decode_image(Path(root) / rel, pil_warnings=True)
        except ImageLoadError as e:
            return [finding(rel, e.kind, e.reason + ignored)]
    out = []
    if not listed:
        out.append(finding(rel, "unlisted-image", f"a {im.format} image{ignored}"))
    else:
        suffix = Path(rel).suffix.lower()
        named = Image.registered_extensions().get(suffix)
        if named and FORMAT_ALIASES.get(im.format, im.format) != FORMAT_ALIASES.get(named, named):
            out.append(finding(rel, "extension-mismatch", f"{im.format} content named {suffix}"))
    if im.mode != "RGB":
        out.append(finding(rel, "non-rgb-mode", _mode_detail(im)))
    if rgb.info.get(FRAMES, 1) > 1:
        out.append(finding(rel, "first-frame-only", f"a {im.format} of {rgb.info[FRAMES]} frames: only the first "
                                                    "is used"))
    problem = exif_problem(im)
    if problem:
        out.append(finding(rel, "exif-unreadable", f"EXIF block unreadable ({problem}): decoded as stored, "
                                                   "not turned upright by its Orientation tag"))
    messages = dict.fromkeys(str(w.message) for w in caught
                             if not issubclass(w.category, (ResourceWarning, DeprecationWarning)))
    out += [finding(rel, "decode-warning", f"PIL warned while decoding: {m}") for m in messages]
    return out


def list_files(root: Path, left_out: Optional[list] = None) -> list[str]:
    """Every file below root ('/'-separated, sorted), hidden and metadata folders and the OS's own files
    (``.DS_Store``, ``Thumbs.db``: no photos, no errors) excepted; links followed as extract follows them (see
    folders.walk, which adds the folders it leaves out to ``left_out``). The --report is never among them
    (validate refuses it there)."""
    return [(Path(dirpath) / name).relative_to(root).as_posix() for dirpath, filenames in walk(root, left_out)
            for name in filenames]


def left_out_finding(where: str, why: str) -> dict:
    """A folder walk left out (``where``: relative to the checked folder's parent, as walk says it), as a finding:
    they were never named, so a folder the OS would not list went unseen, its photos missing from extract."""
    rel = where.split("/", 1)[1] if "/" in where else "."
    return finding(rel, "unreadable-folder" if why.startswith(CANNOT_LIST) else "folder-reached-twice", why)


def unlisted(findings: list[dict]) -> set:
    """The folders the OS would not list: a class folder among them is no empty class ('add photos or move them
    out'), its unreadable-folder error says what extract says of it (fix its permissions)."""
    return {f["path"] for f in findings if f["kind"] == "unreadable-folder"}


def check_all(root: Path, rels: list[str], workers: int):
    """Yield each file's findings in order; ``workers`` > 1 decodes in that many processes."""
    check = partial(check_file, str(root))
    if workers <= 1:
        yield from map(check, rels)
        return
    chunksize = max(1, min(64, len(rels) // (workers * 8)))
    pool = ProcessPoolExecutor(workers)
    try:
        yield from pool.map(check, rels, chunksize=chunksize)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def default_quarantine_dir(root: Path) -> Path:
    return root.parent / f"{root.name}{QUARANTINE_SUFFIX}"


def validate(cfg: CheckImagesConfig) -> tuple[Path, Path | None, int]:
    """The absolute root, quarantine folder and worker count; ValueError for a bad folder, report,
    quarantine or worker count."""
    check_config(cfg)
    root = Path(os.path.abspath(cfg.root))
    if not root.is_dir():
        raise UsageError(f"folder {cfg.root!r} does not exist or is not a folder")
    if cfg.report and Path(cfg.report).suffix.lower() not in REPORT_SUFFIXES:
        raise UsageError(f"{option_value('report', cfg.report)} must end with one of: {', '.join(REPORT_SUFFIXES)}")
    checked = [(root, "the checked folder")]
    if cfg.report:
        check_output(cfg.report, data=checked, what="--report")
    workers = resolve_workers(cfg.workers)
    qdir = None
    if cfg.quarantine or cfg.quarantine_dir:
        qdir = Path(os.path.abspath(cfg.quarantine_dir)) if cfg.quarantine_dir else default_quarantine_dir(root)
        check_output(qdir, data=checked, what="--quarantine-dir", folder=True)
        check_apart(Path(os.path.realpath(root)), Path(os.path.realpath(qdir)))
        if cfg.report and Path(os.path.realpath(cfg.report)).is_relative_to(os.path.realpath(qdir)):
            raise UsageError(f"{option_value('report', cfg.report)} is inside the quarantine folder {str(qdir)!r}, "
                             "which holds "
                             "the files moved out of the checked folder; write it elsewhere")
    return root, qdir, workers


def check_apart(root: Path, qdir: Path) -> None:
    """The quarantine and the data folder, neither inside the other: files move from one to the other and back
    (a quarantine inside the data folder would be checked as a class; one holding it would hold the data)."""
    if qdir.is_relative_to(root) or root.is_relative_to(qdir):
        raise UsageError(f"the quarantine folder {str(qdir)!r} and the data folder {str(root)!r} must be apart "
                         f"(neither inside the other); choose another {option_text('quarantine_dir')}")


@dataclass(frozen=True)
class CheckImagesResult:
    """check-images' answer: counts, every finding, and where the report and the quarantined files went."""

    root: str
    files: int
    good: int  # files extract can use (no error; notes allowed)
    errors: int  # files with an error: extract skips them
    notes: int  # files with notes only (converted on decoding: CMYK, EXIF-rotated, ...)
    by_kind: dict  # finding kind -> count
    seconds: float
    files_per_s: Optional[float]
    workers: int
    findings: list  # {path, kind, severity, detail} each
    report: Optional[str]  # the --report file written, else None
    quarantine: Optional[dict]  # with --quarantine: where the files went, how to move them back; else None
    empty_classes: list = field(default_factory=list)  # class folders left without a usable image: extract refuses
    # folders the OS would not list (an error each among the findings, not counted in ``errors``, which counts
    # files): their files are unseen, by this check and by extract
    unreadable_folders: list = field(default_factory=list)


def check_images(cfg: CheckImagesConfig,
                 before_moving: Optional[Callable[[CheckImagesResult], None]] = None) -> CheckImagesResult:
    """Check every file below cfg.root; report, and quarantine the errors if asked. Returns a summary.

    ``before_moving(summary)``: a caller's last check once the good files are counted, before any file moves
    (demo: enough good photos left for ``--n``); an exception there leaves the folder as it was."""
    from ..progress import progress

    root, qdir, workers = validate(cfg)
    left_out: list = []
    rels = list_files(root, left_out)
    if not rels and not left_out:  # as extract and audit refuse it: most often a mistyped folder, not a clean one
        raise UsageError(f"folder {str(root)!r} holds no files to check")
    workers = min(workers, max(1, len(rels)))
    t0 = time.perf_counter()
    findings: list[dict] = [left_out_finding(where, why) for where, why in left_out]
    error_files: list[str] = []
    note_files = 0
    bar = progress(total=len(rels), desc="check-images", unit="file")
    with bar:
        for rel, found in zip(rels, check_all(root, rels, workers)):
            findings += found
            severities = {f["severity"] for f in found}
            if "error" in severities:
                error_files.append(rel)
            elif severities:
                note_files += 1
            bar.update()
    seconds = time.perf_counter() - t0
    bad = set(error_files)
    usable = Counter(rel.split("/", 1)[0] for rel in rels if "/" in rel and rel not in bad and is_image_name(rel))
    locked = unlisted(findings)
    result = CheckImagesResult(
        root=str(root), files=len(rels), good=len(rels) - len(error_files), errors=len(error_files),
        notes=note_files, by_kind=dict(sorted(Counter(f["kind"] for f in findings).items())),
        seconds=round(seconds, 2), files_per_s=round(len(rels) / seconds, 1) if seconds else None,
        workers=workers, findings=findings, report=None, quarantine=None,
        empty_classes=[c for c in distinct_classes(root, class_folders(root), [])  # links: left out
                       if not usable[c] and c not in locked],
        unreadable_folders=sorted(locked),
    )
    if cfg.report:
        result = replace(result, report=write_report(Path(cfg.report), asdict(result)))
    if before_moving is not None:
        before_moving(result)
    if qdir is not None:
        result = replace(result, quarantine=quarantine(root, qdir, error_files))
    return result


def write_report(path: Path, result: dict) -> str:
    """CSV (one row per finding) or JSON (the whole summary), by the file's suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    def write(tmp: Path) -> None:
        if path.suffix.lower() == ".json":
            tmp.write_text(json_text({**result, "report": str(path)}, indent=2))
            return
        with tmp.open("w", newline="") as f:
            w = SafeCsvWriter(f, fieldnames=["path", "kind", "severity", "detail"])
            w.writeheader()
            w.writerows(result["findings"])

    atomic_write(path, write)
    return str(path)


#: In the quarantine folder, one for each run that moved files (MOVED_LIST + a stamp): the paths it moved,
#: NUL-terminated, each written once it moved. The restore command moves back those alone (files another run or
#: command put in the same folder, audit --apply's removals, stay) and removes the list once all are back.
MOVED_LIST = ".check-images-moved"


#: The restore command's hidden name beside a file it moves back (``.restoring-`` + its name's cksum and length):
#: a move from another disk is a copy, and a kill in the middle of it left a partial file under the photo's name,
#: which no rerun replaced (``mv -n``). The partial copy now has this name; a rerun copies again over it.
RESTORING = ".restoring-"


def restore_command(root: Path, qdir: Path, listing: str) -> str:
    """A POSIX shell command that moves back every entry of ``listing`` (a file in ``qdir``) still there, links and
    pipes too, never overwriting; the list is removed when every entry went back. Each goes to a hidden name
    beside its place (``RESTORING``), then is renamed into it, so a kill never leaves part of a photo there."""
    script = ('r=0; for f; do f="./$f"; d="$0/${f%/*}"; t="$d/' + RESTORING
              + '$(printf %s "${f##*/}" | cksum | tr " " -)"; '
              'if [ -e "$f" ] || [ -h "$f" ]; then '
              '{ ! [ -e "$0/$f" ] && ! [ -h "$0/$f" ] && mkdir -p "$d" && mv -f "$f" "$t"; } || { r=1; continue; }; '
              'elif ! [ -e "$t" ] && ! [ -h "$t" ]; then continue; fi; '  # else: killed before the rename: ends it
              'mv -n "$t" "$0/$f" && ! [ -e "$t" -o -h "$t" ] || r=1; done; exit $r')
    return (f"(cd {shlex.quote(str(qdir))} && xargs -0 -r sh -c {shlex.quote(script)} {shlex.quote(str(root))} "
            f"< {shlex.quote(listing)} && rm -f {shlex.quote(listing)})")


def new_moved_list(qdir: Path):
    """This run's MOVED_LIST in ``qdir``, made new (a unique name: two runs never share one), open for writing."""
    fd, path = tempfile.mkstemp(prefix=f"{MOVED_LIST}-{time.strftime('%Y%m%dT%H%M%S')}-", dir=qdir)
    os.close(fd)
    return open(path, "wb")


def through_link(root: Path, rel: str) -> bool:
    """Whether root/rel lies in a folder reached through a linked folder whose real folder is outside root
    (moving it would take a file out of a folder the command was not given)."""
    real = Path(os.path.realpath(root / os.path.dirname(rel)))
    return not real.is_relative_to(os.path.realpath(root))


def copied_already(src: Path, dst: Path) -> bool:
    """Whether a run killed in the middle of moving ``src`` left it in both places: its hard link made (no
    renameat2), or its checked copy to another disk renamed into place, before the source was removed. The
    rerun then ends that move (the source's name goes) instead of refusing the quarantine as taken."""
    try:
        if src.is_symlink() or dst.is_symlink() or not (src.is_file() and dst.is_file()):
            return False
        if os.path.samefile(src, dst):
            return True
        if os.path.getsize(src) != os.path.getsize(dst):
            return False
    except OSError:
        return False
    digest = file_digest(src)
    return bool(digest) and digest == file_digest(dst)


def quarantine(root: Path, qdir: Path, rels: list[str]) -> dict:
    """Move root/rel to qdir/rel for each rel, except those in linked folders (left in place and listed);
    refuses (moving nothing) if any target exists."""
    linked = [r for r in rels if through_link(root, r)]
    left = set(linked)
    rels = [r for r in rels if r not in left]
    with changing_folder(root), contextlib.ExitStack() as stack:  # no extract reading, no audit --apply moving
        gone = [r for r in rels if not os.path.lexists(root / r)]
        if gone:  # moved while this run checked the folder, by another check-images --quarantine of it (waited for)
            log.warning("%d of the %d files to quarantine were gone from %s once it was this run's turn to move them "
                        "(e.g. %s; moved by another check-images --quarantine?): left out", len(gone), len(rels),
                        root, gone[0])
            rels = [r for r in rels if r not in set(gone)]
        moved_before = [r for r in rels if copied_already(root / r, qdir / r)]
        taken = [r for r in rels if r not in moved_before and ((qdir / r).exists() or (qdir / r).is_symlink())]
        if taken:
            raise PipelineError(f"quarantine folder {qdir} already holds {len(taken)} of these files (first: "
                                f"{taken[0]}); move them back first or choose {option_text('quarantine_dir')}")
        linked_q = [r for r in rels if link_on_the_way(qdir / os.path.dirname(r), qdir)]
        if linked_q:  # a file would land where the link points, and the restore command move the link back
            raise PipelineError(f"quarantine folder {qdir} holds a link on the way to {linked_q[0]} (a linked "
                                f"folder); nothing was moved: remove the link or choose "
                                f"{option_text('quarantine_dir')}")
        listing = None
        for i, rel in enumerate(rels):
            try:
                (qdir / rel).parent.mkdir(parents=True, exist_ok=True)
                listing = listing or stack.enter_context(new_moved_list(qdir))
                listed = listing.tell()
                listing.write(os.fsencode(rel) + b"\0")  # before the move: a kill right after it leaves it listed
                listing.flush()
                for tmp in partial_copies(qdir / rel):  # a killed run's partial copy to another disk
                    tmp.unlink(missing_ok=True)
                if rel in moved_before:  # a killed run's checked copy (or second name) is there: the move's end
                    os.unlink(root / rel)
                else:
                    move_no_replace(root / rel, qdir / rel)  # never over a file that appeared meanwhile; across disks
            except OSError as e:  # a file in the way, a read-only folder: the rest stays, a rerun goes on
                if listing:
                    with contextlib.suppress(OSError):  # only what moved is listed: never another's file there
                        listing.truncate(listed)
                if listing and not i:
                    os.unlink(listing.name)
                where = f" (listed in {listing.name})" if i else ""
                named = f" ({e.filename})" if e.filename else ""  # a full disk names none: it said '(None)'
                raise PipelineError(f"cannot move {root / rel} to {qdir / rel}: {e.strerror or e}{named}; "
                                    f"{i} of {len(rels)} files moved{where}, the rest left in place: run the same "
                                    "command again once fixed") from None
    restore = restore_command(root, qdir, os.path.basename(listing.name)) if listing else None
    return {"dir": str(qdir), "moved": len(rels), "restore": restore, "left_linked": linked}
