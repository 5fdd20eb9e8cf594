"""The main job end to end on the embedded local cluster: real sshd nodes, real torchrun.

up -> setup -> train on 2 nodes -> fetch -> down, and what goes wrong on the way: a node lost
mid-setup, a reboot, a rank killed mid-run, a cancel, a crash before `down`, bad input.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch

from infra.local import create_local_cluster, destroy_local_cluster, our_processes, restart_node, stop_node
from provision.setup import setup_cluster
from provision.steps.base import Cmd, Step
from tests.support import ROOT, TINY_CONVNET
from workloads.launch import RunSpec, cancel_run, fetch_run, follow_run, run_status, start_run

FAST = [*TINY_CONVNET, "export=none", "quantize=false"]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("gpuforge-home")


@pytest.fixture(scope="module")
def cluster(home):
    c = create_local_cluster("it", 2, home)
    reports = setup_cluster(c, home)
    yield c, reports
    destroy_local_cluster(Path(c.state_dir))
    assert not our_processes(Path(c.state_dir))


def run_procs(cluster, run_id):
    return [(pid, cmd) for pid, cmd in our_processes(Path(cluster.state_dir)) if run_id in " ".join(cmd)]


def wait_until(predicate, timeout=60.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def progress_step(cluster, node, run_id):
    path = Path(cluster.node(node).workdir) / "runs" / run_id / "progress.json"
    try:
        return json.loads(path.read_text())["step"]
    except (OSError, ValueError):
        return 0


def state_sha(path) -> str:
    h = hashlib.sha256()
    for key, value in torch.load(path, weights_only=True).items():
        h.update(key.encode())
        h.update(value.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def test_setup_configures_every_node_and_a_rerun_changes_nothing(cluster, home):
    c, first = cluster
    assert all(r.ok for r in first), [r.error for r in first]
    for r in first:
        assert {"base", "python_env", "workload", "verify"} <= set(r.changed)
        assert {s.step: s.status for s in r.steps}["nvidia-driver"] == "skipped"
        assert Path(c.node(r.node).workdir, "venv", "gpuforge-source.txt").exists()
    again = setup_cluster(c, home)
    assert all(r.ok and r.changed == [] for r in again)
    assert {s.status for r in again for s in r.steps} == {"unchanged", "skipped"}


def test_a_changed_source_tree_is_reshipped(cluster, home, monkeypatch):
    c, _ = cluster
    import provision.setup as setup_module

    monkeypatch.setattr(setup_module, "source_fingerprint", lambda root=None: "0123456789abcdef")
    monkeypatch.setattr(setup_module, "build_wheel", lambda h, fp: __import__("provision.wheel").wheel.build_wheel(h))
    changed = setup_cluster(c, home)
    assert all(set(r.changed) == {"workload", "verify"} for r in changed), [r.changed for r in changed]
    monkeypatch.undo()
    back = setup_cluster(c, home)
    assert all(set(r.changed) == {"workload", "verify"} for r in back)


def test_two_node_training_ends_with_identical_parameters(cluster, home, tmp_path):
    c, _ = cluster
    spec = RunSpec(job="convnet-digits", nodes=2, run_id="both", args=[*FAST, "max_steps=6"], storage_url=c.storage_url)
    start_run(c, spec, home)
    status = follow_run(c, home, "both", out=lambda text: None, poll=0.3, timeout=180)
    assert status.state == "succeeded", [(n.node, n.reason, n.tail) for n in status.nodes]
    files = fetch_run(c, home, "both", tmp_path)
    summary = json.loads((tmp_path / "both" / "summary.json").read_text())
    assert summary["world_size"] == 2
    sums = summary["param_sha256_by_rank"]
    assert len(sums) == 2 and sums[0] == sums[1] == state_sha(tmp_path / "both" / "model.pth")
    assert {f.name for f in files} >= {"summary.json", "metrics.jsonl", "model.pth", "config.json"}
    assert not any("step-" in str(f) for f in files), "checkpoints stay in storage unless asked for"
    assert not run_procs(c, "both"), "nothing of the run may keep running"


NANOGPT_STYLE = '''
import json, os, sys
import torch, torch.distributed as dist
ddp = int(os.environ.get("RANK", -1)) != -1
if ddp:
    dist.init_process_group(backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
else:
    rank, world = 0, 1
x = torch.ones(1) * (rank + 1)
if ddp:
    dist.all_reduce(x)
keys = ["RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "NODE_RANK", "NNODES", "GPUFORGE_RUN_ID", "GPUFORGE_STORAGE",
        "SKYPILOT_NODE_RANK", "SKYPILOT_NODE_IPS", "SKYPILOT_NUM_NODES", "DSTACK_MASTER_NODE_IP", "DSTACK_NODES_NUM"]
out = {k: os.environ.get(k) for k in keys}
out["sum"], out["argv"] = x.item(), sys.argv[1:]
with open(f"env-{rank}.json", "w") as f:
    json.dump(out, f)
if ddp:
    dist.destroy_process_group()
sys.stdout.flush(); os._exit(0)
'''


def test_a_users_script_runs_unchanged_with_the_environment(cluster, home, tmp_path):
    c, _ = cluster
    script = tmp_path / "proj" / "train.py"
    script.parent.mkdir()
    script.write_text(NANOGPT_STYLE)
    (script.parent / "helper.txt").write_text("shipped too")
    spec = RunSpec(script=str(script), nodes=2, run_id="script", args=["--batch_size", "8"], storage_url=c.storage_url)
    start_run(c, spec, home)
    status = follow_run(c, home, "script", out=lambda text: None, poll=0.3, timeout=120)
    assert status.state == "succeeded", [(n.node, n.reason, n.tail) for n in status.nodes]
    for rank in (0, 1):
        code = Path(c.node(rank).workdir) / "runs" / "script" / "code"
        env = json.loads((code / f"env-{rank}.json").read_text())
        assert (code / "helper.txt").read_text() == "shipped too"
        assert env["sum"] == 3.0 and env["WORLD_SIZE"] == "2" and env["NODE_RANK"] == str(rank)
        assert env["SKYPILOT_NODE_RANK"] == str(rank) and env["SKYPILOT_NODE_IPS"] == "127.0.0.2\n127.0.0.3"
        assert env["DSTACK_MASTER_NODE_IP"] == env["MASTER_ADDR"] == "127.0.0.2" and env["DSTACK_NODES_NUM"] == "2"
        assert env["GPUFORGE_STORAGE"] == f"{c.storage_url}/runs/script" and env["argv"] == ["--batch_size", "8"]


def worker_pid(cluster, rank, run_id):
    for pid, cmd in run_procs(cluster, run_id):
        line = " ".join(cmd)
        if cluster.node(rank).workdir in line and "-m workloads.train" in line and "torch.distributed.run" not in line:
            return pid
    return None


def test_a_killed_rank_fails_the_run_and_stops_the_others(cluster, home):
    c, _ = cluster
    spec = RunSpec(job="convnet-digits", nodes=2, run_id="doomed", args=[*FAST, "max_steps=100000", "log_every=1"],
                   storage_url=c.storage_url)
    start_run(c, spec, home)
    wait_until(lambda: progress_step(c, 1, "doomed") >= 2, what="training on node-1")
    os.kill(worker_pid(c, 1, "doomed"), signal.SIGKILL)
    status = follow_run(c, home, "doomed", out=lambda text: None, poll=0.3, timeout=120)
    assert status.state == "failed"
    assert status.culprit.node == "node-1" and "signal 9" in status.culprit.reason or "exit code" in status.culprit.reason
    wait_until(lambda: not run_procs(c, "doomed"), timeout=30, what="every process of the run to stop")


def test_cancel_stops_every_process_of_the_run(cluster, home):
    c, _ = cluster
    spec = RunSpec(job="convnet-digits", nodes=2, run_id="cancelme", args=[*FAST, "max_steps=100000", "log_every=1"],
                   storage_url=c.storage_url)
    start_run(c, spec, home)
    wait_until(lambda: progress_step(c, 0, "cancelme") >= 1, what="training to start")
    cancel_run(c, home, "cancelme")
    wait_until(lambda: not run_procs(c, "cancelme"), timeout=30, what="the run's processes to stop")
    assert run_status(c, home, "cancelme").state == "cancelled"


def test_a_node_lost_mid_setup_is_named_and_rerun_completes_it(home):
    c = create_local_cluster("flaky", 2, home)
    try:
        def lose_node_1(node, step, state):
            if node == "node-1" and step == "workload" and state == "running":
                stop_node(c, 1)

        reports = setup_cluster(c, home, on_event=lose_node_1, ssh_wait=2)
        good, bad = reports
        assert good.ok and "workload" in good.changed
        assert not bad.ok and bad.node == "node-1"
        assert c.node(1).address in bad.error and "workload" in bad.error
        restart_node(c, 1)
        again = setup_cluster(c, home)
        assert all(r.ok for r in again)
        assert again[0].changed == [] and "workload" in again[1].changed
    finally:
        destroy_local_cluster(Path(c.state_dir))


class RebootStep(Step):
    name = "reboot-test"
    description = "writes a file, reboots, writes another"

    def plan(self, ctx):
        w = ctx.workdir
        return [Cmd(f"echo before > {w}/before"), Cmd(f"touch {w}/reboot-requested", reboot=True),
                Cmd(f"echo after > {w}/after")]


def test_setup_waits_for_a_rebooting_node_and_continues(home):
    c = create_local_cluster("reboot", 1, home)
    workdir = Path(c.node(0).workdir)
    try:
        def reboot_when_asked():  # what the node's `reboot` would do: go down, come back 2 s later
            wait_until(lambda: (workdir / "reboot-requested").exists(), what="the reboot command")
            stop_node(c, 0)
            time.sleep(2)
            restart_node(c, 0)

        machine = threading.Thread(target=reboot_when_asked, daemon=True)
        machine.start()
        started = time.monotonic()
        (report,) = setup_cluster(c, home, steps=[RebootStep()])
        machine.join(timeout=30)
        assert report.ok, report.error
        assert (workdir / "after").read_text().strip() == "after"
        assert time.monotonic() - started >= 2.0
    finally:
        destroy_local_cluster(Path(c.state_dir))


def test_down_after_a_crash_still_cleans_up(home):
    c = create_local_cluster("crashy", 1, home)
    state = Path(c.state_dir)
    assert all(r.ok for r in setup_cluster(c, home))
    spec = RunSpec(job="convnet-digits", nodes=1, run_id="orphan", args=[*FAST, "max_steps=100000"], storage_url=c.storage_url)
    start_run(c, spec, home)
    wait_until(lambda: progress_step(c, 0, "orphan") >= 1, what="training to start")
    for pid, cmd in our_processes(state):
        if "workloads.supervise" in " ".join(cmd):
            os.kill(pid, signal.SIGKILL)  # the supervisor crashes; torchrun and its worker are orphans now
    assert run_procs(c, "orphan")
    destroy_local_cluster(state)
    assert not our_processes(state) and not state.exists()
    for node in c.nodes:
        with pytest.raises(OSError):
            socket.create_connection((node.public_address, node.ssh_port), timeout=1).close()


def fab(home, *args, timeout=60):
    env = {**os.environ, "GPUFORGE_HOME": str(home)}
    return subprocess.run([str(Path(os.sys.executable).parent / "fab"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--job", "nope"], "error: unknown job 'nope'; valid jobs: seed000-cnn"),
        (["train", "--cluster", "nope", "--job", "convnet-digits"], "error: unknown cluster 'nope'; known clusters:"),
        (["train", "--job", "convnet-digits", "--nodes", "0"], "error: --nodes must be >= 1; got 0"),
        (["train", "--job", "convnet-digits", "--nodes", "3"], "error: --nodes 3 is more than cluster it has (2)"),
        (["train", "--job", "convnet-digits", "lr=fast"], "error: lr expects a number; got 'fast'"),
        (["up", "--hosts", "BADHOSTS"], "hosts[1]: each host needs `address:`"),
    ],
)
def test_bad_input_is_one_clear_line_and_nothing_starts(cluster, home, tmp_path, args, message):
    c, _ = cluster
    bad = tmp_path / "hosts.yaml"
    bad.write_text("hosts:\n  - address: 10.0.0.1\n  - port: 22\n")
    (home / "current").write_text("it\n")
    runs_before = set((home / "clusters" / "it" / "runs").glob("*.json"))
    res = fab(home, *[str(bad) if a == "BADHOSTS" else a for a in args])
    assert res.returncode != 0
    assert message in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert set((home / "clusters" / "it" / "runs").glob("*.json")) == runs_before
    assert not [p for p, cmd in our_processes(Path(c.state_dir)) if "workloads.supervise" in " ".join(cmd)]


def test_fab_exec_prefixes_output_by_node(cluster, home):
    (home / "current").write_text("it\n")
    res = fab(home, "exec", "--", "echo", "hello from $GPUFORGE_NODE_DIR | wc -c")
    assert res.returncode == 0, res.stderr
    assert [line.split("]")[0] for line in res.stdout.splitlines()] == ["[node-0", "[node-1"]


def test_the_cross_node_allreduce_check_runs_on_every_node(cluster, home):
    from provision.setup import check_cluster_allreduce

    c, reports = cluster
    assert check_cluster_allreduce(c, home, reports) is None  # CPU cluster: only when asked
    result = check_cluster_allreduce(c, home, reports, force=True)
    assert result.backend == "gloo" and result.world_size == 2
    assert [row["size"] for row in result.rows] == ["64K", "1M"]
    assert all(row["busbw_gbps"] > 0 for row in result.rows)
    assert "busbw" in result.table
    assert result.verdict.startswith("all-reduce passed across 2 nodes (gloo, 2 ranks; CPU nodes: a connectivity check")
