"""The prediction service: predict's rows over HTTP, bad input as 4xx reasons, limits, real uvicorn, SIGTERM."""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from pipeline import cli
from pipeline.models.predict import PredictConfig, predict
from tests.conftest import ROOT
from tests.badfiles import bomb_png
from tests.live_server import live_server, make_tiny_head
from tests.test_folders import declared_jpeg
from tests.tiny import CLI

pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn, python-multipart) is not installed")
from fastapi.testclient import TestClient  # noqa: E402

import pipeline  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*has random weights", "ignore:no sidecar")


@pytest.fixture(scope="module")
def head(tmp_path_factory) -> Path:
    return make_tiny_head(tmp_path_factory.mktemp("served"))


@pytest.fixture(scope="module")
def client(head):
    with TestClient(pipeline.serve_app(head, precision="fp32", max_file_bytes=200_000, max_pixels=1_000_000,
                                       max_files=4, max_queue=8, max_request_bytes=2_000_000),
                    base_url="http://localhost") as c:  # a loopback service answers its own names only
        yield c


def photos(head: Path) -> list[Path]:
    data = head.parents[2] / "data"
    return sorted(data.rglob("*.jpg"))


def wait_healthy(url: str, proc: subprocess.Popen, seconds: float = 60) -> None:
    """Until the service at ``url`` answers /health; fails with its output if it exits or takes too long."""
    import httpx

    deadline = time.monotonic() + seconds
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else ""
        time.sleep(0.1)


def upload(*paths):
    return [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]


def test_predict_gives_predict_rows(client, head):
    files = photos(head)[::6]  # 4: max_files
    want = predict(PredictConfig(paths=[str(f) for f in files], model=str(head), workers=0, precision="fp32")).rows
    r = client.post("/predict", files=upload(*files))
    assert r.status_code == 200
    got = r.json()
    assert [g["path"] for g in got] == [f.name for f in files]
    assert [g["class"] for g in got] == [w["class"] for w in want]
    assert np.allclose([g["probability"] for g in got], [w["probability"] for w in want], atol=1e-6)
    assert all(set(g) == set(w) for g, w in zip(got, want))  # the same fields: whatever predict's rows hold


def test_top_adds_the_most_probable_classes_in_order(client, head):
    r = client.post("/predict?top=3", files=upload(photos(head)[0]))
    row = r.json()[0]
    probs = [t["probability"] for t in row["top"]]
    assert [t["class"] for t in row["top"]][0] == row["class"] and probs == sorted(probs, reverse=True)
    assert sorted(t["class"] for t in row["top"]) == ["blue", "green", "red"] and abs(sum(probs) - 1) < 1e-5
    assert client.post("/predict?top=4", files=upload(photos(head)[0])).status_code == 400


def test_a_bad_file_beside_good_ones_gets_its_reason_in_its_row(client, head):
    good = photos(head)[0]
    r = client.post("/predict", files=upload(good) + [("files", ("notes.jpg", b"hello", "image/jpeg"))])
    assert r.status_code == 200
    rows = r.json()
    assert rows[0]["class"] and rows[0]["error"] is None
    assert rows[1]["class"] is None and rows[1]["error"].startswith("not an image")


def test_a_file_pillow_fails_on_with_a_type_error_is_its_rows_reason_not_a_500(client, head):
    """A damaged TIFF (strip offsets stored as fractions) made Pillow raise TypeError: the request was a 500, and the
    good photo sent with it got no answer."""
    from tests.badfiles import fraction_strips_tiff

    r = client.post("/predict", files=[("files", ("bad.tif", fraction_strips_tiff(), "image/tiff"))]
                    + upload(photos(head)[0]))
    assert r.status_code == 200
    bad, good = r.json()
    assert bad["class"] is None and bad["error"].startswith("unreadable image: ") and good["class"]


def _png(w, h) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("name, data, status, reason", [
    ("text.jpg", b"not an image at all", 400, "not an image"),
    ("empty.png", b"", 400, "zero-byte file"),
    ("huge.png", _png(1200, 1000), 400, "more than the 1000000 allowed"),  # 1.2 M pixels, a small file
    # a baseline JPEG past the decoder's limit: it was told it is decoded reduced and to save it as baseline JPEG
    ("phone.jpg", declared_jpeg(12000, 9000), 400, "12000 x 9000 pixels: more than the 1000000 allowed"),
    ("bomb.png", bomb_png(12000, 12000), 400, "144000000 pixels: more than the 1000000 allowed"),
    ("big.bin", os.urandom(300_000), 413, "larger than the 200000 bytes allowed per image"),
])
def test_a_request_with_no_usable_image_is_a_4xx_naming_why(client, name, data, status, reason):
    r = client.post("/predict", files=[("files", (name, data, "image/png"))])
    assert r.status_code == status
    body = r.json()
    assert reason in body["detail"] and name in body["detail"] and "\n" not in body["detail"]
    assert "200001" not in body["detail"]  # what was read, not the upload's size
    assert body["rows"][0]["path"] == name and reason in body["rows"][0]["error"]


