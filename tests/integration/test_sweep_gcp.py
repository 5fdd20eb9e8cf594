"""The GCP leftover sweep with the real google-cloud-compute client against tests/fakes/gce.py,
and google-cloud-storage against the GCS emulator.

Operations stay RUNNING for one poll and take effect only when done (as on the real API), so a
purge that does not wait on the right endpoint, or deletes in the wrong order, fails here: the
fake refuses to delete a disk an instance uses or a network a firewall or subnetwork uses.
"""

from __future__ import annotations

import uuid

import pytest

from infra.errors import SweepError
from infra.sweep import find_gcp_leftovers, purge_leftovers
from tests.fakes.gce import FakeCompute
from tests.fakes.gcs import gcs_emulator, gcs_env, make_gcs_client  # noqa: F401 - fixture

pytestmark = pytest.mark.integration

PROJECT = "test"
REGION = "us-central1"
ZONE = f"zones/{REGION}-a"
REGION_SCOPE = f"regions/{REGION}"


@pytest.fixture
def gce():
    with FakeCompute(project=PROJECT, pending_polls=1) as fake:
        yield fake


@pytest.fixture
def gcs(gcs_emulator, monkeypatch):  # noqa: F811 - the imported fixture
    for name, value in gcs_env(gcs_emulator).items():
        monkeypatch.setenv(name, value)
    return make_gcs_client(gcs_emulator)


def sweep_kwargs(gce: FakeCompute) -> dict:
    return {"client_options": gce.client_options, "credentials": gce.credentials}


def labels(cluster: str) -> dict:
    return {"gpuforge-cluster": cluster}


def seed_cluster(gce: FakeCompute, cluster: str, zone: str = ZONE) -> None:
    """What infra/gcp.py makes, plus a leaked data disk and address."""
    region = zone.rsplit("-", 1)[0].replace("zones/", "regions/")
    net = gce.seed("networks", "global", {"name": f"{cluster}-net", "autoCreateSubnetworks": False})
    subnet = gce.seed("subnetworks", region, {"name": f"{cluster}-subnet", "network": net["selfLink"],
                                              "ipCidrRange": "10.10.0.0/24"})
    gce.seed("firewalls", "global", {"name": f"{cluster}-ssh", "network": net["selfLink"],
                                     "sourceRanges": ["198.51.100.0/24"]})
    policy = gce.seed("resourcePolicies", region, {"name": f"{cluster}-placement"})
    gce.seed("instances", zone, {
        "name": f"{cluster}-node-0", "labels": labels(cluster), "machineType": f"{zone}/machineTypes/g2-standard-4",
        "resourcePolicies": [policy["selfLink"]],
        "disks": [{"boot": True, "autoDelete": True,
                   "initializeParams": {"sizeGb": "200", "labels": labels(cluster)}}],
        "networkInterfaces": [{"network": net["selfLink"], "subnetwork": subnet["selfLink"]}]})
    gce.seed("disks", zone, {"name": f"{cluster}-data", "sizeGb": "500", "labels": labels(cluster)})
    gce.seed("addresses", region, {"name": f"{cluster}-ip", "labels": labels(cluster)})


def seed_bystanders(gce: FakeCompute) -> None:
    seed_cluster(gce, "demo-2")  # a live cluster whose names also start with "demo-"
    gce.seed("instances", "zones/europe-west4-a", {"name": "demo-node-0", "labels": labels("demo")})
    gce.seed("disks", ZONE, {"name": "other-data", "labels": labels("other")})
    gce.seed("disks", ZONE, {"name": "scratch"})
    gce.seed("firewalls", "global", {"name": "default-allow-ssh"})
    gce.seed("images", "global", {"name": "demo-image-1", "family": "gpuforge", "labels": labels("demo"),
                                  "sourceDisk": f"{ZONE}/disks/scratch"})


def seed_buckets(gcs) -> dict[str, str]:
    """A bucket with a checkpoint for "demo" and for "demo-2"; the emulator is shared, so names are unique."""
    names = {}
    for cluster in ("demo", "demo-2"):
        names[cluster] = f"{cluster}-storage-{uuid.uuid4().hex[:8]}"
        bucket = gcs.create_bucket(names[cluster])
        bucket.labels = labels(cluster)
        bucket.patch()  # the emulator drops labels given at creation
        bucket.blob("runs/r1/ckpt.pt").upload_from_string(b"weights")
    return names


