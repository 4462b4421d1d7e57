"""The HDF5 feature cache: naming, the streaming writer, and the validating reader.

Layout (see README): datasets ``features`` (N, C, H, W), ``labels`` (N,) int64, ``paths`` (N,)
UTF-8, ``sha256`` (N,) the hex digest of each row's file bytes ('' = not known; caches made before it
have no such dataset), so a later extraction can reuse a row by content (``row_donors``),
``skipped/paths`` + ``skipped/reasons`` (files that could not be decoded), ``source/*``
(the listing of the data folder at creation, to tell what changed since); provenance as root
attributes, written once. Progress lives in the attributes ``rows`` and ``next_candidate``,
updated in place only after the rows they count are flushed and fsynced to disk.
"""
from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import h5py
import numpy as np

from ..config import POOLS, STORAGE_DTYPES, option_text
from ..errors import DiskFull, PipelineError, UsageError
from ..data.folders import POOL, TEST, ImageLoadError, regular_file_stat
from ..data.moves import flock_within
from ..files import quoted, require_folder, shown, signals_deferred, unwinding_on_signals

try:
    import fcntl
except ImportError:  # Windows: no writer lock (HDF5's own file lock still applies)
    fcntl = None

log = logging.getLogger(__name__)

FORMAT = "transfer-pipeline-feature-cache"
FORMAT_VERSION = 1
_STR = h5py.string_dtype("utf-8")

#: Attributes every cache must carry; readers refuse a file that lacks any of them.
REQUIRED_ATTRS = (
    "format", "format_version", "fingerprint", "backbone", "weights", "mean", "std", "transform",
    "classes", "seed", "n_requested", "data_root", "data_fingerprint", "dtype", "created",
    "versions", "rows", "next_candidate", "complete",
)
#: Types of the attributes code relies on (as read back by _attr); a hand-edited one is refused.
ATTR_TYPES = {"fingerprint": str, "backbone": str, "weights": str, "classes": str, "data_root": str,
              "data_fingerprint": str, "dtype": str, "created": str, "rows": int, "next_candidate": int,
              "complete": int, "n_requested": int, "seed": int}


#: the group holding an int8 cache's calibrated observers (``quantize.int8_network`` rebuilds the network)
OBSERVERS = "int8_observers"


def fingerprint(params: dict) -> str:
    """A stable hash of everything that determines a cache's contents."""
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()


def cache_file_name(backbone: str, n: int, key: str) -> str:
    """``<backbone>-n<N|all>-<key>.h5`` (a library prefix's ':' as '-': 'timm:resnet18' -> 'timm-resnet18')."""
    return f"{backbone.replace(':', '-')}-n{n if n else 'all'}-{key[:12]}.h5"


class CacheError(UsageError):
    """A file that is missing, corrupt, foreign or unusable as a feature cache."""


class CacheBusy(PipelineError):
    """A cache another process holds open for writing: not damaged, so never moved aside.

    A PipelineError, not a CacheError (ValueError): nothing the user typed is wrong (exit 1)."""


def open_h5(path: Path, mode: str, wait_s: float = 20.0, **kw) -> h5py.File:
    """h5py.File, waiting up to ``wait_s`` for another process's lock to go.

    After a SIGKILL the decoding workers of the killed extraction can hold the file (and its lock)
    for a few more seconds; waiting for them beats refusing.
    """
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return h5py.File(path, mode, **kw)
        except OSError as e:
            busy = getattr(e, "errno", None) == 11 or "unable to lock file" in str(e)
            if not busy:
                raise
            if time.monotonic() > deadline:
                raise CacheBusy(f"{path} is in use by another process (an extraction still running?); "
                                "try again when it has finished") from None
            time.sleep(0.5)


def _fsync(f: h5py.File) -> None:
    f.flush()
    try:
        os.fsync(f.id.get_vfd_handle())
    except (OSError, ValueError, TypeError):  # drivers without a file descriptor
        pass


def _lock(path: Path, wait_s: float):
    """An exclusive lock on ``<path>.lock`` (a file descriptor), waiting up to ``wait_s``; CacheBusy after.

    One writer per cache at a time, whether or not HDF5's own file locking is on, taken before
    the writer looks at the cache file, so two writers never both decide to create it.
    """
    if fcntl is None:
        return None
    lock = path.with_name(path.name + ".lock")
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise PipelineError(f"cannot create the lock file {lock}: {e.strerror or e}") from None
        if not flock_within(fd, fcntl.LOCK_EX, max(0.0, deadline - time.monotonic()), lock):
            os.close(fd)
            raise CacheBusy(f"{path} is being written by another process (an extraction still running?); "
                            "try again when it has finished")
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # its holder removed this lock file as we took it: lock the new one


def being_written(path: Path) -> bool:
    """Whether a writer holds ``<path>.lock`` now (see _lock): asked without waiting and without
    creating the lock file, so listing caches never stalls behind a running extraction."""
    if fcntl is None:
        return False
    try:
        fd = os.open(path.with_name(path.name + ".lock"), os.O_RDONLY)
    except OSError:
        return False  # no lock file: no writer
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # releases the probe's shared lock, if it got one


def _unlock(path: Path, fd) -> None:
    """Remove the lock file while still holding it (see _lock's inode check), then release it."""
    if fd is None:
        return
    try:
        os.unlink(path.with_name(path.name + ".lock"))
    except OSError:
        pass
    os.close(fd)


#: The temporary names a writer makes beside its cache, under its lock (``_create``, ``_repack``)
LEFTOVERS = (".creating-", ".resuming-")


