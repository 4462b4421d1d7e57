"""Paths shared by the stages: names that came from outside, folders the user named, safe writes.

A file name taken from a URL (or any other outside source) must never choose the folder it is
written to; a folder option that names an existing file must be one clear usage error, not a
traceback from ``mkdir`` deep inside a stage; and an output is written whole or not at all
(``atomic_write``), a full or read-only disk being one line (``writing``), never a traceback; a
file name in a CSV never runs as a spreadsheet formula (``SafeCsvWriter``). No output of any command
may replace a file it reads or land among its photos: ``check_output`` is the one guard.
"""
from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import json
import math
import numbers
import os
import re
import shutil
import signal
import stat
import traceback
from pathlib import Path
from typing import Callable, Optional

from .config import option_named
from .errors import UsageError

#: Longest file name accepted from outside (bytes): file systems stop at 255, and '.part' is added.
MAX_NAME_BYTES = 200


def plain_name(name: str, what: str) -> str:
    """``name`` when it is one plain, visible file name, else ValueError naming ``what`` and the name.

    Refused: empty, '.', '..', anything with '/' or '\\' (it would pick another folder), hidden
    names (they would hide among our own marker files), control characters and over-long names.
    """
    bad = (not name or name.startswith(".") or "/" in name or "\\" in name
           or any(ord(c) < 32 or ord(c) == 127 for c in name) or len(name.encode("utf-8", "replace")) > MAX_NAME_BYTES)
    if bad:
        raise UsageError(f"{what}: {name!r} is not a plain file name (no '/', '\\', '..', hidden, empty or "
                         "control-character names)")
    return name


def numbered_name(number: int, source: str, suffix: str) -> str:
    """A plain file name for an output made from the input file ``source``: its number (unique, in input order)
    and its name's stem with anything but letters, digits, '-', '_' and '.' as '_', cut short, + ``suffix``:
    photos of the same name in different folders, or with '/', '..', control characters, non-UTF-8 bytes or
    200-byte names, still give one visible, distinct name each."""
    stem = "".join(c if (c.isascii() and c.isalnum()) or c in "-_." else "_" for c in Path(source).stem)[:80]
    return plain_name(f"{number:05d}-{stem}{suffix}", "an output name")


def shown(name: str) -> str:
    """``name`` printable and storable: bytes that are not UTF-8 (kept by Python as surrogates) as ``\\xe9``."""
    return os.fsencode(name).decode("utf-8", "backslashreplace") if not is_utf8(name) else name


def quoted(name: str) -> str:
    """``repr(name)`` (quotes, control characters escaped), its bytes that are not UTF-8 written ``\\xe9`` as
    ``shown`` writes them: ``repr(shown(name))`` doubled that backslash ('caf\\\\xe9.jpg'), a name no file has."""
    return re.sub(r"(?<!\\)((?:\\\\)*)\\udc([89a-f][0-9a-f])", r"\1\\x\2", repr(name))


def unshown(name: str) -> str:
    """The file name ``shown`` wrote as ``name``: its ``\\xe9`` escapes back to the bytes they stand for."""
    return os.fsdecode(re.sub(rb"\\x([0-9a-f]{2})", lambda m: bytes([int(m.group(1), 16)]),
                              name.encode("utf-8", "surrogateescape")))


def one_line(text: str) -> str:
    """``text`` (as ``shown``) with control characters escaped (a newline as ``\\n``, ESC as ``\\x1b``, as
    repr writes them), so a file name cannot break a line of a table or rewrite the terminal."""
    out = []
    for c in shown(text):
        o = ord(c)
        if o < 32 or 127 <= o < 160 or c in "\u2028\u2029":
            out.append(repr(c)[1:-1])
        else:
            out.append(c)
    return "".join(out)


def path_text(x, what: str) -> str:
    """A path given as a str, bytes or a PathLike, as the str the configs hold; anything else a UsageError naming
    ``what`` (the call and its parameter: 'export_model: model'), where os.fspath said only 'expected str, bytes
    or os.PathLike object, not NoneType', naming no parameter."""
    if not isinstance(x, (str, bytes, os.PathLike)):
        raise UsageError(f"{what} must be a path (a str or pathlib.Path), got {x!r:.60}")
    return os.fsdecode(x)


