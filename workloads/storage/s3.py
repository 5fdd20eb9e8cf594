"""``s3://bucket/prefix`` stores; boto3 is imported only when one is used."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

from workloads.errors import StorageError
from workloads.storage.base import PROBE_CONNECT_TIMEOUT_S, PROBE_READ_TIMEOUT_S, Store, cached_client

# botocore's defaults are 60 s connect/read and 3 attempts ("standard" retry mode docs).
S3_CONNECT_TIMEOUT_S = 10
S3_READ_TIMEOUT_S = 60
S3_MAX_ATTEMPTS = 5  # a long run should ride out a brief S3 throttle (SlowDown) rather than lose a checkpoint
PROBE_MAX_ATTEMPTS = 2  # check_access must answer in seconds when the endpoint or bucket is wrong
# S3 parts are 5 MiB..5 GiB, at most 10,000 per upload (S3 multipart limits): 64 MiB parts reach 640 GiB.
S3_MULTIPART_THRESHOLD = 64 << 20
S3_MULTIPART_CHUNKSIZE = 64 << 20
S3_DELETE_BATCH = 1000  # DeleteObjects takes at most 1,000 keys (S3 API reference)


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

