"""Image folders: listing, fingerprinting, seeded selection order and safe loading.

Nothing here imports torch, so a cache hit (list, fingerprint, open the cache) stays fast.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import unicodedata
import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from ..errors import PipelineError, UsageError
from ..files import is_utf8, one_line, quoted, shown
from ..progress import first_time
from .portable import (  # noqa: F401 (the decoding rule; bit_depth for callers)
    MAX_PIXELS, Refused, TooManyPixels, bit_depth, decode_failure, failure_reason, jpeg_draft, not_regular,
    open_within_limit, orientation, refuse_external, refuse_thin, to_rgb, too_many_pixels, unidentified, upright)

log = logging.getLogger(__name__)
#: File name endings treated as images when listing a folder (case-insensitive): torchvision ImageFolder's
#: (.ppm, .pgm included) and .jfif, the name browsers on Windows save JPEGs under; PIL reads them all.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")

#: Why a file whose name is not UTF-8 is left out (Python keeps such bytes as surrogates, which no
#: UTF-8 output can hold): told, with the name escaped, rather than failing mid-run.
NOT_UTF8 = "the file name is not valid UTF-8; rename it (e.g. convmv -f latin1 -t utf8)"

#: Largest image (in pixels) we agree to decode; larger ones are treated as decompression bombs, except a JPEG
#: that decodes reduced within it (``portable.draft_within_limit``).
MAX_IMAGE_PIXELS = MAX_PIXELS  # PIL's own default warning threshold (about 0.25 GB of RGB)


@dataclass(frozen=True)
class SourceFile:
    """One image file of an ImageFolder tree, as seen when listing it."""

    path: str  # relative to the data root, '/'-separated
    label: int  # index into the sorted class names
    size: int  # bytes
    mtime_ns: int  # modification time


@dataclass(frozen=True)
class ImageFolderListing:
    """The classes and image files of an ImageFolder root (one sub-folder per class)."""

    root: Path
    classes: tuple[str, ...]
    files: tuple[SourceFile, ...]
    #: (path, reason) of entries with an image name that are not regular files (dangling or looping
    #: links, pipes, devices): never listed nor opened, and not part of the fingerprint
    bad: tuple[tuple[str, str], ...] = ()

    def fingerprint(self) -> str:
        """sha256 over every file's path, size and mtime: changes when a file is added, removed or edited."""
        h = hashlib.sha256()
        for c in self.classes:
            h.update(f"class\0{c}\n".encode())
        for f in self.files:
            h.update(f"{f.path}\0{f.size}\0{f.mtime_ns}\n".encode())
        return h.hexdigest()

    @property
    def labels(self) -> np.ndarray:
        return np.array([f.label for f in self.files], dtype=np.int64)

    @cached_property
    def by_path(self) -> dict:
        """{relative path: SourceFile} of the listed files."""
        return {f.path: f for f in self.files}

    def changed(self, paths) -> list[str]:
        """Those of ``paths`` (listed files; others are ignored) that are no longer as listed: gone, or of
        another size or mtime. A stat each: cheap enough to ask for every file a run reads."""
        out = []
        for p in paths:
            listed = self.by_path.get(p)
            if listed is None:
                continue
            try:
                st = os.stat(self.root / p)
            except OSError:
                out.append(p)
                continue
            if (st.st_size, st.st_mtime_ns) != (listed.size, listed.mtime_ns):
                out.append(p)
        return out


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


#: Folders that operating systems, archivers and NAS boxes add beside the data: never a class, never
#: images (``__MACOSX`` holds a macOS zip's ``._`` resource forks, which are not images).
METADATA_FOLDERS = frozenset({"__MACOSX", "@eaDir", "$RECYCLE.BIN", "System Volume Information", "lost+found"})


#: Files that operating systems leave in folders (Finder's ``.DS_Store``, Explorer's ``Thumbs.db`` and
#: ``desktop.ini``, KDE's ``.directory``; compared case-insensitively), and a macOS copy's ``._NAME`` AppleDouble
#: files (a resource fork, not the picture ``NAME``): no photos and no errors, left out of every walk (check-images
#: called them not-an-image errors and moved them into its quarantine, extract never saw them).
OS_FILES = frozenset({".ds_store", "thumbs.db", "ehthumbs.db", "ehthumbs_vista.db", "desktop.ini", ".directory",
                      ".localized", "icon\r"})


