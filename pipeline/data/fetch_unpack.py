"""fetch-data's unpack: an archive checked (fetch_archives) and against what --dest holds already (files it would
replace, folders it would join), unpacked once (its ``.X.unpacked`` record; ``.X.unpacking`` while it runs),
and what the folder unpacked holds said (no images, split folders).
"""
from __future__ import annotations

import json
import logging
import lzma
import os
import tarfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from ..config import Placeholder, flag_text, option_text
from ..errors import PipelineError
from ..files import disk_reason, json_text, same_file
from .fetch_archives import (_some, archive_kind, check_case_clashes, check_members, check_ratio, fix_times,
                             ignores_case, own_files, skipped_zip_links, unpacked_bytes, windows_separators)
from .fetch_download import ensure_room
from .folders import IMAGE_EXTENSIONS, is_image_name, is_os_file, is_skipped_folder

#: fetch-data's one logger, named as before its modules were split apart (a filter, a test, names it)
log = logging.getLogger("pipeline.data.fetch")


def _data_files(kind: str, members: list) -> list[PurePosixPath]:
    """The files (and links) among the entries, less the system's (``.DS_Store``, ``__MACOSX/...``, hidden)."""
    files = [PurePosixPath(m.filename if kind == "zip" else m.name) for m in members
             if not (m.is_dir() if kind == "zip" else m.isdir())]
    return [f for f in files if not (is_os_file(f.name) or f.name.startswith(".")
                                     or any(is_skipped_folder(p) for p in f.parts[:-1]))]


def check_not_empty(kind: str, members: list, archive: Path) -> bool:
    """Refuse (before anything is written) an archive holding no file but the system's (an empty zip, a tar of
    empty folders, a zip of only ``__MACOSX``): it unpacked nothing and named --dest as the data folder.
    Returns whether it holds images (by name, as extract reads them)."""
    files = _data_files(kind, members)
    if not files:
        held = "is empty" if not members else f"holds no files but the system's or empty folders ({len(members)} " \
            f"entr{'y' if len(members) == 1 else 'ies'})"
        raise PipelineError(f"{archive} {held}: no images to unpack; is {option_text('url')} the archive you "
                            f"meant? (it is kept in {option_text('dest')}: delete it before fetching another of its "
                            "name)")
    return any(is_image_name(f.name) for f in files)


ARCHIVE_SUFFIXES = (".zip", ".tar", ".tgz", ".tar.gz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")


def warn_no_images(kind: str, members: list, archive: Path, dest: Path) -> None:
    """Say that an archive holds no images extract reads (its files unpacked all the same): archives inside it
    (a Kaggle download of train.zip and test.zip) are named with the fetch-data that unpacks each."""
    files = _data_files(kind, members)
    inner = [f for f in files if f.name.lower().endswith(ARCHIVE_SUFFIXES)]
    if inner:
        log.warning("%s holds no images but %d archive%s (%s): unpack each with fetch-data %s %s", archive.name,
                    len(inner), "" if len(inner) == 1 else "s", _some([f.as_posix() for f in inner]),
                    option_text("url", Placeholder(f"file://{dest / inner[0]}")),
                    option_text("dest", Placeholder("DIR")))
    else:
        log.warning("%s holds no images (%d file%s, none of the types read: %s): %s", archive.name, len(files),
                    "" if len(files) == 1 else "s", " ".join(IMAGE_EXTENSIONS), _some([f.as_posix() for f in files]))


def unpacked_root(dest: Path, names: list[str]) -> Path:
    """The archive's single top-level folder (PetImages for the Kaggle zip), else dest; metadata
    folders beside it (a macOS zip's ``__MACOSX``, hidden ones: folders.is_skipped_folder) do not count.
    Below it, a folder whose one folder holds folders in turn is passed through ('food/images/{apple,pear}':
    food/images, not food, a data folder of one class)."""
    paths = [PurePosixPath(n).parts for n in names]

    def folders(below: tuple) -> set:
        n = len(below)
        subs = {p[n] for p in paths if len(p) > n and p[:n] == below}
        return {t for t in subs if (dest.joinpath(*below, t)).is_dir() and not is_skipped_folder(t)}

    tops = folders(())
    if len(tops) != 1:
        return dest
    root = (tops.pop(),)
    while len(inner := folders(root)) == 1 and folders(one := root + (inner.pop(),)):
        root = one
    return dest.joinpath(*root)


TRAIN_SPLITS, OTHER_SPLITS = {"train", "training"}, {"test", "testing", "val", "valid", "validation", "dev"}


