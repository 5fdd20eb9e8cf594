"""s3:// stores against moto's real HTTP server (boto3 finds it through AWS_ENDPOINT_URL)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.fakes.s3 import moto_server, s3_bucket, seed_objects  # noqa: F401  (fixtures)
from workloads.errors import StorageError, StorageNotFound
from workloads.storage import list_url, open_store, read_url

pytestmark = pytest.mark.integration


def test_write_read_overwrite_exists(s3_bucket):
    store = open_store(f"s3://{s3_bucket.name}/gpuforge").child("runs", "r1")
    store.write_bytes("step-1/model.pt", b"one")
    store.write_bytes("step-1/model.pt", b"two")
    assert store.read_bytes("step-1/model.pt") == b"two"
    body = s3_bucket.client.get_object(Bucket=s3_bucket.name, Key="gpuforge/runs/r1/step-1/model.pt")["Body"]
    assert body.read() == b"two"
    assert store.exists("step-1/model.pt") and not store.exists("step-1")


def test_read_missing_is_not_found_and_names_the_url(s3_bucket, tmp_path):
    store = open_store(f"s3://{s3_bucket.name}/p")
    with pytest.raises(StorageNotFound, match=f"s3://{s3_bucket.name}/p/nope: cannot read: no such object"):
        store.read_bytes("nope")
    with pytest.raises(StorageNotFound):
        store.download_file("nope", tmp_path / "out" / "x")
    assert os.listdir(tmp_path / "out") == []


def test_local_disk_failure_on_download_is_one_storage_error(s3_bucket):
    store = open_store(f"s3://{s3_bucket.name}")
    store.write_bytes("model.pt", b"x")
    with pytest.raises(StorageError, match=f"^s3://{s3_bucket.name}/model.pt: cannot download to /dev/null/model.pt: "):
        store.download_file("model.pt", Path("/dev/null/model.pt"))


def test_list_delete_and_delete_prefix(s3_bucket):
    store = open_store(f"s3://{s3_bucket.name}/run")
    for key in ["step-10/model.pt", "step-1/optim.pt", "step-1/model.pt", "metrics.jsonl"]:
        store.write_bytes(key, b"x")
    s3_bucket.client.put_object(Bucket=s3_bucket.name, Key="run/step-1/dir-marker/", Body=b"")
    s3_bucket.client.put_object(Bucket=s3_bucket.name, Key="runner/other", Body=b"")
    assert store.list() == ["metrics.jsonl", "step-1/model.pt", "step-1/optim.pt", "step-10/model.pt"]
    assert store.list("step-1") == ["step-1/model.pt", "step-1/optim.pt"]
    store.delete("metrics.jsonl")
    store.delete("metrics.jsonl")  # missing is fine
    assert store.delete_prefix("step-1") == 2
    assert store.list() == ["step-10/model.pt"]


def test_list_and_delete_prefix_page_past_1000_keys(s3_bucket):
    keys = [f"data/shard-{i:05d}" for i in range(1234)]
    seed_objects(s3_bucket.name, {key: b"" for key in keys})
    store = open_store(f"s3://{s3_bucket.name}")
    assert store.list("data") == keys
    assert store.delete_prefix("data") == 1234
    assert store.list() == []


def test_large_upload_is_multipart_and_round_trips(s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setattr("workloads.storage.s3.S3_MULTIPART_THRESHOLD", 5 << 20)
    monkeypatch.setattr("workloads.storage.s3.S3_MULTIPART_CHUNKSIZE", 5 << 20)  # the S3 minimum part size
    source = tmp_path / "big.bin"
    source.write_bytes(os.urandom(20 << 20))
    store = open_store(f"s3://{s3_bucket.name}/models")
    store.upload_file("final.bin", source)
    etag = s3_bucket.client.head_object(Bucket=s3_bucket.name, Key="models/final.bin")["ETag"]
    assert etag.strip('"').endswith("-4")  # a multipart object's ETag ends in -<parts>
    store.download_file("final.bin", tmp_path / "out" / "final.bin")
    assert (tmp_path / "out" / "final.bin").read_bytes() == source.read_bytes()
    assert os.listdir(tmp_path / "out") == ["final.bin"]
    assert s3_bucket.client.list_multipart_uploads(Bucket=s3_bucket.name).get("Uploads", []) == []


def test_failed_multipart_upload_keeps_the_old_object(s3_bucket, tmp_path, monkeypatch):
    from botocore.exceptions import ClientError

    monkeypatch.setattr("workloads.storage.s3.S3_MULTIPART_THRESHOLD", 5 << 20)
    monkeypatch.setattr("workloads.storage.s3.S3_MULTIPART_CHUNKSIZE", 5 << 20)
    store = open_store(f"s3://{s3_bucket.name}")
    store.write_bytes("ckpt.pt", b"old")
    source = tmp_path / "big.bin"
    source.write_bytes(os.urandom(12 << 20))

    def fail_last_part(params, **kwargs):  # the node dies while sending part 3 of 3
        if params["PartNumber"] == 3:
            raise ClientError({"Error": {"Code": "InternalError", "Message": "injected"}}, "UploadPart")

    events = store._client().meta.events  # the store's own (process-wide, cached) client
    events.register("before-parameter-build.s3.UploadPart", fail_last_part)
    try:
        with pytest.raises(StorageError, match=f"^s3://{s3_bucket.name}/ckpt.pt: cannot upload to: InternalError"):
            store.upload_file("ckpt.pt", source)
    finally:
        events.unregister("before-parameter-build.s3.UploadPart", fail_last_part)
    assert store.read_bytes("ckpt.pt") == b"old"
    assert store.list() == ["ckpt.pt"]
    assert s3_bucket.client.list_multipart_uploads(Bucket=s3_bucket.name).get("Uploads", []) == []


def test_check_access_passes_and_leaves_nothing(s3_bucket):
    store = open_store(f"s3://{s3_bucket.name}/runs")
    store.check_access()
    store.check_access(write=False)
    assert s3_bucket.client.list_objects_v2(Bucket=s3_bucket.name).get("KeyCount") == 0


def test_check_access_on_missing_bucket_says_so(s3_bucket):
    with pytest.raises(StorageError) as info:
        open_store("s3://no-such-bucket-here/runs").check_access()
    message = str(info.value)
    assert message == "s3://no-such-bucket-here/runs: cannot list: bucket 'no-such-bucket-here' does not exist (NoSuchBucket)"


def test_check_access_on_unreachable_endpoint_is_quick_and_clear(s3_bucket, monkeypatch):
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    with pytest.raises(StorageError, match=rf"^s3://{s3_bucket.name}: cannot list: endpoint unreachable: .*{port}"):
        open_store(f"s3://{s3_bucket.name}").check_access()


def test_read_url_and_list_url_for_s3(s3_bucket):
    store = open_store(f"s3://{s3_bucket.name}/data")
    store.write_bytes("b.txt", b"bee")
    store.write_bytes("a/1.txt", b"one")
    base = f"s3://{s3_bucket.name}/data"
    assert read_url(f"{base}/b.txt") == b"bee"
    assert list_url(base) == [f"{base}/a/1.txt", f"{base}/b.txt"]
    assert list_url(f"{base}/b.txt") == [f"{base}/b.txt"]
    with pytest.raises(StorageNotFound):
        list_url(f"{base}/missing")