def test_request_limits(client, head):
    one = photos(head)[0]
    assert client.post("/predict", files=upload(*[one] * 5)).status_code == 400  # max_files=4
    r = client.post("/predict", content=b"x" * 2_000_001, headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert r.status_code == 413 and "at most 2000000" in r.json()["detail"]
    r = client.post("/predict", data={"other": "x"})
    assert r.status_code == 400 and "'files'" in r.json()["detail"]
    r = client.post("/predict", files=[("files", (None, "a text field"))])  # a text part, not a file
    assert r.status_code == 400


@pytest.mark.parametrize("query, name", [("top=abc", "top"), ("top=1.5", "top"), ("explain=maybe", "explain")])
def test_a_bad_query_parameter_is_400_in_one_line_naming_it(client, head, query, name):
    r = client.post(f"/predict?{query}", files=upload(photos(head)[0]))
    detail = r.json()["detail"]
    assert r.status_code == 400 and isinstance(detail, str) and "\n" not in detail
    assert detail.startswith(f"{name}: ") and repr(query.split("=")[1]) in detail


def test_a_streamed_body_past_the_limit_is_413(client):
    def chunks():
        for _ in range(30):
            yield b"-" * 100_000  # no Content-Length: counted as it streams in

    r = client.post("/predict", content=chunks(), headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert r.status_code == 413


def _form_request(data: bytes, name: str = "a.jpg") -> tuple[bytes, bytes]:
    """(headers, body) of a raw POST /predict with one file: for clients that send the body at their own pace."""
    body = (b"--b\r\nContent-Disposition: form-data; name=\"files\"; filename=\"" + name.encode() +
            b"\"\r\nContent-Type: image/jpeg\r\n\r\n" + data + b"\r\n--b--\r\n")
    head = (b"POST /predict HTTP/1.1\r\nHost: localhost\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n")
    return head, body


def _answer(s: socket.socket) -> tuple[int, str]:
    """(status, body) of the response on ``s`` (read to its end: Connection: close)."""
    data = b""
    with contextlib.suppress(ConnectionResetError):  # closed on a client still sending: what came is the answer
        while chunk := s.recv(65536):
            data += chunk
    status, _, rest = data.decode().partition("\r\n\r\n")
    return int(status.split()[1]), rest


def test_a_slow_but_steady_body_is_served(head):
    """--body-seconds was one deadline for the whole body: a 100 MB upload on an ordinary uplink got 408."""
    head_bytes, body = _form_request(photos(head)[0].read_bytes())
    pieces = [body[k:k + len(body) // 8 + 1] for k in range(0, len(body), len(body) // 8 + 1)]
    with live_server(pipeline.serve_app(head, precision="fp32", body_seconds=1, min_body_rate=100)) as url:
        with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=20) as s:
            s.sendall(head_bytes)
            started = time.monotonic()
            for piece in pieces:  # a piece every 0.3 s: well within the idle limit, 2.4 s in all
                time.sleep(0.3)
                s.sendall(piece)
            status, answer = _answer(s)
    assert time.monotonic() - started > 2
    assert status == 200, answer


def test_a_body_that_stalls_is_408_after_the_idle_limit_and_the_service_goes_on(head):
    import httpx

    head_bytes, body = _form_request(photos(head)[0].read_bytes())
    with live_server(pipeline.serve_app(head, precision="fp32", body_seconds=1, min_body_rate=0)) as url:
        with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=20) as s:
            s.sendall(head_bytes)
            for k in range(5):  # steady for 1.5 s (past --body-seconds), then nothing more
                time.sleep(0.3)
                s.sendall(body[k:k + 1])
            stalled = time.monotonic()
            status, detail = _answer(s)
        waited = time.monotonic() - stalled
        assert status == 408 and 0.8 < waited < 5, (status, waited)
        assert "no byte of the request body came for 1 s (--body-seconds)" in detail and "\n" not in detail
        assert httpx.post(f"{url}/predict", files=upload(photos(head)[0])).status_code == 200


def test_a_body_that_trickles_below_the_minimum_rate_is_408(head):
    """A byte now and then resets an idle timer for ever: the body must also average --min-body-rate."""
    import httpx

    head_bytes, body = _form_request(photos(head)[0].read_bytes())
    with live_server(pipeline.serve_app(head, precision="fp32", body_seconds=1, min_body_rate=1000)) as url:
        with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=20) as s:
            s.sendall(head_bytes)
            started = time.monotonic()
            for k in range(50):  # a byte every 0.2 s (well within the idle limit) until the service answers
                s.sendall(body[k:k + 1])
                if select.select([s], [], [], 0.2)[0]:
                    break
            status, detail = _answer(s)
        assert status == 408 and time.monotonic() - started < 3
        assert "slower than 1000 bytes/s (--min-body-rate)" in detail and "\n" not in detail
        assert httpx.post(f"{url}/predict", files=upload(photos(head)[0])).status_code == 200


def test_a_body_that_never_starts_is_told_it_stalled_whatever_the_minimum_rate(head):
    """Headers, then nothing: with --min-body-rate on (the default) it was told it came too slowly."""
    head_bytes, _ = _form_request(photos(head)[0].read_bytes())
    with live_server(pipeline.serve_app(head, precision="fp32", body_seconds=1, min_body_rate=1000)) as url:
        with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=20) as s:
            s.sendall(head_bytes)
            status, detail = _answer(s)
        assert status == 408 and "no byte of the request body came for 1 s (--body-seconds)" in detail


