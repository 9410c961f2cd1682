"""A local HTTP emulator of the Cloud Storage JSON API subset spotfan uses, for tests.

It serves 127.0.0.1 (an ephemeral port) to the real google-cloud-storage client pointed at
it with `STORAGE_EMULATOR_HOST=http://127.0.0.1:PORT` (the client then uses anonymous
credentials by itself). Every write is atomic under one lock, so generation
preconditions hold exactly as on GCS, including between racing threads.

Served (kind: what it is; the permission it needs):
  buckets.get / buckets.insert / buckets.delete   storage.buckets.get / .create / .delete
  objects.insert        uploadType=media, multipart, resumable start   storage.objects.create
  objects.insert.chunk  PUT to a resumable session, Content-Range,
                        308 + Range until the last byte, status query `bytes */*`
  objects.get           metadata                                      storage.objects.get
  objects.download      alt=media on /storage/v1 or /download/storage/v1, Range -> 206
  objects.list          prefix, delimiter, startOffset, endOffset, includeTrailingDelimiter,
                        pageToken, maxResults (at most 1,000 entries, items and prefixes
                        together, per page, as GCS)                  storage.objects.list
  objects.patch / objects.update  metadata, metageneration + 1      storage.objects.update
  objects.delete                                                     storage.objects.delete
  objects.rewrite / objects.copy  rewriteTo / copyTo, done in one call  storage.objects.create
Overwriting a live object needs storage.objects.delete as well, as on GCS.

Preconditions, on every call above that names an object: `ifGenerationMatch` (0: only if
no live object), `ifGenerationNotMatch`, `ifMetagenerationMatch`,
`ifMetagenerationNotMatch`, and the `ifSource...` family on rewrite/copy. A failed
`...Match` answers 412 with GCS's `conditionNotMet` body; a `...NotMatch` that matches
answers 304 (GCS's documented answer); a `...NotMatch` or metageneration condition with no
live object fails with 412. A resumable upload checks its conditions when it starts and
again when its last byte arrives. Generations are microsecond clock values that grow with
every write; a new generation starts at metageneration 1.

Not emulated, and refused with a 400/404/501 that says so rather than ignored: object
versioning (`versions=true`, old generations), compose, ACLs and IAM policies (only the
`deny` switch below), customer-supplied or KMS keys, gzip transcoding (contentEncoding),
matchGlob, soft delete, the XML API, JSON batch requests, notifications, unknown query
parameters and unknown object fields. Object names must be percent-encoded in paths, as
the client does.

The wire formats (routes, accepted parameters and fields, precondition checks, error
bodies, Range and multipart bodies) are in gcs_wire.py; the state and handlers are here.

Every request is recorded (`requests`: kind, bucket, object, status) and faults can be
injected: `fail_next` (503, 429, 403 naming the missing permission, 500, ... optionally after
the write happened), `add_latency`, `deny` (permissions the caller lacks until
`clear_faults`), `cut_next` (a body cut short, then the connection closed) and
`skew_clock` (the emulator's clock, in `Date` headers and object times, moved away from
this machine's).

    with GcsEmulator() as emu:
        emu.create_bucket("bkt")
        env = {**os.environ, **emu.env}  # for a child process using google-cloud-storage
"""
from __future__ import annotations

import base64
import itertools
import json
import re
import threading
import time
import uuid
from bisect import bisect_left, insort
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

from . import gcs_wire as wire
from .gcs_wire import Reply, StoredObject
from .loopback import BodyCut, Delay, Fault, FaultPlan, LoopbackServer, Match, Recorded, RequestLog, read_body

LIST_PAGE_MAX = 1000  # GCS answers at most this many entries per list page
DEFAULT_PROJECT = "spotfan-test"
DEFAULT_PRINCIPAL = "spotfan-worker@spotfan-test.iam.gserviceaccount.com"