def first_line(text: str, limit: int) -> str:
    """The first line of ``text`` (a library's message quoted inside one of ours), at most ``limit``
    characters: cut at a word with ' ...'. A cut at ``limit`` characters ended the hub's offline message
    mid-word ('Please check your connection and try aga')."""
    line = (str(text).strip().splitlines() or [""])[0]
    if len(line) <= limit:
        return line
    space = line.rfind(" ", 0, limit - 3)
    return (line[:space] if space > 0 else line[:limit - 4]) + " ..."


def is_utf8(name: str) -> bool:
    """Whether a name from the file system is valid UTF-8 (HDF5, CSV and JSON output can hold it as is)."""
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def require_folder(path: str | os.PathLike, what: str) -> Path:
    """``path`` as a Path when it is a folder or can be made one; ValueError when it, or the nearest
    part of it that exists, is something else (a regular file), so ``mkdir`` never fails later."""
    path, what = Path(path), option_named(what)
    probe = path
    while not os.path.lexists(probe) and probe != probe.parent:
        probe = probe.parent
    if os.path.lexists(probe) and not probe.is_dir():
        where = "" if probe == path else f" ({str(probe)!r} is not a folder)"
        raise UsageError(f"{what} {str(path)!r} must be a folder, but it is {what_is(probe)}{where}")
    return path


def what_is(path: Path) -> str:
    """What stands at ``path`` that is not a folder: 'a file', or a link that leads nowhere (not 'a file')."""
    if not path.is_symlink():
        return "a file"
    try:
        path.stat()
    except OSError as e:
        return "a symlink loop" if e.errno == errno.ELOOP else f"a dangling link (to {os.readlink(path)!r})"
    return "a link to a file"


def check_output(output, inputs=(), data=(), suffixes=(), what: str = "--output", folder: bool = False,
                 written: bool = True) -> Path:
    """``output`` as a Path when writing it destroys nothing the command reads, and it can be written: the one
    output guard of every command (a file's folder is made; with ``folder``, a folder to write into, made by the
    caller).

    ``inputs``: every file the command reads (images, the model, weights and their sidecar, caches);
    ``data``: every image folder it reads. Each entry is a path, or (path, what it is) for the message;
    None and '' are left out. Refused in one line naming the path and why (exit 2):

    - a file output that is a folder or ends in '/', a folder output that is a file;
    - one of ``inputs``, by any name (a link, '..', a hard link), there or not: a weights sidecar written
      where none was would be read by the next run;
    - a data folder or anything inside one: a new file there joins the training set, makes its caches
      stale, and may replace a photo;
    - a file name not ending in one of ``suffixes`` (when given);
    - a name (of the file, or of a folder on its way) longer than a file system takes (``NAME_MAX`` bytes).

    Then, unless ``written`` is False (a folder the command may only read from: extract's cache folder, whose
    complete cache is a hit), a place where nothing can be written (read-only, not permitted, /proc) is refused
    in one line naming it (exit 1, as a failed write is): found only when the command wrote there, after its work.
    """
    out, what = Path(output), option_named(what)  # '--output' on the command line, 'output' from Python
    long = next((part for part in out.parts if len(os.fsencode(part)) > NAME_MAX), None)
    if long is not None:  # else 'unexpected OSError: File name too long' once the work was done, at the rename
        raise UsageError(f"{what} is named with {len(os.fsencode(long))} bytes ({long[:16]!r}...): a file or folder "
                         f"name may have at most {NAME_MAX}; name it with {NAME_MAX} or fewer")
    if folder:
        require_folder(out, what)
    elif os.path.isdir(out):
        raise UsageError(f"{what} {str(output)!r} is a folder; name a file")
    elif os.fspath(output).endswith(("/", os.sep)):  # Path('new/') is 'new': a file named like the folder meant
        raise UsageError(f"{what} {str(output)!r} names a folder (it ends in '/'); name a file")
    for p, role in _labelled(inputs, ""):
        if same_file(out, p):
            raise UsageError(f"{what} {str(output)!r} is one of the inputs ({f'{role}: ' if role else ''}{p}); "
                             "it would be overwritten")
    where = Path(os.path.realpath(out))
    for d, role in _labelled(data, ""):
        if os.path.isdir(d) and where.is_relative_to(os.path.realpath(d)):
            inside = "is the" if where == Path(os.path.realpath(d)) else "is inside the"
            raise UsageError(f"{what} {str(output)!r} {inside} data folder {str(d)!r}{f' ({role})' if role else ''}; "
                             "write it elsewhere")
    if suffixes and out.suffix.lower() not in suffixes:
        raise UsageError(f"{what} {str(output)!r} must end in {' or '.join(suffixes)}")
    place = out if folder else written_through(out)  # a link to a file: written through (``atomic_write``)
    if not folder and out.is_symlink():
        if place.is_symlink():  # a loop: realpath stops where the links go round
            raise UsageError(f"{what} {str(output)!r} is a symlink loop; name a file, or remove the link")
        if not place.parent.is_dir():  # as '>' through a dangling link fails: nothing made where it points
            raise UsageError(f"{what} {str(output)!r} is a link to {str(place)!r}, whose folder does not exist; "
                             "make it, or name another file")
    if not folder:
        require_folder(out.parent, f"{what}'s folder")
    if written and (folder or not in_place(out)):  # a device is written into: nothing is made beside it
        check_writable(out if folder else place.parent, what, output, through=None if place == out else place)
    if not folder:
        with writing(out.parent):
            out.parent.mkdir(parents=True, exist_ok=True)
    return out


