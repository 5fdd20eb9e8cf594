"""The Store base class and what every backend shares: key joining, atomic local writes, SDK client cache.

A backend subclasses Store and fills in the ``_read`` / ``_write`` / ``_list`` ... hooks; every public
method (errors, key checks, hidden-file filtering) lives here once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from workloads.errors import StorageError, StorageNotFound

logger = logging.getLogger(__name__)

TEMP_PREFIX = ".gpuforge-tmp-"  # in-flight local writes; never listed
PROBE_PREFIX = ".gpuforge-probe-"  # check_access write probes; never listed
COPY_CHUNK_BYTES = 1 << 20  # 1 MiB: streaming copies never hold a whole file in memory
# check_access must answer in seconds when the endpoint or bucket is wrong.
PROBE_CONNECT_TIMEOUT_S = 3
PROBE_READ_TIMEOUT_S = 5


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
