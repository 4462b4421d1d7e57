"""One-offs paid once per project, not once per process: the int8 calibration and torch.compile's kernels.

A run of int8 + compile pays two one-offs before its first row: the calibration (about 20 s on
VGG-16, two CPU cores) and a cold compile (15-20 s). Both depend only on what they are made of,
so they are kept in the project's one-offs folder (``oneoffs_dir``) and every later process reuses
them: another --n, a stale cache extracted again, fit-head --test-data, the benchmark.

- ``int8/<key>.pt`` + ``<key>.json``: the calibrated observers (tensors only, read back with
  ``torch.load(weights_only=True)``) and what they were calibrated for. The key is a fingerprint
  of the calibration's identity (method, sample, seed, folder listing, torch and torchao
  versions: ``quantize.calibration_identity``), the backbone, a digest of the very weights
  quantised and the preprocessing; an entry is also refused when a calibration photo's bytes
  changed since (their sha256s are in the JSON). Another key is another entry: a stale one is
  never read.
- ``inductor/``: Inductor's on-disk caches (``TORCHINDUCTOR_CACHE_DIR``), unless the environment
  names its own. Inductor skips its FX graph cache for frozen graphs (what ``compiled`` makes), so
  a second process still traces, but it finds every generated kernel already built: measured on
  VGG-16 int8, 2-core EPYC, 17 s cold -> 5 s warm.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

from ..cache.feature_cache import fingerprint
from ..data.image_reader import file_digest

log = logging.getLogger(__name__)

#: where the one-offs go when neither the environment nor the command says (extract's default --cache-dir)
DEFAULT_PARENT = "features"
ENV = "PIPELINE_ONEOFFS_DIR"


def oneoffs_dir(cache_dir: Optional[str] = None) -> Path:
    """$PIPELINE_ONEOFFS_DIR, else ``<cache_dir>/oneoffs`` (extract's --cache-dir; ``features`` for commands
    without one, which is extract's default, so predict finds what the default extract left)."""
    return Path(os.environ.get(ENV) or Path(cache_dir or DEFAULT_PARENT) / "oneoffs")


def weights_digest(net) -> str:
    """sha256 of a network's parameters and buffers, in name order: the very weights quantised."""
    h = hashlib.sha256()
    for name, t in sorted(net.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def calibration_key(identity: dict, backbone: str, features, preprocessing: dict) -> str:
    """What decides a calibrated int8 network, as one fingerprint."""
    return fingerprint({"calibration": identity, "backbone": backbone, "weights": weights_digest(features),
                        "preprocessing": preprocessing, **_trunk(backbone)})[:32]


def request_key(identity: dict, backbone: str, weights: dict) -> str:
    """The calibration as a request names it (no torch, no weights loaded): ``--precision auto`` asks
    ``has_calibration`` whether the one-offs are paid; reusing one still checks the full ``calibration_key``."""
    return fingerprint({"calibration": identity, "backbone": backbone, "weights": weights, **_trunk(backbone)})[:32]


def _trunk(backbone: str) -> dict:
    """A changed trunk's version, for the keys of its calibrations (the network has another map, the weights the
    same); nothing for every other backbone, whose calibrations keep their keys."""
    from .backbones import trunk_version

    version = trunk_version(backbone)
    return {"trunk_version": version} if version else {}


def has_calibration(folder: Path, request: str) -> bool:
    """Whether a calibration stored in ``folder`` was made for ``request`` (``request_key``)."""
    for record in (folder / "int8").glob("*.json") if (folder / "int8").is_dir() else []:
        try:
            if json.loads(record.read_text()).get("request") == request:
                return True
        except (OSError, ValueError, AttributeError):
            continue
    return False


def stored_calibration(folder: Path, key: str, root: str) -> Optional[tuple[dict, dict]]:
    """(observers, calibration record) stored under ``key``, or None (none, unreadable, or a calibration
    photo under ``root`` rewritten since: then the entry is refused and calibrated again)."""
    import torch

    entry, record_file = folder / "int8" / f"{key}.pt", folder / "int8" / f"{key}.json"
    if not (entry.is_file() and record_file.is_file()):
        return None
    try:
        record = json.loads(record_file.read_text())
        observers = torch.load(entry, weights_only=True, map_location="cpu")
        changed = [p for p, digest in record["digests"].items()
                   if file_digest(Path(root) / p) != digest]  # '' for a photo gone or unreadable
    except (OSError, ValueError, KeyError, RuntimeError, TypeError, EOFError, pickle.UnpicklingError) as e:
        log.warning("the stored int8 calibration %s is unreadable (%s); calibrating again", entry, e)
        return None
    if changed or record.get("key") != key:
        log.info("the stored int8 calibration %s is stale (%s); calibrating again", entry,
                 f"{len(changed)} calibration photos changed, e.g. {changed[0]}" if changed else "another key")
        return None
    return observers, record["calibration"]


def store_calibration(folder: Path, key: str, observers: dict, calibration: dict, root: str,
                      request: str = "") -> None:
    """Keep a calibration for later processes (a failure to write only warns: the run does not need it)."""
    import torch

    from ..files import atomic_write

    target = folder / "int8"
    try:
        target.mkdir(parents=True, exist_ok=True)
        digests = {p: file_digest(Path(root) / p) for p in calibration.get("images", [])}
        atomic_write(target / f"{key}.pt", lambda tmp: torch.save({k: v.contiguous() for k, v in observers.items()},
                                                                    tmp))
        atomic_write(target / f"{key}.json", lambda tmp: tmp.write_text(json.dumps(
            {"key": key, "request": request, "calibration": calibration, "digests": digests}, indent=1)))
    except Exception as e:  # noqa: BLE001 -- a read-only or full disk: the run goes on, the next calibrates again
        log.warning("could not keep the int8 calibration in %s (%s)", target, e)


@contextmanager
def compile_cache(folder: Optional[Path]):
    """Inductor's on-disk caches in ``folder/inductor`` while compiling (unless $TORCHINDUCTOR_CACHE_DIR names
    its own, or ``folder`` is None: Inductor's default); yields the folder in use."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir, default_cache_dir, temporary_cache_dir

    own = os.environ.get("TORCHINDUCTOR_CACHE_DIR")  # Inductor sets its default there once it has used it
    if folder is None or (own and own != default_cache_dir()):
        yield Path(cache_dir())
        return
    path = folder / "inductor"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        log.warning("no compile cache in %s (%s): compiling in the default one", path, e)
        yield Path(cache_dir())
        return
    with temporary_cache_dir(str(path.resolve())):
        yield path


def compiled_signature(net, batch: int, sample) -> str:
    """What a compile's kernels depend on: the network's structure, the input's shape and dtype, torch."""
    import torch

    code = getattr(net, "code", "") if isinstance(getattr(net, "code", ""), str) else ""
    return fingerprint([repr(net), code, batch, list(sample.shape[1:]), str(sample.dtype), torch.__version__])[:32]
