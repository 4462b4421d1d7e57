"""Interrupted train / finetune runs, resumed: after every epoch the run folder's model.pt holds the model
and what continuing needs (the optimiser's state, the random generator's, the epochs' history); ``--resume
RUN_DIR`` with the same options goes on from the next epoch, as if never stopped.

The resume fields live in the run's own checkpoint, written by the one checkpoint writer; a finished run's
model.pt has none, so it cannot be resumed by mistake.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional

import torch

from ..data.moves import folder_lock
from ..config import option_text, option_value
from ..errors import TrainingInterrupted, UsageError
from ..files import Terminated
from .whole_models import read_checkpoint

#: options that change nothing an epoch computes: they may differ between the stopped run and its resumption
FREE_OPTIONS = ("epochs", "resume", "runs_dir", "workers", "print_every", "device")


class TrainingTerminated(Terminated):
    """SIGTERM or SIGHUP (``files.unwinding_on_signals``) during train / finetune: what ``TrainingInterrupted``
    tells of Ctrl-C (``run_dir``, ``epochs_done`` of ``epochs``), so the CLI's one line names the same command
    that resumes, not the Python API's ``resume=``."""

    def __init__(self, code: int, kept: TrainingInterrupted):
        super().__init__(code)
        self.run_dir, self.epochs_done, self.epochs = kept.run_dir, kept.epochs_done, kept.epochs


def training_into(run_dir):
    """Held (a flock on the run folder) by the one process training into it, from its first save to the end:
    a --resume of it while the run, or another resumption, still trains is refused (exit 1) instead of
    writing the same model.pt and a second ledger line for one run."""
    return folder_lock(run_dir, True, f"{run_dir} is being trained into by another process (the run itself, or "
                                      "another --resume of it); wait for it to finish", wait_s=0)


def clear_leftovers(run_dir) -> None:
    """Remove the temporary model.pt files a killed save left (``files.atomic_write``'s ``.model.pt.PID.tmp``,
    as large as the model): with the folder held (``training_into``) no other process is writing them."""
    for tmp in Path(run_dir).glob(".model.pt.*.tmp"):
        tmp.unlink(missing_ok=True)


def items_digest(files, train_idx, val_idx) -> str:
    """Which images (``SourceFile``s) the run trains and validates on, with their sizes and times, as extract's
    listing fingerprint: a resumed run must see the same ones, none of them rewritten in place."""
    split = {part: [(files[i].path, files[i].label, files[i].size, files[i].mtime_ns) for i in idx]
             for part, idx in (("train", train_idx), ("val", val_idx))}
    return hashlib.sha256(json.dumps(split, default=str).encode()).hexdigest()


def _cpu(value):
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_cpu(v) for v in value]
    return value


def resume_fields(opt: torch.optim.Optimizer, shuffle: torch.Generator, digest: str) -> dict:
    """What a checkpoint needs beyond the model to go on where an epoch ended: the optimiser's state and
    the random states (torch's, each GPU's, and the training loader's ``shuffle`` generator)."""
    fields = {"optimizer": _cpu(opt.state_dict()), "rng": torch.get_rng_state(), "shuffle": shuffle.get_state(),
              "items_sha256": digest}
    gpus = gpu_rng_states()
    if gpus is not None:
        fields["cuda_rng"] = gpus
    return fields


def gpu_rng_states() -> Optional[list]:
    """Each GPU's random state where one is in use: dropout on a GPU draws from its own generator."""
    return torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None


def set_gpu_rng_states(states: list) -> None:
    """Put the GPUs' random states back, where this machine has as many GPUs (else it is another machine)."""
    if torch.cuda.is_available() and len(states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states)


