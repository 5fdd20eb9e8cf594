"""gs:// stores against gcp-storage-emulator over real HTTP (google-cloud-storage finds it through
STORAGE_EMULATOR_HOST). The emulator returns every listing in one page, so paging past 1,000 objects
is covered only by the S3 tests."""

from __future__ import annotations

import logging
import os
import socket

import pytest

from tests.fakes.gcs import gcs_bucket, gcs_emulator  # noqa: F401  (fixtures)
from workloads.errors import StorageError, StorageNotFound
from workloads.storage import list_url, open_store, read_url

pytestmark = pytest.mark.integration


def test_write_read_overwrite_exists(gcs_bucket):
    store = open_store(f"gs://{gcs_bucket.name}/gpuforge").child("runs", "r1")
    store.write_bytes("step-1/model.pt", b"one")
    store.write_bytes("step-1/model.pt", b"two")
    assert store.read_bytes("step-1/model.pt") == b"two"
    blob = gcs_bucket.client.bucket(gcs_bucket.name).blob("gpuforge/runs/r1/step-1/model.pt")
    assert blob.download_as_bytes() == b"two"
    assert store.exists("step-1/model.pt") and not store.exists("step-1")


def test_read_missing_is_not_found_and_names_the_url(gcs_bucket, tmp_path):
    store = open_store(f"gs://{gcs_bucket.name}/p")
    with pytest.raises(StorageNotFound, match=f"^gs://{gcs_bucket.name}/p/nope: cannot read: "):
        store.read_bytes("nope")
    with pytest.raises(StorageNotFound):
        store.download_file("nope", tmp_path / "out" / "x")
    assert os.listdir(tmp_path / "out") == []


def test_list_delete_and_delete_prefix(gcs_bucket):
    store = open_store(f"gs://{gcs_bucket.name}/run")
    for key in ["step-10/model.pt", "step-1/optim.pt", "step-1/model.pt", "metrics.jsonl"]:
        store.write_bytes(key, b"x")
    bucket = gcs_bucket.client.bucket(gcs_bucket.name)
    bucket.blob("run/step-1/folder/").upload_from_string(b"")  # a console-made "folder" placeholder
    bucket.blob("runner/other").upload_from_string(b"")
    assert store.list() == ["metrics.jsonl", "step-1/model.pt", "step-1/optim.pt", "step-10/model.pt"]
    assert store.list("step-1") == ["step-1/model.pt", "step-1/optim.pt"]
    store.delete("metrics.jsonl")
    store.delete("metrics.jsonl")  # missing is fine
    assert store.delete_prefix("step-1") == 2
    assert store.list() == ["step-10/model.pt"]
    assert bucket.blob("runner/other").exists()


def test_large_upload_goes_in_resumable_chunks_and_round_trips(gcs_bucket, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr("workloads.storage.gcs.GCS_CHUNK_SIZE", 4 << 20)
    source = tmp_path / "big.bin"
    source.write_bytes(os.urandom(20 << 20))
    store = open_store(f"gs://{gcs_bucket.name}/models")
    with caplog.at_level(logging.INFO, logger="gcp_storage_emulator.server"):  # it logs each request
        store.upload_file("final.bin", source)
    chunk_puts = [r for r in caplog.records if '"PUT /upload/' in r.getMessage() and "upload_id=" in r.getMessage()]
    assert len(chunk_puts) == 5  # 20 MiB in 4 MiB chunks, never the whole file in one request
    store.download_file("final.bin", tmp_path / "out" / "final.bin")
    assert (tmp_path / "out" / "final.bin").read_bytes() == source.read_bytes()
    assert os.listdir(tmp_path / "out") == ["final.bin"]


def test_check_access_passes_and_leaves_nothing(gcs_bucket):
    store = open_store(f"gs://{gcs_bucket.name}/runs")
    store.check_access()
    store.check_access(write=False)
    assert list(gcs_bucket.client.list_blobs(gcs_bucket.name)) == []


def test_check_access_on_missing_bucket_says_so(gcs_bucket):
    with pytest.raises(StorageError) as info:
        open_store("gs://no-such-bucket-here/runs").check_access()
    assert str(info.value) == "gs://no-such-bucket-here/runs: cannot list: bucket 'no-such-bucket-here' does not exist (404)"


def test_check_access_on_unreachable_endpoint_is_quick_and_clear(gcs_bucket, monkeypatch):
    monkeypatch.setattr("workloads.storage.gcs.PROBE_DEADLINE_S", 0.5)  # the retry budget, so the test stays fast
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
    with pytest.raises(StorageError, match=rf"^gs://{gcs_bucket.name}: cannot list: endpoint unreachable: .*{port}"):
        open_store(f"gs://{gcs_bucket.name}").check_access()


def test_read_url_and_list_url_for_gcs(gcs_bucket):
    store = open_store(f"gs://{gcs_bucket.name}/data")
    store.write_bytes("b.txt", b"bee")
    store.write_bytes("a/1.txt", b"one")
    base = f"gs://{gcs_bucket.name}/data"
    assert read_url(f"{base}/b.txt") == b"bee"
    assert list_url(base) == [f"{base}/a/1.txt", f"{base}/b.txt"]
    assert list_url(f"{base}/b.txt") == [f"{base}/b.txt"]
    with pytest.raises(StorageNotFound):
        list_url(f"{base}/missing")
