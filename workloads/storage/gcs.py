"""``gs://bucket/prefix`` stores; google-cloud-storage is imported only when one is used."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

from workloads.errors import StorageError
from workloads.storage.base import PROBE_CONNECT_TIMEOUT_S, PROBE_READ_TIMEOUT_S, Store, cached_client

PROBE_DEADLINE_S = 5.0  # GCS: total retry time for a probe call
# Resumable upload chunk; must be a multiple of 256 KiB (google-cloud-storage Blob.chunk_size).
GCS_CHUNK_SIZE = 32 << 20
GCS_TIMEOUT_S = 60  # google-cloud-storage's own default per request


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
