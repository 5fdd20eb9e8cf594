"""``file:///dir`` stores: a directory, written through a temp file, fsync and rename."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import IO

from workloads.errors import StorageError
from workloads.storage.base import Store, copy_stream, write_local_atomic


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
