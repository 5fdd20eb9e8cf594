"""file:// stores: atomic writes, listing, deletes, access checks, and URL parsing for every scheme."""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from workloads import storage
from workloads.errors import StorageError, StorageNotFound
from workloads.storage import join_key, list_url, open_store, read_url

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("url", "kind", "expected"),
    [
        ("file:///data/runs", storage.FileStore, "file:///data/runs"),
        ("file://localhost/data/runs/", storage.FileStore, "file:///data/runs"),
        ("/data//runs/", storage.FileStore, "file:///data/runs"),
        ("s3://my-bucket/a/b/", storage.S3Store, "s3://my-bucket/a/b"),
        ("s3://my-bucket", storage.S3Store, "s3://my-bucket"),
        ("gs://my.bucket/x", storage.GcsStore, "gs://my.bucket/x"),
        ("GS://my-bucket/x", storage.GcsStore, "gs://my-bucket/x"),
    ],
)
def test_open_store_parses_each_scheme(url, kind, expected):
    store = open_store(url)
    assert type(store) is kind
    assert store.url == expected


def test_plain_relative_path_becomes_absolute_file_url(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = open_store("storage/../storage")
    assert store.url == f"file://{tmp_path}/storage"
    assert store.local_path("a/b") == tmp_path / "storage" / "a" / "b"


@pytest.mark.parametrize(
    "url", ["ftp://host/x", "gcs://bucket/x", "file://relative/dir", "s3://", "s3://Bad_Bucket/x", "gs:///x", ""]
)
def test_bad_url_names_it_and_the_valid_schemes(url):
    with pytest.raises(StorageError) as info:
        open_store(url)
    message = str(info.value)
    assert repr(url) in message
    assert "\n" not in message
    assert all(scheme in message for scheme in ("file:///", "s3://", "gs://"))


@pytest.mark.parametrize("key", ["../etc/passwd", "a/../../b", ".."])
def test_keys_cannot_escape_the_root(tmp_path, key):
    with pytest.raises(StorageError, match=r"\.\."):
        open_store(str(tmp_path)).write_bytes(key, b"x")


def test_child_and_url_of_join_keys():
    store = open_store("s3://bucket/base").child("runs", "r1/")
    assert store.url == "s3://bucket/base/runs/r1"
    assert store.url_of("step-1/model.pt") == "s3://bucket/base/runs/r1/step-1/model.pt"
    assert store.url_of() == store.url
    assert join_key("a/", "/b", "./c") == "a/b/c"


def test_write_then_read_and_overwrite(tmp_path):
    store = open_store(f"file://{tmp_path}").child("runs", "r1")
    store.write_bytes("step-1/model.pt", b"one")
    store.write_bytes("step-1/model.pt", b"two")
    assert store.read_bytes("step-1/model.pt") == b"two"
    assert (tmp_path / "runs/r1/step-1/model.pt").read_bytes() == b"two"
    assert store.exists("step-1/model.pt") and not store.exists("step-1")


def test_read_missing_raises_not_found_with_url(tmp_path):
    store = open_store(str(tmp_path))
    with pytest.raises(StorageNotFound, match=f"file://{tmp_path}/nope"):
        store.read_bytes("nope")
    (tmp_path / "dir").mkdir()
    with pytest.raises(StorageNotFound):
        store.read_bytes("dir")


def test_failed_rename_keeps_old_content_and_leaves_no_temp(tmp_path, monkeypatch):
    store = open_store(str(tmp_path))
    store.write_bytes("ckpt/model.pt", b"old")

    def fail_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(storage.os, "replace", fail_replace)
    with pytest.raises(StorageError, match="No space left"):
        store.write_bytes("ckpt/model.pt", b"new" * 1000)
    monkeypatch.undo()
    assert store.read_bytes("ckpt/model.pt") == b"old"
    assert os.listdir(tmp_path / "ckpt") == ["model.pt"]
    assert store.list() == ["ckpt/model.pt"]


def test_crash_mid_write_leaves_old_content_and_hides_the_temp(tmp_path):
    store = open_store(str(tmp_path))
    store.write_bytes("ckpt/model.pt", b"old")
    # A process killed between writing the temp and renaming it: os._exit skips every cleanup.
    crash = (
        "import os, sys; from workloads import storage\n"
        "storage.os.replace = lambda src, dst: os._exit(9)\n"
        "storage.open_store(sys.argv[1]).write_bytes('ckpt/model.pt', b'half-written')\n"
    )
    result = subprocess.run([sys.executable, "-c", crash, str(tmp_path)], cwd=REPO, timeout=30)
    assert result.returncode == 9
    leftovers = sorted(os.listdir(tmp_path / "ckpt"))
    assert len(leftovers) == 2 and leftovers[0].startswith(storage.TEMP_PREFIX)
    assert store.read_bytes("ckpt/model.pt") == b"old"
    assert store.list() == ["ckpt/model.pt"]
    assert store.delete_prefix("ckpt") == 1
    assert not (tmp_path / "ckpt").exists()


def test_list_is_recursive_sorted_relative_and_prefix_is_a_directory(tmp_path):
    store = open_store(str(tmp_path)).child("run")
    for key in ["step-10/model.pt", "step-1/optim.pt", "step-1/model.pt", "metrics.jsonl", "step-1/sub/x"]:
        store.write_bytes(key, b"x")
    (tmp_path / "run/empty-dir").mkdir()
    assert store.list() == sorted(
        ["metrics.jsonl", "step-1/model.pt", "step-1/optim.pt", "step-1/sub/x", "step-10/model.pt"]
    )
    assert store.list("step-1") == ["step-1/model.pt", "step-1/optim.pt", "step-1/sub/x"]
    assert store.list("step-1/") == store.list("step-1")
    assert store.child("step-1").list() == ["model.pt", "optim.pt", "sub/x"]
    assert store.list("missing") == [] and open_store(str(tmp_path / "nothing")).list() == []


def test_delete_and_delete_prefix(tmp_path):
    store = open_store(str(tmp_path))
    for key in ["step-1/a", "step-1/b/c", "step-10/a", "keep"]:
        store.write_bytes(key, b"x")
    store.delete("keep")
    store.delete("keep")  # missing is fine
    assert store.delete_prefix("step-1") == 2
    assert store.list() == ["step-10/a"]
    assert not (tmp_path / "step-1").exists()
    assert store.delete_prefix("step-1") == 0
    with pytest.raises(StorageError, match="non-empty prefix"):
        store.delete_prefix("/")


def test_upload_and_download_stream_through_temps(tmp_path, monkeypatch):
    monkeypatch.setattr("workloads.storage.base.COPY_CHUNK_BYTES", 4096)
    source = tmp_path / "source.bin"
    source.write_bytes(os.urandom(3 * 1024 * 1024 + 7))
    store = open_store(str(tmp_path / "store"))
    store.upload_file("models/final.bin", source)
    target = tmp_path / "out" / "final.bin"
    store.download_file("models/final.bin", target)
    assert target.read_bytes() == source.read_bytes()
    assert os.listdir(tmp_path / "out") == ["final.bin"]


def test_download_missing_leaves_no_file_and_upload_missing_source_fails(tmp_path):
    store = open_store(str(tmp_path / "store"))
    with pytest.raises(StorageNotFound):
        store.download_file("nope", tmp_path / "out" / "x")
    assert os.listdir(tmp_path / "out") == []
    with pytest.raises(StorageError, match="not a file"):
        store.upload_file("x", tmp_path / "missing.bin")


def test_local_path_only_for_files(tmp_path):
    assert open_store(str(tmp_path)).local_path("a/b") == tmp_path / "a" / "b"
    assert open_store(str(tmp_path)).local_path() == tmp_path
    assert open_store("s3://bucket/x").local_path("a") is None
    assert open_store("gs://bucket/x").local_path() is None


def test_check_access_creates_a_writable_dir_and_leaves_nothing(tmp_path):
    store = open_store(str(tmp_path / "new" / "storage"))
    store.check_access()
    assert (tmp_path / "new" / "storage").is_dir()
    assert os.listdir(tmp_path / "new" / "storage") == []


@pytest.mark.parametrize(
    ("make_url", "write", "reason"),
    [
        (lambda tmp: "/dev/null/storage", True, "Not a directory"),
        (lambda tmp: str(tmp / "a-file" / "storage"), True, "Not a directory"),
        (lambda tmp: str(tmp / "a-file"), True, "File exists"),
        (lambda tmp: str(tmp / "missing"), False, "No such file or directory"),
    ],
)
def test_check_access_fails_with_one_clear_line(tmp_path, make_url, write, reason):
    (tmp_path / "a-file").write_text("not a directory")
    url = make_url(tmp_path)
    with pytest.raises(StorageError) as info:
        open_store(url).check_access(write=write)
    message = str(info.value)
    assert message.startswith(f"file://{url}: cannot ")
    assert reason in message and "\n" not in message


def test_read_url_and_list_url_for_files(tmp_path):
    store = open_store(str(tmp_path))
    store.write_bytes("data/b.txt", b"bee")
    store.write_bytes("data/a/1.txt", b"one")
    assert read_url(f"file://{tmp_path}/data/b.txt") == b"bee"
    assert read_url(str(tmp_path / "data/a/1.txt")) == b"one"
    assert list_url(f"file://{tmp_path}/data") == [f"file://{tmp_path}/data/a/1.txt", f"file://{tmp_path}/data/b.txt"]
    assert list_url(str(tmp_path / "data/b.txt")) == [f"file://{tmp_path}/data/b.txt"]
    with pytest.raises(StorageNotFound, match="no files or objects"):
        list_url(str(tmp_path / "nothing"))
    with pytest.raises(StorageNotFound):
        read_url(str(tmp_path / "data/missing.txt"))


def test_read_url_over_http(tmp_path):
    (tmp_path / "corpus.txt").write_bytes(b"hello over http")
    quiet = type("Quiet", (http.server.SimpleHTTPRequestHandler,), {"log_message": lambda *args: None})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *args: quiet(*args, directory=str(tmp_path)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_port}"
    try:
        assert read_url(f"{base}/corpus.txt") == b"hello over http"
        assert list_url(f"{base}/corpus.txt") == [f"{base}/corpus.txt"]
        with pytest.raises(StorageNotFound, match="HTTP 404"):
            read_url(f"{base}/missing.txt")
    finally:
        server.shutdown()
        server.server_close()


def test_file_urls_do_not_import_cloud_sdks(tmp_path):
    code = (
        "import sys; from workloads.storage import open_store\n"
        "s = open_store(sys.argv[1]); s.write_bytes('a', b'x'); s.list(); s.check_access()\n"
        "open_store('s3://bucket/x'); open_store('gs://bucket/x')\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'boto3', 'botocore', 'google', 'urllib3'}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