def check_replaceable(path, ours, kind: str, what: str = "--output", other: str = "") -> None:
    """Nothing at ``path`` yet, or a file ``ours(path)`` knows as one of ``kind`` (an earlier export, a checkpoint):
    an output may replace an earlier one of its own, never a file of the user's named by mistake (a photo, a README,
    a cache, /dev/null); else UsageError naming it (exit 2). A link is judged by what it leads to (the file it leads to
    is what ``atomic_write`` replaces, writing through it): a dangling one leads to nothing yet, and its file is made,
    as ``check_output`` lets it be. ``other``: the option to name instead, when not ``what``."""
    path, what, other = Path(path), option_named(what), option_named(other or what)
    target = written_through(path)  # a dangling link's file is made (``check_output``): nothing is replaced
    if not os.path.lexists(target) or (target.is_file() and ours(target)):
        return
    that = f" ({what_is(path)})" if path.is_symlink() else "" if path.is_file() else " (not a regular file)"
    raise UsageError(f"{what} {str(path)!r} exists and is not {kind}{that}: it would be replaced; "
                     f"move it away, or name another {other}")


def starts_with(path: Path, *heads: bytes) -> bool:
    """Whether the file at ``path`` begins with one of ``heads`` (a format's magic bytes); False if unreadable."""
    try:
        with open(path, "rb") as f:
            first = f.read(max(map(len, heads)))
    except OSError:
        return False
    return first.startswith(heads)


def header_names(path: Path, *names: str) -> bool:
    """Whether the first line of the CSV at ``path`` names the columns ``names`` (among others, in any order,
    separated by ',', ';' or a tab as a spreadsheet may save it): a list a command wrote, perhaps edited."""
    try:
        with open(path, "rb") as f:
            line = f.read(4096).decode("utf-8-sig", "replace").splitlines()[0]
    except (OSError, IndexError):
        return False
    return set(names) <= {cell.strip().strip('"') for cell in line.replace(";", ",").replace("\t", ",").split(",")}


def check_writable(folder: Path, what: str, output, through: Path | None = None) -> None:
    """A folder made in ``folder``, or in the nearest part of it that exists, and removed at once; DiskFull naming
    ``what`` and ``output`` where it cannot be. Made, not asked (``os.access``): root is granted everything, and
    '/proc' still takes no folder (--runs-dir /proc/nope failed after the whole fit). Nothing is left behind, and
    no folder of ``output`` is made here. ``through``: the file a link ``output`` leads to (written through it),
    named too, so that a folder other than the link's own is not a puzzle."""
    import tempfile

    from .errors import DiskFull

    probe, what = folder, option_named(what)
    while not os.path.lexists(probe) and probe != probe.parent:
        probe = probe.parent
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".write-probe-", dir=probe))
    except OSError as e:
        why = disk_reason(e) or (e.strerror or str(e)).lower()
        link = f" (a link to {str(through)!r})" if through is not None else ""
        raise DiskFull(f"cannot write {what} {str(output)!r}{link}: nothing can be written in {str(probe)!r} ({why})") \
            from None