def warn_splits(root: Path) -> None:
    """Say when the folder unpacked holds split folders (train/, test/, val/), each of classes: as --data its
    classes would be 'train' and 'test'; its training split is the data folder, its test split fit-head's
    --test-data."""
    try:
        subs = {e.name.casefold(): e.name for e in os.scandir(root) if e.is_dir() and not is_skipped_folder(e.name)}
    except OSError:
        return
    train = next((subs[n] for n in sorted(TRAIN_SPLITS) if n in subs), None)
    others = [subs[n] for n in sorted(OTHER_SPLITS) if n in subs]
    if train is None or not others or not any(e.is_dir() for e in os.scandir(root / train)):
        return
    log.warning("%s holds split folders (%s), each of classes, not classes: give %s as %s, and %s as fit-head's "
                "%s", root, ", ".join([train, *others]), root / train, option_text("data"), root / others[0],
                option_text("test_data"))


def check_beside(kind: str, members: list, dest: Path, archive: Path) -> None:
    """Refuse (before anything is written) an archive without a single top folder (its classes at its top:
    dest itself becomes the data folder) into a dest holding folders not from it, which would become classes
    beside its own (PetImages of an earlier fetch, with cats and dogs together)."""
    tops = set()
    for m in members:
        parts = PurePosixPath(m.filename if kind == "zip" else m.name).parts
        if len(parts) > 1 or (parts and (m.is_dir() if kind == "zip" else m.isdir())):
            tops.add(parts[0])
    tops = {t for t in tops if not is_skipped_folder(t)}
    if len(tops) < 2:
        return
    with os.scandir(dest) as entries:
        others = sorted(e.name for e in entries if e.is_dir() and not is_skipped_folder(e.name) and e.name not in tops)
    if others:
        raise PipelineError(f"{archive.name} has no single top folder: its folders ({_some(sorted(tops))}) would "
                            f"unpack into {dest} beside {_some(others)}, and as one data folder all would be its "
                            f"classes; fetch it into a {option_text('dest')} of its own (a new folder)")


def check_into(names: list, dest: Path, archive: Path) -> None:
    """Refuse (before anything is written) an archive whose top folder is already in dest holding files not from
    it (another archive's PetImages, photos named otherwise): unpacked into it, the data folder would hold both.
    Its own files (an unpack stopped halfway) and the system's (.DS_Store, Thumbs.db, hidden ones) do not count."""
    mine = {PurePosixPath(n) for n in names}
    tops = {p.parts[0] for p in mine if len(p.parts) > 1 and not is_skipped_folder(p.parts[0])}
    for top in sorted(tops):
        folder = dest / top
        if not folder.is_dir():
            continue
        foreign = []
        for where, dirs, files in os.walk(folder):
            dirs[:] = sorted(d for d in dirs if not is_skipped_folder(d))
            rel = PurePosixPath(Path(where).relative_to(dest).as_posix())
            foreign += [rel / f for f in sorted(files)
                        if not (f.startswith(".") or is_os_file(f)) and rel / f not in mine]
        if foreign:
            shown = _some([p.relative_to(top).as_posix() for p in foreign])
            raise PipelineError(f"{folder} already holds {len(foreign)} file{'' if len(foreign) == 1 else 's'} not "
                                f"from {archive.name} ({shown}): unpacked into it, one data folder would hold "
                                f"both; fetch it into a {option_text('dest')} of its own, or pass "
                                f"{flag_text('overwrite')} to unpack into it anyway")


