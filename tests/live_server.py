"""For the export and service tests: a tiny fitted head, and the service run by a real uvicorn in a thread."""
from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path

from tests.conftest import make_image_folder


def make_tiny_head(root: Path, head: str = "linear", **options) -> Path:
    """A head.pt fitted on a cache of generated photos (3 classes) with the tiny random-weight backbone."""
    from pipeline.extraction.extract import ExtractConfig, extract
    from pipeline.heads.fit_head import FitHeadConfig, fit_head

    data = make_image_folder(root / "data", per_class=8, classes=("blue", "green", "red"))
    cache = extract(ExtractConfig(data=str(data), n=0, backbone="tiny", weights="none", workers=0,
                                  cache_dir=str(root / "features"), dtype="float32")).cache
    fitted = fit_head(FitHeadConfig(head=head, cache=cache, epochs=3, runs_dir=str(root / "runs"), **options))
    return Path(fitted.checkpoint)


@contextlib.contextmanager
def live_server(app, drain_seconds: float = 5.0):
    """``app`` served by uvicorn on an ephemeral localhost port in a thread, configured as serve configures it
    (its --header-seconds protocol included); yields the base URL."""
    import uvicorn

    from pipeline.serving.service import server_config

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(server_config(app, log_level="warning", timeout_graceful_shutdown=drain_seconds))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
