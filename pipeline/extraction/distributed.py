"""Scale-out extraction under ``torchrun``: one shard file per piece of work, one virtual cache.

The selection equals the single-process one exactly. A single process takes the first n good
candidates in stratified order. Here candidates are processed in rounds: round 0 is positions
[0, n); each later round is the next ``deficit`` positions, the deficit being the number of bad
files met in the round before, until nothing is missing or the candidates run out. Each round is
cut into equal contiguous pieces, one per rank; every piece is extracted (all its good
images) into its own shard file, named by its positions. The shards, taken by position, hold
exactly the single-process rows in the single-process order; rank 0 joins them into one cache
file whose ``features`` is an HDF5 virtual dataset over the shards.

Only small control messages travel between ranks (gloo, also on GPUs); features go to disk.
A shard is resumed like any cache, so re-running the same command redoes only missing work.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

from ..cache.feature_cache import FeatureCache, read_info, read_skipped, write_virtual_cache
from ..devices import resolve_workers
from ..errors import UsageError
from .extract_range import existing_cache, extract_range, hit_summary, warn_short

log = logging.getLogger(__name__)

#: how long a rank waits for the others at a collective (a resumed run may leave some ranks idle for hours)
TIMEOUT = timedelta(hours=24)


def torchrun_command(command: str, world: int) -> str:
    """The recorded command line as torchrun would start it (for 'run it again' hints)."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    nodes = f" --nnodes={world // local}" if world > local else ""
    first, _, rest = command.partition(" ")
    rest = rest if first.startswith("python") else command
    return f"torchrun --nproc_per_node={local}{nodes} {rest}"


def world_size() -> int:
    """How many processes torchrun started (1 when not run under torchrun)."""
    return int(os.environ.get("WORLD_SIZE") or 1)


def split(first: int, count: int, world: int) -> list[tuple[int, int]]:
    """Positions [first, first + count) cut into ``world`` contiguous, equal pieces (the last ones may be shorter)."""
    end = first + count
    per = -(-count // world)
    return [(min(first + r * per, end), min(first + (r + 1) * per, end)) for r in range(world)]


def shard_dir(cfg, path: Path) -> Path:
    """<shard_dir or cache_dir>/<cache name>.shards: shards of different caches never meet."""
    return Path(cfg.shard_dir or path.parent) / f"{path.stem}.shards"


def rank_config(cfg):
    """This rank's device (cuda:LOCAL_RANK when CUDA is used) and its share of the node's decoding workers."""
    import torch

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    device = cfg.device
    if device in ("auto", "cuda") and torch.cuda.is_available():
        device = f"cuda:{local_rank % torch.cuda.device_count()}"
        torch.cuda.set_device(device)
    workers = resolve_workers(cfg.workers, share=local_world)
    return replace(cfg, device=device, workers=workers)


def extract_sharded(cfg, listing, key: str, path: Path, started: float) -> dict:
    """This rank's part of a torchrun extraction; rank 0 returns the whole run's summary."""
    import torch.distributed as dist

    own = not dist.is_initialized()
    if own:
        dist.init_process_group("gloo", timeout=TIMEOUT)
    try:
        return _sharded(cfg, listing, key, path, started)
    finally:
        if own:
            dist.destroy_process_group()


def _from_rank0(value):
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _total(n: int) -> int:
    import torch
    import torch.distributed as dist

    t = torch.tensor([n], dtype=torch.int64)
    dist.all_reduce(t)
    return int(t.item())


def _existing(path: Path, key: str, started: float):
    """Rank 0's look at the cache path: ('hit', summary), ('run', None) or ('error', message)."""
    info = existing_cache(path, key)  # a sharded cache that lost a shard is moved aside and rebuilt
    if info is None:
        return "run", None
    if info.complete:
        return "hit", hit_summary(info, started)
    return "error", (f"{path} is an incomplete single-process extraction; finish it with the same command "
                     f"without torchrun, or move it away to extract it with torchrun")


def _part(cfg, listing, key: str, file: Path, first: int, stop: int, attrs: dict) -> dict:
    """Extract (or resume, or reuse) one shard file: candidates [first, stop)."""
    info = existing_cache(file, key)
    if info is not None and info.complete:
        return {"rows": info.rows, "computed": 0, "resumed_from": info.rows, "seconds": 0.0}
    r = extract_range(cfg, listing, key, file, resumed=info, positions=(first, stop), extra_attrs=attrs)
    return {k: r[k] for k in ("rows", "computed", "resumed_from", "seconds", "device", "precision")}


def _shard_rows(file: Path, cache_dir: Path) -> dict:
    """What rank 0 needs from a finished shard to list it in the virtual cache."""
    info = read_info(file)
    out = {"path": os.path.relpath(os.path.abspath(file), os.path.abspath(cache_dir)), "rows": info.rows,
           "shape": tuple(info.feature_shape), "dtype": info.attrs["dtype"], "labels": [], "paths": [],
           "skipped": read_skipped(file), "attrs": info.attrs}
    if info.rows:
        with FeatureCache(file) as c:
            out.update(labels=c.labels.tolist(), paths=c.paths)
    return out


def _sharded(cfg, listing, key: str, path: Path, started: float) -> dict:
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = replace(cfg, command=torchrun_command(cfg.command, world))
    keys = [None] * world
    dist.all_gather_object(keys, key)
    if len(set(keys)) > 1:  # e.g. a node whose copy of the data folder differs (files, sizes or mtimes)
        odd = [r for r, k in enumerate(keys) if k != keys[0]]
        raise UsageError(f"ranks {odd} see other data or settings than rank 0 (cache fingerprint differs); "
                         "every node must see the same data folder, weights and options")
    state, detail = _from_rank0(_existing(path, key, started) if rank == 0 else None)
    if state == "error":
        raise UsageError(detail)
    if state == "hit":
        return detail if rank == 0 else {**detail, "rank": rank}
    rcfg = rank_config(cfg)
    shards = shard_dir(cfg, path)
    shards.mkdir(parents=True, exist_ok=True)
    total = len(listing.files)
    first, count, good = 0, cfg.n or total, 0
    mine, stats = [], {"rows": 0, "computed": 0, "resumed_from": 0, "seconds": 0.0}
    while count > 0:
        lo, hi = split(first, count, world)[rank]
        rows = 0
        if hi > lo:
            file = shards / f"part-{lo:09d}-{hi:09d}.h5"
            attrs = {"shard_rank": rank, "shard_world": world, "shard_first": lo, "shard_stop": hi,
                     "shard_of": path.name}
            r = _part(rcfg, listing, key, file, lo, hi, attrs)
            rows = r["rows"]
            mine.append((lo, file))
            for k in ("rows", "computed", "resumed_from", "seconds"):
                stats[k] += r[k]
            stats.update({k: r[k] for k in ("device", "precision") if k in r})
        found = _total(rows)
        good += found
        first, count = first + count, min(count - found, total - first - count)
    if good == 0:
        raise UsageError(f"no image in {cfg.data} could be decoded; run check-images on it")
    sent = {"rank": rank, "stats": stats, "parts": [(lo, _shard_rows(f, path.parent)) for lo, f in mine]}
    got = [None] * world if rank == 0 else None
    dist.gather_object(sent, got, dst=0)
    if rank == 0:
        summary = _write_cache(cfg, listing, path, got, first, started)
    dist.barrier()  # the cache exists before any rank reports success
    if rank != 0:
        skipped = sum(len(p["skipped"]) for _, p in sent["parts"])
        return {"cache": str(path), "hit": False, "rank": rank, "skipped": skipped, **stats,
                "img_per_s": stats["computed"] / stats["seconds"] if stats["seconds"] else 0.0}
    return summary


def _write_cache(cfg, listing, path: Path, got: list, next_candidate: int, started: float) -> dict:
    """Rank 0: the virtual cache over every rank's shards, in position order."""
    parts = [p for _, p in sorted((lo, p) for g in got for lo, p in g["parts"])]
    ranks = [{"rank": g["rank"], **g["stats"]} for g in got]
    with_rows = [p for p in parts if p["rows"]]
    shape, dtype = with_rows[0]["shape"], with_rows[0]["dtype"]
    drop = ("rows", "next_candidate", "skipped_rows", "complete", "format", "format_version", "rows_final")
    attrs = {k: v for k, v in parts[0]["attrs"].items() if not k.startswith("shard_") and k not in drop}
    devices = sorted({str(p["attrs"].get("device", "")) for p in parts} - {""})
    attrs.update(device=",".join(devices), world_size=len(got), shard_dir=str(shard_dir(cfg, path)))
    labels = [x for p in parts for x in p["labels"]]
    paths = [x for p in parts for x in p["paths"]]
    # the listing's left-out entries (links, pipes) first, skipped as one process skips them
    skipped = [*listing.bad, *(x for p in parts for x in p["skipped"])]
    write_virtual_cache(path, attrs, listing, [(p["path"], p["rows"]) for p in parts], shape, dtype,
                        labels, paths, skipped, next_candidate)
    if len(labels) < (cfg.n or len(listing.files)):
        warn_short(len(labels), cfg.n, listing, len(skipped))
    seconds = time.time() - started
    computed = sum(r["computed"] for r in ranks)
    return {"cache": str(path), "hit": False, "rows": len(labels), "computed": computed,
            "resumed_from": len(labels) - computed, "skipped": len(skipped), "feature_shape": list(shape),
            "classes": list(listing.classes), "device": attrs["device"], "precision": attrs.get("precision"),
            "flip": bool(attrs.get("flip", False)), "seconds": seconds,
            "img_per_s": computed / seconds if seconds > 0 else 0.0,
            "world_size": len(got), "shard_dir": attrs["shard_dir"], "shards": len(parts), "ranks": ranks}
