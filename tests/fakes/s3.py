"""A real S3 HTTP endpoint for tests: moto's ThreadedMotoServer on a free loopback port.

Use the fixtures by importing them into a test module (pytest picks up imported fixtures):

    from tests.fakes.s3 import moto_server, s3_bucket  # noqa: F401

    def test_something(s3_bucket):
        store = open_store(f"s3://{s3_bucket.name}/prefix")   # env already points boto3 at moto

For a subprocess, pass ``s3_env(endpoint)`` in its environment.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

REGION = "us-east-1"  # moto's default region; buckets here need no LocationConstraint
# moto's default account id (moto.core.DEFAULT_ACCOUNT_ID); its backends are keyed by it.
ACCOUNT_ID = "123456789012"


@dataclass(frozen=True)
class S3Bucket:
    name: str
    endpoint: str  # http://127.0.0.1:PORT
    client: Any  # a boto3 S3 client speaking to the endpoint, for arranging and inspecting state


def start_moto_server() -> tuple[str, Callable[[], None]]:
    """Start moto's server on a free loopback port, with what moto lacks added (tests/fakes/moto_ext.py);
    returns (endpoint URL, stop)."""
    from moto.server import ThreadedMotoServer

    from tests.fakes import moto_ext

    moto_ext.install()

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return f"http://{host}:{port}", server.stop


def reset_moto(endpoint: str) -> None:
    """Empty every moto backend and our extras (a fresh account)."""
    import urllib.request

    from tests.fakes import moto_ext

    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST")).close()
    moto_ext.reset()


def s3_env(endpoint: str) -> dict[str, str]:
    """Environment that points boto3 (in this process or a child) at ``endpoint`` with dummy credentials."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": REGION,
        "AWS_REGION": REGION,
    }


def apply_s3_env(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    """Set ``s3_env`` for this test and drop settings that would send boto3 elsewhere (restored afterwards)."""
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/dev/null")  # no ~/.aws profile can leak into a test
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
    for name, value in s3_env(endpoint).items():
        monkeypatch.setenv(name, value)


def make_s3_client(endpoint: str) -> Any:
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


def create_bucket(client: Any, prefix: str = "gpuforge-test") -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    return name


def seed_objects(bucket: str, items: dict[str, bytes]) -> None:
    """Put many objects straight into moto's in-process backend (thousands in milliseconds, no HTTP)."""
    from moto.s3.models import s3_backends

    backend = s3_backends[ACCOUNT_ID]["global"]
    for key, value in items.items():
        backend.put_object(bucket, key, value)


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """One moto server for the session; tests isolate themselves with fresh buckets."""
    endpoint, stop = start_moto_server()
    yield endpoint
    stop()


@pytest.fixture
def s3_bucket(moto_server: str, monkeypatch: pytest.MonkeyPatch) -> S3Bucket:
    """A fresh, empty bucket on the moto server, with the environment pointing boto3 at it."""
    apply_s3_env(monkeypatch, moto_server)
    client = make_s3_client(moto_server)
    return S3Bucket(name=create_bucket(client), endpoint=moto_server, client=client)
