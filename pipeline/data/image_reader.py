"""The reader: image files -> ``Item``s (decoded and preprocessed in background processes, or in turns
with a network on the CPU) -> ``Batch``es.

Every stage that reads images (extract, train, evaluate, predict) goes through here, so they
agree on what a bad file is: an item whose ``image`` is None carries the reason in ``error``,
and a batch keeps its bad items beside the good ones (reported, never fatal).
"""
from __future__ import annotations

import hashlib
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple, Optional, Sequence

from ..files import one_line
from .folders import FRAMES, ImageLoadError, jpeg_bytes, load_rgb

#: A large JPEG is decoded at a reduced DCT scale (1/2, 1/4, 1/8) keeping its shorter side at least
#: this many times the transform's resize size, so the transform's antialiased resize still filters.
#: 2, not 1: with 1 a JPEG can decode to just above the resize size (1080 -> 270 for 256), which the
#: resize then hardly filters; VGG-16 features of detailed 1080p images fell to cosine 0.986-0.988 vs
#: a full decode (min over 8 images, two runs), against >= 0.9987 with 2 (bench/bench_decode.py).
JPEG_DRAFT_MARGIN = 2
#: What changes decoded pixels besides the libraries: 1 = always decoded at full size,
#: 2 = large JPEGs decoded reduced (JPEG_DRAFT_MARGIN = 2), 3 = photos turned upright by their EXIF
#: Orientation and float gray scaled by its range (``portable``). For the keys of caches made from them:
#: a cache of another version is never resumed, reused or compared with this one (``provenance.differences``).
DECODE_VERSION = 3


def draft_short_side(transform) -> Optional[int]:
    """The shorter side a JPEG may be reduced to before ``transform`` (see ``folders.load_rgb``), or None.

    Only for a transform that starts with an antialiased resize of the shorter side to one size
    (torchvision's ``ImageClassification``, what weights' ``transforms()`` return): the image
    that resize gets then differs only by the decoder's reduction. Anything else (train's
    augmentation, which crops first; a resize to a fixed (h, w)) decodes at full size.
    """
    size = getattr(transform, "resize_size", None)
    if isinstance(size, (list, tuple)) and len(size) == 1:
        size = size[0]
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0 or not getattr(transform, "antialias", False):
        return None
    return JPEG_DRAFT_MARGIN * size


def load_transformed(path, transform):
    """``transform(load_rgb(path))``, letting a large JPEG decode at a reduced scale when ``transform``
    allows it, exactly as ``ImageListDataset`` decodes (for the single files that do not go through it)."""
    return transform(load_rgb(path, draft_short_side(transform)))


class Item(NamedTuple):
    """One candidate image, in the order it was asked for (a NamedTuple: cheap to send between processes)."""

    position: int  # index into the list of candidates (for extract: the stratified selection order)
    image: object  # preprocessed (3, H, W) float tensor; raw JPEG bytes (1-D uint8) for device decoding; None if bad
    label: int  # class index (-1 when unknown, as for predict)
    path: str  # relative to the dataset's root
    error: Optional[str] = None  # why the file could not be used
    digest: str = ""  # sha256 of the file's bytes, when the dataset was asked for digests
    reused: bool = False  # not decoded: a cache already holds the features of this content (extract)
    frames: int = 1  # the frames its file holds (an animated GIF, a multi-page TIFF): the first alone is used

    @property
    def ok(self) -> bool:
        return self.image is not None or self.reused


