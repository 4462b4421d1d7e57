"""Progress that suits where it is shown: a bar in a terminal or a notebook, periodic lines in a log.

tqdm hides its bar when stderr is not a terminal (a CI log, ``nohup``, ``| tee``), which left a
long extraction silent until it ended. There, ``LogProgress`` writes a line every ``interval``
seconds instead (done/total, rate, eta). ``set_quiet(True)`` (the CLI's ``--quiet``) silences both,
and ``with quiet(): ...`` does so for a block (the Python API's default: no output unless asked).

In a Jupyter kernel the bar is tqdm.auto's widget when ipywidgets is installed, tqdm's text bar
otherwise (tqdm.auto falls back by itself; its warning about the missing widget is not repeated here).
"""
from __future__ import annotations

import contextlib
import logging
import sys
import time
import warnings
from typing import Iterator, Optional

_QUIET = False

#: Seconds between two progress lines when stderr is not a terminal.
LOG_INTERVAL = 10.0
#: When this module last wrote a progress line or a ``still_running`` line (time.monotonic()).
_last_line = float("-inf")


def set_quiet(quiet: bool) -> None:
    """Silence (or restore) every progress bar and progress line of this process."""
    global _QUIET
    _QUIET = bool(quiet)


def is_quiet() -> bool:
    return _QUIET


@contextlib.contextmanager
def quiet(silent: bool = True) -> Iterator[None]:
    """``with quiet(): ...``: progress silenced (or, with ``silent=False``, shown) inside the block only;
    the previous setting is restored after it, also on an exception."""
    before = _QUIET
    set_quiet(silent)
    try:
        yield
    finally:
        set_quiet(before)

#: The lines said once inside ``said_once`` (None outside it: every line is said).
_SAID: Optional[set] = None


@contextlib.contextmanager
def said_once() -> Iterator[None]:
    """Inside it (one API call or command: ``verbosity``'s block), a line ``first_time`` has seen is not said
    again; nested, the outermost block counts."""
    global _SAID
    if _SAID is not None:
        yield
        return
    _SAID = set()
    try:
        yield
    finally:
        _SAID = None


def first_time(line: str) -> bool:
    """Whether ``line`` is new in the current ``said_once`` block (always, outside one); it is remembered: a
    warning about a folder that a command lists several times (choose-backbone: once for its sample, twice for
    each candidate) was said each time."""
    if _SAID is None:
        return True
    if line in _SAID:
        return False
    _SAID.add(line)
    return True


@contextlib.contextmanager
def verbosity(verbose: Optional[bool]) -> Iterator[None]:
    """Progress bars, epoch lines and info logs on (True) or off (False) inside the block; None: as they are
    (the Python API's ``verbose=``: in plain Python or Jupyter, True also shows the info logs on stderr). The
    block is one API call (the CLI's commands call the API with None): its repeated warnings said once
    (``said_once``)."""
    with said_once(), _verbosity(verbose):
        yield


@contextlib.contextmanager
def _verbosity(verbose: Optional[bool]) -> Iterator[None]:
    if verbose is None:
        yield
        return
    logger = logging.getLogger("pipeline")
    handler = None
    if verbose and not logging.getLogger().handlers and not logger.handlers:  # plain Python or Jupyter
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        level = logger.level
        logger.setLevel(logging.INFO)  # setLevel, not .level =: it clears the loggers' isEnabledFor cache
    try:
        with quiet(not verbose):
            yield
    finally:
        if handler is not None:
            logger.removeHandler(handler)
            logger.setLevel(level)