def is_os_file(name: str) -> bool:
    """Whether a file is one of the OS's own (OS_FILES, ``._*``), left out of every walk as METADATA_FOLDERS are."""
    return name.lower() in OS_FILES or name.startswith("._")


#: A quarantine folder's suffix (check-images, audit --apply: ``DIR.quarantine`` beside DIR): never a class,
#: so the broken files of a class folder checked alone do not become a class of its parent.
QUARANTINE_SUFFIX = ".quarantine"


def is_skipped_folder(name: str) -> bool:
    """Whether a folder is left out of every listing: hidden (``.git``, ``.Trash``), METADATA_FOLDERS or a
    quarantine (``Cat.quarantine``)."""
    return name.startswith(".") or name in METADATA_FOLDERS or name.endswith(QUARANTINE_SUFFIX)


#: How ``walk`` begins the reason of a folder the OS would not list (check-images tells it from a folder reached twice).
CANNOT_LIST = "cannot be read"


def walk(top: str | os.PathLike, left_out: list | None = None, seen: set | None = None):
    """(folder, sorted file names) for ``top`` and every folder below it, in sorted order.

    The one rule for links: links are followed, to files and to folders alike (a linked class
    folder, a linked sub-folder, a linked image). A folder reached a second time (a link back to
    a folder above it, a loop, or a second link to the same one; ``seen``: the real paths walked
    already, shared between calls) is not walked again: it is added to ``left_out`` as (path
    relative to ``top``'s parent, why), and so is a folder the OS will not list (not permitted, an
    I/O error), which os.walk passed over in silence: its photos were missing from every listing
    without a word. Skipped folders: is_skipped_folder; skipped files: is_os_file.
    """
    top = Path(top)
    seen = set() if seen is None else seen
    seen.add(os.path.realpath(top))

    def cannot_list(e: OSError) -> None:
        if left_out is not None:
            rel = Path(e.filename or top).relative_to(top.parent).as_posix()
            left_out.append((shown(rel), f"{CANNOT_LIST} ({e.strerror or e}): its files are left out"))

    for dirpath, dirnames, filenames in os.walk(top, followlinks=True, onerror=cannot_list):
        keep = []
        for d in sorted(dirnames):
            if is_skipped_folder(d):
                continue
            real = os.path.realpath(os.path.join(dirpath, d))
            if real in seen:
                if left_out is not None:
                    rel = (Path(dirpath) / d).relative_to(top.parent).as_posix()
                    left_out.append((shown(rel), f"a link to a folder listed already ({shown(real)}): left out"))
                continue
            seen.add(real)
            keep.append(d)
        dirnames[:] = keep
        yield dirpath, sorted(f for f in filenames if not is_os_file(f))


def class_folders(root: Path) -> list[str]:
    """The class folders of an ImageFolder root, sorted: its sub-folders, metadata folders (``__MACOSX``) left out.
    ``os.path.isdir``, not ``DirEntry.is_dir``: a looping link beside the classes (``x -> y -> x``) made the
    latter raise ELOOP, and every command reading the folder (check-images after decoding it all) end in 'a bug?'.
    A root the OS will not list is the environment's one line (it ended every command in 'a bug?' too)."""
    try:
        entries = list(os.scandir(root))
    except OSError as e:
        raise PipelineError(f"data folder {str(root)!r} cannot be read ({e.strerror or e}); "
                            "fix its permissions") from None
    return sorted(d.name for d in entries if os.path.isdir(d.path) and not is_skipped_folder(d.name))