def _marker_bytes(marker: Path):
    """The archive size a marker file records, or None (no marker, or a foreign one)."""
    try:
        return json.loads(marker.read_text())["bytes"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def unfinished_unpack(folder: Path) -> Path | None:
    """The record (``.X.unpacking``) of an unpack stopped halfway (Ctrl-C, a kill, a full disk) that wrote
    into ``folder``: as dest (the folder holds it) or as one of its top-level folders (its parent holds it,
    naming the folder among its ``tops``), else None. Such a folder lacks files the archive holds; the same
    fetch-data finishes it."""
    folder = Path(folder)
    for record in sorted(folder.glob(".*.unpacking")):
        return record
    for record in sorted(folder.parent.glob(".*.unpacking")):
        try:
            tops = json.loads(record.read_text()).get("tops")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(tops, list) and folder.name in tops:
            return record
    return None


def check_conflicts(kind: str, members: list, dest: Path, overwrite: bool, keep=()) -> None:
    """Refuse (PipelineError naming the first) files already in dest that an entry would replace;
    with ``overwrite`` remove them instead, so nothing is written through an existing link, except the
    files in ``keep`` (the archive and the --url's own file), which are refused even then. A file (or a link to
    none) where an entry needs a folder counts too: unpacking stopped at it halfway ('Not a directory'), with
    ``overwrite`` as well."""
    above_seen = set()
    for m in members:
        name = m.filename if kind == "zip" else m.name
        parts = PurePosixPath(name).parts
        for i in range(1, len(parts)):
            if parts[:i] in above_seen:
                continue
            above_seen.add(parts[:i])
            above = dest.joinpath(*parts[:i])
            if os.path.lexists(above) and not above.is_dir():
                if any(k is not None and same_file(above, k) for k in keep):
                    raise PipelineError(f"the archive would replace {above}, the file it is unpacked from, with a "
                                        f"folder; fetch into another {option_text('dest')}")
                if not overwrite:
                    raise PipelineError(f"{above} already exists as a file where the archive unpacks a folder "
                                        f"({name!r} inside it); move it away, or unpack over it with "
                                        f"{flag_text('overwrite')}")
                above.unlink()
        target = dest / name
        is_dir = m.is_dir() if kind == "zip" else m.isdir()
        if not os.path.lexists(target) or (is_dir and target.is_dir() and not target.is_symlink()):
            continue
        if any(k is not None and same_file(target, k) for k in keep):
            raise PipelineError(f"the archive would replace {target}, the file it is unpacked from; "
                                f"fetch into another {option_text('dest')}")
        if overwrite and target.is_dir() and not target.is_symlink():  # never removed: it may hold anything
            raise PipelineError(f"{target} is a folder where the archive unpacks a file, which even "
                                f"{flag_text('overwrite')} never removes; move it away")
        if not overwrite:
            raise PipelineError(f"{target} already exists and the archive would overwrite it; move it away, "
                                f"or unpack over it with {flag_text('overwrite')}")
        target.unlink()


def unpack(archive: Path, dest: Path, overwrite: bool = False, keep: Path | None = None) -> tuple[Path, bool]:
    """Unpack archive into dest (once: a marker file records it); returns (unpacked root, unpacked now).

    Files already in dest are never overwritten silently: see check_conflicts."""
    from ..progress import progress

    marker = dest / f".{archive.name}.unpacked"
    size = archive.stat().st_size
    try:
        done = json.loads(marker.read_text())
        root = dest / done["root"]
        if done["bytes"] == size and root.is_dir():
            if not overwrite:
                log.info("already unpacked: %s", root)
                return root, False
            # asked to unpack over it: files removed or changed since come back (it said 'already unpacked')
            log.info("unpacking %s again over its earlier unpack (%s)", archive.name, flag_text("overwrite"))
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no marker (or a foreign one): unpack
    kind = archive_kind(archive)
    opener = zipfile.ZipFile if kind == "zip" else tarfile.open
    try:
        with opener(archive) as arc:
            if kind == "zip":
                windows_separators(arc.infolist())
            names = check_members(kind, arc, dest, own_files(archive))
            if ignores_case(dest):
                check_case_clashes(names, dest)
            members = skipped_zip_links(archive, arc.infolist()) if kind == "zip" else arc.getmembers()
            images = check_not_empty(kind, members, archive)
            if kind == "tar":
                fix_times(members, archive)
            check_ratio(kind, members, archive)
            check_beside(kind, members, dest, archive)
            if not overwrite:
                check_into(names, dest, archive)
            ensure_room(dest, unpacked_bytes(kind, members, dest), f"unpacking {archive.name}")
            started = dest / f".{archive.name}.unpacking"
            # a run cut off mid-unpack left its own files: those it may replace
            check_conflicts(kind, members, dest, overwrite or _marker_bytes(started) == size, keep=(archive, keep))
            tops = sorted({PurePosixPath(n).parts[0] for n in names if PurePosixPath(n).parts})
            started.write_text(json_text({"archive": archive.name, "bytes": size, "tops": tops}))
            for m in progress(members, desc=f"unpack {archive.name}", unit="file"):
                if kind == "tar" and hasattr(tarfile, "data_filter"):
                    arc.extract(m, dest, filter="data")  # the standard library's own safety net, too
                else:
                    arc.extract(m, dest)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, lzma.LZMAError) as e:  # damaged data
        raise PipelineError(f"cannot unpack {archive}: {e}; delete it and download again") from None
    except OSError as e:  # a full disk, no permission: the files so far stay, and the next run replaces them
        why = disk_reason(e) or e
        raise PipelineError(f"cannot unpack {archive} into {dest}: {why}; the files unpacked so far are kept and "
                            "the same command finishes the unpack once this is fixed") from None
    root = unpacked_root(dest, names)
    if not images:
        warn_no_images(kind, members, archive, dest)
    marker.write_text(json_text({"archive": archive.name, "bytes": size,
                                  "root": root.relative_to(dest).as_posix()}))
    started.unlink(missing_ok=True)
    log.info("unpacked %d entries of %s to %s", len(members), archive.name, root)  # zip links left out
    return root, True
