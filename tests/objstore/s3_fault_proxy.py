"""An HTTP proxy in front of a local moto S3 server: a request log, S3 faults, atomic writes.

Clients (the real boto3) talk to the proxy on 127.0.0.1; it forwards every request
unchanged to moto, which must also listen on 127.0.0.1, and sends moto's answer back.
Each request is classified into its S3 operation (`PutObject`, `CompleteMultipartUpload`,
`ListObjectsV2`, ...), recorded, and checked against armed faults, which answer with real
S3 error XML: 503 SlowDown, 500 InternalError, 403 AccessDenied naming the IAM action
that was missing, 409 ConditionalRequestConflict, or any status and code given. With
`after_apply=True` moto carries the request out first and the client gets the error
anyway: a response lost on the way back. `cut_next` sends moto's answer but cuts its body
short and closes the connection; `skew_clock` shifts the `Date` the proxy answers with
(moto's own Date is replaced by the proxy's, so there is one clock).

moto checks `If-None-Match`/`If-Match` and then writes without a lock (moto says it is not
concurrency-safe), so two racing conditional writes could both pass the check; and a listing
iterates the bucket's keys unlocked, so one that meets a concurrent delete fails with a
KeyError (HTTP 500 InternalError; seen with 8 runners on one bucket). S3 itself decides
writes atomically and lists consistently, so by default the proxy forwards one mutating
request (PUT, POST, DELETE) or listing at a time; `serialize_writes=False` shows moto as it is.

    with S3FaultProxy(upstream="http://127.0.0.1:5000") as proxy:
        s3 = boto3.client("s3", endpoint_url=proxy.endpoint, ...)
        proxy.fail_next(2, status=503, operation="PutObject")
"""
from __future__ import annotations

import http.client
import threading
import time
import uuid
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit
from xml.sax.saxutils import escape

from .loopback import BodyCut, Delay, Fault, FaultPlan, LoopbackServer, Match, Recorded, RequestLog, read_body

UPSTREAM_TIMEOUT_S = 60.0  # the longest one forwarded request may take at moto
DEFAULT_PRINCIPAL = "arn:aws:iam::123456789012:user/spotfan-worker"
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
                         "transfer-encoding", "upgrade", "expect", "content-length"})
_REPLACED = frozenset({"date", "server"})  # the proxy's send_response sets its own
_WRITES = frozenset({"PUT", "POST", "DELETE"})
_LISTINGS = frozenset({"ListObjectsV2", "ListObjects", "ListMultipartUploads"})  # iterate a bucket's keys
_DEFAULT_ERRORS = {
    500: ("InternalError", "We encountered an internal error. Please try again."),
    503: ("SlowDown", "Please reduce your request rate."),
    409: ("ConditionalRequestConflict",
          "A conflicting conditional operation is currently in progress against this resource. Please try again."),
    412: ("PreconditionFailed", "At least one of the pre-conditions you specified did not hold"),
}
# The IAM action each operation needs, for the message of an injected AccessDenied.
_ACTIONS = {
    "PutObject": "PutObject", "CopyObject": "PutObject", "CreateMultipartUpload": "PutObject",
    "UploadPart": "PutObject", "UploadPartCopy": "PutObject", "CompleteMultipartUpload": "PutObject",
    "GetObject": "GetObject", "HeadObject": "GetObject", "ListObjectsV2": "ListBucket", "ListObjects": "ListBucket",
    "HeadBucket": "ListBucket", "DeleteObject": "DeleteObject", "DeleteObjects": "DeleteObject",
    "AbortMultipartUpload": "AbortMultipartUpload", "CreateBucket": "CreateBucket", "DeleteBucket": "DeleteBucket",
    "ListBuckets": "ListAllMyBuckets", "ListMultipartUploads": "ListBucketMultipartUploads",
}


