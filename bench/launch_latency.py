"""Launch latency: `gpuforge train` to the first logged training step on 2 local nodes, versus the same job
started by hand with a bare 2-node torchrun over the same SSH, measured side by side.

    .venv/bin/python bench/launch_latency.py [--rounds 5]

Both run the same job (`convnet-digits`, a few steps) on the same two set-up nodes, in the nodes' venv, with the
same thread count, and write their first step to the same place (`<node 0>/runs/<id>/progress.json`). Ours is the
console command as a user types it (`gpuforge train --cluster C --job J --nodes 2 ...`: validation, the run
record, one supervisor per node, our torchrun agent); the bare one is two OpenSSH clients started at once, each
running `python -m torch.distributed.run --nnodes=2 --node-rank=R ...` on its node (as in PyTorch's multi-node
instructions). One start of each comes first, not counted (a cold page cache); then rounds alternate which goes
first; each pair is printed, then the medians. The last line is `ratio: X.XX` (ours / bare torchrun; the goal
is <= 1.10).
"""

from __future__ import annotations

import argparse
import os
import shlex
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from _common import ROOT, local_cluster, timed_setup
from infra.cluster import ClusterInfo
from infra.ssh_config import host_alias, write_ssh_config

JOB = "convnet-digits"
ARGS = ["width=0.25", "max_steps=3", "log_every=1", "tensorboard=false", "export=none", "quantize=false"]
FIRST_STEP_TIMEOUT_S = 300.0
END_TIMEOUT_S = 300.0


def wait_for(path: Path, procs: list[subprocess.Popen], timeout: float = FIRST_STEP_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        failed = [p for p in procs if p.poll() not in (None, 0)]
        if failed or time.monotonic() > deadline:
            out = b"".join(p.stdout.read() for p in procs if p.stdout and p.poll() is not None).decode(errors="replace")
            raise SystemExit(f"no first step at {path}: {out[-2000:] or 'timed out'}")
        time.sleep(0.01)


def progress_file(cluster: ClusterInfo, run_id: str) -> Path:
    return Path(cluster.node(0).workdir) / "runs" / run_id / "progress.json"


def ours(cluster: ClusterInfo, home: Path, run_id: str) -> float:
    env = {**os.environ, "GPUFORGE_HOME": str(home), "NO_COLOR": "1"}
    cmd = [str(ROOT / ".venv" / "bin" / "gpuforge"), "train", "--cluster", cluster.name, "--job", JOB, "--nodes", "2",
           "--run-id", run_id, *ARGS]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    wait_for(progress_file(cluster, run_id), [proc])
    elapsed = time.perf_counter() - started
    proc.wait(timeout=60)
    wait_for_end(cluster, home, run_id)
    return elapsed


def wait_for_end(cluster: ClusterInfo, home: Path, run_id: str) -> None:
    from workloads.launch import run_status

    deadline = time.monotonic() + END_TIMEOUT_S
    while (state := run_status(cluster, home, run_id).state) == "running":
        if time.monotonic() > deadline:
            raise SystemExit(f"run {run_id} did not end within {END_TIMEOUT_S:.0f} s")
        time.sleep(0.5)
    if state != "succeeded":
        raise SystemExit(f"run {run_id} {state}")


def free_port(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


def bare_command(cluster: ClusterInfo, rank: int, run_id: str, port: int) -> str:
    """What one types on node `rank`: the job under torchrun in the node's venv, writing where ours writes."""
    node, head = cluster.node(rank), cluster.node(0)
    run_dir = f"{node.workdir}/runs/{run_id}"
    torchrun = [f"{node.workdir}/venv/bin/python", "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
                f"--node-rank={rank}", f"--master-addr={head.private_address}", f"--master-port={port}",
                "--max-restarts=0", "-m", "workloads.train", "--job", JOB, "--run-id", run_id,
                "--storage", cluster.storage_url, *ARGS]
    threads = max(1, (os.cpu_count() or 1) // 2)  # what ours gives each of the 2 processes on shared cores
    return (f"mkdir -p {shlex.quote(run_dir)} && cd {shlex.quote(run_dir)} && OMP_NUM_THREADS={threads} "
            f"PYTHONUNBUFFERED=1 GPUFORGE_RUN_DIR={shlex.quote(run_dir)} {shlex.join(torchrun)}")


def bare(cluster: ClusterInfo, ssh_config: Path, run_id: str) -> float:
    port = free_port(cluster.node(0).private_address)
    cmds = [["ssh", "-F", str(ssh_config), "-o", "BatchMode=yes", host_alias(cluster, node),
             bare_command(cluster, node.rank, run_id, port)] for node in cluster.nodes]
    started = time.perf_counter()
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
             for cmd in cmds]
    wait_for(progress_file(cluster, run_id), procs)
    elapsed = time.perf_counter() - started
    for proc in procs:
        if proc.wait(timeout=END_TIMEOUT_S) != 0:
            raise SystemExit(f"bare torchrun exited {proc.returncode}: {proc.stdout.read().decode(errors='replace')[-2000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gpuforge-bench-") as tmp:
        home = Path(tmp)
        with local_cluster("latency", 2, home) as cluster:
            timed_setup(cluster, home)
            ssh_config = write_ssh_config(home, cluster)
            ours(cluster, home, "warm-ours")  # not counted: the first start of each reads torch from a cold page cache
            bare(cluster, ssh_config, "warm-bare")
            a, b = [], []
            for i in range(args.rounds):
                sides = [("ours", lambda: a.append(ours(cluster, home, f"ours{i}"))),
                         ("bare", lambda: b.append(bare(cluster, ssh_config, f"bare{i}")))]
                for _, measure in sides if i % 2 == 0 else sides[::-1]:
                    measure()
                print(f"round {i + 1}/{args.rounds}: gpuforge train {a[-1]:.2f} s, bare torchrun over ssh {b[-1]:.2f} s",
                      flush=True)
    x, y = statistics.median(a), statistics.median(b)
    print(f"to the first training step, 2 nodes, {args.rounds} rounds alternating (medians): gpuforge train {x:.2f} s, "
          f"bare torchrun over ssh {y:.2f} s (goal: ratio <= 1.10)")
    print("per round (ours / bare): " + " ".join(f"{p / q:.2f}" for p, q in zip(a, b)))
    print(f"ratio: {x / y:.2f}")


if __name__ == "__main__":
    main()
