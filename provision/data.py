"""The data policy, one rule for every cluster: `down` keeps the user's data and says where and how much;
`down --delete-data` deletes it (every version of every object) after a confirmation that names it and its size,
which `--yes` skips. An empty bucket or folder holds nothing to keep, so it goes with the cluster.

    kept = measure_folder(path) / measure_bucket(leftover)     # KeptData: where, how much
    confirm_deletion(console, [kept], yes)                     # refuses without a "y" (or --yes)
    delete_kept(kept)                                          # the bucket (versions included) or the folder
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from provision.errors import ProvisionError
from provision.registry import KeptData, human_bytes


def measure_folder(path: Path) -> KeptData:
    files = [p for p in Path(path).rglob("*") if p.is_file()]
    return KeptData(url=Path(path).resolve().as_uri(), cloud="local", objects=len(files),
                    bytes=sum(p.stat().st_size for p in files))


def kept_from_leftover(lo: Any, project: str = "") -> KeptData:
    """KeptData of a bucket leftover (its detail is "N object version(s), B bytes" or "empty")."""
    objects = size = 0
    if lo.detail != "empty":
        parts = lo.detail.replace(",", "").split()
        objects, size = int(parts[0]), int(parts[3])
    scheme = "s3" if lo.cloud == "aws" else "gs"
    return KeptData(url=f"{scheme}://{lo.id}", cloud=lo.cloud, region=lo.region, project=project, objects=objects,
                    bytes=size)


def measure(kept: KeptData) -> KeptData:
    """The data as it is now (it may have changed since `down` kept it); objects=0 when it is gone."""
    from dataclasses import replace

    if kept.cloud == "local":
        path = Path(kept.url.removeprefix("file://"))
        return measure_folder(path) if path.exists() else replace(kept, objects=0, bytes=0)
    from botocore.exceptions import ClientError

    name = kept.url.split("://", 1)[1]
    try:
        if kept.cloud == "aws":
            import boto3

            from infra.sweep.aws import bucket_content

            objects, size = bucket_content(boto3.Session(region_name=kept.region).client("s3"), name)
        else:
            from infra.sweep.gcp import gcs_content, storage_client

            objects, size = gcs_content(storage_client(kept.project, None, None), name)
    except ClientError as exc:
        if exc.response["Error"]["Code"] == "NoSuchBucket":
            return replace(kept, objects=0, bytes=0)
        raise
    except Exception as exc:  # noqa: BLE001 - google's NotFound
        if type(exc).__name__ == "NotFound":
            return replace(kept, objects=0, bytes=0)
        raise
    return replace(kept, objects=objects, bytes=size)


def confirm_deletion(console: Any, items: list[KeptData], yes: bool) -> None:
    """Ask before deleting data: the question names every bucket/folder and its size."""
    if not items or yes:
        return
    lines = "\n".join(f"  {d.describe()}" for d in items)
    console.print(f"this deletes, for good (every version of every object):\n{lines}")
    try:
        answer = console.input("delete it? \\[y/N] ")
    except EOFError:
        answer = ""
    if not answer.strip().lower().startswith("y"):
        raise ProvisionError("not confirmed; nothing deleted (pass --yes to delete without asking)")


def delete_kept(kept: KeptData) -> None:
    if kept.cloud == "local":
        shutil.rmtree(Path(kept.url.removeprefix("file://")), ignore_errors=False)
        return
    from infra.sweep import Leftover, purge_leftovers

    name = kept.url.split("://", 1)[1]
    lo = Leftover(kept.cloud, "bucket", name, name, kept.region)
    (_, error), = purge_leftovers([lo], project=kept.project)
    if error:
        raise ProvisionError(f"deleting {kept.url} failed: {error}")


def summary(items: list[KeptData]) -> str:
    total = sum(d.bytes for d in items)
    return ", ".join(d.describe() for d in items) + (f"; {human_bytes(total)} in all" if len(items) > 1 else "")