def s3_operation(method: str, path: str, query: Mapping[str, str], headers: Mapping[str, str]) -> tuple[str, str | None, str | None]:
    """(operation, bucket, key) of a path-style S3 request; the operation is "Other<METHOD>"
    for anything this table does not name."""
    bucket, _, key = path.lstrip("/").partition("/")
    if not bucket:
        return ("ListBuckets" if method == "GET" else f"Other{method}"), None, None
    if not key:
        if method == "GET":
            if "uploads" in query:
                return "ListMultipartUploads", bucket, None
            other = sorted(set(query) - {"list-type", "prefix", "delimiter", "max-keys", "continuation-token",
                                         "start-after", "encoding-type", "fetch-owner", "marker"})
            if other:
                return f"OtherGET?{other[0]}", bucket, None
            return ("ListObjectsV2" if query.get("list-type") == "2" else "ListObjects"), bucket, None
        if method == "POST" and "delete" in query:
            return "DeleteObjects", bucket, None
        operation = {"PUT": "CreateBucket", "HEAD": "HeadBucket", "DELETE": "DeleteBucket"}.get(method)
        if operation and not query:
            return operation, bucket, None
        return f"Other{method}", bucket, None
    if method == "PUT":
        copy = "x-amz-copy-source" in headers
        if "uploadId" in query and "partNumber" in query:
            return ("UploadPartCopy" if copy else "UploadPart"), bucket, key
        if not query:
            return ("CopyObject" if copy else "PutObject"), bucket, key
    if method == "POST" and "uploads" in query:
        return "CreateMultipartUpload", bucket, key
    if method == "POST" and "uploadId" in query:
        return "CompleteMultipartUpload", bucket, key
    if method == "DELETE":
        return ("AbortMultipartUpload" if "uploadId" in query else "DeleteObject"), bucket, key
    if method in ("GET", "HEAD") and not set(query) - {"versionId", "partNumber", "response-content-type"}:
        return ("GetObject" if method == "GET" else "HeadObject"), bucket, key
    return f"Other{method}", bucket, key


