"""An S3 bucket through boto3: the conditional writes of tasks.store.bucket, errors translated once.

The endpoint is boto3's own (`AWS_ENDPOINT_URL`, else AWS), credentials come from boto3's
chain (environment, profile, SSO, instance role). botocore retries 5xx, throttling and
broken connections up to `Retries.attempts` times; this module retries a 409
ConditionalRequestConflict (S3: another conditional write to the key is under way) and a
response body cut short. A conditional write refused after a retry is checked against
the object's ETag (the MD5 of what we sent): a first attempt that succeeded but whose
answer was lost is recognised as ours instead of "exists".
"""
from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, TypeVar

from tasks.errors import NoSuchBucket, SpecError, StoreAccessError, StoreUnreachable
from tasks.store.bucket import (CONFLICT_RETRIES, CONFLICT_WAIT_S, COPY_CHUNK, LIST_PAGE, POOL_CONNECTIONS,
                                ClientHolder, ObjectData,
                                ObjectInfo, Prefix, Refused, Retries, atomic_download, md5_hex)

try:
    import boto3
    import botocore.exceptions as bex
    from botocore.config import Config
except ImportError as e:  # pragma: no cover - the install hint
    raise SpecError("s3:// roots need boto3: pip install 'spotfan[s3]' (or pip install boto3)") from e

MULTIPART_THRESHOLD = 64 << 20  # files above this go up in parts (one part in memory at a time)
PART_SIZE = 16 << 20  # bytes per part (S3: at least 5 MiB, at most 10,000 parts)
MAX_PARTS = 10_000
T = TypeVar("T")
_CREDENTIAL_CODES = frozenset({"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
                               "TokenRefreshRequired", "AuthorizationHeaderMalformed"})
_TRANSIENT_CODES = frozenset({"SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout", "Throttling",
                              "ThrottlingException"})
_UNREACHABLE = (bex.EndpointConnectionError, bex.ConnectTimeoutError, bex.ReadTimeoutError, bex.ConnectionClosedError,
                bex.ResponseStreamingError, bex.IncompleteReadError, bex.HTTPClientError)
_CUT_SHORT = (bex.ResponseStreamingError, bex.IncompleteReadError, bex.ReadTimeoutError, bex.ConnectionClosedError)
_NO_CREDENTIALS = (
    "no AWS credentials were found: on a laptop run `aws configure` or `aws sso login` (or set AWS_PROFILE, or "
    "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY); on an EC2 VM attach an instance role that may use the bucket")


class _Missing(Exception):
    """The object (or that version of it) is not there: ends a download without a file."""