def test_a_body_already_there_is_read_however_late_the_app_reads_it():
    """The rate's clock ran from the request's start: an app busy for longer than --body-seconds before reading
    refused a body that had all arrived (a zero wait never let the waiting chunk be taken)."""
    import asyncio

    from pipeline.serving.service import BodyLimit

    waiting, got = [{"type": "http.request", "body": b"x" * 3000, "more_body": False}], []

    async def receive():
        return waiting.pop(0)

    async def busy_app(scope, receive, send):
        await asyncio.sleep(1.2)
        got.append(await receive())

    asyncio.run(BodyLimit(busy_app, max_bytes=10 ** 6, seconds=1, rate=1000)({"type": "http", "headers": []},
                                                                             receive, None))
    assert got[0]["body"] == b"x" * 3000


def _requests_in(app) -> int:
    """The requests ``app``'s RequestSlots counts now (none before its middleware stack is built, at the first)."""
    from pipeline.serving.service import RequestSlots

    layer = app.middleware_stack
    while layer is not None and not isinstance(layer, RequestSlots):
        layer = getattr(layer, "app", None)
    return 0 if layer is None else layer.busy


def test_past_max_requests_a_request_is_503_before_its_body_is_read(head):
    import httpx

    start = (b"POST /predict HTTP/1.1\r\nHost: localhost\r\nContent-Type: multipart/form-data; boundary=b\r\n"
             b"Content-Length: 100000\r\n\r\n--b\r\n")  # each holds its request open, its form half read
    app = pipeline.serve_app(head, precision="fp32", max_requests=2)
    with live_server(app) as url:
        port = int(url.rsplit(":", 1)[1])
        held = [socket.create_connection(("127.0.0.1", port), timeout=20) for _ in range(2)]
        for s in held:
            s.sendall(start)
        deadline = time.monotonic() + 30  # a fixed 0.5 s was not always enough for both to arrive on a loaded machine
        while _requests_in(app) < 2:
            assert time.monotonic() < deadline, "the two held requests never took their slots"
            time.sleep(0.01)
        r = httpx.post(f"{url}/predict", files=upload(photos(head)[0]))
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert "--max-requests 2" in r.json()["detail"] and "\n" not in r.json()["detail"]
        assert httpx.get(f"{url}/health").status_code == 200  # the service still answers what costs nothing
        for s in held:
            s.close()
        deadline = time.monotonic() + 10
        while (r := httpx.post(f"{url}/predict", files=upload(photos(head)[0]))).status_code == 503:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert r.status_code == 200


def test_info_and_health(client, head):
    info = client.get("/info").json()
    assert info["classes"] == ["blue", "green", "red"] and info["backbone"] == "tiny" and info["kind"] == "fit-head"
    assert len(info["cache_fingerprint"]) == 64 and info["versions"]["fastapi"] != "unknown"
    assert info["limits"]["max_files"] == 4
    assert info["limits"]["body_seconds"] == 20 and info["limits"]["min_body_rate"] == 10_000  # the 408s' limits
    assert info["limits"]["header_seconds"] == 10
    before = client.get("/health").json()["images"]
    client.post("/predict", files=upload(*photos(head)[:2]))
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["images"] == before + 2


def test_a_browsers_favicon_request_is_no_content_not_a_404(client):
    """A browser asks for /favicon.ico (on /health and /info too): each time a 404 line in the access log. It is
    now 204 with no body, and the page names an empty icon (data:,) so it asks for none."""
    from pipeline.serving.service import page_html

    r = client.get("/favicon.ico")
    assert r.status_code == 204 and r.content == b""
    assert '<link rel="icon" href="data:,">' in page_html()
    assert "/favicon.ico" not in client.get("/openapi.json").json()["paths"]