def list_image_folder(root: str | os.PathLike, min_classes: int = 2) -> ImageFolderListing:
    """List an ImageFolder root: sorted class folders, each with its image files (recursively); at least
    ``min_classes`` of them (evaluate takes one: a folder of photos of one class, or of something else).

    Links are followed, to class folders, sub-folders and files alike; a folder reached twice (a
    loop) is walked once and the repeat goes to ``bad`` (see ``walk``). Hidden files and folders,
    metadata folders (``__MACOSX``: is_skipped_folder) and files without an image extension
    (``Thumbs.db``, ``.DS_Store``) are left out; image names that are not regular files go to
    ``bad`` with the reason (see regular_file_stat).
    Raises ValueError for a missing folder, a class folder without images, fewer than two
    classes, or no images at all.
    """
    root = Path(root)
    if not root.is_dir():
        raise UsageError(f"data folder {str(root)!r} does not exist or is not a folder")
    classes = class_folders(root)
    for c in classes:
        if not is_utf8(c):
            raise UsageError(f"class folder {quoted(c)}: {NOT_UTF8}")
    files: list[SourceFile] = []
    bad: list[tuple[str, str]] = []
    classes = distinct_classes(root, classes, bad)
    # no folder is listed twice: a link to the root or to a class cannot give an image two labels
    seen = {os.path.realpath(p) for p in (root, *(root / c for c in classes))}
    for label, cls in enumerate(classes):
        before = len(files)
        _list_files(root, root / cls, label, files, bad, seen)
        if len(files) == before:
            unreadable = dict(bad).get(shown(cls))  # the OS would not list it: not the user's empty folder
            if unreadable:
                raise PipelineError(f"class folder {str(root / cls)!r} {unreadable}; fix its permissions")
            raise UsageError(f"class folder {str(root / cls)!r} holds no images; remove it or add images"
                             + _other_files(root / cls))
    if not files:
        with os.scandir(root) as entries:  # the pool given as --data
            loose = sum(1 for e in entries if is_image_name(e.name) and e.is_file())
        if loose and not classes:
            raise UsageError(f"data folder {str(root)!r} has no class sub-folders: its {loose} images lie loose in it "
                             "(expected one sub-folder per class, holding that class's photos)")
        raise UsageError(f"data folder {str(root)!r} holds no images (expected one sub-folder per class)")
    if len(classes) < min_classes:
        raise UsageError(
            f"data folder {str(root)!r} has {len(classes)} class with images ({', '.join(classes)}); "
            "need at least two class sub-folders"
        )
    if bad:
        warn_left_out(root, bad)
    warn_loose(root)
    warn_alike_classes(root, classes)
    return ImageFolderListing(root, tuple(classes), tuple(files), tuple(bad))


def warn_alike_classes(root: Path, classes) -> None:
    """Say (once) that class folders differ only in case or in spaces around their names ('Cat' and 'cat', 'Dog'
    and 'Dog '): two classes, each with half of the photos, where the user meant one (on macOS or Windows they
    would be one folder); they were taken as two without a word. So are names that are the same text in other
    Unicode code points ('café' as one letter é, and as e + an accent, as a Mac writes it): two classes that
    look like one everywhere they are shown, so they are named as ``ascii`` writes them."""
    groups: dict = {}
    for c in classes:
        groups.setdefault(alike_key(c), []).append(c)
    alike = [g for g in groups.values() if len(g) > 1]
    if alike:
        coded = all(len({canonical_name(c) for c in g}) == 1 for g in alike)
        named = "; ".join(" and ".join(ascii(c) if coded else repr(c) for c in g) for g in alike)
        what = ("are the same name in other Unicode code points (NFC and NFD: a folder made on a Mac)" if coded else
                "differ only in case or spaces")
        line = (f"class folders of {root} that {what} are taken as different classes: {named} "
                "(move the photos into one folder if they are one class)")
        if first_time(line):
            log.warning("%s", line)


def canonical_name(name: str) -> str:
    """``name`` in Unicode's composed form (NFC): 'café' the same however its é was written (one code point, or
    e + a combining accent as macOS writes names): the same class name, whichever folder it comes from."""
    return unicodedata.normalize("NFC", name)


def alike_key(name: str) -> str:
    """What class names that a person would take for one share: the same letters, case, spaces around it and the
    Unicode form set aside."""
    return canonical_name(name).strip().casefold()


def class_index(classes, name: str) -> int:
    """The index among ``classes`` (a model's) of the class named ``name`` (a test folder's or cache's): the same
    name, else the same text in other Unicode code points (a test folder unpacked from a Mac's archive named its
    'café' with e + accent; it was a class the model did not know, or a folder of photos of none of them); -1 for
    none."""
    classes = list(classes)
    if name in classes:
        return classes.index(name)
    same = [i for i, c in enumerate(classes) if canonical_name(c) == canonical_name(name)]
    return same[0] if len(same) == 1 else -1


