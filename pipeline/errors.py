"""Errors the CLI turns into one clear line.

Bad values a user passed raise ``ValueError`` (exit code 2, a usage error); problems with the
environment, such as weights that cannot be downloaded offline, raise ``PipelineError`` (exit 1).
"""


class PipelineError(RuntimeError):
    """A failure that is not the user's input: say what happened and how to get past it."""
