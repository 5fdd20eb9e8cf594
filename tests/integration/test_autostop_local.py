"""Autostop's whole path on the embedded local cluster, with a timeout of seconds: real sshd nodes, the real watcher
(provision/data/autostop_watch.py) installed by `gpuforge setup`, a real run and the real OpenSSH client.

up --autostop 2s -> setup -> a run on node-0 only keeps both nodes up past the timeout (a run of ours is active on the
cluster) -> it ends while an `ssh` session on node-1 is open -> node-0 stops itself (its sshd ends), node-1 stays up
until the session ends, then stops -> `clusters`/`status` say stopped -> `up` starts the cluster
again (the watcher comes back with it) -> `setup` changes nothing -> it stops again when idle -> `setup` of the stopped
cluster starts it first.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from infra.cluster import ClusterInfo
from infra.power import power_states
from infra.ssh_config import main_config_path
from tests.support import gpuforge
from workloads.launch import RunSpec, start_run

NAME = "idle"
IDLE_S = 2
STOP_WITHIN_S = IDLE_S + 8  # the timeout, the watcher's look (0.5 s) and sshd's exit, with room for a loaded CI


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("gpuforge-autostop")


@pytest.fixture(scope="module")
def cluster(home):
    up = gpuforge(home, "up", "--name", NAME, "--nodes", "2", "--autostop", f"{IDLE_S}s")
    assert up.returncode == 0, up.stdout + up.stderr
    keepers = [ssh_session(home, rank) for rank in (0, 1)]  # the test's own sessions, until its work has started
    setup = gpuforge(home, "setup", timeout=300)
    assert setup.returncode == 0, setup.stdout + setup.stderr
    yield ClusterInfo.load(home / "clusters" / NAME / "cluster.json"), keepers
    for keeper in keepers:
        end(keeper)
    gpuforge(home, "down", "--cluster", NAME)


def ssh_session(home: Path, rank: int) -> subprocess.Popen:
    """An interactive session's stand-in: the real OpenSSH client, with the config `gpuforge ssh-config` writes."""
    return subprocess.Popen(["ssh", "-F", str(main_config_path(home)), "-o", "BatchMode=yes", f"{NAME}-node-{rank}",
                             "sleep 120"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def end(session: subprocess.Popen) -> None:
    session.terminate()
    session.wait(10)


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(0.2)
    return value


def watcher_state(cluster: ClusterInfo, rank: int) -> dict:
    path = Path(cluster.node(rank).workdir) / ".gpuforge" / "autostop" / "state.json"
    return json.loads(path.read_text()) if path.exists() else {}


def test_a_bad_autostop_is_one_line_naming_it_and_nothing_is_started(home):
    result = gpuforge(home, "up", "--name", "never", "--autostop", "soon")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --autostop 'soon' is not a duration; give minutes (90), a number with a unit (90s, 30m, 2h, 1d) "
        "or off"]
    assert not (home / "clusters" / "never").exists()


def test_a_run_and_an_ssh_session_keep_nodes_up_then_idle_nodes_stop_and_up_brings_them_back(cluster, home, tmp_path):
    cluster, keepers = cluster
    assert cluster.extra["autostop_s"] == IDLE_S
    assert {watcher_state(cluster, r).get("idle_s") for r in (0, 1)} == {IDLE_S}

    # a run of ours on node-0 only (`--nodes 1`) and an interactive ssh session on node-1
    (tmp_path / "work").mkdir()
    done = tmp_path / "done"  # the run ends when the test says so (quick nodes share this machine's files)
    start_run(cluster, RunSpec(command=f"while [ ! -e {done} ]; do sleep 0.2; done", workdir=str(tmp_path / "work"),
                               nodes=1, run_id="busy-run", storage_url=cluster.storage_url), home)
    session = ssh_session(home, 1)
    wait_for(lambda: "run busy-run" in watcher_state(cluster, 0)["busy"], 30, "the watcher to see the run")
    wait_for(lambda: watcher_state(cluster, 1)["busy"] == ["run busy-run on the cluster", "2 ssh session(s)"], 30,
             "node-1's watcher to see the cluster's run and the session")
    for keeper in [*keepers, session]:
        end(keeper)

    # the run alone keeps both up: node-0 runs it, node-1 is in the cluster it runs on
    time.sleep(IDLE_S + 2)  # well past the timeout
    assert power_states(cluster) == {"node-0": "running", "node-1": "running"}
    assert watcher_state(cluster, 0)["busy"] == ["run busy-run"]
    assert watcher_state(cluster, 1)["busy"] == ["run busy-run on the cluster"]
    status = gpuforge(home, "status")
    assert status.returncode == 0, status.stderr
    assert "node-0: busy (run busy-run)" in status.stdout, status.stdout
    assert "node-1: busy (run busy-run on the cluster)" in status.stdout, status.stdout

    # the run ends while an ssh session is open on node-1: node-0 stops, node-1 (its mark gone) stays for the session
    session = ssh_session(home, 1)
    try:
        wait_for(lambda: "1 ssh session(s)" in watcher_state(cluster, 1)["busy"], 30, "the watcher to see the session")
        done.write_text("")
        wait_for(lambda: power_states(cluster)["node-0"] == "stopped", STOP_WITHIN_S, "node-0 to stop after its run")
        wait_for(lambda: watcher_state(cluster, 1)["busy"] == ["1 ssh session(s)"], STOP_WITHIN_S,
                 "node-1's mark of the run to end")
        time.sleep(IDLE_S + 1)
        assert power_states(cluster)["node-1"] == "running", "node-1 must stay up while its ssh session is open"
    finally:
        end(session)
    wait_for(lambda: power_states(cluster) == {"node-0": "stopped", "node-1": "stopped"}, STOP_WITHIN_S,
             "node-1 to stop after its session")
    listing = gpuforge(home, "clusters")
    assert NAME in listing.stdout and "stopped" in listing.stdout, listing.stdout
    status = gpuforge(home, "status")
    assert "node-0: stopped" in status.stdout and "node-1: stopped" in status.stdout, status.stdout

    # up of the stopped cluster starts it again, with the same disks, and the watcher with it
    marker = Path(cluster.node(0).workdir) / "runs" / "busy-run" / "status.json"
    assert marker.exists()
    up = gpuforge(home, "up", "--name", NAME)
    assert up.returncode == 0, up.stdout + up.stderr
    assert "started 2 stopped node(s)" in up.stdout
    assert power_states(cluster) == {"node-0": "running", "node-1": "running"} and marker.exists()
    again = gpuforge(home, "setup", timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "nothing changed" in again.stdout and "unchanged autostop" in again.stdout, again.stdout
    wait_for(lambda: power_states(cluster) == {"node-0": "stopped", "node-1": "stopped"}, STOP_WITHIN_S + 5,
             "the restarted nodes to stop again when idle")

    # setup of the stopped cluster (as train and launch) starts it first: it waited 5 minutes on the nodes, then failed
    woken = gpuforge(home, "setup", timeout=60)
    assert woken.returncode == 0, woken.stdout + woken.stderr
    assert "started 2 stopped node(s) of idle: node-0, node-1" in woken.stdout and "nothing changed" in woken.stdout


def test_an_autodown_cluster_whose_nodes_went_is_removed_at_the_next_look_and_its_data_kept(home):
    from provision.setup import setup_cluster
    from provision.steps.autostop import AutostopStep
    from provision.steps.core import BaseStep

    up = gpuforge(home, "up", "--name", "gone", "--nodes", "1", "--autostop", "1s", "--autodown")
    assert up.returncode == 0, up.stdout + up.stderr
    cluster = ClusterInfo.load(home / "clusters" / "gone" / "cluster.json")
    assert cluster.extra["autodown"] is True
    storage = Path(cluster.storage_url.removeprefix("file://"))
    (storage / "results.txt").write_text("the run's output")
    assert all(r.ok for r in setup_cluster(cluster, home, steps=[BaseStep(), AutostopStep()]))
    wait_for(lambda: power_states(cluster) == {"node-0": "stopped"}, STOP_WITHIN_S, "the autodown node to stop")

    status = gpuforge(home, "status", "--cluster", "gone")
    assert status.returncode == 0, status.stdout + status.stderr
    assert "every node of autodown cluster gone has gone: removing the rest of it" in status.stdout
    assert not (home / "clusters" / "gone" / "cluster.json").exists()
    assert (storage / "results.txt").read_text() == "the run's output"  # the data policy of `down`: kept
    assert "gone" in gpuforge(home, "clusters").stdout  # listed as down, data kept
