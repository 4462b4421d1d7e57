"""Tiny backbones for fast tests, 32x32 input: 'tiny' -> 8x8x8 features (VGG-like: flattened into
the head), 'tiny_bn' -> 16x8x8 features in two conv+BatchNorm blocks (ResNet-like: pooled head), 'tiny_wide'
-> 6x8x8 features of a 24x24 bicubic crop with its own mean and std (other preprocessing, for fused features).

Import this module to register it; subprocess tests run
``python -c "import tests.tiny, cli; cli.cli()" ARGS``.
"""
from torch import nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms._presets import ImageClassification

from pipeline.extraction.backbones import BackboneSpec, register_backbone, split_at_maxpool


class TinyNet(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(4))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(8 * 8 * 8, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


TINY = BackboneSpec(
    name="tiny",
    build=TinyNet,
    features=lambda m: m.features,
    feature_prefixes=("features.",),
    transform=lambda: ImageClassification(crop_size=32, resize_size=36),
    classifier_in=lambda m: m.classifier[1].in_features,
)
register_backbone(TINY)


class TinyBNNet(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


TINY_BN = BackboneSpec(
    name="tiny_bn",
    build=TinyBNNet,
    features=lambda m: m.features,
    feature_prefixes=("features.",),
    transform=lambda: ImageClassification(crop_size=32, resize_size=36),
    classifier_in=lambda m: m.classifier[2].in_features,
    pool="avg",
    blocks=split_at_maxpool,
)
register_backbone(TINY_BN)


class WideNet(nn.Module):
    """Another tiny backbone with its own preprocessing: a 24 x 24 bicubic crop, other mean and std."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(3))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(6 * 8 * 8, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


TINY_WIDE = BackboneSpec(
    name="tiny_wide",
    build=WideNet,
    features=lambda m: m.features,
    feature_prefixes=("features.",),
    transform=lambda: ImageClassification(crop_size=24, resize_size=28, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                                          interpolation=InterpolationMode.BICUBIC),
    classifier_in=lambda m: m.classifier[1].in_features,
)
register_backbone(TINY_WIDE)

#: the command prefix for running the CLI in a subprocess with 'tiny' registered
CLI = ["-c", "import tests.tiny, cli; cli.cli()"]
