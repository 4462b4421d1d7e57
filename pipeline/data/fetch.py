"""The fetch-data stage: download an archive (resuming a partial download) and unpack it safely.

The download streams to ``<dest>/<name>.part`` and is renamed to ``<name>`` only once its size is
checked, so an existing ``<name>`` is complete and is left alone without touching the network.
Every archive entry is checked before anything is written: none may land outside ``dest``.

Its parts: fetch_urls (URLs and the records kept in --dest), fetch_download (HTTP, resume, retries),
fetch_archives (an archive's checks), fetch_unpack (unpacking into --dest); here, the stage and its --sha256.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from ..config import FetchConfig, option_text, option_value
from ..errors import PipelineError, UsageError
from ..files import check_output, disk_error, json_text, same_file
from .fetch_download import CHUNK, download
from .fetch_unpack import unpack, warn_splits
from .fetch_urls import _source_record, archive_name, check_places, check_source, local_source, shown_url, url_record
from .moves import folder_lock

# what other code and tests import from here, moved with their code
from .fetch_archives import ignores_case  # noqa: F401
from .fetch_download import UNKNOWN_SIZE_MARGIN, replaced_since  # noqa: F401
from .fetch_unpack import unfinished_unpack  # noqa: F401
from .fetch_urls import request_url  # noqa: F401

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FetchResult:
    """fetch-data's answer: the archive, whether it was downloaded now, and the folder it unpacked to."""

    archive: str
    bytes: int  # the archive's size
    downloaded: bool  # False: the archive was already complete
    unpacked: str  # the folder unpacked (the one to pass as --data)
    unpacked_now: bool  # False: it had been unpacked before
    url: str


def fetch_data(cfg: FetchConfig) -> FetchResult:
    """Download cfg.url into cfg.dest (unless already complete) and unpack it there (unless done)."""
    name = archive_name(cfg.url)
    expected = expected_sha256(cfg.sha256)
    source = local_source(cfg.url)
    if source is not None and not source.is_file() and not (Path(cfg.dest) / name).is_file():  # not "offline?"
        raise UsageError(f"{option_value('url', cfg.url)} names no file: {str(source)!r} does not exist or is not a "
                         "file")
    dest = check_output(cfg.dest, what="--dest", folder=True)  # the URL is all it reads
    archive = dest / name
    busy = f"another fetch-data is downloading or unpacking into {dest}; run this again when it has finished"
    made: list[Path] = []
    with dest_lock(dest, busy, made):  # two at once appended one .part twice, or unpacked over each other
        try:
            check_places(cfg, archive)
            check_source(cfg, archive, source)
            downloaded = not archive.is_file()
            if downloaded:
                try:
                    download(cfg, archive)
                    _source_record(archive).write_text(json_text({**url_record(cfg.url),
                                                                  "bytes": archive.stat().st_size}))
                except OSError as e:  # a read-only or full --dest (the network's errors are PipelineErrors already)
                    raise disk_error(e, dest) or PipelineError(f"cannot write in {option_text('dest')} {dest}: "
                                                               f"{e}") from None
            else:
                log.info("archive already complete: %s", archive)
            if expected is not None:  # before anything is unpacked, and on every run: a file put there by hand too
                check_sha256(archive, expected, downloaded, keep=source)
            unpacked, fresh = unpack(archive, dest, overwrite=cfg.overwrite, keep=source)
            warn_splits(unpacked)
        except BaseException:
            remove_if_empty(made)  # under the lock: a run waiting for it finds the folder gone, and makes it again
            raise
    return FetchResult(archive=str(archive), bytes=archive.stat().st_size, downloaded=downloaded,
                       unpacked=str(unpacked), unpacked_now=fresh, url=shown_url(cfg.url))


