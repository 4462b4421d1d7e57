"""The serve stage: a model behind HTTP (FastAPI on uvicorn), with a web page to drop photos on.

``POST /predict`` takes one or many images (multipart/form-data, each in a field named ``files``) and
answers the rows ``predict --format json`` gives for the same files (``models.predict.prediction_rows``
makes both); ``?top=K`` adds each image's K most probable classes, ``?explain=true`` its heatmap over it (a
``data:`` JPEG in ``heatmap``: where the class was decided, ``heads.heatmaps``). ``GET /info`` says what is served,
``GET /health`` that it is up, ``GET /`` is the page (``page.html``: no external resource).

Uploads are decoded with the rules every stage decodes with (``data.folders``), by a pool of one thread
per core (``decode_threads``: at most that many images are being decoded at once, whatever the number of
clients: a 6300 x 6300 PNG takes 160 MB while it is); the network runs in one thread that batches the
images of concurrent requests (``batcher``). Every limit is a ServeConfig field: body size (checked as
it streams in), a body's idle time and least rate (408), files per request, bytes and pixels per image,
images waiting or being decoded (503 past it, before any decoding), and the time a request's line and
headers may take (408: ``header_deadline``). A bad file is its row's ``error``,
as in predict; a request with no usable image is a 4xx naming each file's reason. With a loopback --host
(the default) only requests naming this machine in their Host header are answered (DNS rebinding).
SIGTERM: uvicorn stops accepting, answers what is in flight (for up to ``drain_seconds``; what is still
running then gets a clean 503), then the batcher stops.
"""
# no ``from __future__ import annotations``: FastAPI reads the endpoints' annotations (Request), imported
# inside build_app so that the module loads without the serve extra and says what is missing
import asyncio
import contextlib
import errno
import ipaddress
import logging
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import resources

from ..cache.provenance import package_version, versions
from ..config import ServeConfig, check_config, option_text, option_value
from ..data.folders import FRAMES, MAX_IMAGE_PIXELS, ImageLoadError, decode_bytes
from ..data.image_reader import Batch, Item, draft_short_side
from ..devices import resolve_workers
from ..errors import PipelineError, UsageError
from ..models.predict import prediction_rows
from ..heads.heatmaps import overlay
from ..models.whole_models import (
    explaining,
    has_map,
    map_grid,
    model_from_checkpoint,
    network,
    read_checkpoint,
    split_maps,
)
from ..reports.audit_html import data_uri
from .batcher import Closed, MicroBatcher, QueueFull

log = logging.getLogger(__name__)

FIELD = "files"  # the multipart field that holds the images
TOO_LARGE = "too-large"  # the ImageLoadError kind of a file over max_file_bytes
#: Seconds uvicorn waits past --drain-seconds before cancelling what is left (a 500 and a traceback each):
#: by then ``DrainDeadline`` has answered every request still running with a 503.
CANCEL_GRACE_S = 2.0
RETRY_AFTER_S = "1"  # seconds a busy 503 asks the client to wait (``busy_response``)


def decode_threads() -> int:
    """Uploads decoded at once: one per core (at most 8), the most the CPU can decode anyway."""
    return resolve_workers(-1)


def require() -> None:
    """PipelineError in one line when the serving packages are not installed."""
    import importlib.util

    missing = [m for m in ("fastapi", "uvicorn", "multipart") if importlib.util.find_spec(m) is None]
    if missing:
        raise PipelineError(f"serve needs {', '.join('python-multipart' if m == 'multipart' else m for m in missing)}: "
                            "pip install 'transfer-pipeline[serve]'")


def check(cfg: ServeConfig) -> None:
    check_config(cfg)
    if cfg.max_pixels > MAX_IMAGE_PIXELS:
        raise UsageError(f"{option_text('max_pixels', cfg.max_pixels)} is more than any stage decodes "
                         f"({MAX_IMAGE_PIXELS})")
    if cfg.max_queue < cfg.max_files:
        raise UsageError(f"{option_text('max_queue', cfg.max_queue)} is less than "
                         f"{option_text('max_files', cfg.max_files)}: a full request "
                         "would never fit")


