"""Storage addressed by URL: ``file:///dir`` (or a plain path), ``s3://bucket/prefix``, ``gs://bucket/prefix``.

    store = open_store("s3://my-bucket/gpuforge").child("runs", run_id)
    store.write_bytes("step-100/model.pt", data)      # atomic: readers see the old object or the new one
    store.list("step-100")                             # ["step-100/model.pt"]

Writes never leave half an object behind: files go to a temp name in the same directory, are fsynced
and renamed; S3 and GCS objects appear only when their single put (or multipart / resumable upload)
completes. boto3 and google-cloud-storage are imported only when an s3:// or gs:// URL is used.

Layout: ``base`` (the Store class and shared helpers), ``file``, ``s3`` and ``gcs`` (one backend each);
this module opens a store from a URL and re-exports the public names of all of them. Tests that tune a
constant patch it where it is used, e.g. ``workloads.storage.s3.S3_MULTIPART_THRESHOLD``.
"""

from __future__ import annotations

import os
import re

from workloads.errors import StorageError, StorageNotFound
from workloads.storage.base import (
    CLIENT_ENV,
    COPY_CHUNK_BYTES,
    PROBE_CONNECT_TIMEOUT_S,
    PROBE_PREFIX,
    PROBE_READ_TIMEOUT_S,
    TEMP_PREFIX,
    Store,
    cached_client,
    copy_stream,
    fsync_dir,
    is_hidden,
    join_key,
    local_errors,
    write_local_atomic,
)
from workloads.storage.file import FileStore
from workloads.storage.gcs import (
    GCS_CHUNK_SIZE,
    GCS_TIMEOUT_S,
    PROBE_DEADLINE_S,
    GcsStore,
    describe_gcs_error,
    is_gcs_error,
    make_gcs_client,
)
from workloads.storage.s3 import (
    PROBE_MAX_ATTEMPTS,
    S3_CONNECT_TIMEOUT_S,
    S3_DELETE_BATCH,
    S3_MAX_ATTEMPTS,
    S3_MULTIPART_CHUNKSIZE,
    S3_MULTIPART_THRESHOLD,
    S3_READ_TIMEOUT_S,
    S3Store,
    describe_s3_error,
    is_s3_error,
    make_s3_client,
    s3_error_code,
    unwrap_s3_error,
)

VALID_SCHEMES = "file:///abs/dir (or a plain path), s3://bucket/prefix, gs://bucket/prefix"
HTTP_TIMEOUT_S = 30  # read_url over http(s): a slow mirror answers within this, a dead one fails visibly
# S3 and GCS bucket names: 3-63 chars (222 for dotted GCS names) of [a-z0-9._-] (AWS and GCS naming rules).
BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{1,221}[a-z0-9]$")


def open_store(url: str) -> Store:
    """Open the store rooted at ``url``; a bad URL raises StorageError naming it and the valid schemes."""
    if not isinstance(url, str) or not url.strip():
        raise bad_url(url, "is empty")
    scheme, sep, rest = url.partition("://")
    if not sep:
        return FileStore("", os.path.abspath(os.path.expanduser(url)))
    scheme = scheme.lower()
    if scheme == "file":
        host, slash, path = rest.partition("/")
        if host not in ("", "localhost") or not slash:
            raise bad_url(url, "needs an absolute path")
        return FileStore("", path)
    if scheme in ("s3", "gs"):
        bucket, _, prefix = rest.partition("/")
        if not BUCKET_RE.match(bucket):
            raise bad_url(url, f"has an invalid bucket name {bucket!r}")
        return (S3Store if scheme == "s3" else GcsStore)(bucket, prefix)
    raise bad_url(url, f"has unsupported scheme {scheme!r}")


def bad_url(url: object, why: str) -> StorageError:
    return StorageError(f"storage URL {url!r} {why}; use {VALID_SCHEMES}")


def read_url(url: str) -> bytes:
    """Read one object or file at any storage URL, or over http(s)."""
    if url.lower().startswith(("http://", "https://")):
        return read_http(url)
    parent, name = split_url(url)
    return parent.read_bytes(name)


def list_url(url: str) -> list[str]:
    """Full URLs of the objects/files under ``url`` (recursive, sorted); a single file gives [url]."""
    if url.lower().startswith(("http://", "https://")):
        return [url]
    store = open_store(url)
    keys = store.list()
    if keys:
        return [store.url_of(key) for key in keys]
    if store.prefix:
        parent, name = split_url(url)
        if parent.exists(name):
            return [parent.url_of(name)]
    raise StorageNotFound(f"{store.url}: no files or objects there")


def split_url(url: str) -> tuple[Store, str]:
    """The store of the directory/prefix holding ``url``, and the object's name in it."""
    store = open_store(url)
    parent, _, name = store.prefix.rpartition("/")
    if not name:
        raise StorageError(f"{store.url}: names a bucket or root directory, not a file or object")
    return store.rerooted(parent), name


def read_http(url: str) -> bytes:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as response:
            return response.read()
    except urllib.error.HTTPError as exc:
        kind = StorageNotFound if exc.code in (404, 410) else StorageError
        raise kind(f"{url}: HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise StorageError(f"{url}: cannot read: {reason}") from exc


__all__ = [
    "BUCKET_RE", "CLIENT_ENV", "COPY_CHUNK_BYTES", "GCS_CHUNK_SIZE", "GCS_TIMEOUT_S", "HTTP_TIMEOUT_S",
    "PROBE_CONNECT_TIMEOUT_S", "PROBE_DEADLINE_S", "PROBE_MAX_ATTEMPTS", "PROBE_PREFIX", "PROBE_READ_TIMEOUT_S",
    "S3_CONNECT_TIMEOUT_S", "S3_DELETE_BATCH", "S3_MAX_ATTEMPTS", "S3_MULTIPART_CHUNKSIZE", "S3_MULTIPART_THRESHOLD",
    "S3_READ_TIMEOUT_S", "TEMP_PREFIX", "VALID_SCHEMES",
    "FileStore", "GcsStore", "S3Store", "Store", "StorageError", "StorageNotFound",
    "bad_url", "cached_client", "copy_stream", "describe_gcs_error", "describe_s3_error", "fsync_dir",
    "is_gcs_error", "is_hidden", "is_s3_error", "join_key", "list_url", "local_errors", "make_gcs_client",
    "make_s3_client", "open_store", "read_http", "read_url", "s3_error_code", "split_url", "unwrap_s3_error",
    "write_local_atomic",
]  # fmt: skip
