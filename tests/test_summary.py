"""summary: parameter counts and shapes on the meta device, checked by hand."""
import pytest

from pipeline.models.summary import SummaryConfig, SummaryResult, summarize

pytestmark = pytest.mark.filterwarnings("ignore:.*has random weights")


def test_vgg16_head_is_the_tutorials_linear_25088():
    lm = summarize(SummaryConfig(backbone="vgg16", classes=2))
    assert isinstance(lm, SummaryResult) and lm.frozen_params == 14_714_688
    assert lm.total_params == 14_714_688 + 50_178
    assert lm.trainable_params == 50_178
    assert [r["params"] for r in lm.layers if r["type"] == "Linear"] == [25088 * 2 + 2]


def test_summary_counts_match_a_hand_count():
    conv1, bn1, conv2, bn2 = 3 * 8 * 9 + 8, 2 * 8, 8 * 16 * 9 + 16, 2 * 16
    head = 16 * 3 + 3  # pooled: Linear(16, 3)
    for unfreeze, trainable in [("none", head), ("1", conv2 + bn2 + head), ("all", conv1 + bn1 + conv2 + bn2 + head)]:
        r = summarize(SummaryConfig(backbone="tiny_bn", classes=3, unfreeze=unfreeze))
        assert (r.total_params, r.trainable_params) == (conv1 + bn1 + conv2 + bn2 + head, trainable)
    r = summarize(SummaryConfig(backbone="tiny", classes=2))
    assert (r.total_params, r.trainable_params) == (3 * 8 * 9 + 8 + 8 * 8 * 8 * 2 + 2, 8 * 8 * 8 * 2 + 2)
    assert r.layers[-2]["output_shape"] == [2] and r.layers[0]["output_shape"] == [8, 32, 32]


def test_a_crop_size_the_backbone_cannot_take_is_a_usage_error_naming_its_own():
    """A ViT's patch grid is fixed: --crop-size 100 was 'unexpected AssertionError ... a bug?'."""
    from click.testing import CliRunner

    from pipeline.cli import cli

    res = CliRunner().invoke(cli, ["summary", "--backbone", "vit_tiny_patch16_224", "--crop-size", "100"])
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1, res.output
    assert "vit_tiny_patch16_224 does not take a 100x100 input" in res.output and "its own 224" in res.output
    assert summarize(SummaryConfig(backbone="vit_tiny_patch16_224", crop_size=224)).input_shape == [3, 224, 224]