class BodyTooLarge(Exception):
    """The request body grew past max_request_bytes while it streamed in."""


class BodyTimeout(Exception):
    """The request body stalled, or came too slowly (its message says which limit, in one line)."""


#: The shortest wait for the next chunk of a body that is behind --min-body-rate: time for one already there to be read.
MIN_WAIT_S = 0.05


class BodyLimit:
    """ASGI middleware: a declared Content-Length over the limit is refused at once (413), and a body that
    streams past it (chunked) raises BodyTooLarge in whoever reads it. A body with no byte for ``seconds``
    (0: no time limit), or past its first ``seconds`` averaging under ``rate`` bytes/s (0: no minimum), raises
    BodyTimeout: a client that stops sending, or sends a byte now and then, would hold its connection (and its
    request slot) for ever, while one whole deadline would refuse an honest large upload on a slow uplink."""

    def __init__(self, app, max_bytes: int, seconds: float = 0, rate: float = 0):
        self.app, self.max_bytes, self.seconds, self.rate = app, max_bytes, seconds, rate

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from fastapi.responses import JSONResponse

        length = dict(scope.get("headers", ())).get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                return await JSONResponse({"detail": "Content-Length is not a number"}, 400)(scope, receive, send)
            if declared > self.max_bytes:
                return await JSONResponse({"detail": f"the request is {declared} bytes; at most {self.max_bytes}"},
                                          413)(scope, receive, send)
        seen, complete, started = 0, False, None

        async def limited():
            nonlocal seen, complete, started
            if complete or not self.seconds:  # past the body: the wait for a disconnect has no deadline
                message = await receive()
            else:  # the clocks start when the app first reads: its own delay before that is not the client's
                started = started if started is not None else asyncio.get_running_loop().time()
                message = await self.next_chunk(receive, started, seen)
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                complete = not message.get("more_body", False)
                if seen > self.max_bytes:
                    raise BodyTooLarge()
            return message

        return await self.app(scope, limited, send)

    async def next_chunk(self, receive, started: float, seen: int):
        """receive() within both limits: ``seconds`` from now, and ``started + seconds + seen / rate`` (from
        then on, ``seen`` bytes are more than ``seconds`` behind ``rate``)."""
        now = asyncio.get_running_loop().time()
        slow_at = started + self.seconds + seen / self.rate if self.rate else float("inf")
        idle = seen == 0 or slow_at - now >= self.seconds  # no byte yet: both limits say the same
        try:  # never a zero wait: a chunk already waiting in the server is always taken
            return await asyncio.wait_for(receive(), max(min(self.seconds, slow_at - now), MIN_WAIT_S))
        except asyncio.TimeoutError:
            raise BodyTimeout(f"no byte of the request body came for {self.seconds:g} s (--body-seconds)" if idle else
                              f"the request body came slower than {self.rate:g} bytes/s (--min-body-rate) past its "
                              f"first {self.seconds:g} s (--body-seconds)") from None


def busy_response(reason: str):
    """The 503 of a service that is full now, not broken (``reason``: which limit), with Retry-After so that
    clients come back: RequestSlots and a full batcher queue both answer it."""
    from fastapi.responses import JSONResponse

    return JSONResponse({"detail": f"busy: {reason}; retry shortly"}, 503, headers={"Retry-After": RETRY_AFTER_S})


class RequestSlots:
    """ASGI middleware: at most ``slots`` POST requests at once; past it 503 with Retry-After, before any of the
    body is read. A form being read keeps up to 1 MB of each file in memory (Starlette's spool), so without a
    bound N clients cost N x max_files MB, however the queue behind is limited."""

    def __init__(self, app, slots: int):
        self.app, self.slots, self.busy = app, slots, 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        if self.busy >= self.slots:
            reason = f"{self.busy} requests are being answered (--max-requests {self.slots})"
            return await busy_response(reason)(scope, receive, send)
        self.busy += 1
        try:
            return await self.app(scope, receive, send)
        finally:
            self.busy -= 1