def unknown_classes(theirs, classes) -> list[str]:
    """The names of ``theirs`` that are none of ``classes`` (``class_index``)."""
    return [c for c in theirs if class_index(classes, c) < 0]


def near_miss_text(unknown, classes, whose: str = "the model's") -> str:
    """'; 'Cat' is the model's 'cat' but for case or spaces: ...' for each unknown class that is one of the model's
    but for case or spaces around it (a test folder named 'Cat', 'Dog' for a model of 'cat', 'dog' was a folder
    of photos of none of its classes, scored only for how many look unknown), or ''."""
    pairs = [(u, c) for u in unknown for c in classes if alike_key(u) == alike_key(c)]
    if not pairs:
        return ""
    said = ", ".join(f"{u!r} is {whose} {c!r}" for u, c in pairs)
    folders = "the folder to its class name" if len(pairs) == 1 else "the folders to its class names"
    return f"; {said} but for case or spaces: rename {folders}"


def warn_loose(root: Path) -> None:
    """Say (once) that images lie in the data folder itself, beside the class folders: no class is theirs, so every
    command leaves them out; it did so without a word (check-images counted them among the good files)."""
    with os.scandir(root) as entries:
        loose = sorted(e.name for e in entries if is_image_name(e.name) and e.is_file())
    if loose:
        name = one_line(shown(loose[0]))
        line = (f"an image lies in {root} itself, in no class folder, and is left out: {name}; move it into its class "
                "folder to use it" if len(loose) == 1 else
                f"{len(loose)} images lie in {root} itself, in no class folder, and are left out (e.g. {name}); move "
                "them into their class folders to use them")
        if first_time(line):
            log.warning("%s", line)


#: The left-out entries a listing's warning names; more are counted (check-images names every one).
LEFT_OUT_NAMED = 5


def left_out_line(root: Path, bad: list) -> str:
    """The one warning of a listing's left-out entries, naming each of the first LEFT_OUT_NAMED with its reason:
    it named the first alone, so the other broken links and non-UTF-8 names of a messy folder went unnamed."""
    named = "; ".join(f"{one_line(p)}: {one_line(why)}" for p, why in bad[:LEFT_OUT_NAMED])
    more = (f"; and {len(bad) - LEFT_OUT_NAMED} more (check-images {shown(str(root))} names every one)"
            if len(bad) > LEFT_OUT_NAMED else "")
    return (f"{len(bad)} {'entry' if len(bad) == 1 else 'entries'} of {root} left out (not regular files, folders "
            f"reached twice through links, or folders that cannot be read): {named}{more}")


def warn_left_out(root: Path, bad: list) -> None:
    """The warning of a listing's left-out entries (``left_out_line``), once in a command or API call that lists
    the folder several times (``progress.first_time``)."""
    line = left_out_line(root, bad)
    if first_time(line):
        log.warning("%s", line)


def distinct_classes(root: Path, classes: list[str], bad: list) -> list[str]:
    """The class folders less those that are links to the data folder or to another class folder: such a
    link (``Cat2 -> Cat``) made a second class of the same photos, each image under two labels. The folder
    itself keeps its place before links to it; a repeat goes to ``bad`` as walk reports a folder reached twice."""
    claimed = {os.path.realpath(root)}
    kept = set()
    for c in sorted(classes, key=lambda c: (root / c).is_symlink()):
        real = os.path.realpath(root / c)
        if real in claimed:
            bad.append((c, f"a link to a folder listed already ({shown(real)}): left out"))
            continue
        claimed.add(real)
        kept.add(c)
    return [c for c in classes if c in kept]


