"""Recovery time: from a node's loss to the first training step after recovery, on a 2-node local cluster,
split into detection, node back, setup, restart and resume (provision/recovery.py, `train --recover N`).

    .venv/bin/python bench/recovery.py [--rounds 2]

Each round starts convnet-digits on both nodes (a checkpoint every 10 steps), waits for the checkpoint of step
10, then kills a node as a preemption would (its sshd and every process, SIGKILL: infra/local.py kill_node),
alternating node-1 and node-0 (the one that hosts torchrun's rendezvous store). The controller is the real one,
in a thread: follow_with_recovery(recover=1). The phases:
- detection: the kill to the controller's decision (the survivor's gloo error, the supervisor's report, one poll);
- node back: the node answering SSH again (local: sshd restarted; a cloud: the stack's `up` replacing it);
- setup: `fab setup` of the cluster (nothing to change on a node that kept its disk);
- restart: start_run of the resumed run (ship, supervisors started);
- resume: from there to the first step after the checkpoint (torch import, rendezvous, checkpoint load, one step).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

from _common import local_cluster, timed_setup
from infra.local import kill_node
from provision.recovery import follow_with_recovery
from workloads.launch import RunSpec, cancel_run, start_run
from workloads.runs import load_record

ARGS = ["width=0.25", "batch_size=32", "threads=1", "max_steps=100000", "ckpt_every=10", "log_every=1",
        "tensorboard=false", "export=none", "quantize=false"]
PHASES = ("detection", "node_back", "setup", "restart", "resume")


def wait_until(predicate, timeout: float = 180, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.05)


def one_round(cluster, home: Path, run_id: str, lose: int) -> dict[str, float]:
    start_run(cluster, RunSpec(job="convnet-digits", nodes=2, run_id=run_id, args=ARGS, storage_url=cluster.storage_url), home)
    storage = Path(cluster.storage_url.removeprefix("file://")) / "runs" / run_id
    wait_until(lambda: (storage / "step-10" / "manifest.json").exists(), what="the checkpoint of step 10")
    lost_at = time.time()
    kill_node(cluster, lose)
    controller = threading.Thread(target=follow_with_recovery, args=(cluster, home, run_id, 1),
                                  kwargs={"out": lambda text: None, "poll": 0.5}, daemon=True)
    controller.start()
    progress = Path(cluster.node(1).workdir) / "runs" / run_id / "progress.json"  # node 1's first step of an attempt

    def restarted() -> bool:
        return load_record(home, cluster, run_id).get("attempt") == 2 and bool(load_record(home, cluster, run_id).get("recoveries"))

    wait_until(restarted, what="the recovery")
    wait_until(progress.exists, what="the first step after recovery")
    first_step = time.time()
    recovery = load_record(home, cluster, run_id)["recoveries"][0]
    cancel_run(cluster, home, run_id)
    controller.join(timeout=60)
    sec = dict(recovery["seconds"])
    sec["detection"] = recovery["time"] - lost_at  # from the kill itself, not the survivor's failure
    restarted_at = recovery["time"] + sec["node_back"] + sec["setup"] + sec["restart"]
    sec["resume"] = first_step - restarted_at
    sec["total"] = first_step - lost_at
    sec["steps_lost"] = recovery.get("steps_lost")
    return sec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, local_cluster("bench-recovery", 2, Path(tmp)) as cluster:
        home = Path(tmp)
        print(f"first setup: {timed_setup(cluster, home):.1f} s")
        rows = []
        for i in range(args.rounds):
            lose = 1 if i % 2 == 0 else 0
            sec = one_round(cluster, home, f"rec-{i}", lose)
            rows.append(sec)
            print(f"round {i} (node-{lose} lost): " + ", ".join(f"{k} {sec[k]:.2f} s" for k in (*PHASES, "total"))
                  + f", steps lost {sec['steps_lost']}", flush=True)
        print(json.dumps({k: round(statistics.median(r[k] for r in rows), 2) for k in (*PHASES, "total")}))


if __name__ == "__main__":
    main()
