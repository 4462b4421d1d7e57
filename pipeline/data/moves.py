"""Moving the files of a data folder: never onto a name that exists, across file systems too, and one
changer of a folder at a time.

``os.rename`` silently replaces whatever holds the destination's name, so a check before it
(``os.path.lexists``) is a race that two programs lose together: two ``audit --apply`` relabelling
into the same names once took a folder from 803 to 605 files. ``move_no_replace`` makes the check
and the move one step (``renameat2`` with ``RENAME_NOREPLACE`` where the C library and the file
system have it, else a hard link and an unlink); between file systems it copies, fsyncs, checks the
copy's sha256, and only then removes the source. ``changing_folder`` / ``reading_folder`` hold a
data folder for one changer (audit --apply / --undo) or for any number of readers (extract): a
``flock`` on the folder itself, so no lock file lands among the photos and a read-only folder can
still be read.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import shutil
import stat
import sys
import time
from pathlib import Path

from ..errors import PipelineError
from ..files import temporaries, temporary_name
from .image_reader import file_digest

try:
    import fcntl
except ImportError:  # Windows: no folder lock
    fcntl = None

log = logging.getLogger(__name__)


def _libc_renameat2():
    """The C library's ``renameat2`` (glibc 2.28 and later), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    fn.restype = ctypes.c_int
    return fn


#: ``renameat2`` or None (then hard link + unlink); tests set it to None to take the fallback.
RENAMEAT2 = _libc_renameat2()
_AT_FDCWD, _RENAME_NOREPLACE = -100, 1
#: errno of a file system (or kernel) without the flag: fall back to a hard link
_NO_FLAG = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)}
#: errno of a file system without hard links (FAT, some network shares)
_NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP), errno.EMLINK}


def rename_no_replace(src, dst) -> None:
    """Rename ``src`` to ``dst`` in one step that raises FileExistsError (and moves nothing) when ``dst``
    exists; OSError EXDEV between file systems."""
    if RENAMEAT2 is not None:
        if RENAMEAT2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        code = ctypes.get_errno()
        if code not in _NO_FLAG:
            raise OSError(code, os.strerror(code), str(src), None, str(dst))  # FileExistsError for EEXIST
    try:
        os.link(src, dst)  # fails when dst exists: the name is taken in one step
    except OSError as e:
        if e.errno not in _NO_HARD_LINKS or os.path.lexists(dst):
            raise
        _rename_onto_placeholder(src, dst)
        return
    os.unlink(src)


def rename_to_free(src, names) -> Path:
    """Rename ``src`` to the first of ``names`` (paths, tried in order) that is free, each tried in one step
    (``rename_no_replace``): a file made there meanwhile is never replaced. The path taken."""
    for dst in names:
        try:
            rename_no_replace(src, dst)
            return Path(dst)
        except FileExistsError:
            continue
    raise FileExistsError(f"no free name for {src}")


def _rename_onto_placeholder(src, dst) -> None:
    """Without hard links: claim ``dst`` with an empty file made exclusively, then rename onto it (replacing
    only that file, our own)."""
    os.close(os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    try:
        os.rename(src, dst)
    except BaseException:
        os.unlink(dst)
        raise


def move_no_replace(src, dst) -> None:
    """Move the regular file ``src`` to ``dst``, a name that must be free (FileExistsError, nothing moved,
    when it is not), on the same file system or another one (``copy_across``; a link or a named pipe, which
    check-images quarantines too, is made anew there: ``remake_across``)."""
    try:
        rename_no_replace(src, dst)
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        if stat.S_ISLNK(os.lstat(src).st_mode) or stat.S_ISFIFO(os.lstat(src).st_mode):
            remake_across(Path(src), Path(dst))
        else:
            copy_across(Path(src), Path(dst))


def remake_across(src: Path, dst: Path) -> None:
    """A link or named pipe moved between file systems: the same link (its target unchanged, never followed)
    or an empty pipe with its mode made at ``dst`` (failing when the name is taken), then ``src`` removed.
    Copying through them opened a dangling link's nothing, or a pipe that blocks forever."""
    st = os.lstat(src)
    if stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(src), dst)
    else:
        os.mkfifo(dst, stat.S_IMODE(st.st_mode))
    fsync_folder(dst.parent)
    os.unlink(src)


