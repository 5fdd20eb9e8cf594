"""A real GCS JSON-API endpoint for tests: gcp-storage-emulator, in memory, on a free loopback port.

Use the fixtures by importing them into a test module (pytest picks up imported fixtures):

    from tests.fakes.gcs import gcs_emulator, gcs_bucket  # noqa: F401

    def test_something(gcs_bucket):
        store = open_store(f"gs://{gcs_bucket.name}/prefix")  # STORAGE_EMULATOR_HOST already set

For a subprocess, pass ``gcs_env(host)`` in its environment. The emulator does not paginate listings,
does not enforce preconditions and has no IAM, so tests of those need a real bucket.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

PROJECT = "test"


@dataclass(frozen=True)
class GcsBucket:
    name: str
    host: str  # http://127.0.0.1:PORT, the value of STORAGE_EMULATOR_HOST
    client: Any  # a google.cloud.storage.Client speaking to the emulator


def start_gcs_emulator() -> tuple[str, Callable[[], None]]:
    """Start gcp-storage-emulator in this process (in memory) on a free port; returns (host URL, stop)."""
    from gcp_storage_emulator.server import create_server

    logging.getLogger("gcp_storage_emulator").setLevel(logging.CRITICAL)  # it logs every 404 as an error
    server = create_server("127.0.0.1", 0, in_memory=True)
    server.start()
    # Port 0 lets the OS pick; the emulator exposes the bound port only on its HTTP server object.
    port = server._api._httpd.server_port
    return f"http://127.0.0.1:{port}", server.stop


def gcs_env(host: str) -> dict[str, str]:
    """Environment that points google-cloud-storage (here or in a child) at the emulator at ``host``."""
    return {"STORAGE_EMULATOR_HOST": host, "GOOGLE_CLOUD_PROJECT": PROJECT}


def make_gcs_client(host: str) -> Any:
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    return storage.Client(
        project=PROJECT, credentials=AnonymousCredentials(), client_options={"api_endpoint": host}
    )


def create_bucket(client: Any, prefix: str = "gpuforge-test") -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:12]}"
    client.create_bucket(name)
    return name


@pytest.fixture(scope="session")
def gcs_emulator() -> Iterator[str]:
    """One emulator for the session; tests isolate themselves with fresh buckets."""
    host, stop = start_gcs_emulator()
    yield host
    stop()


@pytest.fixture
def gcs_bucket(gcs_emulator: str, monkeypatch: pytest.MonkeyPatch) -> GcsBucket:
    """A fresh, empty bucket on the emulator, with STORAGE_EMULATOR_HOST pointing at it."""
    for name, value in gcs_env(gcs_emulator).items():
        monkeypatch.setenv(name, value)
    client = make_gcs_client(gcs_emulator)
    return GcsBucket(name=create_bucket(client), host=gcs_emulator, client=client)
