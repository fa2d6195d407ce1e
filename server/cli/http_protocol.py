"""uvicorn's httptools connection protocol with what Loom adds at the HTTP layer:

- Read timeouts. uvicorn only times out idle keep-alive connections between requests; a client that opens a
  connection and sends nothing, sends half its headers, or stops in the middle of its body holds the connection (and,
  for a body, an in-flight request) forever. Here the request line and headers must arrive within `read_timeout`
  seconds of the connection opening or of the request's first byte, and a body may pause at most `read_timeout`
  seconds between two reads (nginx's client_body_timeout). Past that the client gets a 408 in OpenAI's error shape
  (`code: "request_timeout"`) and the connection is closed; the route reading the body sees a disconnect. Time the
  server itself stops reading (a paused transport while the app digests a big body, a pipelined request waiting its
  turn) does not count.
- At shutdown, connections whose request is still arriving are answered 503 and closed at once
  (`close_incomplete`), instead of holding the graceful shutdown until uvicorn cancels them with a plain-text 500.
- Malformed HTTP (`Content-Length: abc`, bad header characters, a broken chunk size...) is refused by the parser
  before any ASGI app runs; uvicorn then writes a plain-text 400. Here that 400 has OpenAI's JSON shape
  (`code: "invalid_http_request"`) and is counted like the app's own errors.
"""
from __future__ import annotations

import json
from collections.abc import Callable

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from server.api.errors import error_body

_PHRASES = {400: b"Bad Request", 408: b"Request Timeout", 503: b"Service Unavailable"}


def error_bytes(status: int, message: str, code: str) -> bytes:
    body = json.dumps(error_body(status, message, code=code)).encode()
    head = (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
            % (status, _PHRASES[status], len(body)))
    return head + body


class LoomHttpProtocol(HttpToolsProtocol):
    read_timeout: float = 15.0  # set by `protocol_class`
    on_error: Callable[[int], None] = staticmethod(lambda status: None)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._read_timer = None
        self._phase = "idle"  # "headers": a request line or headers are arriving; "body": its body is

    # -- the read timer --------------------------------------------------------------------------------------------
    def _arm(self) -> None:
        self._disarm()
        self._read_timer = self.loop.call_later(self.read_timeout, self._read_timed_out)

    def _disarm(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _read_timed_out(self) -> None:
        self._read_timer = None
        if self.transport is None or self.transport.is_closing():
            return
        if self.flow.read_paused:  # the server stopped reading, not the client: wait for it
            self._arm()
            return
        what = "headers" if self._phase in ("headers", "idle") else "body"
        self._refuse(408, f"the request {what} did not arrive within the read timeout ({self.read_timeout:g} s)",
                     "request_timeout")

    def _refuse(self, status: int, message: str, code: str) -> None:
        """Answer `status` (unless a response has started) and close the connection."""
        self._disarm()
        cycle = self.cycle
        if cycle is None or cycle.response_complete or not cycle.response_started:
            self.transport.write(error_bytes(status, message, code))
            self.on_error(status)
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True  # the app's receive() returns http.disconnect; its sends are dropped
            cycle.message_event.set()
        self.transport.close()

    @property
    def receiving(self) -> bool:
        """A request (or the first one of this connection) is still arriving from the client."""
        return self._phase != "idle" or self.cycle is None

    def close_incomplete(self) -> bool:
        """At shutdown: answer 503 and close if a request is still arriving; True if it was closed."""
        if self.transport is None or self.transport.is_closing() or not self.receiving:
            return False
        self._refuse(503, "the server is shutting down", "shutting_down")
        return True

    # -- uvicorn hooks -------------------------------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()  # the first request's headers are due within the timeout (uvicorn has no timer here)

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._phase = "headers"
        if self._read_timer is None:
            self._arm()

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self._phase = "body"
        self._arm()

    def on_body(self, body: bytes) -> None:
        super().on_body(body)
        self._arm()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._phase = "idle"
        self._disarm()

    def send_400_response(self, msg: str) -> None:
        self._disarm()
        self.transport.write(error_bytes(400, f"malformed HTTP request: {msg.rstrip('.')}", "invalid_http_request"))
        self.on_error(400)
        self.transport.close()


def protocol_class(read_timeout: float, on_error: Callable[[int], None] | None = None) -> type[LoomHttpProtocol]:
    """The protocol class to give `uvicorn.Config(http=...)`."""
    attrs = {"read_timeout": read_timeout}
    if on_error is not None:
        attrs["on_error"] = staticmethod(on_error)
    return type("LoomHttpProtocol", (LoomHttpProtocol,), attrs)