class S3Bucket(ClientHolder):
    """One S3 bucket (see tasks.store.bucket.Bucket)."""

    scheme = "s3"

    def __init__(self, name: str, *, retries: Retries = Retries(), multipart_threshold: int = MULTIPART_THRESHOLD,
                 part_size: int = PART_SIZE) -> None:
        self.name = name
        self.retries = retries
        self.multipart_threshold = multipart_threshold
        self.part_size = part_size
        self._client: Any = None

    # --- connection ---------------------------------------------------------------------

    @property
    def client(self) -> Any:
        if self._client is None:
            config = Config(retries={"total_max_attempts": self.retries.attempts, "mode": "standard"},
                            connect_timeout=self.retries.connect_timeout_s, read_timeout=self.retries.read_timeout_s,
                            max_pool_connections=POOL_CONNECTIONS)
            self._client = boto3.session.Session().client("s3", config=config)
        return self._client

    # --- reads --------------------------------------------------------------------------

    def check(self) -> None:
        with self._errors("s3:ListBucket", ""):
            self.client.head_bucket(Bucket=self.name)

    def clock(self) -> datetime:
        with self._errors("s3:ListBucket", ""):
            return _date(self.client.head_bucket(Bucket=self.name))

    def stat(self, name: str) -> ObjectInfo | None:
        with self._errors("s3:GetObject", name):
            try:
                r = self.client.head_object(Bucket=self.name, Key=name)
            except bex.ClientError as e:
                if _status(e) == 404:
                    return None
                raise
        return ObjectInfo(name=name, size=r["ContentLength"], version=r["ETag"], updated=r["LastModified"])

    def get(self, name: str) -> ObjectData | None:
        def read() -> ObjectData | None:
            try:
                r = self.client.get_object(Bucket=self.name, Key=name)
            except bex.ClientError as e:
                if _code(e) == "NoSuchKey":
                    return None
                raise
            data = r["Body"].read()
            return ObjectData(ObjectInfo(name, len(data), r["ETag"], r["LastModified"]), data)

        with self._errors("s3:GetObject", name):
            return self._again_if_cut(read)

    def download(self, name: str, path: Path, *, version: str | None = None) -> ObjectInfo | None:
        def fetch() -> ObjectInfo:
            with atomic_download(path) as f:
                try:
                    r = self.client.get_object(Bucket=self.name, Key=name, **({"IfMatch": version} if version else {}))
                except bex.ClientError as e:
                    if _code(e) in ("NoSuchKey", "PreconditionFailed"):
                        raise _Missing from e
                    raise
                for chunk in r["Body"].iter_chunks(COPY_CHUNK):  # botocore checks Content-Length at the end
                    f.write(chunk)
                return ObjectInfo(name, r["ContentLength"], r["ETag"], r["LastModified"])

        with self._errors("s3:GetObject", name):
            try:
                return self._again_if_cut(fetch)
            except _Missing:
                return None

    def list(self, prefix: str, *, delimiter: bool = False) -> Iterator[ObjectInfo | Prefix]:
        args: dict[str, Any] = {"Bucket": self.name, "Prefix": prefix, "PaginationConfig": {"PageSize": LIST_PAGE}}
        if delimiter:
            args["Delimiter"] = "/"
        with self._errors("s3:ListBucket", prefix):
            for page in self.client.get_paginator("list_objects_v2").paginate(**args):
                entries: list[ObjectInfo | Prefix] = [Prefix(p["Prefix"]) for p in page.get("CommonPrefixes", [])]
                entries += [ObjectInfo(o["Key"], o["Size"], o["ETag"], o["LastModified"])
                            for o in page.get("Contents", [])]
                yield from sorted(entries, key=lambda entry: entry.name)

    # --- conditional writes -------------------------------------------------------------

    def create(self, name: str, data: bytes) -> ObjectInfo | Refused:
        return self._put(name, data, {"IfNoneMatch": "*"})

    def replace(self, name: str, data: bytes, *, version: str) -> ObjectInfo | Refused:
        return self._put(name, data, {"IfMatch": version})

    def _put(self, name: str, data: bytes, condition: dict[str, str]) -> ObjectInfo | Refused:
        with self._errors("s3:PutObject", name):
            try:
                r = self._again_if_conflict(lambda: self.client.put_object(Bucket=self.name, Key=name, Body=data,
                                                                           **condition))
            except bex.ClientError as e:
                refused = self._refusal(e, name, condition, lambda: md5_hex(data))
                if refused is not None:
                    return refused
                raise
        return ObjectInfo(name=name, size=len(data), version=r["ETag"], updated=_date(r))

    def delete(self, name: str, *, version: str | None = None) -> bool:
        # S3 documents If-Match on DeleteObject for general purpose buckets (needing
        # s3:GetObject too); moto 5.2 enforces it (tests/objstore/test_s3_server.py).
        permission = "s3:DeleteObject" if version is None else "s3:DeleteObject and s3:GetObject"
        with self._errors(permission, name):
            try:
                self._again_if_conflict(lambda: self.client.delete_object(
                    Bucket=self.name, Key=name, **({"IfMatch": version} if version else {})))
            except bex.ClientError as e:
                if _code(e) == "PreconditionFailed":
                    return False
                if _code(e) == "NoSuchKey":
                    return True  # gone already (or our first try removed it and its answer was lost)
                raise
        return True

    def upload(self, path: Path, name: str) -> ObjectInfo | Refused:
        size = path.stat().st_size
        if size > self.multipart_threshold:
            return self._upload_parts(path, name, size)
        with self._errors("s3:PutObject", name):
            try:
                with open(path, "rb") as f:  # botocore streams a file body (and rewinds it to retry)
                    r = self._again_if_conflict(lambda: self.client.put_object(
                        Bucket=self.name, Key=name, Body=f, ContentLength=size, IfNoneMatch="*"))
            except bex.ClientError as e:
                refused = self._refusal(e, name, {"IfNoneMatch": "*"}, lambda: _file_md5(path))
                if refused is not None:
                    return refused
                raise
        return ObjectInfo(name=name, size=size, version=r["ETag"], updated=_date(r))

    def _upload_parts(self, path: Path, name: str, size: int) -> ObjectInfo | Refused:
        """A multipart upload completed only if absent (S3 checks If-None-Match at completion)."""
        part_size = max(self.part_size, -(-size // MAX_PARTS))
        with self._errors("s3:PutObject", name):
            upload = self.client.create_multipart_upload(Bucket=self.name, Key=name)["UploadId"]
            completed = False
            try:
                parts = []
                with open(path, "rb") as f:
                    for number in range(1, MAX_PARTS + 1):
                        chunk = f.read(part_size)
                        if not chunk:
                            break
                        r = self.client.upload_part(Bucket=self.name, Key=name, UploadId=upload, PartNumber=number,
                                                    Body=chunk)
                        parts.append({"ETag": r["ETag"], "PartNumber": number})
                # The ETag S3 gives a multipart object: MD5 of the parts' MD5s, "-" and their count.
                ours = md5_hex(b"".join(bytes.fromhex(p["ETag"].strip('"')) for p in parts)) + f"-{len(parts)}"
                try:
                    r = self._again_if_conflict(lambda: self.client.complete_multipart_upload(
                        Bucket=self.name, Key=name, UploadId=upload, MultipartUpload={"Parts": parts}, IfNoneMatch="*"))
                    completed = True
                except bex.ClientError as e:
                    refused = self._refusal(e, name, {"IfNoneMatch": "*"}, lambda: ours)
                    if refused is not None:
                        completed = isinstance(refused, ObjectInfo)
                        return refused
                    raise
            finally:
                if not completed:
                    self._abort(name, upload)  # its parts are billed until aborted
        return ObjectInfo(name=name, size=size, version=r["ETag"], updated=_date(r))

    def _abort(self, name: str, upload: str) -> None:
        try:
            self.client.abort_multipart_upload(Bucket=self.name, Key=name, UploadId=upload)
        except (bex.BotoCoreError, bex.ClientError):
            pass  # completed already, or unreachable: a lifecycle rule removes stale uploads

    # --- shared -------------------------------------------------------------------------

    def _refusal(self, e: bex.ClientError, name: str, condition: dict[str, str],
                 ours: Callable[[], str]) -> Refused | ObjectInfo | None:
        """What a failed conditional write means: Refused, or the object itself when it holds
        what we sent (our first try succeeded, its answer was lost, and botocore retried).
        None: not a refusal (the caller re-raises)."""
        if _code(e) == "NoSuchKey" and "IfMatch" in condition:
            return Refused("missing")
        if _code(e) != "PreconditionFailed":
            return None
        if e.response.get("ResponseMetadata", {}).get("RetryAttempts", 0) > 0:
            current = self.stat(name)
            if current is not None and current.version.strip('"') == ours():
                return current
        return Refused("exists" if "IfNoneMatch" in condition else "changed")

    def _again_if_conflict(self, call: Callable[[], T]) -> T:
        """`call`, tried again on S3's 409 ConditionalRequestConflict, up to CONFLICT_RETRIES times."""
        for attempt in range(CONFLICT_RETRIES + 1):
            try:
                return call()
            except bex.ClientError as e:
                if _code(e) != "ConditionalRequestConflict" or attempt == CONFLICT_RETRIES:
                    raise
                time.sleep(CONFLICT_WAIT_S * 2 ** attempt)
        raise AssertionError("unreachable")

    def _again_if_cut(self, call: Callable[[], T]) -> T:
        """`call` (a whole GET), again from the start when the body is cut short, up to
        `retries.attempts` tries: botocore retries a request, not a body half read."""
        for attempt in range(1, self.retries.attempts + 1):
            try:
                return call()
            except _CUT_SHORT:
                if attempt == self.retries.attempts:
                    raise
        raise AssertionError("unreachable")

    @contextmanager
    def _errors(self, permission: str, name: str) -> Iterator[None]:
        """boto3's exceptions as tasks.errors', in one table: what happened and how to fix it."""
        where = self.where(name)
        try:
            yield
        except (bex.NoCredentialsError, bex.PartialCredentialsError, bex.CredentialRetrievalError) as e:
            raise StoreAccessError(f"{where}: {_NO_CREDENTIALS} ({e})") from e
        except _UNREACHABLE as e:
            raise StoreUnreachable(
                f"{where}: the S3 endpoint did not answer ({e}) after {self.retries.attempts} tries; check the network "
                "and AWS_ENDPOINT_URL (unset for AWS itself), then run again") from e
        except bex.ClientError as e:
            code, status, message = _code(e), _status(e), e.response.get("Error", {}).get("Message", "")
            if code == "NoSuchBucket" or (status == 404 and not name):
                raise NoSuchBucket(f"bucket s3://{self.name} does not exist (or not in this account and region): "
                                   f"create it with `aws s3 mb s3://{self.name}` or fix the bucket name in the "
                                   "root") from e
            if code in _CREDENTIAL_CODES:
                raise StoreAccessError(f"{where}: S3 rejected the credentials ({code}: {message}); refresh them "
                                       "(`aws sso login`, or new keys) or check AWS_PROFILE") from e
            if status == 403:
                named = re.search(r"s3:[A-Za-z]+", message)
                needed = named.group(0) if named else permission
                resource = f"arn:aws:s3:::{self.name}/*" if name else f"arn:aws:s3:::{self.name}"
                raise StoreAccessError(
                    f"{where}: access denied ({code}: {message or 'no message'}); grant {needed} on {resource} to the "
                    "role or user these credentials belong to (an instance role's policy on a VM)",
                    permission=needed) from e
            if code in _TRANSIENT_CODES or status >= 500 or code == "ConditionalRequestConflict":
                raise StoreUnreachable(f"{where}: S3 kept failing ({status} {code}: {message}) after "
                                       f"{self.retries.attempts} tries; wait and run again") from e
            raise


def _code(e: bex.ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code", ""))


def _status(e: bex.ClientError) -> int:
    return int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


_HTTP_DATE = re.compile(r"[A-Z][a-z]{2}, \d{2} [A-Z][a-z]{2} \d{4} \d{2}:\d{2}:\d{2} GMT")


def _date(response: dict[str, Any]) -> datetime:
    """The `Date` of a response: the store's clock (1 s resolution)."""
    header = response["ResponseMetadata"]["HTTPHeaders"].get("date", "")
    found = _HTTP_DATE.search(header)
    if found is None:
        raise StoreUnreachable(f"S3 answered without a Date header ({header!r}): it cannot serve as the store's clock")
    return parsedate_to_datetime(found.group(0))


def _file_md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(COPY_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
