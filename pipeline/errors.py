"""Errors the CLI turns into one clear line.

Bad values a user passed raise ``UsageError`` (a ValueError; exit code 2). Problems with the
environment, such as weights that cannot be downloaded offline or a full disk, raise
``PipelineError`` (exit 1). Anything else is a bug: the CLI shows its traceback with ``-v``.
"""


class UsageError(ValueError):
    """A bad option, file or folder the user gave: say which value is wrong and what is allowed."""


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