def test_find_gcp_leftovers_lists_exactly_this_clusters_resources(gce, gcs):
    seed_cluster(gce, "demo")
    gce.seed("firewalls", "global", {"name": "allow-internal", "network": "global/networks/demo-net"})
    seed_bystanders(gce)
    buckets = seed_buckets(gcs)

    found = find_gcp_leftovers("demo", PROJECT, REGION, **sweep_kwargs(gce))

    assert sorted((lo.kind, lo.name, lo.region) for lo in found if lo.kind != "bucket") == sorted([
        ("instance", "demo-node-0", f"{REGION}-a"), ("disk", "demo-node-0", f"{REGION}-a"),
        ("disk", "demo-data", f"{REGION}-a"), ("address", "demo-ip", REGION),
        ("resource-policy", "demo-placement", REGION), ("firewall", "demo-ssh", "global"),
        ("firewall", "allow-internal", "global"), ("subnetwork", "demo-subnet", REGION),
        ("network", "demo-net", "global")])
    assert [lo.name for lo in found if lo.kind == "bucket"] == [buckets["demo"]]
    ids = {lo.name: lo.id for lo in found if lo.kind != "bucket"}
    assert ids["demo-data"] == gce.get("disks", ZONE, "demo-data")["id"]
    detail = {lo.name: lo.detail for lo in found}
    assert detail["demo-data"].startswith("READY, 500 GB")
    assert "used by demo-node-0" in {lo.name: lo.detail for lo in found if lo.kind == "disk"}["demo-node-0"]
    assert detail[buckets["demo"]].startswith("has objects")
    assert [lo.kind for lo in found][:1] == ["instance"] and found[-1].kind == "bucket"


def test_purge_gcp_leftovers_removes_them_in_order_and_spares_others(gce, gcs):
    seed_cluster(gce, "demo")
    seed_bystanders(gce)
    buckets = seed_buckets(gcs)
    before = {c: gce.names(c, scope) for c, scope in (("instances", ZONE), ("disks", ZONE),
                                                       ("firewalls", "global"), ("images", "global"))}

    kwargs = sweep_kwargs(gce)
    results = purge_leftovers(find_gcp_leftovers("demo", PROJECT, REGION, **kwargs), project=PROJECT, **kwargs)

    assert [(lo.kind, lo.name, err) for lo, err in results if err] == []
    assert find_gcp_leftovers("demo", PROJECT, REGION, **kwargs) == []
    assert gce.names("instances", ZONE) == before["instances"] - {"demo-node-0"}
    assert gce.names("disks", ZONE) == before["disks"] - {"demo-node-0", "demo-data"}
    assert gce.names("firewalls") == before["firewalls"] - {"demo-ssh"}
    assert gce.names("networks") == {"demo-2-net"}
    assert gce.names("images") == {"demo-image-1"}  # baked images are never leftovers
    assert gce.names("instances", "zones/europe-west4-a") == {"demo-node-0"}
    remaining = {b.name for b in gcs.list_buckets()}
    assert buckets["demo-2"] in remaining and buckets["demo"] not in remaining
    deletes = [path for method, path in gce.requests if method == "DELETE"]
    assert deletes.index(f"/compute/v1/projects/{PROJECT}/global/networks/demo-net") == len(deletes) - 1


def test_purge_gcp_reports_a_failure_and_goes_on(gce, gcs):
    seed_cluster(gce, "demo")
    # a stranger's VM uses the cluster's leaked disk: that delete fails, the rest goes ahead
    gce.seed("instances", ZONE, {"name": "stranger", "disks": [{"source": f"{ZONE}/disks/demo-data"}]})

    kwargs = sweep_kwargs(gce)
    results = {lo.name: err for lo, err in purge_leftovers(
        find_gcp_leftovers("demo", PROJECT, REGION, **kwargs), project=PROJECT, **kwargs)}

    assert "resourceInUseByAnotherResource" in results["demo-data"] or "already being used" in results["demo-data"]
    assert results["demo-net"] is None and results["demo-ssh"] is None
    assert [lo.name for lo in find_gcp_leftovers("demo", PROJECT, REGION, **kwargs)] == ["demo-data"]


def test_find_gcp_leftovers_skips_buckets_without_a_storage_endpoint(gce, monkeypatch):
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    seed_cluster(gce, "demo")

    found = find_gcp_leftovers("demo", PROJECT, REGION, **sweep_kwargs(gce))

    assert "bucket" not in {lo.kind for lo in found} and "disk" in {lo.kind for lo in found}


def test_purge_gcp_needs_a_project_before_any_call(gce):
    seed_cluster(gce, "demo")
    found = find_gcp_leftovers("demo", PROJECT, REGION, **sweep_kwargs(gce))
    calls = len(gce.requests)

    with pytest.raises(SweepError, match="project="):
        purge_leftovers(found, **sweep_kwargs(gce))

    assert len(gce.requests) == calls and "demo-data" in gce.names("disks")
