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


def unlistable(monkeypatch, *folders: Path) -> None:
    """Make the OS refuse to list ``folders`` (os.scandir raises EACCES, as for a chmod 000 folder of another
    user): root, who runs the tests here, reads any folder whatever its mode."""
    import errno

    refused = {os.path.realpath(f) for f in folders}
    real = os.scandir

    def scandir(path="."):
        if os.path.realpath(path) in refused:
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
