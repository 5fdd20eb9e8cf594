"""The GCP sweep with the real google-cloud-compute client against tests/fakes/gce.py (Compute and IAM's service
accounts), and google-cloud-storage against the GCS emulator.

Operations stay RUNNING for one poll and take effect only when done (as on the real API), so a purge that does
not wait on the right endpoint, or deletes in the wrong order, fails here: the fake refuses to delete a disk an
instance uses or a network a firewall or subnetwork uses. A stranger's resources named like ours (`demo-...`)
carry no marker and must survive.
"""

from __future__ import annotations

import uuid

import pytest

from infra.cluster import ownership_marker
from infra.errors import SweepError
from infra.sweep import find_gcp_leftovers, purge_leftovers
from tests.fakes.gce import FakeCompute
from tests.fakes.gcs import gcs_emulator, gcs_env, make_gcs_client  # noqa: F401 - fixture

pytestmark = pytest.mark.integration

PROJECT = "test-project"
REGION = "us-central1"
ZONE = f"zones/{REGION}-a"
ID = "abc123def456"


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


def labels(cluster: str, cluster_id: str = ID) -> dict:
    return {"gpuforge-cluster": cluster, "gpuforge-cluster-id": cluster_id}


def seed_cluster(gce: FakeCompute, cluster: str, zone: str = ZONE, cluster_id: str = ID) -> None:
    """What infra/gcp.py makes (unlabelled types marked in their description), plus a leaked disk and address."""
    region = zone.rsplit("-", 1)[0].replace("zones/", "regions/")
    mark = ownership_marker(cluster, cluster_id)
    net = gce.seed("networks", "global", {"name": f"{cluster}-net-1a2b", "autoCreateSubnetworks": False,
                                          "description": f"gpuforge cluster {mark}"})
    subnet = gce.seed("subnetworks", region, {"name": f"{cluster}-subnet-3c4d", "network": net["selfLink"],
                                              "ipCidrRange": "10.10.0.0/24", "description": f"gpuforge {mark}"})
    gce.seed("firewalls", "global", {"name": f"{cluster}-ssh-5e6f", "network": net["selfLink"],
                                     "sourceRanges": ["198.51.100.0/24"], "description": f"SSH {mark}"})
    policy = gce.seed("resourcePolicies", region, {"name": f"{cluster}-placement-7a8b",
                                                   "description": f"compact placement {mark}"})
    gce.seed("instances", zone, {
        "name": f"{cluster}-0", "labels": labels(cluster, cluster_id),
        "machineType": f"{zone}/machineTypes/g2-standard-4", "resourcePolicies": [policy["selfLink"]],
        "disks": [{"boot": True, "autoDelete": True,
                   "initializeParams": {"sizeGb": "200", "labels": labels(cluster, cluster_id)}}],
        "networkInterfaces": [{"network": net["selfLink"], "subnetwork": subnet["selfLink"]}]})
    gce.seed("disks", zone, {"name": f"{cluster}-data", "sizeGb": "500", "labels": labels(cluster, cluster_id)})
    gce.seed("addresses", region, {"name": f"{cluster}-ip", "labels": labels(cluster, cluster_id)})
    gce.iam.create(PROJECT, {"accountId": f"gf-{cluster}-sa", "serviceAccount": {
        "displayName": f"gpuforge cluster {cluster} nodes", "description": f"gpuforge cluster nodes {mark}"}})


def seed_strangers(gce: FakeCompute) -> None:
    """The user's own resources named like the cluster's, another live cluster, and a baked image."""
    seed_cluster(gce, "demo-2", cluster_id="second000000")  # a live cluster whose names also start with "demo-"
    gce.seed("instances", "zones/europe-west4-a", {"name": "demo-0", "labels": labels("demo")})  # other region
    gce.seed("disks", ZONE, {"name": "other-data", "labels": labels("other", "other0000000")})
    gce.seed("disks", ZONE, {"name": "demo-scratch"})
    prod = gce.seed("networks", "global", {"name": "demo-prod", "autoCreateSubnetworks": True})
    gce.seed("firewalls", "global", {"name": "demo-allow-https", "network": prod["selfLink"]})
    gce.seed("resourcePolicies", f"regions/{REGION}", {"name": "demo-placement-daily",
                                                       "description": "a user's snapshot schedule"})
    gce.iam.create(PROJECT, {"accountId": "demo-ci-runner", "serviceAccount": {"displayName": "demo CI"}})
    gce.seed("images", "global", {"name": "demo-image-1", "family": "gpuforge", "labels": labels("demo"),
                                  "sourceDisk": f"{ZONE}/disks/demo-scratch"})


def seed_buckets(gcs) -> dict[str, str]:
    """A bucket with a checkpoint for "demo" and for "demo-2"; the emulator is shared, so names are unique."""
    names = {}
    for cluster in ("demo", "demo-2"):
        names[cluster] = f"gpuforge-{cluster}-{uuid.uuid4().hex[:8]}"
        bucket = gcs.create_bucket(names[cluster])
        bucket.labels = labels(cluster)
        bucket.patch()  # the emulator drops labels given at creation
        bucket.blob("runs/r1/ckpt.pt").upload_from_string(b"weights")
    return names


