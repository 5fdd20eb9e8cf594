"""Recovery on the embedded local cluster: a node lost mid-run (its sshd and every process killed, as a
preemption does) is brought back, set up again, and the run resumes from its last complete checkpoint to the
same parameters, bitwise, as an uninterrupted run; a script that raises is not retried; --recover N is honoured."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from infra.local import create_local_cluster, destroy_local_cluster, kill_node, our_processes
from provision.recovery import follow_with_recovery
from provision.setup import setup_cluster
from tests.integration.test_train import state_sha
from tests.support import TINY_CONVNET
from workloads.launch import RunSpec, fetch_run, start_run
from workloads.runs import load_record

JOB = [*TINY_CONVNET, "export=none", "quantize=false", "max_steps=16", "ckpt_every=4", "log_every=1", "augment=true"]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("gpuforge-home")


@pytest.fixture(scope="module")
def cluster(home):
    c = create_local_cluster("rec", 2, home)
    reports = setup_cluster(c, home)
    assert all(r.ok for r in reports), [r.error for r in reports]
    yield c
    destroy_local_cluster(Path(c.state_dir))
    assert not our_processes(Path(c.state_dir))


def checkpoints(cluster, run_id) -> list[int]:
    folder = Path(cluster.storage_url.removeprefix("file://")) / "runs" / run_id
    return [int(p.parent.name.split("-")[1]) for p in folder.glob("step-*/manifest.json")]


def test_the_head_node_killed_mid_run_is_recovered_and_the_run_ends_bitwise_equal(cluster, home, tmp_path):
    straight = RunSpec(job="convnet-digits", nodes=2, run_id="straight", args=JOB, storage_url=cluster.storage_url)
    start_run(cluster, straight, home)
    assert follow_with_recovery(cluster, home, "straight", 0, out=lambda t: None, poll=0.3, timeout=180).state == "succeeded"

    spec = RunSpec(job="convnet-digits", nodes=2, run_id="lost", args=JOB, storage_url=cluster.storage_url)
    start_run(cluster, spec, home)
    deadline = time.monotonic() + 120
    while not any(s >= 4 for s in checkpoints(cluster, "lost")):
        assert time.monotonic() < deadline, "no checkpoint of step 4 in time"
        time.sleep(0.1)
    # node-0: the node followed for rank 0's output, and the host of torchrun's rendezvous store (the harder loss)
    assert kill_node(cluster, 0) >= 3  # its supervisor, torchrun agent and worker at least
    lines: list[str] = []
    status = follow_with_recovery(cluster, home, "lost", 2, out=lines.append, poll=0.3, timeout=180)
    assert status.state == "succeeded", ([(n.node, n.state, n.reason) for n in status.nodes], lines)
    record = load_record(home, cluster, "lost")
    assert record["attempt"] == 2 and len(record["recoveries"]) == 1
    recovery = record["recoveries"][0]
    assert recovery["kind"] == "unreachable" and recovery["nodes"] == ["node-0"]
    assert 4 <= recovery["resumed_from_step"] < 16 and recovery["steps_lost"] >= 0
    assert set(recovery["seconds"]) == {"detection", "node_back", "setup", "restart"}
    for run_id in ("straight", "lost"):
        fetch_run(cluster, home, run_id, tmp_path)
    assert state_sha(tmp_path / "lost/model.pth") == state_sha(tmp_path / "straight/model.pth")
    summary = json.loads((tmp_path / "lost/summary.json").read_text())
    assert summary["resumed_from_step"] == recovery["resumed_from_step"]


# A task's `run:` whose script raises on node 1 while node 0 is healthy (busy).
RAISES = """python -c '
import os, time
if os.environ["NODE_RANK"] == "1":
    raise ValueError("lr must be > 0")
time.sleep(60)
'"""
# What a rank prints when its peer's machine went away mid-collective (gloo), then exits: a peer loss, each time.
PEER_LOST = ("echo 'RuntimeError: [../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer "
             "[127.0.0.3]:29500' >&2; exit 1")


