"""What the GCS emulator and the S3 fault proxy share: serving, request log, fault plan.

Both servers listen on 127.0.0.1 only (an ephemeral port), classify every request into
a *kind* (`objects.insert`, `PutObject`, ...), record it, and before answering ask their
`FaultPlan` whether to delay it and whether to fail it. A fault fails the next N matching requests with a status; with
`after_apply=True` the server first carries the request out and then answers with the
error, which is how a response lost on the way back looks to a client (it retries a
write that already happened). A *cut* (`cut_next`) answers the real status and headers but
only the first bytes of the body, then closes the connection: a download broken mid-way.
`skew_clock` moves the server's clock (its `Date` headers) away from this machine's.
"""
from __future__ import annotations

import re
import threading
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

SERVE_POLL_S = 0.05  # how often serve_forever looks for a shutdown request


@dataclass(frozen=True)
class Recorded:
    """One request a test server received, with the status its client saw."""

    method: str  # "GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"
    path: str  # decoded path, e.g. "/storage/v1/b/bkt/o/claims/u1" or "/bkt/claims/u1"
    query: dict[str, str]  # decoded query parameters (the last value of each)
    kind: str  # what the request does: "objects.insert", "PutObject", ...
    bucket: str | None  # the bucket it addresses, if any
    key: str | None  # the object name it addresses, if any
    status: int  # the HTTP status answered (a fault's status when one hit)
    fault: str | None = None  # the fault that answered it ("503", "403 after apply", ...), None if none
    seconds_delayed: float = 0.0  # latency added before it was handled


@dataclass(frozen=True)
class Match:
    """Which requests a fault or a delay applies to; None matches anything."""

    kind: str | None = None  # exact kind, e.g. "objects.insert" or "PutObject"
    method: str | None = None  # exact HTTP method
    path: str | None = None  # regular expression searched in the decoded path
    key: str | None = None  # regular expression searched in the object name

    def matches(self, *, kind: str, method: str, path: str, key: str | None) -> bool:
        if self.kind is not None and self.kind != kind:
            return False
        if self.method is not None and self.method != method:
            return False
        if self.path is not None and not re.search(self.path, path):
            return False
        if self.key is not None and (key is None or not re.search(self.key, key)):
            return False
        return True


@dataclass
class Fault:
    """Fail the next `remaining` matching requests with `status`."""

    match: Match
    status: int
    remaining: int
    after_apply: bool = False  # carry the request out first, then answer the error
    detail: dict[str, Any] = field(default_factory=dict)  # server-specific: reason, code, permission, ...
    hits: int = 0  # how many requests it has failed so far

    @property
    def label(self) -> str:
        if "cut_after" in self.detail:
            return f"cut after {self.detail['cut_after']} bytes"
        return f"{self.status} after apply" if self.after_apply else str(self.status)


@dataclass
class Delay:
    """Add `seconds` before handling matching requests (the next `remaining`, or all if None)."""

    match: Match
    seconds: float
    remaining: int | None = None
    hits: int = 0