def _remove_leftovers(path: Path) -> None:
    """Remove what a writer killed mid-create or mid-repack left beside ``path`` (``<name>.creating-PID``,
    ``<name>.resuming-PID``: a copy as large as the cache). Called with ``path``'s lock held: every writer
    makes them under it, so any there now is a dead one's; they stayed for good (nothing else removes them)."""
    for suffix in LEFTOVERS:
        for p in path.parent.glob(f"{glob.escape(path.name)}{suffix}*"):
            try:
                p.unlink()
                log.info("removed %s, left by an extraction killed while it wrote it", p)
            except OSError as e:  # kept: said, not fatal
                log.warning("cannot remove %s, left by a killed extraction (%s); remove it by hand",
                            p, e.strerror or e)


#: Room kept free beyond a batch's own bytes: HDF5's metadata, the chunk index, the final flush.
SPACE_MARGIN = 8 << 20


def ensure_space(path: Path, need: int) -> None:
    """Refuse (PipelineError, exit 1) to write ``need`` bytes into ``path`` when the disk cannot hold them.

    Checked before each batch because HDF5 does not survive running out of space mid-write: the
    file's objects then crash the process when freed. Stopping before it keeps every committed
    row, and the same command resumes once there is room.
    """
    free = shutil.disk_usage(path.parent).free
    if free < need + SPACE_MARGIN:
        raise DiskFull(f"cannot write {path}: no space left on the device ({free / 1e6:.1f} MB free, the next batch "
                       f"needs {(need + SPACE_MARGIN) / 1e6:.1f} MB with room for HDF5); free some space and run "
                       "the same command again: it resumes from the last committed row")


