"""int8 on the CPU: static post-training quantisation of a backbone's feature part.

Route, chosen by measurement on torch 2.14 (README, "Performance"): torchao's pt2e flow with
the x86 Inductor quantizer (int8 per-channel symmetric weights, uint8 per-tensor activations),
lowered to oneDNN's int8 convolutions so that it runs eagerly, at any batch size and bitwise
deterministically, with no C++ compiler. Two choices differ from the quantizer's defaults, both
measured on VGG-16 and real photos (worst-image feature cosine vs fp32): activation ranges are
the calibration's min/max, not the histogram observer's clipped ones (0.9845 -> 0.9974: a photo
brighter than the calibration set is not clipped), and the network's last pooling layer is left
in float, so the features are not rounded to 256 levels on the way out (-> 0.9984).
``torch.ao.quantization``'s FX flow is as fast eagerly but deprecated (it warns on every use and
may go in any release); pt2e has left torch itself for torchao, which is therefore an optional
dependency (``pip install torchao``). Compiled (``compiled.CompiledNet``), int8 runs about twice
as fast as eagerly, which is why ``--compile auto`` compiles it.

The calibration sample is the first ``calib_n`` good images of the extraction's own seeded,
stratified order (or of ``calib_data``'s), decoded by the same transform; what it was, the method
and the library versions are part of the cache's fingerprint, so int8 features never mix with
other features or with another calibration's. A command that extracts a changed folder again (extract without
--calib-data: ``own_lender``; audit's refresh, suggest) lends it its earlier cache's calibration instead
(``lent_calibration``): calibrated on the folder as it changed, the network would be another one and no earlier
row could be reused.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import time
from pathlib import Path
from typing import Optional

from ..cache.provenance import CALIBRATION_KEYS, installed, package_version
from ..config import option_text
from ..errors import PackageMissing, PipelineError, UsageError
from ..files import first_line

log = logging.getLogger(__name__)

METHOD = ("pt2e static PTQ, X86InductorQuantizer: int8 per-channel symmetric weights, uint8 per-tensor "
          "activations (MinMaxObserver), last pooling layer in float, lowered to oneDNN int8 ops")
QUANT_VERSION = 1  # bump with any change to how the network is quantised: it is part of the caches' keys
MAX_BATCH = 1024  # the lowered graph's batch dimension is dynamic up to this size
CALIB_BATCH = 16  # calibration batches: a fixed size, so the quantised network never depends on --batch-size


def require_torchao(who: str = "--precision int8") -> str:
    """torchao's version, or a PackageMissing that says how to install it: the optional package is missing from this
    environment (exit 1), the value is valid and the same command runs where it is installed."""
    if not installed("torchao"):
        raise PackageMissing(f"{who} needs torchao (the maintained int8 route for x86), which is not installed: "
                            "pip install 'transfer-pipeline[int8]' (or pip install torchao)")
    return package_version("torchao")


def calibrated_int8(features, listing, seed: int, n: int, transform, lower: bool = True):
    """``features`` quantised on the first ``n`` images of ``listing``'s seeded stratified order.

    Returns (module, record): the record (method, sample, versions, image paths, seconds) goes
    into the cache's attributes.
    """
    from ..data.folders import stratified_order
    from ..data.image_reader import ImageListDataset

    started = time.time()
    order = stratified_order(listing.labels, seed)
    dataset = ImageListDataset(listing.root, [(listing.files[i].path, listing.files[i].label) for i in order],
                               transform)
    batches, paths = calibration_batches(dataset, n, CALIB_BATCH)
    module = quantize_int8(features, batches, lower=lower)
    return module, {**calibration_identity(listing, seed, n), "images": paths,
                    "calib_root": str(Path(listing.root).resolve()),
                    "seconds": round(time.time() - started, 2)}


def calibration_listing(calib_data: str, listing):
    """The folder int8 calibrates on: ``calib_data`` ('' = the data being extracted, ``listing``)."""
    from ..data.folders import list_image_folder

    return list_image_folder(calib_data) if calib_data else listing


def calibration_identity(listing, seed: int, n: int) -> dict:
    """What decides the quantised network, for the cache's fingerprint and provenance (no torch import:
    a cache hit is answered without it)."""
    return {"version": QUANT_VERSION, "method": METHOD, "calib_batch": CALIB_BATCH, "calib_n": n,
            "calib_seed": seed, "calib_data": listing.fingerprint(), "torch": package_version("torch"),
            "torchao": require_torchao()}


def request_identity(cfg, listing) -> dict:
    """The calibration an int8 request quantises with (``calibration_identity``'s keys): the one ``cfg.calib_cache``
    lends (``lent_calibration``), else a calibration on the first ``calib_n`` photos of ``calib_data`` or
    ``listing``. No torch import: the cache's key is made of it."""
    lent, _ = lent_calibration(cfg)
    if lent is not None:
        return {k: lent.get(k) for k in CALIBRATION_KEYS}
    return calibration_identity(calibration_listing(cfg.calib_data, listing), cfg.seed, cfg.calib_n)


def lent_calibration(cfg) -> tuple[Optional[dict], str]:
    """(``cfg.calib_cache``'s calibration record, '') when its stored observers rebuild, bitwise, the int8 network
    that cache was made with (``int8_network``): an int8 cache of this backbone and weights that keeps its
    observers, quantised by this method with these torch and torchao versions; else (None, why not).

    Why lend one: a calibration is made on the folder's own first photos, named by its listing's fingerprint,
    so a relabelled, added or removed photo is another calibration, another network, and no row of the earlier
    cache could be reused (``row_donors``): audit's refresh recomputed a whole folder to move two photos. The
    borrowed network is the earlier cache's, so its record, identity included, is that cache's, and its rows
    are found by content as a float cache's are; int8 rows still never mix with another calibration's."""
    if not cfg.calib_cache:
        return None, ""
    from ..cache.feature_cache import OBSERVERS, CacheBusy, CacheError, open_h5, read_info

    try:
        info = read_info(Path(cfg.calib_cache), wait_s=0)
        with open_h5(info.path, "r", wait_s=0) as f:
            kept = OBSERVERS in f
        record = json.loads(info.attrs.get("calibration") or "{}")
    except (OSError, ValueError, CacheError, CacheBusy) as e:
        return None, f"it is unreadable ({first_line(e, 200)})"
    current = {"version": QUANT_VERSION, "method": METHOD, "calib_batch": CALIB_BATCH,
               "torch": package_version("torch"), "torchao": package_version("torchao")}
    differ = [k for k, v in current.items() if record.get(k) != v]
    why = ("it is not an int8 cache" if info.attrs.get("precision") != "int8" or not record else
           "it keeps no calibrated observers (made before caches stored them)" if not kept else
           "it was made with another backbone or weights" if info.attrs.get("backbone") != cfg.backbone
           or not _same_weights(cfg.backbone, cfg.weights, info.attrs) else
           f"it was quantised otherwise ({', '.join(differ)})" if differ else "")
    return (None, why) if why else (record, "")


def newest_int8_cache(cache_dir: str, data: str, backbone: str, weights: str, purpose: str = "",
                      calibrated: Optional[dict] = None) -> str:
    """The newest complete int8 cache in ``cache_dir`` of the folder ``data`` (of that ``purpose``: '' for a labelled
    folder), ``backbone`` and ``weights`` (and whose calibration record agrees with ``calibrated``, where given):
    the calibration a command that extracts a folder again lends its new request (``lent_calibration`` checks the
    rest), '' when there is none. No torch import, but to ask timm what DEFAULT is for a cache made under a tag."""
    from ..cache.feature_cache import list_caches
    from . import backbones as bb

    if not Path(cache_dir).is_dir():
        return ""
    backbone, weights = bb.canonical_request(backbone, weights)  # X.tag is X --weights tag, as extract records it
    root, name = Path(data).resolve(), backbone
    return next((str(i.path) for i in list_caches(cache_dir)[0]
                 if i.complete and i.attrs.get("precision") == "int8" and i.attrs.get("backbone") == name
                 and Path(i.attrs.get("data_root") or "/nonexistent") == root
                 and (i.attrs.get("purpose") or "") == purpose
                 and _calibrated_with(i.attrs, calibrated or {})
                 and not bb.older_trunk(name, str(i.attrs.get("trunk_version", "")))  # its network: another map
                 and _same_weights(backbone, weights, i.attrs)), "")


def own_lender(cfg, listing) -> str:
    """The cache whose calibration a plain int8 extract of ``cfg.data`` (listed: ``listing``) lends itself
    (``lent_calibration``), '' for none: the folder's newest int8 cache of this backbone and weights, calibrated
    with this --calib-n and --seed, where its network is not the one calibrating on the folder as listed names.

    Why: a calibration is named by its folder's listing, so a plain extract after 10 photos were added calibrated
    again, another network, and computed all 25,010 rows (about an hour for VGG-16 on a CPU). With the earlier
    cache's network only the new photos are computed, and the same request again is that cache (a hit). An
    unchanged folder's own calibration is that network already (the one-offs folder's, or made again bitwise).
    Not where the request says what to calibrate on (--calib-data, or a lender already chosen). No torch import."""
    if cfg.calib_cache or cfg.calib_data:
        return ""
    lender = newest_int8_cache(cfg.cache_dir, cfg.data, cfg.backbone, cfg.weights, cfg.purpose,
                               calibrated={"calib_n": cfg.calib_n, "calib_seed": cfg.seed})
    if not lender:
        return ""
    from dataclasses import replace

    lent, _ = lent_calibration(replace(cfg, calib_cache=lender))
    own = calibration_identity(listing, cfg.seed, cfg.calib_n)
    return lender if lent is not None and {k: lent.get(k) for k in CALIBRATION_KEYS} != own else ""


def _calibrated_with(attrs: dict, calibrated: dict) -> bool:
    """Whether the calibration record in a cache's ``attrs`` holds each of ``calibrated``'s values."""
    try:
        record = json.loads(attrs.get("calibration") or "{}")
    except ValueError:
        return False
    return all(record.get(k) == v for k, v in calibrated.items())


def _same_weights(backbone: str, weights: str, attrs: dict) -> bool:
    """Whether --backbone ``backbone`` --weights ``weights`` names the weights of the cache with ``attrs`` (its
    backbone's name checked already): the same spelling, or the other spelling of the same library weights, as
    extract finds a cache (``extract.spelled_otherwise``)."""
    from . import backbones as bb

    try:
        made_with = str(json.loads(attrs.get("config") or "{}").get("weights", ""))
    except ValueError:
        return False

    if bb.is_weights_path(weights):
        return Path(weights).is_file() and bb.file_sha256(weights) == attrs.get("weights_sha256")
    if bb.is_weights_path(made_with):
        return False
    if bb.weights_identity(weights) == bb.weights_identity(made_with):
        return True
    if "none" in (weights.lower(), made_with.lower()):
        return False
    made = str(attrs.get("weights", ""))
    if weights.upper() != "DEFAULT":
        # a timm DEFAULT cache's record names the tag DEFAULT was when it was made: the weights that tag names now
        return made.startswith("timm:") and made_with.upper() == "DEFAULT" and bb.timm_tag(weights) == bb.timm_tag(made)
    # made with DEFAULT's own name (X.tag, IMAGENET1K_V1): the weights DEFAULT resolves to now? Asks the library
    # (imports torch), so only for a cache that is the request's in all else
    try:
        return bb.load_preprocessing(backbone, weights)[1] == made
    except UsageError:  # no such weights (any more): said by the extraction that follows
        return False


def calibration_batches(dataset, n: int, batch_size: int) -> tuple[list, list[str]]:
    """The first ``n`` decodable images of ``dataset`` as float batches, and their paths."""
    import torch

    images, paths = [], []
    for i in range(len(dataset)):
        if len(images) == n:
            break
        item = dataset[i]
        if item.image is not None:
            images.append(item.image)
            paths.append(item.path)
    if not images:
        raise UsageError(f"no calibration image for {option_text('precision', 'int8')} could be decoded")
    return [torch.stack(images[s:s + batch_size]) for s in range(0, len(images), batch_size)], paths


def quantization_config():
    """The x86 default (per-channel int8 weights, uint8 activations) with min/max activation ranges."""
    import torch
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    from torchao.quantization.pt2e import MinMaxObserver

    default = xiq.get_default_x86_inductor_quantization_config()
    act = xiq.QuantizationSpec(dtype=torch.uint8, quant_min=0, quant_max=255, qscheme=torch.per_tensor_affine,
                               is_dynamic=False, observer_or_fake_quant_ctr=MinMaxObserver.with_args(eps=2 ** -12))
    return xiq.QuantizationConfig(act, act, default.weight, default.bias, default.is_qat)


def quantize_int8(features, calib_batches: list, max_batch: int = MAX_BATCH, observers: Optional[dict] = None,
                  lower: bool = True):
    """``features`` (float, eval) -> an int8 module: float32 in and out, any batch 1..max_batch.

    Equivalent to torchao's ``lower_pt2e_quantized_to_x86`` except that the batch dimension stays
    dynamic (that helper re-exports with the example's shape, fixing the batch size). The pt2e
    graph stays on the result as ``converted``: ``inference.Inference(compile=True)`` compiles that one,
    and the calibrated observers' state as ``observers`` (``{name: tensor}``, a few KB): given back as
    ``observers`` (with one example batch of the input's shape), it rebuilds the same network without
    the calibration images, which is how predict and evaluate run the network a cache was made with.
    A backbone the quantiser or export cannot take is a one-line PipelineError. ``lower=False`` (a network
    that will be compiled, which compiles ``converted``) lowers only when first called (the fallback when
    compiling fails): lowering re-exports the graph, 6 of the 9 s it takes to rebuild VGG-16's from observers.
    """
    started = time.time()
    with _one_line_errors():
        converted, state, example, dynamic = _converted_int8(features, list(calib_batches), max_batch, observers)
        lowered = _lower(converted, example, dynamic) if lower else LazyLowered(converted, example, dynamic)
    lowered.converted, lowered.observers = converted, state
    if observers is None:
        log.info("quantised to int8 on %d calibration images in %.1f s", sum(len(b) for b in calib_batches),
                 time.time() - started)
    else:  # calib_batches is only an example of the input's shape: no photo was calibrated on
        log.info("int8 network rebuilt from %d stored observers in %.1f s", len(observers), time.time() - started)
    return lowered


def int8_network(features, observers: dict, input_shape, lower: bool = True) -> object:
    """The int8 network a cache was made with, rebuilt from its stored observers (``quantize_int8``'s
    ``observers``): bitwise the same features as the calibrated one, without its calibration images."""
    import torch

    example = torch.zeros((2, *[int(d) for d in input_shape]))
    return quantize_int8(features, [example], observers={k: torch.as_tensor(v) for k, v in observers.items()},
                         lower=lower)


@contextlib.contextmanager
def _one_line_errors():
    try:
        yield
    except Exception as e:  # noqa: BLE001 -- export, the quantiser and the lowering raise many kinds
        raise PipelineError(f"int8 quantisation of the backbone failed ({type(e).__name__}: {first_line(e, 300)}); "
                            f"use {option_text('precision', 'bf16', 'fp32')}") from e


class LazyLowered:
    """The lowered int8 network, lowered when first called (``quantize_int8(lower=False)``)."""

    def __init__(self, converted, example, dynamic):
        self._args, self._lowered = (converted, example, dynamic), None

    def __call__(self, x):
        if self._lowered is None:
            with _one_line_errors():
                self._lowered = _lower(*self._args)
        return self._lowered(x)


def _converted_int8(features, calib_batches: list, max_batch: int, observers: Optional[dict] = None):
    """The calibrated pt2e graph (quantise/dequantise steps around float ops), its observers' state, and the
    example and dynamic shapes ``_lower`` exports it with."""
    import torch
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq  # registers the x86 lowerings
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    example = calib_batches[0].contiguous(memory_format=torch.channels_last)
    if len(example) == 1:  # export specialises a batch of 1; two rows keep the batch dimension symbolic
        example = torch.cat([example, example]).contiguous(memory_format=torch.channels_last)
    dynamic = ({0: torch.export.Dim("batch", max=max_batch)},)
    quantizer = xiq.X86InductorQuantizer().set_global(quantization_config())
    last = list(features.named_modules())[-1]
    if isinstance(last[1], (torch.nn.MaxPool2d, torch.nn.AdaptiveAvgPool2d, torch.nn.AvgPool2d)):
        quantizer.set_module_name_qconfig(last[0], None)  # float features out of the last int8 conv
    model = copy.deepcopy(features).float().eval().to(memory_format=torch.channels_last)
    with torch.no_grad():
        prepared = prepare_pt2e(torch.export.export(model, (example,), dynamic_shapes=dynamic).module(), quantizer)
        for batch in calib_batches:
            prepared(batch.contiguous(memory_format=torch.channels_last))
        if observers is not None:  # the stored calibration replaces what the example batch observed
            missing = set(_observer_state(prepared)) ^ set(observers)
            if missing:
                raise ValueError(f"the stored int8 calibration does not fit this network ({sorted(missing)[:3]})")
            prepared.load_state_dict(observers, strict=False)
        state = _observer_state(prepared)
        converted = convert_pt2e(prepared)
    return converted, state, example, dynamic


def _lower(converted, example, dynamic):
    """The pt2e graph lowered to prepacked oneDNN int8 ops: runs eagerly, at any batch size up to the maximum."""
    import torch
    from torch._export.utils import _is_cia_op
    from torch._inductor.constant_folding import constant_fold
    from torch._inductor.fx_passes.freezing_patterns import freezing_passes

    with torch.no_grad():
        decompositions = {k: v for k, v in torch.export.default_decompositions().items() if _is_cia_op(k)}
        lowered = torch.export.export(converted, (example,), dynamic_shapes=dynamic, strict=True)
        lowered = lowered.run_decompositions(decompositions).module()
        for node in list(lowered.graph.nodes):  # as torchao does: a Linear's aten.t -> permute
            if node.target == torch.ops.aten.t.default:
                with lowered.graph.inserting_before(node):
                    perm = lowered.graph.call_function(torch.ops.aten.permute.default, (node.args[0], [1, 0]))
                node.replace_all_uses_with(perm)
                lowered.graph.erase_node(node)
        lowered.recompile()
        freezing_passes(lowered, (example,))  # conv + quantise/dequantise -> prepacked onednn.qconv_pointwise
        constant_fold(lowered)
    return lowered


def _observer_state(prepared) -> dict:
    """The calibrated observers' buffers (activation and weight ranges) of a prepared pt2e graph."""
    return {k: v.detach().clone() for k, v in prepared.state_dict().items() if "activation_post_process" in k}

