"""Checkpoints in `<run>/step-N/`: saved in the background with PyTorch Distributed Checkpoint
(`torch.distributed.checkpoint.async_save`), the latest k kept, resumed from the newest complete one.

    ckpt = CheckpointManager(store, keep_last=3)
    ckpt.save_async(step, {"model": ..., "train_state": ...}, meta)   # returns once the state is copied
    ...                                                               # training goes on meanwhile
    ckpt.wait()                                                       # the save is complete (or raises)

What the training loop waits for is the copy of the state into host memory (DCP's staging); writing the
files, hashing them, uploading them to object storage and pruning old checkpoints happen on a background
thread. At most one save is in flight: the next one waits for it first.

DCP holds the tensors; the structure around them (optimizer settings, scheduler, counters, RNG and data
order, anything that is not a tensor) is kept as one torch.save blob inside the same checkpoint, because
DCP flattens nested containers and drops some of their leaves (a list of None, say).

A checkpoint is complete when its `manifest.json` exists and every file it lists is there; loading checks
each file's sha256 against the manifest. The manifest is written last, after every other file, so a crash
at any moment of a save (the process killed, the node gone) leaves either the complete checkpoint or a
folder without manifest that `latest()` skips and a later save prunes: a complete checkpoint or none.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import re
import shutil
import tempfile
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from workloads.errors import CheckpointError, StorageError
from workloads.storage import Store

logger = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step-(\d+)/")
MANIFEST = "manifest.json"
META = "meta.json"
FORMAT = "torch.distributed.checkpoint"  # the manifest's "format"; older checkpoints hold one torch.save file per part
# Rank 0 saves the whole (replicated) state alone, so DCP's no-process-group mode applies; it says so each time.
warnings.filterwarnings("ignore", message=r"torch\.distributed is (disabled|unavailable)", category=UserWarning)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class CheckpointManager:
    def __init__(self, store: Store, keep_last: int = 3, pin_memory: bool = False):
        self.store, self.keep_last, self.pin_memory = store, keep_last, pin_memory
        self._executor: ThreadPoolExecutor | None = None
        self._stager = None
        self._pending: Future | None = None

    # -- what exists ---------------------------------------------------------------------

    def steps(self) -> list[int]:
        """Step numbers with a checkpoint folder, complete or not, ascending."""
        found = {int(m.group(1)) for key in self.store.list() if (m := STEP_DIR.match(key))}
        return sorted(found)

    def is_complete(self, step: int) -> bool:
        prefix = f"step-{step}/"
        try:
            manifest = json.loads(self.store.read_bytes(prefix + MANIFEST))
        except (StorageError, ValueError):
            return False
        present = set(self.store.list(prefix))
        return all(prefix + name in present for name in manifest.get("files", {}))

    def latest(self) -> int | None:
        """The newest complete checkpoint's step; incomplete ones are skipped with a warning."""
        for step in reversed(self.steps()):
            if self.is_complete(step):
                return step
            logger.warning("skipping incomplete checkpoint step-%d in %s", step, self.store.url)
        return None

    # -- saving --------------------------------------------------------------------------

    def save(self, step: int, parts: dict[str, Any], meta: dict[str, Any]) -> str:
        """Save and wait until the checkpoint is complete; returns its URL."""
        self.save_async(step, parts, meta)
        return self.wait()

    def save_async(self, step: int, parts: dict[str, Any], meta: dict[str, Any]) -> None:
        """Copy the state to host memory now; write, upload and publish it in the background."""
        import torch.distributed.checkpoint as dcp

        self.wait()  # one save at a time; a failed one raises here, before anything new is written
        # DCP logs each call at DEBUG into a NullHandler: ~400 records a save, ~10 ms of the loop's time, for no one
        logging.getLogger("c10d-NullHandler-dcp_logger").setLevel(logging.WARNING)
        prefix = f"step-{step}"
        self.store.delete_prefix(prefix)  # leftovers of an earlier attempt at this step (never complete)
        local = self.store.local_path(prefix)
        folder = local if local is not None else Path(tempfile.mkdtemp(prefix="gpuforge-ckpt-"))
        folder.mkdir(parents=True, exist_ok=True)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gpuforge-checkpoint")
        written = dcp.async_save(split_tensors(parts), storage_writer=dcp.FileSystemWriter(str(folder)), no_dist=True,
                                 async_stager=self._get_stager(), process_group=checkpoint_group())
        self._pending = self._executor.submit(self._publish, step, written, folder, local is None, meta)

    def wait(self) -> str | None:
        """Block until the save in flight (if any) is complete; its URL, or CheckpointError."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        return pending.result()

    def close(self) -> None:
        """Finish the save in flight and release the staging memory and the thread."""
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
            if self._stager is not None:
                self._stager.close()
                self._stager = None

    def _get_stager(self):
        """One DCP stager for the run: it keeps its host buffers (pinned on CUDA) from one save to the next."""
        if self._stager is None:
            from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

            self._stager = DefaultStager(StagingOptions(use_pinned_memory=self.pin_memory, use_shared_memory=False,
                                                        use_async_staging=False, use_non_blocking_copy=False))
        return self._stager

    def _publish(self, step: int, written: Future, folder: Path, upload: bool, meta: dict[str, Any]) -> str:
        """Background: wait for DCP's files, hash (and upload) them, then meta, then the manifest."""
        prefix = f"step-{step}/"
        try:
            written.result()
            files: dict[str, dict] = {}
            for path in sorted(p for p in folder.iterdir() if p.is_file()):
                files[path.name] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
                if upload:
                    self.store.upload_file(prefix + path.name, path)
            meta_blob = json.dumps(meta, indent=2, default=str).encode()
            self.store.write_bytes(prefix + META, meta_blob)
            files[META] = {"bytes": len(meta_blob), "sha256": hashlib.sha256(meta_blob).hexdigest()}
            manifest = {"step": step, "format": FORMAT, "files": files}
            self.store.write_bytes(prefix + MANIFEST, json.dumps(manifest, indent=2).encode())  # last: now complete
        except Exception as exc:
            raise CheckpointError(f"checkpoint {self.store.url_of(prefix)} was not saved: {type(exc).__name__}: {exc}") from exc
        finally:
            if upload:
                shutil.rmtree(folder, ignore_errors=True)
        self.prune()
        logger.info("checkpoint %s", self.store.url_of(prefix))
        return self.store.url_of(prefix)

    # -- loading -------------------------------------------------------------------------

    def load(self, step: int, map_location: str | torch.device = "cpu") -> tuple[dict[str, Any], dict[str, Any]]:
        """Parts and meta of a complete checkpoint; a file that does not match its manifest is a CheckpointError."""
        prefix = f"step-{step}/"
        try:
            manifest = json.loads(self.store.read_bytes(prefix + MANIFEST))
        except (StorageError, ValueError) as exc:
            raise CheckpointError(f"checkpoint {self.store.url_of(prefix)} has no readable manifest") from exc
        with self._local_copy(step) as folder:
            for name, info in manifest["files"].items():
                if sha256_file(folder / name) != info["sha256"]:
                    raise CheckpointError(f"checkpoint file {self.store.url_of(prefix + name)} does not match its manifest")
            meta = json.loads((folder / META).read_text()) if META in manifest["files"] else {}
            if manifest.get("format") == FORMAT:
                parts = join_tensors(load_dcp(folder))
            else:  # written before checkpoints were DCP: one torch.save file per part
                parts = {name.removesuffix(".pt"): torch.load(folder / name, map_location="cpu", weights_only=True)
                         for name in manifest["files"] if name.endswith(".pt")}
        return move_tensors(parts, map_location), meta

    @contextlib.contextmanager
    def _local_copy(self, step: int):
        local = self.store.local_path(f"step-{step}")
        if local is not None:
            yield local
            return
        with tempfile.TemporaryDirectory(prefix="gpuforge-ckpt-") as tmp:
            for key in self.store.list(f"step-{step}"):
                self.store.download_file(key, Path(tmp) / key.rpartition("/")[2])
            yield Path(tmp)

    def prune(self) -> None:
        """Keep the newest `keep_last` complete checkpoints; drop older and abandoned partial ones."""
        steps = self.steps()
        complete = [s for s in steps if self.is_complete(s)]
        keep = set(complete[-self.keep_last:])
        newest = max(keep) if keep else -1
        for step in steps:
            if step not in keep and step < newest:
                self.store.delete_prefix(f"step-{step}")


