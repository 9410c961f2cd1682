"""What spotfan asks of a bucket: a few conditional operations, the same on S3 and GCS.

    operation                   S3 (boto3)                           GCS (google-cloud-storage)
    create   (only if absent)   PutObject If-None-Match: *           ifGenerationMatch=0
    replace  (compare and swap) PutObject If-Match: ETAG             ifGenerationMatch=GEN
    delete   (if unchanged)     DeleteObject If-Match: ETAG          ifGenerationMatch=GEN
    upload   (only if absent)   PutObject, or multipart completed    upload_from_filename,
                                with If-None-Match: *                ifGenerationMatch=0
    list     (1,000 a page)     ListObjectsV2 (+ Delimiter)          objects.list (+ delimiter)
    clock                       the `Date` of a response             `Date` of a response;
                                                                     `updated` of a write

A conditional call that does not happen returns `Refused` (never an exists-then-put: the
store decides, atomically). A `version` is opaque: an S3 ETag (the MD5 of the content, so
two writes of the same bytes have one version: make what you write unique per write), or
a GCS generation. Errors are tasks.errors': NoSuchBucket, StoreAccessError (naming the
IAM permission), StoreUnreachable (after the bounded retries below).
"""
from __future__ import annotations

import base64
import hashlib
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO, Literal, Protocol, runtime_checkable

ATTEMPTS = 5  # tries of one call on a transient failure (5xx, 429, reset, timeout), the first included
RETRY_DEADLINE_S = 60.0  # GCS: no retry starts after this long; S3: ATTEMPTS bounds it
CONNECT_TIMEOUT_S = 10.0  # one connection attempt
READ_TIMEOUT_S = 60.0  # one wait for response bytes
CONFLICT_RETRIES = 3  # S3 409 ConditionalRequestConflict: tries again, then StoreUnreachable
CONFLICT_WAIT_S = 0.2  # first wait after a 409, doubled each time
LIST_PAGE = 1000  # names per list request: the most either store answers
COPY_CHUNK = 1 << 20  # bytes read or written at a time when streaming a file
POOL_CONNECTIONS = 64  # kept-alive connections per client: a runner has ~35 requests in flight


@dataclass(frozen=True)
class ObjectInfo:
    """One object as the store describes it."""

    name: str  # the full object name in the bucket (prefix included)
    size: int  # bytes
    version: str  # S3: the ETag as S3 sends it (quoted); GCS: the generation, in decimal
    updated: datetime  # when this version was written, on the store's clock (aware, UTC)


@dataclass(frozen=True)
class ObjectData:
    """An object read whole."""

    info: ObjectInfo
    data: bytes


@dataclass(frozen=True)
class Prefix:
    """A common prefix of a delimited listing: a "folder" (name ends with "/")."""

    name: str


@dataclass(frozen=True)
class Refused:
    """A conditional write or delete that did not happen."""

    reason: Literal["exists", "changed", "missing"]  # create/upload: exists; replace: changed or missing


@dataclass(frozen=True)
class Retries:
    """How hard a bucket client retries transient failures (the defaults are the constants above)."""

    attempts: int = ATTEMPTS
    deadline_s: float = RETRY_DEADLINE_S
    connect_timeout_s: float = CONNECT_TIMEOUT_S
    read_timeout_s: float = READ_TIMEOUT_S


class ClientHolder:
    """What both adaptors share: a lazily made SDK client, closed once, never pickled (a
    worker process connects again), and `where` for messages."""

    scheme = ""  # "s3" or "gs"
    name: str  # the bucket
    _client: Any = None

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_client": None}

    def where(self, name: str = "") -> str:
        return f"{self.scheme}://{self.name}/{name}"


@runtime_checkable
class Bucket(Protocol):
    """One bucket of one store. Object names are full names (the root's prefix included).
    Constructors do no I/O; a bucket connects on first use, pickles without its
    connection (to worker processes), and supports `with` (closes its connection)."""

    scheme: str  # "s3" or "gs"
    name: str  # the bucket's name

    def check(self) -> None:
        """Refuse a bucket that cannot be used: NoSuchBucket, StoreAccessError, StoreUnreachable."""

    def stat(self, name: str) -> ObjectInfo | None:
        """The object's description, or None if there is none (on S3 also when the bucket is
        missing: a HEAD's bare 404 cannot tell; check() can)."""

    def get(self, name: str) -> ObjectData | None:
        """The whole object and its version, or None if there is none."""

    def create(self, name: str, data: bytes) -> ObjectInfo | Refused:
        """Write `data` at `name` only if no object is there: its ObjectInfo, or Refused("exists")."""

    def replace(self, name: str, data: bytes, *, version: str) -> ObjectInfo | Refused:
        """Write `data` only if `version` is still the object's: the new ObjectInfo, or
        Refused("changed") / Refused("missing"). The object is untouched when refused."""

    def delete(self, name: str, *, version: str | None = None) -> bool:
        """Remove the object (only if `version` is still its version, when given): True if
        it is gone (a missing object included), False if another version is there."""

    def list(self, prefix: str, *, delimiter: bool = False) -> Iterator[ObjectInfo | Prefix]:
        """Objects whose names start with `prefix`, in name order, LIST_PAGE per request.
        `delimiter`: stop at the next "/" and yield each deeper level once as a Prefix."""

    def upload(self, path: Path, name: str) -> ObjectInfo | Refused:
        """Stream the local file `path` to `name` only if no object is there (a big file is
        never read whole into memory): its ObjectInfo, or Refused("exists")."""

    def download(self, name: str, path: Path, *, version: str | None = None) -> ObjectInfo | None:
        """Write the object to the local `path` whole or not at all (a temporary beside it,
        renamed into place): its ObjectInfo, or None if there is none (or not that version)."""

    def clock(self) -> datetime:
        """The store's clock now (the `Date` of a response): judge leases on it, not ours."""

    def close(self) -> None:
        """Drop the connection (the bucket connects again on next use)."""


def md5_hex(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def md5_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()


def temporary_beside(path: Path) -> Path:
    """A unique hidden name in `path`'s folder for a download under way (same file system,
    so the rename into place is atomic)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.part")


@contextmanager
def atomic_download(path: Path) -> Iterator[BinaryIO]:
    """A file to write a download into; renamed to `path` when the block ends without an
    error, removed when it raises. A reader never finds half an object at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_beside(path)
    try:
        with open(tmp, "xb") as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
