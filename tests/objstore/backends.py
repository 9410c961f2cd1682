"""One test server per store behind the same few verbs, so each bucket test runs on both.

`Backend` wraps moto behind the S3 fault proxy, or the GCS emulator: a fresh bucket, our
adaptor bound to it (through the standard variables, as a user's process would be),
seeding without a request, and faults named by what the adaptor does ("create",
"download", ...) rather than by each server's request kinds.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tasks.store.bucket import Bucket, Retries

# Short bounds, so that a test of a failure that persists ends in seconds.
FAST = Retries(attempts=3, deadline_s=3.0, connect_timeout_s=5.0, read_timeout_s=20.0)
# What each adaptor call sends, in each server's request kinds.
KINDS = {
    "s3": {"create": "PutObject", "get": "GetObject", "download": "GetObject", "list": "ListObjectsV2",
           "delete": "DeleteObject", "stat": "HeadObject", "check": "HeadBucket", "part": "UploadPart",
           "complete": "CompleteMultipartUpload"},
    "gs": {"create": "objects.insert", "get": "objects.download", "download": "objects.download",
           "list": "objects.list", "delete": "objects.delete", "stat": "objects.get", "check": "objects.list",
           "part": "objects.insert.chunk", "complete": "objects.insert.chunk"},
}
# The IAM permission each adaptor call needs.
PERMISSIONS = {
    "s3": {"create": "s3:PutObject", "get": "s3:GetObject", "list": "s3:ListBucket", "delete": "s3:DeleteObject"},
    "gs": {"create": "storage.objects.create", "get": "storage.objects.get", "list": "storage.objects.list",
           "delete": "storage.objects.delete"},
}


@dataclass
class Backend:
    """A test server of one store, with a fresh bucket and our adaptor bound to it."""

    scheme: str  # "s3" or "gs"
    server: Any  # moto_s3.S3Server or gcs_emulator.GcsEmulator
    bucket_name: str
    bucket: Bucket  # our adaptor (tasks.store.s3.S3Bucket or tasks.store.gcs.GcsBucket)

    @property
    def env(self) -> Mapping[str, str]:
        return self.server.env

    @property
    def endpoint(self) -> str:
        return self.server.endpoint

    def new(self, **options: Any) -> Bucket:
        """Another adaptor on the same bucket (its own connection), with `options`."""
        return type(self.bucket)(self.bucket_name, **{"retries": FAST, **options})

    def seed(self, name: str, data: bytes) -> None:
        """Put an object without a request through the proxy or emulator log."""
        if self.scheme == "gs":
            self.server.put(self.bucket_name, name, data)
        else:
            self.server.seed(self.bucket_name, name, data)

    def body(self, name: str) -> bytes | None:
        """An object's bytes as the server holds them (None if missing), without our adaptor."""
        if self.scheme == "gs":
            obj = self.server.get(self.bucket_name, name)
            return None if obj is None else obj.data
        return self.server.body(self.bucket_name, name)

    def kind(self, op: str) -> str:
        return KINDS[self.scheme][op]

    @property
    def request_log(self) -> Any:
        """Every request the server answered (loopback.RequestLog)."""
        return self.server.proxy.requests if self.scheme == "s3" else self.server.requests

    def requests(self, op: str) -> list[Any]:
        return self.request_log.select(kind=self.kind(op), bucket=self.bucket_name)

    def fail_next(self, op: str, count: int = 1, *, status: int, after_apply: bool = False,
                  key: str | None = None) -> None:
        if self.scheme == "s3":
            self.server.proxy.fail_next(count, status=status, operation=self.kind(op), after_apply=after_apply, key=key)
        else:
            self.server.fail_next(count, status=status, kind=self.kind(op), after_apply=after_apply, key=key)

    def cut_next(self, op: str, count: int = 1, *, after_bytes: int, key: str | None = None) -> None:
        if self.scheme == "s3":
            self.server.proxy.cut_next(count, after_bytes=after_bytes, operation=self.kind(op), key=key)
        else:
            self.server.cut_next(count, after_bytes=after_bytes, kind=self.kind(op), key=key)

    def add_latency(self, op: str, seconds: float, *, count: int | None = None) -> None:
        target = self.server.proxy if self.scheme == "s3" else self.server
        kw = {"operation" if self.scheme == "s3" else "kind": self.kind(op)}
        target.add_latency(seconds, count=count, **kw)

    def skew_clock(self, seconds: float) -> None:
        (self.server.proxy if self.scheme == "s3" else self.server).skew_clock(seconds)

    def deny(self, op: str) -> None:
        """The caller lacks the permission `op` needs: GCS's own deny switch; on S3 the proxy
        answers AccessDenied (naming the IAM action) to every such request."""
        if self.scheme == "gs":
            self.server.deny(PERMISSIONS["gs"][op])
        else:
            self.server.proxy.fail_next(10_000, status=403, operation=self.kind(op))

    def clear_faults(self) -> None:
        self.server.clear_faults()


def clean_env(extra: Mapping[str, str]) -> dict[str, str]:
    """This process's environment without any cloud variable, plus `extra`: what a child
    sees. The metadata servers point at a closed loopback port, so no probe leaves 127.0.0.0/8."""
    drop = ("AWS_", "GOOGLE_", "GCE_", "CLOUDSDK_", "STORAGE_EMULATOR_HOST", "NO_GCE_CHECK")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update({"AWS_EC2_METADATA_DISABLED": "true", "AWS_EC2_METADATA_SERVICE_ENDPOINT": "http://127.0.0.1:9",
                "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
                "NO_GCE_CHECK": "true", "GCE_METADATA_HOST": "127.0.0.1:9", "GCE_METADATA_IP": "127.0.0.1:9"})
    env.update(extra)
    return env
