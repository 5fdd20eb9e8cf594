"""Autostop's cloud calls on GCP, against tests/fakes/gce.py with the real program run by tests/fakes/engine.py: a
guest shutdown leaves the VMs TERMINATED with their boot disks, `clusters`/`status` say stopped, and `up` starts
the same VMs (instances.start) with the same disks. With `--autodown` the program grants each node's service account
the right to delete the cluster's own VMs, and the real watcher's delete path (its function, against the fake
metadata server and the fake Compute endpoint, which checks the grant) deletes them; a VM without the grant is
refused (403) and powers off instead; the controller's next look removes the rest.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from infra.cluster import ClusterInfo
from tests.fakes.gcs import gcs_emulator  # noqa: F401 - fixture
from tests.fakes.metadata import FakeGcpMetadata, GceNode
from tests.integration.lifecycle import gpuforge
from tests.integration.test_lifecycle_gcp import REGION, bake_image, gcp, registration  # noqa: F401 - fixtures

pytestmark = pytest.mark.integration

WATCH = Path(__file__).resolve().parents[2] / "provision" / "data" / "autostop_watch.py"  # the file the nodes run
UP = ["up", "--cloud", "gcp", "--name", "demo", "--project", "lab-project", "--instance-type", "g2-standard-8",
      "--nodes", "2", "--yes"]


def vms(gce, cluster_id: str) -> dict[str, dict]:
    return {name: vm for (_, scope), found in gce.store["instances"].items() for name, vm in found.items()
            if vm.get("labels", {}).get("gpuforge-cluster-id") == cluster_id}


def test_stopped_vms_keep_their_disks_and_up_starts_them_again_and_autodown_vms_delete_themselves(
        gcp, capsys, tmp_path, monkeypatch):
    gce, _, engines = gcp
    bake_image(gce, "gpuforge-a", "2026-11-01T00:00:00.000-07:00")
    home = tmp_path / "home"
    up = gpuforge(capsys, *UP, "--autostop", "2h")
    assert up.code == 0, up.text
    record = json.loads((home / "clusters" / "demo" / "cluster.json").read_text())
    assert record["extra"]["autostop_s"] == 7200
    cluster_id = registration(home)["cluster_id"]
    first = vms(gce, cluster_id)
    assert set(first) == {"demo-0", "demo-1"} and {vm["status"] for vm in first.values()} == {"RUNNING"}
    disks = {name: [d.get("source") for d in vm.get("disks", [])] for name, vm in first.items()}
    assert all(disks.values()), disks  # each VM has its boot disk

    for vm in first.values():  # each node's watcher powers its OS off: GCE leaves the VM TERMINATED
        vm["status"] = "TERMINATED"
    listing = gpuforge(capsys, "clusters")
    assert "stopped" in listing.out and "autostop after 2h idle" in listing.out, listing.out
    status = gpuforge(capsys, "status")
    assert "demo-0: stopped" in status.out and "demo-1: stopped" in status.out, status.out

    again = gpuforge(capsys, "up", "--cloud", "gcp", "--name", "demo", "--yes")
    assert again.code == 0, again.text
    assert "started 2 stopped node(s): demo-0, demo-1" in again.out
    assert {op for op, _, _ in engines.last_steps()} == {"same"}  # the same VMs, nothing replaced
    now = vms(gce, cluster_id)
    assert {n: vm["status"] for n, vm in now.items()} == {"demo-0": "RUNNING", "demo-1": "RUNNING"}
    assert {n: vm["id"] for n, vm in now.items()} == {n: vm["id"] for n, vm in first.items()}
    assert {name: [d.get("source") for d in vm.get("disks", [])] for name, vm in now.items()} == disks

    # autodown: the program grants each node's account the right to delete the cluster's VMs, and the Compute scope
    autodown = gpuforge(capsys, "up", "--cloud", "gcp", "--name", "demo", "--autodown", "--yes")
    assert autodown.code == 0, autodown.text
    assert "autodown on changes the nodes' access scopes" in autodown.out, autodown.out
    assert "stopped and started again" in autodown.out
    changed = sorted((op, typ.rsplit(":", 1)[-1]) for op, typ, _ in engines.last_steps() if op != "same")
    assert changed == [("create", "InstanceIAMMember")] * 2 + [("update", "Instance")] * 2, changed
    now = vms(gce, cluster_id)
    assert {n: vm["status"] for n, vm in now.items()} == {"demo-0": "RUNNING", "demo-1": "RUNNING"}  # restarted
    assert all("https://www.googleapis.com/auth/compute" in vm["serviceAccounts"][0]["scopes"] for vm in now.values())

    zone = now["demo-0"]["zone"].rsplit("/", 1)[-1]
    stranger = seed_stranger(gce, zone)  # another cluster's node: its account has no grant on any VM
    nodes = {name: vm["zone"].rsplit("/", 1)[-1] for name, vm in now.items()}
    cluster = ClusterInfo.load(home / "clusters" / "demo" / "cluster.json")  # what `setup` configures from
    logs, offs = run_watchers(monkeypatch, capsys, gce, cluster, {**nodes, stranger: zone})
    assert vms(gce, cluster_id) == {}, logs  # each node deleted its own VM, with its boot disk
    assert not any(d.startswith("demo-") for d in gce.names("disks")), gce.names("disks")
    assert all("Compute Engine is deleting this VM" in logs[name] for name in nodes), logs
    assert "could not delete itself" in logs[stranger] and gce.get("instances", f"zones/{zone}", stranger)
    assert offs == {*nodes, stranger}  # the poweroff follows either way: after the grace, or at once when refused
    assert f"Required 'compute.instances.delete' permission for 'projects/lab-project/zones/{zone}/instances/" \
           f"{stranger}'" in logs[stranger] and "powering off instead" in logs[stranger]
    assert all("ya29." not in text for text in logs.values())  # the token is never logged

    listing = gpuforge(capsys, "clusters")
    assert "every node of autodown cluster demo has gone: removing the rest of it" in listing.out, listing.text
    assert not (home / "clusters" / "demo" / "cluster.json").exists()
    assert not any(n.startswith("demo-") for n in gce.names("networks")), gce.names("networks")
    assert gce.get("instances", f"zones/{zone}", stranger) is not None  # not ours: untouched


def seed_stranger(gce, zone: str) -> str:
    email = gce.iam.create("lab-project", {"accountId": "other-cluster-sa"})["email"]
    gce.seed("instances", f"zones/{zone}", {"name": "other-0", "serviceAccounts": [
        {"email": email, "scopes": ["https://www.googleapis.com/auth/cloud-platform"]}]})
    return "other-0"


def run_watchers(monkeypatch, capsys, gce, cluster: ClusterInfo, nodes: dict[str, str]) -> tuple[dict[str, str],
                                                                                        set[str]]:
    """Each node's watcher reaching its stop, as on the node: with the config the autostop step writes for the
    cluster's record (GPUFORGE_GCP_ENDPOINT and GPUFORGE_METADATA_URL point it at the fakes), its delete path against
    its own metadata server and the fake Compute endpoint; the poweroff it falls back to is recorded, not run.
    Returns each node's log and the nodes that powered off."""
    from provision.steps.autostop import Layout, watcher_config
    from provision.steps.base import StepContext

    spec = importlib.util.spec_from_file_location("autostop_watch", WATCH)
    watch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(watch)
    offs: set[str] = set()
    logs: dict[str, str] = {}
    for name, zone in nodes.items():
        monkeypatch.setattr(watch, "poweroff", lambda name=name: offs.add(name))
        with FakeGcpMetadata(node=GceNode(gce, name, zone)) as metadata:
            monkeypatch.setenv("GPUFORGE_METADATA_URL", f"gcp={metadata.url}")
            node = next((n for n in cluster.nodes if n.name == name), cluster.nodes[0])  # the stranger: alike
            ctx = StepContext(cluster=cluster, node=node)
            config = {**watcher_config(ctx, Layout(ctx)), "delete_grace_s": 0}
            assert config["action"] == "poweroff" and config["self_delete"] == "gcp", config
            assert config["gcp_compute_url"] == gce.endpoint and config["gcp_metadata_url"] == metadata.url
            capsys.readouterr()
            watch.Watcher(config).stop_node()
            logs[name] = capsys.readouterr().out
    gce.finish_operations()  # GCE ends the deletions it accepted
    return logs, offs