def _labelled(entries, default: str) -> list[tuple[str, str]]:
    """(path, what it is) of each entry of check_output's ``inputs`` or ``data`` (a path or a pair), blanks left out."""
    pairs = [e if isinstance(e, tuple) else (e, default) for e in entries]
    return [(os.fspath(p), option_named(role)) for p, role in pairs if p]


def same_file(a: Path, b: str) -> bool:
    """Whether paths ``a`` and ``b`` name one file: the same place once links and '..' are resolved
    (whether or not it exists yet), or two names of one file (a hard link)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)
    except OSError:
        return False


def folder_of_a_file(folder, paths) -> str | None:
    """The first of ``paths`` that is a file in ``folder`` itself (a photo named alone: an output there would sit
    among its neighbours and be read with them next time), or None. Only that folder: a sub-folder beside the
    photo, such as ``maps/`` next to ``./cat.jpg``, is the caller's choice."""
    return next((str(p) for p in paths if os.path.isfile(p) and same_file(Path(folder), os.path.dirname(p) or ".")),
                None)


def folder_held(folder, paths) -> str | None:
    """The first of ``paths`` that is a folder below ``folder`` (through links and '..' alike), or None: new files in
    ``folder`` would sit one level above photos given as a folder, and a later run on ``folder`` would read them."""
    top = Path(os.path.realpath(folder))
    return next((str(p) for p in paths if os.path.isdir(p) and Path(os.path.realpath(p)).is_relative_to(top)), None)


def free_default(path, default) -> str:
    """``path``, unless it is the option's ``default`` and already exists: then the first free
    ``name-N.ext`` beside it, so a command run twice with its defaults never replaces the first picture."""
    path = str(path)
    if path != str(default) or not os.path.lexists(path):
        return path
    p = Path(path)
    n = 2
    while os.path.lexists(p.with_name(f"{p.stem}-{n}{p.suffix}")):
        n += 1
    return str(p.with_name(f"{p.stem}-{n}{p.suffix}"))


def disk_reason(e: BaseException):
    """Why a write failed, in a few words, when ``e`` is a full disk, a read-only file system or a refused
    permission (as OSError, or wrapped in h5py's and torch's RuntimeErrors); else None."""
    text, code = str(e), getattr(e, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT) or "No space left" in text or "errno = 28" in text:
        return "no space left on the device"
    if code == errno.EROFS or "Read-only file system" in text or "errno = 30" in text:
        return "the file system is read-only"
    if code in (errno.EACCES, errno.EPERM) or "Permission denied" in text or "errno = 13" in text:
        return "permission denied"
    if isinstance(e, RuntimeError) and any(m in text for m in TORCH_WRITE_FAILED):
        return WRITE_FAILED
    return None


#: How torch.save's zip writer says a write failed (a full disk: it never gives the errno): its own words, an
#: ``ostream`` that failed, or the position it checks after a short write (``unexpected pos 704 vs 598``).
TORCH_WRITE_FAILED = ("file write failed", "PytorchStreamWriter", "basic_ios::clear: iostream error",
                      "] . unexpected pos ", "inline_container")
WRITE_FAILED = "the write failed (a full disk?)"
#: Free bytes below which a write that failed without its errno is taken for a full disk.
NEARLY_FULL = 1 << 20


def no_room(path) -> bool:
    """Whether the file system ``path`` is written to (its nearest existing folder) has almost no room left."""
    return 0 <= _free_bytes(path) < NEARLY_FULL


