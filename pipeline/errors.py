"""Errors the CLI turns into one clear line.

Bad values a user passed raise ``UsageError`` (a ValueError; exit code 2). Problems with the
environment, such as weights that cannot be downloaded offline or a full disk, raise
``PipelineError`` (exit 1). Anything else is a bug: the CLI shows its traceback with ``-v``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional


class UsageError(ValueError):
    """A bad option, file or folder the user gave: say which value is wrong and what is allowed."""


class RunFinished(UsageError):
    """``--resume`` of a finished run: nothing to train (exit 2). ``line_appended``: its ledger line, which a kill
    between its finished model.pt and the line cut off, was appended now; that was all there was left to do, so the
    CLI says so and exits 0. ``run_dir``, ``ledger``: the finished run's folder and the ledger the line went to."""

    def __init__(self, message: str, line_appended: bool = False, run_dir: Optional[str] = None,
                 ledger: Optional[str] = None):
        super().__init__(message)
        self.line_appended, self.run_dir, self.ledger = line_appended, run_dir, ledger

    def to_dict(self) -> dict:
        """What --json prints for a --resume that only appended the line: the run, as train's own result names it
        (``run_dir``, ``checkpoint``), and that its ledger line was appended to ``ledger``; no epoch was run."""
        return {"run_dir": self.run_dir, "checkpoint": str(Path(self.run_dir) / "model.pt"), "finished": True,
                "epochs_run": 0, "ledger_line_appended": self.line_appended, "ledger": self.ledger,
                "message": str(self)}


class PipelineError(RuntimeError):
    """A failure that is not the user's input: say what happened and how to get past it."""


class DeviceMissing(PipelineError):
    """A --device this machine lacks (cuda where CUDA is not available, cuda:7 with one GPU): a valid value the
    same command runs with elsewhere, so the environment's (exit 1), as weights that cannot be downloaded."""


class PackageMissing(PipelineError):
    """An optional package a valid request needs is not installed here (torchao for int8): the environment's
    (exit 1), as a missing device is."""


class DiskFull(PipelineError):
    """A write that the disk could not take (full, read-only, not permitted): exit 1, naming the path."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during train / finetune: ``run_dir`` (None when no epoch had finished) holds ``epochs_done`` of
    ``epochs`` epochs, resumable with ``--resume run_dir``. Here, not in models/, so that ``except
    pipeline.TrainingInterrupted`` needs no torch to import."""

    def __init__(self, run_dir: Optional[Path], epochs_done: int, epochs: int):
        # the message is what a notebook shows of it: where the epochs are and how to go on
        super().__init__("stopped during the first epoch: nothing was saved" if run_dir is None else
                         f"{epochs_done} of {epochs} epochs kept in {run_dir}/model.pt; resume with "
                         f"resume={str(run_dir)!r} (--resume on the command line)")
        self.run_dir, self.epochs_done, self.epochs = run_dir, epochs_done, epochs
