"""The whole GCP bake with the real google-cloud-compute client against tests/fakes/gce.py, with the
SSH part run for real against a local-cluster node.

Operations stay RUNNING for one poll and take effect only when done, so a bake that does not wait on
its own endpoint, or images a disk before the builder has stopped (the fake refuses, as the API does),
fails here.
"""

from __future__ import annotations

import os
import sys
import tomllib
from pathlib import Path

import pytest

from images.common import BuilderInstance
from images.errors import BakeError
from images.gcp import bake_gcp
from images.spec import BakeSpec
from infra.cluster import ClusterInfo, NodeInfo
from infra.local import create_local_cluster, destroy_local_cluster
from provision.wheel import project_root
from tests.fakes.gce import FakeCompute

pytestmark = pytest.mark.integration

PROJECT = "bake-project"
ZONE = "zones/us-central1-a"
CIDRS = ("203.0.113.4/32",)
FAMILY = "gpuforge-ubuntu2204-cu130-torch213"
BASE = "ubuntu-2204-jammy-v20261101"


@pytest.fixture
def gce():
    with FakeCompute(project=PROJECT, pending_polls=1) as fake:
        fake.seed("images", "global", {"name": BASE, "family": "ubuntu-2204-lts", "diskSizeGb": "10"},
                  project="ubuntu-os-cloud")
        yield fake


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gpuforge-home")  # one wheel build for the module


@pytest.fixture
def node(home, monkeypatch):
    # Some runner commands (facts, markers) forward stdin; under pytest's capture reading it raises.
    monkeypatch.setattr(sys, "stdin", open(os.devnull))
    cluster = create_local_cluster("bake-gcp-node", 1, home)
    yield cluster
    destroy_local_cluster(Path(cluster.state_dir))


def spec(**changes) -> BakeSpec:
    return BakeSpec(**{"cloud": "gcp", "project": PROJECT, "ssh_cidrs": CIDRS, **changes})


def client_kwargs(gce: FakeCompute) -> dict:
    return {"client_options": gce.client_options, "credentials": gce.credentials}


def inventory(gce: FakeCompute) -> dict[str, set[str]]:
    return {c: gce.names(c) for c in ("instances", "disks", "firewalls", "images")}


def seed_image(gce: FakeCompute, name: str, family: str, baked: bool = True) -> dict:
    labels = {"gpuforge-baked": "true", "gpuforge-os": "ubuntu-2204"} if baked else {}
    return gce.seed("images", "global", {"name": name, "family": family, "labels": labels, "status": "READY"})


def infra_image_choice(monkeypatch, gce: FakeCompute) -> str:
    """The image infra/gcp.py's program boots nodes from, its getImages invoke answered by the fake
    through the real client with the program's own filter."""
    from google.cloud import compute_v1

    from tests.unit import test_pulumi_aws as program
    from tests.unit.test_pulumi_gcp import gcp_config

    images = compute_v1.ImagesClient(transport="rest", **client_kwargs(gce))

    class ImagesFromFake(program.RecordingMocks):
        def call(self, args):
            if args.token != "gcp:compute/getImages:getImages":
                return super().call(args)
            self.calls.append((args.token, dict(args.args)))
            request = compute_v1.ListImagesRequest(project=args.args["project"], filter=args.args["filter"])
            found = [{"name": i.name, "selfLink": i.self_link, "creationTimestamp": i.creation_timestamp,
                      "family": i.family, "labels": dict(i.labels), "archiveSizeBytes": 0, "description": "",
                      "diskSizeGb": i.disk_size_gb, "imageId": i.id, "sourceDisk": i.source_disk,
                      "sourceDiskId": "", "sourceImageId": ""} for i in images.list(request=request)]
            return {"id": "images", "images": found}

    monkeypatch.setattr(program, "RecordingMocks", ImagesFromFake)
    config = gcp_config(instanceType="g2-standard-8", nodes="1", zone="us-central1-a")
    run = program.run_program({**config, "gcp:project": PROJECT})
    node = run.one("compute/instance:Instance")
    return node.inputs["bootDisk"]["initializeParams"]["image"]


