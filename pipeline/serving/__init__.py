"""Taking a model elsewhere: export (one ONNX or TorchScript file, checked against predict) and the
prediction service (an HTTP API that batches requests arriving together, and its web page).

What other modules use:
    export.export                   the export command
    service.build_app, service.serve   the serve command, and the app in-process (tests)
"""
