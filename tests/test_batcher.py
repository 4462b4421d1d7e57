"""The micro-batcher: concurrent submissions share a forward pass, each gets its own outputs, a full queue refuses."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from pipeline.serving.batcher import Closed, MicroBatcher, QueueFull


class Recorder:
    """A 'network' that doubles its inputs, records each batch's size, and holds the first batch until released."""

    def __init__(self):
        self.sizes, self.release, self.started = [], threading.Event(), threading.Event()

    def __call__(self, images):
        self.started.set()
        self.release.wait(10)
        self.sizes.append(len(images))
        return np.array(images, dtype=np.float64)[:, None] * 2


def test_images_waiting_together_run_as_one_batch_and_come_back_to_their_request():
    run = Recorder()
    b = MicroBatcher(run, batch_size=16, max_wait_s=0.0, max_queue=32)
    first = b.submit([1.0])
    assert run.started.wait(10)  # the worker holds the first batch: the next requests queue up meanwhile
    later = [b.submit([10.0 * k, 10.0 * k + 1]) for k in range(1, 5)]
    run.release.set()
    assert first.result(10).tolist() == [[2.0]]
    for k, f in enumerate(later, 1):
        assert f.result(10).tolist() == [[20.0 * k], [20.0 * k + 2]]
    b.close(10)
    assert run.sizes == [1, 8] and (b.batches, b.images) == (2, 9)


def test_a_batch_never_exceeds_batch_size_and_a_request_may_span_two():
    run = Recorder()
    run.release.set()
    b = MicroBatcher(run, batch_size=3, max_wait_s=0.05, max_queue=32)
    f = b.submit([1.0, 2.0, 3.0, 4.0, 5.0])
    assert f.result(10)[:, 0].tolist() == [2.0, 4.0, 6.0, 8.0, 10.0]
    b.close(10)
    assert max(run.sizes) <= 3 and sum(run.sizes) == 5


def test_a_full_queue_refuses_and_a_closed_batcher_takes_nothing():
    run = Recorder()
    b = MicroBatcher(run, batch_size=1, max_wait_s=0.0, max_queue=4)
    b.submit([1.0])
    assert run.started.wait(10)
    b.submit([1.0, 2.0, 3.0, 4.0])  # the queue holds 4 while the first runs
    with pytest.raises(QueueFull, match="4 images are waiting"):
        b.submit([5.0])
    run.release.set()
    b.close(10)
    with pytest.raises(Closed):
        b.submit([1.0])
    assert sum(run.sizes) == 5  # close ran what was queued


def test_a_failing_network_fails_only_its_batch():
    calls = []

    def run(images):
        calls.append(images)
        if len(calls) == 1:
            raise RuntimeError("out of memory")
        return np.zeros((len(images), 1))

    b = MicroBatcher(run, batch_size=8, max_wait_s=0.0, max_queue=8)
    with pytest.raises(RuntimeError, match="out of memory"):
        b.submit([1.0]).result(10)
    assert b.submit([1.0]).result(10).shape == (1, 1)
    b.close(10)


def test_room_is_reserved_before_decoding_and_given_back():
    """serve takes room for a request's files before decoding them: a full queue refuses it up front, the images
    it then submits use the room it holds, and what it does not use (bad files) goes back."""
    run = Recorder()
    run.release.set()
    b = MicroBatcher(run, batch_size=16, max_wait_s=0.0, max_queue=4)
    with b.reserve(3) as held:
        with pytest.raises(QueueFull, match="3 being decoded"):
            b.reserve(2)
        assert b.reserve(1).left == 1  # 3 + 1: full (this one never given back, held to the end)
        assert held.submit([1.0, 2.0]).result(10).ravel().tolist() == [2.0, 4.0]  # within its own room
    with pytest.raises(QueueFull):
        b.reserve(4)  # the unreleased reservation of 1 still counts
    b.release(1)
    with b.reserve(4):
        pass
    b.close(10)
    with pytest.raises(Closed):
        b.reserve(1)
