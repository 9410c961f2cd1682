"""A Cloud Storage bucket through google-cloud-storage: tasks.store.bucket's operations, errors translated once.

The endpoint is the client's own (`STORAGE_EMULATOR_HOST`, else Google), credentials come
from Application Default Credentials (GOOGLE_APPLICATION_CREDENTIALS, `gcloud auth
application-default login`, a VM's service account). Every call passes one bounded
retry (transient errors only: 429, 5xx, broken connections; no retry starts after
`Retries.deadline_s`). A conditional write refused after a retry is checked against the
object's MD5: a first attempt that succeeded but whose answer was lost is recognised as
ours instead of "exists".
"""
from __future__ import annotations

import base64
import hashlib
import http.client
import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from tasks.errors import NoSuchBucket, SpecError, StoreAccessError, StoreUnreachable
from tasks.store.bucket import (POOL_CONNECTIONS, ClientHolder, COPY_CHUNK, LIST_PAGE, ObjectData, ObjectInfo, Prefix, Refused, Retries,
                                atomic_download, md5_b64)

try:
    import google.auth.exceptions as gauth
    import requests
    import urllib3.exceptions
    from google.api_core import exceptions as gexc
    from google.api_core.retry import Retry
    from google.cloud import storage
    from google.cloud.storage.exceptions import DataCorruption, InvalidResponse
except ImportError as e:  # pragma: no cover - the install hint
    raise SpecError("gs:// roots need google-cloud-storage: pip install 'spotfan[gcs]' "
                    "(or pip install google-cloud-storage)") from e

UPLOAD_CHUNK = 16 << 20  # a file above 8 MiB goes up resumably in chunks of this (a multiple of 256 KiB)
RETRY_FIRST_WAIT_S = 0.5  # the first wait before a retry; doubled up to RETRY_MAX_WAIT_S
RETRY_MAX_WAIT_S = 8.0
_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_TRANSIENT = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError, ConnectionError,
              http.client.IncompleteRead, http.client.BadStatusLine, urllib3.exceptions.ProtocolError,
              urllib3.exceptions.TimeoutError)
_UNREACHABLE = (*_TRANSIENT, gexc.RetryError, gexc.ServerError, gexc.TooManyRequests, gauth.TransportError,
                InvalidResponse, DataCorruption)
_NO_CREDENTIALS = (
    "no Google credentials were found: on a laptop run `gcloud auth application-default login` (or set "
    "GOOGLE_APPLICATION_CREDENTIALS to a key file); on a GCE VM attach a service account that may use the bucket")


class _Missing(Exception):
    """The object (or that version of it) is not there: ends a download without a file."""


class _Attempts:
    """A bounded retry that remembers whether it retried (so a 412 may be our own first write)."""

    def __init__(self, retries: Retries) -> None:
        self.retried = False
        self.retry = Retry(predicate=_transient, initial=RETRY_FIRST_WAIT_S,
                           maximum=RETRY_MAX_WAIT_S, multiplier=2.0, timeout=retries.deadline_s, on_error=self._seen)

    def _seen(self, e: Exception) -> None:
        self.retried = True


