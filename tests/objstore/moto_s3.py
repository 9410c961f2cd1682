"""moto's S3 server on 127.0.0.1 behind the S3 fault proxy: for the tests' fixture and the benches.

    with moto_s3() as server:           # moto in this process, the proxy in front of it
        bucket = server.make_bucket()
        server.seed(bucket, "in/a.txt", b"...")       # no request, nothing in the log
        subprocess.run([...], env={**os.environ, **server.env})
        server.proxy.requests.counts(bucket=bucket)   # every request the clients sent
"""
from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from .s3_fault_proxy import S3FaultProxy

S3_REGION = "us-east-1"
S3_ACCESS_KEY = "testing"  # moto accepts any key; real ones never reach a test


@dataclass(frozen=True)
class S3Server:
    """moto on 127.0.0.1 and the fault proxy in front of it; clients use `endpoint`."""

    endpoint: str  # the proxy: every request recorded, faults injected, writes serialized
    moto_endpoint: str  # moto itself, bypassing the proxy (to show what moto alone does)
    proxy: S3FaultProxy
    env: Mapping[str, str]  # what a child process needs for boto3 to reach `endpoint`

    def client(self, *, endpoint: str | None = None, **config: Any) -> Any:
        """A real boto3 S3 client bound to the proxy (or `endpoint`); `config`: botocore Config options."""
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3", endpoint_url=endpoint or self.endpoint, region_name=S3_REGION,
            aws_access_key_id=S3_ACCESS_KEY, aws_secret_access_key=S3_ACCESS_KEY, config=Config(**config),
        )

    def make_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a fresh name if none given) through moto directly (not in the proxy's log)."""
        name = name or f"spotfan-test-{uuid.uuid4().hex[:12]}"
        self.client(endpoint=self.moto_endpoint).create_bucket(Bucket=name)
        return name

    def seed(self, bucket: str, name: str, data: bytes) -> None:
        """Put an object in moto's own store, without a request."""
        _backend().put_object(bucket, name, data)

    def body(self, bucket: str, name: str) -> bytes | None:
        """An object's bytes as moto holds them (None if missing), without a request."""
        key = _backend().buckets[bucket].keys.get(name)
        return None if key is None else key.value

    def names(self, bucket: str, prefix: str = "") -> list[str]:
        """The names of the objects in a bucket under `prefix`, without a request."""
        return sorted(n for n in _backend().buckets[bucket].keys.keys() if n.startswith(prefix))

    def clear_faults(self) -> None:
        self.proxy.clear_faults()


def _backend() -> Any:
    """moto's S3 store in this process (where its ThreadedMotoServer keeps the objects)."""
    from moto.core.models import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    return s3_backends[DEFAULT_ACCOUNT_ID]["aws"]


@contextmanager
def moto_s3() -> Iterator[S3Server]:
    """moto's ThreadedMotoServer and the fault proxy, both on 127.0.0.1 (ephemeral ports)."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto logs every request at INFO
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    try:
        host, port = moto.get_host_and_port()
        moto_endpoint = f"http://{host}:{port}"
        with S3FaultProxy(upstream=moto_endpoint) as proxy:
            env = {
                "AWS_ENDPOINT_URL": proxy.endpoint,
                "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": S3_ACCESS_KEY,
                "AWS_DEFAULT_REGION": S3_REGION,
                # Nothing but the proxy: no instance metadata service, no user config.
                "AWS_EC2_METADATA_DISABLED": "true",
                "AWS_CONFIG_FILE": os.devnull,
                "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            }
            yield S3Server(endpoint=proxy.endpoint, moto_endpoint=moto_endpoint, proxy=proxy, env=env)
    finally:
        moto.stop()