def test_concurrent_requests_share_batches(head):
    app = pipeline.serve_app(head, precision="fp32", max_wait_ms=300, batch_size=64)
    files = photos(head)[:8]
    with TestClient(app, base_url="http://localhost") as c:
        results = [None] * len(files)

        def send(k):
            results[k] = c.post("/predict", files=upload(files[k]))

        threads = [threading.Thread(target=send, args=(k,)) for k in range(len(files))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        health = c.get("/health").json()
    assert all(r.status_code == 200 for r in results)
    assert health["images"] == 8 and health["batches"] < 8  # waited 300 ms for company: fewer passes than requests


def test_bad_settings_are_usage_errors(head):
    with pytest.raises(ValueError, match="^max_queue=2 is less than max_files=64"):
        pipeline.serve_app(head, max_queue=2)
    r = CliRunner().invoke(cli.cli, ["serve", "--model", str(head), "--max-queue", "2"])
    assert r.exit_code == 2 and "--max-queue 2 is less than --max-files 64" in r.output, r.output
    with pytest.raises(ValueError, match="^max_pixels=100000000 is more than any stage decodes"):
        pipeline.serve_app(head, max_pixels=100_000_000)
    r = CliRunner().invoke(cli.cli, ["serve", "--model", str(head), "--port", "70000"])
    assert r.exit_code == 2 and "--port must be between 0 and 65535" in r.output
    r = CliRunner().invoke(cli.cli, ["serve", "--model", str(head), "--header-seconds", "0"])
    assert r.exit_code == 2 and "--header-seconds" in r.output and "got 0.0" in r.output, r.output


def test_real_uvicorn_on_an_ephemeral_port(head):
    import httpx

    with live_server(pipeline.serve_app(head, precision="fp32")) as url:
        assert httpx.get(f"{url}/health").json()["status"] == "ok"
        r = httpx.post(f"{url}/predict", files=upload(*photos(head)[:2]))
        assert r.status_code == 200 and [row["class"] for row in r.json()]
        assert "predict;dur=" in r.headers["server-timing"]


@contextlib.contextmanager
def serving(head: Path, *options: str, stderr=subprocess.STDOUT):
    """``serve --port 0`` of ``head`` in a process, once healthy: (the process, its URL from its 'serving' line).
    Port 0, not a port found free beforehand: another process could take that one before serve binds it.
    ``stderr=subprocess.PIPE`` keeps the logs apart from stdout."""
    import re

    proc = subprocess.Popen([sys.executable, *CLI, "serve", "--model", str(head), "--port", "0", "--batch-size", "64",
                             "--precision", "fp32", *options],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=stderr, text=True)
    logs = proc.stdout if stderr == subprocess.STDOUT else proc.stderr
    try:
        line = ""
        while "serving" not in line:
            line = logs.readline()
            assert line or proc.poll() is None, "serve exited"
        port = int(re.search(r"http://127\.0\.0\.1:(\d+)/", line)[1])
        assert port != 0
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def predict_then_sigterm(url: str, proc: subprocess.Popen, photo, signals=(signal.SIGTERM,)):
    """The answer to a /predict of ``photo`` sent now, with SIGTERM (or ``signals``, 0.1 s apart) sent to the service
    once the photo waits in its batcher (/health's ``waiting``): a fixed delay sent it, on a loaded machine, before
    the request had arrived."""
    import httpx

    answer = {}
    t = threading.Thread(target=lambda: answer.update(r=httpx.post(f"{url}/predict", timeout=30, files=upload(photo))))
    t.start()
    with httpx.Client(timeout=10) as polling:
        while polling.get(f"{url}/health").json()["waiting"] == 0:
            assert t.is_alive(), "the photo never waited in the batcher"
            time.sleep(0.01)
    for k, sig in enumerate(signals):
        time.sleep(0.1 if k else 0)
        proc.send_signal(sig)
    t.join(30)
    return answer["r"]


def test_sigterm_answers_the_request_in_flight_then_exits(head):
    # a lone image waits max_wait_ms (1 s) for company in the batcher: SIGTERM comes while it waits
    with serving(head, "--max-wait-ms", "1000") as (proc, url):
        r = predict_then_sigterm(url, proc, photos(head)[0])
        assert r.status_code == 200 and r.json()[0]["class"]
        assert proc.wait(30) == 0


def test_a_body_that_is_not_the_multipart_it_says_is_400_and_one_line_of_the_services_and_it_goes_on(head):
    """The client got its 400, and the server's log a bare 'Expected boundary character 45, got 110 at index 2'
    (python-multipart's own warning), not saying which request or what was refused."""
    import httpx

    with serving(head) as (proc, url):
        r = httpx.post(f"{url}/predict", content=b"not multipart at all",
                       headers={"Content-Type": "multipart/form-data; boundary=b"})
        assert r.status_code == 400 and r.json()["detail"] == "Invalid multipart data."
        assert httpx.post(f"{url}/predict", files=upload(photos(head)[0])).status_code == 200  # still serving
        proc.send_signal(signal.SIGTERM)
        log = proc.communicate(timeout=30)[0]
    assert "Expected boundary" not in log, log
    assert re.search(r"^127\.0\.0\.1:\d+ - 400: POST /predict's multipart/form-data refused: Invalid multipart data\.$",
                     log, re.MULTILINE), log


def test_a_client_that_leaves_mid_upload_is_one_line_of_the_log_not_a_traceback(head, caplog):
    """A closed tab or a cancelled curl while its photo was still uploading: starlette's ClientDisconnect went up
    through the app, and the log got 'Exception in ASGI application' and a 50-line traceback for each."""
    import asyncio
    import logging

    app = pipeline.serve_app(head, precision="fp32")
    head_bytes, body = _form_request(photos(head)[0].read_bytes())
    messages = [{"type": "http.request", "body": body[:len(body) // 2], "more_body": True},
                {"type": "http.disconnect"}]

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        pass

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/predict", "raw_path": b"/predict", "query_string": b"", "root_path": "",
             "headers": [(b"host", b"localhost"), (b"content-type", b"multipart/form-data; boundary=b"),
                         (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000)}
    with caplog.at_level(logging.INFO, logger="pipeline.serving.service"):
        asyncio.run(app(scope, receive, send))  # raised ClientDisconnect (uvicorn logs it with its traceback)
    assert "127.0.0.1:50000 - POST /predict: the client left before its request body was in" in caplog.messages


def test_the_request_lines_go_to_stderr_with_the_other_logs(head):
    """uvicorn's access lines ('"POST /predict HTTP/1.1" 200 OK') went to stdout, the other lines to stderr: serve
    2> serve.log left the requests on the terminal."""
    import httpx

    with serving(head, stderr=subprocess.PIPE) as (proc, url):
        assert httpx.post(f"{url}/predict", files=upload(photos(head)[0])).status_code == 200
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert out == ""
    assert '"POST /predict HTTP/1.1" 200' in err, err


@pytest.mark.parametrize("stderr_tty", [False, True])
def test_the_log_lines_are_coloured_only_where_stderr_is_a_terminal(monkeypatch, stderr_tty):
    """uvicorn colours its lines when stdout is a terminal: 'serve 2> serve.log' typed in a terminal wrote
    '\x1b[32mINFO\x1b[0m' and '\x1b[32m200 OK\x1b[0m' into serve.log."""
    import importlib
    import logging

    from pipeline.serving.service import stderr_logging

    class Stream(io.StringIO):
        def __init__(self, tty):
            super().__init__()
            self.tty = tty

        def isatty(self):
            return self.tty

    monkeypatch.setattr(sys, "stdout", Stream(not stderr_tty))
    monkeypatch.setattr(sys, "stderr", Stream(stderr_tty))
    record = logging.LogRecord("uvicorn.access", logging.INFO, "", 0, '%s - "%s %s HTTP/%s" %d',
                               ("127.0.0.1:5", "POST", "/predict", "1.1", 200), None)
    for name, spec in stderr_logging()["formatters"].items():
        module, cls = spec["()"].rsplit(".", 1)
        options = {k: v for k, v in spec.items() if k != "()"}
        line = getattr(importlib.import_module(module), cls)(**options).format(record)
        assert ("\x1b[" in line) is stderr_tty, (name, line)


def test_past_drain_seconds_a_request_in_flight_gets_a_clean_503(head):
    """It got a 500, and the log a traceback a request (uvicorn cancelling it). Port 0: the log says the real one."""
    # the lone image waits 1 s for company; SIGTERM while it waits, --drain-seconds 0.2: not done in time
    with serving(head, "--max-wait-ms", "1000", "--drain-seconds", "0.2") as (proc, url):
        r = predict_then_sigterm(url, proc, photos(head)[0])
        assert r.status_code == 503 and "--drain-seconds" in r.json()["detail"]
        assert proc.wait(30) == 0
        log = proc.stdout.read()
        assert "Traceback" not in log and "Exception in ASGI" not in log, log


def test_a_second_ctrl_c_while_draining_is_one_line_not_two_tracebacks(head):
    """A second Ctrl-C while serve drained (uvicorn quitting at once) logged two CancelledError tracebacks, the
    lifespan's and the request's, and answered the request 500; now one line, and the request a 503 saying why."""
    with serving(head, "--max-wait-ms", "1000", "--drain-seconds", "60") as (proc, url):
        r = predict_then_sigterm(url, proc, photos(head)[0], signals=(signal.SIGINT, signal.SIGINT))
        assert r.status_code == 503 and "a second Ctrl-C" in r.json()["detail"], r.text
        assert proc.wait(30) == 130
        log = proc.stdout.read()
        assert "Traceback" not in log and "CancelledError" not in log and "Exception in ASGI" not in log, log
        assert log.count("stopped at once (a second Ctrl-C)") == 1, log


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def _closed_answer(s: socket.socket) -> bytes:
    """All ``s`` receives until the service closes it (a socket.timeout, failing the test, if it never does)."""
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := s.recv(65536):
            data += chunk
    return data


def _one_answer(s: socket.socket) -> bytes:
    """One whole response read from ``s`` (its Content-Length), leaving the connection open."""
    import re

    data, length = b"", None
    while length is None or len(data.partition(b"\r\n\r\n")[2]) < length:
        chunk = s.recv(65536)
        assert chunk, f"closed before a whole answer: {data!r}"
        data += chunk
        found = re.search(rb"content-length: (\d+)\r\n.*?\r\n\r\n", data, re.IGNORECASE | re.DOTALL)
        length = int(found[1]) if found else None
    return data


GET_HEALTH = b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n"


def test_a_request_line_that_stalls_is_408_and_closed_and_the_service_goes_on(head):
    """uvicorn started no clock at a connection: a request line sent in part, then nothing, held it for ever."""
    import httpx

    with live_server(pipeline.serve_app(head, precision="fp32", header_seconds=0.5)) as url:
        with socket.create_connection(("127.0.0.1", _port(url)), timeout=5) as s:  # 10 x the deadline
            s.sendall(b"GET /hea")
            status, _, body = _closed_answer(s).decode().partition("\r\n\r\n")
        assert status.startswith("HTTP/1.1 408 ") and "connection: close" in status.lower()
        detail = json.loads(body)["detail"]
        assert "within 0.5 s (--header-seconds)" in detail and "\n" not in detail
        assert httpx.get(f"{url}/health").status_code == 200


def test_a_kept_alive_connection_whose_next_headers_stall_is_closed_too(head):
    with live_server(pipeline.serve_app(head, precision="fp32", header_seconds=0.5)) as url:
        with socket.create_connection(("127.0.0.1", _port(url)), timeout=5) as s:
            s.sendall(GET_HEALTH)
            assert _one_answer(s).startswith(b"HTTP/1.1 200 ")  # the first answer, the connection kept alive
            s.sendall(b"GET /health HTTP/1.1\r\nHost: loc")  # the next request's headers, then nothing
            assert _closed_answer(s).startswith(b"HTTP/1.1 408 ")


def test_headers_sent_slowly_within_the_deadline_are_served_and_a_kept_alive_clock_restarts(head):
    """The deadline is the headers' (from the next request's first byte), not the connection's age."""
    with live_server(pipeline.serve_app(head, precision="fp32", header_seconds=2)) as url:
        with socket.create_connection(("127.0.0.1", _port(url)), timeout=20) as s:
            for k in range(0, len(GET_HEALTH), 10):  # 5 pieces, 0.2 s apart: under a second of the 2
                s.sendall(GET_HEALTH[k:k + 10])
                time.sleep(0.2)
            assert _one_answer(s).startswith(b"HTTP/1.1 200 ")
            time.sleep(2.5)  # idle past the header deadline, within uvicorn's 5 s keep-alive
            s.sendall(GET_HEALTH.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
            assert _closed_answer(s).startswith(b"HTTP/1.1 200 ")


def test_many_stalled_connections_are_all_closed_while_an_honest_request_is_answered(head):
    """Slowloris against `serve` itself: 50 connections, half sending nothing, half a partial request line."""
    import httpx

    with serving(head, "--header-seconds", "2") as (proc, url):
        stalled = []
        try:
            for k in range(50):
                stalled.append(socket.create_connection(("127.0.0.1", _port(url)), timeout=20))  # 10 x the deadline
                if k % 2 == 0:
                    stalled[-1].sendall(b"POST /predict HTTP/1.1\r\nHost: loc")
            assert httpx.get(f"{url}/health", timeout=20).status_code == 200  # most likely while all are held
            answers = [_closed_answer(s) for s in stalled]
        finally:
            for s in stalled:
                s.close()
        assert all(a.startswith(b"HTTP/1.1 408 ") for a in answers[::2])
        assert all(a == b"" for a in answers[1::2])  # nothing came: closed without a word
        assert httpx.get(f"{url}/health", timeout=20).status_code == 200


def test_an_unknown_uvicorn_is_refused_at_start_up_not_served_without_a_deadline(monkeypatch):
    from pipeline.errors import PipelineError
    from pipeline.serving import header_deadline

    assert header_deadline.protocol(1.0).header_seconds == 1.0  # this uvicorn: what it hooks is there
    monkeypatch.setattr(header_deadline, "HOOKS", {"connection_made": ("transport", "a_field_uvicorn_never_had")})
    with pytest.raises(PipelineError, match="sets no a_field_uvicorn_never_had: header_seconds cannot be kept"):
        header_deadline.protocol(1.0)
    monkeypatch.setattr(header_deadline, "HOOKS", {"a_method_uvicorn_never_had": ()})
    with pytest.raises(PipelineError, match="has no a_method_uvicorn_never_had"):
        header_deadline.protocol(1.0)


def test_serve_model_where_it_cannot_block_says_so_before_loading_the_model(tmp_path, monkeypatch):
    """In Jupyter (an event loop running) serve_model ended in asyncio's 'Cannot run the event loop while another
    loop is running', from a thread in 'signal only works in main thread', each after loading the model."""
    import asyncio

    from pipeline.serving import service

    monkeypatch.setattr(service, "build_app", lambda cfg: pytest.fail("the model was loaded"))
    model = tmp_path / "head.pt"  # never read

    async def in_a_notebook():
        pipeline.serve_model(model, port=0)

    with pytest.raises(pipeline.UsageError, match=r"cannot run inside a running event loop \(Jupyter's\).*serve_app"):
        asyncio.run(in_a_notebook())
    raised = []
    thread = threading.Thread(target=lambda: raised.append(pytest.raises(pipeline.UsageError, pipeline.serve_model,
                                                                         model, port=0)))
    thread.start()
    thread.join(30)
    assert "serve runs in the main thread" in str(raised[0].value)


def test_a_port_in_use_is_one_line(head):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = CliRunner().invoke(cli.cli, ["serve", "--model", str(head), "--port", str(port)])
    assert r.exit_code == 1 and f"cannot listen on 127.0.0.1:{port}" in r.output and "Traceback" not in r.output


def test_a_host_address_this_machine_lacks_is_a_usage_error_naming_the_host(head):
    """It said 'cannot listen on 192.0.2.1:8000: Cannot assign requested address; pass another --port'."""
    r = CliRunner().invoke(cli.cli, ["serve", "--model", str(head), "--host", "192.0.2.1"])  # TEST-NET-1: no one's
    assert r.exit_code == 2, r.output
    assert "--host '192.0.2.1' is not an address of this machine" in r.output and "--port" not in r.output
    assert "pass 127.0.0.1 (this machine only, the default), 0.0.0.0 or :: (every interface)" in r.output
    r = CliRunner().invoke(cli.cli, ["serve", "--model", str(head), "--host", "example.invalid"])  # no such name
    assert r.exit_code == 2 and "--host 'example.invalid' is not an address" in r.output and "0.0.0.0" in r.output


def test_a_full_queue_is_503_with_retry_after(client, head, monkeypatch):
    from pipeline.serving.batcher import QueueFull

    def full(images):
        raise QueueFull("256 images are waiting (at most 256)")

    monkeypatch.setattr(client.app.state.service.batcher, "reserve", full)
    r = client.post("/predict", files=upload(photos(head)[0]))
    assert r.status_code == 503 and r.headers["retry-after"] == "1" and "busy" in r.json()["detail"]


def test_a_full_queue_refuses_before_any_decoding(client, head, monkeypatch):
    """The queue was checked only after every upload was decoded: a flood cost a full decode each."""
    from pipeline.serving import service

    decoded = []
    real = service.decode_bytes
    monkeypatch.setattr(service, "decode_bytes", lambda *a, **k: decoded.append(1) or real(*a, **k))
    batcher = client.app.state.service.batcher
    with batcher.reserve(batcher.max_queue - 1):  # 7 of 8 taken by requests being decoded
        r = client.post("/predict", files=upload(*photos(head)[:2]))
        assert r.status_code == 503 and "7 being decoded" in r.json()["detail"] and decoded == []
    assert client.post("/predict", files=upload(*photos(head)[:2])).status_code == 200 and len(decoded) == 2
    assert batcher._reserved == 0  # given back: by the submit, and by the with block


def test_at_most_one_upload_a_core_is_decoded_at_once(head, monkeypatch):
    """32 clients with 6300 x 6300 PNGs reached 6 GB: 40 request threads decoded at once. Now a pool of
    decode_threads() threads decodes, whatever the number of clients."""
    from pipeline.serving import service

    monkeypatch.setattr(service, "decode_threads", lambda: 2)
    lock, now, most = threading.Lock(), [0], [0]
    real = service.decode_bytes

    def counted(*a, **k):
        with lock:
            now[0] += 1
            most[0] = max(most[0], now[0])
        time.sleep(0.05)
        try:
            return real(*a, **k)
        finally:
            with lock:
                now[0] -= 1

    monkeypatch.setattr(service, "decode_bytes", counted)
    files = photos(head)[:4]
    with TestClient(pipeline.serve_app(head, precision="fp32"), base_url="http://localhost") as c:
        results = []
        threads = [threading.Thread(target=lambda: results.append(c.post("/predict", files=upload(*files))))
                   for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert [r.status_code for r in results] == [200] * 6 and most[0] == 2


@pytest.mark.parametrize("host, status", [("localhost:8000", 200), ("127.0.0.1", 200), ("[::1]:80", 200),
                                          ("LOCALHOST.", 200), ("evil.example.com", 400),
                                          ("127.0.0.1.evil.example.com:8000", 400), ("", 400)])
def test_a_loopback_service_answers_its_own_names_only(client, host, status):
    """DNS rebinding: a page of evil.example.com, its name now pointing at 127.0.0.1, read /info."""
    r = client.get("/info", headers={"Host": host})
    assert r.status_code == status and (status == 200 or "localhost only" in r.json()["detail"])


def test_info_shows_file_names_not_where_they_are(client, head):
    info = client.get("/info").json()
    assert info["model"] == head.name and "/" not in info["cache"] and info["cache"].endswith(".h5")
    assert str(head.parent) not in str(info)


def test_a_missing_extra_is_one_line(monkeypatch):
    import importlib.util

    from pipeline.serving import service

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "multipart" else real(name, *a))
    with pytest.raises(pipeline.PipelineError, match=r"serve needs python-multipart: pip install"):
        service.require()


def test_an_upload_stored_sideways_with_its_orientation_tag_gets_the_upright_photos_row(client, head, tmp_path):
    """serve decodes uploads by the same rule: a phone photo stored turned with its EXIF Orientation gets the
    upright photo's probabilities (before, the sideways pixels')."""
    from tests.test_image_reader import STORED_AS, photo_like, save_turned

    up = Image.fromarray(photo_like(60, 40, seed=4))
    up.save(tmp_path / "up.png")
    save_turned(up, tmp_path / "turned.png", 6)
    up.transpose(STORED_AS[6]).save(tmp_path / "sideways.png")
    rows = client.post("/predict?top=3", files=upload(tmp_path / "up.png", tmp_path / "turned.png",
                                                       tmp_path / "sideways.png")).json()
    probs = [{t["class"]: t["probability"] for t in r["top"]} for r in rows]
    assert probs[1] == pytest.approx(probs[0], abs=1e-6)
    assert max(abs(probs[2][c] - probs[0][c]) for c in probs[0]) > 1e-4  # a turn does show


def test_an_app_mounting_serve_app_keeps_its_own_multipart_logging(head):
    """serve_app (for mounting in another app) set python-multipart's loggers to ERROR for the whole process."""
    import logging

    logger = logging.getLogger("python_multipart")
    old = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        pipeline.serve_app(head, precision="fp32")
        assert logger.level == logging.DEBUG
    finally:
        logger.setLevel(old)


def test_an_animated_upload_is_answered_from_its_first_frame_and_its_row_says_so(client, head):
    """An animated GIF (or APNG, animated WebP, multi-page TIFF) uploaded was classified from its first frame with
    nothing said, where predict warns. Its row now carries a ``note`` saying so (a field added: every other field
    as before; ``note`` is null for a photo of one frame), as predict's rows do."""
    frames = [Image.new("RGB", (40, 32), c) for c in [(250, 20, 20), (20, 250, 20), (20, 20, 250)]]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:])
    first = io.BytesIO()
    frames[0].save(first, "GIF")
    sent = [("files", (name, f.getvalue(), "image/gif")) for name, f in (("anim.gif", gif), ("still.gif", first))]
    r = client.post("/predict", files=sent + upload(photos(head)[0]))
    assert r.status_code == 200
    anim, still, photo = r.json()
    assert anim["note"].startswith("the first of its 3 frames was classified") and anim["error"] is None
    assert still["note"] is None and photo["note"] is None
    assert (anim["class"], anim["probability"]) == (still["class"], pytest.approx(still["probability"], abs=1e-6))
    assert set(anim) == {"path", "class", "probability", "unknown", "ood_score", "error", "note"}


def test_an_app_used_without_its_lifespan_answers_every_request_in_full(head):
    """A TestClient outside ``with`` runs each request in a loop of its own and no lifespan: the drain watch waited
    on an event of the first request's loop, failed at once from the second on, and cut every answer short (200, no
    body)."""
    c = TestClient(pipeline.serve_app(head, precision="fp32"), base_url="http://localhost")
    for _ in range(2):
        assert c.get("/health").json()["status"] == "ok"
    r = c.post("/predict", files=upload(photos(head)[0]))
    assert r.status_code == 200 and r.json()[0]["error"] is None
    assert c.post("/predict?top=abc").json()["detail"].startswith("top: ")


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("localhost", True), ("LOCALHOST", True),
                                            ("localhost.", True), ("127.1", True), ("::1", True),
                                            ("::ffff:127.0.0.1", True), ("0.0.0.0", False), ("::", False),
                                            ("192.0.2.1", False)])
def test_a_host_is_loopback_by_the_addresses_it_binds_not_by_its_spelling(host, loopback):
    from pipeline.serving.service import is_loopback

    assert is_loopback(host) is loopback


def test_a_loopback_host_spelled_otherwise_still_answers_its_own_names_only(head):
    """--host LOCALHOST binds 127.0.0.1 as localhost does: it was warned about as reachable from other machines, and
    served a page of evil.example.com (DNS rebinding)."""
    with TestClient(pipeline.serve_app(head, precision="fp32", host="LOCALHOST"), base_url="http://localhost") as c:
        assert c.get("/health").status_code == 200
        assert c.get("/health", headers={"Host": "evil.example.com"}).status_code == 400
