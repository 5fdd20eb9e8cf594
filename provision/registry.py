"""What this controller knows about its clusters beyond their ClusterInfo: a cloud cluster's registration (written
before the first cloud call, so `fab down NAME` works from any state) and the data a `down` kept.

    $GPUFORGE_HOME/clusters/<name>/registration.json   {"state": "creating" | "ready" | "failed", "cloud", "region",
                                                        "zone", "project", "cluster_id", "error", ...}
    $GPUFORGE_HOME/clusters/<name>/kept-data.json      [{"url": "s3://...", "cloud", "region", "project",
                                                         "objects", "bytes", "kept_at"}, ...]
"""

from __future__ import annotations

import json
import secrets
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

from provision import inventory

CREATING, READY, FAILED = "creating", "ready", "failed"
CLUSTER_ID_BYTES = 6  # 12 hex characters: a valid GCP label value and AWS tag value


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def new_cluster_id() -> str:
    return secrets.token_hex(CLUSTER_ID_BYTES)


@dataclass(frozen=True)
class Registration:
    name: str
    cloud: str
    state: str
    cluster_id: str
    region: str = ""
    zone: str = ""
    project: str = ""
    created_at: str = field(default_factory=now)
    updated_at: str = field(default_factory=now)
    error: str = ""

    def with_state(self, state: str, error: str = "", **changes: str) -> Registration:
        return replace(self, state=state, error=error, updated_at=now(), **changes)


@dataclass(frozen=True)
class KeptData:
    url: str  # s3://bucket, gs://bucket or file:///path
    cloud: str
    region: str = ""
    project: str = ""
    objects: int = 0  # object versions (buckets) or files (a folder)
    bytes: int = 0
    kept_at: str = field(default_factory=now)

    def describe(self) -> str:
        what = "file(s)" if self.url.startswith("file://") else "object version(s)"
        return f"{self.url} ({self.objects} {what}, {human_bytes(self.bytes)})"


def human_bytes(size: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size} bytes"


def _registration_path(home: Path, name: str) -> Path:
    return inventory.cluster_dir(home, name) / "registration.json"


def _data_path(home: Path, name: str) -> Path:
    return inventory.cluster_dir(home, name) / "kept-data.json"


def _write(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    tmp.replace(path)


def save(home: Path, registration: Registration) -> Registration:
    _write(_registration_path(home, registration.name), asdict(registration))
    return registration


def load(home: Path, name: str) -> Registration | None:
    path = _registration_path(home, name)
    return Registration(**json.loads(path.read_text())) if path.exists() else None


def forget(home: Path, name: str) -> None:
    _registration_path(home, name).unlink(missing_ok=True)


def kept_data(home: Path, name: str) -> list[KeptData]:
    path = _data_path(home, name)
    return [KeptData(**item) for item in json.loads(path.read_text())] if path.exists() else []


def keep_data(home: Path, name: str, items: list[KeptData]) -> None:
    """Add (or refresh, by URL) what a `down` kept."""
    known = {d.url: d for d in kept_data(home, name)}
    known.update({d.url: d for d in items})
    _write(_data_path(home, name), [asdict(d) for d in known.values()])


def drop_data(home: Path, name: str, urls: set[str]) -> None:
    left = [d for d in kept_data(home, name) if d.url not in urls]
    path = _data_path(home, name)
    if left:
        _write(path, [asdict(d) for d in left])
    else:
        path.unlink(missing_ok=True)


def registered_names(home: Path) -> list[str]:
    root = Path(home) / "clusters"
    if not root.exists():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "registration.json").exists() or (p / "kept-data.json").exists())
