"""Classifier heads on cached features: views of the cached map, the heads themselves, and how they are fitted.

What other stages use:
    fit_head.fit_head               the fit-head command (its answer: FitHeadResult, exported here)
    compare.compare_sklearn         the compare-sklearn command (its answer: CompareResult, exported here)
    backbone_choice.choose_backbone the choose-backbone command (its answer: BackboneChoice, exported here)
    fused_views.FusedRows           several caches of the same photos as one cache of fused rows
    probe_heads.ProbeHead           one torch module for every head kind (view -> norm -> [RBF] -> Linear -> LogSoftmax)
    feature_views                   the views (flat, avg, max, avgmax) and normalisations
    checkpoints.write_checkpoint, read_checkpoint   the one writer and reader of every checkpoint kind
    trust.fit_trust                 the temperature and the unknown score, fitted once for every kind of model
    trust_text.kept_text            what the unknown threshold keeps, as the log and the results say it
    epoch_loop                      the split, the epoch loop and option checks that train/finetune share
"""

#: the stages' result dataclasses -> their modules, loaded on first use: the modules import torch, and
#: ``import pipeline.heads`` (a cache hit's path) must not
RESULTS = {"FitHeadResult": "fit_head", "CompareResult": "compare", "BackboneChoice": "backbone_choice"}


def __getattr__(name: str):
    if name not in RESULTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{RESULTS[name]}"), name)
