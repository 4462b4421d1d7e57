"""Whole models (a backbone and a head as one network): training on images, checkpoints, prediction.

What other stages use:
    whole_models.load_model, head_from_checkpoint   any checkpoint as a runnable model (read by heads/checkpoints.py)
    estimators.ImageClassifier      the scikit-learn face of a checkpoint (the API's Head and Model)
    fused_models.FusedModel         a head on fused features: every backbone on its own preprocessing
    train.train, train.finetune     the train and finetune commands (their answer: TrainResult, exported here)
    predict.predict, predict.imagenet_check   classify files and folders (their answers: PredictResult,
                                    ImagenetCheckResult, exported here)
    summary.summarize               the summary command (its answer: SummaryResult, exported here)
"""

#: the stages' result dataclasses -> their modules, loaded on first use: the modules import torch, and
#: ``import pipeline.models.estimators`` (the API's) must not
RESULTS = {"TrainResult": "train", "PredictResult": "predict", "ImagenetCheckResult": "predict",
           "SummaryResult": "summary"}


def __getattr__(name: str):
    if name not in RESULTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{RESULTS[name]}"), name)