def host_name(header: str) -> str:
    """The name of a Host header, without its port: "[::1]:8000" -> "::1", "Localhost.:80" -> "localhost"."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    name = header.rsplit(":", 1)[0] if header.count(":") == 1 else header
    return name.rstrip(".")


def local_names(host: str) -> frozenset:
    """The Host names a loopback service answers: localhost's and the bound address."""
    return frozenset({"localhost", "127.0.0.1", "::1", host_name(host)})


class LocalHostOnly:
    """ASGI middleware: a request whose Host header names anything but this machine (``allowed``) is 400.

    A service on localhost is safe from other machines, but not from a web page open in a browser here: with
    DNS rebinding its name (evil.example.com) comes to point at 127.0.0.1, and the browser sends it the
    page's requests with that name as Host. Only with a loopback --host: one given for other machines to
    reach has names this service cannot know."""

    def __init__(self, app, allowed: frozenset):
        self.app, self.allowed = app, allowed

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            header = dict(scope.get("headers", ())).get(b"host", b"").decode("latin-1")
            if host_name(header) not in self.allowed:
                from fastapi.responses import JSONResponse

                return await JSONResponse({"detail": f"Host {header[:100]!r} is not this machine's name; this "
                                                     "service answers localhost only"}, 400)(scope, receive, send)
        return await self.app(scope, receive, send)