class CacheWriter:
    """Appends batches of rows to a cache file held open for the whole extraction.

    Creating: ``CacheWriter(path, attrs=..., source=listing)``. Resuming: the same call on an
    incomplete file with the same fingerprint truncates any rows past the committed count
    (a batch cut off by a crash) and continues from ``next_candidate``. A writer holds
    ``<path>.lock`` for its lifetime (CacheBusy when another has it for ``wait_s``), and a new
    file appears at ``path`` only complete with its attributes, so a concurrent writer or reader
    never sees, resets or moves aside a half-made one.
    """

    def __init__(self, path: Path, attrs: dict, source=None, chunk_rows: int = 16, wait_s: float = 20.0,
                 int8_observers: Optional[dict] = None):
        self.path = Path(path)
        self._observers = int8_observers
        self.chunk_rows = chunk_rows
        self.f = None
        self._lock_fd = _lock(self.path, wait_s)
        try:
            _remove_leftovers(self.path)
            if not self.path.exists():
                self._create(attrs, source)
            else:
                self._repack()
            self.f = open_h5(self.path, "r+", wait_s)
            self._resume(attrs)
        except BaseException:
            self.close()
            raise

    # -- set-up -----------------------------------------------------------------------------
    def _create(self, attrs: dict, source) -> None:
        """Write a new empty cache under a temporary name, fsync it, then rename it into place."""
        tmp = self.path.with_name(f"{self.path.name}.creating-{os.getpid()}")
        with unwinding_on_signals():  # a SIGTERM also removes the temporary file
            try:
                with h5py.File(tmp, "w") as f:
                    _init(f, attrs, source, self._observers)
                os.replace(tmp, self.path)
            finally:
                tmp.unlink(missing_ok=True)

    def _repack(self) -> None:
        """The cache being resumed, its committed part copied into a new file put in its place. A run killed
        mid-write (SIGKILL, a power cut) can leave HDF5's own bookkeeping past the last commit inconsistent: the
        resumed run's first write of a path then failed with "bad heap index" (tests/test_extract.py's SIGKILL
        test, now and then). The committed rows were fsynced at their commit; what came after is dropped anyway."""
        tmp = self.path.with_name(f"{self.path.name}.resuming-{os.getpid()}")
        with unwinding_on_signals():  # a SIGTERM also removes the temporary file
            try:
                with open_h5(self.path, "r") as src:
                    if src.attrs.get("sharded"):  # a virtual file over shards: complete, never resumed
                        return
                    with h5py.File(tmp, "w") as dst:
                        _copy_committed(src, dst)
                os.replace(tmp, self.path)
            finally:
                tmp.unlink(missing_ok=True)

    def _resume(self, attrs: dict) -> None:
        f = self.f
        if f.attrs.get("fingerprint") != attrs["fingerprint"]:
            raise CacheError(f"{self.path} belongs to another extraction (fingerprint differs); move it away")
        rows = self.rows
        for name in ("features", "labels", "paths", "sha256"):
            if name in f and f[name].shape[0] != rows:
                log.info("dropping %d uncommitted rows of %s", f[name].shape[0] - rows, name)
                f[name].resize(rows, axis=0)
        skipped = int(f.attrs.get("skipped_rows", 0))
        for name in ("skipped/paths", "skipped/reasons"):
            f[name].resize(skipped, axis=0)
        _fsync(f)

    @property
    def complete(self) -> bool:
        return bool(self.f.attrs["complete"])

    @property
    def rows(self) -> int:
        return int(self.f.attrs["rows"])

    @property
    def next_candidate(self) -> int:
        return int(self.f.attrs["next_candidate"])

    @property
    def skipped_rows(self) -> int:
        return int(self.f.attrs["skipped_rows"])

    # -- writing ----------------------------------------------------------------------------
    def _features(self, sample: np.ndarray) -> h5py.Dataset:
        if "features" not in self.f:
            shape = sample.shape[1:]
            self.f.create_dataset(
                "features", (0, *shape), sample.dtype, maxshape=(None, *shape),
                chunks=(self.chunk_rows, *shape),
            )
        ds = self.f["features"]
        if ds.shape[1:] != sample.shape[1:] or ds.dtype != sample.dtype:
            raise CacheError(f"batch of shape {sample.shape} {sample.dtype} does not fit {self.path}")
        return ds

    def append(self, features: np.ndarray, labels: Sequence[int], paths: Sequence[str],
               next_candidate: int, skipped: Sequence[tuple[str, str]] = (),
               digests: Optional[Sequence[str]] = None) -> None:
        """Write one batch, then commit it: the counts move only once the rows are on disk.

        ``features=None`` writes labels and paths only, for a file whose features exist already
        (a virtual dataset over shards). ``digests``: the rows' sha256 ('' for each when not given).
        """
        f, start, k = self.f, self.rows, len(labels)
        need = (features.nbytes if features is not None else 0) + 512 * (k + len(skipped))
        ensure_space(self.path, need)
        if k:
            if features is not None:
                ds = self._features(features)
                ds.resize(start + k, axis=0)
                ds[start:start + k] = features
            for d in (f["labels"], f["paths"]):
                d.resize(start + k, axis=0)
            f["labels"][start:start + k] = np.asarray(labels, np.int64)
            f["paths"][start:start + k] = list(paths)
            if "sha256" in f:  # a cache resumed from before the dataset existed goes on without it
                f["sha256"].resize(start + k, axis=0)
                f["sha256"][start:start + k] = list(digests) if digests is not None else [""] * k
        s0, m = self.skipped_rows, len(skipped)
        if m:
            for name, col in (("skipped/paths", 0), ("skipped/reasons", 1)):
                f[name].resize(s0 + m, axis=0)
                f[name][s0:s0 + m] = [s[col] for s in skipped]
        _fsync(f)
        with signals_deferred():  # the three counters move together, or a resume takes rows twice
            f.attrs.modify("rows", np.int64(start + k))
            f.attrs.modify("skipped_rows", np.int64(s0 + m))
            f.attrs.modify("next_candidate", np.int64(next_candidate))
            _fsync(f)
        log.debug("committed rows=%d skipped=%d next_candidate=%d", start + k, s0 + m, next_candidate)

    def finish(self, **attrs) -> None:
        from datetime import datetime

        for k, v in attrs.items():
            self.f.attrs[k] = v
        # when it became usable: an extraction started before another's and finished after it is the newer
        self.f.attrs["completed"] = datetime.now().astimezone().isoformat(timespec="microseconds")
        _fsync(self.f)
        self.f.attrs.modify("complete", np.int8(1))
        _fsync(self.f)

    def close(self) -> None:
        try:
            if self.f is not None and self.f.id.valid:
                self.f.close()  # may fail on a full disk: the committed rows are on disk already
        finally:
            if self._lock_fd is not None:
                _unlock(self.path, self._lock_fd)
                self._lock_fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _init(f: h5py.File, attrs: dict, source, int8_observers: Optional[dict] = None) -> None:
    """A new cache's attributes, empty datasets and source listing (and an int8 network's calibrated
    observers, so that the network can be rebuilt without its calibration images), fsynced."""
    for k, v in attrs.items():
        f.attrs[k] = v
    f.attrs["format"] = FORMAT
    f.attrs["format_version"] = FORMAT_VERSION
    f.attrs["rows"] = np.int64(0)
    f.attrs["next_candidate"] = np.int64(0)
    f.attrs["skipped_rows"] = np.int64(0)
    f.attrs["complete"] = np.int8(0)
    f.create_dataset("labels", (0,), np.int64, maxshape=(None,), chunks=(4096,))
    f.create_dataset("paths", (0,), _STR, maxshape=(None,), chunks=(4096,))
    f.create_dataset("sha256", (0,), _STR, maxshape=(None,), chunks=(4096,))
    f.create_dataset("skipped/paths", (0,), _STR, maxshape=(None,), chunks=(256,))
    f.create_dataset("skipped/reasons", (0,), _STR, maxshape=(None,), chunks=(256,))
    if source is not None:
        f.create_dataset("source/paths", data=[s.path for s in source.files], dtype=_STR)
        f.create_dataset("source/sizes", data=np.array([s.size for s in source.files], np.int64))
        f.create_dataset("source/mtimes_ns", data=np.array([s.mtime_ns for s in source.files], np.int64))
    for name, value in (int8_observers or {}).items():
        f.create_dataset(f"{OBSERVERS}/{name}", data=np.asarray(value))
    _fsync(f)


#: A cache's datasets of one entry a committed row, and of one a skipped file (the rest are copied whole).
ROW_DATASETS = ("features", "labels", "paths", "sha256")
SKIPPED_DATASETS = ("skipped/paths", "skipped/reasons")