def disk_error(e: BaseException, path):
    """A one-line PipelineError naming ``path`` when ``e`` is a full disk, a read-only file system or a
    refused permission (as OSError, or wrapped in h5py's and torch's RuntimeErrors); else None."""
    from .errors import DiskFull

    why = disk_reason(e)
    if why is None:
        return None
    if why == WRITE_FAILED and no_room(path):  # torch's writer lost the errno: the disk says it
        why = "no space left on the device"
    err = DiskFull(f"cannot write {path}: {why}")
    # HDF5 that failed mid-write crashes the process when its objects are freed later (h5py 3.x):
    # the CLI then leaves at once, after saying why (the committed rows are on disk)
    err.fatal = "file write failed: time =" in str(e) or "id ref count" in str(e)
    return err


def _free_bytes(path) -> int:
    """The free bytes of the file system ``path`` is written to (its nearest existing folder); -1 unknown."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p if p.is_dir() else p.parent).free
    except OSError:
        return -1


@contextlib.contextmanager
def writing(path):
    """Turn a full disk, a read-only folder or a refused permission while writing ``path`` into one line (exit 1)."""
    try:
        yield
        return
    except (OSError, RuntimeError) as e:
        err = disk_error(e, path)
        if err is None:
            raise
        if not err.fatal:  # err stays chained to e, and may be kept (a notebook's last error, CliRunner's result):
            let_go(e)  # the failed write's frames let go of their open files (torch.save's, a removed temporary's)
    # raised outside the except block, so it holds no reference to the failed write's frames: their
    # HDF5 objects are freed now, not at interpreter exit after h5py is gone (a segfault then)
    raise err


def let_go(e: BaseException) -> None:
    """Clear the finished frames of ``e``'s traceback and of the errors it chains to, so what they hold is freed now
    (an open file, its room on a full disk), though the error itself may be kept."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        traceback.clear_frames(e.__traceback__)
        e = e.__cause__ or e.__context__


#: Signals whose default action ends the process without running ``finally`` blocks.
_ENDING_SIGNALS = ("SIGTERM", "SIGHUP")


class Terminated(SystemExit):
    """SIGTERM or SIGHUP arrived while a temporary file was open: unwinds (running the ``finally``
    that removes it) and exits with the shell's code for the signal, 128 + its number."""


def _terminated_in(pid, replaced: dict):
    """The handler for process ``pid``; a process forked from it (a DataLoader's decoding worker) inherits the
    handler and must die of the signal as by default: unwinding there shut its threads down mid-accept, and
    their tracebacks followed the one line the main process prints. ``replaced``: see ``_children_may_end``."""
    def terminated(signum, frame):
        if os.getpid() != pid:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        _children_may_end(replaced)
        raise Terminated(128 + signum)
    return terminated


def _ignore_child(signum, frame) -> None:
    """SIGCHLD while the process ends: a child dying of the same SIGTERM is expected."""


def _children_may_end(replaced: dict) -> None:
    """The process is ending: a Python SIGCHLD handler is replaced by one that does nothing. torch's DataLoader
    raises 'DataLoader worker (pid ...) is killed by signal: Terminated' from its handler when a decoding worker
    dies of the scheduler's SIGTERM too; raised in the middle of the unwinding (the worker dies while the main
    process is in a long forward pass), it replaced Terminated: a traceback instead of the one line. The handler
    replaced goes into ``replaced``, for ``unwinding_on_signals`` to put back once the unwinding is over."""
    child = getattr(signal, "SIGCHLD", None)
    if child is not None and callable(signal.getsignal(child)) and signal.getsignal(child) is not _ignore_child:
        replaced[child] = signal.signal(child, _ignore_child)


def _handled_by(handler, names, replaces) -> dict:
    """``handler`` for each signal of ``names`` whose handler now passes ``replaces``; the handlers replaced, by
    signal. Main thread only (Python's rule for handlers): elsewhere nothing is replaced."""
    import threading

    saved = {}
    if threading.current_thread() is threading.main_thread():
        for name in names:
            sig = getattr(signal, name, None)
            if sig is not None and replaces(signal.getsignal(sig)):
                saved[sig] = signal.signal(sig, handler)
    return saved


def _put_back(saved: dict) -> None:
    for sig, old in saved.items():
        signal.signal(sig, old)