class DrainDeadline:
    """ASGI middleware: once SIGTERM's --drain-seconds are over (``Service.drained``), a request still running
    is answered 503 and stopped, before uvicorn would cancel it (a 500 and a traceback in the log, each)."""

    def __init__(self, app, service: "Service"):
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send):
        # no lifespan in this loop (a TestClient outside ``with``, an app mounting this one): no SIGTERM drain to
        # watch, and ``drained`` may belong to another loop (waiting on it failed at once, cutting each answer short)
        if scope["type"] != "http" or self.service.loop is not asyncio.get_running_loop():
            return await self.app(scope, receive, send)
        started = False

        async def tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        request = asyncio.ensure_future(self.app(scope, receive, tracked))
        drained = asyncio.ensure_future(self.service.drained.wait())
        try:
            await asyncio.wait({request, drained}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # uvicorn forcing the exit (a second Ctrl-C): nothing left behind
            request.cancel()
            drained.cancel()
            if not started:  # not raised: uvicorn logged it as a CancelledError traceback (lifespan says it)
                await self._stopped(scope, receive, send, "a second Ctrl-C ended the drain before the request was done")
            return
        if request.done():
            drained.cancel()
            return request.result()
        request.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await request
        if not started:
            await self._stopped(scope, receive, send, f"the request was not done within the "
                                                      f"{self.service.cfg.drain_seconds:g} s of --drain-seconds")

    @staticmethod
    async def _stopped(scope, receive, send, why: str) -> None:
        from fastapi.responses import JSONResponse

        await JSONResponse({"detail": f"the service stopped: {why}"}, 503)(scope, receive, send)


def page_html() -> str:
    return resources.files(__package__).joinpath("page.html").read_text(encoding="utf-8")


class Service:
    """The loaded model, its batcher, and turning uploads into rows."""

    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        c = read_checkpoint(cfg.model)
        self.lm = lm = model_from_checkpoint(c, cfg.model, cfg.weights)
        self.inference = network(lm, cfg.device, cfg.precision)  # predict's network, unknown score included
        self.min_short_side = draft_short_side(lm.transform)
        self.batcher = MicroBatcher(self.inference, cfg.batch_size, cfg.max_wait_ms / 1000, cfg.max_queue)
        # ?explain=true: the same model with the head's gradient (heatmaps), batched on its own, so only the
        # requests that ask for maps pay for them (a kernel head's gradient can cost more than a small backbone)
        self.grid = map_grid(lm) if has_map(lm) else None  # fused features: no one map; PiT's: 1 x 1
        self.explainer = (MicroBatcher(explaining(self.inference), cfg.batch_size, cfg.max_wait_ms / 1000,
                                       cfg.max_queue) if self.grid else None)
        self.decoder = ThreadPoolExecutor(decode_threads(), thread_name_prefix="decode-upload")
        self.started = time.time()
        self.drained = asyncio.Event()  # set --drain-seconds after SIGTERM (``begin_drain``)
        self.loop = None  # the server's event loop, once it runs
        # GET /info: fixed once the model is loaded; file names only, never where they are on this machine
        self._info = {"model": os.path.basename(cfg.model), "kind": lm.kind, "classes": lm.classes,
                      "backbone": c["backbone"], "weights": os.path.basename(c["weights"] or ""),
                      "preprocessing": lm.info.get("preprocessing"),
                      "cache": os.path.basename(c.get("cache", "")),
                      "cache_fingerprint": c.get("cache_fingerprint", ""),
                      "data_fingerprint": c.get("data_fingerprint", ""),
                      "device": str(self.inference.device), "precision": self.inference.precision,
                      "batch_size": cfg.batch_size, "max_wait_ms": cfg.max_wait_ms,
                      "limits": {k: getattr(cfg, k) for k in ("max_requests", "max_files", "max_file_bytes",
                                                              "max_request_bytes", "max_pixels", "max_queue",
                                                              "header_seconds", "body_seconds",
                                                              "min_body_rate")},
                      "versions": {**versions(),
                                   **{p: package_version(p) for p in ("fastapi", "uvicorn", "starlette")}}}

    def begin_drain(self) -> None:
        """SIGTERM came (called in the signal handler): in drain_seconds, what still runs is answered 503."""
        if self.loop is not None and self.cfg.drain_seconds:
            self.loop.call_soon_threadsafe(self.loop.call_later, self.cfg.drain_seconds, self.drained.set)

    def info(self) -> dict:
        return self._info

    def health(self) -> dict:
        both = [b for b in (self.batcher, self.explainer) if b is not None]
        return {"status": "ok", **{k: sum(getattr(b, k) for b in both) for k in ("waiting", "batches", "images")},
                "uptime_s": round(time.time() - self.started, 3)}

    def item(self, k: int, name: str, data) -> Item:
        """One upload decoded and preprocessed as predict does, or with the reason it cannot be."""
        try:
            if not isinstance(data, bytes):
                raise ImageLoadError(f"form field {FIELD!r} holds text, not a file", "not-an-image")
            if len(data) > self.cfg.max_file_bytes:  # read up to one byte past the limit: its real size is unknown
                raise ImageLoadError(f"larger than the {self.cfg.max_file_bytes} bytes allowed per image", TOO_LARGE)
            rgb = decode_bytes(data, self.min_short_side, self.cfg.max_pixels)
            return Item(k, self.lm.transform(rgb), -1, name, frames=rgb.info.get(FRAMES, 1))
        except ImageLoadError as e:
            return Item(k, None, -1, name, e.reason)

    def upload_item(self, k: int, up) -> tuple[Item, bool]:
        """(Item, whether it was too large) of the form's ``k``-th ``files`` entry (in a decoding thread)."""
        if isinstance(up, str):
            return self.item(k, f"{FIELD}[{k}]", up), False
        data = up.file.read(self.cfg.max_file_bytes + 1)
        return self.item(k, up.filename or f"{FIELD}[{k}]", data), len(data) > self.cfg.max_file_bytes

    def heatmaps(self, items: list[Item], rows: list[dict], maps) -> None:
        """Each row's ``heatmap``: its photo as the model saw it under the map, as a data: URI (None for a file
        that was no image, or a model on fused features, which has no one map)."""
        good = iter(maps if maps is not None else [])
        for item, row in zip(items, rows):
            explained = item.ok and self.grid is not None
            row["heatmap"] = data_uri(overlay(self.lm.transform, item.image, next(good))) if explained else None

    async def read_uploads(self, uploads) -> tuple[list[Item], list[bool]]:
        """(Items, whether each was too large) of the form's ``files`` entries, each decoded by the pool."""
        done = await asyncio.gather(*(asyncio.wrap_future(self.decoder.submit(self.upload_item, k, up))
                                      for k, up in enumerate(uploads)))
        return [item for item, _ in done], [large for _, large in done]


def no_image_detail(rows: list[dict]) -> str:
    reasons = "; ".join(f"{r['path']}: {r['error']}" for r in rows[:5])
    more = f" (and {len(rows) - 5} more)" if len(rows) > 5 else ""
    return f"none of the {len(rows)} files could be classified: {reasons}{more}"


def validation_detail(errors) -> str:
    """FastAPI's list of a query's validation errors as one line: "top: Input should be a valid integer, ... got
    'abc'" (the page and curl show ``detail`` as it is)."""
    return "; ".join(f"{e['loc'][-1]}: {e['msg']}, got {e.get('input')!r}" for e in errors)


def build_app(cfg: ServeConfig):
    """The FastAPI app serving cfg.model (the model loads now; the batcher stops when the app shuts down)."""
    require()
    check(cfg)
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect

    svc = Service(cfg)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        svc.loop, svc.drained = asyncio.get_running_loop(), asyncio.Event()  # bound to the loop that serves
        try:
            yield
        except asyncio.CancelledError:  # a second Ctrl-C: uvicorn quits at once; a traceback, before, per task
            log.warning("stopped at once (a second Ctrl-C): requests still in flight are answered 503")
            return
        # uvicorn has answered every request in flight by now: what is still queued runs, then the worker stops
        await run_in_threadpool(svc.batcher.close, cfg.drain_seconds or None)
        if svc.explainer is not None:
            await run_in_threadpool(svc.explainer.close, cfg.drain_seconds or None)
        svc.decoder.shutdown(wait=False, cancel_futures=True)

    # no /docs page: FastAPI's loads its scripts from a CDN (the schema stays at /openapi.json)
    app = FastAPI(title="transfer-pipeline", version=package_version("transfer-pipeline"), lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    app.state.service = svc

    @app.exception_handler(RequestValidationError)
    async def bad_parameter(request, exc):
        return JSONResponse({"detail": validation_detail(exc.errors())}, 400)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(page_html())

    @app.get("/favicon.ico", include_in_schema=False)
    async def icon():  # a browser asks for it (the page names none: data:,), on /health too: a 404 line each time
        return Response(status_code=204)

    @app.get("/health")
    async def health():
        return svc.health()

    @app.get("/info")
    async def info():
        return svc.info()

    @app.post("/predict")
    async def predict(request: Request, top: int = 0, explain: bool = False):
        started = time.perf_counter()
        if not 0 <= top <= len(svc.lm.classes):
            return JSONResponse({"detail": f"top must be in 0..{len(svc.lm.classes)}, got {top}"}, 400)
        try:  # a malformed form or too many files: starlette's 400 with its reason
            form = await request.form(max_files=cfg.max_files, max_fields=cfg.max_files)
        except BodyTooLarge:
            return JSONResponse({"detail": f"the request is more than {cfg.max_request_bytes} bytes"}, 413)
        except BodyTimeout as e:
            return JSONResponse({"detail": str(e)}, 408)
        except ClientDisconnect:  # a closed tab, a cancelled upload: one line, not an ASGI traceback each
            log.info("%sPOST /predict: the client left before its request body was in", client_prefix(request))
            return JSONResponse({"detail": "the client left before its request body was in"}, 400)
        except HTTPException as e:  # starlette's 400: a malformed body, too many files; said in the log too
            log.info("%s%d: POST /predict's multipart/form-data refused: %s", client_prefix(request), e.status_code,
                     e.detail)
            return JSONResponse({"detail": e.detail}, e.status_code)
        try:
            uploads = form.getlist(FIELD)
            if not uploads:
                return JSONResponse({"detail": f"no file in the field {FIELD!r} (multipart/form-data)"}, 400)
            explained = explain and svc.explainer is not None
            try:  # room in the queue first: a refused request costs no decoding
                reservation = (svc.explainer if explained else svc.batcher).reserve(len(uploads))
            except QueueFull as e:
                return busy_response(str(e))
            except Closed as e:
                return JSONResponse({"detail": str(e)}, 503)
            with reservation:
                items, large = await svc.read_uploads(uploads)
                good = [i.image for i in items if i.ok]
                outputs = await asyncio.wrap_future(reservation.submit(good)) if good else None
        except Closed as e:
            return JSONResponse({"detail": str(e)}, 503)
        finally:
            await form.close()
        maps = None
        if explained and outputs is not None:
            outputs, maps = split_maps(outputs, svc.grid)
        rows = prediction_rows(svc.lm, Batch(items), outputs, top)
        if explain:
            await asyncio.wrap_future(svc.decoder.submit(svc.heatmaps, items, rows, maps))
        headers = {"Server-Timing": f"predict;dur={(time.perf_counter() - started) * 1000:.1f}"}
        if not good:
            status = 413 if all(large) else 400
            return JSONResponse({"detail": no_image_detail(rows), "rows": rows}, status, headers=headers)
        return JSONResponse(rows, headers=headers)

    app.add_middleware(BodyLimit, max_bytes=cfg.max_request_bytes, seconds=cfg.body_seconds, rate=cfg.min_body_rate)
    app.add_middleware(RequestSlots, slots=cfg.max_requests)
    app.add_middleware(DrainDeadline, service=svc)
    if is_loopback(cfg.host):
        app.add_middleware(LocalHostOnly, allowed=local_names(cfg.host))
    return app


def quiet_form_parser() -> None:
    """python-multipart logs each parse error it raises as a bare warning ('Expected boundary character 45, got
    110 at index 2') before starlette answers it 400: the service says the refusal in its own line instead."""
    for name in ("python_multipart", "multipart"):
        logging.getLogger(name).setLevel(logging.ERROR)


def client_prefix(request) -> str:
    """'HOST:PORT - ' of the request's client, as uvicorn's lines and the 408's start ('' when unknown)."""
    return f"{request.client.host}:{request.client.port} - " if request.client else ""


def is_loopback(host: str) -> bool:
    """Whether every address ``host`` names is this machine's own, as the socket binds it: 'LOCALHOST', '127.1'
    and '::ffff:127.0.0.1' too (they were taken for other machines' addresses: a warning, and no Host check)."""
    if host_name(host) == "localhost":
        return True
    import socket

    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)}
    except (socket.gaierror, UnicodeError):  # no address: listening_socket says so
        return False
    return bool(addresses) and all(loopback_address(a) for a in addresses)


