"""Device and numeric-precision choices shared by every stage that runs a model."""
from __future__ import annotations

import contextlib
import logging
import os
import re
from typing import Callable, Optional

from .config import DEVICES, PRECISIONS, option_text
from .errors import DeviceMissing, UsageError

log = logging.getLogger(__name__)


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one, e.g. in a container)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def resolve_workers(workers: int, share: int = 1) -> int:
    """Decoding processes: -1 = the machine's cores divided by ``share`` processes (1 to 8), 0 = in-process.

    More than the cores (per process sharing them) is capped there with a warning: each worker is
    a process, and ``--workers 1000`` would otherwise start a thousand of them.
    """
    if workers < -1:
        raise UsageError(f"{option_text('workers')} must be -1 (one per core), 0 (decode in-process) or positive, "
                         f"got {workers}")
    cores = max(1, available_cores() // max(1, share))
    if workers == -1:
        return min(8, cores)
    if workers > cores:
        log.warning("%s is more than the %d CPU cores available%s; using %d", option_text("workers", workers), cores,
                    f" to each of {share} processes" if share > 1 else "", cores)
        return cores
    return workers


#: The names ``--device`` takes.
DEVICE_NAME = re.compile(r"auto|cpu|cuda(:\d+)?")


def check_device_name(device, what: str = "") -> None:
    """A UsageError for a name that is no device, without torch: the API's image methods check it before a model
    loads (``device='gpu'`` was refused only after). ``what``: the caller's prefix ('predict: ')."""
    if not isinstance(device, str) or not DEVICE_NAME.fullmatch(device):
        raise UsageError(f"{what}unknown device {device!r}; allowed: {', '.join(DEVICES)} (or cuda:N)")


def resolve_device(device: str = "auto"):
    """'auto' -> CUDA when available, else CPU. 'cuda:1' style names are accepted too. A name that is no device
    is a UsageError (exit 2); a device this machine lacks is ``DeviceMissing`` (exit 1, the environment's)."""
    import torch

    check_device_name(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceMissing(f"device {device!r} asked for, but CUDA is not available here; use "
                            f"{option_text('device', 'cpu')}")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UsageError(f"unknown device {device!r}; allowed: {', '.join(DEVICES)} (or cuda:N)") from None
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise DeviceMissing(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def cpu_flags() -> set:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none), read without torch, so that
    choices made from them (extract's --precision auto) leave a cache hit torch-free."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_has_bf16() -> bool:
    """True when the CPU has native bf16 dot products (AVX-512 BF16 or AMX), where bf16 pays off. oneDNN's own
    check also says yes on x86 CPUs with AVX-512 but no BF16 (it emulates bf16 there): VGG-16 ran 2.2x slower
    under bf16 autocast than in fp32 on such a Xeon, so on x86 the native instructions are asked for too."""
    import platform

    import torch

    try:
        if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
            return False
    except (AttributeError, RuntimeError):
        return False
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return True
    native = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if all(callable(f) for f in native):
        return any(bool(f()) for f in native)
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def resolve_precision(precision: str, device, int8_ok: bool = False, asked: str = "auto") -> str:
    """'auto' -> bf16 on GPUs and CPUs that support it, else fp32 (never int8: that is asked for).

    int8 (``int8_ok``: extraction only) runs a calibrated, quantised copy of the network on the CPU. fp16 needs
    CUDA: with ``asked`` (the --device given) 'auto' on a machine without it, the same command runs on a GPU
    machine, so the environment's (``DeviceMissing``, exit 1); ``--device cpu --precision fp16`` contradicts
    itself on every machine, a usage error (exit 2).
    """
    import torch

    allowed = PRECISIONS if int8_ok else tuple(p for p in PRECISIONS if p != "int8")
    if precision not in allowed:
        raise UsageError(f"unknown precision {precision!r}; allowed: {', '.join(allowed)}")
    if precision == "int8":
        if device.type != "cpu":
            raise UsageError("precision 'int8' runs on the CPU only (oneDNN int8 kernels): use "
                             f"{option_text('device', 'cpu')}, or bf16 on CUDA")
        return precision  # the caller checks that torchao is installed
    if precision != "auto":
        if precision == "fp16" and device.type == "cpu" and asked == "auto":
            raise DeviceMissing(f"precision 'fp16' needs a CUDA device, and {option_text('device', 'auto')} found "
                                "none here (it resolved to the CPU); on the CPU use "
                                f"{option_text('precision', 'bf16', 'fp32')}")
        if precision == "fp16" and device.type == "cpu":
            raise UsageError(f"precision 'fp16' needs a CUDA device, not {option_text('device', asked)}; on the CPU "
                             "use bf16 or fp32")
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_bf16() else "fp32"


def autocast(device, precision: str):
    """The autocast context for a resolved precision (a no-op for fp32 and int8: int8 is a quantised network)."""
    import torch

    if precision in ("fp32", "int8"):
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


class AdaptiveBatch:
    """Run ``fn`` over a batch in chunks, halving the chunk on a CUDA out-of-memory error.

    A too-large ``--batch-size`` then slows a GPU run instead of ending it: the failing batch is
    retried in halves (results identical to an unsplit pass, rows kept in order), and the smaller
    chunk is kept for the batches that follow. Only a single row that does not fit is an error.
    """

    def __init__(self, fn: Callable, on_oom: Optional[Callable[[], None]] = None):
        self.fn, self.on_oom = fn, on_oom
        self.chunk: Optional[int] = None  # the largest batch known to fit; None = not limited yet

    def __call__(self, x):
        import numpy as np
        import torch

        from .errors import PipelineError

        k = len(x)
        while True:
            step = min(k, self.chunk or k)
            try:
                if step == k:
                    return self.fn(x)
                out = None
                for s in range(0, k, step):
                    y = self.fn(x[s:s + step])
                    if out is None:
                        out = np.empty((k, *y.shape[1:]), y.dtype)
                    out[s:s + len(y)] = y
                return out
            except torch.cuda.OutOfMemoryError:
                if step == 1:
                    raise PipelineError("the device ran out of memory on a single image; "
                                        f"free GPU memory or use {option_text('device', 'cpu')}") from None
            self.chunk = step // 2
            log.warning("device out of memory at batch %d; retrying in batches of %d", step, self.chunk)
            if self.on_oom is not None:
                self.on_oom()
