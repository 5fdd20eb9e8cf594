"""The real Pulumi program (infra/__main__.py) on GCP under Pulumi's mocks (preview=False)."""

from __future__ import annotations

import pytest

from infra import catalog
from tests.unit.test_pulumi_aws import KEY, STACK, ProgramRun, run_program

PROJECT = "my-project-1"
SA_EMAIL = f"gf-{STACK}-sa@{PROJECT}.iam.gserviceaccount.com"
# GCP resource types that take no labels (the API has none on them).
GCP_UNLABELLED = {
    "gcp:compute/network:Network",
    "gcp:compute/subnetwork:Subnetwork",
    "gcp:compute/firewall:Firewall",
    "gcp:compute/resourcePolicy:ResourcePolicy",
    "gcp:serviceaccount/account:Account",
    "gcp:storage/bucketIAMMember:BucketIAMMember",
}


def gcp_config(**overrides: str) -> dict[str, str]:
    config = {
        "gpuforge:cloud": "gcp",
        "gpuforge:instanceType": "a2-highgpu-8g",
        "gpuforge:nodes": "2",
        "gpuforge:region": "us-central1",
        "gpuforge:zone": "us-central1-c",
        "gpuforge:sshPublicKey": KEY,
        "gpuforge:sshKeyPath": "/home/me/.ssh/gpuforge_test",
        "gpuforge:sshCidrs": '["203.0.113.4/32"]',
        "gcp:project": PROJECT,
    }
    config.update({f"gpuforge:{k}": v for k, v in overrides.items()})
    return config


@pytest.fixture(scope="module")
def a2_pair() -> ProgramRun:
    return run_program(gcp_config())


@pytest.fixture(scope="module")
def n1_t4() -> ProgramRun:
    return run_program(gcp_config(instanceType="n1-standard-8", accelerator="nvidia-tesla-t4:1", nodes="1"))


def instances(run: ProgramRun):
    return sorted(run.of_type("compute/instance:Instance"), key=lambda r: r.name)


def test_a2_nodes_stop_for_maintenance_and_share_a_compact_placement(a2_pair):
    policy = a2_pair.one("ResourcePolicy")
    assert policy.inputs["groupPlacementPolicy"] == {"collocation": "COLLOCATED"}
    assert policy.inputs["region"] == "us-central1"
    nodes = instances(a2_pair)
    assert [n.inputs["name"] for n in nodes] == ["test-0", "test-1"]
    for node in nodes:
        assert node.inputs["machineType"] == "a2-highgpu-8g" and node.inputs["zone"] == "us-central1-c"
        assert node.inputs["scheduling"]["onHostMaintenance"] == "TERMINATE"
        assert node.inputs["scheduling"]["provisioningModel"] == "STANDARD"
        assert node.inputs["resourcePolicies"] == policy.outputs["selfLink"]
        assert node.inputs.get("guestAccelerators", []) == []


def test_n1_gets_its_gpus_as_guest_accelerators_and_one_node_needs_no_placement(n1_t4):
    (node,) = instances(n1_t4)
    assert node.inputs["machineType"] == "n1-standard-8"
    assert node.inputs["guestAccelerators"] == [{"type": "nvidia-tesla-t4", "count": 1}]
    assert node.inputs["scheduling"]["onHostMaintenance"] == "TERMINATE"
    assert not n1_t4.of_type("ResourcePolicy") and "resourcePolicies" not in node.inputs
    head = n1_t4.cluster.head
    assert (head.gpu_model, head.gpu_count, head.instance_type) == ("T4", 1, "n1-standard-8")
    assert n1_t4.outputs["costPerHour"] == catalog.hourly_cost("gcp", "n1-standard-8", 1, "nvidia-tesla-t4:1")


def test_spot_uses_the_spot_provisioning_model():
    run = run_program(gcp_config(spot="true", nodes="1"))
    (node,) = instances(run)
    scheduling = node.inputs["scheduling"]
    assert scheduling["provisioningModel"] == "SPOT" and scheduling["preemptible"] is True
    assert scheduling["automaticRestart"] is False and scheduling["onHostMaintenance"] == "TERMINATE"


def test_a3_nodes_use_gvnic():
    run = run_program(gcp_config(instanceType="a3-highgpu-8g", nodes="1"))
    (node,) = instances(run)
    assert node.inputs["networkInterfaces"][0]["nicType"] == "GVNIC"


def test_cluster_output_is_a_clusterinfo_record(a2_pair):
    cluster = a2_pair.cluster
    assert (cluster.name, cluster.cloud, cluster.region) == (STACK, "gcp", "us-central1")
    bucket = a2_pair.one("storage/bucket:Bucket")
    assert cluster.storage_url == f"gs://{bucket.outputs['name']}"
    nodes = instances(a2_pair)
    assert [n.public_address for n in cluster.nodes] == [
        i.outputs["networkInterfaces"][0]["accessConfigs"][0]["natIp"] for i in nodes
    ]
    assert [n.private_address for n in cluster.nodes] == [i.outputs["networkInterfaces"][0]["networkIp"] for i in nodes]
    head = cluster.head
    assert (head.user, head.ssh_port, head.key_path) == ("ubuntu", 22, "/home/me/.ssh/gpuforge_test")
    assert (head.gpu_model, head.gpu_count) == ("A100", 8)
    assert cluster.extra["nvswitch"] is True and cluster.extra["zone"] == "us-central1-c"


