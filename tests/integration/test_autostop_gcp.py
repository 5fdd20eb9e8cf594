"""Autostop's cloud calls on GCP, against tests/fakes/gce.py with the real program run by tests/fakes/engine.py: a
guest shutdown leaves the VMs TERMINATED with their boot disks, `clusters`/`status` say stopped, and `up` starts
the same VMs (instances.start) with the same disks.
"""

from __future__ import annotations

import json

import pytest

from tests.fakes.gcs import gcs_emulator  # noqa: F401 - fixture
from tests.integration.lifecycle import gpuforge
from tests.integration.test_lifecycle_gcp import REGION, bake_image, gcp, registration  # noqa: F401 - fixtures

pytestmark = pytest.mark.integration

UP = ["up", "--cloud", "gcp", "--name", "demo", "--project", "lab-project", "--instance-type", "g2-standard-8",
      "--nodes", "2", "--yes"]


def vms(gce, cluster_id: str) -> dict[str, dict]:
    return {name: vm for (_, scope), found in gce.store["instances"].items() for name, vm in found.items()
            if vm.get("labels", {}).get("gpuforge-cluster-id") == cluster_id}


def test_stopped_vms_keep_their_disks_and_up_starts_them_again(gcp, capsys, tmp_path):
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

    # autodown: GCE has no setting that deletes a VM on a guest shutdown, so the VMs stop as before, and the
    # controller's next look removes the rest, as `down` does
    autodown = gpuforge(capsys, "up", "--cloud", "gcp", "--name", "demo", "--autodown", "--yes")
    assert autodown.code == 0, autodown.text
    assert {op for op, _, _ in engines.last_steps()} == {"same"}  # nothing in the program changes for it
    for vm in vms(gce, cluster_id).values():
        vm["status"] = "TERMINATED"
    listing = gpuforge(capsys, "clusters")
    assert "every node of autodown cluster demo has gone: removing the rest of it" in listing.out, listing.text
    assert vms(gce, cluster_id) == {} and not (home / "clusters" / "demo" / "cluster.json").exists()
