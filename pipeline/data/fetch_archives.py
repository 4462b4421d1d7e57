"""fetch-data's archive checks: what kind of archive a file is (or why it is none fetch-data unpacks), and each
entry checked before anything is written: never outside --dest, through a link, over fetch-data's own files, too
long a name, an unpackable zip method, names that clash, a decompression bomb.
"""
from __future__ import annotations

import logging
import lzma
import math
import os
import tarfile
import time
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from ..config import Placeholder, option_text
from ..errors import PipelineError
from .fetch_urls import _source_record
from .moves import link_on_the_way

#: fetch-data's one logger, named as before its modules were split apart (a filter, a test, names it)
log = logging.getLogger("pipeline.data.fetch")

def _plain_path(name: str) -> bool:
    """Whether an entry's name is relative and never climbs ('..'), as written (links aside)."""
    if not name or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return False
    # '..' even where it resolves inside: through a symlink unpacked earlier it may not
    return ".." not in PurePosixPath(name.replace("\\", "/")).parts


def _inside(dest: Path, name: str) -> bool:
    """Whether dest/name stays inside dest once resolved (no absolute path, no '..' escape)."""
    if not _plain_path(name):
        return False
    target = (dest / name).resolve()
    return target == dest or dest in target.parents


def _check_through_links(m, parts: tuple, links: set, files: set) -> None:
    """Refuse a tar entry that would write through a link the archive made before it (into a file
    already in dest, or the archive itself), and a hard link to anything but a file the archive wrote."""
    name = m.name
    if any(parts[:i] in links for i in range(1, len(parts) + 1)):
        raise PipelineError(f"archive entry {name!r} would be written through a link the archive made earlier; "
                            "refusing to unpack")
    if m.islnk() and PurePosixPath(m.linkname).parts not in files:
        raise PipelineError(f"archive entry {name!r} is a hard link to {m.linkname!r}, which is not a file of "
                            "the archive; refusing to unpack")
    if m.issym() or m.islnk():
        links.add(parts)
    elif m.isfile():
        files.add(parts)


def _zip_link(m) -> bool:
    """Whether a zip entry's external attributes mark a symlink (zipfile would unpack it as a small file holding
    its target's name: ``unpack`` skips it, naming it)."""
    return (m.external_attr >> 16) & 0o170000 == 0o120000


def skipped_zip_links(archive: Path, members: list) -> list:
    """The members to unpack: a zip's symbolic links are left out with one warning naming them. zipfile
    writes a link as a small file holding its target's name ('Cat/0.jpg' as a 9-byte 'photo' in a class
    folder: unreadable, skipped by extract as broken), and making real links from a zip is what the tar
    checks guard against; a link is never needed to get the photos themselves."""
    links = [m.filename for m in members if _zip_link(m)]
    if links:
        shown = ", ".join(repr(n) for n in links[:5]) + (f" and {len(links) - 5} more" if len(links) > 5 else "")
        log.warning("%s holds %d symbolic link%s, not unpacked (a zip link would unpack as a small file holding "
                    "its target's name): %s", archive.name, len(links), "" if len(links) == 1 else "s", shown)
    return [m for m in members if not _zip_link(m)]


def _check_layout(name: str, is_dir: bool, link: bool, kinds: dict) -> None:
    """Refuse an entry that cannot be unpacked beside the earlier ones: one inside a name an earlier entry
    unpacks as a file, or makes a zip link ('link' then 'link/x.jpg': the folder it meant), one whose name an
    earlier entry already took as a file or as a folder ('a' and 'a/'), or a file named twice. Unpacking such
    an archive stopped halfway ('Not a directory', 'File exists') or let the second copy silently replace the
    first. ``kinds`` maps the parts of each name seen to 'file', 'link' (a zip's, not unpacked:
    skipped_zip_links) or 'folder' (the folders above an entry count as folders)."""
    parts = PurePosixPath(name).parts
    for i in range(1, len(parts)):
        if (above := kinds.setdefault(parts[:i], "folder")) != "folder":
            what = "makes a symbolic link (a zip's links are not unpacked)" if above == "link" else "unpacks as a file"
            raise PipelineError(f"archive entry {name!r} would be written inside {'/'.join(parts[:i])!r}, which an "
                                f"earlier entry {what}; refusing to unpack")
    kind, before = ("folder" if is_dir else "file"), kinds.get(parts, "").replace("link", "file")
    if parts and before and (kind, before) != ("folder", "folder"):
        why = "is named twice in the archive" if kind == before == "file" else \
            f"is a {kind}, but another entry of the archive makes it a {before}"
        raise PipelineError(f"archive entry {name!r} {why}; refusing to unpack")
    kinds[parts] = "link" if link else kind