def _copy_committed(src: h5py.File, dst: h5py.File, block_rows: int = 512) -> None:
    """``src``'s attributes and datasets into ``dst``, the row datasets only as far as its committed rows (and
    the skipped files' as far as its committed skips), in blocks; fsynced."""
    for k, v in src.attrs.items():
        dst.attrs[k] = v
    counts = {**dict.fromkeys(ROW_DATASETS, int(src.attrs["rows"])),
              **dict.fromkeys(SKIPPED_DATASETS, int(src.attrs.get("skipped_rows", 0)))}

    def copy(name: str, obj) -> None:
        if not isinstance(obj, h5py.Dataset):
            return
        parent, _, base = name.rpartition("/")
        if name not in counts:
            src.copy(obj, dst.require_group(parent) if parent else dst, base)
            return
        n = min(counts[name], obj.shape[0])
        d = dst.create_dataset(name, (n, *obj.shape[1:]), obj.dtype, maxshape=obj.maxshape, chunks=obj.chunks,
                               compression=obj.compression, compression_opts=obj.compression_opts)
        for i in range(0, n, block_rows):
            d[i:min(n, i + block_rows)] = obj[i:min(n, i + block_rows)]

    src.visititems(copy)
    _fsync(dst)


def read_int8_observers(path: str | os.PathLike) -> Optional[dict]:
    """The calibrated observers of the int8 network a cache was made with ({name: array}), or None
    (not int8, or a cache written before they were stored)."""
    with open_h5(Path(path), "r") as f:
        g = f.get(OBSERVERS)
        return {name: g[name][()] for name in g} if g is not None else None


# -- reading ------------------------------------------------------------------------------------
def _attr(a) -> object:
    if isinstance(a, bytes):
        return a.decode()
    if isinstance(a, np.generic):
        return a.item()
    if isinstance(a, np.ndarray):
        return a.tolist()
    return a


@dataclass
class CacheInfo:
    """A cache's attributes and committed size, read without loading features."""

    path: Path
    attrs: dict
    rows: int
    feature_shape: tuple
    size_bytes: int

    @property
    def classes(self) -> list[str]:
        return json.loads(self.attrs["classes"])

    @property
    def complete(self) -> bool:
        return bool(self.attrs["complete"])

    def summary(self) -> dict:
        a = self.attrs
        return {
            "path": str(self.path), "backbone": a["backbone"], "weights": a["weights"], "rows": self.rows,
            "n_requested": a["n_requested"], "classes": self.classes, "feature_shape": list(self.feature_shape),
            "dtype": a["dtype"], "size_bytes": self.size_bytes, "created": a["created"],
            "complete": self.complete, "skipped": a.get("skipped_rows", 0), "fingerprint": a["fingerprint"],
            "data_root": a["data_root"], "sharded": bool(a.get("sharded", 0)),
        }


def _validate(f: h5py.File, path: Path) -> CacheInfo:
    attrs = {k: _attr(v) for k, v in f.attrs.items()}
    if attrs.get("format") != FORMAT:
        raise CacheError(f"{path} is an HDF5 file but not a feature cache made by this tool")
    if attrs.get("format_version") != FORMAT_VERSION:
        raise CacheError(f"{path} has cache format version {attrs.get('format_version')}, "
                         f"this tool reads version {FORMAT_VERSION}; extract again")
    missing = [k for k in REQUIRED_ATTRS if k not in attrs]
    if missing:
        raise CacheError(f"{path} lacks the attributes {', '.join(missing)}; it is damaged or foreign")
    for k, want in ATTR_TYPES.items():
        if not isinstance(attrs[k], want) or isinstance(attrs[k], bool):
            raise CacheError(f"{path}: attribute {k!r} is {attrs[k]!r}, not a {want.__name__}; it is damaged or "
                             "was edited by hand")
    rows = int(attrs["rows"])
    try:
        classes = json.loads(attrs["classes"])
    except (TypeError, json.JSONDecodeError):
        raise CacheError(f"{path}: attribute 'classes' is not a JSON list") from None
    _check_values(path, attrs, classes)
    for name, ndim, kinds in (("labels", 1, "i"), ("paths", 1, "OS")):
        if name not in f or not isinstance(f[name], h5py.Dataset):
            raise CacheError(f"{path} has no dataset {name!r}; it is damaged or foreign")
        d = f[name]
        if d.ndim != ndim or d.dtype.kind not in kinds or d.shape[0] < rows:
            raise CacheError(f"{path}: dataset {name!r} has shape {d.shape} {d.dtype}, expected {rows} rows")
    shape: tuple = ()
    if rows:
        d = f.get("features")
        if not isinstance(d, h5py.Dataset) or d.ndim != 4 or d.dtype.name != attrs["dtype"] or d.shape[0] < rows:
            got = f"{d.shape} {d.dtype}" if isinstance(d, h5py.Dataset) else "missing"
            raise CacheError(f"{path}: dataset 'features' is {got}, expected ({rows}, C, H, W) {attrs['dtype']}")
        shape = d.shape[1:]
        labels = f["labels"][:rows]
        if labels.min() < 0 or labels.max() >= len(classes):
            raise CacheError(f"{path}: labels outside 0..{len(classes) - 1}")
    if attrs.get("sharded"):
        _check_shards(path, attrs)
    return CacheInfo(path, attrs, rows, shape, path.stat().st_size)