def load_dcp(folder: Path) -> dict[str, Any]:
    """A whole DCP checkpoint as the nested dict it was saved from, without a template to load into
    (what `torch.distributed.checkpoint.format_utils.dcp_to_torch_save` does, minus the extra file)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state: dict[str, Any] = {}
    _load_state_dict(state, storage_reader=dcp.FileSystemReader(str(folder)), planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    return state


SKELETON = "skeleton"  # the DCP key of the blob with everything but the tensors
TENSOR_REF = "__dcp_tensor__"  # (TENSOR_REF, key) stands in the skeleton where a tensor was


def split_tensors(parts: dict[str, Any]) -> dict[str, Any]:
    """{"tensors/<path>": tensor, ..., "skeleton": the parts with each tensor replaced by a reference}."""
    flat: dict[str, Any] = {}

    def strip(obj: Any, path: str) -> Any:
        if isinstance(obj, torch.Tensor):
            key = f"tensors/{path}"
            flat[key] = obj
            return (TENSOR_REF, key)
        if isinstance(obj, dict):
            return {k: strip(v, f"{path}/{k}") for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            items = [strip(v, f"{path}/{i}") for i, v in enumerate(obj)]
            return items if isinstance(obj, list) else tuple(items)
        return obj

    skeleton = strip(parts, "")
    blob = io.BytesIO()
    torch.save(skeleton, blob)
    blob.seek(0)
    flat[SKELETON] = blob
    return flat


def join_tensors(flat: dict[str, Any]) -> dict[str, Any]:
    """The inverse of split_tensors."""
    blob = flat[SKELETON]
    blob.seek(0)
    skeleton = torch.load(blob, weights_only=True)

    def fill(obj: Any) -> Any:
        if isinstance(obj, tuple) and len(obj) == 2 and obj[0] == TENSOR_REF:
            return flat[obj[1]]
        if isinstance(obj, dict):
            return {k: fill(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            items = [fill(v) for v in obj]
            return items if isinstance(obj, list) else tuple(items)
        return obj

    return fill(skeleton)


def move_tensors(obj: Any, device: str | torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: move_tensors(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [move_tensors(v, device) for v in obj]
        return items if isinstance(obj, list) else tuple(items)
    return obj


def checkpoint_group():
    """DCP's async save asks for a process group with a CPU backend even when one rank saves alone
    (no_dist); a CPU run's gloo group is one, a CUDA run joins with `cpu:gloo,cuda:nccl` (runtime.py)."""
    import torch.distributed as dist

    return dist.group.WORLD if dist.is_available() and dist.is_initialized() else None
