"""A preemption notice ends a run with a complete checkpoint and the state "preempted", not "failed".

The watcher runs in the node's supervisor and reads a stand-in of the AWS or GCP metadata endpoint
(tests/fakes/metadata.py); the trainer saves on SIGUSR1 and exits with PREEMPTED_EXIT.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.fakes.metadata import FakeAwsMetadata, FakeGcpMetadata
from tests.support import PYTHON, ROOT, TINY_CONVNET, child_env, torchrun_cmd
from workloads.checkpoint import CheckpointManager
from workloads.preempt import PREEMPTED_EXIT
from workloads.storage import open_store

ARGS = [*TINY_CONVNET, "max_steps=400", "ckpt_every=10", "export=none", "quantize=false", "log_every=1"]


def wait_for(predicate, proc, timeout=90.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"ended early waiting for {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def progress(run_dir: Path) -> int:
    try:
        return json.loads((run_dir / "progress.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return 0


def worker_pids(parent: int) -> dict[int, int]:
    """rank -> pid of torchrun's workers under `parent`."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = dict(kv.split("=", 1) for kv in (entry / "environ").read_bytes().decode().split("\0") if "=" in kv)
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent and "RANK" in env:
            found[int(env["RANK"])] = int(entry.name)
    return found


def test_a_notice_to_one_rank_saves_one_checkpoint_on_all_ranks_and_stops_them(tmp_path):
    """The signal reaches one rank only (another node's); both agree and save one complete checkpoint of the
    same step (resuming from it bitwise is test_train's and test_recovery's), then both exit PREEMPTED_EXIT."""
    storage, run_dir = tmp_path / "s", tmp_path / "node"
    run_dir.mkdir()
    args = ["--job", "convnet-digits", "--storage", str(storage), *ARGS, "max_steps=30"]
    proc = subprocess.Popen(torchrun_cmd(2, *args, "--run-id", "pre"), cwd=ROOT,
                            env=child_env(GPUFORGE_RUN_DIR=str(run_dir), GPUFORGE_PREEMPTIBLE="1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGUSR1, signal.SIG_IGN))
    try:
        wait_for(lambda: progress(run_dir) >= 4, proc, what="training")
        os.kill(worker_pids(proc.pid)[1], signal.SIGUSR1)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    marker = json.loads((run_dir / "preempted.json").read_text())
    assert proc.returncode != 0 and f"exitcode  : {PREEMPTED_EXIT}" in err, err[-2000:]
    assert (out + err).count("preempted: checkpoint of step") == 2, "both ranks stop at the notice"
    ckpt = CheckpointManager(open_store((storage / "runs" / "pre").as_uri()))
    assert ckpt.latest() == marker["step"] and 4 <= marker["step"] < 30
    parts, meta = ckpt.load(marker["step"])
    assert parts["train_state"]["step"] == marker["step"] and len(parts["train_state"]["ranks"]) == 2
    assert not (storage / "runs/pre/summary.json").exists(), "a preempted run has not finished"


def supervise(tmp_path: Path, watch: dict) -> subprocess.Popen:
    run_dir = tmp_path / "node"
    run_dir.mkdir()
    env = {k: v for k, v in child_env().items() if k != "PYTHONPATH"}
    command = [PYTHON, "-m", "workloads.train", "--job", "convnet-digits", "--storage", str(tmp_path / "s"),
               "--run-id", "sup", *ARGS]
    spec = {"run_id": "sup", "node": "node-0", "node_rank": 0, "nnodes": 1, "command": command, "cwd": str(run_dir),
            "env": {"PYTHONPATH": str(ROOT), "GPUFORGE_RUN_DIR": str(run_dir)}, "storage_url": (tmp_path / "s").as_uri(),
            "preemption": {**watch, "poll_s": 0.2}}
    (run_dir / "run.json").write_text(json.dumps(spec))
    return subprocess.Popen([PYTHON, "-m", "workloads.supervise", "--run-dir", str(run_dir)], cwd=ROOT, env=env)


@pytest.mark.parametrize("cloud", ["aws", "gcp"])
def test_the_supervisor_hears_the_metadata_notice_and_the_node_ends_preempted(tmp_path, cloud):
    fake = FakeAwsMetadata() if cloud == "aws" else FakeGcpMetadata()
    with fake:
        sup = supervise(tmp_path, {"cloud": cloud, "url": fake.url})
        try:
            wait_for(lambda: progress(tmp_path / "node") >= 3, sup, what="training")
            fake.notice() if cloud == "aws" else fake.preempt()
            assert sup.wait(timeout=60) == 1
        finally:
            sup.kill()
    status = json.loads((tmp_path / "node" / "status.json").read_text())
    assert status["state"] == "preempted", status
    assert ("AWS spot interruption: terminate" if cloud == "aws" else "instance/preempted is TRUE") in status["reason"]
    assert status["checkpoint_step"] >= 3 and status["save_s"] < 30  # GCP gives 30 s, AWS 2 min
    ckpt = CheckpointManager(open_store((tmp_path / "s" / "runs" / "sup").as_uri()))
    assert ckpt.latest() == status["checkpoint_step"]
