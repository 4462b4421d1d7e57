"""What a person looks at: evaluation reports, pictures of the data and features, and the demo that runs it all.

What the API and CLI use:
    evaluate.evaluate               accuracy, per-class figures, confusion matrix, most confidently wrong images
                                    (its answer: EvaluateResult, exported here)
    pictures.preview, pictures.feature_map   what the backbone sees (PreviewResult, FeatureMapResult)
    demo.demo                       fetch -> check -> extract -> fit-head -> compare in one command (DemoResult)
    present                         every command's result as the text a person reads on the terminal
    suggest.SuggestResult           suggest's answer (exported here)
    audit.audit                     label issues, outliers, duplicates, leaks (AuditResult; --apply/--undo give
                                    data.FixesResult)
"""

#: the stages' result dataclasses -> their modules, loaded on first use: the modules import torch, and
#: ``import pipeline.reports.present`` (the CLI's) must not
RESULTS = {"EvaluateResult": "evaluate", "PreviewResult": "pictures", "FeatureMapResult": "pictures",
           "DemoResult": "demo", "SuggestResult": "suggest", "AuditResult": "audit"}


def __getattr__(name: str):
    if name not in RESULTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{RESULTS[name]}"), name)