def _list_files(root: Path, top: Path, label: int, files: list, bad: list, seen: set) -> None:
    """Append every image file below ``top`` to ``files`` with ``label`` (paths relative to ``root``); image
    names that cannot be used go to ``bad`` with the reason, folders ``walk`` leaves out too."""
    folders: list = []
    for dirpath, filenames in walk(top, folders, seen):
        for name in filenames:
            if not is_image_name(name):
                continue
            full = Path(dirpath) / name
            rel = full.relative_to(root).as_posix()
            if not is_utf8(rel):  # caches, reports and tables store names as UTF-8 text
                bad.append((shown(rel), NOT_UTF8))
                continue
            try:
                st = regular_file_stat(full)
            except ImageLoadError as e:
                bad.append((rel, e.reason))
                continue
            files.append(SourceFile(rel, label, st.st_size, st.st_mtime_ns))
    bad += [(from_root(root, top, where), why) for where, why in folders]


def _other_files(folder: Path) -> str:
    """What a class folder that lists no image holds instead, said after 'holds no images' (an iPhone's folder of
    .HEIC photos, .avif downloads: 'holds no images' alone, though it held hundreds of photos), or ''."""
    names = [n for _, filenames in walk(folder) for n in filenames if not is_image_name(n)]
    if not names:
        return ""
    heic = sum(n.lower().endswith((".heic", ".heif")) for n in names)
    return (f" (its one file, {quoted(names[0])}, is not" if len(names) == 1 else
            f" (its {len(names)} files, e.g. {quoted(names[0])}, are not") + (
            f" of the types read: {' '.join(IMAGE_EXTENSIONS)}"
            + ("; HEIC photos, as iPhones take them, convert to JPEG first: heif-convert IN OUT.jpg, or on a Mac "
               "sips -s format jpeg IN --out OUT.jpg" if heic else "") + ")")


def from_root(root: Path, top: Path, where: str) -> str:
    """A folder ``walk(top)`` left out (named from ``top``'s parent) named from ``root``, as the files are: a pool's
    top is its root, so its left-out folders were 'pool/sub' in the warning and the cache's skipped files."""
    return where.split("/", 1)[1] if top == root and "/" in where else where


#: The one class of a pool of photos nobody has labelled yet (``list_unlabelled``; suggest's pool cache).
UNLABELLED = "(unlabelled)"
#: An extraction's ``purpose`` for such a pool: listed by ``list_unlabelled``, never a default training cache.
POOL = "pool"
#: An extraction's ``purpose`` for fit-head's --test-data: never a default training cache, and one class will do
#: (a small test set may hold photos of only some of the head's classes).
TEST = "test"


def list_unlabelled(root: str | os.PathLike) -> ImageFolderListing:
    """Every image below ``root`` (in it or in any folder below it, as ``walk`` finds them), as one class
    ``UNLABELLED``: a pool of photos to label, extracted like any folder (its rows found by content once a
    photo is moved into a class folder)."""
    root = Path(root)
    if not root.is_dir():
        raise UsageError(f"folder {str(root)!r} does not exist or is not a folder")
    files: list[SourceFile] = []
    bad: list[tuple[str, str]] = []
    _list_files(root, root, 0, files, bad, set())
    if not files:
        raise UsageError(f"folder {str(root)!r} holds no images")
    if bad:
        warn_left_out(root, bad)
    return ImageFolderListing(root, (UNLABELLED,), tuple(files), tuple(bad))


def list_folder(root: str | os.PathLike, purpose: str = "") -> ImageFolderListing:
    """The listing an extraction of ``purpose`` reads: a pool's (``POOL``) photos unlabelled, else the ImageFolder
    (a test folder's (``TEST``) of one class or more: a head of more classes scores it)."""
    if purpose == POOL:
        return list_unlabelled(root)
    return list_image_folder(root, min_classes=1 if purpose == TEST else 2)


def stratified_order(labels: np.ndarray, seed: int) -> np.ndarray:
    """A seeded order of all indices whose every prefix is a stratified sample.

    Each class is shuffled on its own; an item at rank k of a class of size m gets the key
    (k + 0.5) / m, and items are taken in key order. So the first n items hold each class in
    proportion to its size (to within one item), and taking more items, for example to replace
    unreadable ones, keeps that balance.
    """
    rng = np.random.default_rng(seed)
    keys = np.empty(len(labels), dtype=np.float64)
    tiebreak = rng.permutation(len(labels))
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        perm = rng.permutation(idx)
        keys[perm] = (np.arange(len(perm)) + 0.5) / len(perm)
    return np.lexsort((tiebreak, keys))