@contextlib.contextmanager
def unwinding_on_signals():
    """While inside, SIGTERM and SIGHUP raise Terminated instead of killing the process at once, so the
    ``finally`` blocks that remove temporary files run. Only where the signal still has its default
    action (a handler someone installed is left alone) and only in the main thread (Python's rule). The
    SIGCHLD handler quieted for the unwinding is put back however it ends: left quiet, a notebook or a test
    session lost torch's report of a killed decoding worker for good."""
    replaced = {}
    saved = _handled_by(_terminated_in(os.getpid(), replaced), _ENDING_SIGNALS,
                        lambda old: old == signal.SIG_DFL)
    try:
        yield
    finally:
        _put_back(saved)
        for sig, old in replaced.items():  # SIGCHLD, unless someone installed another since
            if signal.getsignal(sig) is _ignore_child:
                signal.signal(sig, old)


@contextlib.contextmanager
def signals_deferred():
    """Ctrl-C, SIGTERM or SIGHUP arriving inside is held until the block is done, then delivered to the handler
    that was there. For a commit made of several steps (a cache's three counters): unwound between two of
    them, a resumed extraction took rows twice and missed others. Main thread only (Python's rule for
    handlers; elsewhere the block runs as it is)."""
    caught = []
    saved = _handled_by(lambda signum, frame: caught.append(signum), ("SIGINT", *_ENDING_SIGNALS),
                        lambda old: old not in (None, signal.SIG_IGN))
    try:
        yield
    finally:
        _put_back(saved)
        if caught:
            signal.raise_signal(caught[0])  # now, to the handler restored


#: The longest file name (bytes) Linux, macOS and Windows file systems take.
NAME_MAX = 255


def temporary_name(path: Path, suffix: str = ".tmp", pid: bool = True) -> Path:
    """``.NAME.PID.tmp`` beside ``path``, or, where that is longer than a file name may be (an output named with
    250 characters, itself allowed), ``.DIGEST.PID.tmp`` from its name's sha256: writing it failed as 'unexpected
    OSError: File name too long (a bug?)'. ``suffix`` for another ending; ``pid`` False: no PID (a name every
    process agrees on, as a lock file's)."""
    tail = f".{os.getpid()}{suffix}" if pid else suffix
    name = f".{path.name}{tail}"
    if len(os.fsencode(name)) > NAME_MAX:
        name = f".{name_digest(path.name)}{tail}"
    return path.with_name(name)


def name_digest(name: str) -> str:
    """What ``temporary_name`` puts for a name too long to keep whole."""
    return hashlib.sha256(os.fsencode(name)).hexdigest()[:16]


def temporaries(path: Path, suffix: str = ".tmp") -> list[tuple[Path, int]]:
    """(file, its writer's PID) of each ``temporary_name(path, suffix)`` beside ``path``, any writer's. Both forms of
    the name: near the longest name a file may have, the writer's PID decided which."""
    heads = (f".{path.name}.", f".{name_digest(path.name)}.")
    try:
        names = os.listdir(path.parent)
    except OSError:
        return []
    found = []
    for name in names:
        head = next((h for h in heads if name.startswith(h)), None)
        pid = name[len(head or ""):len(name) - len(suffix)]
        if head and name.endswith(suffix) and pid.isdigit():
            found.append((path.parent / name, int(pid)))
    return found