@dataclass
class _Bucket:
    name: str
    created: str
    objects: dict[str, StoredObject] = field(default_factory=dict)
    names: list[str] = field(default_factory=list)  # sorted, for listing


@dataclass
class _Session:
    """One resumable upload under way."""

    bucket: str
    name: str
    content_type: str
    fields: dict[str, Any]  # the object fields it was started with
    conditions: dict[str, int]  # the preconditions it was started with
    total: int | None  # X-Upload-Content-Length, or learned from a Content-Range
    data: bytearray = field(default_factory=bytearray)
    final: "Reply | None" = None  # the answer it finished with, given again to every later PUT


class GcsEmulator(LoopbackServer):
    """The HTTP server plus its state. Use as a context manager, or start()/shutdown()."""

    _thread_name = "gcs-emulator"

    def __init__(self, *, project: str = DEFAULT_PROJECT, principal: str = DEFAULT_PRINCIPAL) -> None:
        """`project`: what a child's GOOGLE_CLOUD_PROJECT is set to; `principal`: who a 403
        says lacks the permission (the caller's service account)."""
        self.project = project
        self.principal = principal
        self.requests = RequestLog()
        self.faults = FaultPlan()
        self._denied: set[str] = set()
        self._lock = threading.RLock()
        self._buckets: dict[str, _Bucket] = {}
        self._sessions: dict[str, _Session] = {}
        self._last_generation = 0
        self._bucket_ids = itertools.count(1)
        self.clock_offset_s = 0.0  # the emulator's clock minus this machine's
        super().__init__()

    # --- serving ------------------------------------------------------------------------

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        return _handler_for(self)

    @property
    def env(self) -> dict[str, str]:
        """What a process needs to reach this emulator with google-cloud-storage, and nothing
        else: the endpoint, a project, and no probe of a GCE metadata server."""
        return {"STORAGE_EMULATOR_HOST": self.endpoint, "GOOGLE_CLOUD_PROJECT": self.project, "NO_GCE_CHECK": "True"}

    # --- state, for tests ---------------------------------------------------------------

    def create_bucket(self, name: str | None = None) -> str:
        """Create a bucket without a request (a unique name if none given); return its name."""
        with self._lock:
            name = name or f"spotfan-test-{next(self._bucket_ids)}"
            if name not in self._buckets:
                self._buckets[name] = _Bucket(name=name, created=self._now())
            return name

    def put(self, bucket: str, name: str, data: bytes, *, content_type: str = "application/octet-stream",
            metadata: Mapping[str, str] | None = None) -> StoredObject:
        """Write an object without a request (seeding a test); a new generation, as an upload."""
        with self._lock:
            return self._store(self._buckets[bucket], name, bytes(data), content_type,
                               {"metadata": dict(metadata or {})})

    def get(self, bucket: str, name: str) -> StoredObject | None:
        with self._lock:
            return self._buckets[bucket].objects.get(name)

    def names(self, bucket: str, prefix: str = "") -> list[str]:
        with self._lock:
            return [n for n in self._buckets[bucket].names if n.startswith(prefix)]

    # --- faults ------------------------------------------------------------------------

    def fail_next(self, count: int = 1, *, status: int, kind: str | None = None, method: str | None = None,
                  path: str | None = None, key: str | None = None, after_apply: bool = False,
                  reason: str | None = None, permission: str | None = None) -> Fault:
        """Fail the next `count` requests that match (kind, method, path regex, object-name
        regex) with `status` and GCS's error body for it. A 403 names `permission` (by
        default the one the request needs). `after_apply`: carry the request out first."""
        detail = {"reason": reason, "permission": permission}
        return self.faults.add_fault(Fault(Match(kind=kind, method=method, path=path, key=key), status, count,
                                           after_apply=after_apply, detail=detail))

    def add_latency(self, seconds: float, *, kind: str | None = None, method: str | None = None,
                    path: str | None = None, key: str | None = None, count: int | None = None) -> Delay:
        """Wait `seconds` before handling matching requests (the next `count`, or all)."""
        return self.faults.add_delay(Delay(Match(kind=kind, method=method, path=path, key=key), seconds, count))

    def deny(self, *permissions: str) -> None:
        """The caller lacks these IAM permissions (e.g. "storage.objects.delete") from now on."""
        with self._lock:
            self._denied.update(permissions)

    def cut_next(self, count: int = 1, *, after_bytes: int, kind: str | None = None, method: str | None = None,
                 path: str | None = None, key: str | None = None) -> Fault:
        """Carry out the next `count` matching requests and answer their status and headers
        (the whole body's Content-Length) but only the first `after_bytes` bytes of the
        body, then close the connection: a download cut off mid-way."""
        if after_bytes < 0:
            raise ValueError(f"after_bytes cannot be negative: {after_bytes}")
        return self.faults.add_fault(Fault(Match(kind=kind, method=method, path=path, key=key), 0, count,
                                           after_apply=True, detail={"cut_after": after_bytes}))

    def skew_clock(self, seconds: float) -> None:
        """Run the emulator's clock `seconds` away from this machine's (Date headers, object
        `updated`/`timeCreated`) until clear_faults."""
        self.clock_offset_s = seconds

    def clear_faults(self) -> None:
        """Disarm every fault and delay, grant every permission again, set the clock right."""
        self.faults.clear()
        self.clock_offset_s = 0.0
        with self._lock:
            self._denied.clear()

    def _now(self) -> str:
        return wire.now(self.clock_offset_s)

    # --- the API -----------------------------------------------------------------------

    def handle(self, method: str, raw_path: str, headers: Mapping[str, str], body: bytes) -> Reply:
        """Answer one request (called by the HTTP handler, one thread per request)."""
        url = urlsplit(raw_path)
        path = unquote(url.path)
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        headers = {k.lower(): v for k, v in headers.items()}
        route = wire.route(method, url.path, query)
        if isinstance(route, Reply):
            self.requests.append(Recorded(method, path, query, "unknown", None, None, route.status))
            return route
        if route.kind in ("objects.insert", "objects.insert.chunk"):  # the name is in the query, body or session
            route = replace(route, key=self._upload_name(query, headers, body))
        fault, delay_s = self.faults.take(kind=route.kind, method=method, path=path, key=route.key)
        if delay_s:
            time.sleep(delay_s)
        if fault is not None and not fault.after_apply:
            reply = self._fault_reply(fault, route)
        else:
            try:
                reply = self._dispatch(method, route, query, headers, body)
            except Exception as e:  # an emulator bug: the client sees a 500, the test sees why
                reply = wire.error(500, f"emulator: {type(e).__name__}: {e}")
            if fault is not None and "cut_after" in fault.detail:
                reply = replace(reply, cut_after=fault.detail["cut_after"])
            elif fault is not None:
                reply = self._fault_reply(fault, route)
        self.requests.append(Recorded(method, path, query, route.kind, route.bucket, route.key, reply.status,
                                      fault.label if fault else None, delay_s))
        return reply

    def _upload_name(self, query: dict[str, str], headers: dict[str, str], body: bytes) -> str | None:
        if "upload_id" in query:
            with self._lock:
                session = self._sessions.get(query["upload_id"])
            return session.name if session else None
        fields: Any = {}
        if query.get("uploadType") == "multipart":
            parsed = wire.multipart(headers.get("content-type", ""), body)
            fields = parsed[0] if not isinstance(parsed, Reply) else {}
        elif query.get("uploadType") == "resumable":
            fields = wire.json_body(body)
        name = (fields.get("name") if isinstance(fields, dict) else None) or query.get("name")
        return str(name) if name else None

    def _dispatch(self, method: str, route: wire.Route, query: dict[str, str], headers: dict[str, str],
                  body: bytes) -> Reply:
        unknown = sorted(set(query) - wire.COMMON_PARAMS - wire.PARAMS[route.kind])
        if unknown:
            return wire.error(400, f"emulator: {route.kind} does not support the query parameter(s) "
                                   f"{', '.join(unknown)}; add them to tests/objstore/gcs_wire.py if spotfan needs them")
        if any(h.startswith("x-goog-encryption") for h in headers):
            return wire.error(400, "emulator: customer-supplied encryption keys are not emulated")
        if query.get("alt", "json") not in ("json", "media"):
            return wire.error(400, f"emulator: alt={query['alt']} is not supported")
        denied = self._denied_reply(wire.PERMISSION[route.kind])
        if denied is not None:
            return denied
        conditions = wire.parse_conditions(query)
        if isinstance(conditions, Reply):
            return conditions
        kind = route.kind
        if kind.startswith("buckets."):
            return self._bucket_call(kind, route.bucket, body)
        if kind == "objects.list":
            return self._list(route.bucket or "", query)
        if kind in ("objects.get", "objects.download"):
            return self._read(route, query, conditions, headers)
        if kind == "objects.insert":
            return self._insert(route.bucket or "", query, conditions, headers, body)
        if kind == "objects.insert.chunk":
            return self._chunk(query.get("upload_id", ""), headers, body)
        if kind in ("objects.patch", "objects.update"):
            return self._patch(route, query, conditions, body, replace=kind == "objects.update")
        if kind == "objects.delete":
            return self._delete(route, query, conditions)
        return self._rewrite(route, query, conditions, body)

    # --- buckets -----------------------------------------------------------------------

    def _bucket_call(self, kind: str, name: str | None, body: bytes) -> Reply:
        with self._lock:
            if kind == "buckets.insert":
                fields = wire.json_body(body)
                if isinstance(fields, Reply):
                    return fields
                name = str(fields.get("name", ""))
                if not re.fullmatch(r"[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]", name):
                    return wire.error(400, f"Invalid bucket name: '{name}'")
                if name in self._buckets:
                    return wire.error(409, "Your previous request to create the named bucket succeeded and you already own it.")
                self._buckets[name] = _Bucket(name=name, created=self._now())
                return Reply.json(200, self._bucket_json(self._buckets[name]))
            bucket = self._buckets.get(name or "")
            if bucket is None:
                return wire.no_bucket()
            if kind == "buckets.get":
                return Reply.json(200, self._bucket_json(bucket))
            if bucket.objects:
                return wire.error(409, "The bucket you tried to delete is not empty.")
            del self._buckets[bucket.name]
            return Reply(204)

    def _bucket_json(self, bucket: _Bucket) -> dict[str, Any]:
        return {"kind": "storage#bucket", "selfLink": f"{self.endpoint}/storage/v1/b/{bucket.name}",
                "id": bucket.name, "name": bucket.name, "projectNumber": "0", "metageneration": "1",
                "location": "US", "storageClass": "STANDARD", "etag": "CAE=", "timeCreated": bucket.created,
                "updated": bucket.created, "locationType": "multi-region"}

    # --- reads -------------------------------------------------------------------------

    def _live(self, bucket_name: str, name: str, query: dict[str, str]) -> StoredObject | Reply:
        """The live object a read, patch or delete addresses, or its 404."""
        bucket = self._buckets.get(bucket_name)
        if bucket is None:
            return wire.no_bucket()
        obj = bucket.objects.get(name)
        wanted = query.get("generation") or query.get("sourceGeneration")
        if obj is None or (wanted is not None and wanted != str(obj.generation)):
            return wire.error(404, f"No such object: {bucket_name}/{name}")
        return obj

    def _read(self, route: wire.Route, query: dict[str, str], conditions: dict[str, int],
              headers: dict[str, str]) -> Reply:
        with self._lock:
            obj = self._live(route.bucket or "", route.key or "", query)
            if isinstance(obj, Reply):
                return obj
            refused = wire.check(obj, conditions, "")
            if refused is not None:
                return refused
        if route.kind == "objects.get":
            return Reply.json(200, self._object_json(obj))
        return wire.media(obj, headers.get("range"))

    def _list(self, bucket_name: str, query: dict[str, str]) -> Reply:
        if query.get("versions", "false") != "false":
            return wire.error(400, "emulator: object versioning is not emulated (versions=true)")
        try:
            page_size = min(int(query.get("maxResults", LIST_PAGE_MAX)), LIST_PAGE_MAX)
        except ValueError:
            return wire.error(400, f"Invalid value for maxResults: '{query['maxResults']}'")
        if page_size < 1:
            return wire.error(400, f"Invalid value for maxResults: '{query['maxResults']}'")
        prefix, delimiter = query.get("prefix", ""), query.get("delimiter", "")
        trailing = query.get("includeTrailingDelimiter", "false") == "true"
        start = query.get("startOffset", "")
        if "pageToken" in query:
            try:
                start = base64.urlsafe_b64decode(query["pageToken"].encode()).decode()
            except ValueError:
                return wire.error(400, f"Invalid page token: '{query['pageToken']}'")
        end = query.get("endOffset")
        with self._lock:
            bucket = self._buckets.get(bucket_name)
            if bucket is None:
                return wire.no_bucket()
            names = bucket.names
            i = bisect_left(names, max(prefix, start))
            items: list[dict[str, Any]] = []
            prefixes: list[str] = []
            token = None
            while i < len(names) and names[i].startswith(prefix) and (end is None or names[i] < end):
                if len(items) + len(prefixes) == page_size:
                    token = base64.urlsafe_b64encode(names[i].encode()).decode()
                    break
                name = names[i]
                rest = name[len(prefix):]
                if delimiter and delimiter in rest:
                    common = prefix + rest[: rest.index(delimiter) + len(delimiter)]
                    prefixes.append(common)
                    if trailing and name == common:
                        items.append(self._object_json(bucket.objects[name]))
                    i = bisect_left(names, wire.successor(common), i)  # skip everything under it
                    continue
                items.append(self._object_json(bucket.objects[name]))
                i += 1
        out: dict[str, Any] = {"kind": "storage#objects"}
        if prefixes:
            out["prefixes"] = prefixes
        if items:
            out["items"] = items
        if token is not None:
            out["nextPageToken"] = token
        return Reply.json(200, out)

    # --- writes ------------------------------------------------------------------------

    def _insert(self, bucket_name: str, query: dict[str, str], conditions: dict[str, int],
                headers: dict[str, str], body: bytes) -> Reply:
        upload_type = query.get("uploadType", "")
        content_type = headers.get("content-type", "application/octet-stream")
        if upload_type == "media":
            fields: dict[str, Any] = {}
            data = body
        elif upload_type == "multipart":
            parsed = wire.multipart(content_type, body)
            if isinstance(parsed, Reply):
                return parsed
            fields, content_type, data = parsed
        elif upload_type == "resumable":
            parsed_fields = wire.json_body(body)
            if isinstance(parsed_fields, Reply):
                return parsed_fields
            fields = parsed_fields
            content_type = headers.get("x-upload-content-type", "application/octet-stream")
        else:
            return wire.error(400, f"emulator: uploadType={upload_type!r} is not supported (media, multipart, resumable)")
        name = str(fields.get("name") or query.get("name") or "")
        content_type = str(fields.get("contentType") or content_type)
        refused = wire.object_name_error(name) or wire.fields_error(fields)
        if refused is not None:
            return refused
        if upload_type != "resumable":
            return self._commit(bucket_name, name, data, content_type, fields, conditions)
        total = headers.get("x-upload-content-length")
        with self._lock:
            refused = self._precheck(bucket_name, name, conditions)
            if refused is not None:
                return refused
            upload_id = uuid.uuid4().hex
            self._sessions[upload_id] = _Session(bucket_name, name, content_type, fields, conditions,
                                                 int(total) if total else None)
        location = f"{self.endpoint}/upload/storage/v1/b/{quote(bucket_name, safe='')}/o?uploadType=resumable&upload_id={upload_id}"
        return Reply(200, b"", {"Location": location, "Content-Type": "text/plain; charset=utf-8"})

    def _chunk(self, upload_id: str, headers: dict[str, str], body: bytes) -> Reply:
        with self._lock:  # one session's chunks are applied one at a time
            session = self._sessions.get(upload_id)
            if session is None:
                return wire.error(404, f"No such upload session: {upload_id}")
            return self._apply_chunk(session, headers, body)

    def _apply_chunk(self, session: _Session, headers: dict[str, str], body: bytes) -> Reply:
        if session.final is not None:
            return session.final
        m = re.fullmatch(r"bytes (?:(\d+)-(\d+)|\*)/(\d+|\*)", headers.get("content-range", "").strip())
        if m is None:
            return wire.error(400, f"emulator: bad Content-Range {headers.get('content-range')!r}")
        first, last, total = m.groups()
        if total != "*":
            session.total = int(total)
        if first is not None:
            first_i, last_i = int(first), int(last)
            if last_i - first_i + 1 != len(body):
                return wire.error(400, f"Content-Range {first}-{last} does not match the {len(body)} bytes sent")
            if first_i > len(session.data):
                return wire.error(400, f"the chunk starts at byte {first_i} but {len(session.data)} bytes are persisted")
            session.data += body[len(session.data) - first_i:]
        if session.total is not None and len(session.data) >= session.total:
            session.final = self._finish(session, headers.get("x-goog-hash", ""))
            return session.final
        persisted = {"Range": f"bytes=0-{len(session.data) - 1}"} if session.data else {}
        return Reply(308, b"", persisted)

    def _finish(self, session: _Session, goog_hash: str) -> Reply:
        data = bytes(session.data)
        if len(data) != session.total:
            return wire.error(400, f"the upload sent {len(data)} bytes but declared {session.total}")
        sent = dict(part.strip().split("=", 1) for part in goog_hash.split(",") if "=" in part)
        if "crc32c" in sent and sent["crc32c"] != wire.crc32c(data):
            return wire.error(400, f"Provided CRC32C \"{sent['crc32c']}\" doesn't match calculated CRC32C \"{wire.crc32c(data)}\".")
        return self._commit(session.bucket, session.name, data, session.content_type, session.fields, session.conditions)

    def _precheck(self, bucket_name: str, name: str, conditions: dict[str, int]) -> Reply | None:
        """Under the lock: why a write to bucket/name would be refused now, or None."""
        bucket = self._buckets.get(bucket_name)
        if bucket is None:
            return wire.no_bucket()
        live = bucket.objects.get(name)
        if live is not None:
            denied = self._denied_reply("storage.objects.delete")
            if denied is not None:
                return denied
        return wire.check(live, conditions, "")

    def _commit(self, bucket_name: str, name: str, data: bytes, content_type: str, fields: dict[str, Any],
                conditions: dict[str, int]) -> Reply:
        """Check the checksums and preconditions and write a new generation, atomically."""
        for key, computed in (("crc32c", wire.crc32c(data)), ("md5Hash", wire.md5_hash(data))):
            if key in fields and fields[key] != computed:
                label = "CRC32C" if key == "crc32c" else "MD5"
                return wire.error(400, f"Provided {label} \"{fields[key]}\" doesn't match calculated {label} \"{computed}\".")
        with self._lock:
            refused = self._precheck(bucket_name, name, conditions)
            if refused is not None:
                return refused
            obj = self._store(self._buckets[bucket_name], name, data, content_type, fields)
        return Reply.json(200, self._object_json(obj))

    def _store(self, bucket: _Bucket, name: str, data: bytes, content_type: str, fields: Mapping[str, Any]) -> StoredObject:
        self._last_generation = max(self._last_generation + 1, time.time_ns() // 1000)
        now = self._now()
        obj = StoredObject(bucket=bucket.name, name=name, data=data, generation=self._last_generation,
                           metageneration=1, content_type=content_type,
                           metadata={str(k): str(v) for k, v in (fields.get("metadata") or {}).items()},
                           properties={k: str(fields[k]) for k in wire.WRITABLE - {"contentType", "metadata"} if fields.get(k) is not None},
                           created=now, updated=now)
        if name not in bucket.objects:
            insort(bucket.names, name)
        bucket.objects[name] = obj
        return obj

    def _patch(self, route: wire.Route, query: dict[str, str], conditions: dict[str, int], body: bytes, *,
               replace: bool) -> Reply:
        fields = wire.json_body(body)
        if isinstance(fields, Reply):
            return fields
        refused = wire.fields_error(fields)
        if refused is not None:
            return refused
        with self._lock:
            obj = self._live(route.bucket or "", route.key or "", query)
            if isinstance(obj, Reply):
                return obj
            refused = wire.check(obj, conditions, "")
            if refused is not None:
                return refused
            if replace:
                metadata = dict(fields.get("metadata") or {})
                properties = {k: str(fields[k]) for k in wire.WRITABLE - {"contentType", "metadata"} if fields.get(k) is not None}
            else:
                metadata = dict(obj.metadata)
                for k, v in (fields.get("metadata") or {}).items():
                    if v is None:
                        metadata.pop(k, None)
                    else:
                        metadata[k] = str(v)
                properties = dict(obj.properties)
                for k in wire.WRITABLE - {"contentType", "metadata"}:
                    if k in fields:
                        if fields[k] is None:
                            properties.pop(k, None)
                        else:
                            properties[k] = str(fields[k])
            content_type = fields.get("contentType") or (obj.content_type if not replace else "application/octet-stream")
            new = StoredObject(bucket=obj.bucket, name=obj.name, data=obj.data, generation=obj.generation,
                               metageneration=obj.metageneration + 1, content_type=str(content_type),
                               metadata=metadata, properties=properties, created=obj.created, updated=self._now())
            self._buckets[obj.bucket].objects[obj.name] = new
        return Reply.json(200, self._object_json(new))

    def _delete(self, route: wire.Route, query: dict[str, str], conditions: dict[str, int]) -> Reply:
        with self._lock:
            obj = self._live(route.bucket or "", route.key or "", query)
            if isinstance(obj, Reply):
                return obj
            refused = wire.check(obj, conditions, "")
            if refused is not None:
                return refused
            bucket = self._buckets[obj.bucket]
            del bucket.objects[obj.name]
            bucket.names.pop(bisect_left(bucket.names, obj.name))
        return Reply(204)

    def _rewrite(self, route: wire.Route, query: dict[str, str], conditions: dict[str, int], body: bytes) -> Reply:
        fields = wire.json_body(body)
        if isinstance(fields, Reply):
            return fields
        refused = wire.fields_error(fields)
        if refused is not None:
            return refused
        denied = self._denied_reply("storage.objects.get")
        if denied is not None:
            return denied
        with self._lock:
            source = self._live(route.bucket or "", route.key or "", query)
            if isinstance(source, Reply):
                return source
            refused = wire.check(source, conditions, "Source")
            if refused is not None:
                return refused
            if not {"contentType", "metadata"} & set(fields):
                fields = {"metadata": dict(source.metadata), **dict(source.properties)}
                content_type = source.content_type
            else:
                content_type = str(fields.get("contentType") or source.content_type)
            target = {k: v for k, v in conditions.items() if "Source" not in k}
            reply = self._commit(route.target_bucket or "", route.target_key or "", source.data, content_type, fields, target)
        if route.kind == "objects.copy" or reply.status != 200:
            return reply
        resource = json.loads(reply.body)
        size = str(len(source.data))
        return Reply.json(200, {"kind": "storage#rewriteResponse", "totalBytesRewritten": size, "objectSize": size,
                                "done": True, "resource": resource})

    # --- shapes ------------------------------------------------------------------------

    def _object_json(self, obj: StoredObject) -> dict[str, Any]:
        # Links point at this emulator: the client downloads from mediaLink once it has it.
        path = f"b/{quote(obj.bucket, safe='')}/o/{quote(obj.name, safe='')}"
        out: dict[str, Any] = {
            "kind": "storage#object",
            "id": f"{obj.bucket}/{obj.name}/{obj.generation}",
            "selfLink": f"{self.endpoint}/storage/v1/{path}",
            "mediaLink": f"{self.endpoint}/download/storage/v1/{path}?generation={obj.generation}&alt=media",
            "name": obj.name,
            "bucket": obj.bucket,
            "generation": str(obj.generation),
            "metageneration": str(obj.metageneration),
            "contentType": obj.content_type,
            "storageClass": "STANDARD",
            "size": str(len(obj.data)),
            "md5Hash": obj.md5_hash,
            "crc32c": obj.crc32c,
            "etag": obj.etag,
            "timeCreated": obj.created,
            "updated": obj.updated,
            "timeStorageClassUpdated": obj.created,
            **obj.properties,
        }
        if obj.metadata:
            out["metadata"] = dict(obj.metadata)
        return out

    def _denied_reply(self, permission: str) -> Reply | None:
        with self._lock:
            if permission not in self._denied:
                return None
        return self._forbidden(permission)

    def _forbidden(self, permission: str) -> Reply:
        what = "bucket" if permission.startswith("storage.buckets.") or permission == "storage.objects.list" else "object"
        return wire.error(403, f"{self.principal} does not have {permission} access to the Google Cloud Storage {what}. "
                               f"Permission '{permission}' denied on resource (or it may not exist).")

    def _fault_reply(self, fault: Fault, route: wire.Route) -> Reply:
        if fault.status == 403:
            return self._forbidden(fault.detail.get("permission") or wire.PERMISSION[route.kind])
        if fault.status == 429:
            message = (f"The object {route.bucket}/{route.key} exceeded the rate limit for object mutation operations "
                       "(create, update, and delete). Please reduce your request rate.")
            return wire.error(429, message, fault.detail.get("reason") or "rateLimitExceeded", domain="usageLimits")
        if fault.status == 412:
            return wire.precondition_failed()
        message = wire.BACKEND_MESSAGE if fault.status >= 500 else f"emulator fault: HTTP {fault.status}"
        return wire.error(fault.status, message, fault.detail.get("reason"))


def _handler_for(emulator: GcsEmulator) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        # HTTP/1.0: one request per connection, so no handler thread outlives its request.
        protocol_version = "HTTP/1.0"

        def _serve(self) -> None:
            try:
                sent = read_body(self)
            except BodyCut:  # an uploader killed mid-body: nothing is stored
                self.close_connection = True
                return
            reply = emulator.handle(self.command, self.path, dict(self.headers), sent)
            try:
                self.send_response(reply.status)
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(reply.body)))
                self.end_headers()
                if reply.status not in (204, 304):
                    self.wfile.write(reply.body if reply.cut_after is None else reply.body[:reply.cut_after])
            except (BrokenPipeError, ConnectionResetError):  # the client went away (a test killed it): its loss
                self.close_connection = True

        def date_time_string(self, timestamp: float | None = None) -> str:
            return super().date_time_string((time.time() if timestamp is None else timestamp) + emulator.clock_offset_s)

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve

        def log_message(self, format: str, *args: Any) -> None:
            pass  # the record in `emulator.requests` is the log

    return Handler