def loopback_address(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:  # an IPv6 address with a zone ('fe80::1%eth0'): a link, not this machine
        return False
    return ip.is_loopback or bool(getattr(ip, "ipv4_mapped", None) and ip.ipv4_mapped.is_loopback)


def listening_socket(host: str, port: int):
    """A socket bound to host:port (port 0: a free one, which the socket then says), before the model loads:
    a port in use is one line, not a traceback later; uvicorn serves on this very socket."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise not_this_machine(host, e.strerror) from None
    family, kind, _, _, address = infos[0]
    s = socket.socket(family, kind)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
    try:
        s.bind(address)
    except OSError as e:
        s.close()
        if e.errno == errno.EADDRNOTAVAIL:  # the address, not the port: another --port would not help
            raise not_this_machine(host, e.strerror) from None
        raise PipelineError(f"cannot listen on {host}:{port}: {e.strerror}; "
                            f"pass another {option_text('port')}") from None
    return s


def not_this_machine(host: str, why: str) -> UsageError:
    """The refusal of a --host serve cannot listen on, with the addresses it can."""
    return UsageError(f"{option_value('host', host)} is not an address of this machine ({why}); pass 127.0.0.1 "
                      "(this machine only, the default), 0.0.0.0 or :: (every interface) or one of this machine's "
                      "addresses")


def check_blocking_allowed() -> None:
    """UsageError, before the model loads, where serve cannot run: it blocks in its own event loop until SIGTERM
    or Ctrl-C, whose handlers only the main thread sets. pipeline.serve_model in Jupyter (a loop already running)
    ended in 'Cannot run the event loop while another loop is running', from a thread in 'signal only works in
    main thread', each after the model had loaded."""
    import threading

    other = "serve pipeline.serve_app(model) with your own uvicorn.Server"
    if threading.current_thread() is not threading.main_thread():
        raise UsageError(f"serve runs in the main thread (it stops on SIGTERM or Ctrl-C); from another thread, {other}")
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise UsageError("serve blocks until stopped and cannot run inside a running event loop (Jupyter's): run python "
                     f"cli.py serve in a terminal, or {other}")


def serve(cfg: ServeConfig) -> dict:
    """Run the service until SIGTERM or Ctrl-C (uvicorn drains the requests in flight first)."""
    import uvicorn

    check(cfg)
    check_blocking_allowed()
    with listening_socket(cfg.host, cfg.port) as sock:
        port = sock.getsockname()[1]
        app = build_app(cfg)
        quiet_form_parser()  # this process's logging only: an app mounting serve_app keeps its own
        svc = app.state.service
        if not is_loopback(cfg.host):
            log.warning("serving on %s: reachable from other machines, without authentication", cfg.host)
        log.info("serving %s on http://%s:%d/ (the page; POST /predict, GET /info, GET /health)",
                 cfg.model, f"[{cfg.host}]" if ":" in cfg.host else cfg.host, port)
        from ..progress import is_quiet

        server = uvicorn.Server(server_config(app, log_level="warning" if is_quiet() else "info",  # a line a request
                                              log_config=stderr_logging(),
                                              timeout_graceful_shutdown=cfg.drain_seconds + CANCEL_GRACE_S
                                              if cfg.drain_seconds else None))
        server.handle_exit = starting_the_drain(server.handle_exit, svc)  # what uvicorn's signal handlers call
        # uvicorn drains, then raises the signal it caught again, with the handler it found: this one, so a
        # SIGTERM after a clean drain is a normal return (exit 0), not death by the signal
        previous = signal.signal(signal.SIGTERM, _stopped)
        stopped_by = None
        try:
            server.run(sockets=[sock])
        except Stopped:
            stopped_by = "SIGTERM"
        finally:
            signal.signal(signal.SIGTERM, previous)
    health = svc.health()
    log.info("stopped%s after %d images in %d batches", f" by {stopped_by}" if stopped_by else "",
             health["images"], health["batches"])
    return {"model": cfg.model, "host": cfg.host, "port": port, "stopped_by": stopped_by, **health}


def stderr_logging() -> dict:
    """uvicorn's logging config with its access lines ('"POST /predict HTTP/1.1" 200 OK') on stderr, as every log
    of this tool: uvicorn's own default writes them to stdout. Coloured where stderr is a terminal: uvicorn asks
    stdout, so 'serve 2> serve.log' from a terminal wrote escape codes into serve.log."""
    import copy
    import sys

    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["handlers"]["access"]["stream"] = "ext://sys.stderr"
    for formatter in ("default", "access"):
        config["formatters"][formatter]["use_colors"] = sys.stderr.isatty()
    return config


def server_config(app, **options):
    """uvicorn's Config serving ``app`` (build_app's) as serve does: with HTTP/1.1 by h11 whose request line and
    headers must come within the app's --header-seconds (``header_deadline``; uvicorn bounds only the idle wait
    between requests). ``options``: uvicorn.Config's."""
    import uvicorn

    from .header_deadline import protocol

    return uvicorn.Config(app, http=protocol(app.state.service.cfg.header_seconds), **options)


def starting_the_drain(handle_exit, svc: Service):
    """uvicorn's ``handle_exit`` (SIGTERM, Ctrl-C), starting the service's drain clock first."""

    def handle(sig, frame) -> None:
        svc.begin_drain()
        handle_exit(sig, frame)

    return handle


class Stopped(Exception):
    """SIGTERM, raised again by uvicorn once it has answered the requests in flight."""


def _stopped(signum, frame):
    raise Stopped()
