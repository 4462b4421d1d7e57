"""Dynamic micro-batching: images from requests that arrive together go through the network as one batch.

One worker thread owns the network. A request hands in its images and gets a Future; the worker
takes what is waiting (at most ``batch_size`` images), waiting up to ``max_wait_s`` for more once the
first came, runs them in one forward pass, and resolves each request's Future with its own rows of the
output. The queue is bounded in images, so a flood is refused (``QueueFull``) instead of growing memory
and latency without end; a request takes its room (``reserve``) before its images are decoded, so a
refused request costs no decoding either.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from typing import Callable

import numpy as np


class QueueFull(Exception):
    """More images are waiting than the batcher holds: come back later."""


class Closed(Exception):
    """The batcher is shutting down and takes no new work."""


class _Job:
    """One request's images: its Future resolves with their outputs, in order, once the last one ran."""

    def __init__(self, n: int):
        self.future: Future = Future()
        self.outputs: list = [None] * n
        self.left = n

    def done(self, i: int, output) -> None:
        self.outputs[i] = output
        self.left -= 1
        if self.left == 0 and not self.future.done():
            self.future.set_result(np.stack(self.outputs))


class MicroBatcher:
    """``run(list of image tensors) -> (B, ...) array``, fed from many threads, run by one.

    ``submit(images)`` returns a Future of the images' (n, ...) outputs; ``close()`` runs what is
    queued, then stops the worker. ``batches`` and ``images`` count what ran (the batch sizes show
    whether requests were really batched together).
    """

    def __init__(self, run: Callable, batch_size: int, max_wait_s: float, max_queue: int):
        self.run, self.batch_size, self.max_wait_s, self.max_queue = run, batch_size, max_wait_s, max_queue
        self._queue: deque = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._reserved = 0  # room taken by requests whose images are still being decoded
        self.batches = self.images = 0
        self._thread = threading.Thread(target=self._loop, name="micro-batcher", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def reserve(self, n: int) -> Reservation:
        """Room for ``n`` images, taken now, before they are decoded (QueueFull or Closed when there is none):
        counted with the images waiting, until the reservation submits them or is released."""
        with self._cond:
            self._check_room(n, 0)
            self._reserved += n
        return Reservation(self, n)

    def submit(self, images: list, reserved: int = 0) -> Future:
        """The images' outputs, as a Future; ``reserved``: room taken for them by ``reserve`` (given back now)."""
        if not images:
            raise ValueError("nothing to run")
        job = _Job(len(images))
        with self._cond:
            self._check_room(len(images), reserved)
            self._reserved -= reserved
            self._queue.extend((job, i, im) for i, im in enumerate(images))
            self._cond.notify()
        return job.future

    def _check_room(self, n: int, reserved: int) -> None:
        if self._closed:
            raise Closed("the service is shutting down")
        if len(self._queue) + self._reserved - reserved + n > self.max_queue:
            raise QueueFull(f"{len(self._queue)} images are waiting and {self._reserved - reserved} being decoded "
                            f"(at most {self.max_queue})")

    def release(self, n: int) -> None:
        with self._cond:
            self._reserved -= n

    def close(self, timeout: float | None = None) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout)

    def _take(self) -> list:
        """The next batch: what waits, once the first image waited max_wait_s for company (or the batch is full)."""
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if not self._queue:
                return []
            deadline = time.monotonic() + self.max_wait_s
            while len(self._queue) < self.batch_size and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            return [self._queue.popleft() for _ in range(min(self.batch_size, len(self._queue)))]

    def _loop(self) -> None:
        while True:
            batch = self._take()
            if not batch:
                return
            try:
                out = self.run([im for _, _, im in batch])
            except Exception as e:  # the network failed: every request in the batch hears why
                for job in {id(j): j for j, _, _ in batch}.values():
                    if not job.future.done():
                        job.future.set_exception(e)
                continue
            self.batches += 1
            self.images += len(batch)
            for (job, i, _), o in zip(batch, out):
                job.done(i, o)


class Reservation:
    """Room for a request's images in the batcher's queue, held while they are decoded: ``submit`` the good
    ones (at most as many as reserved), and the rest goes back when the ``with`` block ends."""

    def __init__(self, batcher: MicroBatcher, n: int):
        self.batcher, self.left = batcher, n

    def submit(self, images: list) -> Future:
        if len(images) > self.left:
            raise ValueError(f"{len(images)} images for {self.left} reserved")
        future = self.batcher.submit(images, reserved=len(images))
        self.left -= len(images)
        return future

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.batcher.release(self.left)
        self.left = 0