#: The zip compression methods Python's zipfile unpacks (Windows' Deflate64, 9, is not among them; Zstandard,
#: 93, is from Python 3.14)
ZIP_METHODS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflate", zipfile.ZIP_BZIP2: "bzip2",
               zipfile.ZIP_LZMA: "lzma", **({zipfile.ZIP_ZSTANDARD: "zstd"} if hasattr(zipfile, "ZIP_ZSTANDARD")
                                          else {})}
#: names of methods zipfile cannot unpack, for the refusal
OTHER_ZIP_METHODS = {9: "Deflate64", 93: "Zstandard", 95: "xz", 98: "PPMd", 99: "AES-encrypted"}


def _check_zip_entry(m: zipfile.ZipInfo) -> None:
    """Refuse, before anything is written, a zip entry zipfile cannot unpack: a password-protected one, or
    one compressed by another method (they failed halfway as 'unexpected RuntimeError ... a bug?')."""
    if m.flag_bits & 0x1:
        raise PipelineError(f"archive entry {m.filename!r} is encrypted (password-protected); unpack the archive "
                            f"by hand (unzip asks for the password) and point {option_text('data')} at the folder")
    if m.compress_type not in ZIP_METHODS:
        name = OTHER_ZIP_METHODS.get(m.compress_type, "an unknown one")
        raise PipelineError(f"archive entry {m.filename!r} is compressed with method {m.compress_type} ({name}), "
                            f"which Python's zipfile cannot unpack (it can: "
                            f"{', '.join(ZIP_METHODS.values())}); unpack it by hand (7z x ARCHIVE) and point "
                            f"{option_text('data')} "
                            "at the folder")


#: zip "version made by" systems whose file names cannot hold a backslash: MS-DOS/FAT, NTFS, VFAT
WINDOWS_ZIP_SYSTEMS = {0, 11, 14}


def windows_separators(members: list) -> None:
    """Read a backslash in the names of a zip made on Windows as the folder separator it is there (PowerShell's
    Compress-Archive wrote 'PetImages\\Cat\\0.jpg'): zipfile on Linux or macOS would unpack each entry as one file
    of that name at the top of dest. The names are checked as any others afterwards."""
    for m in members:
        if m.create_system in WINDOWS_ZIP_SYSTEMS and "\\" in m.filename:
            m.filename = m.filename.replace("\\", "/")


def own_files(archive: Path) -> set[str]:
    """The names fetch-data keeps beside an archive in dest: its .part and its records (an entry named as
    the archive itself: check_conflicts)."""
    a = archive.name
    return {f"{a}.part", _source_record(archive).name, f".{a}.unpacked", f".{a}.unpacking"}


def _limit(dest: Path, which: str, default: int) -> int:
    try:
        return os.pathconf(dest, which)
    except (OSError, ValueError, AttributeError):  # not said here (Windows has no pathconf)
        return default


def _check_length(name: str, dest: Path, name_max: int, path_max: int) -> None:
    """Refuse (before anything is written) an entry whose name, or a folder's on its way, is longer than the file
    system of dest allows: unpacking stopped at it ('File name too long') and said the same command would finish
    the unpack, which it never could."""
    shown = repr(name if len(name) <= 80 else f"{name[:60]}...{name[-15:]}")
    for part in PurePosixPath(name).parts:
        if (n := len(os.fsencode(part))) > name_max:
            raise PipelineError(f"archive entry {shown} has a name of {n} bytes, longer than the {name_max} the "
                                f"file system of {dest} allows; refusing to unpack (nothing was "
                                f"written): unpack it by hand, renaming it, and point {option_text('data')} at the "
                                "folder")
    if (n := len(os.fsencode(str(dest / name)))) >= path_max:
        raise PipelineError(f"archive entry {shown} would be unpacked to a path of {n} bytes, longer than the "
                            f"{path_max} the file system allows; refusing to unpack (nothing was written): fetch "
                            f"into a shorter {option_text('dest')}, or unpack it by hand")


