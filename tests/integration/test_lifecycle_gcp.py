"""A GCP cluster's whole life through the real `gpuforge` tasks, against tests/fakes/gce.py (Compute and IAM, applying
the API's rules) and the GCS emulator, the real Pulumi program run by tests/fakes/engine.py's stand-in for
`pulumi up`, and the real trainer writing to the bucket. GPUFORGE_GCP_ENDPOINT points our own clients (preflight,
image lookup, sweep) at the fake, as a user would point them at an emulator.

up -> a second up after a newer image is baked (no node replaced) -> train writes to the bucket -> down (the data
is kept and reported) -> down --delete-data; an up that fails early, for want of capacity in every zone, or because
the controller dies mid-up -> down -> nothing of the cluster is left; a stranger's look-alikes survive it all.

The emulator keeps no noncurrent object versions, so "every version" is seen on AWS (moto) only; here the same
code path (list with versions=True, delete each generation) runs against the current ones.
"""

from __future__ import annotations

import json
import os
import uuid

import pytest

from infra.cluster import ownership_marker
from infra.sweep import find_gcp_leftovers
from tests.fakes.engine_gcp import GcpCloud
from tests.fakes.gce import FakeCompute
from tests.fakes.gcs import gcs_emulator, gcs_env, make_gcs_client  # noqa: F401 - fixture
from tests.integration.lifecycle import gpuforge, install_engines
from tests.support import TINY_CONVNET, run, train_cmd

pytestmark = pytest.mark.integration

PROJECT = "lab-project"
REGION = "us-central1"
FAMILY = "gpuforge-ubuntu2204-cu130-torch213"
UP = ["up", "--cloud", "gcp", "--name", "demo", "--project", PROJECT, "--instance-type", "a2-highgpu-8g",
      "--nodes", "2", "--ssh-cidr", "203.0.113.4/32", "--yes"]


@pytest.fixture
def gcp(gcs_emulator, monkeypatch, tmp_path):  # noqa: F811 - the imported fixture
    with FakeCompute(project=PROJECT, pending_polls=1) as gce:
        for name, value in gcs_env(gcs_emulator).items():
            monkeypatch.setenv(name, value)
        monkeypatch.setenv("GPUFORGE_GCP_ENDPOINT", gce.endpoint)
        monkeypatch.setenv("GPUFORGE_HOME", str(tmp_path / "home"))
        monkeypatch.setenv("COLUMNS", "200")  # rich wraps at 80 otherwise, and ids would be cut in tables
        engines = install_engines(monkeypatch, {"gcp": GcpCloud(gce, gcs_emulator)})
        yield gce, make_gcs_client(gcs_emulator), engines


def bake_image(gce: FakeCompute, name: str, created: str) -> str:
    """An image as images/gcp.py leaves it: in our family, labelled, READY."""
    labels = {"gpuforge-baked": "true", "gpuforge-os": "ubuntu-2204", "gpuforge-driver-modules": "open",
              "gpuforge-family": FAMILY}
    return gce.seed("images", "global", {"name": name, "family": FAMILY, "labels": labels, "status": "READY",
                                         "creationTimestamp": created, "diskSizeGb": "50"})["selfLink"]


def seed_strangers(gce: FakeCompute, gcs) -> dict[str, str]:
    """The user's own resources named like the cluster's, and a colleague's cluster `demo` (another id)."""
    gce.seed("firewalls", "global", {"name": "demo-allow-https", "network": "global/networks/default",
                                     "description": "the web team's"})
    gce.seed("networks", "global", {"name": "demo-net-prod", "autoCreateSubnetworks": True})
    gce.seed("resourcePolicies", f"regions/{REGION}", {"name": "demo-placement-backups"})
    gce.seed("disks", f"zones/{REGION}-b", {"name": "demo-0", "sizeGb": "200", "labels": {
        "gpuforge-cluster": "demo", "gpuforge-cluster-id": "colleague000"}})
    gce.seed("firewalls", "global", {"name": "demo-ssh-colleague", "network": "global/networks/default",
                                     "description": f"SSH {ownership_marker('demo', 'colleague000')}"})
    gce.iam.create(PROJECT, {"accountId": "demo-ci-runner", "serviceAccount": {"displayName": "demo CI"}})
    bucket = f"gpuforge-demo-notmine-{uuid.uuid4().hex[:6]}"
    gcs.create_bucket(bucket).blob("precious").upload_from_string(b"keep me")
    return {"bucket": bucket}


