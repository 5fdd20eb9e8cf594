"""The node-side watcher's own rules (provision/data/autostop_watch.py), without a node: what counts as work, and
when the stop comes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import importlib.util
from pathlib import Path

import pytest

WATCH = Path(__file__).resolve().parents[2] / "provision" / "data" / "autostop_watch.py"  # a file the nodes run
_spec = importlib.util.spec_from_file_location("autostop_watch", WATCH)
watch = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(watch)
Watcher, active_runs, decode_address = watch.Watcher, watch.active_runs, watch.decode_address


def write_status(runs, run_id: str, state: str, pid: int) -> None:
    (runs / run_id).mkdir(parents=True)
    (runs / run_id / "status.json").write_text(json.dumps({"state": state, "supervisor_pid": pid}))


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_only_runs_whose_supervisor_lives_count(tmp_path):
    write_status(tmp_path, "alive", "running", os.getpid())
    write_status(tmp_path, "starting", "starting", os.getpid())
    write_status(tmp_path, "crashed", "running", dead_pid())  # the node rebooted under it: no work any more
    write_status(tmp_path, "done", "succeeded", os.getpid())
    (tmp_path / "torn").mkdir()
    (tmp_path / "torn" / "status.json").write_text("{not json")
    assert active_runs(str(tmp_path)) == ["alive", "starting"]


@pytest.mark.parametrize("text, address", [("0100007F:0016", ("127.0.0.1", 22)), ("0300007F:D431", ("127.0.0.3", 54321))])
def test_proc_net_tcp_addresses_decode(text, address):
    assert decode_address(text) == address


def watcher(tmp_path, **changes) -> Watcher:
    config = {"idle_s": 10, "poll_s": 1, "session_min_s": 5, "runs_dir": str(tmp_path / "runs"), "ssh_port": 1,
              "ssh_address": "127.0.0.254", "state_path": str(tmp_path / "state.json"), "action": "stop-sshd"}
    return Watcher({**config, **changes})


def test_the_stop_comes_after_idle_s_without_work_and_work_resets_the_clock(tmp_path):
    w = watcher(tmp_path)
    start = w.last_busy
    assert not w.step(start + 9)
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["state"] == "idle" and state["stop_at"] == start + 10 and state["busy"] == []
    write_status(tmp_path / "runs", "r1", "running", os.getpid())
    assert not w.step(start + 11)  # a run: busy, the clock starts again
    assert json.loads((tmp_path / "state.json").read_text())["busy"] == ["run r1"]
    (tmp_path / "runs" / "r1" / "status.json").write_text(json.dumps({"state": "succeeded"}))
    assert not w.step(start + 20)
    assert w.step(start + 21)
    assert json.loads((tmp_path / "state.json").read_text())["state"] == "stopping"


def test_an_ssh_connection_counts_once_it_has_been_open_session_min_s(tmp_path, monkeypatch):
    open_now = {"a>b"}
    monkeypatch.setattr(watch, "ssh_connections", lambda port, address="": set(open_now))
    w = watcher(tmp_path)
    t = w.last_busy
    assert w.busy_reasons(t) == []  # a probe's connection: not yet a session
    assert w.busy_reasons(t + 4) == []
    assert w.busy_reasons(t + 5) == ["1 ssh session(s)"]
    open_now.clear()
    assert w.busy_reasons(t + 6) == []


def write_mark(tmp_path, run_id: str, port: int, written: float) -> Path:
    marks = tmp_path / "cluster-runs"
    marks.mkdir(exist_ok=True)
    mark = marks / f"{run_id}.json"
    mark.write_text(json.dumps({"run_id": run_id, "head": ["127.0.0.1", port]}))
    os.utime(mark, (written, written))
    return mark


def test_a_run_elsewhere_on_the_cluster_counts_while_its_head_answers_and_its_mark_ends_within_the_grace(tmp_path):
    """workloads/cluster_marks.py: the mark counts while the run's head supervisor answers, and at most
    mark_grace_s after it last did: a run that ended (or a head that went) keeps the node up no longer."""
    import socket

    head = socket.create_server(("127.0.0.1", 0))
    w = watcher(tmp_path, mark_grace_s=5)
    now = w.last_busy
    alive = write_mark(tmp_path, "long", head.getsockname()[1], written=now - 3600)  # written an hour ago
    assert not w.step(now)
    assert json.loads((tmp_path / "state.json").read_text())["busy"] == ["run long on the cluster"]
    head.close()  # the run ends: its supervisor's port closes
    assert not w.step(now + 4) and json.loads((tmp_path / "state.json").read_text())["busy"] == [
        "run long on the cluster"], "within the grace of the last answer"
    assert not w.step(now + 6)
    assert json.loads((tmp_path / "state.json").read_text())["busy"] == [] and not alive.exists()
    assert not w.step(now + 13) and w.step(now + 14)  # then its own idle clock: idle_s after the last busy look


def test_a_starting_run_s_mark_counts_for_the_grace_only_when_its_head_never_answers(tmp_path):
    """A crashed launch or a lost controller leaves a mark nobody answers: it keeps the node up mark_grace_s, no more."""
    import socket

    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    w = watcher(tmp_path, mark_grace_s=5)
    now = w.last_busy
    mark = write_mark(tmp_path, "lost", port, written=now)
    assert not w.step(now + 1)
    assert json.loads((tmp_path / "state.json").read_text())["busy"] == ["run lost on the cluster"]
    assert not w.step(now + 5.5) and not mark.exists()
    assert json.loads((tmp_path / "state.json").read_text())["busy"] == []


# -- autodown on GCP: the VM deletes itself ---------------------------------------------------------------------

ZONE = "us-central1-a"
SA = "gf-demo-sa@p-test.iam.gserviceaccount.com"


@pytest.fixture
def gce():
    from tests.fakes.gce import FakeCompute

    with FakeCompute(project="p-test") as fake:
        fake.iam.create("p-test", {"accountId": "gf-demo-sa"})
        yield fake


def seed_vm(gce, name: str, email: str = SA, scopes=("https://www.googleapis.com/auth/compute",)) -> dict:
    return gce.seed("instances", f"zones/{ZONE}", {"name": name, "serviceAccounts": [
        {"email": email, "scopes": list(scopes)}]})


def grant(gce, vm: dict, role: str = "roles/compute.instanceAdmin.v1", member: str = f"serviceAccount:{SA}") -> None:
    gce.access.set_policy(vm["id"], {"policy": {"bindings": [{"role": role, "members": [member]}]}},
                          lambda email: email == SA)


def delete(gce, name: str) -> str:
    from tests.fakes.metadata import FakeGcpMetadata, GceNode

    with FakeGcpMetadata(node=GceNode(gce, name, ZONE)) as metadata:
        return watch.delete_gce_instance(metadata.url, gce.endpoint)


def test_the_vm_finds_its_name_zone_and_project_on_the_metadata_server(gce):
    from tests.fakes.metadata import FakeGcpMetadata, GceNode

    seed_vm(gce, "demo-0")
    with FakeGcpMetadata(node=GceNode(gce, "demo-0", ZONE)) as metadata:
        assert watch.gce_identity(metadata.url) == ("p-test", ZONE, "demo-0")  # the zone's path holds a number
        assert watch.gce_token(metadata.url) in gce.access.tokens
    assert all(path.startswith("/computeMetadata/v1/") for _, path in metadata.requests)


@pytest.mark.parametrize("how", ["instance", "project"])
def test_a_vm_whose_account_holds_delete_on_it_deletes_itself_with_its_boot_disk(gce, how):
    vm = seed_vm(gce, "demo-0")
    gce.seed("disks", f"zones/{ZONE}", {"name": "demo-0-boot"})
    vm["disks"] = [{"source": f"zones/{ZONE}/disks/demo-0-boot", "autoDelete": True, "boot": True}]
    if how == "instance":
        grant(gce, vm)
    else:
        gce.access.grant_project("p-test", "roles/compute.instanceAdmin.v1", f"serviceAccount:{SA}")
    assert delete(gce, "demo-0").startswith("operation-")
    assert gce.get("instances", f"zones/{ZONE}", "demo-0") is None
    assert "demo-0-boot" not in gce.names("disks")


@pytest.mark.parametrize("setup, says", [
    ("none", "HTTP 403: Required 'compute.instances.delete' permission for 'projects/p-test/zones/us-central1-a/"
             "instances/demo-0'"),
    ("other vm", "HTTP 403: Required 'compute.instances.delete' permission"),  # a grant on a sibling is not one
    ("viewer", "HTTP 403: Required 'compute.instances.delete' permission"),  # a role without the permission
    ("no scope", "HTTP 403: Request had insufficient authentication scopes."),
])
def test_a_vm_without_the_right_is_refused_as_the_api_refuses(gce, setup, says):
    vm = seed_vm(gce, "demo-0", scopes=("https://www.googleapis.com/auth/devstorage.read_write",)
                 if setup == "no scope" else ("https://www.googleapis.com/auth/compute",))
    sibling = seed_vm(gce, "demo-1")
    if setup in ("other vm", "no scope"):
        grant(gce, sibling if setup == "other vm" else vm)
    if setup == "viewer":
        grant(gce, vm, role="roles/compute.viewer")
    with pytest.raises(watch.SelfDeleteError, match="instances.delete of projects/p-test/zones/us-central1-a/"
                                                    "instances/demo-0") as err:
        delete(gce, "demo-0")
    assert says in str(err.value)
    assert gce.get("instances", f"zones/{ZONE}", "demo-0") is not None


def test_an_unknown_token_is_401_and_an_ungrantable_role_or_missing_account_is_400(gce):
    from tests.fakes.gce_auth import AuthError

    vm = seed_vm(gce, "demo-0")
    status, body = gce.dispatch("DELETE", f"/compute/v1/projects/p-test/zones/{ZONE}/instances/demo-0", {},
                                "Bearer ya29.forged")
    assert status == 401 and body["error"]["status"] == "UNAUTHENTICATED"
    with pytest.raises(AuthError, match="Role roles/owner is not supported for this resource"):
        grant(gce, vm, role="roles/owner")
    with pytest.raises(AuthError, match="Service account ghost@p-test.iam.gserviceaccount.com does not exist"):
        grant(gce, vm, member="serviceAccount:ghost@p-test.iam.gserviceaccount.com")


def test_without_metadata_server_or_network_it_says_so_in_one_line_and_powers_off(tmp_path, monkeypatch, capsys):
    import socket

    with socket.socket() as s:  # a port nobody listens on: connection refused
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    offs = []
    monkeypatch.setattr(watch, "poweroff", lambda: offs.append(True))
    w = watcher(tmp_path, action="poweroff", self_delete="gcp", gcp_metadata_url=closed, gcp_compute_url=closed,
                delete_grace_s=0)
    w.stop_node()
    out = capsys.readouterr().out
    assert offs == [True]
    lines = [line for line in out.splitlines() if "could not delete itself" in line]
    assert len(lines) == 1 and "the metadata server did not give this VM's name and token" in lines[0], out


def test_the_token_goes_to_no_log_and_no_state_file(gce, tmp_path, monkeypatch, capsys):
    from tests.fakes.metadata import FakeGcpMetadata, GceNode

    seed_vm(gce, "demo-0")  # no grant: the refusal's message is logged
    monkeypatch.setattr(watch, "poweroff", lambda: None)
    with FakeGcpMetadata(node=GceNode(gce, "demo-0", ZONE)) as metadata:
        w = watcher(tmp_path, action="poweroff", self_delete="gcp", gcp_metadata_url=metadata.url,
                    gcp_compute_url=gce.endpoint, delete_grace_s=0, idle_s=0)
        assert w.step(w.last_busy + 1)
        w.stop_node()
    written = capsys.readouterr().out + (tmp_path / "state.json").read_text()
    assert gce.access.tokens and not any(token in written for token in gce.access.tokens)
    assert "HTTP 403" in written


def test_without_self_delete_the_node_only_powers_off(tmp_path, monkeypatch):
    offs = []
    monkeypatch.setattr(watch, "poweroff", lambda: offs.append(True))
    monkeypatch.setattr(watch, "delete_gce_instance", lambda *a: pytest.fail("no autodown: no delete"))
    watcher(tmp_path, action="poweroff").stop_node()
    assert offs == [True]


@pytest.mark.parametrize("cloud, autodown, env, wanted", [
    ("gcp", True, {}, {"self_delete": "gcp"}),
    ("gcp", True, {"GPUFORGE_GCP_ENDPOINT": "http://127.0.0.1:9/", "GPUFORGE_METADATA_URL": "gcp=http://127.0.0.1:8"},
     {"self_delete": "gcp", "gcp_compute_url": "http://127.0.0.1:9", "gcp_metadata_url": "http://127.0.0.1:8"}),
    ("gcp", False, {}, {}),
    ("aws", True, {}, {}),  # EC2 terminates on the node's own poweroff (instance_initiated_shutdown_behavior)
])
def test_the_step_asks_for_self_delete_only_with_autodown_on_gcp(monkeypatch, cloud, autodown, env, wanted):
    from infra.cluster import ClusterInfo, NodeInfo
    from provision.steps.autostop import Layout, watcher_config
    from provision.steps.base import StepContext

    for name in ("GPUFORGE_GCP_ENDPOINT", "GPUFORGE_METADATA_URL"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    node = NodeInfo(name="n0", rank=0, public_address="203.0.113.9", private_address="10.0.0.2")
    cluster = ClusterInfo(name="c", cloud=cloud, nodes=(node,), extra={"autostop_s": 60, "autodown": autodown})
    ctx = StepContext(cluster=cluster, node=node)
    config = watcher_config(ctx, Layout(ctx))
    assert {k: v for k, v in config.items() if k in ("self_delete", "gcp_compute_url", "gcp_metadata_url")} == wanted
    assert config["action"] == "poweroff"
