"""torch.compile for the extraction backbone: compiled once for the batch size, eager when it cannot be.

Why this shape: compiling takes tens of seconds on a small CPU, and every new input shape would
compile again, so the network is compiled for static shapes once (the first batch's), and a
shorter last batch is padded to that size (its padding rows are dropped). Inductor's freezing
(weights folded into the kernels, the recommended mode for CPU inference) is switched on around
each call, because ``torch.compile(options={"freezing": True})`` does not reach a quantised graph.
A failure while compiling (no C++ compiler, an unsupported operator) warns once and runs the
eager module from then on, so ``--compile`` never ends an extraction; later errors are real ones
and propagate (a CUDA out-of-memory also switches to eager, so the halved retries stay halved).
Compiled rows may differ from eager ones in the last bits, as with another batch size or cuDNN
algorithm: the cache's key leaves it out, as it leaves those out.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional

import torch
import torch._inductor.config as inductor_config

from ..files import first_line
from ..progress import still_running

log = logging.getLogger(__name__)


class CompiledNet:
    """``net`` compiled with Inductor; ``fallback`` (default ``net``) runs when compiling fails."""

    def __init__(self, net, fallback=None, batch: Optional[int] = None, cache_folder: Optional[Path] = None,
                 eager_first: int = 0):
        self.net = net
        # run the first ``eager_first`` images eagerly: a short call (predict on a photo) never waits for a compile
        self.eager_left = eager_first
        self.eager = fallback if fallback is not None else net
        # the project's one-offs folder: Inductor's kernels kept there for later processes (``oneoffs``)
        self.cache_folder = cache_folder
        self.cache = ""  # after compiling: 'warm' (an earlier process compiled this network here) or 'cold'
        self.compiled = torch.compile(net, dynamic=False)
        self.failed = False  # compiling failed (or the compiled network ran out of device memory): eager
        # the batch size to compile for: a smaller first call (extract's first batch holding rows reused from
        # other caches) is padded up to it, so later full batches are not split into calls of that size
        self.wanted = batch
        self.batch: Optional[int] = None  # the batch size compiled for (``wanted``, or the first call's)
        self.compile_seconds = 0.0  # the first call's time (compiling + one batch)
        self.first_images = 0  # how many images that first call ran

    def __call__(self, x):
        n = len(x)
        if self.failed or self.eager_left > 0:
            self.eager_left -= n
            return self.eager(x)
        if self.batch is None:
            return self._first(x)
        if n > self.batch:  # not produced by extract (batches never grow), but keep it correct
            return torch.cat([self(x[s:s + self.batch]) for s in range(0, n, self.batch)])
        try:
            return self._run(self._padded(x))[:n]
        except torch.cuda.OutOfMemoryError:
            # eager from now on, so that devices.AdaptiveBatch's smaller retries are not padded back up
            self.failed = True
            log.warning("the compiled network ran out of device memory at batch %d; running it eagerly", self.batch)
            raise

    def _padded(self, x):
        n = len(x)
        return x if n == self.batch else torch.cat([x, x.new_zeros((self.batch - n, *x.shape[1:]))])

    def _first(self, x):
        """Compile (inside the first call) for batches of ``wanted`` or ``x``'s size, the larger; any failure
        but out-of-memory -> eager."""

        from .oneoffs import compile_cache, compiled_signature

        n = self.first_images = len(x)
        self.batch, started = max(n, self.wanted or 0), time.perf_counter()
        try:
            with compile_cache(self.cache_folder) as folder:
                marker = folder / "pipeline-compiled" / compiled_signature(self.net, self.batch, x)
                warm = marker.exists()
                with still_running(f"compiling the network for batches of {self.batch} (once)"):
                    y = self._run(self._padded(x))[:n]
        except torch.cuda.OutOfMemoryError:
            self.batch = self.wanted = None  # devices.AdaptiveBatch retries smaller: compile for that size then
            raise
        except Exception as e:  # noqa: BLE001 -- whatever fails while compiling, the eager module still works
            self.failed = True
            log.warning("torch.compile failed (%s: %s); running the network eagerly", type(e).__name__,
                        first_line(e, 200))
            return self.eager(x)
        self.compile_seconds = time.perf_counter() - started
        self.cache = "warm" if warm else "cold"
        try:
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
        except OSError:
            pass  # a read-only cache: the next process is told cold, and compiles as fast
        log.info("compiled the network in %.1f s (batch %d; compile cache %s: %s)", self.compile_seconds,
                 self.batch, self.cache, folder)
        return y

    def _run(self, x):
        with torch.no_grad(), inductor_config.patch(freezing=True):
            return self.compiled(x.contiguous(memory_format=torch.channels_last))
