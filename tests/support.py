"""Helpers shared by the integration tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
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


GPUFORGE = str(Path(sys.executable).parent / "gpuforge")  # the console command, as a user runs it


def gpuforge(home: Path, *args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `gpuforge ARGS` from a folder outside the repo (a user's own folder), with its own home."""
    env = {**os.environ, "GPUFORGE_HOME": str(home)}
    env.pop("GPUFORGE_DEBUG", None)
    return subprocess.run([GPUFORGE, *args], cwd=cwd or home, env=env, capture_output=True, text=True, timeout=timeout)


def start_gpuforge(home: Path, *args: str, cwd: Path | None = None) -> subprocess.Popen:
    """A foreground `gpuforge` command (jupyter, serve, forward) left running; stop it with SIGINT, as Ctrl-C does."""
    env = {**os.environ, "GPUFORGE_HOME": str(home), "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    return subprocess.Popen([GPUFORGE, *args], cwd=cwd or home, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def read_until(proc: subprocess.Popen, pattern: str, timeout: float = 180) -> tuple[str, str]:
    """Lines of a started command until one matches `pattern` (a regex): (the match, everything read so far)."""
    import queue
    import re
    import threading

    if not hasattr(proc, "lines"):
        proc.lines, proc.seen = queue.Queue(), []

        def pump() -> None:
            for line in proc.stdout:
                proc.lines.put(line)
            proc.lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = proc.lines.get(timeout=0.5)
        except queue.Empty:
            continue
        if line is None:
            proc.lines.put(None)
            break
        proc.seen.append(line)
        found = re.search(pattern, line)
        if found:
            return found.group(0), "".join(proc.seen)
    raise AssertionError(f"no line matching {pattern!r} within {timeout:.0f} s (exit {proc.poll()}):\n{''.join(proc.seen)}")


def interrupt(proc: subprocess.Popen, timeout: float = 60) -> tuple[int, str]:
    """Ctrl-C a started command; its exit code and the rest of its output."""
    import signal

    proc.send_signal(signal.SIGINT)
    return finish(proc, timeout)


def finish(proc: subprocess.Popen, timeout: float = 60) -> tuple[int, str]:
    """Wait for a started command to end by itself: its exit code and all it printed."""
    if not hasattr(proc, "lines"):
        rest, _ = proc.communicate(timeout=timeout)
        return proc.returncode, rest
    proc.wait(timeout=timeout)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        line = proc.lines.get(timeout=5)
        if line is None:
            break
        proc.seen.append(line)
    return proc.returncode, "".join(proc.seen)
