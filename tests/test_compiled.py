"""CompiledNet without a real compile: static batch padding, the eager fallback, and when auto compiles."""
from __future__ import annotations

import logging

import pytest
import torch

from pipeline.extraction.compiled import CompiledNet
from pipeline.extraction.extract_range import COMPILE_MIN_IMAGES, should_compile

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).eval()


def test_a_short_batch_is_padded_to_the_compiled_size_and_trimmed(monkeypatch):
    seen = []

    def fake_compile(module, **kw):
        assert kw.get("dynamic") is False  # compiled for static shapes: one compile per run
        return lambda x: (seen.append(tuple(x.shape)), module(x))[1]

    monkeypatch.setattr(torch, "compile", fake_compile)
    m = net()
    c = CompiledNet(m)
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(c(x), m(x), atol=1e-6)  # channels_last: other kernels on some CPUs (last bits)
        short = c(x[:3])
        long = c(torch.cat([x, x]))  # more rows than compiled for: in chunks of the compiled size
    assert seen == [(5, 3, 8, 8)] * 4
    assert short.shape[0] == 3 and torch.allclose(short, m(x[:3]), atol=1e-6)
    assert long.shape[0] == 10 and torch.allclose(long[5:], m(x), atol=1e-6)
    assert c.batch == 5 and c.compile_seconds > 0 and not c.failed


def test_a_small_first_batch_compiles_for_the_batch_size_asked(monkeypatch):
    """extract's first batch may be mostly rows reused from other caches: later full batches must not be
    split into calls of that first batch's size."""
    seen = []
    monkeypatch.setattr(torch, "compile", lambda module, **kw: lambda x: (seen.append(len(x)), module(x))[1])
    m = net()
    c = CompiledNet(m, batch=4)
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(c(x[:1]), m(x[:1]), atol=1e-6)  # padded up to 4, trimmed to 1
        assert torch.allclose(c(x), m(x), atol=1e-6)
    assert seen == [4, 4] and c.batch == 4 and c.first_images == 1


def test_a_failing_compile_warns_once_and_runs_eagerly(monkeypatch, caplog):
    calls = []

    def broken(x):
        calls.append(1)
        raise RuntimeError("Compiler: cc not found\nmore detail")

    monkeypatch.setattr(torch, "compile", lambda module, **kw: broken)
    m = net()
    c = CompiledNet(m)
    x = torch.randn(2, 3, 8, 8)
    with caplog.at_level(logging.WARNING, logger="pipeline.extraction.compiled"), torch.no_grad():
        first, second = c(x), c(x)
    assert c.failed and len(calls) == 1  # not retried for every batch
    assert torch.equal(first, m(x)) and torch.equal(second, m(x))
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "torch.compile failed (RuntimeError: Compiler: cc not found)" in warnings[0]


def test_after_compiling_errors_propagate_and_out_of_memory_turns_eager(monkeypatch):
    outcomes = iter([None, ValueError("bad input"), torch.cuda.OutOfMemoryError("CUDA out of memory")])

    def flaky(module):
        def run(x):
            error = next(outcomes)
            if error is not None:
                raise error
            return module(x)
        return run

    monkeypatch.setattr(torch, "compile", lambda module, **kw: flaky(module))
    m = net()
    c = CompiledNet(m)
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        c(x)  # compiled
        with pytest.raises(ValueError, match="bad input"):  # a real error, not a reason to go eager
            c(x)
        assert not c.failed
        with pytest.raises(torch.cuda.OutOfMemoryError):  # for device.AdaptiveBatch to halve the batch ...
            c(x)
        assert c.failed and torch.equal(c(x[:2]), m(x[:2]))  # ... whose halves then run eagerly, unpadded


@pytest.mark.parametrize("choice, precision, device, images, want", [
    ("on", "bf16", CPU, 1, True), ("off", "int8", CPU, 10 ** 6, False),
    ("auto", "int8", CPU, 1, True),  # int8 eager is barely faster than bf16; compiled about twice
    ("auto", "bf16", CPU, COMPILE_MIN_IMAGES - 1, False), ("auto", "bf16", CPU, COMPILE_MIN_IMAGES, True),
    ("auto", "bf16", CUDA, 10 ** 6, False),
])
def test_when_compile_auto_compiles(choice, precision, device, images, want):
    assert should_compile(choice, precision, device, images) is want


def test_the_compile_cache_lives_in_the_project_and_is_warm_for_a_later_process(monkeypatch, tmp_path):
    """Inductor's caches go to <one-offs>/inductor while compiling (not the environment's default), and a
    second compile of the same network there is reported warm."""
    import os

    from torch._inductor.runtime.cache_dir_utils import cache_dir

    seen = []
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)

    def fake_compile(module, **kw):
        return lambda x: (seen.append(cache_dir()), module(x))[1]

    monkeypatch.setattr(torch, "compile", fake_compile)
    x = torch.randn(2, 3, 8, 8)
    first, second = CompiledNet(net(), cache_folder=tmp_path), CompiledNet(net(), cache_folder=tmp_path)
    first(x)
    second(x)
    assert seen == [str((tmp_path / "inductor").resolve())] * 2 and "TORCHINDUCTOR_CACHE_DIR" not in os.environ
    assert (first.cache, second.cache) == ("cold", "warm")
    other = CompiledNet(torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3)).eval(), cache_folder=tmp_path)
    other(x)
    assert other.cache == "cold"  # another network: its kernels are not there


def test_eager_first_runs_a_few_images_eagerly_before_compiling(monkeypatch):
    """A head's int8 network (predict, serve) compiles only once a few batches have run: a call on one photo
    never waits for a compile."""
    compiled_calls = []

    def fake_compile(module, **kw):
        return lambda x: (compiled_calls.append(len(x)), module(x))[1]

    monkeypatch.setattr(torch, "compile", fake_compile)
    c = CompiledNet(net(), eager_first=4)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        c(x), c(x)
        assert compiled_calls == [] and c.batch is None
        c(x)
    assert compiled_calls == [2] and c.batch == 2


def test_a_long_compile_says_it_is_still_running(monkeypatch, tmp_path, capsys):
    """Compiling happens inside the first call and said nothing until it ended (12.8 s for the tiny test network
    cold, tens of seconds for VGG-16): a line every interval now says it is still compiling; later calls none."""
    import time

    import pipeline.progress as pg

    def slow_compile(module, **kw):
        return lambda x: (time.sleep(0.35), module(x))[1]

    monkeypatch.setattr(torch, "compile", slow_compile)
    monkeypatch.setattr(pg, "LOG_INTERVAL", 0.0)
    c = CompiledNet(net(), batch=4, cache_folder=tmp_path)
    with torch.no_grad():
        c(torch.randn(4, 3, 8, 8))
        lines = capsys.readouterr().err.splitlines()
        c(torch.randn(4, 3, 8, 8))
    assert lines and all(line.startswith("compiling the network for batches of 4 (once): still running, ")
                         for line in lines)
    assert capsys.readouterr().err == ""
