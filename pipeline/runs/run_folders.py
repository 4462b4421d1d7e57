"""Run folders: where each fit-head, train, finetune and evaluate run leaves its outputs.

``runs/<time>-<kind>/`` holds the checkpoint, ``history.json`` and ``curves.png`` (evaluate: its
pictures and ``metrics.json``); ``finish_run`` writes them and the ledger line in one place.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional

from ..files import write_json, writing
from .ledger import append_run


def new_run_dir(runs_dir: str, kind: str) -> Path:
    """A fresh ``runs_dir/<stamp>-<kind>`` folder (suffixed -2, -3, ... when the second is taken)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(runs_dir) / f"{stamp}-{kind}"
    d, k = base, 1
    while True:
        try:
            with writing(d):
                d.mkdir(parents=True)  # not exist_ok: a run started in the same second may take it first
            return d
        except FileExistsError as e:
            if e.filename != str(d):  # not this folder taken by another run: raised as it is
                raise
            k += 1
            d = base.with_name(f"{base.name}-{k}")


def finish_run(out_dir: Path, runs_dir: str, kind: str, history: Optional[list], outputs: list,
               commit: Optional[Callable[[], object]] = None, **ledger) -> Optional[Path]:
    """Write ``history.json`` and ``curves.png`` (when there is a history) and the run's ledger line.

    ``outputs``: files the run wrote (checkpoint, pictures), recorded in the ledger with the curves;
    ``commit``: writes the run's checkpoint, after the pictures and just before the ledger line, so a run
    stopped while they are drawn still has its resumable checkpoint, and a finished one its line;
    ``ledger``: the rest of the line (cache, backbone, params, metrics; see ``ledger.append_run``).
    Returns the curves' path, if drawn.
    """

    curves = None
    with writing(out_dir):
        if history:
            from . import figures as plots

            write_json(out_dir / "history.json", history)
            curves = plots.curves(history, out_dir / "curves.png")
        if commit is not None:
            commit()
        append_run(runs_dir, kind, outputs=[*outputs, *([curves] if curves else [])], **ledger)
    return curves
