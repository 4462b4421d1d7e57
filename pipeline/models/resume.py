"""Interrupted train / finetune runs, resumed: after every epoch the run folder's model.pt holds the model
and what continuing needs (the optimiser's state, the random generator's, the epochs' history); ``--resume
RUN_DIR`` with the same options goes on from the next epoch, as if never stopped.

The resume fields live in the run's own checkpoint, written by the one checkpoint writer; a finished run's
model.pt has none, so it cannot be resumed by mistake.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Optional

import torch

from ..data.moves import folder_lock
from ..config import option_text, option_value
from ..errors import RunFinished, TrainingInterrupted, UsageError
from ..files import Terminated
from .whole_models import read_checkpoint

log = logging.getLogger(__name__)

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


def resume_fields(opt: torch.optim.Optimizer, shuffle: torch.Generator, digest: str, kept: dict) -> dict:
    """What a checkpoint needs beyond the model to go on where an epoch ended: the optimiser's state and
    the random states (torch's, each GPU's, and the training loader's ``shuffle`` generator); ``kept``: the run's
    ``run_record`` (its photos one by one, the --init-head's sha256)."""
    fields = {"optimizer": _cpu(opt.state_dict()), "rng": torch.get_rng_state(), "shuffle": shuffle.get_state(),
              "items_sha256": digest, **kept}
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


def read_resume(cfg, kind: str, recorded: dict, digest: str, sample: tuple) -> dict:
    """The stopped run's checkpoint in ``cfg.resume``, once it is one of ``kind`` with the same options
    (``recorded``: this run's) and the same images (``sample``: the listing, this run's train and val indices,
    ``digest`` their ``items_digest``), and has epochs left to run."""
    path = Path(cfg.resume) / "model.pt"
    if not path.is_file():
        raise UsageError(f"{option_value('resume', cfg.resume)}: no model.pt there (expected the run folder a stopped "
                         f"train or finetune named)")
    ckpt = read_checkpoint(path)
    if "resume" not in ckpt:
        appended = ledger_line_restored(Path(cfg.resume), ckpt, cfg.runs_dir)
        if appended:
            raise RunFinished(f"{option_value('resume', cfg.resume)}: a finished run whose ledger line was missing "
                              f"(stopped between writing model.pt and the line): appended it to {appended}; nothing "
                              "left to train", line_appended=True, run_dir=str(cfg.resume), ledger=str(appended))
        raise RunFinished(f"{option_value('resume', cfg.resume)}: its model.pt is a finished run's; nothing to resume")
    check_resume_fields(ckpt, path)
    from .whole_models import check_trunk

    check_trunk(ckpt, path)  # begun on another map of its backbone than its trunk gives now: not resumed on this one
    if ckpt["kind"] != kind:
        raise UsageError(f"{option_value('resume', cfg.resume)} is a {ckpt['kind']} run; resume it with {ckpt['kind']}")
    before = ckpt.get("config") or {}
    head_sha = ckpt["resume"].get("init_head_sha256")
    differ = [f"{option_value(k, recorded[k])} (the run had {before.get(k)!r}{_gone_note(k, before.get(k), head_sha)})"
              for k in recorded if k not in FREE_OPTIONS and not _same_option(k, before.get(k), recorded[k])
              and not _same_head(k, recorded[k], head_sha)]
    if differ:
        free = ", ".join(option_text(k) for k in FREE_OPTIONS if k != "resume")
        raise UsageError(f"{option_value('resume', cfg.resume)}: other options than the stopped run's: "
                         f"{'; '.join(differ)}; "
                         f"resume with its options (only {free} may change)")
    same_photos(cfg, ckpt["resume"], digest, *sample)
    done = len(ckpt.get("history") or [])
    if cfg.epochs < done:
        raise UsageError(f"{option_text('epochs', cfg.epochs)}: the run already did {done} epochs (give at least "
                         f"{done}; "
                         f"{done} finishes it as it is)")
    return ckpt


def ledger_line_restored(run_dir: Path, ckpt: dict, runs_dir_now: str) -> Optional[Path]:
    """For a --resume of a finished run: its ledger line, appended to the run's ledger (in the folder that holds
    the run folder) where neither it nor ``runs_dir_now``'s (--runs-dir: where a resumed run that finished wrote
    its line) has one; returns that ledger (None where the line is there). The finished model.pt is written just before
    the line (``run_folders.finish_run``): a run killed between the two (kill -9) was finished with no line, and
    ``runs`` never showed it."""
    from ..runs.ledger import append_run, read_runs

    runs_dir = run_dir.resolve().parent
    try:
        for record in [r for d in dict.fromkeys((runs_dir, Path(runs_dir_now).resolve())) for r in read_runs(d)]:
            if any(Path(o).name == "model.pt" and Path(o).parent.name == run_dir.resolve().name
                   for o in record.get("outputs", [])):
                return None
    except (OSError, ValueError) as e:  # an unreadable ledger: left as it is
        log.debug("cannot read the ledger of %s: %s", runs_dir, e)
        return None
    curves = run_dir / "curves.png"
    metrics = {k: v for k, v in (ckpt.get("metrics") or {}).items()
               if k in ("val_acc", "val_loss", "train_acc", "train_loss")}
    record = append_run(runs_dir, ckpt["kind"], backbone=ckpt.get("backbone"), params=ckpt.get("config") or {},
                        metrics=metrics, outputs=[run_dir / "model.pt", *([curves] if curves.is_file() else [])])
    log.info("appended %s's ledger line: %s", run_dir, record)
    return runs_dir / "ledger.jsonl"


def _same_head(key: str, now, sha256: Optional[str]) -> bool:
    """Whether ``now``, another --init-head than the stopped run's, is the same file moved (or copied): its bytes
    are those the run recorded (``sha256``; a run stopped before it recorded them: never)."""
    from ..data.image_reader import file_digest

    return key == "init_head" and isinstance(now, str) and bool(sha256) and file_digest(now) == sha256


def _gone_note(key: str, before, sha256: Optional[str]) -> str:
    """For a refused --init-head: that the one the run started from is gone, and what resumes then."""
    if key != "init_head" or not isinstance(before, str) or os.path.exists(before):
        return ""
    if sha256:
        return (f", gone since; the file given has other bytes: give {option_text('init_head')} that very file, "
                "wherever it is now")
    return (", gone since: put it back there (the run, stopped by an older version, kept no sha256 to know it "
            "elsewhere)")


def init_head_gone(cfg) -> None:
    """A --resume whose --init-head does not exist (moved since the run began?): refused saying what resumes,
    rather than 'model file ... does not exist' (any moved copy of the same bytes resumes: ``_same_head``)."""
    head = getattr(cfg, "init_head", None)
    if cfg.resume and head and not os.path.exists(head):
        raise UsageError(f"{option_value('init_head', head)} does not exist; to resume {cfg.resume!r}, give "
                         f"{option_text('init_head')} the file the run started from, where it is now (moved or "
                         "copied: its bytes are checked against the run's)")


def _same_option(key: str, before, now) -> bool:
    """Whether an option of the stopped run is this run's. A weights file is recorded absolute (the same file
    from any folder); a run stopped before that recorded it as typed, taken from the folder resumed in."""
    if key == "weights" and isinstance(before, str) and isinstance(now, str) and before != now:
        return os.path.isabs(now) and not os.path.isabs(before) and os.path.abspath(before) == now
    return before == now


#: the photos a refusal names (the others are counted)
NAMED = 3


def run_record(cfg, listing, train_idx, val_idx, stopped: Optional[dict]) -> dict:
    """What a later --resume checks this run against beyond ``items_digest``: ``photos``, its train then val
    photos one by one (path, label, size, mtime, sha256: '' where unreadable), and the --init-head's sha256. A
    fresh run hashes every photo (a thread per core, up to 8: about 0.1 s for 1,000 photos, as extract's
    digests); a resumed one (``stopped``: its checkpoint) keeps the stopped run's sha256 (checked by
    ``same_photos``) and hashes only the photos whose size or mtime changed."""
    from ..cache.freshness import file_digests
    from ..data.image_reader import file_digest

    picked = [listing.files[i] for i in (*train_idx, *val_idx)]
    then = (stopped or {}).get("resume", {})
    known = {}
    if then.get("photos"):
        p = then["photos"]
        known = dict(zip(zip(p["paths"], p["sizes"].tolist(), p["mtimes_ns"].tolist()), p["sha256"]))
    todo = [f.path for f in picked if (f.path, f.size, f.mtime_ns) not in known]
    hashed = dict(zip(todo, file_digests(listing.root, todo)))
    photos = {"paths": [f.path for f in picked], "labels": torch.tensor([f.label for f in picked]),
              "sizes": torch.tensor([f.size for f in picked]), "mtimes_ns": torch.tensor([f.mtime_ns for f in picked]),
              "sha256": [hashed.get(f.path) or known.get((f.path, f.size, f.mtime_ns), "") for f in picked]}
    head = getattr(cfg, "init_head", None)
    if not head:
        return {"photos": photos}
    return {"photos": photos, "init_head_sha256": then.get("init_head_sha256") or file_digest(head)}


def photos_differ(then: dict, listing, sample: list, n: int = 0) -> list[tuple[str, str]]:
    """(path, how) of each photo not as the stopped run recorded it (``then``, its ``run_record`` photos): gone,
    unreadable now (as the run could read it), rewritten (another sha256: a photo only touched, its bytes the
    same, is not counted), or in this run's ``sample`` (paths) though not in the stopped run's (``n``: its --n).
    Photos of another size or mtime are hashed; the others too where they total at most
    ``VERIFY_AUTO_MAX_BYTES``, as extract does (a photo rewritten with its size and mtime kept)."""
    from ..cache.freshness import VERIFY_AUTO_MAX_BYTES, edited_rows
    from ..data.folders import ImageLoadError, open_regular

    out, stat_changed, unchanged = [], [], []
    for path, size, mtime, sha in zip(then["paths"], then["sizes"].tolist(), then["mtimes_ns"].tolist(),
                                      then["sha256"]):
        now = listing.by_path.get(path)
        if now is None:
            out.append((path, "gone: moved, renamed or removed"))
            continue
        if not sha:  # the stopped run could not read it either
            continue
        try:
            open_regular(listing.root / path).close()
        except ImageLoadError as e:
            out.append((path, e.reason))
            continue
        (stat_changed if (now.size, now.mtime_ns) != (size, mtime) else unchanged).append((path, sha))
    if sum(listing.by_path[p].size for p, _ in unchanged) <= VERIFY_AUTO_MAX_BYTES:
        stat_changed += unchanged
    if stat_changed:
        rewritten = set(edited_rows(listing.root, *map(list, zip(*stat_changed))))
        out += [(p, "rewritten: other bytes") for p, _ in stat_changed if p in rewritten]
    recorded = set(then["paths"])
    new = ("not among the stopped run's photos: added since"
           + (f", or drawn by {option_text('n', n)} in place of others" * bool(n)))
    out += [(p, new) for p in sample if p not in recorded]
    return out


def same_photos(cfg, then: dict, digest: str, listing, train_idx, val_idx) -> None:
    """Refuse (exit 2) a resume on other photos than the stopped run's (``then``: its resume fields), naming the
    first few and what became of them; photos only touched since (mtime changed, bytes the same) pass."""
    photos = then.get("photos")
    sample = [listing.files[i].path for i in (*train_idx, *val_idx)]
    differ = photos_differ(photos, listing, sample, cfg.n) if photos else []
    if differ:
        n = len(differ)
        named = "; ".join(f"{p} ({how})" for p, how in differ[:NAMED]) + (f"; and {n - NAMED} more" * (n > NAMED))
        rewritten = any(how.startswith("rewritten") for _, how in differ)
        raise UsageError(
            f"{option_value('resume', cfg.resume)}: {n} photo{'s' * (n > 1)} of {cfg.data!r} differ{'s' * (n == 1)} "
            f"from the stopped run's: {named}; a resumed run must train on the same photos: put the folder back as it "
            f"was (moved photos back, permissions fixed), or start a fresh run without {option_text('resume')}"
            + (f" (check-images {cfg.data} --quarantine moves the photos that do not decode out of it first)"
               * rewritten))
    if then.get("items_sha256") == digest:
        return
    if not photos or sample != photos["paths"]:
        raise UsageError(f"{option_value('resume', cfg.resume)}: the images of {cfg.data!r} (or their split) "
                         "differ from the stopped run's (added, removed or rewritten since); a resumed run must train "
                         "on the same ones")
    log.info("photos of %s touched since the run stopped (mtime changed) hold the same bytes: resuming", cfg.data)


#: resume field -> (what it must be, the check)
_RESUME_FIELDS = {
    "optimizer": ("an optimiser state (state, param_groups)",
                  lambda v: isinstance(v, dict) and isinstance(v.get("state"), dict)
                  and isinstance(v.get("param_groups"), list)),
    "rng": ("a random state (a uint8 tensor)", lambda v: isinstance(v, torch.Tensor) and v.dtype == torch.uint8),
    "shuffle": ("a random state (a uint8 tensor)", lambda v: isinstance(v, torch.Tensor) and v.dtype == torch.uint8),
    "items_sha256": ("a sha256 hex string", lambda v: isinstance(v, str)),
}


def _photos_ok(photos) -> bool:
    """``run_record``'s photos: lists of paths and sha256 and int64 tensors of labels, sizes, mtimes, one each."""
    if not (isinstance(photos, dict) and all(isinstance(photos.get(k), list) for k in ("paths", "sha256"))
            and all(isinstance(photos.get(k), torch.Tensor) and photos[k].dtype == torch.int64 and photos[k].dim() == 1
                    for k in ("labels", "sizes", "mtimes_ns"))):
        return False
    n = len(photos["paths"])
    return (all(len(photos[k]) == n for k in ("sha256", "labels", "sizes", "mtimes_ns"))
            and all(isinstance(v, str) for k in ("paths", "sha256") for v in photos[k]))


def check_resume_fields(ckpt: dict, path) -> None:
    """A stopped run's checkpoint holds what resuming reads, of the right types (a hand-edited or foreign one is
    refused naming the field, as ``checkpoints.read_checkpoint`` does for the model's fields)."""
    fields = ckpt["resume"]
    wrong = ([("resume", "a dict of the stopped run's states")] if not isinstance(fields, dict) else
             [(f"resume.{k}", what) for k, (what, ok) in _RESUME_FIELDS.items() if not ok(fields.get(k))])
    photos = fields.get("photos") if isinstance(fields, dict) else None
    if photos is not None and not _photos_ok(photos):
        wrong.append(("resume.photos", "the run's photos (paths, labels, sizes, mtimes_ns, sha256, one each)"))
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
