"""Object-store test servers, each started once per session on 127.0.0.1.

`gcs_server`: our GCS JSON-API emulator (gcs_emulator.GcsEmulator). It gives the
environment a child process needs (`.env`, to merge into os.environ) and makes buckets;
the function fixtures give a fresh bucket and a real client per test. Faults armed in a
test are cleared after it.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import pytest

pytest.importorskip("google.cloud.storage", reason="google-cloud-storage is not installed (pip install -e '.[test]')")

from gcs_emulator import GcsEmulator  # noqa: E402


@pytest.fixture(scope="session")
def gcs_server() -> Iterator[GcsEmulator]:
    """The GCS emulator. `.env` for child processes, `.create_bucket()`, faults, `.requests`."""
    with GcsEmulator() as emulator:
        yield emulator


@pytest.fixture(autouse=True)
def _faults_cleared(request: pytest.FixtureRequest) -> Iterator[None]:
    """Disarm what a test armed on a session server, so that no fault leaks into the next test."""
    yield
    for name in ("gcs_server",):
        if name in request.fixturenames:
            request.getfixturevalue(name).clear_faults()


@pytest.fixture
def gcs_bucket(gcs_server: GcsEmulator) -> str:
    """A fresh, empty bucket in the emulator (made without a request)."""
    return gcs_server.create_bucket()


@pytest.fixture
def gcs_client(gcs_server: GcsEmulator) -> Any:
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