def os_error_reason(e: OSError) -> str:
    """The reason recorded for a file the OS would not give (gone, not permitted, an I/O error)."""
    return f"unreadable image: {e.strerror or e}"


_OS_MESSAGES = frozenset(os.strerror(n) for n in errno.errorcode)


def is_os_error_reason(reason: str) -> bool:
    """Whether a recorded reason says the file could not be reached (``os_error_reason``, or an OSError's own
    text '[Errno N] ...'), which may pass (a file moved away and back, a permission fixed), rather than what
    its bytes are (truncated, not an image, too large), which a file of the same size and mtime keeps."""
    prefix = "unreadable image: "
    if not reason.startswith(prefix):
        return False
    rest = reason[len(prefix):]
    return rest in _OS_MESSAGES or rest.startswith("[Errno ")


class ImageLoadError(Exception):
    """An image that cannot be used; ``reason`` is a short description, ``kind`` a stable class of it."""

    def __init__(self, reason: str, kind: str = "unreadable"):
        super().__init__(reason)
        self.reason = reason
        self.kind = kind  # zero-byte, decompression-bomb, too-many-pixels, extreme-aspect, not-an-image, not-a-file,
        # truncated, unreadable


def regular_file_stat(path: str | os.PathLike) -> os.stat_result:
    """os.stat of ``path`` when it is a regular file (or a link to one), else ImageLoadError.

    The one check before any file is listed or opened: reading a named pipe blocks forever, a
    device may never end, and a dangling or looping link has nothing to read.
    """
    try:
        st = os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ImageLoadError("a symlink loop, not a file", "not-a-file") from None
        if e.errno == errno.ENOENT and os.path.islink(path):
            raise ImageLoadError(f"a dangling symlink (to {os.readlink(path)!r})", "not-a-file") from None
        raise ImageLoadError(os_error_reason(e), "unreadable") from None
    what = not_regular(st.st_mode)
    if what:
        raise ImageLoadError(f"not a regular file ({what})", "not-a-file")
    return st