def _check_values(path: Path, attrs: dict, classes) -> None:
    """Refuse attribute values no extraction writes, so a hand-edited cache fails here, on open, before
    any work (not after a fit has written its checkpoint and ledger line)."""
    def bad(name: str, want: str):
        raise CacheError(f"{path}: attribute {name!r} is {attrs.get(name)!r:.80}, not {want}; it is damaged or "
                         "was edited by hand")

    # a pool of unlabelled photos (suggest), a test folder of one of a head's classes: one class
    fewest = 1 if attrs.get("purpose") in (POOL, TEST) else 2
    if not (isinstance(classes, list) and len(classes) >= fewest and all(isinstance(c, str) and c for c in classes)
            and len(set(classes)) == len(classes)):
        bad("classes", f"a list of at least {fewest} distinct class names")
    for name in ("rows", "next_candidate", "n_requested", "seed"):
        if attrs[name] < 0:
            bad(name, "0 or more")
    if attrs["dtype"] not in STORAGE_DTYPES:
        bad("dtype", f"one of {', '.join(STORAGE_DTYPES)}")
    if attrs.get("pool", "none") not in POOLS:
        bad("pool", f"one of {', '.join(POOLS)}")
    for name in ("mean", "std"):
        v = np.asarray(attrs[name], dtype=object)
        try:
            ok = v.shape == (3,) and np.isfinite(v.astype(np.float64)).all() and (name == "mean" or (v > 0).all())
        except (TypeError, ValueError):
            ok = False
        if not ok:
            bad(name, "3 finite numbers" + (" above 0" if name == "std" else ""))
    try:
        from .provenance import Provenance

        pre = Provenance.from_cache_attrs(attrs).preprocessing
    except (KeyError, TypeError, ValueError, AttributeError):
        bad("preprocessing", "a preprocessing record")
    if [round(x, 6) for x in pre.mean] != [round(float(x), 6) for x in attrs["mean"]]:
        bad("mean", f"the preprocessing's mean {list(pre.mean)}")
    try:
        created_at(attrs["created"])
    except ValueError:
        bad("created", "an ISO 8601 time")


def created_at(created: str) -> float:
    """A cache's ``created`` attribute as a POSIX time, so times written under any UTC offset compare as
    instants (an offset-less one is read as local time, as it was written)."""
    from datetime import datetime

    return datetime.fromisoformat(created).timestamp()


def _check_shards(path: Path, attrs: dict) -> None:
    """Refuse a sharded cache whose shard files are not all there and complete.

    HDF5 reads a missing virtual-dataset source as fill values without any error, so this is the
    only thing standing between a lost shard and silently wrong features.
    """
    try:
        shards = json.loads(attrs["shards"])
    except (TypeError, json.JSONDecodeError):
        raise CacheError(f"{path}: attribute 'shards' is not a JSON list") from None
    again = attrs.get("command") or "the same torchrun extract command"
    for s in shards:
        p = path.parent / s["path"]
        if not p.is_file():
            raise CacheError(f"{path} is a sharded cache and its shard {p} is missing; "
                             f"run `{again}` again to redo it (or copy the shard there)")
        try:
            with h5py.File(p, "r") as g:
                ok = (_attr(g.attrs.get("fingerprint")) == attrs["fingerprint"] and bool(g.attrs.get("complete"))
                      and int(g.attrs.get("rows", -1)) >= s["rows"])
                place = _shard_place(g, p, path)
        except (OSError, TypeError, ValueError):
            ok, place = False, None
        if not ok:
            raise CacheError(f"{path}: its shard {p} is damaged, incomplete or from another extraction; "
                             f"run `{again}` again")
        if place:
            raise CacheError(f"{path}: its shard {p} {place} (copied over another shard?); run `{again}` again")


def _shard_place(g: h5py.File, p: Path, path: Path) -> Optional[str]:
    """Why shard file ``g`` (at ``p``) is not the part its name says (part-<first>-<stop>.h5 of
    ``path``), or None. Every shard carries the same fingerprint, so only these tell them apart."""
    m = re.fullmatch(r"part-(\d+)-(\d+)\.h5", p.name)
    if not m:
        return "is not named part-<first>-<stop>.h5"
    got = (_attr(g.attrs.get("shard_first")), _attr(g.attrs.get("shard_stop")), _attr(g.attrs.get("shard_of")))
    want = (int(m[1]), int(m[2]), path.name)
    if got != want:
        return f"holds candidates {got[0]}..{got[1]} of {got[2]!r}, its name says {want[0]}..{want[1]} of {want[2]!r}"
    return None


def shard_paths(info: CacheInfo) -> list[Path]:
    """The shard files a sharded cache reads its features from (empty for an ordinary cache)."""
    if not info.attrs.get("sharded"):
        return []
    return [info.path.parent / s["path"] for s in json.loads(info.attrs["shards"])]


