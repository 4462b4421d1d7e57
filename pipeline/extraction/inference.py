"""The one way a network runs on images here: batched, on a device and precision, bad files reported.

extract runs a backbone's feature part through ``Inference``; evaluate, predict and train's
validation run whole models through ``Inference`` and ``run_batches``. So the same model on the
same folder gives the same numbers in every command.
"""
from __future__ import annotations

import time
from typing import Iterable, Iterator, Optional

import numpy as np
import torch

from ..data.image_reader import Batch, Item, batches
from ..devices import AdaptiveBatch, autocast


def mirror_mean(features, x):
    """The mean of the maps of ``x`` and of its mirror image, the mirror's map mirrored back: a map that
    does not change when the photo is flipped left-right, and a steadier one (test-time augmentation
    folded into the features, so every head and every view gets it at no cost of its own)."""
    return (features(x) + features(x.flip(-1)).flip(-1)) / 2


class MirrorMean(torch.nn.Module):
    """``mirror_mean`` of a feature network, as a network (what extract --flip runs)."""

    def __init__(self, features):
        super().__init__()
        self.features = features

    def forward(self, x):
        return mirror_mean(self.features, x)


class Inference:
    """A network on a device and precision: a batch of image tensors -> a numpy array.

    Fast paths: channels_last weights and inputs (what oneDNN and cuDNN run fastest), autocast
    in bf16/fp16 (``precision``), on CUDA a page-locked staging buffer so the host-to-device copy
    is asynchronous, and a batch that runs out of GPU memory is split (``device.AdaptiveBatch``).
    The output is cast once, on the device, to ``out_dtype`` in plain NCHW layout (with
    ``pool='avg'``, globally averaged first). ``freeze`` (the default) makes the parameters
    require no gradient; train's validation passes False for the model it is training.
    With precision 'int8', ``net`` is already quantised (``quantize.quantize_int8``); ``compile``
    runs it through ``compiled.CompiledNet`` for batches of ``compile_batch`` (default: the first call's size;
    its ``compile_seconds`` says what compiling cost), its kernels kept in ``cache_folder`` (``oneoffs``).
    """

    def __init__(self, net, device, precision: str, pool: str = "none", out_dtype: str = "float32",
                 freeze: bool = True, compile: bool = False, compile_batch: Optional[int] = None,
                 cache_folder=None):
        self.device, self.precision, self.pool, self.out_dtype = device, precision, pool, np.dtype(out_dtype)
        self.torch_out = getattr(torch, self.out_dtype.name)
        # a quantised graph holds prepacked oneDNN weights: it stays as built (CPU, channels_last inside)
        self.net = net if precision == "int8" else net.to(device, memory_format=torch.channels_last)
        self.exported = precision == "int8"  # an exported graph: always in eval mode (it has no .eval())
        if freeze and not self.exported:
            self.net.eval()
            for p in self.net.parameters():
                p.requires_grad_(False)
        self.cuda = device.type == "cuda"
        if self.cuda:
            torch.backends.cudnn.benchmark = True  # every batch has the same input size
        self._staging = None  # pinned host buffer the batches are stacked into (CUDA only)
        self.busy_seconds = 0.0  # time spent in __call__ (the model's share of a run, for profiles)
        self.compiled = None
        if compile:
            from .compiled import CompiledNet

            # int8: compile the quantise/dequantise graph (Inductor fuses it), the lowered one is the fallback
            self.compiled = CompiledNet(getattr(self.net, "converted", self.net), fallback=self.net,
                                        batch=compile_batch, cache_folder=cache_folder)
        self.run = AdaptiveBatch(self._forward, on_oom=torch.cuda.empty_cache if self.cuda else None)

    @property
    def compile_seconds(self) -> float:
        """What the first compiled call took (compiling + one batch); 0 when not compiled."""
        return self.compiled.compile_seconds if self.compiled is not None else 0.0

    @property
    def compile_cache(self) -> str:
        """'warm' (an earlier process compiled this network into the same cache), 'cold', or '' (not compiled)."""
        return self.compiled.cache if self.compiled is not None and not self.compiled.failed else ""

    def stack(self, tensors: list):
        """Stack per-image tensors into one batch; on CUDA straight into pinned memory."""

        if not self.cuda or tensors[0].device.type == "cuda":  # decoded on the GPU already
            return torch.stack(tensors)
        shape = (len(tensors), *tensors[0].shape)
        buf = self._staging
        if buf is None or buf.shape[0] < shape[0] or buf.shape[1:] != shape[1:] or buf.dtype != tensors[0].dtype:
            buf = self._staging = torch.empty(shape, dtype=tensors[0].dtype, pin_memory=True)
        return torch.stack(tensors, out=buf[:shape[0]])

    def __call__(self, x) -> np.ndarray:
        """``x``: a (B, 3, H, W) float tensor or a list of (3, H, W) tensors -> (B, ...) array."""
        started = time.perf_counter()
        if isinstance(x, (list, tuple)):
            x = self.stack(list(x))
        if not self.exported:
            self.net.eval()
        out = self.run(x)
        self.busy_seconds += time.perf_counter() - started
        return out

    def _forward(self, x) -> np.ndarray:


        with torch.inference_mode():
            with autocast(self.device, self.precision):
                y = (self.compiled or self.net)(x.to(self.device, non_blocking=True)
                                                .contiguous(memory_format=torch.channels_last))
            if self.pool == "avg":
                y = torch.nn.functional.adaptive_avg_pool2d(y.float(), 1)
            # one cast + relayout on the device; .cpu() copies only from a GPU (and synchronises,
            # so the pinned staging buffer is free again for the next batch)
            y = y.to(self.torch_out, memory_format=torch.contiguous_format).cpu()
        return y.numpy()


def run_batches(inference: Inference, items: Iterable[Item], batch_size: int,
                limit: Optional[int] = None) -> Iterator[tuple[Batch, Optional[np.ndarray]]]:
    """(batch, outputs of its good images or None) for consecutive batches of ``items``, in order."""
    for batch in batches(items, batch_size, limit):
        good = batch.good
        yield batch, (inference([g.image for g in good]) if good else None)