class FaultPlan:
    """The faults and delays armed on one server; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._faults: list[Fault] = []
        self._delays: list[Delay] = []

    def add_fault(self, fault: Fault) -> Fault:
        if fault.remaining < 1:
            raise ValueError(f"a fault must fail at least one request, not {fault.remaining}")
        with self._lock:
            self._faults.append(fault)
        return fault

    def add_delay(self, delay: Delay) -> Delay:
        if delay.seconds < 0:
            raise ValueError(f"a delay cannot be negative: {delay.seconds}")
        with self._lock:
            self._delays.append(delay)
        return delay

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()
            self._delays.clear()

    def take(self, *, kind: str, method: str, path: str, key: str | None) -> tuple[Fault | None, float]:
        """The fault this request consumes (the first armed one that matches) and its delay."""
        where = dict(kind=kind, method=method, path=path, key=key)
        with self._lock:
            seconds = 0.0
            for delay in self._delays:
                if (delay.remaining is None or delay.remaining > 0) and delay.match.matches(**where):
                    seconds += delay.seconds
                    delay.hits += 1
                    if delay.remaining is not None:
                        delay.remaining -= 1
            for fault in self._faults:
                if fault.remaining > 0 and fault.match.matches(**where):
                    fault.remaining -= 1
                    fault.hits += 1
                    return fault, seconds
            return None, seconds


class RequestLog:
    """Every request one server answered, in order; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: list[Recorded] = []

    def append(self, record: Recorded) -> None:
        with self._lock:
            self._records.append(record)

    def clear(self) -> None:
        with self._lock:
            self._records.clear()

    def all(self) -> list[Recorded]:
        with self._lock:
            return list(self._records)

    def select(self, *, kind: str | None = None, method: str | None = None, path: str | None = None,
               bucket: str | None = None, key: str | None = None) -> list[Recorded]:
        """The records that match every criterion given (`path` and `key` are regexes, searched)."""
        match = Match(kind=kind, method=method, path=path, key=key)
        return [
            r for r in self.all()
            if match.matches(kind=r.kind, method=r.method, path=r.path, key=r.key)
            and (bucket is None or r.bucket == bucket)
        ]

    def counts(self, *, bucket: str | None = None) -> Counter[str]:
        """How many requests of each kind (for one bucket if given)."""
        return Counter(r.kind for r in self.all() if bucket is None or r.bucket == bucket)


class LoopbackServer:
    """A threaded HTTP server on 127.0.0.1 run on its own thread; use as a context manager,
    or start()/shutdown(). Subclasses say which handler class serves it."""

    _thread_name = "loopback-server"

    def __init__(self) -> None:
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        raise NotImplementedError

    @property
    def endpoint(self) -> str:
        assert self._server is not None, "start() the server first"
        return f"http://127.0.0.1:{self._server.server_port}"

    def start(self):  # -> Self
        server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        server.daemon_threads = False  # server_close() joins every handler thread
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": SERVE_POLL_S},
                                        name=self._thread_name)
        self._thread.start()
        return self

    def shutdown(self) -> None:
        """Stop serving and join the serving thread and every handler thread."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            assert self._thread is not None
            self._thread.join()
            self._server = None

    def __enter__(self):  # -> Self
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


class BodyCut(ConnectionError):
    """The client went away before the whole body came (a real store keeps nothing of it)."""


def read_body(handler: BaseHTTPRequestHandler) -> bytes:
    """The request body, by Content-Length or chunked transfer encoding; BodyCut if the client
    closed the connection before all of it (a killed uploader), never a shorter body."""
    if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
        chunks = []
        while True:
            line = handler.rfile.readline()
            if not line.endswith(b"\n"):
                raise BodyCut("the connection closed inside a chunked body")
            size = int(line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while True:  # trailers, up to the blank line that ends the body
                    trailer = handler.rfile.readline()
                    if trailer in (b"\r\n", b"\n"):
                        return b"".join(chunks)
                    if not trailer:
                        raise BodyCut("the connection closed inside a chunked body's trailers")
            chunk = handler.rfile.read(size)
            if len(chunk) != size or not handler.rfile.readline().endswith(b"\n"):
                raise BodyCut("the connection closed inside a chunk")
            chunks.append(chunk)
    length = int(handler.headers.get("Content-Length") or 0)
    body = handler.rfile.read(length) if length else b""
    if len(body) != length:
        raise BodyCut(f"the connection closed after {len(body)} of {length} body bytes")
    return body


def send_and_hang_up(endpoint: str, request: bytes) -> None:
    """Send `request` raw to the server at `endpoint` and close our side, as a killed client
    does mid-request; read what it answers until it closes."""
    import socket
    from urllib.parse import urlsplit

    where = urlsplit(endpoint)
    with socket.create_connection((where.hostname, where.port), timeout=10) as s:
        s.sendall(request)
        s.shutdown(socket.SHUT_WR)
        s.settimeout(10)
        while s.recv(4096):
            pass