# -- security properties ----------------------------------------------------------------------------
def firewalls(run: ProgramRun) -> dict[str, dict]:
    return {r.name: r.inputs for r in run.of_type("compute/firewall:Firewall")}


def test_ssh_only_from_configured_cidrs_and_all_traffic_inside_the_cluster(a2_pair):
    rules = firewalls(a2_pair)
    ssh = rules["test-ssh"]
    assert ssh["sourceRanges"] == ["203.0.113.4/32"] and ssh["allows"] == [{"protocol": "tcp", "ports": ["22"]}]
    internal = rules["test-internal"]
    assert internal["allows"] == [{"protocol": "all"}]
    assert internal["sourceTags"] == internal["targetTags"] == ["gpuforge-test"]
    assert "sourceRanges" not in internal
    for node in instances(a2_pair):
        assert node.inputs["tags"] == ["gpuforge-test"]


def test_no_ssh_firewall_without_ssh_cidrs_and_the_user_is_told():
    config = gcp_config(nodes="1")
    del config["gpuforge:sshCidrs"]
    run = run_program(config)
    assert set(firewalls(run)) == {"test-internal"}
    assert all("0.0.0.0/0" not in str(rule) for rule in firewalls(run).values())
    assert any("pulumi config set --path 'gpuforge:sshCidrs[0]'" in w for w in run.warnings)


def test_bucket_is_uniform_not_public_and_versioned(a2_pair):
    bucket = a2_pair.one("storage/bucket:Bucket").inputs
    assert bucket["uniformBucketLevelAccess"] is True
    assert bucket["publicAccessPrevention"] == "enforced"
    assert bucket["versioning"] == {"enabled": True}
    assert bucket["forceDestroy"] is False and bucket["location"] == "US-CENTRAL1"
    (rule,) = bucket["lifecycleRules"]
    assert rule["action"] == {"type": "Delete"} and rule["condition"]["daysSinceNoncurrentTime"] == 30


def test_service_account_storage_grant_is_this_bucket_only(a2_pair):
    (grant,) = a2_pair.of_type("BucketIAMMember")
    bucket = a2_pair.one("storage/bucket:Bucket")
    assert grant.inputs == {
        "bucket": bucket.outputs["name"], "role": "roles/storage.objectAdmin", "member": f"serviceAccount:{SA_EMAIL}"
    }
    iam_types = [r.typ for r in a2_pair.resources if "IAM" in r.typ or "iam" in r.typ.split(":")[1]]
    assert iam_types == ["gcp:storage/bucketIAMMember:BucketIAMMember"]  # nothing project-wide
    for node in instances(a2_pair):
        assert node.inputs["serviceAccount"]["email"] == SA_EMAIL
        assert "https://www.googleapis.com/auth/cloud-platform" not in node.inputs["serviceAccount"]["scopes"]


def test_cluster_key_is_in_instance_metadata_and_project_keys_are_blocked(a2_pair):
    for node in instances(a2_pair):
        metadata = node.inputs["metadata"]
        assert metadata["ssh-keys"] == f"ubuntu:{KEY}"
        assert metadata["block-project-ssh-keys"] == "TRUE"


def test_boot_disk_has_the_configured_size():
    run = run_program(gcp_config(diskGb="750", nodes="1"))
    (node,) = instances(run)
    params = node.inputs["bootDisk"]["initializeParams"]
    assert params["size"] == 750 and params["type"] == "pd-balanced"


def test_the_bucket_is_retained_by_a_destroy_and_nothing_else_is(a2_pair):
    assert [r.typ for r in a2_pair.resources if r.retain_on_delete] == ["gcp:storage/bucket:Bucket"]


def test_unlabelled_resources_carry_the_ownership_marker():
    """Networks, subnetworks, firewalls, the placement policy and the service account take no labels: their
    description carries `[gpuforge-cluster=NAME gpuforge-cluster-id=ID]`, which the sweep reads (never the name)."""
    from infra.cluster import read_marker

    run = run_program(gcp_config(clusterId="abc123def456"))
    for resource in run.resources:
        if resource.typ in GCP_UNLABELLED and resource.typ != "gcp:storage/bucketIAMMember:BucketIAMMember":
            assert read_marker(resource.inputs["description"]) == (STACK, "abc123def456"), resource.typ
    assert run.one("storage/bucket:Bucket").inputs["labels"]["gpuforge-cluster-id"] == "abc123def456"


def test_n1_clusters_get_no_compact_placement_policy():
    """GCE takes compact placement for A2, A3 and G2, not N1 (regression: every multi-node cluster got one)."""
    mine = "projects/p/global/images/mine"  # a given image: no lookup in this test
    run = run_program(gcp_config(instanceType="n1-standard-8", accelerator="nvidia-tesla-t4:1", nodes="2", image=mine))
    assert not run.of_type("ResourcePolicy")
    assert all("resourcePolicies" not in n.inputs for n in instances(run))
    assert run_program(gcp_config(instanceType="g2-standard-8", nodes="2", image=mine)).of_type("ResourcePolicy")


