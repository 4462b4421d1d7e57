"""Whether a cache of this very request still holds what the folder's files hold now.

A cache's name covers the folder's listing (every path, size and mtime), which cannot see two things:
a file skipped for a reason that passes (gone or unreadable for a moment: moved by an ``audit --apply``
running beside extract and moved back by ``--undo``, a permission fixed since; or refused by an older rule:
a large JPEG, a bomb before it was decoded reduced), and a file rewritten in
place with its size and mtime kept (``os.utime``, some sync and editing tools). The first costs a stat of
each skipped file (they are few), so it is always checked; the second the sha256 of every row's file
against the digest the cache keeps, so it is checked where that is cheap (``VERIFY_AUTO_MAX_BYTES``) and
where asked (``extract --verify``). A stale cache is set aside (``set_aside``) and extracted again, its
rows reused by content (``row_donors``), so only the photos that changed are computed.
"""
from __future__ import annotations

import glob
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

from .feature_cache import CacheInfo, created_at, open_h5, read_digests, read_skipped

log = logging.getLogger(__name__)

#: Rows' files up to this many bytes in all are hashed on every hit and resume, ``--verify`` or not: sha256
#: read 530-750 MB/s of JPEGs from the page cache on one core of a 2-core EPYC (1,000 catsdogs photos, 45 MB,
#: in 0.06-0.08 s), so 100 MB costs about 0.15 s warm (a disk's read speed cold). Larger folders are hashed
#: when asked: 25,000 photos (about 800 MB) take 1-1.5 s warm on one core (docs/cache-format.md).
VERIFY_AUTO_MAX_BYTES = 100_000_000
#: The name a stale cache is set aside under: ``<cache name>.stale-<time>-<pid>`` (not ``*.h5``: never listed).
STALE = ".stale-"


def revived_skips(info: CacheInfo, skipped: list, listing) -> list[str]:
    """The files ``info`` skipped (``skipped``: its record) because they could not be reached
    (``is_os_error_reason``) that are listed now, are regular files this process may read, and were moved,
    renamed or had their permissions changed since the cache was begun (their ctime): they were never looked
    at, so the cache lacks them. A file the disk fails to read, untouched since, stays skipped rather than
    making every extract run again."""
    from ..data.folders import ImageLoadError, is_os_error_reason, regular_file_stat

    since = created_at(info.attrs["created"])  # whole seconds, never after the skips it holds
    out = []
    for path, reason in skipped:
        if path not in listing.by_path or not is_os_error_reason(reason):
            continue
        try:
            st = regular_file_stat(listing.root / path)
        except ImageLoadError:
            continue
        if st.st_ctime >= since and os.access(listing.root / path, os.R_OK):
            out.append(path)
    return out


def older_refusals(skipped: list, listing) -> list[str]:
    """The files a cache skipped (``skipped``: its record) as over the pixel limit under the rule before large
    baseline JPEGs were decoded reduced (its reasons lack ``portable.too_many_pixels``' wording) that are listed
    now: a 108 MP phone photo is read now, and a file still refused is recorded in today's wording, so it is
    tried once."""
    return [path for path, reason in skipped if path in listing.by_path
            and reason.startswith("decompression bomb:") and "decoded reduced" not in reason]


def row_files(info: CacheInfo) -> tuple[list[str], Optional[list[str]]]:
    """(the committed rows' paths, their sha256 or None for a cache made before it kept them)."""
    with open_h5(info.path, "r") as f:
        paths = [p.decode() if isinstance(p, bytes) else p for p in f["paths"][:info.rows]]
        return paths, read_digests(f, info.rows)


def edited_rows(root: Path, paths: list[str], digests: list[str]) -> list[str]:
    """The ``paths`` whose file's sha256 now differs from the one recorded (hashed a thread per core, up to
    8: hashlib releases the GIL); a row without a digest, or a file unreadable now, is not counted."""
    todo = [(p, d) for p, d in zip(paths, digests) if d]
    now = file_digests(root, [p for p, _ in todo])
    return [p for (p, d), n in zip(todo, now) if n and n != d]


def file_digests(root: Path, paths: list[str]) -> list[str]:
    """The sha256 of each of ``paths`` under ``root`` ('' where unreadable), a thread per core up to 8, with
    progress: 25,000 phone photos (tens of GB) read from a disk take minutes, and ``--verify`` was silent meanwhile."""
    from ..data.image_reader import file_digest
    from ..devices import available_cores
    from ..progress import progress

    if not paths:
        return []
    with ThreadPoolExecutor(min(8, available_cores())) as pool:
        return list(progress(pool.map(lambda p: file_digest(root / p), paths), total=len(paths),
                             desc="sha256 of the photos", unit="file", leave=False))


def stale_reason(info: CacheInfo, listing, verify: bool) -> tuple[Optional[str], bool]:
    """(why ``info``, a cache of this request, no longer holds what the folder holds, or None; whether its rows'
    digests were checked). Digests are checked with ``verify`` or when the rows' files are small."""
    skipped = read_skipped(info.path)
    revived = revived_skips(info, skipped, listing)
    if revived:
        return (f"{len(revived)} file{'s' * (len(revived) > 1)} it skipped as unreadable can be read now (e.g. "
                f"{', '.join(revived[:3])}): gone or unreadable only for a while", False)
    older = older_refusals(skipped, listing)
    if older:
        return (f"{len(older)} image{'s' * (len(older) > 1)} it skipped as too large may be read now (e.g. "
                f"{', '.join(older[:3])}): JPEGs over the pixel limit are decoded reduced since", False)
    paths, digests = row_files(info)
    size = sum(listing.by_path[p].size for p in paths if p in listing.by_path)
    if not (verify or size <= VERIFY_AUTO_MAX_BYTES):
        return None, False
    if digests is None:
        if verify:
            log.warning("%s was made before caches kept their photos' sha256: its rows cannot be verified", info.path)
        return None, False
    started = time.perf_counter()
    edited = edited_rows(listing.root, paths, digests)
    log.debug("verified %d rows' files (%.1f MB) in %.2f s", len(paths), size / 1e6, time.perf_counter() - started)
    if edited:
        return (f"{len(edited)} photo{'s were' if len(edited) > 1 else ' was'} rewritten since their rows were "
                f"computed, size and mtime kept (e.g. "
                f"{', '.join(edited[:3])}; their sha256 differs from the cache's)", True)
    return None, True


def set_aside(path: Path) -> Optional[Path]:
    """Rename a stale cache to ``<name>.stale-<time>-<pid>`` beside it (None when another process did it first);
    the next extraction of the same request reuses its rows by content and removes it once complete."""
    aside = path.with_name(f"{path.name}{STALE}{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    try:
        path.rename(aside)
    except FileNotFoundError:
        return None
    return aside


def set_aside_copies(path: Path) -> list[Path]:
    """The stale caches set aside for ``path`` (``set_aside``), oldest first."""
    return sorted(p for p in path.parent.glob(f"{glob.escape(path.name)}{STALE}*") if p.is_file())