def assert_strangers_untouched(gce: FakeCompute, gcs, strangers: dict[str, str]) -> None:
    assert {"demo-allow-https", "demo-ssh-colleague"} <= gce.names("firewalls")
    assert {"default", "demo-net-prod"} <= gce.names("networks")
    assert "demo-placement-backups" in gce.names("resourcePolicies")
    assert gce.names("disks", f"zones/{REGION}-b") >= {"demo-0"}
    assert f"demo-ci-runner@{PROJECT}.iam.gserviceaccount.com" in gce.iam.accounts[PROJECT]
    assert gcs.bucket(strangers["bucket"]).blob("precious").download_as_bytes() == b"keep me"


def registration(home) -> dict:
    return json.loads((home / "clusters" / "demo" / "registration.json").read_text())


def ours(cluster_id: str) -> list:
    return [lo for lo in find_gcp_leftovers("demo", PROJECT, REGION) if lo.owner_id == cluster_id or lo.recorded]


def nodes(gce: FakeCompute, cluster_id: str) -> dict[str, str]:
    return {r["name"]: r["id"] for _, r in gce.items("instances")
            if r.get("labels", {}).get("gpuforge-cluster-id") == cluster_id}


def test_up_second_up_train_down_keeps_the_data_then_delete_data(gcp, capsys, tmp_path):
    gce, gcs, engines = gcp
    home = tmp_path / "home"
    strangers = seed_strangers(gce, gcs)
    first = bake_image(gce, f"{FAMILY}-20261101-000000", "2026-11-01T00:00:00.000-07:00")

    up = gpuforge(capsys, *UP)
    assert up.code == 0, up.text
    cluster_id = registration(home)["cluster_id"]
    running = nodes(gce, cluster_id)
    assert set(running) == {"demo-0", "demo-1"}
    assert engines.made[-1].config("demo")["gpuforge:image"] == first  # a concrete image, not the family
    assert gce.get("resourcePolicies", f"regions/{REGION}", next(
        n for n in gce.names("resourcePolicies") if n.startswith("demo-placement-") and n != "demo-placement-backups"))

    bake_image(gce, f"{FAMILY}-20261201-000000", "2026-12-01T00:00:00.000-07:00")
    again = gpuforge(capsys, "up", "--cloud", "gcp", "--name", "demo", "--yes")
    assert again.code == 0, again.text
    assert {op for op, _, _ in engines.last_steps()} == {"same"}
    assert nodes(gce, cluster_id) == running

    cluster = json.loads((home / "clusters" / "demo" / "cluster.json").read_text())
    assert cluster["extra"]["project"] == PROJECT
    trained = run(train_cmd("--job", "convnet-digits", "--storage", cluster["storage_url"], "--run-id", "r1",
                            *TINY_CONVNET, "export=none", "quantize=false", "max_steps=2", "ckpt_every=1"),
                  STORAGE_EMULATOR_HOST=os.environ["STORAGE_EMULATOR_HOST"], GOOGLE_CLOUD_PROJECT="test")
    assert trained.returncode == 0, trained.stderr
    bucket = cluster["storage_url"].removeprefix("gs://")
    blobs = list(gcs.list_blobs(bucket, versions=True))
    assert any(b.name == "runs/r1/summary.json" for b in blobs)

    down = gpuforge(capsys, "down", "--cluster", "demo")
    assert down.code == 0, down.text
    assert f"kept the data: gs://{bucket} ({len(blobs)} object version(s)" in " ".join(down.out.split())
    assert [lo.kind for lo in ours(cluster_id)] == ["bucket"]
    assert gce.names("instances", f"zones/{REGION}-a") == set() and not nodes(gce, cluster_id)
    assert_strangers_untouched(gce, gcs, strangers)

    gone = gpuforge(capsys, "down", "--cluster", "demo", "--delete-data", stdin="y\n")
    assert gone.code == 0, gone.text
    assert f"gs://{bucket}" in gone.out and bucket not in {b.name for b in gcs.list_buckets()}
    assert ours(cluster_id) == [] and not (home / "clusters" / "demo").exists()
    assert_strangers_untouched(gce, gcs, strangers)


