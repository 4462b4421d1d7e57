"""A deadline for a request's line and headers (--header-seconds): uvicorn's h11 protocol with a clock.

uvicorn (0.55) starts no timer when a connection opens, and its keep-alive timer stops at the first byte of the
next request: a client sending its headers a byte now and then, or nothing at all, held its connection and a file
descriptor for ever (slowloris), until the process had none left and honest clients were refused. The body has
its own limits (``service.BodyLimit``); this bounds what comes before the app sees a request. Imported only by
serve (it needs uvicorn, part of the serve extra).
"""
from __future__ import annotations

import json
import logging

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..config import option_text
from ..errors import PipelineError

log = logging.getLogger(__name__)

#: What HeaderDeadline overrides or reads in H11Protocol: the methods it hooks and, for each, attributes it
#: expects them (or __init__) to set. Checked at start-up (``protocol``) so that another uvicorn fails loudly
#: instead of serving with no deadline.
HOOKS = {"__init__": ("conn", "loop", "logger"), "connection_made": ("transport",), "connection_lost": (),
         "data_received": (), "on_response_complete": ()}


class HeaderDeadline(H11Protocol):
    """H11Protocol whose request line and headers must be complete within ``header_seconds`` of the connection
    (for a kept-alive connection's next request: of its first byte; the wait before that byte is uvicorn's
    keep-alive timeout). Past it: 408 in one line if part of a request came, then the connection is closed."""

    header_seconds: float = 10.0

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.header_timer = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.arm()  # nothing received yet: the request line itself is on the clock

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self.keep_time()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # may start the next cycle on a pipelined request already in
        self.keep_time()

    def connection_lost(self, exc) -> None:
        self.disarm()
        super().connection_lost(exc)

    def awaiting_headers(self) -> bool:
        """h11 has yet to see a whole request line and headers (it leaves IDLE at the Request event)."""
        return self.conn.their_state is h11.IDLE

    def keep_time(self) -> None:
        """Disarm once the headers are complete; arm when the next request's first bytes are in."""
        if not self.awaiting_headers() or self.transport.is_closing():
            self.disarm()
        elif self.header_timer is None and self.conn.trailing_data[0]:
            self.arm()

    def arm(self) -> None:
        self.disarm()
        self.header_timer = self.loop.call_later(self.header_seconds, self.headers_too_slow)

    def disarm(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def headers_too_slow(self) -> None:
        self.header_timer = None
        if self.transport.is_closing() or not self.awaiting_headers():
            return
        if self.conn.trailing_data[0]:  # part of a request came: say why it is closed
            detail = (f"the request line and headers did not all come within {self.header_seconds:g} s "
                      "(--header-seconds)")
            prefix = "%s:%d - " % self.client if self.client else ""
            log.info("%s408: %s", prefix, detail)
            self.send_408(detail)
        self.transport.close()

    def send_408(self, detail: str) -> None:
        body = json.dumps({"detail": detail}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]
        try:
            for event in (h11.Response(status_code=408, headers=headers, reason=b"Request Timeout"),
                          h11.Data(data=body), h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
        except h11.LocalProtocolError:  # h11 would not answer in this state: closing is answer enough
            pass


def protocol(seconds: float) -> type:
    """uvicorn's ``http=`` class for serve: HeaderDeadline with ``seconds``. Always h11, even where httptools is
    installed (uvicorn's "auto" would pick it, and nothing would bound its headers): the clock reads h11's states.
    PipelineError at start-up when this uvicorn's H11Protocol lacks what HeaderDeadline hooks into."""
    for name, attributes in HOOKS.items():
        method = vars(H11Protocol).get(name)
        code = getattr(method, "__code__", None)
        missing = [a for a in attributes if code is not None and a not in code.co_names]
        if code is None or missing:
            what = f"no {name}" if code is None else f"a {name} that sets no {', '.join(missing)}"
            raise PipelineError(f"this uvicorn's H11Protocol has {what}: {option_text('header_seconds')} cannot be "
                                f"kept; it was written for uvicorn 0.55 (this is {uvicorn.__version__})")
    return type("HeaderDeadlineProtocol", (HeaderDeadline,), {"header_seconds": seconds})