def expected_sha256(value) -> str | None:
    """--sha256 as 64 lower-case hex digits (None: unchecked); a UsageError naming any other value."""
    if value is None:
        return None
    digest = value.strip().lower() if isinstance(value, str) else ""
    digest = digest.removeprefix("sha256:")  # as some manifests write it
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise UsageError(f"{option_value('sha256', value)} is not a SHA-256 digest: give its 64 hex digits (as "
                         "sha256sum ARCHIVE prints them)")
    return digest


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def check_sha256(archive: Path, expected: str, downloaded: bool, keep: Path | None = None) -> None:
    """Refuse (PipelineError, before anything is unpacked) an archive whose SHA-256 is not ``expected``: it is
    moved aside to ``NAME.sha256-DIGEST`` (kept, never unpacked; the next run downloads the archive anew), unless
    it is the --url's own file (``keep``), which stays where it is. The record of an earlier unpack of it goes
    with it, so that the next archive is unpacked, not taken for done (the files it unpacked stay, and a new
    unpack over them is refused as any other conflict)."""
    try:
        got = file_sha256(archive)
    except OSError as e:
        raise PipelineError(f"cannot read {archive} to check its SHA-256: {e.strerror or e}") from None
    if got == expected:
        log.info("%s: SHA-256 as expected", archive.name)
        return
    mismatch = f"{archive.name}'s SHA-256 is {got}, not {expected} ({option_text('sha256')}): not unpacked"
    if keep is not None and same_file(archive, keep):
        raise PipelineError(f"{mismatch}; it is the file {option_text('url')} names, left where it is")
    aside = archive.with_name(f"{archive.name}.sha256-{got[:16]}")
    marker = archive.with_name(f".{archive.name}.unpacked")
    try:
        root = archive.parent / json.loads(marker.read_text())["root"]
    except (OSError, ValueError, KeyError, TypeError):
        root = None
    try:  # the record first: a run killed in between finds the archive unrecorded, and checks it again
        marker.unlink(missing_ok=True)
        os.replace(archive, aside)  # a file there already holds these very bytes (its name is their digest)
    except OSError as e:  # a read-only --dest: it stays, refused again by the next run
        raise PipelineError(f"{mismatch}; it could not be moved aside ({e.strerror or e}): move {archive} away "
                            "before running this again") from None
    how = "downloaded now (damaged on the way, or another file than the digest's?)" if downloaded else \
        "already in " + option_text("dest")
    earlier = f"; {root} was unpacked from it by an earlier run: check it" if root is not None else ""
    raise PipelineError(f"{mismatch}; it was {how}, and is kept as {aside}{earlier}; check {option_text('url')} and "
                        f"{option_text('sha256')}, and run again to download it anew")


@contextlib.contextmanager
def dest_lock(dest: Path, busy: str, made: list[Path]):
    """Make ``dest`` (adding the folders made to ``made``, deepest first) and hold its folder lock while inside.
    A run that failed while this one waited for the lock may have removed the folder it made (it was empty):
    the lock was then taken on a folder no longer there, so the folder is made again and locked anew."""
    for _ in range(5):
        made[:] = sorted(set(made) | set(missing_folders(dest)), key=lambda p: len(p.parts), reverse=True)
        try:
            dest.mkdir(parents=True, exist_ok=True)
        except FileNotFoundError:  # a parent removed meanwhile by a failed run
            continue
        except OSError as e:
            remove_if_empty(made)
            raise PipelineError(f"cannot create {option_value('dest', str(dest))}: {e.strerror or e}") from None
        with folder_lock(dest, True, busy) as fd:
            if _same_folder(fd, dest) if fd is not None else dest.is_dir():  # None: not lockable here
                yield
                return
        log.info("%s was removed while this run waited for it; making it again", dest)
    raise PipelineError(f"cannot hold {option_value('dest', str(dest))}: it was removed again and again while "
                        "this run made it; run this again")


def _same_folder(fd: int, path: Path) -> bool:
    """Whether ``fd`` is still the folder at ``path`` (not one removed, or replaced, since it was opened)."""
    try:
        here, held = os.stat(path), os.fstat(fd)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (held.st_dev, held.st_ino)


def missing_folders(dest: Path) -> list[Path]:
    """The folders making ``dest`` would create (dest first, then the parents it lacks)."""
    made, p = [], Path(dest)
    while not os.path.lexists(p) and p != p.parent:
        made.append(p)
        p = p.parent
    return made


def remove_if_empty(folders: list[Path]) -> None:
    """Remove the folders a failed fetch-data made (``missing_folders``, deepest first) while they are still
    empty: an offline first run left an empty --dest behind. A folder holding anything (a .part to resume, a
    file put there meanwhile) is kept, and so is every folder above it."""
    for folder in folders:
        try:
            os.rmdir(folder)  # only an empty one
        except OSError:
            return
