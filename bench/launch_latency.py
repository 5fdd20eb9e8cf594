"""Launch latency: `fab train` to the first logged training step on 2 local nodes, versus the same
job started with a bare local `torchrun` (2 processes, no SSH), measured side by side.

    .venv/bin/python bench/launch_latency.py [--rounds 3]

The last line is `ratio: X.XX` (ours / bare torchrun); the seconds are printed above it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, local_cluster, timed_setup
from workloads.launch import RunSpec, cancel_run, start_run

ARGS = ["width=0.25", "max_steps=100000", "log_every=1", "tensorboard=false", "export=none", "quantize=false"]


def wait_for(path: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"no first step: {path} never appeared")
        time.sleep(0.02)


def ours(cluster, home: Path, i: int) -> float:
    run_id = f"lat{i}"
    started = time.perf_counter()
    start_run(cluster, RunSpec(job="convnet-digits", nodes=2, run_id=run_id, args=ARGS, storage_url=cluster.storage_url), home)
    wait_for(Path(cluster.node(0).workdir) / "runs" / run_id / "progress.json")
    elapsed = time.perf_counter() - started
    cancel_run(cluster, home, run_id)
    return elapsed


def bare(tmp: Path, i: int) -> float:
    run_dir = tmp / f"bare{i}"
    run_dir.mkdir()
    env = {**os.environ, "GPUFORGE_RUN_DIR": str(run_dir), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "workloads.train",
           "--job", "convnet-digits", "--storage", str(tmp / "storage"), "--run-id", f"bare{i}", *ARGS]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(run_dir / "progress.json")
        return time.perf_counter() - started
    finally:
        os.killpg(proc.pid, 9)
        proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gpuforge-bench-") as tmp:
        home = Path(tmp)
        with local_cluster("latency", 2, home) as cluster:
            timed_setup(cluster, home)
            a, b = [], []
            for i in range(args.rounds):
                a.append(ours(cluster, home, i))
                b.append(bare(home, i))
    x, y = statistics.median(a), statistics.median(b)
    print(f"to the first training step, 2 nodes, {args.rounds} rounds (medians): fab train {x:.2f} s, bare torchrun {y:.2f} s")
    print(f"ratio: {x / y:.2f}")


if __name__ == "__main__":
    main()