def check_members(kind: str, arc, dest: Path, own: set = frozenset()) -> list[str]:
    """The archive's entry names; PipelineError naming the first entry that would land outside dest, or on
    one of fetch-data's ``own`` files (a link there made its record be written into a file it points to)."""
    dest = dest.resolve()
    names, links, files, kinds = [], set(), set(), {}
    members = arc.infolist() if kind == "zip" else arc.getmembers()
    name_max, path_max = _limit(dest, "PC_NAME_MAX", 255), _limit(dest, "PC_PATH_MAX", 4096)
    for m in members:
        name = m.filename if kind == "zip" else m.name
        _check_length(name, dest, name_max, path_max)
        if not _inside(dest, name):
            if _plain_path(name) and (link := link_on_the_way(dest / name, dest)):
                raise PipelineError(f"archive entry {name!r} would be written through {link}, a link in {dest} to "
                                    "outside it; refusing to unpack through it: fetch into the link's target as "
                                    f"{option_text('dest')} (or remove the link)")
            raise PipelineError(f"archive entry {name!r} would be written outside {dest}; refusing to unpack")
        if kind == "zip":
            _check_zip_entry(m)
        if PurePosixPath(name).parts in {(o,) for o in own}:
            raise PipelineError(f"archive entry {name!r} would take the place of fetch-data's own "
                                f"{PurePosixPath(name).name}; refusing to unpack")
        if kind == "tar":
            if not (m.isfile() or m.isdir() or m.issym() or m.islnk()):
                raise PipelineError(f"archive entry {name!r} is a device or pipe; refusing to unpack")
            if (m.issym() or m.islnk()) and not hasattr(tarfile, "data_filter"):
                raise PipelineError(f"archive entry {name!r} is a link, and this Python's tarfile cannot unpack "
                                    "links safely (Python >= 3.11.4 can); refusing to unpack")
            if m.issym() or m.islnk():
                base = str(PurePosixPath(name).parent) if m.issym() else ""
                link = m.linkname
                if link.startswith("/") or not _inside(dest, str(PurePosixPath(base) / link)):
                    raise PipelineError(f"archive entry {name!r} links to {link!r} outside {dest}; "
                                     "refusing to unpack")
            _check_through_links(m, PurePosixPath(name).parts, links, files)
        _check_layout(name, m.is_dir() if kind == "zip" else m.isdir(), kind == "zip" and _zip_link(m), kinds)
        names.append(name)
    return names


def ignores_case(dest: Path) -> bool:
    """Whether the file system under dest takes 'a.jpg' and 'A.jpg' for one file (macOS's and Windows' default,
    a FAT drive, an ext4 casefold folder): a probe file made there, and looked up in upper case."""
    probe = dest / f".fetch-data-case-probe-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        return os.path.lexists(dest / probe.name.upper())
    except OSError:
        return False
    finally:
        probe.unlink(missing_ok=True)


def check_case_clashes(names: list, dest: Path) -> None:
    """On a file system that ignores case, refuse (before anything is written) two entries whose names differ
    only in case: the second would replace the first ('Cat/a.jpg', 'Cat/A.jpg'), or two class folders would
    become one ('Cat/', 'cat/')."""
    seen = {}
    for name in names:
        parts = tuple(p for p in PurePosixPath(name).parts if p != ".")
        for i in range(1, len(parts) + 1):
            first = seen.setdefault(tuple(p.casefold() for p in parts[:i]), parts[:i])
            if first != parts[:i]:
                raise PipelineError(f"archive entries {'/'.join(first)!r} and {'/'.join(parts[:i])!r} differ only in "
                                    f"case, which the file system of {dest} does not tell apart (one would replace or "
                                    "join the other); unpack it on a case-sensitive one and point "
                                    f"{option_text('data')} "
                                    "there")


def unpacked_bytes(kind: str, members: list, dest: Path) -> int:
    """What the entries declare they hold once unpacked, less what their files already in dest hold (a
    resumed or --overwrite unpack replaces them): a zip entry never unpacks past its declared size (zipfile
    stops there), and a tar entry's size is what tarfile writes."""
    need = 0
    for m in members:
        target = dest / (m.filename if kind == "zip" else m.name)
        there = target.stat().st_size if target.is_file() and not target.is_symlink() else 0
        need += max(0, (m.file_size if kind == "zip" else m.size) - there)
    return need


#: The most an archive, or one zip entry over RATIO_FLOOR, may unpack to per byte it holds: photos barely
#: compress (JPEGs 1.0 to 1.2:1; the Kaggle zip, JPEGs, two Thumbs.db, a readme and a licence, about 1.04:1),
#: zeros deflate 1000:1 and bzip2 far more: a 370 KB zip of 300 MB was unpacked while the disk had room.
MAX_RATIO = 100
#: entries (a readme, a Thumbs.db) and archives declaring no more than this unpack whatever their ratio
RATIO_FLOOR = 1 << 20


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n} bytes"