class ImageListDataset:
    """(path, label) pairs -> Items, decoding with ``transform``; positions start at ``start``.

    With ``raw_jpeg``, JPEGs come back undecoded (their bytes as a 1-D uint8 tensor) for
    ``device_decode``; everything else is decoded here as usual. A large JPEG decodes at a
    reduced scale when ``transform`` allows it (``draft_short_side``), as in ``load_transformed``.
    With ``digests`` each Item carries its file's sha256 (hashed here, in the worker), and a file
    whose digest is in ``known`` is not decoded at all (``reused``: extract copies its cached row).
    """

    def __init__(self, root: Path, items: Sequence[tuple[str, int]], transform, start: int = 0,
                 raw_jpeg: bool = False, digests: bool = False, known: frozenset = frozenset()):
        self.root, self.items, self.transform, self.start, self.raw_jpeg = root, items, transform, start, raw_jpeg
        self.min_short_side = draft_short_side(transform)
        self.digests, self.known = digests or bool(known), known

    def __len__(self):
        return len(self.items) - self.start

    def __getitem__(self, i) -> Item:
        pos = self.start + i
        path, label = self.items[pos]
        digest = file_digest(self.root / path) if self.digests else ""
        if digest and digest in self.known:
            return Item(pos, None, label, path, None, digest, True)
        item = self._decode(pos, path, label)
        return item._replace(digest=digest) if digest else item

    def _decode(self, pos: int, path: str, label: int) -> Item:
        try:
            if self.raw_jpeg:
                import torch

                data = jpeg_bytes(self.root / path)
                if data is not None:
                    return Item(pos, torch.frombuffer(bytearray(data), dtype=torch.uint8), label, path)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # PIL's EXIF warnings: the image itself decoded
                rgb = load_rgb(self.root / path, self.min_short_side)
                return Item(pos, self.transform(rgb), label, path, frames=rgb.info.get(FRAMES, 1))
        except ImageLoadError as e:
            return Item(pos, None, label, path, e.reason)


def first_frames_line(found: list) -> str:
    """The one warning for the photos read from their first frame alone, ``found``: (path, frames) each; '' for
    none. An animated GIF, PNG or WebP, a multi-page TIFF became one row of its first picture without a word."""
    if not found:
        return ""
    path, frames = min(found)
    return (f"{len(found)} {'file holds' if len(found) == 1 else 'files hold'} more than one frame (an animated GIF, "
            f"PNG or WebP, a multi-page TIFF) and {'was' if len(found) == 1 else 'were'} read from the first frame "
            f"alone (e.g. {one_line(path)}: {frames} frames); save the frame you mean as its own photo to use another")


def first_frame_note(frames: int) -> Optional[str]:
    """A row's ``note`` for a photo read from its first frame alone (predict's, serve's), None for every other."""
    if frames <= 1:
        return None
    return (f"the first of its {frames} frames was classified (an animated GIF, PNG or WebP, a multi-page TIFF); "
            "save the frame you mean as its own photo to use another")


def file_digest(path) -> str:
    """sha256 of a file's bytes ('' when it cannot be read: decoding then reports why)."""
    h = hashlib.sha256()
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a pipe put there since the listing: never opened
            return ""
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError:
        return ""
    return h.hexdigest()


def _as_list(chunk):
    return chunk


def quiet_hangups(worker_id: int) -> None:
    """A decoding worker's ``worker_init_fn``: the main process ending (SIGTERM, Ctrl-C) while it took a batch's
    tensors from this worker dropped the connection that multiprocessing's resource sharer (a thread here) was
    answering, and that thread's traceback (ConnectionResetError) followed the one line the main process said.
    A connection the other end dropped is said nothing of here; every other error still is."""
    import sys

    previous = sys.excepthook

    def hook(kind, value, tb):
        if not issubclass(kind, (ConnectionError, EOFError)):
            previous(kind, value, tb)

    sys.excepthook = hook


def item_loader(dataset: ImageListDataset, workers: int, persistent: bool = False):
    """A DataLoader yielding lists of Items in order, decoded by ``workers`` background processes.

    The workers start when iteration starts: begin iterating before opening any file for writing,
    since forked workers inherit open descriptors (and HDF5's lock on them).
    """
    from torch.utils.data import DataLoader

    return DataLoader(dataset, batch_size=16, num_workers=workers, collate_fn=_as_list, worker_init_fn=quiet_hangups,
                      prefetch_factor=4 if workers else None, persistent_workers=persistent and workers > 0)