def test_every_labellable_resource_carries_the_cluster_label(a2_pair):
    for resource in a2_pair.resources:
        if not resource.typ.startswith("gcp:") or resource.typ in GCP_UNLABELLED:
            continue
        assert resource.inputs.get("labels", {}).get("gpuforge-cluster") == STACK, resource.typ
    for node in instances(a2_pair):
        assert node.inputs["bootDisk"]["initializeParams"]["labels"] == {"gpuforge-cluster": STACK}
    provider = a2_pair.one("pulumi:providers:gcp").inputs
    assert provider["project"] == PROJECT and "gpuforge-cluster" in provider["defaultLabels"]


# -- image selection --------------------------------------------------------------------------------
def image_of(run: ProgramRun) -> str:
    return instances(run)[0].inputs["bootDisk"]["initializeParams"]["image"]


FAMILY = "gpuforge-ubuntu2204-cu130-torch213"


def baked(name: str, created: str, modules: str = "open", os_label: str = "ubuntu-2204", status: str = "READY",
          family: str = FAMILY) -> dict:
    """An image as images/gcp.py labels it, as images.list returns it (status included)."""
    labels = {"gpuforge-baked": "true", "gpuforge-os": os_label, "gpuforge-driver-modules": modules}
    return {
        "name": name, "selfLink": f"https://www.googleapis.com/compute/v1/projects/{PROJECT}/global/images/{name}",
        "creationTimestamp": created, "family": family, "labels": labels, "status": status,
        "archiveSizeBytes": 0, "description": "", "diskSizeGb": 200, "imageId": 1, "sourceDisk": "",
        "sourceDiskId": "", "sourceImageId": "",
    }


@pytest.mark.parametrize(
    "os_name,family",
    [("ubuntu-22.04", "common-cu128-ubuntu-2204-nvidia-570"), ("ubuntu-24.04", "common-cu128-ubuntu-2404-nvidia-570")],
)
def test_without_a_baked_image_a_deep_learning_vm_family_is_used(os_name, family):
    run = run_program(gcp_config(os=os_name, nodes="1"))
    assert image_of(run) == f"projects/deeplearning-platform-release/global/images/family/{family}"
    ((token, args),) = run.calls
    assert token == "gcp:compute/getImages:getImages" and args["project"] == PROJECT
    assert any("pulumi config set gpuforge:image" in w for w in run.warnings)


def test_the_baked_lookup_filter_is_in_the_documented_form_and_needs_ready():
    """Regression: `labels.a=x AND labels.b=y` is not a documented form (each expression needs parentheses) and
    the lookup took images that were not READY. The harness applies the API's rules to the program's filter."""
    run = run_program(gcp_config(nodes="1"), gcp_images=[baked("gpuforge-pending", "2026-10-30T10:00:00Z",
                                                                status="PENDING")])
    assert image_of(run).startswith("projects/deeplearning-platform-release/")
    run = run_program(gcp_config(nodes="1"), gcp_images=[baked("gpuforge-ready", "2026-10-30T10:00:00Z")])
    assert image_of(run) == f"projects/{PROJECT}/global/images/family/{FAMILY}"  # GCE boots the family's newest


@pytest.mark.parametrize(
    "overrides, picked",
    [
        ({"instanceType": "n1-standard-8", "accelerator": "nvidia-tesla-v100:1"},
         "family/gpuforge-ubuntu2204-cu126-torch213"),
        ({}, f"family/{FAMILY}"),  # a2-highgpu-8g
        ({"os": "ubuntu-24.04"}, "family/common-cu128-ubuntu-2404-nvidia-570"),  # no baked image for noble
    ],
)
def test_baked_image_follows_the_gpus_driver_flavour(overrides, picked):
    """Proprietary-module GPUs (V100, cu126) and open-module ones (A100, cu130) never share a baked image."""
    images = [baked("gpuforge-volta", "2026-10-30T10:00:00.000-07:00", modules="proprietary",
                    family="gpuforge-ubuntu2204-cu126-torch213"),
              baked("gpuforge-ampere", "2026-10-01T10:00:00.000-07:00")]
    run = run_program(gcp_config(nodes="1", **overrides), gcp_images=images)
    assert image_of(run).endswith("/" + picked)


def test_image_override_skips_lookups():
    run = run_program(gcp_config(image="projects/p/global/images/mine", nodes="1"))
    assert image_of(run) == "projects/p/global/images/mine" and run.calls == []


def test_the_cluster_record_carries_the_project_so_down_can_destroy_and_sweep_it():
    """Regression: ClusterInfo.extra never held the project, so `fab down` of a GCP cluster swept project ""."""
    run = run_program(gcp_config(nodes="1", image="projects/p/global/images/mine"))
    assert run.cluster.extra.get("project") == PROJECT
