"""From photos to cached features: pretrained backbones run frozen, batched, on the best device.

What other stages use:
    extract.extract                 the extract command (a cache hit answers without torch)
    backbones.load_backbone, get_spec    any torchvision or timm model, with its own preprocessing (libraries)
    inference.Inference             the one way a network runs on images (device, precision, bad files)
    quantize, compiled, distributed int8 on the CPU, torch.compile, torchrun shards (used by extract)
"""
