"""Object-store test servers, each started once per session on 127.0.0.1.

`gcs_server`: our GCS JSON-API emulator (gcs_emulator.GcsEmulator). `s3_server`: moto's
ThreadedMotoServer behind the S3 fault proxy (moto_s3.moto_s3, also used by bench/). Both give the
environment a child process needs (`.env`, to merge into os.environ) and make buckets; the
function fixtures give a fresh bucket and a real client per test; `backend` gives each
bucket test once per store, with our adaptor (tests/objstore/backends.py). Faults armed
in a test are cleared after it.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import pytest

pytest.importorskip("google.cloud.storage", reason="google-cloud-storage is not installed (pip install -e '.[test]')")
pytest.importorskip("boto3", reason="boto3 is not installed (pip install -e '.[test]')")
pytest.importorskip("moto.server", reason="moto[server] is not installed (pip install -e '.[test]')")

from .gcs_emulator import GcsEmulator  # noqa: E402
from .moto_s3 import S3Server, moto_s3  # noqa: E402

if TYPE_CHECKING:
    from .backends import Backend

@pytest.fixture(scope="session")
def gcs_server() -> Iterator[GcsEmulator]:
    """The GCS emulator. `.env` for child processes, `.create_bucket()`, faults, `.requests`."""
    with GcsEmulator() as emulator:
        yield emulator


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """moto S3 behind the fault proxy, both on 127.0.0.1."""
    with moto_s3() as server:
        yield server


@pytest.fixture(autouse=True)
def _faults_cleared(request: pytest.FixtureRequest) -> Iterator[None]:
    """Disarm what a test armed on a session server, so that no fault leaks into the next test."""
    yield
    for name in ("gcs_server", "s3_server"):
        if name in request.fixturenames:
            request.getfixturevalue(name).clear_faults()


@pytest.fixture
def gcs_bucket(gcs_server: GcsEmulator) -> str:
    """A fresh, empty bucket in the emulator (made without a request)."""
    return gcs_server.create_bucket()


@pytest.fixture
def gcs_client(gcs_server: GcsEmulator) -> Iterator[Any]:
    """A real google-cloud-storage client bound to the emulator, with anonymous credentials."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    client = storage.Client(project=gcs_server.project, credentials=AnonymousCredentials(),
                            client_options={"api_endpoint": gcs_server.endpoint})
    yield client
    client.close()


@pytest.fixture
def gcs_env(gcs_server: GcsEmulator, monkeypatch: pytest.MonkeyPatch) -> Mapping[str, str]:
    """Set the emulator's variables in this process (for code that builds its own storage.Client())."""
    for key, value in gcs_server.env.items():
        monkeypatch.setenv(key, value)
    return gcs_server.env


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> str:
    """A fresh, empty bucket in moto (made bypassing the proxy)."""
    return s3_server.make_bucket()


@pytest.fixture
def s3_client(s3_server: S3Server) -> Any:
    """A real boto3 S3 client bound to the proxy, with botocore's default retries."""
    return s3_server.client()


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> Mapping[str, str]:
    """Set the S3 variables in this process (for code that builds its own boto3 client)."""
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    return s3_server.env


@pytest.fixture(params=["s3", "gs"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator["Backend"]:
    """Each bucket test once per store: a fresh bucket on the test server, our adaptor bound to
    it through the standard variables (AWS_ENDPOINT_URL, STORAGE_EMULATOR_HOST) alone."""
    from tasks.store.gcs import GcsBucket
    from tasks.store.s3 import S3Bucket

    from .backends import FAST, Backend

    if request.param == "s3":
        server: Any = request.getfixturevalue("s3_server")
        name = server.make_bucket()
        adaptor: Any = S3Bucket(name, retries=FAST)
    else:
        server = request.getfixturevalue("gcs_server")
        name = server.create_bucket()
        adaptor = GcsBucket(name, retries=FAST)
    for key, value in server.env.items():
        monkeypatch.setenv(key, value)
    made = Backend(scheme=request.param, server=server, bucket_name=name, bucket=adaptor)
    try:
        yield made
    finally:
        made.clear_faults()
        adaptor.close()