@contextlib.contextmanager
def still_running(what: str) -> Iterator[None]:
    """A line every ``LOG_INTERVAL`` seconds while the block runs (``what: still running, 20 s``), for one long
    call that reports nothing itself (a libsvm or lbfgs fit on 20,000 rows, a compile): without it such a call
    left the log silent for minutes. Nothing when quiet; the first line as ``next_line`` says."""
    if _QUIET:
        yield
        return
    import threading

    stop, started = threading.Event(), time.monotonic()
    interval = max(LOG_INTERVAL, 0.1)  # a test's interval of 0: ten lines a second, not a busy loop

    def beat() -> None:
        global _last_line
        while not stop.wait(max(0.0, next_line(_last_line, started, interval) - time.monotonic())):
            if time.monotonic() >= next_line(_last_line, started, interval):  # no progress line came meanwhile
                write_line(f"{what}: still running, {time.monotonic() - started:.0f} s")
                _last_line = time.monotonic()

    thread = threading.Thread(target=beat, name="still-running", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def write_line(text: str) -> None:
    """One whole line on stderr from any thread: above a drawn bar (tqdm's write), in one write call elsewhere, so
    it never lands inside another line."""
    if _interactive():
        _auto_tqdm().write(text, file=sys.stderr)
    else:
        sys.stderr.write(text + "\n")
        sys.stderr.flush()


def next_line(last: float, started: float, interval: float) -> float:
    """When a block that started at ``started`` writes its next ``still_running`` line: an interval after this
    module's last line (``last``), not before the block has run a tenth of it (at most 1 s: a quick step writes
    nothing), so that consecutive long steps keep a line every interval (each waiting its own interval left 19 s
    between compare-sklearn's two references); an interval after the start when the last line is older than two
    intervals (the log said something else since, most likely)."""
    if last < started - 2 * interval:
        return started + interval
    return max(last + interval, started + min(1.0, interval / 10))


def in_notebook() -> bool:
    """Whether this process is a running Jupyter kernel (not merely one that imported ipykernel)."""
    ipython = sys.modules.get("IPython")
    if ipython is None or "ipykernel" not in sys.modules:
        return False
    try:
        shell = ipython.get_ipython()
    except Exception:  # noqa: BLE001 (an IPython too old or too odd to ask)
        return False
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def _interactive() -> bool:
    """A terminal or a Jupyter kernel: somewhere a redrawn bar makes sense."""
    return bool(getattr(sys.stderr, "isatty", lambda: False)()) or in_notebook()


class LogProgress:
    """The part of tqdm's interface the stages use, writing a plain line every ``interval`` seconds."""

    def __init__(self, total: Optional[int] = None, desc: str = "", unit: str = "it", initial: int = 0,
                 interval: Optional[float] = None, file=None, **_ignored):
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.interval, self.file = LOG_INTERVAL if interval is None else interval, file
        self.start_n, self.started = initial, time.monotonic()
        self.last = self.started
        self.postfix = ""

    def update(self, k: int = 1) -> None:
        self.n += k
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            self.write_line(now)

    def set_postfix(self, refresh: bool = True, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def write_line(self, now: float) -> None:
        elapsed = now - self.started
        rate = (self.n - self.start_n) / elapsed if elapsed > 0 else 0.0
        done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        eta = f", eta {(self.total - self.n) / rate:.0f} s" if self.total and rate > 0 else ""
        extra = f", {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {done}{pct}, {rate:.1f} {self.unit}/s{eta}{extra}", file=self.file or sys.stderr,
              flush=True)
        global _last_line
        _last_line = now

    def write(self, line: str, file=None) -> None:
        print(line, file=file or self.file or sys.stderr, flush=True)

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _Silent(LogProgress):
    """What ``progress`` returns when quiet: counts, and writes nothing (not even ``write`` lines)."""

    def update(self, k: int = 1) -> None:
        self.n += k

    def write(self, line: str, file=None) -> None:
        pass


def _auto_tqdm():
    """tqdm.auto's class: a widget in Jupyter with ipywidgets, else the text bar (without tqdm's warning)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*IProgress not found.*")
        from tqdm.auto import tqdm
    return tqdm


class Advancing:
    """Wrap an iterable so each item advances ``bar`` (closed after the last): a bar made before ``quiet``
    silenced what runs inside, or a ``progress(iterable)``."""

    def __init__(self, iterable, bar):
        self.iterable, self.bar = iterable, bar

    def __iter__(self):
        try:
            for item in self.iterable:
                yield item
                self.bar.update(1)
        finally:
            self.bar.close()


def progress(iterable=None, *, total: Optional[int] = None, desc: str = "", unit: str = "it", initial: int = 0,
             leave: bool = True, **kwargs):
    """A progress bar (tqdm.auto) where one can be drawn, periodic log lines elsewhere, nothing when quiet.

    Used like tqdm: ``bar = progress(total=n, desc="extract", unit="img"); bar.update(k); bar.close()``,
    or ``for x in progress(items, desc=...)``.
    """
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if _QUIET:
        bar = _Silent(total=total, desc=desc, unit=unit, initial=initial)
        return Advancing(iterable, bar) if iterable is not None else bar
    if not _interactive():
        bar = LogProgress(total=total, desc=desc, unit=unit, initial=initial)
        return Advancing(iterable, bar) if iterable is not None else bar

    tqdm = _auto_tqdm()
    return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, leave=leave, file=sys.stderr,
                dynamic_ncols=True, **kwargs)
