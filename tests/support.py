"""Helpers shared by the integration tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
# Tiny but real: the seed ConvNet at a quarter width trains a step in ~20 ms on one core.
TINY_CONVNET = ["width=0.25", "batch_size=32", "tensorboard=false", "deterministic=true", "threads=1"]


def train_cmd(*args: str) -> list[str]:
    return [PYTHON, "-m", "workloads.train", *args]


def torchrun_cmd(nproc: int, *args: str, port: int = 0) -> list[str]:
    return [PYTHON, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "workloads.train", *args]


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPUFORGE_", "RANK", "WORLD_SIZE", "LOCAL_RANK"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **extra)
    return env


def run(cmd: list[str], timeout: float = 180, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=child_env(**env), capture_output=True, text=True, timeout=timeout)


def read_summary(storage: Path, run_id: str) -> dict:
    return json.loads((storage / "runs" / run_id / "summary.json").read_text())