class GcsBucket(ClientHolder):
    """One Cloud Storage bucket (see tasks.store.bucket.Bucket)."""

    scheme = "gs"

    def __init__(self, name: str, *, retries: Retries = Retries(), upload_chunk: int = UPLOAD_CHUNK) -> None:
        self.name = name
        self.retries = retries
        self.upload_chunk = upload_chunk
        self._client: Any = None

    # --- connection ---------------------------------------------------------------------

    @property
    def client(self) -> Any:
        if self._client is None:
            with self._errors("storage.objects.list", ""):
                client = storage.Client()
            adapter = requests.adapters.HTTPAdapter(pool_connections=POOL_CONNECTIONS, pool_maxsize=POOL_CONNECTIONS)
            for scheme in ("http://", "https://"):  # requests keeps 10 by default: threads would reconnect
                client._http.mount(scheme, adapter)
            self._client = client
        return self._client

    @property
    def timeout(self) -> tuple[float, float]:
        return (self.retries.connect_timeout_s, self.retries.read_timeout_s)

    def _bucket(self) -> Any:
        return self.client.bucket(self.name)

    def _metadata(self, name: str, retry: Retry) -> Any:
        """The blob with its metadata loaded, or None if there is no such object (a
        missing bucket raises: get_blob would call that None too)."""
        blob = self._bucket().blob(name)
        try:
            blob.reload(retry=retry, timeout=self.timeout)
        except gexc.NotFound as e:
            if _bucket_missing(e):
                raise
            return None
        return blob

    # --- reads --------------------------------------------------------------------------

    def check(self) -> None:
        # A one-name listing, not buckets.get: a worker's role (roles/storage.objectUser)
        # may list objects without reading the bucket's own metadata.
        with self._errors("storage.objects.list", ""):
            blobs = self.client.list_blobs(self.name, max_results=1, retry=_Attempts(self.retries).retry,
                                           timeout=self.timeout)
            next(iter(blobs.pages), None)

    def clock(self) -> datetime:
        # The client keeps response headers to itself, so ask its authorized session for a
        # one-name listing, reduced to its `kind`, and read the answer's Date.
        base = self.client._connection.API_BASE_URL
        url = f"{base}/storage/v1/b/{quote(self.name, safe='')}/o?maxResults=1&fields=kind"

        def ask() -> datetime:
            response = self.client._http.get(url, timeout=self.timeout)
            if response.status_code >= 400:
                raise gexc.from_http_response(response)  # a 5xx is retried like any other call's
            return parsedate_to_datetime(response.headers["Date"])

        with self._errors("storage.objects.list", ""):
            return _Attempts(self.retries).retry(ask)()

    def stat(self, name: str) -> ObjectInfo | None:
        with self._errors("storage.objects.get", name):
            blob = self._metadata(name, _Attempts(self.retries).retry)
        return None if blob is None else _info(blob)

    def get(self, name: str) -> ObjectData | None:
        with self._errors("storage.objects.get", name):
            attempts = _Attempts(self.retries)
            blob = self._metadata(name, attempts.retry)
            if blob is None:
                return None
            try:  # that generation: never a newer one's bytes under the older one's version
                data = blob.download_as_bytes(retry=attempts.retry, timeout=self.timeout)
            except gexc.NotFound:
                return None
        return ObjectData(_info(blob), data)

    def download(self, name: str, path: Path, *, version: str | None = None) -> ObjectInfo | None:
        with self._errors("storage.objects.get", name):
            attempts = _Attempts(self.retries)
            blob = self._metadata(name, attempts.retry)
            if blob is None or (version is not None and str(blob.generation) != version):
                return None
            try:
                with atomic_download(path) as f:
                    try:  # the client resumes a cut download with a Range and checks the MD5 or CRC32C
                        blob.download_to_file(f, retry=attempts.retry, timeout=self.timeout)
                    except gexc.NotFound as e:
                        raise _Missing from e
            except _Missing:
                return None
        return _info(blob)

    def list(self, prefix: str, *, delimiter: bool = False) -> Iterator[ObjectInfo | Prefix]:
        with self._errors("storage.objects.list", prefix):
            blobs = self.client.list_blobs(self.name, prefix=prefix, delimiter="/" if delimiter else None,
                                           page_size=LIST_PAGE, retry=_Attempts(self.retries).retry,
                                           timeout=self.timeout)
            for page in blobs.pages:
                entries: list[ObjectInfo | Prefix] = [_info(blob) for blob in page]
                entries += [Prefix(p) for p in page.prefixes]
                yield from sorted(entries, key=lambda entry: entry.name)

    # --- conditional writes -------------------------------------------------------------

    def create(self, name: str, data: bytes) -> ObjectInfo | Refused:
        return self._write(name, generation=0, send=lambda blob, retry: blob.upload_from_string(
            data, if_generation_match=0, retry=retry, timeout=self.timeout), ours=lambda: md5_b64(data))

    def replace(self, name: str, data: bytes, *, version: str) -> ObjectInfo | Refused:
        generation = int(version)
        return self._write(name, generation=generation, send=lambda blob, retry: blob.upload_from_string(
            data, if_generation_match=generation, retry=retry, timeout=self.timeout), ours=lambda: md5_b64(data))

    def upload(self, path: Path, name: str) -> ObjectInfo | Refused:
        def send(blob: Any, retry: Retry) -> None:
            blob.chunk_size = self.upload_chunk  # one chunk in memory at a time
            blob.upload_from_filename(str(path), if_generation_match=0, retry=retry, timeout=self.timeout)

        return self._write(name, generation=0, send=send, ours=lambda: _file_md5_b64(path))

    def _write(self, name: str, *, generation: int, send: Any, ours: Any) -> ObjectInfo | Refused:
        """Run `send(blob, retry)` (a write under ifGenerationMatch=`generation`); what it did."""
        with self._errors("storage.objects.create", name):
            attempts = _Attempts(self.retries)
            blob = self._bucket().blob(name)
            try:
                send(blob, attempts.retry)
            except gexc.PreconditionFailed:
                if generation == 0 and not attempts.retried:
                    return Refused("exists")
                current = self._metadata(name, attempts.retry)
                if attempts.retried and current is not None and current.md5_hash == ours():
                    return _info(current)  # our first try landed and its answer was lost
                if generation == 0:
                    return Refused("exists")
                return Refused("missing" if current is None else "changed")
        return _info(blob)

    def delete(self, name: str, *, version: str | None = None) -> bool:
        with self._errors("storage.objects.delete", name):
            try:
                self._bucket().blob(name).delete(
                    if_generation_match=int(version) if version is not None else None,
                    retry=_Attempts(self.retries).retry, timeout=self.timeout)
            except gexc.PreconditionFailed:
                return False
            except gexc.NotFound as e:
                if _bucket_missing(e):
                    raise
                return True  # gone already (or our first try removed it and its answer was lost)
        return True

    # --- errors -------------------------------------------------------------------------

    @contextmanager
    def _errors(self, permission: str, name: str) -> Iterator[None]:
        """google-cloud-storage's exceptions as tasks.errors', in one table."""
        where = self.where(name)
        try:
            yield
        except gauth.DefaultCredentialsError as e:
            raise StoreAccessError(f"{where}: {_NO_CREDENTIALS} ({e})") from e
        except (gauth.RefreshError, gexc.Unauthorized) as e:
            raise StoreAccessError(f"{where}: Google rejected the credentials ({e}); run `gcloud auth "
                                   "application-default login` again or check GOOGLE_APPLICATION_CREDENTIALS") from e
        except gexc.Forbidden as e:
            named = re.search(r"storage\.[a-zA-Z]+\.[a-zA-Z]+", str(e.message))
            needed = named.group(0) if named else permission
            raise StoreAccessError(
                f"{where}: permission denied ({e.message}); grant {needed} on gs://{self.name} to the account these "
                "credentials belong to (e.g. roles/storage.objectUser; a VM's service account on a cluster)",
                permission=needed) from e
        except gexc.NotFound as e:
            if _bucket_missing(e) or not name:
                raise NoSuchBucket(f"bucket gs://{self.name} does not exist (or this project cannot see it): create "
                                   f"it with `gcloud storage buckets create gs://{self.name}` or fix the bucket name "
                                   "in the root") from e
            raise
        except _UNREACHABLE as e:
            raise StoreUnreachable(
                f"{where}: Cloud Storage did not answer or kept failing ({type(e).__name__}: {e}) for "
                f"{self.retries.deadline_s:g} s of retries; check the network and STORAGE_EMULATOR_HOST (unset for "
                "Google itself), then run again") from e


def _transient(e: BaseException) -> bool:
    """Worth another try: a broken connection, 408, 429 or 5xx (as the API's exception, or
    as the upload/download layer's InvalidResponse, or inside an auth TransportError)."""
    if isinstance(e, _TRANSIENT):
        return True
    if isinstance(e, gexc.GoogleAPICallError):
        return e.code in _TRANSIENT_STATUS
    if isinstance(e, InvalidResponse):
        return e.response.status_code in _TRANSIENT_STATUS
    if isinstance(e, gauth.TransportError) and e.args and isinstance(e.args[0], BaseException):
        return _transient(e.args[0])
    return False


def _bucket_missing(e: gexc.NotFound) -> bool:
    return "bucket does not exist" in str(e.message)


def _info(blob: Any) -> ObjectInfo:
    return ObjectInfo(name=blob.name, size=int(blob.size or 0), version=str(blob.generation), updated=blob.updated)


def _file_md5_b64(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(COPY_CHUNK):
            digest.update(chunk)
    return base64.b64encode(digest.digest()).decode()
