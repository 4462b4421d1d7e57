"""From photos to cached features: pretrained backbones run frozen, batched, on the best device.

What other stages use:
    extract.extract                 the extract command (a cache hit answers without torch; its answer:
                                    ExtractResult, exported here)
    backbones.load_backbone, get_spec    any torchvision or timm model, with its own preprocessing (libraries)
    inference.Inference             the one way a network runs on images (device, precision, bad files)
    quantize, compiled, distributed int8 on the CPU, torch.compile, torchrun shards (used by extract)
"""


#: the stage's result dataclass -> its module, loaded on first use (as the other stages' packages do)
RESULTS = {"ExtractResult": "extract"}


def __getattr__(name: str):
    if name not in RESULTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{RESULTS[name]}"), name)