def test_gcp_bake_provisions_the_builder_images_it_into_the_family_and_removes_everything_else(
        gce, node, home, monkeypatch):
    old = [seed_image(gce, f"{FAMILY}-2026010{i}-000000", FAMILY) for i in (1, 2, 3)]
    bystanders = [seed_image(gce, "gpuforge-ubuntu2404-cu130-torch213-20260101-000000",
                             "gpuforge-ubuntu2404-cu130-torch213"),
                  seed_image(gce, "someone-elses-image", FAMILY, baked=False)]
    before = inventory(gce)
    seen: dict[str, object] = {}

    def connect_target(builder: BuilderInstance) -> ClusterInfo:
        seen["builder"] = builder
        seen["instance"] = dict(gce.get("instances", ZONE, builder.name))
        seen["disk"] = dict(gce.get("disks", ZONE, builder.name))
        seen["firewall"] = dict(gce.get("firewalls", "global", f"{builder.name}-ssh"))
        seen["key_mode"] = os.stat(builder.key_path).st_mode & 0o777
        return node

    events: list[str] = []
    result = bake_gcp(spec(), home, **client_kwargs(gce), connect_target=connect_target, on_event=events.append)

    # the node was really provisioned over SSH
    workdir = Path(node.head.workdir)
    stamp = (workdir / "venv" / "gpuforge-source.txt").read_text().strip()
    markers = {p.stem for p in (workdir / ".gpuforge" / "markers").glob("*.json")}
    assert {"base", "python_env", "workload", "verify"} <= markers
    # the builder: Canonical's family, the bake's key only, SSH from CIDRS only, no service account
    builder, instance, disk = seen["builder"], seen["instance"], seen["disk"]
    assert instance["machineType"].endswith("machineTypes/g2-standard-8")
    assert disk["sourceImage"].endswith(f"/projects/ubuntu-os-cloud/global/images/{BASE}") and disk["sizeGb"] == "100"
    metadata = {i["key"]: i["value"] for i in instance["metadata"]["items"]}
    public_key = Path(builder.key_path + ".pub").read_text() if Path(builder.key_path + ".pub").exists() else ""
    assert metadata["ssh-keys"].startswith("ubuntu:ssh-ed25519 ") and metadata["block-project-ssh-keys"] == "TRUE"
    assert public_key.strip() in metadata["ssh-keys"] and seen["key_mode"] == 0o600
    assert "serviceAccounts" not in instance and instance["labels"]["gpuforge-cluster"] == builder.name
    firewall = seen["firewall"]
    assert firewall["sourceRanges"] == list(CIDRS) and firewall["targetTags"] == instance["tags"]["items"]
    assert firewall["allowed"] == [{"IPProtocol": "tcp", "ports": ["22"]}]
    # the image: in the family, labelled as infra selects it, made from the builder's disk; infra picks it
    image = gce.get("images", "global", result.name)
    assert image["status"] == "READY" and image["family"] == FAMILY == result.family
    assert image["selfLink"] == result.image_id and image["sourceDisk"] == disk["selfLink"]
    version = tomllib.loads((project_root() / "pyproject.toml").read_text())["project"]["version"]
    assert image["labels"] == {
        "gpuforge-baked": "true", "gpuforge-os": "ubuntu-2204", "gpuforge-family": FAMILY,
        "gpuforge-driver": "580-167-08", "gpuforge-cuda": "13-0", "gpuforge-torch": "2-13-0",
        "gpuforge-version": version.replace(".", "-"), "gpuforge-source": stamp, "gpuforge-gpu": "l4",
        "gpuforge-driver-modules": "open"}
    # a bare `pulumi up` boots the family, which GCE resolves to its newest non-deprecated image: this one
    assert gce._resolve_image(PROJECT, infra_image_choice(monkeypatch, gce))["name"] == result.name
    # `fab up` records the concrete image at the first up
    from google.cloud import compute_v1

    from images.lookup import find_gcp_image

    images = compute_v1.ImagesClient(**client_kwargs(gce), transport="rest")
    assert find_gcp_image(images, PROJECT, "ubuntu-22.04", "L4").id == result.image_id
    # builder, its disk and the firewall are gone; the oldest baked image of the family is pruned
    after = inventory(gce)
    assert result.deleted_images == [old[0]["selfLink"]]
    assert after["images"] == before["images"] - {old[0]["name"]} | {result.name}
    assert {b["name"] for b in bystanders} <= after["images"]
    assert {k: v for k, v in after.items() if k != "images"} == {k: v for k, v in before.items() if k != "images"}
    assert not (home / "bakes" / builder.name).exists()


def stand_in(builder: BuilderInstance) -> ClusterInfo:
    """A target for failure tests whose provision never connects."""
    node = NodeInfo(name=builder.name, rank=0, public_address=builder.public_address, private_address="10.0.0.1")
    return ClusterInfo(name=builder.name, cloud="local", nodes=(node,))


def fail_provision(cluster: ClusterInfo, home: Path) -> None:
    raise BakeError("step nvidia-driver failed on the builder")


def interrupt_provision(cluster: ClusterInfo, home: Path) -> None:
    raise KeyboardInterrupt


