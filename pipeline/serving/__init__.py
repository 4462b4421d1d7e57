"""Taking a model elsewhere: export (one ONNX or TorchScript file, checked against predict) and the
prediction service (an HTTP API that batches requests arriving together, and its web page).

What other modules use:
    export.export                   the export command (its answer: ExportResult, exported here)
    service.build_app, service.serve   the serve command, and the app in-process (tests)
    service.server_config           uvicorn's Config for that app as serve makes it (the header deadline)
"""

#: the stages' result dataclasses -> their modules, loaded on first use: the modules import torch
RESULTS = {"ExportResult": "export"}


def __getattr__(name: str):
    if name not in RESULTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{RESULTS[name]}"), name)
