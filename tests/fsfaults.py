"""File-system entries that are not regular files, and a guard against a test that hangs on one.

``make_non_regular(folder)`` puts, under image names, a dangling symlink, a symlink to itself and a
named pipe (reading it blocks forever) into ``folder``; returns {name: expected reason fragment}.
"""
from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path


def make_non_regular(folder: Path) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    os.symlink("/nonexistent/x.jpg", folder / "dangling.jpg")
    os.symlink("loop.jpg", folder / "loop.jpg")
    os.mkfifo(folder / "pipe.jpg")
    return {"dangling.jpg": "dangling symlink", "loop.jpg": "symlink loop", "pipe.jpg": "named pipe"}


@contextlib.contextmanager
def no_hang(seconds: int = 60):
    """Fail (TimeoutError) instead of hanging when the block takes longer than ``seconds``."""

    def fire(*_):
        raise TimeoutError(f"still running after {seconds} s: a blocking open of a pipe?")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
