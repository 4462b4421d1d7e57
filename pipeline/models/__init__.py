"""Whole models (a backbone and a head as one network): training on images, checkpoints, prediction.

What other stages use:
    whole_models.load_model, head_from_checkpoint   any checkpoint as a runnable model (read by heads/checkpoints.py)
    estimators.ImageClassifier      the scikit-learn face of a checkpoint (the API's Head and Model)
    fused_models.FusedModel         a head on fused features: every backbone on its own preprocessing
    train.train, train.finetune     the train and finetune commands
    predict.predict, predict.imagenet_check   classify files and folders
    summary.summarize               the summary command
"""