def iter_items(source) -> Iterator[Item]:
    """The Items of an ``item_loader`` (or a dataset and a worker count via ``read_items``), one by one."""
    return (item for chunk in iter(source) for item in chunk)


def read_items(dataset: ImageListDataset, workers: int, device=None, chunk: int = 32) -> Iterator[Item]:
    """The dataset's Items in order, for a network on ``device`` (a ``torch.device``; None: not known).

    ``workers`` -1 (every command's default) with a network on the CPU: decoded in this process by one thread
    per core (at most 8), ``chunk`` at a time, in turns with the network or beside it, whichever this machine
    runs faster (``CpuReader``). Otherwise ``resolve_workers(workers)`` background processes, started right
    away, decode while the network runs.
    """
    from ..devices import resolve_workers

    if workers == -1 and device is not None and device.type == "cpu":
        return CpuReader(dataset, resolve_workers(-1), chunk)  # a thread per core, at most 8 as processes
    return iter_items(item_loader(dataset, resolve_workers(workers)))


#: ``CpuReader`` tries decoding beside the network only when decoding in turns takes at least this share of
#: a batch's time: beside it can at best hide that share, and trying costs a few batches.
PROBE_FROM_SHARE = 0.05


class CpuReader:
    """The dataset's Items in order, ``chunk`` at a time, decoded by a pool of ``threads`` threads of this
    process (PIL and hashlib release the GIL), for a network on the CPU: in turns with it, or beside it.

    In turns ('turns'), a chunk is decoded only once the previous one has been taken, so the network runs
    on every core alone: it uses them all already, and decoding beside it takes cores from it and, worse,
    stalls its threads at their next barrier when it pre-empts one (VGG-16 int8 + compile on a 2-core EPYC
    ran 11 % slower beside two decoding processes; in turns decoding cost its own 6 % only). But a network
    that leaves cores idle (many short parallel loops: a fast compiled int8 network on AMX, where decoding
    in turns was 21 % of the time) hides decoding beside it ('beside': the next chunk is decoded while the
    network runs on this one). 'auto' measures which, on this machine, this network: a batch's time
    (from one chunk's request to the next) in turns and beside, after the first batch (compiling);
    decoding under ``PROBE_FROM_SHARE`` of a batch in turns is left in turns without trying.
    ``choice`` says what was decided and why.
    """

    def __init__(self, dataset: ImageListDataset, threads: int, chunk: int, mode: str = "auto"):
        self.dataset, self.threads, self.chunk = dataset, max(1, threads), max(1, chunk)
        self.mode = mode  # 'turns', 'beside', or 'auto' (probing, then one of the two)
        self.choice = f"decoding {'in turns' if mode != 'beside' else 'beside'}" + (
            " (too few batches to try beside)" if mode == "auto" else "")
        self.cycles: dict = {"turns": [], "beside": []}  # a batch's seconds, in steady turns / beside
        self._items = self._read()

    def __iter__(self):
        return self

    def __next__(self) -> Item:
        return next(self._items)

    def _plan(self, k: int) -> str:
        """How chunk ``k`` is read: 'turns' or 'beside' (decode chunk k + 1 while the network runs on k).
        Probing in 'auto': turns for chunks 0-1 (0 compiles), beside for 2-3, turns for 4-5; batch 1 and 5 are
        steady turns, batch 3 steady beside (it was decoded beside, and the next one is)."""
        if self.mode != "auto":
            return self.mode
        return "beside" if k in (2, 3) else "turns"

    def _decide(self, k: int, cycle: float, wait: float, mode: str, prefetched: bool) -> None:
        """Note chunk ``k``'s batch time (``cycle``, ``wait`` of it decoding) and decide once enough is known."""
        if self.mode != "auto" or k == 0:
            return
        if mode == "turns" and not prefetched:
            self.cycles["turns"].append(cycle)
            if k == 1 and wait < PROBE_FROM_SHARE * cycle:
                share = 100 * wait / cycle
                self._settle("turns", f"in turns: it took {f'{share:.0f} %' if share >= 0.5 else 'under 1 %'} of "
                                      "a batch")
        elif mode == "beside" and prefetched:
            self.cycles["beside"].append(cycle)
        if k == 5:
            turns, beside = sum(self.cycles["turns"]) / len(self.cycles["turns"]), self.cycles["beside"][0]
            self._settle("beside" if beside < turns else "turns",
                         f"{'beside' if beside < turns else 'in turns'}: {beside:.2f} s a batch beside the network, "
                         f"{turns:.2f} s in turns")

    def _settle(self, mode: str, why: str) -> None:
        import logging

        self.mode, self.choice = mode, f"decoding {why}"
        logging.getLogger(__name__).info("%s", self.choice)

    def _read(self) -> Iterator[Item]:
        import time
        from concurrent.futures import ThreadPoolExecutor

        starts = list(range(0, len(self.dataset), self.chunk))
        # one thread hands out a chunk (so it can run beside the network), the pool's threads decode its photos
        with ThreadPoolExecutor(1, thread_name_prefix="chunk") as pool, \
                ThreadPoolExecutor(min(self.threads, self.chunk), thread_name_prefix="decode") as self._pool:
            pending, last = None, None  # the next chunk's decoding, when started beside; the last request
            for k, start in enumerate(starts):
                asked = time.perf_counter()
                if last is not None:
                    self._decide(k - 1, asked - last[0], last[1], last[2], last[3])
                prefetched = pending is not None
                done = (pending or pool.submit(self._decode, start)).result()
                wait, mode = time.perf_counter() - asked, self._plan(k)
                pending = pool.submit(self._decode, starts[k + 1]) if mode == "beside" and k + 1 < len(starts) else None
                last = (asked, wait, mode, prefetched)
                yield from done

    def _decode(self, start: int) -> list:
        stop = min(start + self.chunk, len(self.dataset))
        # warnings filters are process-wide and the threads' own catch_warnings may interleave: PIL's warnings
        # (EXIF) are ignored for the whole chunk here, and whatever the threads leave is dropped after it
        # (decoding does not depend on the filters: data.folders checks the pixel limit itself)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
            return list(self._pool.map(self.dataset.__getitem__, range(start, stop)))


