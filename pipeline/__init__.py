"""Transfer learning for image folders: a frozen pretrained CNN's features cached in HDF5, heads fit in seconds.

The Python API (everything the CLI does; ``help(pipeline.Head)`` and the like say more)::

    import pipeline
    cache = pipeline.extract_features("../shared/data/catsdogs", n=800,
                                      weights="../shared/weights/vgg16_features_imagenet.pt")
    head = pipeline.Head(epochs=10).fit(cache)         # runs/<stamp>-fit-head/head.pt
    head.metrics_["val_acc"], head.predict(["photo.jpg"]), head.score(other_cache)

Caches and heads
    Cache(path)                          a feature cache: len, classes, labels, paths, features, provenance, summary()
    extract_features(data, n, **opts)    image folder -> frozen backbone -> a Cache (a hit when nothing changed)
    list_caches(cache_dir)               the caches of a folder, newest first
    Head(**params)                       Linear + LogSoftmax on cached features: fit(cache), predict(X),
                                         predict_proba(X), score(cache or folder), save(path), Head.load(path),
                                         plot_curves(); learned state in classes_, history_, metrics_, checkpoint_
    compare_sklearn(cache, **opts)       the torch head and scikit-learn's LogisticRegression on one split: rows
    choose_backbone(data, backbones)     each backbone (and their fusions) cross-validated on the photos: which to use
Whole models
    train_model(data, **opts)            a new head trained on images, backbone frozen: a Model
    finetune_model(data, init, **opts)   the backbone unfrozen (all or the last K blocks): a Model
    Model.load(path)                     any checkpoint as a Model: predict, predict_proba, score, save
    evaluate_model(model, cache|data)    accuracy, per-class precision/recall/F1, confusion matrix, gallery,
                                         calibration (ECE, reliability diagram), the share flagged unknown
    predict_files(model, paths)          rows of path, class, probability, unknown, ood_score (or error)
Pictures (matplotlib Figures: shown inline in Jupyter)
    preview(data), feature_map(image), plot_curves(head or history); evaluate_model(...).figures
Taking a model elsewhere
    export_model(model, output)          one ONNX / TorchScript file (+ .json metadata), checked against predict
    exported_metadata(path)              an exported file's metadata, its sidecar checked to be of the same export
    serve_app(model), serve_model(model) the HTTP service with its page: the app in-process, or served by uvicorn
Data and bookkeeping
    check_image_folder(root), fetch_data(), run_demo(), list_runs(runs_dir), imagenet_check(image),
    model_summary(backbone=...)
    audit_folder(data, test_data=...)    wrong labels, outliers, duplicates, train/test leaks; apply=/undo= fixes
    suggest(data, pool, k=50)            which unlabelled photos of pool to label next: a CSV and a page

Keyword options are the fields of each stage's config dataclass (the CLI's options; an unknown one
is a ValueError naming the allowed ones). Nothing is printed unless ``verbose=True``; progress is
tqdm.auto's (a widget in Jupyter with ipywidgets, a bar in a terminal) or a line every 10 s in a log.
``import pipeline`` is light: the API loads on first use, torch only when a model runs.

Layout: a folder per stage, each importing only from the folders before it (a test checks):
    plumbing     config (every option), errors, progress, files (safe writes), devices
    data/        image folders: listing, safe decoding, the background reader, fetch, check-images
    cache/       the HDF5 feature cache and its provenance
    extraction/  backbones, the network runner, int8, compile; the extract stage
    runs/        run folders, the experiment ledger, the figures a run leaves
    heads/       feature views, the probe heads, the epoch loop; fit-head, compare-sklearn
    models/      whole models (backbone + head): train, finetune, predict, summary
    reports/     evaluate, preview and feature-map pictures, the demo
    serving/     export (ONNX, TorchScript, checked against predict), the prediction service and its page
    api, cli     the Python API and the command line, on top of everything
"""

__version__ = "0.1.0"

#: modules at the top that every stage may use
PLUMBING = ("config", "errors", "progress", "files", "devices")
#: the stage folders in import order: each may import only from those before it (and the plumbing)
STAGES = ("data", "cache", "extraction", "runs", "heads", "models", "reports", "serving")

#: public names -> the module defining them (loaded on first use: PEP 562)
_EXPORTS = {
    **{name: "api" for name in (
        "Cache", "Head", "Model", "NotFittedError", "Rows",
        "extract_features", "list_caches", "compare_sklearn", "choose_backbone", "train_model", "finetune_model",
        "evaluate_model",
        "predict_files", "preview", "feature_map", "plot_curves", "check_image_folder", "fetch_data", "run_demo",
        "list_runs", "imagenet_check", "model_summary", "export_model", "exported_metadata", "serve_app",
        "serve_model",
        "audit_folder", "suggest",
    )},
    "UsageError": "errors",
    "PipelineError": "errors",
    "TrainingInterrupted": "errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
