"""Storage addressed by URL: ``file:///dir`` (or a plain path), ``s3://bucket/prefix``, ``gs://bucket/prefix``.

    store = open_store("s3://my-bucket/gpuforge").child("runs", run_id)
    store.write_bytes("step-100/model.pt", data)      # atomic: readers see the old object or the new one
    store.list("step-100")                             # ["step-100/model.pt"]

Writes never leave half an object behind: files go to a temp name in the same directory, are fsynced
and renamed; S3 and GCS objects appear only when their single put (or multipart / resumable upload)
completes. boto3 and google-cloud-storage are imported only when an s3:// or gs:// URL is used.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from workloads.errors import StorageError, StorageNotFound

logger = logging.getLogger(__name__)

VALID_SCHEMES = "file:///abs/dir (or a plain path), s3://bucket/prefix, gs://bucket/prefix"
TEMP_PREFIX = ".gpuforge-tmp-"  # in-flight local writes; never listed
PROBE_PREFIX = ".gpuforge-probe-"  # check_access write probes; never listed
COPY_CHUNK_BYTES = 1 << 20  # 1 MiB: streaming copies never hold a whole file in memory
HTTP_TIMEOUT_S = 30  # read_url over http(s): a slow mirror answers within this, a dead one fails visibly
# S3 and GCS bucket names: 3-63 chars (222 for dotted GCS names) of [a-z0-9._-] (AWS and GCS naming rules).
BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{1,221}[a-z0-9]$")

# botocore's defaults are 60 s connect/read and 3 attempts ("standard" retry mode docs).
S3_CONNECT_TIMEOUT_S = 10
S3_READ_TIMEOUT_S = 60
S3_MAX_ATTEMPTS = 5  # a long run should ride out a brief S3 throttle (SlowDown) rather than lose a checkpoint
# check_access must answer in seconds when the endpoint or bucket is wrong.
PROBE_CONNECT_TIMEOUT_S = 3
PROBE_READ_TIMEOUT_S = 5
PROBE_MAX_ATTEMPTS = 2
PROBE_DEADLINE_S = 5.0  # GCS: total retry time for a probe call
# S3 parts are 5 MiB..5 GiB, at most 10,000 per upload (S3 multipart limits): 64 MiB parts reach 640 GiB.
S3_MULTIPART_THRESHOLD = 64 << 20
S3_MULTIPART_CHUNKSIZE = 64 << 20
S3_DELETE_BATCH = 1000  # DeleteObjects takes at most 1,000 keys (S3 API reference)
# Resumable upload chunk; must be a multiple of 256 KiB (google-cloud-storage Blob.chunk_size).
GCS_CHUNK_SIZE = 32 << 20
GCS_TIMEOUT_S = 60  # google-cloud-storage's own default per request


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


def join_key(*parts: str) -> str:
    """Join "/"-separated key parts, dropping empty pieces; '..' is refused so a key cannot escape its root."""
    pieces: list[str] = []
    for part in parts:
        for piece in str(part).split("/"):
            if piece == "..":
                raise StorageError(f"storage key {part!r} must not contain '..'")
            if piece not in ("", "."):
                pieces.append(piece)
    return "/".join(pieces)


def is_hidden(key: str) -> bool:
    """Temp files of in-flight writes and access probes, which list() never returns."""
    name = key.rpartition("/")[2]
    return name.startswith((TEMP_PREFIX, PROBE_PREFIX)) or key.endswith("/")


def write_local_atomic(path: Path, fill: Callable[[IO[bytes]], Any]) -> None:
    """Write a local file through ``fill`` to a temp in the same directory, fsync, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f"{TEMP_PREFIX}{uuid.uuid4().hex}-{path.name}"[:255]
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # umask applies, as for a plain open()
    try:
        with os.fdopen(fd, "wb") as handle:
            fill(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Persist a rename: fsync the directory entry (a no-op where directories cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def local_errors(url: str, action: str) -> Iterator[None]:
    """Local-disk failures around a cloud transfer (disk full, unreadable source) as one StorageError line."""
    try:
        yield
    except OSError as exc:
        raise StorageError(f"{url}: cannot {action}: {exc.strerror or exc}") from exc


def copy_stream(source: Path) -> Callable[[IO[bytes]], None]:
    def fill(target: IO[bytes]) -> None:
        with open(source, "rb") as handle:
            shutil.copyfileobj(handle, target, COPY_CHUNK_BYTES)

    return fill


class Store:
    """A place for objects, rooted at a URL; keys are "/"-separated and relative to the root."""

    scheme = ""

    def __init__(self, base: str, prefix: str = ""):
        self.base = base  # the bucket; "" for files
        self.prefix = join_key(prefix)  # the root inside the bucket, or the absolute path without its leading "/"
        self.url = self._url_for(self.prefix)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    def child(self, *parts: str) -> Store:
        """A store rooted deeper, e.g. ``store.child("runs", run_id)``."""
        return self.rerooted(join_key(self.prefix, *parts))

    def rerooted(self, prefix: str) -> Store:
        return type(self)(self.base, prefix)

    def url_of(self, key: str = "") -> str:
        return self._url_for(self._full(key))

    def read_bytes(self, key: str) -> bytes:
        """The object's bytes; StorageNotFound when it does not exist."""
        with self._errors("read", key):
            return self._read(self._full(key, required=True))

    def write_bytes(self, key: str, data: bytes) -> None:
        """Write atomically: readers see the previous object or this one, never a part."""
        with self._errors("write", key):
            self._write(self._full(key, required=True), data)
        logger.debug("wrote %d bytes to %s", len(data), self.url_of(key))

    def upload_file(self, key: str, path: Path) -> None:
        """Copy a local file to ``key`` atomically, streaming it."""
        path = Path(path)
        if not path.is_file():
            raise StorageError(f"cannot upload {path} to {self.url_of(key)}: not a file")
        with local_errors(self.url_of(key), f"upload {path}"), self._errors("upload to", key):
            self._upload(self._full(key, required=True), path)
        logger.debug("uploaded %s to %s", path, self.url_of(key))

    def download_file(self, key: str, path: Path) -> None:
        """Copy ``key`` to a local file, through a temp that is renamed only when complete."""
        full = self._full(key, required=True)
        with local_errors(self.url_of(key), f"download to {path}"), self._errors("download", key):
            write_local_atomic(Path(path), lambda handle: self._download(full, handle))

    def exists(self, key: str) -> bool:
        with self._errors("check", key):
            return self._exists(self._full(key, required=True))

    def list(self, prefix: str = "") -> list[str]:
        """Keys under ``prefix``/ (recursive, sorted), relative to the root; no directories or temp files."""
        full = self._full(prefix)
        with self._errors("list", prefix):
            found = [key for key in self._list(f"{full}/" if full else "") if not is_hidden(key)]
        return sorted(key[len(self.prefix) + 1 :] if self.prefix else key for key in found)

    def delete(self, key: str) -> None:
        """Delete one object; a missing one is fine."""
        with self._errors("delete", key):
            self._delete_many([self._full(key, required=True)])

    def delete_prefix(self, prefix: str) -> int:
        """Delete everything under ``prefix``/ and return how many objects went."""
        if not join_key(prefix):
            raise StorageError(f"{self.url}: delete_prefix needs a non-empty prefix (refusing to empty the root)")
        keys = [join_key(self.prefix, key) for key in self.list(prefix)]
        with self._errors("delete", prefix):
            self._delete_many(keys)
        return len(keys)

    def local_path(self, key: str = "") -> Path | None:
        """A real filesystem path for file:// stores, else None."""
        return None

    def check_access(self, write: bool = True) -> None:
        """Probe: list, and when ``write``, put and delete a small object. Failures raise one clear StorageError."""
        self._run_probe("list", self._probe_list)
        if write:
            probe = self._full(f"{PROBE_PREFIX}{uuid.uuid4().hex}")
            self._run_probe("write", lambda: self._probe_write(probe))

    def _run_probe(self, action: str, probe: Callable[[], None]) -> None:
        try:
            probe()
        except StorageError:
            raise
        except Exception as exc:
            if not self._is_sdk_error(exc):
                raise
            raise StorageError(f"{self.url}: cannot {action}: {self._describe(exc)}") from exc

    # --- helpers shared by the backends -------------------------------------------------------
    def _full(self, key: str, required: bool = False) -> str:
        full = join_key(self.prefix, key)
        if required and not join_key(key):
            raise StorageError(f"{self.url}: an object key is required, got {key!r}")
        return full

    @contextlib.contextmanager
    def _errors(self, action: str, key: str) -> Iterator[None]:
        try:
            yield
        except StorageError:
            raise
        except Exception as exc:
            if not self._is_sdk_error(exc):
                raise
            kind = StorageNotFound if self._is_not_found(exc) else StorageError
            raise kind(f"{self.url_of(key)}: cannot {action}: {self._describe(exc)}") from exc

    def _is_sdk_error(self, exc: Exception) -> bool:
        return isinstance(exc, OSError)

    def _is_not_found(self, exc: Exception) -> bool:
        return isinstance(exc, FileNotFoundError)

    def _describe(self, exc: Exception) -> str:
        return str(exc)

    # --- what each backend provides; full keys include the store's prefix -------------------
    def _url_for(self, full: str) -> str:
        raise NotImplementedError

    def _read(self, full: str) -> bytes:
        raise NotImplementedError

    def _write(self, full: str, data: bytes) -> None:
        raise NotImplementedError

    def _upload(self, full: str, path: Path) -> None:
        raise NotImplementedError

    def _download(self, full: str, handle: IO[bytes]) -> None:
        raise NotImplementedError

    def _exists(self, full: str) -> bool:
        raise NotImplementedError

    def _list(self, full_prefix: str) -> Iterable[str]:
        raise NotImplementedError

    def _delete_many(self, fulls: list[str]) -> None:
        raise NotImplementedError

    def _probe_list(self) -> None:
        raise NotImplementedError

    def _probe_write(self, full: str) -> None:
        raise NotImplementedError


class FileStore(Store):
    """A directory, e.g. one every local node sees (as NFS would be)."""

    scheme = "file"

    def _url_for(self, full: str) -> str:
        return f"file:///{full}"

    def local_path(self, key: str = "") -> Path | None:
        return Path("/" + self._full(key))

    def _path(self, full: str) -> Path:
        return Path("/" + full)

    def _describe(self, exc: Exception) -> str:
        if isinstance(exc, OSError) and exc.strerror:
            return f"{exc.strerror} ({exc.filename})" if exc.filename else exc.strerror
        return str(exc)

    def _is_not_found(self, exc: Exception) -> bool:
        return isinstance(exc, (FileNotFoundError, IsADirectoryError))

    def _read(self, full: str) -> bytes:
        return self._path(full).read_bytes()

    def _write(self, full: str, data: bytes) -> None:
        write_local_atomic(self._path(full), lambda handle: handle.write(data))

    def _upload(self, full: str, path: Path) -> None:
        write_local_atomic(self._path(full), copy_stream(path))

    def _download(self, full: str, handle: IO[bytes]) -> None:
        copy_stream(self._path(full))(handle)

    def _exists(self, full: str) -> bool:
        return self._path(full).is_file()

    def _list(self, full_prefix: str) -> Iterable[str]:
        root = self._path(full_prefix)
        if not root.is_dir():
            return
        for dirpath, _, filenames in os.walk(root, onerror=self._raise):
            rel = Path(dirpath).relative_to("/").as_posix()
            yield from (f"{rel}/{name}" for name in filenames)

    @staticmethod
    def _raise(exc: OSError) -> None:
        raise exc

    def _delete_many(self, fulls: list[str]) -> None:
        for full in fulls:
            with contextlib.suppress(FileNotFoundError):
                self._path(full).unlink()

    def delete_prefix(self, prefix: str) -> int:
        count = super().delete_prefix(prefix)
        root = self._path(self._full(prefix))
        with self._errors("delete", prefix):
            if root.is_dir():  # also the emptied directories and any temp left by a crashed writer
                shutil.rmtree(root)
        return count

    def _probe_list(self) -> None:
        os.listdir(self._path(self.prefix))

    def _probe_write(self, full: str) -> None:
        self._write(full, b"gpuforge access probe")
        self._path(full).unlink()

    def check_access(self, write: bool = True) -> None:
        if write:
            try:
                self._path(self.prefix).mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StorageError(f"{self.url}: cannot create directory: {self._describe(exc)}") from exc
        super().check_access(write)


# Settings that change which endpoint, account or credentials a client uses; a change makes a new client.
CLIENT_ENV = (
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE",
    "AWS_ACCESS_KEY_ID", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE",
    "STORAGE_EMULATOR_HOST", "GOOGLE_CLOUD_PROJECT", "GOOGLE_APPLICATION_CREDENTIALS",
)  # fmt: skip
_clients: dict[tuple[str | int | None, ...], Any] = {}


def cached_client(kind: str, make: Callable[[], Any]) -> Any:
    """One SDK client per kind, process and environment: creating an S3 client costs ~60 ms, and a client
    must not cross a fork (its connection pool would be shared with the child)."""
    key = (kind, os.getpid(), *(os.environ.get(name) for name in CLIENT_ENV))
    if key not in _clients:
        _clients[key] = make()
    return _clients[key]


class S3Store(Store):
    """An S3 bucket (or S3-compatible endpoint via AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3)."""

    scheme = "s3"

    def _url_for(self, full: str) -> str:
        return f"s3://{self.base}/{full}" if full else f"s3://{self.base}"

    def _client(self, probe: bool = False) -> Any:
        return cached_client("s3-probe" if probe else "s3", lambda: make_s3_client(probe))

    def _transfer_config(self) -> Any:
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(multipart_threshold=S3_MULTIPART_THRESHOLD, multipart_chunksize=S3_MULTIPART_CHUNKSIZE)

    def _is_sdk_error(self, exc: Exception) -> bool:
        return is_s3_error(exc)

    def _is_not_found(self, exc: Exception) -> bool:
        return s3_error_code(exc) in ("NoSuchKey", "404", "NotFound")

    def _describe(self, exc: Exception) -> str:
        return describe_s3_error(exc, self.base)

    def _read(self, full: str) -> bytes:
        return self._client().get_object(Bucket=self.base, Key=full)["Body"].read()

    def _write(self, full: str, data: bytes) -> None:
        import io

        self._client().upload_fileobj(io.BytesIO(data), self.base, full, Config=self._transfer_config())

    def _upload(self, full: str, path: Path) -> None:
        # One put below the threshold, else multipart: the object appears only at CompleteMultipartUpload,
        # and s3transfer aborts the upload on failure. Given a filename, s3transfer reads each part from
        # disk as it sends it, so memory stays bounded.
        self._client().upload_file(str(path), self.base, full, Config=self._transfer_config())

    def _download(self, full: str, handle: IO[bytes]) -> None:
        self._client().download_fileobj(self.base, full, handle, Config=self._transfer_config())

    def _exists(self, full: str) -> bool:
        try:
            self._client().head_object(Bucket=self.base, Key=full)
        except Exception as exc:
            if s3_error_code(exc) in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
        return True

    def _list(self, full_prefix: str) -> Iterable[str]:
        pages = self._client().get_paginator("list_objects_v2").paginate(Bucket=self.base, Prefix=full_prefix)
        for page in pages:
            yield from (item["Key"] for item in page.get("Contents", []))

    def _delete_many(self, fulls: list[str]) -> None:
        for start in range(0, len(fulls), S3_DELETE_BATCH):
            batch = [{"Key": key} for key in fulls[start : start + S3_DELETE_BATCH]]
            reply = self._client().delete_objects(Bucket=self.base, Delete={"Objects": batch, "Quiet": True})
            if reply.get("Errors"):
                first = reply["Errors"][0]
                raise StorageError(
                    f"{self._url_for(first.get('Key', ''))}: cannot delete: {first.get('Code')}: {first.get('Message')}"
                    f" ({len(reply['Errors'])} of {len(batch)} keys failed)"
                )

    def _probe_list(self) -> None:
        self._client(probe=True).list_objects_v2(Bucket=self.base, Prefix=self.prefix, MaxKeys=1)

    def _probe_write(self, full: str) -> None:
        client = self._client(probe=True)
        client.put_object(Bucket=self.base, Key=full, Body=b"gpuforge access probe")
        client.delete_object(Bucket=self.base, Key=full)


def make_s3_client(probe: bool = False) -> Any:
    """An S3 client with bounded timeouts and retries; endpoint and credentials come from the environment."""
    import boto3
    from botocore.config import Config

    config = Config(
        connect_timeout=PROBE_CONNECT_TIMEOUT_S if probe else S3_CONNECT_TIMEOUT_S,
        read_timeout=PROBE_READ_TIMEOUT_S if probe else S3_READ_TIMEOUT_S,
        retries={"max_attempts": PROBE_MAX_ATTEMPTS if probe else S3_MAX_ATTEMPTS, "mode": "standard"},
    )
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None
    return boto3.session.Session().client("s3", region_name=region, config=config)


def is_s3_error(exc: Exception) -> bool:
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError
    from s3transfer.exceptions import RetriesExceededError, S3UploadFailedError

    return isinstance(exc, (ClientError, BotoCoreError, Boto3Error, RetriesExceededError, S3UploadFailedError))


def unwrap_s3_error(exc: Exception) -> Exception:
    """boto3's upload_file turns a ClientError into S3UploadFailedError (a string); the original is its context."""
    from boto3.exceptions import S3UploadFailedError

    if isinstance(exc, S3UploadFailedError) and isinstance(exc.__context__, Exception):
        return exc.__context__
    return exc


def s3_error_code(exc: Exception) -> str:
    exc = unwrap_s3_error(exc)
    response = getattr(exc, "response", None)
    return str(response.get("Error", {}).get("Code", "")) if isinstance(response, dict) else ""


def describe_s3_error(exc: Exception, bucket: str) -> str:
    from botocore.exceptions import EndpointConnectionError, NoCredentialsError

    exc = unwrap_s3_error(exc)
    code = s3_error_code(exc)
    if code == "NoSuchBucket":
        return f"bucket {bucket!r} does not exist (NoSuchBucket)"
    if code in ("AccessDenied", "403", "Forbidden", "AllAccessDisabled"):
        return f"access denied to bucket {bucket!r} ({code}); check the credentials' IAM policy"
    if code in ("404", "NoSuchKey", "NotFound"):
        return "no such object"
    if code:
        message = exc.response.get("Error", {}).get("Message", "")  # type: ignore[attr-defined]
        return f"{code}: {message}".rstrip(": ")
    if isinstance(exc, EndpointConnectionError):
        return f"endpoint unreachable: {exc}"
    if isinstance(exc, NoCredentialsError):
        return "no AWS credentials found (set AWS_PROFILE, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
    return f"{type(exc).__name__}: {exc}"


class GcsStore(Store):
    """A Google Cloud Storage bucket (or an emulator named by STORAGE_EMULATOR_HOST)."""

    scheme = "gs"

    def _url_for(self, full: str) -> str:
        return f"gs://{self.base}/{full}" if full else f"gs://{self.base}"

    def _bucket(self) -> Any:
        return cached_client("gcs", make_gcs_client).bucket(self.base)

    def _blob(self, full: str) -> Any:
        return self._bucket().blob(full, chunk_size=GCS_CHUNK_SIZE)

    def _is_sdk_error(self, exc: Exception) -> bool:
        return is_gcs_error(exc)

    def _is_not_found(self, exc: Exception) -> bool:
        from google.api_core.exceptions import NotFound

        return isinstance(exc, NotFound)

    def _describe(self, exc: Exception) -> str:
        return describe_gcs_error(exc, self.base)

    def _read(self, full: str) -> bytes:
        return self._blob(full).download_as_bytes(timeout=GCS_TIMEOUT_S)

    def _write(self, full: str, data: bytes) -> None:
        # One request up to 8 MiB, else a resumable upload; either way the object appears only when complete.
        self._blob(full).upload_from_string(data, content_type="application/octet-stream", timeout=GCS_TIMEOUT_S)

    def _upload(self, full: str, path: Path) -> None:
        self._blob(full).upload_from_filename(str(path), timeout=GCS_TIMEOUT_S)

    def _download(self, full: str, handle: IO[bytes]) -> None:
        self._blob(full).download_to_file(handle, timeout=GCS_TIMEOUT_S)

    def _exists(self, full: str) -> bool:
        return self._blob(full).exists(timeout=GCS_TIMEOUT_S)

    def _list(self, full_prefix: str) -> Iterable[str]:
        blobs = self._bucket().list_blobs(prefix=full_prefix or None, timeout=GCS_TIMEOUT_S)
        yield from (blob.name for blob in blobs)

    def _delete_many(self, fulls: list[str]) -> None:
        from google.api_core.exceptions import NotFound

        for full in fulls:
            with contextlib.suppress(NotFound):
                self._blob(full).delete(timeout=GCS_TIMEOUT_S)

    def _probe_args(self) -> dict[str, Any]:
        from google.cloud.storage.retry import DEFAULT_RETRY

        timeout = (PROBE_CONNECT_TIMEOUT_S, PROBE_READ_TIMEOUT_S)
        return {"timeout": timeout, "retry": DEFAULT_RETRY.with_timeout(PROBE_DEADLINE_S)}

    def _probe_list(self) -> None:
        from google.api_core.exceptions import NotFound

        try:
            list(self._bucket().list_blobs(prefix=self.prefix or None, max_results=1, **self._probe_args()))
        except NotFound as exc:
            raise StorageError(f"{self.url}: cannot list: bucket {self.base!r} does not exist (404)") from exc

    def _probe_write(self, full: str) -> None:
        blob = self._blob(full)
        blob.upload_from_string(b"gpuforge access probe", **self._probe_args())
        blob.delete(**self._probe_args())


def make_gcs_client() -> Any:
    """A GCS client: anonymous against an emulator (no credential lookup), else Application Default Credentials."""
    from google.cloud import storage

    if os.environ.get("STORAGE_EMULATOR_HOST"):
        from google.auth.credentials import AnonymousCredentials

        project = os.environ.get("GOOGLE_CLOUD_PROJECT") or "test"
        return storage.Client(project=project, credentials=AnonymousCredentials())
    return storage.Client()


def is_gcs_error(exc: Exception) -> bool:
    import requests
    from google.api_core.exceptions import GoogleAPIError
    from google.auth.exceptions import GoogleAuthError

    try:
        from google.cloud.storage.exceptions import DataCorruption, InvalidResponse
    except ImportError:  # google-cloud-storage < 3 raises google-resumable-media's own types
        from google.resumable_media.common import DataCorruption, InvalidResponse

    errors = (GoogleAPIError, GoogleAuthError, requests.RequestException, InvalidResponse, DataCorruption)
    return isinstance(exc, errors)


def describe_gcs_error(exc: Exception, bucket: str) -> str:
    import requests
    from google.api_core.exceptions import Forbidden, NotFound, RetryError, Unauthorized
    from google.auth.exceptions import DefaultCredentialsError

    if isinstance(exc, RetryError) and exc.cause is not None:
        exc = exc.cause
    if isinstance(exc, NotFound):
        return f"no such object, or bucket {bucket!r} does not exist (404)"
    if isinstance(exc, (Forbidden, Unauthorized)):
        return f"access denied to bucket {bucket!r} ({exc.code} {exc.message})"
    if isinstance(exc, requests.ConnectionError):
        return f"endpoint unreachable: {exc}"
    if isinstance(exc, DefaultCredentialsError):
        return "no Google credentials found (run `gcloud auth application-default login` or set GOOGLE_APPLICATION_CREDENTIALS)"
    return f"{type(exc).__name__}: {exc}"
