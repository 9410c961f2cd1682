"""What the Cloud Storage JSON API looks like on the wire, for the GCS emulator.

Routes (which API method a request is), query parameters and object fields each method
accepts, the preconditions and how GCS refuses them, error bodies, media (Range) and
multipart upload bodies. Pure functions of a request: the state lives in gcs_emulator.py.
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any
from urllib.parse import unquote

import google_crc32c

COMMON_PARAMS = frozenset({"alt", "projection", "fields", "prettyPrint", "userProject", "quotaUser"})
OBJECT_CONDITIONS = ("ifGenerationMatch", "ifGenerationNotMatch", "ifMetagenerationMatch", "ifMetagenerationNotMatch")
SOURCE_CONDITIONS = ("ifSourceGenerationMatch", "ifSourceGenerationNotMatch",
                     "ifSourceMetagenerationMatch", "ifSourceMetagenerationNotMatch")
PARAMS: dict[str, frozenset[str]] = {
    "buckets.get": frozenset(),
    "buckets.insert": frozenset({"project"}),
    "buckets.delete": frozenset(),
    "objects.list": frozenset({"prefix", "delimiter", "pageToken", "maxResults", "startOffset", "endOffset",
                               "includeTrailingDelimiter", "versions"}),
    "objects.get": frozenset({*OBJECT_CONDITIONS, "generation"}),
    "objects.download": frozenset({*OBJECT_CONDITIONS, "generation"}),
    "objects.insert": frozenset({*OBJECT_CONDITIONS, "uploadType", "name"}),
    "objects.insert.chunk": frozenset({"uploadType", "upload_id", "name"}),
    "objects.patch": frozenset({*OBJECT_CONDITIONS, "generation"}),
    "objects.update": frozenset({*OBJECT_CONDITIONS, "generation"}),
    "objects.delete": frozenset({*OBJECT_CONDITIONS, "generation"}),
    "objects.rewrite": frozenset({*OBJECT_CONDITIONS, *SOURCE_CONDITIONS, "sourceGeneration", "rewriteToken",
                                  "maxBytesRewrittenPerCall"}),
    "objects.copy": frozenset({*OBJECT_CONDITIONS, *SOURCE_CONDITIONS, "sourceGeneration"}),
}
PERMISSION = {
    "buckets.get": "storage.buckets.get",
    "buckets.insert": "storage.buckets.create",
    "buckets.delete": "storage.buckets.delete",
    "objects.list": "storage.objects.list",
    "objects.get": "storage.objects.get",
    "objects.download": "storage.objects.get",
    "objects.insert": "storage.objects.create",
    "objects.insert.chunk": "storage.objects.create",
    "objects.patch": "storage.objects.update",
    "objects.update": "storage.objects.update",
    "objects.delete": "storage.objects.delete",
    "objects.rewrite": "storage.objects.create",
    "objects.copy": "storage.objects.create",
}
# Object fields a client may write; everything GCS computes is accepted and ignored.
WRITABLE = frozenset({"contentType", "metadata", "cacheControl", "contentDisposition", "contentLanguage", "customTime"})
COMPUTED = frozenset({"kind", "id", "selfLink", "mediaLink", "name", "bucket", "generation", "metageneration",
                      "size", "md5Hash", "crc32c", "etag", "timeCreated", "updated", "timeStorageClassUpdated",
                      "storageClass", "componentCount"})
REASONS = {400: "invalid", 401: "required", 403: "forbidden", 404: "notFound", 408: "requestTimeout",
           409: "conflict", 412: "conditionNotMet", 416: "requestedRangeNotSatisfiable",
           429: "rateLimitExceeded", 500: "backendError", 502: "backendError", 503: "backendError",
           504: "backendError"}
PRECONDITION_MESSAGE = "At least one of the pre-conditions you specified did not hold."
BACKEND_MESSAGE = "We encountered an internal error. Please try again."


@dataclass(frozen=True)
class StoredObject:
    """One live object, as a test may inspect it."""

    bucket: str
    name: str
    data: bytes
    generation: int  # a microsecond clock value, larger for every write
    metageneration: int  # 1 for a new generation, + 1 per metadata update
    content_type: str
    metadata: Mapping[str, str]  # the custom metadata (`metadata` field)
    properties: Mapping[str, str]  # cacheControl, contentDisposition, contentLanguage, customTime when set
    created: str  # RFC 3339
    updated: str

    @property
    def md5_hash(self) -> str:
        return md5_hash(self.data)

    @property
    def crc32c(self) -> str:
        return crc32c(self.data)

    @property
    def etag(self) -> str:
        return base64.b64encode(f"{self.generation}/{self.metageneration}".encode()).decode()


@dataclass(frozen=True)
class Reply:
    """What the emulator answers to one request."""

    status: int
    body: bytes = b""
    headers: Mapping[str, str] = field(default_factory=dict)
    cut_after: int | None = None  # send only this many bytes of the body, then close (a fault)

    @classmethod
    def json(cls, status: int, payload: Any, headers: Mapping[str, str] | None = None) -> "Reply":
        return cls(status, json.dumps(payload).encode(), {"Content-Type": "application/json; charset=UTF-8", **(headers or {})})


@dataclass(frozen=True)
class Route:
    """Which API method a request is and what it names."""

    kind: str  # "objects.insert", ... (the table in gcs_emulator.py)
    bucket: str | None = None
    key: str | None = None  # the object name
    target_bucket: str | None = None  # rewrite/copy destination
    target_key: str | None = None


def route(method: str, raw_path: str, query: dict[str, str]) -> Route | Reply:
    """What a request is, from its method and its still-encoded path (object names keep %2F)."""
    parts = [unquote(p) for p in raw_path.split("/")[1:]]
    head, rest = parts[:3], parts[3:]
    if head == ["upload", "storage", "v1"] and len(rest) == 3 and rest[0] == "b" and rest[2] == "o":
        if method == "POST" and "upload_id" not in query:
            return Route("objects.insert", rest[1])
        if method == "PUT" and "upload_id" in query:
            return Route("objects.insert.chunk", rest[1])
    if head == ["download", "storage", "v1"] and len(rest) == 4 and rest[0] == "b" and rest[2] == "o" and method == "GET":
        return Route("objects.download", rest[1], rest[3])
    if head[:2] == ["storage", "v1"] and parts[2:3] == ["b"]:
        rest = parts[3:]
        if not rest:
            return Route("buckets.insert") if method == "POST" else error(404, f"emulator: no {method} on /storage/v1/b")
        bucket = rest[0]
        if len(rest) == 1:
            kind = {"GET": "buckets.get", "DELETE": "buckets.delete"}.get(method)
            return Route(kind, bucket) if kind else error(501, f"emulator: {method} on a bucket is not emulated")
        if rest[1] == "o" and len(rest) == 2 and method == "GET":
            return Route("objects.list", bucket)
        if rest[1] == "o" and len(rest) == 3:
            kind = {"GET": "objects.download" if query.get("alt") == "media" else "objects.get",
                    "PATCH": "objects.patch", "PUT": "objects.update", "DELETE": "objects.delete"}.get(method)
            if kind:
                return Route(kind, bucket, rest[2])
        if (rest[1] == "o" and len(rest) == 8 and rest[3] in ("rewriteTo", "copyTo") and rest[4] == "b"
                and rest[6] == "o" and method == "POST"):
            kind = "objects.rewrite" if rest[3] == "rewriteTo" else "objects.copy"
            return Route(kind, bucket, rest[2], rest[5], rest[7])
        if rest[1] == "o" and len(rest) == 4 and rest[3] == "compose":
            return error(501, "emulator: compose is not emulated")
    return error(404, f"emulator: no such API path {method} {raw_path} (object names must be percent-encoded, "
                       f"'/' as %2F, as google-cloud-storage sends them)")


def parse_conditions(query: dict[str, str]) -> dict[str, int] | Reply:
    """The precondition parameters of a request, as integers."""
    out = {}
    for name in (*OBJECT_CONDITIONS, *SOURCE_CONDITIONS):
        if name in query:
            try:
                out[name] = int(query[name])
            except ValueError:
                return error(400, f"Invalid argument: {name}={query[name]!r} is not an integer")
    return out


def check(obj: StoredObject | None, conditions: dict[str, int], which: str) -> Reply | None:
    """The refusal GCS answers when a precondition does not hold for `obj`, or None.
    `which` is "" for the target conditions, "Source" for the ifSource... ones."""
    generation = conditions.get(f"if{which}GenerationMatch")
    if generation is not None:
        if (generation == 0 and obj is not None) or (generation != 0 and (obj is None or obj.generation != generation)):
            return precondition_failed()
    not_generation = conditions.get(f"if{which}GenerationNotMatch")
    if not_generation is not None:
        if obj is None:
            return precondition_failed()
        if obj.generation == not_generation:
            return Reply(304)
    metageneration = conditions.get(f"if{which}MetagenerationMatch")
    if metageneration is not None and (obj is None or obj.metageneration != metageneration):
        return precondition_failed()
    not_metageneration = conditions.get(f"if{which}MetagenerationNotMatch")
    if not_metageneration is not None:
        if obj is None:
            return precondition_failed()
        if obj.metageneration == not_metageneration:
            return Reply(304)
    return None


def media(obj: StoredObject, range_header: str | None) -> Reply:
    size = len(obj.data)
    headers = {
        "Content-Type": obj.content_type,
        "ETag": obj.etag,
        "Accept-Ranges": "bytes",
        "x-goog-generation": str(obj.generation),
        "x-goog-metageneration": str(obj.metageneration),
        "x-goog-hash": f"crc32c={obj.crc32c},md5={obj.md5_hash}",
        "x-goog-stored-content-length": str(size),
        "x-goog-stored-content-encoding": "identity",
    }
    if not range_header:
        return Reply(200, obj.data, headers)
    m = re.fullmatch(r"bytes=(\d*)-(\d*)", range_header.strip())
    if m is None or m.groups() == ("", ""):
        return Reply(200, obj.data, headers)  # an unparsable Range is ignored (RFC 9110)
    first, last = m.groups()
    if first == "":
        start, end = max(0, size - int(last)), size - 1
        if int(last) == 0:
            start = size
    else:
        start, end = int(first), min(int(last), size - 1) if last else size - 1
    if start >= size or end < start:
        reply = error(416, "The requested range cannot be satisfied.")
        return Reply(416, reply.body, {**reply.headers, "Content-Range": f"bytes */{size}"})
    return Reply(206, obj.data[start:end + 1], {**headers, "Content-Range": f"bytes {start}-{end}/{size}"})


def multipart(content_type: str, body: bytes) -> tuple[dict[str, Any], str, bytes] | Reply:
    """(object fields, media content type, data) of a multipart/related upload body."""
    m = re.search(r'boundary="?([^";]+)"?', content_type)
    if not content_type.startswith("multipart/related") or m is None:
        return error(400, f"emulator: a multipart upload needs Content-Type multipart/related with a boundary, not {content_type!r}")
    parts = body.split(b"--" + m.group(1).encode())
    if len(parts) < 4 or not parts[-1].startswith(b"--"):
        return error(400, "emulator: a multipart upload body needs a metadata part and a media part")
    sections = []
    for part in parts[1:3]:
        part_headers, _, content = part.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        sections.append((part_headers.decode("latin-1").lower(), content.removesuffix(b"\r\n")))
    fields = json_body(sections[0][1])
    if isinstance(fields, Reply):
        return fields
    media_type = re.search(r"content-type:\s*([^\r\n]+)", sections[1][0])
    return fields, media_type.group(1).strip() if media_type else "application/octet-stream", sections[1][1]


def json_body(body: bytes) -> dict[str, Any] | Reply:
    if not body.strip():
        return {}
    try:
        value = json.loads(body)
    except ValueError as e:
        return error(400, f"Parse Error: the request body is not JSON ({e})")
    if not isinstance(value, dict):
        return error(400, "Parse Error: the request body must be a JSON object")
    return value


def fields_error(fields: Mapping[str, Any]) -> Reply | None:
    unknown = sorted(set(fields) - WRITABLE - COMPUTED)
    if unknown:
        return error(400, f"emulator: the object field(s) {', '.join(unknown)} are not emulated")
    metadata = fields.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        return error(400, "Invalid value for metadata: it must be an object of strings")
    return None


def object_name_error(name: str) -> Reply | None:
    if not name:
        return error(400, "Required: the object name (metadata 'name' or query parameter 'name')", "required")
    if len(name.encode()) > 1024 or name in (".", "..") or "\r" in name or "\n" in name or name.startswith(".well-known/acme-challenge/"):
        return error(400, f"The specified object name is not valid: {name!r}")
    return None


def successor(prefix: str) -> str:
    """The smallest string greater than every string that starts with `prefix`."""
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


def md5_hash(data: bytes) -> str:
    """GCS's md5Hash: the base64 of the MD5 digest."""
    return base64.b64encode(hashlib.md5(data).digest()).decode()


def crc32c(data: bytes) -> str:
    """GCS's crc32c: the base64 of the big-endian CRC32C."""
    return base64.b64encode(google_crc32c.value(data).to_bytes(4, "big")).decode()


def now(offset_s: float = 0.0) -> str:
    """RFC 3339 UTC time with milliseconds, `offset_s` away from this machine's clock."""
    return datetime.fromtimestamp(time.time() + offset_s, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def error(code: int, message: str, reason: str | None = None, *, domain: str = "global") -> Reply:
    """GCS's JSON error body."""
    error: dict[str, Any] = {"message": message, "domain": domain, "reason": reason or REASONS.get(code, "backendError")}
    return Reply.json(code, {"error": {"code": code, "message": message, "errors": [error]}})


def precondition_failed() -> Reply:
    detail = {"message": PRECONDITION_MESSAGE, "domain": "global", "reason": "conditionNotMet",
              "locationType": "header", "location": "If-Match"}
    return Reply.json(412, {"error": {"code": 412, "message": PRECONDITION_MESSAGE, "errors": [detail]}})


def no_bucket() -> Reply:
    return error(404, "The specified bucket does not exist.")


