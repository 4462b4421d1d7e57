"""Path checks shared by the stages: names that came from outside, and folders the user named.

A file name taken from a URL (or any other outside source) must never choose the folder it is
written to, and a folder option that names an existing file must be one clear usage error, not
a traceback from ``mkdir`` deep inside a stage.
"""
from __future__ import annotations

import os
from pathlib import Path
from .errors import UsageError

#: Longest file name accepted from outside (bytes): file systems stop at 255, and '.part' is added.
MAX_NAME_BYTES = 200


def plain_name(name: str, what: str) -> str:
    """``name`` when it is one plain, visible file name, else ValueError naming ``what`` and the name.

    Refused: empty, '.', '..', anything with '/' or '\\' (it would pick another folder), hidden
    names (they would hide among our own marker files), control characters and over-long names.
    """
    bad = (not name or name.startswith(".") or "/" in name or "\\" in name
           or any(ord(c) < 32 or ord(c) == 127 for c in name) or len(name.encode("utf-8", "replace")) > MAX_NAME_BYTES)
    if bad:
        raise UsageError(f"{what}: {name!r} is not a plain file name (no '/', '\\', '..', hidden, empty or "
                         "control-character names)")
    return name


def require_folder(path: str | os.PathLike, what: str) -> Path:
    """``path`` as a Path when it is a folder or can be made one; ValueError when it, or the nearest
    part of it that exists, is something else (a regular file), so ``mkdir`` never fails later."""
    path = Path(path)
    probe = path
    while not os.path.lexists(probe) and probe != probe.parent:
        probe = probe.parent
    if os.path.lexists(probe) and not probe.is_dir():
        where = "" if probe == path else f" ({str(probe)!r} is not a folder)"
        raise UsageError(f"{what} {str(path)!r} must be a folder, but it is a file{where}")
    return path
