"""`gpuforge sweep` as a user runs it (the installed console command, in a child process), pointed at emulators the
way the README says: AWS_ENDPOINT_URL for boto3 (moto server), GPUFORGE_GCP_ENDPOINT for our Compute and IAM clients
(tests/fakes/gce.py) and STORAGE_EMULATOR_HOST for GCS. And `gpuforge bake --network/--subnetwork`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import boto3
import pytest

from infra.cluster import ownership_marker
from tests.fakes.gce import FakeCompute
from tests.fakes.gcs import gcs_emulator, gcs_env  # noqa: F401 - fixture
from tests.fakes.s3 import reset_moto, s3_env, start_moto_server
from tests.integration.lifecycle import gpuforge

pytestmark = pytest.mark.integration

GPUFORGE = str(Path(sys.executable).parent / "gpuforge")
BUILDER = "bake-261201-101010-ab12"


def cli(tmp_path: Path, *argv: str, stdin: str = "", **env: str) -> subprocess.CompletedProcess:
    full = {**{k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "GPUFORGE_"))},
            "GPUFORGE_HOME": str(tmp_path / "home"), "COLUMNS": "200", **env}
    return subprocess.run([GPUFORGE, *argv], cwd=tmp_path, env=full, input=stdin, capture_output=True, text=True,
                          timeout=120)


@pytest.fixture(scope="module")
def moto_url():
    url, stop = start_moto_server()
    yield url
    stop()


def test_sweep_finds_and_purges_a_crashed_bakes_resources_on_aws(moto_url, tmp_path):
    reset_moto(moto_url)
    env = {**s3_env(moto_url), "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"}
    ec2 = boto3.client("ec2", endpoint_url=moto_url, region_name="us-east-1", aws_access_key_id="t",
                       aws_secret_access_key="t")
    tags = [{"ResourceType": "security-group", "Tags": [{"Key": "gpuforge:cluster", "Value": BUILDER},
                                                        {"Key": "gpuforge:builder", "Value": BUILDER}]}]
    ours = ec2.create_security_group(GroupName=BUILDER, Description="bake", TagSpecifications=tags)["GroupId"]
    stranger = ec2.create_security_group(GroupName=f"{BUILDER}-copy", Description="a stranger's")["GroupId"]

    listed = cli(tmp_path, "sweep", "--cloud", "aws", **env)
    assert listed.returncode == 0, listed.stderr
    assert ours in listed.stdout and stranger not in listed.stdout and BUILDER in listed.stdout
    assert "clusters this controller does not know" in listed.stdout

    declined = cli(tmp_path, "sweep", "--cloud", "aws", "--cluster", BUILDER, "--purge", stdin="n\n", **env)
    assert declined.returncode == 1 and "delete these 1 resource(s) of " + BUILDER in declined.stdout, declined.stdout
    assert "nothing was changed" in declined.stderr
    assert ours in {g["GroupId"] for g in ec2.describe_security_groups()["SecurityGroups"]}

    purged = cli(tmp_path, "sweep", "--cloud", "aws", "--cluster", BUILDER, "--purge", "--yes", **env)
    assert purged.returncode == 0, purged.stderr
    groups = {g["GroupId"] for g in ec2.describe_security_groups()["SecurityGroups"]}
    assert ours not in groups and stranger in groups


def test_sweep_finds_and_purges_a_crashed_bakes_resources_on_gcp(gcs_emulator, tmp_path):  # noqa: F811
    with FakeCompute(project="lab-project") as gce:
        gce.seed("firewalls", "global", {"name": f"{BUILDER}-ssh", "network": "global/networks/default",
                                         "description": f"gpuforge image bake {ownership_marker(BUILDER)}"})
        gce.seed("firewalls", "global", {"name": f"{BUILDER}-ssh-mine", "network": "global/networks/default"})
        gce.seed("instances", "zones/us-central1-a", {"name": BUILDER, "labels": {"gpuforge-cluster": BUILDER}})
        env = {"GPUFORGE_GCP_ENDPOINT": gce.endpoint, **gcs_env(gcs_emulator)}

        listed = cli(tmp_path, "sweep", "--cloud", "gcp", "--project", "lab-project", **env)
        assert listed.returncode == 0, listed.stderr
        assert f"{BUILDER}-ssh " in listed.stdout and f"{BUILDER}-ssh-mine" not in listed.stdout

        purged = cli(tmp_path, "sweep", "--cloud", "gcp", "--project", "lab-project", "--purge", "--yes", **env)
        assert purged.returncode == 0, purged.stderr
        assert gce.names("firewalls") == {f"{BUILDER}-ssh-mine"} and gce.names("instances") == set()


def test_bake_takes_a_network_and_subnetwork_for_projects_without_a_default(tmp_path, monkeypatch, capsys):
    """Regression: `fab bake` could not pick a network, so a project without `default` could not bake."""
    monkeypatch.setenv("GPUFORGE_HOME", str(tmp_path / "home"))
    with FakeCompute(project="lab-project", default_network=False) as gce:
        monkeypatch.setenv("GPUFORGE_GCP_ENDPOINT", gce.endpoint)
        net = gce.seed("networks", "global", {"name": "lab-net", "autoCreateSubnetworks": False})
        gce.seed("subnetworks", "regions/us-central1", {"name": "lab-subnet", "network": net["selfLink"],
                                                        "ipCidrRange": "10.1.0.0/24"})
        gce.seed("images", "global", {"name": "ubuntu-2204-jammy-v1", "family": "ubuntu-2204-lts",
                                      "status": "READY", "diskSizeGb": "10"}, project="ubuntu-os-cloud")
        gce.fail_next("instance", "insert", "stop the test here")

        result = gpuforge(capsys, "bake", "--cloud", "gcp", "--project", "lab-project", "--network", "lab-net",
                          "--subnetwork", "lab-subnet", "--ssh-cidr", "203.0.113.4/32")

        assert result.code == 1 and "stop the test here" in result.err, result.text
        (builder,) = [body for collection, body in gce.inserted if collection == "instances"]
        nic = builder["networkInterfaces"][0]
        assert nic["network"].endswith("global/networks/lab-net") and nic["subnetwork"].endswith("/lab-subnet")
        assert gce.names("firewalls") == set() and gce.names("instances") == set()  # removed after the failure
        bad = gpuforge(capsys, "bake", "--cloud", "gcp", "--project", "lab-project", "--network", "Lab_Net",
                       "--ssh-cidr", "203.0.113.4/32")
        assert bad.code == 2 and "network 'Lab_Net' is not a GCE resource name" in bad.err