def check_ratio(kind: str, members: list, archive: Path) -> None:
    """Refuse (PipelineError, before anything is written) a decompression bomb: a zip entry declaring more than
    MAX_RATIO times its compressed bytes, or an archive declaring more than MAX_RATIO times its own size in all
    (a tar.gz, or zip entries sharing their compressed data). What is written never passes the declared sizes:
    zipfile stops an entry at its declared size (and fails its CRC), tarfile writes an entry's size."""
    limit = f"over the {MAX_RATIO}:1 that archives of photos never near (a decompression bomb?); refusing to " \
            "unpack. If you trust it, unpack it by hand and point --data at the folder"
    total = 0
    for m in members:
        size = m.file_size if kind == "zip" else m.size
        total += size
        if kind == "zip" and size > RATIO_FLOOR and size > MAX_RATIO * m.compress_size:
            raise PipelineError(f"archive entry {m.filename!r} declares {_mb(size)} from {_mb(m.compress_size)} "
                                f"compressed ({size / max(m.compress_size, 1):,.0f}:1), {limit}")
    packed = archive.stat().st_size
    if total > RATIO_FLOOR and total > MAX_RATIO * packed:
        raise PipelineError(f"{archive.name} declares {_mb(total)} unpacked from {_mb(packed)} "
                            f"({total / max(packed, 1):,.0f}:1), {limit}")


#: archives Python's zipfile and tarfile cannot unpack, by their first bytes: what they are, and how to unpack one
OTHER_ARCHIVES = {b"7z\xbc\xaf\x27\x1c": ("a 7z archive", "7z x {}"), b"Rar!\x1a\x07": ("a RAR archive", "7z x {}"),
                  b"\x28\xb5\x2f\xfd": ("a Zstandard-compressed file", "tar --zstd -xf {}")}


#: compressions tarfile unpacks, by their first bytes: a file of one that is no tar is cut off or damaged
COMPRESSED = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz"}


def archive_kind(path: Path) -> str:
    if zipfile.is_zipfile(path):
        return "zip"
    try:
        if tarfile.is_tarfile(path):
            return "tar"
    except (EOFError, zlib.error, lzma.LZMAError, OSError) as e:  # a .tar.gz cut off in its first block
        raise PipelineError(f"{path} is a compressed file cut off or damaged ({e}); delete it and download "
                            "again") from None
    with open(path, "rb") as f:
        first = f.read(512)
    if first.startswith(b"PK\x03\x04"):
        raise PipelineError(f"{path} is a zip archive cut off before its end (its table of contents is missing: "
                            "the download stopped early?); delete it and download again")
    for magic, what in COMPRESSED.items():
        if first.startswith(magic):
            raise PipelineError(f"{path} is {what}-compressed, but no tar archive unpacks from it (cut off or "
                                "damaged?); delete it and download again")
    if not first:
        raise PipelineError(f"{path} is an empty file (0 bytes), not an archive: the server sent nothing; delete it "
                            "and run this again")
    head = first.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if head.startswith((b"<!doctype html", b"<html", b"<head", b"<body", b"<?xml", b"<!--")):
        saved = Placeholder(f"file://<where you saved it>/{path.name}")
        raise PipelineError(f"{path} is a web page (HTML), not an archive: the server sent it in the archive's place "
                            "(a moved link, a login or error page?); delete it, download the archive by hand (in a "
                            f"browser), and run this again with {option_text('url', saved)}")
    for magic, (what, how) in OTHER_ARCHIVES.items():
        if first.startswith(magic):
            raise PipelineError(f"{path} is {what}, which fetch-data cannot unpack (it unpacks zip, and tar plain or "
                                f"gz, bz2, xz compressed); unpack it by hand ({how.format(path.name)}) and point "
                                f"{option_text('data')} at the folder")
    raise PipelineError(f"{path} is neither a zip nor a tar archive; delete it and download again")


#: the modification times a tar entry may set (0001 to 9999, as every platform's time_t holds them)
TIME_RANGE = (-62135596800, 253402300799)


def fix_times(members: list, archive: Path) -> None:
    """Give a tar entry whose modification time no file can carry (NaN, or past year 9999: base-256 and pax
    headers hold any number) the present time, with one warning: unpacking stopped at it, 'unexpected
    OverflowError: timestamp out of range for platform time_t' (or ValueError for NaN), 'a bug?'."""
    odd = []
    for m in members:
        t = m.mtime
        if not (isinstance(t, (int, float)) and math.isfinite(t) and TIME_RANGE[0] <= t <= TIME_RANGE[1]):
            odd.append(m.name)
            m.mtime = int(time.time())
    if odd:
        log.warning("%s: %d %s a modification time no file can have (%s); unpacked with the present time",
                    archive.name, len(odd), "entry carries" if len(odd) == 1 else "entries carry", _some(odd))


def _some(names: list) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
