import numpy as np
import pytest
import torch
from torch import nn

import pipeline.devices as dev
from pipeline.config import cli_terms
from pipeline.devices import AdaptiveBatch, autocast, resolve_precision, resolve_workers
from pipeline.errors import PipelineError
from pipeline.extraction.inference import Inference

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize("has_bf16, want", [(True, "bf16"), (False, "fp32")])
def test_auto_precision_on_cpu_follows_bf16_support(monkeypatch, has_bf16, want):
    monkeypatch.setattr(dev, "cpu_has_bf16", lambda: has_bf16)
    assert resolve_precision("auto", CPU) == want


@pytest.mark.parametrize("bf16, want", [(True, "bf16"), (False, "fp16")])
def test_auto_precision_on_cuda(monkeypatch, bf16, want):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert resolve_precision("auto", CUDA) == want


def test_explicit_precisions_and_bad_ones():
    assert [resolve_precision(p, CPU) for p in ("fp32", "bf16")] == ["fp32", "bf16"]
    assert resolve_precision("fp16", CUDA) == "fp16"
    with pytest.raises(ValueError, match="fp16"):
        resolve_precision("fp16", CPU, asked="cpu")
    with pytest.raises(ValueError, match="allowed: auto, fp32, bf16, fp16"):
        resolve_precision("fp8", CPU)


def test_bf16_autocast_runs_convs_in_bf16_and_fp32_does_not():
    conv = nn.Conv2d(3, 4, 3)
    x = torch.randn(2, 3, 8, 8)
    with autocast(CPU, "bf16"):
        assert conv(x).dtype == torch.bfloat16
    with autocast(CPU, "fp32"):
        assert conv(x).dtype == torch.float32


