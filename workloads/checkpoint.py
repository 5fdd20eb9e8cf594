"""Checkpoints in `<run>/step-N/`: written atomically, the latest k kept, resumed from the newest
complete one.

A checkpoint is complete when its `manifest.json` exists and every file it lists has the recorded
size and sha256. The manifest is written last, so a crash mid-save leaves an incomplete folder
that `latest()` skips (and the next save's pruning removes).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from workloads.errors import CheckpointError, StorageError
from workloads.storage import Store

logger = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step-(\d+)/")
MANIFEST = "manifest.json"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class CheckpointManager:
    def __init__(self, store: Store, keep_last: int = 3):
        self.store, self.keep_last = store, keep_last

    def steps(self) -> list[int]:
        """Step numbers with a checkpoint folder, complete or not, ascending."""
        found = {int(m.group(1)) for key in self.store.list() if (m := STEP_DIR.match(key))}
        return sorted(found)

    def is_complete(self, step: int, verify_hashes: bool = False) -> bool:
        prefix = f"step-{step}/"
        try:
            manifest = json.loads(self.store.read_bytes(prefix + MANIFEST))
        except (StorageError, ValueError):
            return False
        present = {k: k for k in self.store.list(prefix)}
        for name, meta in manifest.get("files", {}).items():
            if prefix + name not in present:
                return False
            if verify_hashes and hashlib.sha256(self.store.read_bytes(prefix + name)).hexdigest() != meta["sha256"]:
                return False
        return True

    def latest(self) -> int | None:
        """The newest complete checkpoint's step; incomplete ones are skipped with a warning."""
        for step in reversed(self.steps()):
            if self.is_complete(step):
                return step
            logger.warning("skipping incomplete checkpoint step-%d in %s", step, self.store.url)
        return None

    def save(self, step: int, parts: dict[str, Any], meta: dict[str, Any]) -> str:
        """Write each part as `<name>.pt`, then `meta.json`, then the manifest; prune old ones."""
        prefix = f"step-{step}/"
        files: dict[str, dict] = {}
        with tempfile.TemporaryDirectory(prefix="gpuforge-ckpt-") as tmp:
            for name, obj in parts.items():
                path = Path(tmp) / f"{name}.pt"
                torch.save(obj, path)
                files[path.name] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
                self.store.upload_file(prefix + path.name, path)
        meta_blob = json.dumps(meta, indent=2, default=str).encode()
        self.store.write_bytes(prefix + "meta.json", meta_blob)
        files["meta.json"] = {"bytes": len(meta_blob), "sha256": hashlib.sha256(meta_blob).hexdigest()}
        self.store.write_bytes(prefix + MANIFEST, json.dumps({"step": step, "files": files}, indent=2).encode())
        self.prune()
        return self.store.url_of(prefix)

    def load(self, step: int, map_location: str | torch.device = "cpu") -> tuple[dict[str, Any], dict[str, Any]]:
        """Parts and meta of a complete checkpoint; a hash mismatch is a CheckpointError."""
        prefix = f"step-{step}/"
        try:
            manifest = json.loads(self.store.read_bytes(prefix + MANIFEST))
        except (StorageError, ValueError) as exc:
            raise CheckpointError(f"checkpoint {self.store.url_of(prefix)} has no readable manifest") from exc
        parts: dict[str, Any] = {}
        meta: dict[str, Any] = {}
        for name, info in manifest["files"].items():
            blob = self.store.read_bytes(prefix + name)
            if hashlib.sha256(blob).hexdigest() != info["sha256"]:
                raise CheckpointError(f"checkpoint file {self.store.url_of(prefix + name)} does not match its manifest")
            if name == "meta.json":
                meta = json.loads(blob)
            else:
                parts[name.removesuffix(".pt")] = torch.load(io.BytesIO(blob), map_location=map_location, weights_only=True)
        return parts, meta

    def prune(self) -> None:
        """Keep the newest `keep_last` complete checkpoints; drop older and abandoned partial ones."""
        steps = self.steps()
        complete = [s for s in steps if self.is_complete(s)]
        keep = set(complete[-self.keep_last:])
        newest = max(keep) if keep else -1
        for step in steps:
            if step not in keep and step < newest:
                self.store.delete_prefix(f"step-{step}")