class S3FaultProxy(LoopbackServer):
    """The proxy server plus its faults and log. Use as a context manager, or start()/shutdown()."""

    _thread_name = "s3-fault-proxy"

    def __init__(self, *, upstream: str, serialize_writes: bool = True, principal: str = DEFAULT_PRINCIPAL) -> None:
        """`upstream`: moto's URL, which must be http://127.0.0.1:PORT. `principal`: who an
        injected AccessDenied says was refused."""
        url = urlsplit(upstream)
        if url.scheme != "http" or url.hostname != "127.0.0.1" or url.port is None:
            raise ValueError(f"the proxy forwards only to http://127.0.0.1:PORT, not {upstream!r}")
        self.upstream = (url.hostname, url.port)
        self.serialize_writes = serialize_writes
        self.principal = principal
        self.requests = RequestLog()
        self.faults = FaultPlan()
        self._write_lock = threading.Lock()
        self.clock_offset_s = 0.0  # added to this machine's clock in every Date answered
        super().__init__()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        return _handler_for(self)

    # --- faults ------------------------------------------------------------------------

    def fail_next(self, count: int = 1, *, status: int = 503, code: str | None = None, message: str | None = None,
                  operation: str | None = None, method: str | None = None, path: str | None = None,
                  key: str | None = None, after_apply: bool = False) -> Fault:
        """Fail the next `count` requests that match (S3 operation, method, path regex, key
        regex) with `status` and S3's error XML. `code`/`message` default to S3's for 500,
        503, 409 and 412; a 403 is AccessDenied naming the IAM action the operation needs."""
        if code is None and status not in _DEFAULT_ERRORS and status != 403:
            raise ValueError(f"give the S3 error code for status {status} (e.g. code='NoSuchKey')")
        return self.faults.add_fault(Fault(Match(kind=operation, method=method, path=path, key=key), status, count,
                                           after_apply=after_apply, detail={"code": code, "message": message}))

    def add_latency(self, seconds: float, *, operation: str | None = None, method: str | None = None,
                    path: str | None = None, key: str | None = None, count: int | None = None) -> Delay:
        """Wait `seconds` before forwarding matching requests (the next `count`, or all)."""
        return self.faults.add_delay(Delay(Match(kind=operation, method=method, path=path, key=key), seconds, count))

    def cut_next(self, count: int = 1, *, after_bytes: int, operation: str | None = None, method: str | None = None,
                 path: str | None = None, key: str | None = None) -> Fault:
        """Forward the next `count` matching requests, answer moto's status and headers (the
        whole body's Content-Length) but only the first `after_bytes` bytes of the body,
        then close the connection: a download cut off mid-way."""
        if after_bytes < 0:
            raise ValueError(f"after_bytes cannot be negative: {after_bytes}")
        return self.faults.add_fault(Fault(Match(kind=operation, method=method, path=path, key=key), 0, count,
                                           after_apply=True, detail={"cut_after": after_bytes}))

    def skew_clock(self, seconds: float) -> None:
        """Answer with `Date` headers `seconds` away from this machine's clock (until clear_faults)."""
        self.clock_offset_s = seconds

    def clear_faults(self) -> None:
        self.faults.clear()
        self.clock_offset_s = 0.0

    # --- forwarding --------------------------------------------------------------------

    def handle(self, method: str, raw_path: str, headers: Mapping[str, str],
               body: bytes) -> tuple[int, list[tuple[str, str]], bytes, int | None]:
        """Answer one request: (status, headers, body, how many body bytes to send before
        closing the connection: None for all)."""
        url = urlsplit(raw_path)
        path = unquote(url.path)
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        lower = {k.lower(): v for k, v in headers.items()}
        operation, bucket, key = s3_operation(method, path, query, lower)
        fault, delay_s = self.faults.take(kind=operation, method=method, path=path, key=key)
        if delay_s:
            time.sleep(delay_s)
        if fault is None or fault.after_apply:
            if self.serialize_writes and (method in _WRITES or operation in _LISTINGS):
                with self._write_lock:
                    answer = self._forward(method, raw_path, headers, body)
            else:
                answer = self._forward(method, raw_path, headers, body)
        cut_after = fault.detail.get("cut_after") if fault is not None else None
        if fault is not None and cut_after is None:
            answer = self._fault_answer(fault, operation, bucket, key, path)
        self.requests.append(Recorded(method, path, query, operation, bucket, key, answer[0],
                                      fault.label if fault else None, delay_s))
        return (*answer, cut_after)

    def _forward(self, method: str, raw_path: str, headers: Mapping[str, str], body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(*self.upstream, timeout=UPSTREAM_TIMEOUT_S)
        try:
            sent = {k: v for k, v in headers.items() if k.lower() not in _HOP_BY_HOP}
            if body or method in _WRITES:
                sent["Content-Length"] = str(len(body))
            conn.request(method, raw_path, body=body or None, headers=sent)
            response = conn.getresponse()
            data = response.read()
            kept = [(k, v) for k, v in response.getheaders() if k.lower() not in _HOP_BY_HOP | _REPLACED]
            if method == "HEAD":  # a HEAD answer tells the object's length without a body
                kept += [(k, v) for k, v in response.getheaders() if k.lower() == "content-length"]
            return response.status, kept, data
        finally:
            conn.close()

    def _fault_answer(self, fault: Fault, operation: str, bucket: str | None, key: str | None,
                      path: str) -> tuple[int, list[tuple[str, str]], bytes]:
        code, message = fault.detail.get("code"), fault.detail.get("message")
        if fault.status == 403:
            action = _ACTIONS.get(operation, operation)
            resource = f"arn:aws:s3:::{bucket}/{key}" if key else f"arn:aws:s3:::{bucket or '*'}"
            code = code or "AccessDenied"
            message = message or (f"User: {self.principal} is not authorized to perform: s3:{action} on resource: "
                                  f"\"{resource}\" because no identity-based policy allows the s3:{action} action")
        else:
            default_code, default_message = _DEFAULT_ERRORS.get(fault.status, (code, f"injected {code}"))
            code, message = code or default_code, message or default_message
        request_id = uuid.uuid4().hex[:16].upper()
        xml = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{escape(code or "")}</Code>'
               f"<Message>{escape(message or '')}</Message><Resource>{escape(path)}</Resource>"
               f"<RequestId>{request_id}</RequestId><HostId>spotfan-fault-proxy</HostId></Error>")
        return fault.status, [("Content-Type", "application/xml"), ("x-amz-request-id", request_id)], xml.encode()


def _handler_for(proxy: S3FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        # HTTP/1.1 so that `Expect: 100-continue` (botocore sends it for large bodies) is
        # answered at once; every answer closes its connection, so no thread outlives it.
        protocol_version = "HTTP/1.1"

        def _serve(self) -> None:
            try:
                sent = read_body(self)
            except BodyCut:  # an uploader killed mid-body: nothing reaches the store
                self.close_connection = True
                return
            status, headers, body, cut_after = proxy.handle(self.command, self.path, dict(self.headers), sent)
            self.send_response(status)
            for name, value in headers:
                self.send_header(name, value)
            if self.command != "HEAD":
                self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD" and status not in (204, 304):
                self.wfile.write(body if cut_after is None else body[:cut_after])
            self.close_connection = True

        def date_time_string(self, timestamp: float | None = None) -> str:
            return super().date_time_string((time.time() if timestamp is None else timestamp) + proxy.clock_offset_s)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _serve

        def log_message(self, format: str, *args: Any) -> None:
            pass  # the record in `proxy.requests` is the log

    return Handler