def open_regular(path: str | os.PathLike):
    """``path`` opened for binary reading, only if it is a regular file (ImageLoadError otherwise).

    Checked before the open; the open itself is non-blocking and the opened file checked again,
    so a pipe swapped in between cannot hang the reader either.
    """
    regular_file_stat(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    except OSError as e:
        raise ImageLoadError(os_error_reason(e), "unreadable") from None
    what = not_regular(os.fstat(fd).st_mode)
    if what:
        os.close(fd)
        raise ImageLoadError(f"not a regular file ({what})", "not-a-file")
    return os.fdopen(fd, "rb")


def load_rgb(path: str | os.PathLike, min_short_side: int | None = None):
    """Fully decode an image file into an RGB PIL image, upright, or raise ImageLoadError with the reason.

    Grayscale, CMYK, palette, RGBA, 16-bit and float images are converted to RGB (transparency is
    composited on white), so they count as good images; a photo stored sideways with an EXIF Orientation
    tag is turned as every viewer shows it (``portable.upright``).

    With ``min_short_side``, a JPEG whose shorter side is at least twice that is decoded at a
    reduced scale (1/2, 1/4 or 1/8, in the DCT domain: ``jpeg_draft``) that keeps its shorter side
    >= ``min_short_side``; other files, and smaller JPEGs, decode as without it.
    """
    return decode_image(path, min_short_side)[1]


def check_size(size, max_pixels: int | None = MAX_IMAGE_PIXELS) -> None:
    """ImageLoadError when an image of ``size`` (from a file's header, or a PIL image given in memory) is empty,
    has more pixels than allowed, or is too thin to resize safely: the checks before any pixel is decoded or
    resized. ``max_pixels`` None: no bound on the size declared (a file's header: ``jpeg_draft`` then decodes a
    JPEG past MAX_IMAGE_PIXELS reduced within it, and refuses anything else past it)."""
    w, h = size
    if w * h == 0:
        raise ImageLoadError(f"{w} x {h} pixels: an empty image", "unreadable")
    if max_pixels is None:
        return check_aspect(size)
    # checked here too, not only by PIL's warning: warning filters are process-wide, so a thread
    # decoding beside others (data.image_reader.CpuReader) may run without the one in decode_stream; under serve's
    # lower bound, in its words: a 108 MP baseline JPEG upload was told that such a JPEG is decoded reduced
    allowed = f"{w} x {h} pixels: more than the {max_pixels} allowed"
    if w * h > MAX_IMAGE_PIXELS:
        raise ImageLoadError(too_many_pixels((w, h)) if max_pixels >= MAX_IMAGE_PIXELS else allowed,
                             "decompression-bomb")
    if w * h > max_pixels:
        raise ImageLoadError(allowed, "too-many-pixels")
    check_aspect(size)


def check_aspect(size) -> None:
    """ImageLoadError when an image of ``size`` (from its header) is too thin to resize safely."""
    try:
        refuse_thin(size)  # the decoding rule's check, which the ONNX example runs too
    except Refused as e:
        raise ImageLoadError(str(e), "extreme-aspect") from None


def decode_image(path: str | os.PathLike, min_short_side: int | None = None, pil_warnings: bool = False):
    """load_rgb's rules, also returning the image as stored: (decoded image, its upright RGB conversion).

    check-images uses the first to report format and mode, so it and extract agree on what is bad.
    The pixel count is checked from the header (at open) before any pixel data is decoded.
    ``min_short_side``: see ``load_rgb`` (the decoded image is then the reduced one). ``pil_warnings``: let
    PIL's warnings (a damaged EXIF block) through, for check-images to report; otherwise they are dropped.
    """
    with open_regular(path) as fp:
        if os.fstat(fp.fileno()).st_size == 0:
            raise ImageLoadError("zero-byte file", "zero-byte")
        return decode_stream(fp, min_short_side, pil_warnings=pil_warnings)


def decode_bytes(data: bytes, min_short_side: int | None = None, max_pixels: int | None = None):
    """``load_rgb``'s rules for an image held in memory (an upload): its RGB PIL image, or ImageLoadError.

    ``max_pixels`` (at most MAX_IMAGE_PIXELS: serve's bound on what an upload costs) is checked from the header,
    before any pixel is decoded, on the size declared: a JPEG past it is refused, not decoded reduced.
    """
    import io

    if not data:
        raise ImageLoadError("zero-byte file", "zero-byte")
    return decode_stream(io.BytesIO(data), min_short_side, max_pixels)[1]


def open_image(fp):
    """``Image.open`` (``portable.open_within_limit``), where an AttributeError can only be Pillow's, on a damaged
    header (SPIDER's, naming an image of a stack without the stack): that file's "unreadable image", not the end of
    a whole run."""
    try:
        return open_within_limit(fp)  # a JPEG past the pixel limit opens too, for jpeg_draft to decode reduced
    except AttributeError as e:
        raise ImageLoadError(decode_failure(e), "unreadable") from None


#: The key of an RGB image's ``info`` (``decode_stream``'s) holding how many frames its file holds, when more
#: than one: decoding uses the first alone (``frame_count``).
FRAMES = "frames"


def frame_count(im) -> int:
    """How many pictures the opened, not yet loaded image holds of which decoding uses the first alone: an animated
    GIF, PNG (APNG) or WebP, a multi-page TIFF. 1 for every other, and for a multi-picture JPEG (MPO: its first
    picture is the photo, the others a preview or a depth map) or a PSD (its first is the merged picture, the
    others its layers). Read from the headers (a GIF's frames are skipped through, not decoded); a file whose later
    frames cannot be read counts as 1 here: its first still decodes, or fails, as before."""
    if im.format in ("MPO", "PSD"):
        return 1
    try:
        return int(im.n_frames) if getattr(im, "is_animated", False) else 1
    except Exception:  # Pillow's readers raise many kinds on a damaged later frame (IndexError, TypeError, ...)
        with contextlib.suppress(Exception):
            im.seek(0)  # back to the first frame, as before counting (truncated GIFs, APNGs, TIFFs: the same pixels)
        return 1


def bomb_reason(e: Exception, max_pixels: int | None) -> str:
    """Pillow's refusal of an image past its limit in predict's words, or under serve's lower bound in serve's (a
    12000 x 12000 PNG upload was told to be saved as baseline JPEG, which serve refuses as well)."""
    count = re.search(r"(\d+) pixels", str(e))
    if max_pixels is None or max_pixels >= MAX_IMAGE_PIXELS or count is None:
        return decode_failure(e)
    return f"{count.group(1)} pixels: more than the {max_pixels} allowed"


def decode_stream(fp, min_short_side: int | None = None, max_pixels: int | None = None,
                  pil_warnings: bool = False):
    """(decoded image, its RGB conversion) of an open binary file, under the rules of ``decode_image``. PIL's
    warnings are dropped unless ``pil_warnings``: the image decoded, and a line such as "Truncated File Read"
    (an EXIF block cut short) names no file (reports, the gallery, export's parity check, serve)."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            if not pil_warnings:
                warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
            with open_image(fp) as im:
                try:
                    refuse_external(im)  # an upload or a file named .jpg holding EPS: Ghostscript never runs
                except ValueError as e:
                    raise ImageLoadError(str(e), "not-an-image") from None
                check_size(im.size, max_pixels)
                jpeg_draft(im, min_short_side)
                frames = frame_count(im)
                im.load()
                rgb = upright(to_rgb(im), orientation(im))
                if frames > 1:
                    rgb.info[FRAMES] = frames
                return im, rgb
    except ImageLoadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning, TooManyPixels) as e:
        raise ImageLoadError(bomb_reason(e, max_pixels), "decompression-bomb") from None
    except (OSError, SyntaxError, ValueError, NotImplementedError, RuntimeError, TypeError) as e:  # corrupt data
        # (Pillow's DDS and BLP readers raise NotImplementedError on a header they cannot read, AVIF's RuntimeError,
        # its TIFF reader TypeError on strip offsets stored as fractions: found by mutating small files)
        reason = failure_reason(e, fp)  # a format Pillow does not decode named, a file cut short said so
        kind = "truncated" if "truncated" in str(e).lower() or " cut short " in reason else (
            "not-an-image" if isinstance(e, Image.UnidentifiedImageError) else "unreadable")
        raise ImageLoadError(reason, kind) from None


def jpeg_bytes(path: str | os.PathLike):
    """The raw bytes of a baseline RGB or grayscale JPEG within the pixel limit, for decoding elsewhere
    (on a GPU); None when the file should go through load_rgb instead (other formats and modes, a header
    PIL cannot parse, a JPEG past the pixel limit, which load_rgb decodes reduced, or an EXIF Orientation 2-8:
    PIL turns it upright, so both paths give the same pixels, and only phone photos stored sideways cost CPU
    decoding). Zero-byte files and anything but a regular file raise ImageLoadError, as in load_rgb.
    """
    import io

    from PIL import Image

    try:
        with open_regular(path) as f:
            data = f.read()
    except OSError as e:
        raise ImageLoadError(f"unreadable image: {e}", "unreadable") from None
    if not data:
        raise ImageLoadError("zero-byte file", "zero-byte")
    if data[:3] != b"\xff\xd8\xff":
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
            with Image.open(io.BytesIO(data)) as im:  # the header only: no pixels decoded
                check_aspect(im.size)
                return data if im.mode in ("RGB", "L") and orientation(im) == 1 else None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return None  # load_rgb decodes a JPEG past the limit reduced (or refuses it), as without device decoding
    except (OSError, SyntaxError, ValueError):
        return None  # load_rgb gives the precise reason


def exif_problem(im) -> str:
    """Why the EXIF block of an opened image cannot be read ('' when it can, or there is none): such a photo
    decodes as stored, not turned upright (``portable.orientation``); check-images says so."""
    try:
        im.getexif().get(0x0112)
    except Exception as e:  # as portable.orientation: any error of Pillow's EXIF parser
        return f"{type(e).__name__}: {e}"
    return ""


def thumbnail(path, size: int):
    """At most ``size`` x ``size`` RGB PIL image of ``path`` (decoded reduced where the JPEG allows), or None
    when it cannot be read (moved, broken): for the pictures of reports, which show what they can."""
    try:
        im = load_rgb(path, size)
    except (ImageLoadError, OSError):
        return None
    im.thumbnail((size, size))
    return im