def copy_across(src: Path, dst: Path) -> None:
    """A move between file systems that loses nothing: copied (times and mode too) to a hidden name beside
    ``dst``, fsynced, its sha256 compared with the source's, renamed to ``dst`` (never replacing), and only
    then is the source removed. A copy with other bytes is removed again and PipelineError raised."""
    tmp = temporary_name(dst, PART)  # .NAME.PID.part; a name near the longest failed 'File name too long'
    expected = file_digest(src)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))  # ours alone, removed below on failure
    try:
        with open(src, "rb") as f, open(tmp, "wb") as out:
            shutil.copyfileobj(f, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
        shutil.copystat(src, tmp)  # the same mtime: the folder's listing fingerprint is unchanged by a move back
        if not expected or file_digest(tmp) != expected:
            raise PipelineError(f"copying {src} to {dst} (another file system) gave other bytes; nothing was moved")
        rename_no_replace(tmp, dst)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
    fsync_folder(dst.parent)
    os.unlink(src)


#: The suffix of copy_across's hidden copy (``.NAME.PID.part`` beside the destination).
PART = ".part"


def partial_copies(dst: Path) -> list[Path]:
    """The hidden copies to ``dst`` that a ``copy_across`` killed part-way left (``.NAME.PID.part``): a later mover
    of the same file (an undo, a rerun) removes them, with the folder held."""
    return [tmp for tmp, _ in temporaries(dst, PART)]


def fsync_folder(folder) -> None:
    """Make a folder's new entries durable (where the system allows opening a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class FolderBusy(PipelineError):
    """A data folder another process is changing (or reading, for a changer): nothing is wrong, try later."""


#: Seconds a command waits for the folder lock before it gives up (an apply of a few hundred files takes
#: seconds; an extraction can take hours, so waiting for one longer helps nobody).
LOCK_WAIT_S = 10.0


@contextlib.contextmanager
def folder_lock(folder, exclusive: bool, busy: str, wait_s: float | None = None):
    """A ``flock`` on ``folder`` itself (exclusive or shared) while inside, waited for up to ``wait_s``
    (default LOCK_WAIT_S), then FolderBusy(``busy``); yields the locked descriptor (None: not locked). A folder
    that cannot be opened is not locked: the command's own checks say why."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)) if fcntl and folder else None
    except OSError:
        fd = None
    try:
        if fd is not None and not flock_within(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH,
                                                LOCK_WAIT_S if wait_s is None else wait_s, folder):
            raise FolderBusy(busy)
        yield fd
    finally:
        if fd is not None:
            os.close(fd)


def flock_within(fd: int, mode: int, wait_s: float, folder) -> bool:
    """Whether the lock was taken within ``wait_s``; True too where the file system has no locks (some
    network shares): said once, and the moves still never replace a file."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        except OSError as e:
            log.warning("cannot lock %s (%s): going on without the folder lock", folder, e.strerror or e)
            return True


def changing_folder(root):
    """Held by audit --apply and --undo while they plan and move: one changer, and no extraction reading."""
    return folder_lock(root, True, f"{root} is being read by an extract or changed by another audit --apply/--undo; "
                                   "try again when it has finished")


def reading_folder(root):
    """Held by extract from listing the folder to its last row: never a listing taken halfway through a change."""
    return folder_lock(root, False, f"{root} is being changed by audit --apply/--undo; try again when it has "
                                    "finished")


def link_on_the_way(path: Path, base: Path) -> str | None:
    """The first link between ``base`` and ``path`` (``path`` included) as 'a -> b', or None."""
    p = base
    for part in path.relative_to(base).parts:
        p = p / part
        if p.is_symlink():
            return f"{p.relative_to(base)} -> {os.readlink(p)}"
    return None
