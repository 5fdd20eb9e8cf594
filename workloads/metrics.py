"""Metrics: `metrics.jsonl` and TensorBoard event files in the run folder, a progress line on rank 0.

Object stores cannot append, so both are written to a local folder (the run folder itself for
`file://` storage) and uploaded whole at each flush.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from workloads.storage import Store

logger = logging.getLogger(__name__)

PROGRESS_FILE = "progress.json"  # in GPUFORGE_RUN_DIR on the node: what `fab status` shows per node


class MetricsLogger:
    def __init__(self, store: Store, tensorboard: bool = True, total_steps: int = 0):
        self.store, self.total_steps = store, total_steps
        local = store.local_path()
        self.local_dir = local if local is not None else Path(tempfile.mkdtemp(prefix="gpuforge-metrics-"))
        self.local_dir.mkdir(parents=True, exist_ok=True)
        self.synced = local is not None
        self.path = self.local_dir / "metrics.jsonl"
        if not self.synced and store.exists("metrics.jsonl"):
            store.download_file("metrics.jsonl", self.path)  # a resumed run continues the file
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.local_dir / "tb"))
        self.run_dir = os.environ.get("GPUFORGE_RUN_DIR")
        self.console = None
        self.started = time.monotonic()

    def truncate_after(self, step: int) -> None:
        """Drop records past `step`: a resumed run re-does them, so they must not appear twice."""
        if not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in keep))

    def log(self, step: int, values: dict[str, Any], kind: str = "train") -> None:
        record = {"step": step, "kind": kind, "time": round(time.time(), 3), **values}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{kind}/{key}", value, step)
        if self.run_dir and kind == "train":
            write_progress(Path(self.run_dir), {"step": step, "total_steps": self.total_steps, "kind": kind, **values})

    def print(self, step: int, values: dict[str, Any]) -> None:
        """One progress line: rich on a terminal, plain text in a log file (rank 0 only)."""
        text = f"step {step}/{self.total_steps} " + " ".join(format_metric(k, v) for k, v in values.items())
        if sys.stdout.isatty():
            if self.console is None:
                from rich.console import Console

                self.console = Console()
            self.console.print(f"[bold cyan]step {step}[/]/{self.total_steps} " + text.split(" ", 2)[-1])
        else:
            print(text, flush=True)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()
        if self.synced:
            return
        if self.path.exists():
            self.store.upload_file("metrics.jsonl", self.path)
        for path in sorted((self.local_dir / "tb").glob("**/*")) if self.writer is not None else []:
            if path.is_file():
                self.store.upload_file("tb/" + path.relative_to(self.local_dir / "tb").as_posix(), path)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
        self.flush()


def format_metric(key: str, value: Any) -> str:
    if isinstance(value, float):
        return f"{key} {value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{key} {value:.2e}"
    return f"{key} {value}"


def write_progress(run_dir: Path, values: dict[str, Any]) -> None:
    """Atomically replace the node's progress file (read by `fab status` over SSH)."""
    tmp = run_dir / (PROGRESS_FILE + ".tmp")
    try:
        tmp.write_text(json.dumps(values))
        tmp.replace(run_dir / PROGRESS_FILE)
    except OSError as exc:
        logger.debug("cannot write progress to %s: %s", run_dir, exc)