def write_virtual_cache(path: Path, attrs: dict, source, shards: Sequence[tuple[str, int]], feature_shape: tuple,
                        dtype: str, labels, paths, skipped, next_candidate: int) -> None:
    """Write a complete cache whose ``features`` is a virtual dataset over shard files.

    ``shards`` are (path relative to ``path``'s folder, rows), in row order; labels, paths and
    skipped files are copied in (they are small). Written under a temporary name, then renamed.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    layout = h5py.VirtualLayout((len(labels), *feature_shape), dtype)
    at = 0
    for rel, k in shards:
        if k:
            layout[at:at + k] = h5py.VirtualSource(rel, "features", shape=(k, *feature_shape), dtype=dtype)
            at += k
    with CacheWriter(tmp, attrs, source=source) as w:
        w.f.create_virtual_dataset("features", layout, fillvalue=np.nan)
        w.append(None, labels, paths, next_candidate, skipped)
        w.finish(rows_final=len(labels), sharded=np.int8(1),
                 shards=json.dumps([{"path": rel, "rows": k} for rel, k in shards]))
    os.replace(tmp, path)


@dataclass(frozen=True)
class ConsolidateResult:
    """caches --consolidate's answer: the one ordinary cache file now in the sharded cache's place."""

    cache: str
    rows: int
    size_bytes: int
    shards: list  # the shard files it was copied from: no longer needed, left for the user to remove


def consolidate(path: str | os.PathLike, block_rows: int = 512, wait_s: float = 20.0) -> ConsolidateResult:
    """Copy a sharded cache into one ordinary cache file, in blocks, and put it in the virtual file's place.

    The copy is written beside it under a temporary name and renamed over it only when complete,
    so an interrupted consolidation leaves the sharded cache as it was. Shards are left alone. It holds the
    cache's writer lock: two at once wrote one temporary file together.
    """
    fd = _lock(Path(path), wait_s)
    try:
        return _consolidate(path, block_rows)
    finally:
        _unlock(Path(path), fd)


def _consolidate(path, block_rows: int) -> ConsolidateResult:
    info = read_info(path)
    if not info.attrs.get("sharded"):
        raise UsageError(f"{info.path} is not a sharded cache; nothing to consolidate")
    shards = shard_paths(info)
    tmp = info.path.with_name(info.path.name + ".consolidating")
    tmp.unlink(missing_ok=True)
    with h5py.File(info.path, "r") as src, h5py.File(tmp, "w") as dst:
        for k, v in src.attrs.items():
            if k not in ("sharded", "shards"):
                dst.attrs[k] = v
        dst.attrs["complete"] = np.int8(0)
        dst.attrs["consolidated_from"] = src.attrs["shards"]
        for name in src:
            if name != "features":
                src.copy(src[name], dst, name)
        s = src["features"]
        d = dst.create_dataset("features", s.shape, s.dtype, maxshape=(None, *s.shape[1:]), chunks=(16, *s.shape[1:]))
        for i in range(0, s.shape[0], block_rows):
            d[i:i + block_rows] = s[i:i + block_rows]
        _fsync(dst)
        dst.attrs.modify("complete", np.int8(1))
        _fsync(dst)
    os.replace(tmp, info.path)
    return ConsolidateResult(cache=str(info.path), rows=info.rows, size_bytes=info.path.stat().st_size,
                             shards=[str(p) for p in shards])


def read_info(path: str | os.PathLike, wait_s: float = 20.0) -> CacheInfo:
    """Validate a cache file and return its attributes (raises CacheError with one clear line);
    CacheBusy when another process holds it for ``wait_s`` (see open_h5)."""
    path = Path(path)
    if not path.is_file():
        raise CacheError(f"cache {quoted(str(path))} {_not_a_file(path)}")
    if not h5py.is_hdf5(path):
        raise CacheError(f"{shown(str(path))} is not an HDF5 file (damaged, or not a feature cache)")
    try:
        with open_h5(path, "r", wait_s) as f:
            return _validate(f, path)
    except (CacheError, CacheBusy):
        raise
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise CacheError(f"{path} cannot be read as a feature cache ({e})") from None


def row_indices(rows, n: int) -> np.ndarray:
    """``rows`` as int64 row numbers: whole numbers, or a boolean mask of one value per row (numpy's idiom,
    ``cache.labels == 0``), whose True rows are meant; a mask read as the numbers 0 and 1, or 2.7 read as 2,
    gave other rows without a word. A slice is its rows (``cache.read_features(slice(0, 10))``: it was an IndexError,
    'got object')."""
    if isinstance(rows, slice):
        return np.arange(n, dtype=np.int64)[rows]
    arr = np.asarray(rows)
    if arr.dtype == bool:
        if arr.shape != (n,):
            raise IndexError(f"a boolean mask of rows needs one value per row ({n}), got shape {arr.shape}")
        return np.flatnonzero(arr)
    if arr.size and arr.dtype.kind not in "iu":
        raise IndexError(f"row indices must be whole numbers (or a boolean mask of the {n} rows), got {arr.dtype}")
    return arr.astype(np.int64).ravel()


def _not_a_file(path: Path) -> str:
    """Why a cache path is not a file: missing, or what it is (a folder, a pipe, a dangling or looping link)."""
    if not os.path.lexists(path):
        return "does not exist"
    try:
        regular_file_stat(path)
    except ImageLoadError as e:
        return f"is {e.reason}"
    return "is not a file"


def finishing_command(info: CacheInfo) -> str:
    """The command that finishes an incomplete cache: the extract that made it."""
    return info.attrs.get("command") or "the same extract command"


def unfinished(info: CacheInfo) -> str:
    """What an incomplete cache holds and the command that finishes it."""
    return (f"cache {info.path} is incomplete ({info.rows} of {info.attrs['n_requested'] or 'all'} rows); finish it by "
            f"running `{finishing_command(info)}` again")


class FeatureCache:
    """Read access to a complete, validated cache: labels in memory, features streamed in blocks (the one
    reader of a cache file: the stages' and the API's ``Cache``'s)."""

    def __init__(self, path: str | os.PathLike, allow_incomplete: bool = False):
        self.info = read_info(path)
        if not self.info.complete and not allow_incomplete:
            raise CacheError(unfinished(self.info))
        if self.info.rows == 0 and not allow_incomplete:  # the API's handle reads an empty one as empty
            raise CacheError(f"cache {self.info.path} holds no rows")
        self.path = self.info.path
        self.f = open_h5(self.path, "r")  # blocks are read whole: a bigger chunk cache only adds copies
        self.features = self.f["features"]
        self.n = self.info.rows
        self.labels = self.f["labels"][: self.n]
        self.classes = self.info.classes
        self.feature_shape = tuple(self.features.shape[1:])

    @property
    def attrs(self) -> dict:
        return self.info.attrs

    @property
    def paths(self) -> list[str]:
        return [p.decode() if isinstance(p, bytes) else p for p in self.f["paths"][: self.n]]

    def skipped(self) -> list[tuple[str, str]]:
        return _skipped(self.f)

    @property
    def digests(self) -> Optional[list[str]]:
        """Each row's sha256 of its file's bytes ('' where unknown); None for a cache made before they were kept."""
        return read_digests(self.f, self.n)

    def row_digests(self, rows=None) -> list[str]:
        """The sha256 of each of ``rows`` (all by default): those the cache keeps, the others (a cache made
        before it kept them) hashed from the files now; '' for a file gone or unreadable."""
        from ..data.image_reader import file_digest

        rows = range(self.n) if rows is None else rows
        known, paths, root = self.digests, self.paths, Path(self.attrs["data_root"])
        return [(known[i] if known is not None else "") or file_digest(root / paths[i]) for i in rows]

    def iter_blocks(self, indices: np.ndarray, block_rows: int, shuffle_blocks: Optional[np.random.Generator] = None
                    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Yield (rows, block, sel) for the sorted ``indices``, one contiguous block of the file at a time.

        ``block[sel]`` are the features of ``rows``. Memory stays at one block, read into a reused
        buffer (valid until the next iteration) whatever the cache size; with ``shuffle_blocks``
        the blocks come in random order.
        """
        indices = np.sort(np.asarray(indices))
        starts = np.arange(0, self.n, block_rows)
        if shuffle_blocks is not None:
            starts = shuffle_blocks.permutation(starts)
        buf = np.empty((min(block_rows, self.n), *self.feature_shape), self.features.dtype)
        for s in starts:
            lo, hi = np.searchsorted(indices, [s, s + block_rows])
            if lo == hi:
                continue
            stop = min(s + block_rows, self.n)
            block = buf[:stop - s]
            self.features.read_direct(block, np.s_[s:stop])
            yield indices[lo:hi], block, indices[lo:hi] - s

    def read_rows(self, rows: Optional[Sequence[int]] = None, dtype=np.float32, block_rows: int = 2048) -> np.ndarray:
        """Rows of features as one array (all rows when ``rows`` is None; negative ones count from the end), in
        the order asked for, read block by block."""
        n = self.n
        idx = np.arange(n) if rows is None else row_indices(rows, n)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"row indices must be in [{-n}, {n}), the cache has {n} rows")
        wanted, inverse = np.unique(np.where(idx < 0, idx + n, idx), return_inverse=True)
        out = np.empty((len(wanted), *self.feature_shape), dtype)
        i = 0
        for got, block, sel in self.iter_blocks(wanted, block_rows):
            out[i:i + len(got)] = block[sel]
            i += len(got)
        return out[inverse]

    def iter_batches(self, indices: np.ndarray, batch_size: int, block_rows: int,
                     rng: Optional[np.random.Generator] = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (rows, features) minibatches over ``indices``: in row order, or with ``rng`` shuffled.

        The shuffle is chunk-level: blocks in random order, rows shuffled within each, so reads
        stay sequential on disk and only one minibatch is gathered (copied) at a time.
        """
        for rows, block, sel in self.iter_blocks(indices, block_rows, rng):
            order = rng.permutation(len(rows)) if rng is not None else np.arange(len(rows))
            for b in range(0, len(order), batch_size):
                pick = np.sort(order[b:b + batch_size])  # ascending addresses: a faster gather, same batch
                yield rows[pick], block[sel[pick]]

    def close(self) -> None:
        if self.f.id.valid:
            self.f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_digests(f: h5py.File, rows: int) -> Optional[list[str]]:
    """The first ``rows`` entries of a cache file's ``sha256`` dataset, or None when it has none (or too few)."""
    d = f.get("sha256")
    if not isinstance(d, h5py.Dataset) or d.shape[0] < rows:
        return None
    return [x.decode() if isinstance(x, bytes) else x for x in d[:rows]]


def _skipped(f: h5py.File) -> list[tuple[str, str]]:
    k = int(f.attrs.get("skipped_rows", 0))
    p, r = f["skipped/paths"][:k], f["skipped/reasons"][:k]
    return [(a.decode(), b.decode()) for a, b in zip(p, r)]


def read_skipped(path: str | os.PathLike) -> list[tuple[str, str]]:
    """(path, reason) of the files a cache (complete or not, with rows or without) could not use."""
    with open_h5(Path(path), "r") as f:
        return _skipped(f)


def source_changes(info: CacheInfo) -> Optional[str]:
    """Describe how the data folder changed since the cache was made, or None if it did not."""
    from ..data.folders import list_folder

    try:
        now = list_folder(info.attrs["data_root"], str(info.attrs.get("purpose", "")))
    except ValueError as e:
        return f"the data folder cannot be listed now ({e})"
    if now.fingerprint() == info.attrs["data_fingerprint"]:
        return None
    with h5py.File(info.path, "r") as f:
        if "source" not in f:
            return "the data folder changed (no listing stored to say how)"
        old = dict(zip((p.decode() for p in f["source/paths"][:]),
                       zip(f["source/sizes"][:].tolist(), f["source/mtimes_ns"][:].tolist())))
    new = {s.path: (s.size, s.mtime_ns) for s in now.files}
    added = sorted(set(new) - set(old))
    removed = sorted(set(old) - set(new))
    modified = sorted(p for p in set(new) & set(old) if new[p] != old[p])
    parts = []
    for what, items in (("added", added), ("removed", removed), ("modified", modified)):
        if items:
            parts.append(f"{len(items)} {what} (e.g. {', '.join(items[:3])})")
    return "the data folder changed since extraction: " + "; ".join(parts or ["class folders differ"])


def list_caches(cache_dir: str | os.PathLike) -> tuple[list[CacheInfo], list[tuple[Path, str]]]:
    """Valid caches under ``cache_dir`` (newest first) and the files that are not, with why.

    One bad or busy file is reported in the second list, never hiding the others. Never waits:
    a cache being written (its writer's lock held, or the file held open) is reported as busy.
    """
    good, bad = [], []
    d = require_folder(cache_dir, "--cache-dir")
    for p in sorted(d.glob("*.h5")) if d.is_dir() else []:
        if being_written(p):
            bad.append((p, "being written by another process (an extraction still running?); listed once "
                           "it has finished"))
            continue
        try:
            good.append(read_info(p, wait_s=0))
        except (CacheError, CacheBusy) as e:
            bad.append((p, str(e)))
    good.sort(key=_made_at, reverse=True)  # instants, whatever the TZ
    return good, bad


def _made_at(info: CacheInfo) -> tuple:
    """When a cache was made, newest first in ``list_caches``: ``created`` is whole seconds, so two caches made in one
    second were ordered by their file names (a hash): the one completed later (to the microsecond) is the newer."""
    try:
        completed = created_at(info.attrs["completed"])
    except (KeyError, TypeError, ValueError):  # not complete, or made before the stamp
        completed = 0.0
    return created_at(info.attrs["created"]), completed


def claim_for_training(info: CacheInfo) -> None:
    """Make a cache that ``fit-head --test-data`` made (purpose 'test') an ordinary one, because a user's
    ``extract`` just asked for it (a hit): its purpose is cleared and the attribute ``claimed`` set to
    now, so it is the default training cache from then on (see newest_cache). A cache another process
    is writing, or a read-only one, stays as it is (a warning says so): the hit itself never fails."""
    from datetime import datetime

    # to the microsecond: a cache made in the same second as the claim (created's stamp is whole seconds) is older
    fd, stamp = None, datetime.now().astimezone().isoformat(timespec="microseconds")
    try:
        fd = _lock(info.path, wait_s=2.0)
        with open_h5(info.path, "r+", wait_s=2.0) as f:
            f.attrs["purpose"] = ""
            f.attrs["claimed"] = stamp
            _fsync(f)
        info.attrs["purpose"], info.attrs["claimed"] = "", stamp
    except (OSError, PipelineError) as e:
        log.warning("%s stays %s (%s): pass it with %s to train on it", info.path,
                    "made for testing" if info.attrs.get("purpose") else "older than the default cache", e,
                    option_text("cache"))
    finally:
        _unlock(info.path, fd)


def claim_default(cache_dir: str | os.PathLike, path: str | os.PathLike) -> None:
    """Make the complete cache ``path`` the default of ``cache_dir`` (``newest_cache``) when it is not: audit
    --undo's refresh hits the cache the folder had before --apply, and fit-head without --cache took the newer
    cache of the relabelled folder (stale since the undo), training on the labels the undo took back."""
    if Path(newest_cache(cache_dir).path).resolve() != Path(path).resolve():
        claim_for_training(read_info(path))


def default_time(info: CacheInfo) -> float:
    """When a cache became a candidate for the default: completed (made, for caches made before the stamp),
    or claimed from testing by an extract, whichever is later."""
    times = [created_at(info.attrs["created"])]
    for stamp in ("completed", "claimed"):
        try:
            times.append(created_at(info.attrs[stamp]))
        except (KeyError, TypeError, ValueError):  # not stamped (or a hand-edited stamp)
            pass
    return max(times)


def newest_cache(cache_dir: str | os.PathLike) -> "CacheInfo":
    """The default cache of commands run without --cache: the newest complete cache in ``cache_dir``,
    never one made for testing (fit-head --test-data's, purpose 'test', until a user's extract hits
    it: claim_for_training) nor a pool of unlabelled photos (suggest's, purpose 'pool'). Newest by when it
    was completed (or made, before that was stamped), or claimed; busy and unreadable files skipped."""
    good, bad = list_caches(cache_dir)
    good = [i for i in good if not i.attrs.get("purpose")]  # a test set or a pool to label: never trained on by default
    good.sort(key=default_time, reverse=True)
    complete = [i for i in good if i.complete]
    busy = [p for p, _ in bad if being_written(p)]  # an extract still writing what the user may mean
    if busy:
        written = (f"{busy[0]}{f' (and {len(busy) - 1} more)' if len(busy) > 1 else ''} is being written by another "
                   "process (an extraction still running?)")
        if not complete:  # it said 'run `python cli.py extract` first', the extract running beside it
            raise CacheBusy(f"no complete feature cache in {str(cache_dir)!r} yet: {written}; run this again when it "
                            f"has finished, or pass {option_text('cache')}")
        log.warning("%s; using %s, the newest complete cache (run again once it has finished to use it, or pass %s)",
                    written, complete[0].path, option_text("cache"))
    if not complete:  # an incomplete one: the command that finishes it, as --cache names it
        raise CacheError(f"no complete feature cache in {str(cache_dir)!r}; "
                         + (unfinished(good[0]) if good else "run `python cli.py extract` first"))
    if not good[0].complete:
        log.warning("the newest cache %s is incomplete (finish it with `%s`); using %s", good[0].path,
                    finishing_command(good[0]), complete[0].path)
    return complete[0]


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