def test_down_of_a_gcp_cluster_reaches_the_sweep_with_its_project(gcp, capsys):
    """Regression: the destroy and the sweep of a GCP cluster got project="" and `down` failed."""
    gce, gcs, _ = gcp
    bake_image(gce, f"{FAMILY}-20261101-000000", "2026-11-01T00:00:00.000-07:00")
    assert gpuforge(capsys, *UP).code == 0

    down = gpuforge(capsys, "down", "--cluster", "demo", "--yes")

    assert down.code == 0, down.text
    assert [r for _, r in gce.items("instances")] == [] and gce.names("networks") == {"default"}
    assert gce.iam.accounts.get(PROJECT, {}) == {}


def up_n1(gce: FakeCompute, capsys, accelerator: str, nodes: int):
    """`up` of an N1 cluster with `accelerator`, no zone given, on the Deep Learning VM image (no baked one)."""
    gce.seed("images", "global", {"name": "dlvm-1", "family": "common-cu128-ubuntu-2204-nvidia-570",
                                  "status": "READY", "diskSizeGb": "50"}, project="deeplearning-platform-release")
    return gpuforge(capsys, "up", "--cloud", "gcp", "--name", "demo", "--project", PROJECT, "--instance-type",
                    "n1-standard-8", "--accelerator", accelerator, "--nodes", str(nodes), "--yes")


def test_n1_clusters_come_up_without_a_compact_placement_policy(gcp, capsys):
    """GCE refuses compact placement for N1 (the fake applies the rule): a 2-node N1 cluster must not ask for it."""
    gce, _, _ = gcp
    up = up_n1(gce, capsys, "nvidia-tesla-t4:1", 2)
    assert up.code == 0, up.text
    assert len([r for _, r in gce.items("instances")]) == 2 and gce.names("resourcePolicies") == set()
    assert gpuforge(capsys, "down", "--cluster", "demo", "--yes").code == 0


def test_without_a_zone_the_first_zone_that_offers_the_accelerator_is_picked(gcp, capsys):
    """Regression: the default zone was the region's first catalog zone (us-central1-a), which has no P100 (the fake's
    acceleratorTypes per zone, and its insert refuses an accelerator the zone lacks)."""
    gce, _, engines = gcp
    up = up_n1(gce, capsys, "nvidia-tesla-p100:1", 1)
    assert up.code == 0, up.text
    assert f"offered in {REGION}-c, {REGION}-f" in " ".join(up.out.split())
    assert engines.made[-1].config("demo")["gpuforge:zone"] == f"{REGION}-c"
    assert [scope for scope, _ in gce.items("instances")] == [f"zones/{REGION}-c"]
    assert gpuforge(capsys, "down", "--cluster", "demo", "--yes").code == 0