def clear_dead_temporaries(path: Path, suffix: str = ".tmp") -> None:
    """Remove the ``temporary_name(path, suffix)`` files of processes that are gone (killed: ``kill -9``, the OOM
    killer, a power cut), which nothing else removes: an export's or a checkpoint's, as large as the model, was
    left beside it by every killed run. A live process's (another writer of the same output) is left alone."""
    for tmp, pid in temporaries(path, suffix):
        if not process_alive(pid):
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def process_alive(pid: int) -> bool:
    """Whether a process of this id runs on this machine (ours, or another user's)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True
    return True


def in_place(path) -> bool:
    """Whether ``path`` is written into as it is, never replaced by a rename: a device, a pipe or a socket
    (``/dev/null``, ``/dev/stdout`` to a terminal or a pipe), or a name in /dev, /dev/fd or /proc (``/dev/stdout``
    redirected to a file; not /dev/shm's files). Such a place keeps nothing a temporary file could protect, and a
    rename onto it replaced the device itself: as root, ``predict --output /dev/null`` made /dev/null a regular file."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    parent = os.path.dirname(os.path.abspath(path))
    special = parent in ("/dev", "/dev/fd") or parent.startswith("/proc/")
    return special or not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def written_through(path) -> Path:
    """The file an output named ``path`` replaces: ``path`` itself, or, where it is a symbolic link, the file it
    leads to (links followed, there or not yet), as a shell's ``>`` writes through a link. A rename onto the link
    replaced the link by a regular file and left the user's file it led to as it was."""
    path = Path(path)
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def atomic_write(path, write, before_replace: Optional[Callable[[], object]] = None) -> Path:
    """``write(tmp)`` into a temporary file beside ``path``, then rename it onto ``path``.

    Readers never see a half-written file, and a failure (a full disk, Ctrl-C, SIGTERM: see
    ``unwinding_on_signals``) leaves none: the old file, if any, stays as it was. Errors of the
    disk are one line (see ``writing``). A device or a pipe (``in_place``) is written into directly.
    A symbolic link is written through (``written_through``): the file it leads to is replaced (the temporary
    file beside it), the link stays. A file replaced keeps its permission bits, as ``>`` keeps them.
    ``before_replace``: called once the temporary file is whole, just before the rename (an export's old sidecar
    removed there: a write that fails, a full disk, leaves the old file with its sidecar).
    """
    path = Path(path)
    if in_place(path):
        with writing(path):
            write(path)
        return path
    target = written_through(path)
    tmp = temporary_name(target)
    clear_dead_temporaries(target)
    with unwinding_on_signals():
        try:
            with writing(path):
                write(tmp)
                with contextlib.suppress(OSError):  # nothing there yet (or not ours to read): the umask's bits
                    os.chmod(tmp, stat.S_IMODE(os.stat(target).st_mode))
                if before_replace is not None:
                    before_replace()
                os.replace(tmp, target)
        finally:
            if tmp.exists():
                tmp.unlink()
    return path


#: First characters that make a spreadsheet read a cell as a formula (OWASP, "CSV injection").
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def finite(value):
    """``value`` with NaN and infinities as None, in dicts, lists and tuples too, and -0.0 as 0.0 (a log-loss of
    probability-1 rows, -mean(log 1), read '-0.0' in --json)."""
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):
        return value + 0.0 if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def json_text(value, **options) -> str:
    """The one way JSON is written (result files, the ledger, journals, ``--json``): NaN and infinities as
    null, since JSON has no such numbers and a bare NaN (what Python's json writes) breaks every other
    parser. ``options``: json.dumps's (indent, default, ensure_ascii)."""
    return json.dumps(finite(value), allow_nan=False, **options)


def write_json(path, value, indent: int = 2) -> Path:
    """``value`` as a JSON file (``json_text``), written safely (``atomic_write``)."""
    return atomic_write(path, lambda tmp: tmp.write_text(json_text(value, indent=indent) + "\n"))


def csv_cell(value):
    """``value`` as a CSV cell a spreadsheet shows as text: a string that starts like a formula (after any
    single quotes) gets one more single quote in front, as OWASP advises; ``csv_cell_read`` undoes it
    exactly. Numbers and other strings are left as they are."""
    if isinstance(value, str) and value.lstrip("'")[:1] in FORMULA_STARTS:
        return "'" + value
    return value


def csv_cell_read(text: str) -> str:
    """A cell as ``csv_cell`` wrote it, back as it was: one single quote in front of a formula-like start
    is dropped (a cell a person wrote with ``=`` at the start is kept as written)."""
    if text.startswith("'") and text.lstrip("'")[:1] in FORMULA_STARTS:
        return text[1:]
    return text


class SafeCsvWriter(csv.DictWriter):
    """``csv.DictWriter`` whose cells go through ``csv_cell``: every CSV the pipeline writes (predict,
    check-images, audit's fixes.csv) holds file names, which a file's maker chooses (``=cmd|' calc'!A0.jpg``)."""

    def writerow(self, rowdict):
        return super().writerow({k: csv_cell(v) for k, v in rowdict.items()})

    def writerows(self, rowdicts):
        for row in rowdicts:
            self.writerow(row)