@pytest.mark.parametrize("provision,raised", [(fail_provision, BakeError), (interrupt_provision, KeyboardInterrupt)])
def test_gcp_bake_failing_during_provisioning_deletes_the_builder_and_leaves_nothing(gce, home, provision, raised):
    before = inventory(gce)
    seen = []

    with pytest.raises(raised):
        bake_gcp(spec(), home, **client_kwargs(gce), provision=provision,
                 connect_target=lambda b: seen.append(b) or stand_in(b), on_event=lambda _: None)

    assert seen and inventory(gce) == before
    assert ("DELETE", f"/compute/v1/projects/{PROJECT}/{ZONE}/instances/{seen[0].name}") in gce.requests


def test_gcp_bake_refuses_an_image_name_in_use_before_launching_anything(gce, home):
    seed_image(gce, "golden-1", FAMILY)
    before = inventory(gce)

    with pytest.raises(BakeError, match="image golden-1 already exists in bake-project"):
        bake_gcp(spec(name="golden-1"), home, **client_kwargs(gce), provision=lambda c, h: None,
                 connect_target=stand_in, on_event=lambda _: None)

    assert inventory(gce) == before and not any(m == "POST" for m, _ in gce.requests)


def test_gcp_bake_whose_image_operation_fails_deletes_the_half_made_image_and_the_builder(gce, home):
    before = inventory(gce)
    gce.fail_next("image", "insert", "Quota 'IMAGES' exceeded", leave=True)

    with pytest.raises(BakeError, match="creating image half-made failed: Quota 'IMAGES' exceeded"):
        bake_gcp(spec(name="half-made"), home, **client_kwargs(gce), provision=lambda c, h: None,
                 connect_target=stand_in, on_event=lambda _: None)

    assert inventory(gce) == before
    assert ("DELETE", f"/compute/v1/projects/{PROJECT}/global/images/half-made") in gce.requests


def test_an_a3_builder_gets_gvnic_as_the_series_requires(gce, home):
    """Regression: the builder's NIC had no nicType, and GCE refuses A3 VMs without gVNIC (the fake applies the
    rule), so A3 bakes never started."""
    seen: dict[str, object] = {}

    def capture(builder: BuilderInstance) -> ClusterInfo:
        seen["nic"] = gce.get("instances", "zones/us-central1-b", builder.name)["networkInterfaces"][0]
        raise BakeError("stop after the launch")

    with pytest.raises(BakeError, match="stop after the launch"):
        bake_gcp(spec(instance_type="a3-highgpu-8g", zone="us-central1-b"), home, **client_kwargs(gce),
                 provision=lambda c, h: None, connect_target=capture, on_event=lambda _: None)

    assert seen["nic"]["nicType"] == "GVNIC"
    assert gce.names("instances") == set() and gce.names("firewalls") == set()


def test_a_project_without_a_default_network_bakes_on_the_network_and_subnetwork_given(home):
    with FakeCompute(project=PROJECT, pending_polls=1, default_network=False) as gce:
        gce.seed("images", "global", {"name": BASE, "family": "ubuntu-2204-lts", "diskSizeGb": "10"},
                 project="ubuntu-os-cloud")
        net = gce.seed("networks", "global", {"name": "lab-net", "autoCreateSubnetworks": False})
        gce.seed("subnetworks", "regions/us-central1", {"name": "lab-subnet", "network": net["selfLink"],
                                                        "ipCidrRange": "10.1.0.0/24"})
        with pytest.raises(BakeError, match="networks/default' was not found"):
            bake_gcp(spec(), home, **client_kwargs(gce), provision=lambda c, h: None, connect_target=stand_in,
                     on_event=lambda _: None)
        seen = {}

        def capture(builder: BuilderInstance) -> ClusterInfo:
            seen["instance"] = gce.get("instances", ZONE, builder.name)
            seen["firewall"] = gce.get("firewalls", "global", f"{builder.name}-ssh")
            raise BakeError("stop after the launch")

        with pytest.raises(BakeError, match="stop after the launch"):
            bake_gcp(spec(network="lab-net", subnetwork="lab-subnet"), home, **client_kwargs(gce),
                     provision=lambda c, h: None, connect_target=capture, on_event=lambda _: None)

        nic = seen["instance"]["networkInterfaces"][0]
        assert nic["network"].endswith("/global/networks/lab-net") and nic["subnetwork"].endswith("/lab-subnet")
        assert seen["firewall"]["network"].endswith("/global/networks/lab-net")
        assert gce.names("instances") == set() and gce.names("firewalls") == set()
