"""From photos to cached features: pretrained backbones run frozen, batched, on the best device.

What other stages use:
    extract.extract                 the extract command (a cache hit answers without torch)
    backbones.load_backbone, BACKBONES   backbones with their weights' own preprocessing
    inference.Inference             the one way a network runs on images (device, precision, bad files)
    quantize, compiled, distributed int8 on the CPU, torch.compile, torchrun shards (used by extract)
"""