@dataclass
class Batch:
    """Consecutive Items holding at most ``batch_size`` good ones, with the bad ones met on the way."""

    items: list  # every Item, in order

    @property
    def good(self) -> list:
        return [i for i in self.items if i.ok]

    @property
    def bad(self) -> list[tuple[str, str]]:
        """(path, reason) of the unusable files."""
        return [(i.path, i.error) for i in self.items if not i.ok]

    @property
    def next_position(self) -> int:
        """The position after the last item: where a resumed run continues."""
        return self.items[-1].position + 1

    def images(self):
        """The good images stacked into one (B, 3, H, W) tensor (None when there are none)."""
        import torch

        good = self.good
        return torch.stack([g.image for g in good]) if good else None

    def labels(self):
        import torch

        return torch.tensor([g.label for g in self.good], dtype=torch.long)


def batches(items: Iterable[Item], batch_size: int, limit: Optional[int] = None) -> Iterator[Batch]:
    """Group Items into Batches of ``batch_size`` good images; stop once ``limit`` good ones were taken.

    Bad items travel in the batch where they were met; bad items after the last good one make a
    final batch of their own, so every item is accounted for.
    """
    buf: list = []
    good = taken = 0
    for item in items:
        buf.append(item)
        if item.ok:
            good += 1
            if good == batch_size or (limit is not None and taken + good == limit):
                yield Batch(buf)
                taken += good
                buf, good = [], 0
                if limit is not None and taken == limit:
                    return
    if buf:
        yield Batch(buf)


def collate_items(items: list) -> Batch:
    """A DataLoader collate_fn (train's shuffled loader): the sampled Items as one Batch."""
    return Batch(list(items))