@pytest.mark.parametrize("point", ["early", "no-capacity-anywhere", "controller-killed"])
def test_a_failed_up_then_down_leaves_nothing_of_the_cluster(gcp, capsys, tmp_path, point):
    gce, gcs, engines = gcp
    home = tmp_path / "home"
    strangers = seed_strangers(gce, gcs)
    bake_image(gce, f"{FAMILY}-20261101-000000", "2026-11-01T00:00:00.000-07:00")
    if point == "early":
        gce.fail_next("firewall", "insert", "Internal error. Please try again or contact Google Support.")
    elif point == "no-capacity-anywhere":
        for zone in "abcf":
            gce.exhaust(f"{REGION}-{zone}", "a2-highgpu-8g")
    else:
        engines.crash_after = ("compute/instance:Instance", "demo-node-0")

    up = gpuforge(capsys, *UP)

    assert up.code != 0 and "Traceback" not in up.err
    cluster_id = registration(home)["cluster_id"]
    assert ours(cluster_id), "the failed up should have left resources for down to find"
    if point == "no-capacity-anywhere":
        text = " ".join(up.out.split())
        assert f"{REGION}-a has no a2-highgpu-8g capacity now; trying {REGION}-b" in text
        assert "no capacity for 2 x a2-highgpu-8g in any zone that offers it" in up.err
    if point == "controller-killed":
        assert up.code == 130
        assert "demo-0" in nodes(gce, cluster_id)
        assert not [r for r in engines.made[-1].recorded("demo") if r.name == "demo-node-0"]  # only its labels

    down = gpuforge(capsys, "down", "--cluster", "demo")

    assert down.code == 0, down.text
    assert ours(cluster_id) == [] and not (home / "clusters" / "demo").exists()
    assert_strangers_untouched(gce, gcs, strangers)
    sweep = gpuforge(capsys, "sweep", "--cloud", "gcp", "--project", PROJECT)
    assert sweep.code == 0 and "colleague000" in sweep.out
    assert cluster_id not in sweep.out, sweep.out


def test_a_gpu_quota_too_small_stops_before_anything_and_names_it(gcp, capsys, tmp_path):
    gce, _, _ = gcp
    bake_image(gce, f"{FAMILY}-20261101-000000", "2026-11-01T00:00:00.000-07:00")
    gce.set_quota("NVIDIA_A100_GPUS", 8, region=REGION)

    up = gpuforge(capsys, *UP)

    assert up.code == 1
    assert "NVIDIA_A100_GPUS" in up.err and "console.cloud.google.com/iam-admin/quotas?project=lab-project" in up.err
    assert gce.names("networks") == {"default"} and not (tmp_path / "home" / "clusters" / "demo").exists()


def test_a_quota_hit_while_creating_is_told_apart_from_capacity(gcp, capsys, tmp_path):
    """The project-wide GPU quota is not in the region's list: the preflight passes, the insert fails with
    QUOTA_EXCEEDED, and `up` says which quota instead of trying the other zones."""
    gce, _, engines = gcp
    bake_image(gce, f"{FAMILY}-20261101-000000", "2026-11-01T00:00:00.000-07:00")
    gce.set_quota("GPUS_ALL_REGIONS", 8)
    gce.quotas.pop((PROJECT, "global", "GPUS_ALL_REGIONS"))  # the preflight cannot see it ...
    original = gce._check_instance

    def with_global_quota(project, scope, body):  # ... but the insert still enforces it
        gce.quotas[(PROJECT, "global", "GPUS_ALL_REGIONS")] = 8.0
        try:
            return original(project, scope, body)
        finally:
            gce.quotas.pop((PROJECT, "global", "GPUS_ALL_REGIONS"), None)

    gce._check_instance = with_global_quota
    up = gpuforge(capsys, *UP)

    assert up.code == 1 and "GPUS_ALL_REGIONS" in up.err and "quota, not for capacity" in up.err
    assert "trying" not in up.out
    assert gpuforge(capsys, "down", "--cluster", "demo", "--yes").code == 0


def test_a_type_sold_only_as_spot_is_refused_without_spot_before_anything(gcp, capsys, tmp_path):
    """A3 High with 1, 2 or 4 GPUs is sold only as Spot or Flex-start VMs (GCE accelerator-optimized machines)."""
    gce, _, engines = gcp
    up = gpuforge(capsys, "up", "--cloud", "gcp", "--name", "demo", "--project", PROJECT, "--instance-type",
                  "a3-highgpu-4g", "--yes")
    assert up.code == 1 and "a3-highgpu-4g is sold only as Spot (or Flex-start) VMs; add --spot" in up.err, up.err
    assert not engines.all_steps() and gce.names("networks") == {"default"}
    assert not (tmp_path / "home" / "clusters" / "demo").exists()