def run_script(cluster, home, tmp_path, run_id, command, recover):
    start_run(cluster, RunSpec(command=command, nodes=2, run_id=run_id, storage_url=cluster.storage_url), home)
    lines: list[str] = []
    status = follow_with_recovery(cluster, home, run_id, recover, out=lines.append, poll=0.3, timeout=120)
    return status, load_record(home, cluster, run_id), lines


def test_a_script_that_raises_is_not_retried(cluster, home, tmp_path):
    status, record, lines = run_script(cluster, home, tmp_path, "raises", RAISES, recover=3)
    assert status.state == "failed" and status.culprit.node == "node-1" and "lr must be > 0" in status.culprit.reason
    # the healthy node was stopped for node-1's failure: it said "cancelled by the user" when the controller stopped it
    healthy = next(n for n in status.nodes if n.node == "node-0")
    assert healthy.state == "stopped" and healthy.reason.startswith("stopped because node-1 failed: "), healthy
    assert record["attempt"] == 1 and record["recoveries"] == []
    assert any("not recovered" in line for line in lines)


def test_recover_n_is_honoured(cluster, home, tmp_path):
    status, record, lines = run_script(cluster, home, tmp_path, "peerloss", PEER_LOST, recover=2)
    assert status.state == "failed"
    assert record["attempt"] == 3 and [r["kind"] for r in record["recoveries"]] == ["peer-loss", "peer-loss"]
    assert any("all 2 recoveries used" in line for line in lines)


def test_a_preempted_run_saves_on_notice_and_is_recovered_from_that_checkpoint(cluster, home, monkeypatch):
    """Spot nodes (their supervisors pointed at the AWS metadata stand-in): the notice stops the run "preempted"
    with a checkpoint of the step it came at, and recovery resumes from exactly that step."""
    import threading

    from tests.fakes.metadata import FakeAwsMetadata
    from workloads.launch import METADATA_URL_ENV

    with FakeAwsMetadata() as imds:
        monkeypatch.setenv(METADATA_URL_ENV, f"aws={imds.url}")
        args = [*JOB, "max_steps=60", "ckpt_every=100"]  # no periodic checkpoint: only the notice's; 60 steps, so the notice (polled every second) lands before the end on an idle machine
        start_run(cluster, RunSpec(job="convnet-digits", nodes=2, run_id="spot", args=args,
                                   storage_url=cluster.storage_url), home)
        progress = Path(cluster.node(1).workdir) / "runs" / "spot" / "progress.json"
        deadline = time.monotonic() + 120
        while not (progress.exists() and json.loads(progress.read_text() or "{}").get("step", 0) >= 3):
            assert time.monotonic() < deadline, "no training in time"
            time.sleep(0.1)
        imds.notice("terminate")

        def replaced() -> None:  # the instance that comes back has no notice pending
            while not checkpoints(cluster, "spot"):
                time.sleep(0.05)
            imds.action = None

        threading.Thread(target=replaced, daemon=True).start()
        lines: list[str] = []
        status = follow_with_recovery(cluster, home, "spot", 1, out=lines.append, poll=0.3, timeout=180)
    assert status.state == "succeeded", ([(n.node, n.state, n.reason) for n in status.nodes], lines)
    assert load_record(home, cluster, "spot")["recoveries"], lines
    recovery = load_record(home, cluster, "spot")["recoveries"][0]
    assert recovery["kind"] == "preempted" and "AWS spot interruption: terminate" in recovery["why"]
    # before the last step (60, which saves too): the notice's checkpoint; `< 30` failed on an idle machine, where
    # the 1 s notice poll lands 30+ fast steps after step 3 (33 and 40 seen, 2 Dec 2026)
    assert 3 <= recovery["resumed_from_step"] < 60 and recovery["steps_lost"] in (0, None)