class OomAbove(nn.Module):
    """Elementwise (so batch-size independent bit for bit) but 'runs out of memory' above ``limit`` rows."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit, self.calls = limit, []
        self.scale = nn.Parameter(torch.linspace(0.5, 2.0, 3).view(1, 3, 1, 1))

    def forward(self, x):
        self.calls.append(len(x))
        if len(x) > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return torch.relu(x * self.scale - 0.1)


def test_oom_halves_the_batch_and_gives_the_unsplit_result(caplog):
    x = torch.randn(10, 3, 4, 4)
    want = Inference(OomAbove(100), CPU, "fp32", "none", "float32")(x)
    net = OomAbove(3)
    model = Inference(net, CPU, "fp32", "none", "float32")
    got = model(list(x))
    np.testing.assert_array_equal(got, want)
    assert got.shape == (10, 3, 4, 4) and got.flags.c_contiguous
    assert net.calls[:3] == [10, 5, 2] and model.run.chunk == 2  # 10 fails, 5 fails, then 2s
    assert "out of memory at batch 10" in caplog.text and "batches of 2" in caplog.text
    net.calls.clear()
    np.testing.assert_array_equal(model(x[:4]), want[:4])
    assert net.calls == [2, 2]  # the smaller chunk is kept for later batches


def test_oom_on_a_single_row_is_a_clear_error():
    model = Inference(OomAbove(0), CPU, "fp32", "none", "float16")
    with pytest.raises(PipelineError, match="single image"):
        model(torch.randn(4, 3, 2, 2))


def test_adaptive_batch_passes_other_errors_through():
    def boom(x):
        raise RuntimeError("not memory")

    with pytest.raises(RuntimeError, match="not memory"):
        AdaptiveBatch(boom)(np.zeros((4, 2)))


def test_feature_model_output_is_storage_dtype_nchw_and_matches_fp32():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
    x = torch.rand(3, 3, 16, 16)
    with torch.inference_mode():
        want = net(x).numpy()
    out = Inference(net, CPU, "bf16", "none", "float16")(x)
    assert out.dtype == np.float16 and out.shape == (3, 8, 8, 8) and out.flags.c_contiguous
    got = out.astype(np.float32).ravel()
    cos = got @ want.ravel() / np.linalg.norm(got) / np.linalg.norm(want)
    assert cos > 0.999
    pooled = Inference(net, CPU, "fp32", "avg", "float32")(x)
    np.testing.assert_allclose(pooled[:, :, 0, 0], want.mean((2, 3)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("affinity", [True, False])
def test_workers_are_capped_at_the_cores_with_a_warning(monkeypatch, caplog, affinity):
    if affinity:
        monkeypatch.setattr(dev.os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    else:
        monkeypatch.delattr(dev.os, "sched_getaffinity", raising=False)
        monkeypatch.setattr(dev.os, "cpu_count", lambda: 3)
    assert resolve_workers(1000) == 3  # in the Python API's terms, and in the command line's under the CLI
    assert "workers=1000 is more than the 3 CPU cores available; using 3" in caplog.text
    with cli_terms():
        resolve_workers(1000)
    assert "--workers 1000 is more than the 3 CPU cores available; using 3" in caplog.text
    caplog.clear()
    assert (resolve_workers(2), resolve_workers(0), resolve_workers(-1)) == (2, 0, 3)
    assert resolve_workers(1000, share=3) == 1 and "each of 3 processes" in caplog.text


def test_a_device_this_machine_lacks_is_the_environments_error_and_a_name_that_is_none_a_usage_error(monkeypatch,
                                                                                                     tiny_cache):
    """--device cuda on a machine without CUDA exited 2, as a typo does; a valid value this machine lacks is the
    environment's (exit 1), as weights that cannot be downloaded are: the same command runs on a GPU machine."""
    from click.testing import CliRunner

    from pipeline.cli import cli
    from pipeline.errors import DeviceMissing

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("cuda", "cuda:1"):
        with pytest.raises(DeviceMissing, match="CUDA is not available here") as e:
            dev.resolve_device(name)
        assert isinstance(e.value, PipelineError) and not isinstance(e.value, ValueError)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(DeviceMissing, match="this machine has 1 CUDA device"):
        dev.resolve_device("cuda:7")
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        dev.resolve_device("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    run = CliRunner().invoke(cli, ["fit-head", "--cache", str(tiny_cache), "--device", "cuda"])
    assert run.exit_code == 1 and run.output == "Error: device 'cuda' asked for, but CUDA is not available here; use " \
        "--device cpu\n", run.output


def test_fp16_where_auto_found_no_cuda_is_the_environments_and_on_an_explicit_cpu_a_usage_error(
        image_folder, tmp_path, monkeypatch):
    """--precision fp16 with --device auto on a machine without CUDA was a usage error (exit 2) saying only 'needs a
    CUDA device': the same command runs on a GPU machine, so it is the environment's (exit 1), naming the device auto
    resolved to and what runs on the CPU. --device cpu --precision fp16 runs nowhere: still a usage error."""
    from click.testing import CliRunner

    from pipeline.cli import cli

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = ["extract", "--data", str(image_folder), "-n", "0", "--backbone", "tiny", "--weights", "none",
            "--workers", "0", "--precision", "fp16", "--cache-dir", str(tmp_path / "f")]
    auto = CliRunner().invoke(cli, args)
    assert auto.exit_code == 1, auto.output
    assert auto.stderr.strip().splitlines()[-1] == (
        "Error: precision 'fp16' needs a CUDA device, and --device auto found none here (it resolved to the CPU); "
        "on the CPU use --precision bf16 or fp32")
    cpu = CliRunner().invoke(cli, [*args, "--device", "cpu"])
    assert cpu.exit_code == 2 and cpu.stderr.strip().splitlines()[-1] == (
        "Error: precision 'fp16' needs a CUDA device, not --device cpu; on the CPU use bf16 or fp32"), cpu.output
    assert not list((tmp_path / "f").glob("*.h5"))  # refused before anything is computed


@pytest.mark.parametrize("avx512_bf16, amx, want", [(False, False, False), (True, False, True), (False, True, True)])
def test_bf16_counts_as_native_on_x86_only_with_avx512_bf16_or_amx(monkeypatch, avx512_bf16, amx, want):
    """oneDNN's check says bf16 is supported on any AVX-512 CPU, emulating it where the CPU has no BF16
    instructions (VGG-16 ran 2.2x slower than fp32 there): --precision auto then chose bf16 on such a Xeon."""
    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: True)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    assert dev.cpu_has_bf16() is want
    assert resolve_precision("auto", CPU) == ("bf16" if want else "fp32")


@pytest.mark.parametrize("flags, want", [({"avx512f"}, False), ({"avx512f", "avx512_bf16"}, True),
                                         ({"amx_tile", "amx_bf16"}, True)])
def test_without_torchs_cpu_checks_bf16_is_native_by_the_cpus_flags(monkeypatch, flags, want):
    """A torch without torch.cpu._is_avx512_bf16_supported or _is_amx_tile_supported: /proc/cpuinfo's flags."""
    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: True)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    monkeypatch.setattr(dev, "cpu_flags", lambda: flags)
    assert dev.cpu_has_bf16() is want


def test_bf16_off_x86_is_onednns_word(monkeypatch):
    """An Arm CPU (Graviton 3, Apple M2): oneDNN's check alone, as before."""
    monkeypatch.setattr("platform.machine", lambda: "aarch64")
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: True)
    for supported in (True, False):
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda s=supported: s)
        assert dev.cpu_has_bf16() is supported
