"""Tiny backbones for fast tests, 32x32 input: 'tiny' -> 8x8x8 features (VGG-like: flattened into
the head), 'tiny_bn' -> 16x8x8 features in two conv+BatchNorm blocks (ResNet-like: pooled head).

Import this module to register it; subprocess tests run
``python -c "import tests.tiny, cli; cli.cli()" ARGS``.
"""
from torch import nn
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

#: the command prefix for running the CLI in a subprocess with 'tiny' registered
CLI = ["-c", "import tests.tiny, cli; cli.cli()"]