def read_resume(cfg, kind: str, recorded: dict, digest: str) -> dict:
    """The stopped run's checkpoint in ``cfg.resume``, once it is one of ``kind`` with the same options
    (``recorded``: this run's) and the same images, and has epochs left to run."""
    path = Path(cfg.resume) / "model.pt"
    if not path.is_file():
        raise UsageError(f"{option_value('resume', cfg.resume)}: no model.pt there (expected the run folder a stopped "
                         f"train or finetune named)")
    ckpt = read_checkpoint(path)
    if "resume" not in ckpt:
        raise UsageError(f"{option_value('resume', cfg.resume)}: its model.pt is a finished run's; nothing to resume")
    check_resume_fields(ckpt, path)
    if ckpt["kind"] != kind:
        raise UsageError(f"{option_value('resume', cfg.resume)} is a {ckpt['kind']} run; resume it with {ckpt['kind']}")
    before = ckpt.get("config") or {}
    differ = [f"{option_value(k, recorded[k])} (the run had {before.get(k)!r})" for k in recorded
              if k not in FREE_OPTIONS and not _same_option(k, before.get(k), recorded[k])]
    if differ:
        free = ", ".join(option_text(k) for k in FREE_OPTIONS if k != "resume")
        raise UsageError(f"{option_value('resume', cfg.resume)}: other options than the stopped run's: "
                         f"{'; '.join(differ)}; "
                         f"resume with its options (only {free} may change)")
    if ckpt["resume"].get("items_sha256") != digest:
        raise UsageError(f"{option_value('resume', cfg.resume)}: the images of {cfg.data!r} (or their split) differ "
                         "from the "
                         "stopped run's (added, removed or rewritten since); a resumed run must train on the same ones")
    done = len(ckpt.get("history") or [])
    if cfg.epochs < done:
        raise UsageError(f"{option_text('epochs', cfg.epochs)}: the run already did {done} epochs (give at least "
                         f"{done}; "
                         f"{done} finishes it as it is)")
    return ckpt


def _same_option(key: str, before, now) -> bool:
    """Whether an option of the stopped run is this run's. A weights file is recorded absolute (the same file
    from any folder); a run stopped before that recorded it as typed, taken from the folder resumed in."""
    if key == "weights" and isinstance(before, str) and isinstance(now, str) and before != now:
        return os.path.isabs(now) and not os.path.isabs(before) and os.path.abspath(before) == now
    return before == now


#: resume field -> (what it must be, the check)
_RESUME_FIELDS = {
    "optimizer": ("an optimiser state (state, param_groups)",
                  lambda v: isinstance(v, dict) and isinstance(v.get("state"), dict)
                  and isinstance(v.get("param_groups"), list)),
    "rng": ("a random state (a uint8 tensor)", lambda v: isinstance(v, torch.Tensor) and v.dtype == torch.uint8),
    "shuffle": ("a random state (a uint8 tensor)", lambda v: isinstance(v, torch.Tensor) and v.dtype == torch.uint8),
    "items_sha256": ("a sha256 hex string", lambda v: isinstance(v, str)),
}


def check_resume_fields(ckpt: dict, path) -> None:
    """A stopped run's checkpoint holds what resuming reads, of the right types (a hand-edited or foreign one is
    refused naming the field, as ``checkpoints.read_checkpoint`` does for the model's fields)."""
    fields = ckpt["resume"]
    wrong = ([("resume", "a dict of the stopped run's states")] if not isinstance(fields, dict) else
             [(f"resume.{k}", what) for k, (what, ok) in _RESUME_FIELDS.items() if not ok(fields.get(k))])
    history = ckpt.get("history")
    if not (isinstance(history, list) and history and all(isinstance(h, dict) for h in history)):
        wrong.append(("history", "a list of the epochs done, one dict each"))
    if wrong:
        name, what = wrong[0]
        raise UsageError(f"{path}: field {name!r} is not {what}; not a stopped run's model.pt as train and finetune "
                         "write it")


def restore(ckpt: dict, model: torch.nn.Module, opt: torch.optim.Optimizer, shuffle: torch.Generator) -> list:
    """Put the stopped run's model, optimiser and random states back; returns its history."""
    model.load_state_dict(ckpt["state_dict"])
    opt.load_state_dict(ckpt["resume"]["optimizer"])
    torch.set_rng_state(ckpt["resume"]["rng"])
    if ckpt["resume"].get("cuda_rng"):
        set_gpu_rng_states(ckpt["resume"]["cuda_rng"])
    shuffle.set_state(ckpt["resume"]["shuffle"])
    return list(ckpt["history"])