def test_find_gcp_leftovers_claims_by_label_and_marker_never_by_name(gce, gcs):
    seed_cluster(gce, "demo")
    seed_strangers(gce)
    buckets = seed_buckets(gcs)

    found = find_gcp_leftovers("demo", PROJECT, REGION, **sweep_kwargs(gce))

    assert sorted((lo.kind, lo.name, lo.region) for lo in found if lo.kind != "bucket") == sorted([
        ("instance", "demo-0", f"{REGION}-a"), ("disk", "demo-0", f"{REGION}-a"),
        ("disk", "demo-data", f"{REGION}-a"), ("address", "demo-ip", REGION),
        ("resource-policy", "demo-placement-7a8b", REGION), ("firewall", "demo-ssh-5e6f", "global"),
        ("subnetwork", "demo-subnet-3c4d", REGION), ("network", "demo-net-1a2b", "global"),
        ("service-account", "gf-demo-sa", "global")])
    assert [lo.name for lo in found if lo.kind == "bucket"] == [buckets["demo"]]
    assert {(lo.owner, lo.owner_id) for lo in found} == {("demo", ID)}
    detail = {lo.name: lo.detail for lo in found}
    assert detail["demo-data"].startswith("READY, 500 GB")
    assert detail[buckets["demo"]] == "1 object version(s), 7 bytes"
    assert [lo.kind for lo in found][:1] == ["instance"] and found[-1].kind == "bucket"


def test_purge_removes_them_in_order_and_spares_strangers(gce, gcs):
    seed_cluster(gce, "demo")
    seed_strangers(gce)
    buckets = seed_buckets(gcs)
    before = {c: gce.names(c) for c in ("instances", "disks", "firewalls", "networks", "resourcePolicies", "images")}
    accounts_before = set(gce.iam.accounts[PROJECT])

    kwargs = sweep_kwargs(gce)
    results = purge_leftovers(find_gcp_leftovers("demo", PROJECT, REGION, **kwargs), project=PROJECT, **kwargs)

    assert [(lo.kind, lo.name, err) for lo, err in results if err] == []
    assert find_gcp_leftovers("demo", PROJECT, REGION, **kwargs) == []
    assert gce.names("instances", ZONE) == {"demo-2-0"}
    assert gce.names("instances", "zones/europe-west4-a") == {"demo-0"}
    assert gce.names("disks") == before["disks"] - {"demo-data"} - {"demo-0"}
    assert gce.names("firewalls") == before["firewalls"] - {"demo-ssh-5e6f"}
    assert "demo-allow-https" in gce.names("firewalls")
    assert gce.names("networks") == before["networks"] - {"demo-net-1a2b"}
    assert gce.names("resourcePolicies") == before["resourcePolicies"] - {"demo-placement-7a8b"}
    assert gce.names("images") == {"demo-image-1"}  # baked images are never leftovers
    assert set(gce.iam.accounts[PROJECT]) == accounts_before - {f"gf-demo-sa@{PROJECT}.iam.gserviceaccount.com"}
    remaining = {b.name for b in gcs.list_buckets()}
    assert buckets["demo-2"] in remaining and buckets["demo"] not in remaining
    deletes = [path for method, path in gce.requests if method == "DELETE" and "/compute/" in path]
    assert deletes[-1].endswith("/global/networks/demo-net-1a2b")


def test_a_users_firewall_in_the_clusters_network_is_not_deleted_and_the_network_delete_says_why(gce, gcs):
    seed_cluster(gce, "demo")
    network = gce.get("networks", "global", "demo-net-1a2b")
    gce.seed("firewalls", "global", {"name": "allow-office", "network": network["selfLink"]})

    kwargs = sweep_kwargs(gce)
    results = {lo.name: err for lo, err in purge_leftovers(
        find_gcp_leftovers("demo", PROJECT, REGION, **kwargs), project=PROJECT, **kwargs)}

    assert "allow-office" not in results and "allow-office" in gce.names("firewalls")
    assert "already being used by" in results["demo-net-1a2b"] and "allow-office" in results["demo-net-1a2b"]


def test_purge_gcp_reports_a_failure_and_goes_on(gce, gcs):
    seed_cluster(gce, "demo")
    # a stranger's VM uses the cluster's leaked disk: that delete fails, the rest goes ahead
    gce.seed("instances", ZONE, {"name": "stranger", "disks": [{"source": f"{ZONE}/disks/demo-data"}]})

    kwargs = sweep_kwargs(gce)
    results = {lo.name: err for lo, err in purge_leftovers(
        find_gcp_leftovers("demo", PROJECT, REGION, **kwargs), project=PROJECT, **kwargs)}

    assert "already being used" in results["demo-data"]
    assert results["demo-net-1a2b"] is None and results["demo-ssh-5e6f"] is None
    assert [lo.name for lo in find_gcp_leftovers("demo", PROJECT, REGION, **kwargs)] == ["demo-data"]


def test_what_the_stack_recorded_is_claimed_without_a_marker(gce, gcs):
    net = gce.seed("networks", "global", {"name": "demo-net-9z", "autoCreateSubnetworks": False})

    found = find_gcp_leftovers("demo", PROJECT, REGION, recorded=frozenset({net["selfLink"]}), **sweep_kwargs(gce))

    assert [(lo.kind, lo.name, lo.recorded) for lo in found] == [("network", "demo-net-9z", True)]


def test_find_gcp_leftovers_skips_buckets_without_a_storage_endpoint(gce, monkeypatch):
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    seed_cluster(gce, "demo")

    found = find_gcp_leftovers("demo", PROJECT, REGION, **sweep_kwargs(gce))

    assert "bucket" not in {lo.kind for lo in found} and "disk" in {lo.kind for lo in found}


def test_purge_gcp_needs_a_project_before_any_call(gce, gcs):
    seed_cluster(gce, "demo")
    found = find_gcp_leftovers("demo", PROJECT, REGION, **sweep_kwargs(gce))
    calls = len(gce.requests)

    with pytest.raises(SweepError, match="project="):
        purge_leftovers(found, **sweep_kwargs(gce))

    assert len(gce.requests) == calls and "demo-data" in gce.names("disks")