def up_for_recovery(gce, capsys, tmp_path):
    """The 2-node cluster up: our home, its VMs (name -> (zone scope, id)) and the one the test will lose."""
    bake_image(gce, "gpuforge-a100-1", "2026-11-01T00:00:00.000-00:00")
    assert gpuforge(capsys, *UP).code == 0
    before = {r["name"]: (scope, r["id"]) for scope, r in gce.items("instances")}
    return tmp_path / "home", before, sorted(before)[1]


def test_recovery_replaces_a_deleted_instance_in_the_same_zone(gcp, capsys, tmp_path):
    """A node's VM gone (deleted in the fake Compute endpoint): recovery's bring_back refreshes the stack and brings
    it up again, which creates that VM anew in its zone; the other node stays as it was."""
    from provision import inventory
    from provision.recovery import bring_back

    gce, _, _ = gcp
    home, before, lost = up_for_recovery(gce, capsys, tmp_path)
    with gce.lock:  # gone at once, as a VM Google deleted (the API's delete would need its operation polled)
        del gce.store["instances"][(PROJECT, before[lost][0])][lost]
    assert lost not in gce.names("instances")

    cluster = bring_back(inventory.resolve(home, "demo"), home, lambda line: None)
    after = {r["name"]: (scope, r["id"]) for scope, r in gce.items("instances")}
    assert set(after) == set(before) and after[lost][1] != before[lost][1]
    assert after[lost][0] == before[lost][0], "the new VM is in the lost one's zone"
    assert all(after[n] == before[n] for n in before if n != lost), "the healthy node must not be replaced"
    assert len(cluster.nodes) == 2
    assert gpuforge(capsys, "down", "--cluster", "demo", "--delete-data", "--yes").code == 0


def test_recovery_moves_the_cluster_to_the_next_zone_when_its_zone_has_no_capacity(gcp, capsys, tmp_path):
    """The lost VM's zone answers ZONE_RESOURCE_POOL_EXHAUSTED: the whole cluster moves to the next zone that offers
    the type, with a compact placement policy of that zone, saying so; the old zone's VMs and policy are gone."""
    from provision import inventory
    from provision.recovery import bring_back

    gce, _, _ = gcp
    home, before, lost = up_for_recovery(gce, capsys, tmp_path)
    scope = before[lost][0]
    zone = scope.removeprefix("zones/")
    with gce.lock:  # deleted by Google, with its boot disk (auto-delete)
        del gce.store["instances"][(PROJECT, scope)][lost]
        del gce.store["disks"][(PROJECT, scope)][lost]
    gce.exhaust(zone, "a2-highgpu-8g")
    capsys.readouterr()

    cluster = bring_back(inventory.resolve(home, "demo"), home, lambda line: None)

    said = " ".join(capsys.readouterr().out.split())
    assert f"{zone} has no a2-highgpu-8g capacity now; trying {REGION}-b" in said, said
    assert f"moving cluster demo to {REGION}-b: all 2 node(s) are replaced there" in said
    after = {r["name"]: (scope, r) for scope, r in gce.items("instances")}
    assert set(after) == set(before) and {s for s, _ in after.values()} == {f"zones/{REGION}-b"}
    used = {p.rsplit("/", 1)[-1] for _, r in after.values() for p in r.get("resourcePolicies", [])}
    stored = [r["name"] for _, r in gce.items("resourcePolicies")]
    assert len(used) == 1 and used == set(stored) and f"placement-{REGION}-b" in stored[0], (used, stored)
    assert registration(home)["zone"] == f"{REGION}-b" and len(cluster.nodes) == 2
    down = gpuforge(capsys, "down", "--cluster", "demo", "--delete-data", "--yes")
    assert down.code == 0, down.out + down.err
