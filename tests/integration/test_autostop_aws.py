"""Autostop's cloud calls on AWS, against a moto server (tests/fakes/moto_ext.py applies EC2's start/stop state
rules) with the real program run by tests/fakes/engine.py: the nodes' shutdown behaviour, `clusters`/`status` of a
stopped cluster, and `up` of it starting the same instances with the same volumes.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest

from tests.fakes.moto_ext import guest_shutdown
from tests.integration.lifecycle import gpuforge, one_line_error
from tests.integration.test_lifecycle_aws import (aws, live_instances, moto_url, publish_ami,  # noqa: F401 - fixtures
                                                  registration)

pytestmark = pytest.mark.integration

UP = ["up", "--cloud", "aws", "--name", "demo", "--instance-type", "g5.xlarge", "--nodes", "2", "--yes"]


def instances(ec2, cluster_id: str) -> dict[str, dict]:
    found = ec2.describe_instances(Filters=[{"Name": "tag:gpuforge:cluster-id", "Values": [cluster_id]}])
    return {next(t["Value"] for t in i["Tags"] if t["Key"] == "Name"): i
            for r in found["Reservations"] for i in r["Instances"]}


def shutdown_behaviour(ec2, instance_id: str) -> str:
    return ec2.describe_instance_attribute(InstanceId=instance_id, Attribute="instanceInitiatedShutdownBehavior")[
        "InstanceInitiatedShutdownBehavior"]["Value"]


def volumes(ec2, instance_id: str) -> list[str]:
    found = ec2.describe_volumes(Filters=[{"Name": "attachment.instance-id", "Values": [instance_id]}])["Volumes"]
    return sorted(v["VolumeId"] for v in found)


def test_a_bad_autostop_stops_before_any_cloud_call(aws, capsys, tmp_path):
    session, engines = aws
    result = gpuforge(capsys, *UP, "--autostop", "90x")
    assert result.code == 2
    assert one_line_error(result) == ("error: --autostop '90x' is not a duration; give minutes (90), a number with a "
                                      "unit (90s, 30m, 2h, 1d) or off")
    assert not (tmp_path / "home" / "clusters" / "demo").exists() and engines.made == []
    assert session.client("ec2").describe_instances()["Reservations"] == []


def test_idle_nodes_stop_and_up_starts_the_same_instances_with_their_disks(aws, capsys, tmp_path):
    session, engines = aws
    ec2 = session.client("ec2")
    home = tmp_path / "home"
    publish_ami(session, "gpuforge-ubuntu2204-cu130-torch213-a", datetime.now(timezone.utc))
    up = gpuforge(capsys, *UP, "--autostop", "90")
    assert up.code == 0, up.text
    assert "autostop after 1h 30m idle" in up.out
    cluster_id = registration(home)["cluster_id"]
    record = json.loads((home / "clusters" / "demo" / "cluster.json").read_text())
    assert record["extra"]["autostop_s"] == 5400 and record["extra"]["autodown"] is False
    first = instances(ec2, cluster_id)
    assert {name: shutdown_behaviour(ec2, i["InstanceId"]) for name, i in first.items()} == {
        "demo-0": "stop", "demo-1": "stop"}
    disks = {name: volumes(ec2, i["InstanceId"]) for name, i in first.items()}

    for inst in first.values():  # each node's watcher powers its OS off
        assert guest_shutdown(ec2, inst["InstanceId"]) == "stopped"
    listing = gpuforge(capsys, "clusters")
    assert "stopped" in listing.out and "autostop after 1h 30m idle" in listing.out, listing.out
    status = gpuforge(capsys, "status")
    assert status.code == 0, status.text
    assert "demo-0: stopped" in status.out and "demo-1: stopped" in status.out
    # setup (as train and launch) names the stopped nodes and the `up` that starts them: it waited 5 minutes on them
    setup = gpuforge(capsys, "setup")
    assert setup.code == 1 and one_line_error(setup) == (
        "error: demo-0, demo-1 of cluster demo stopped (autostop); `gpuforge up --cloud aws --name demo` starts them")

    again = gpuforge(capsys, "up", "--cloud", "aws", "--name", "demo", "--yes")
    assert again.code == 0, again.text
    assert "started 2 stopped node(s): demo-0, demo-1" in again.out
    assert {op for op, _, _ in engines.last_steps()} == {"same"}  # nothing replaced
    now = instances(ec2, cluster_id)
    assert {n: i["InstanceId"] for n, i in now.items()} == {n: i["InstanceId"] for n, i in first.items()}
    assert {n: i["State"]["Name"] for n, i in now.items()} == {"demo-0": "running", "demo-1": "running"}
    assert {name: volumes(ec2, i["InstanceId"]) for name, i in now.items()} == disks  # same disks, same data
    record = json.loads((home / "clusters" / "demo" / "cluster.json").read_text())
    assert [n["public_address"] for n in record["nodes"]] == [now["demo-0"].get("PublicIpAddress", ""),
                                                              now["demo-1"].get("PublicIpAddress", "")]

    # autodown: the same instances learn to terminate on shutdown (in place, not replaced)
    down = gpuforge(capsys, "up", "--cloud", "aws", "--name", "demo", "--autodown", "--yes")
    assert down.code == 0, down.text
    assert {shutdown_behaviour(ec2, i["InstanceId"]) for i in instances(ec2, cluster_id).values()} == {"terminate"}
    assert live_instances(session, cluster_id) == {n: i["InstanceId"] for n, i in first.items()}
    assert guest_shutdown(ec2, first["demo-0"]["InstanceId"]) == "terminated"
    with pytest.raises(Exception, match="IncorrectInstanceState"):  # EC2's rule: what terminated stays so
        ec2.start_instances(InstanceIds=[first["demo-0"]["InstanceId"]])

    # the last node goes too: the controller's next look removes the rest of the stack, as `down` does (data kept)
    assert guest_shutdown(ec2, first["demo-1"]["InstanceId"]) == "terminated"
    listing = gpuforge(capsys, "clusters")
    assert "every node of autodown cluster demo has gone: removing the rest of it" in listing.out, listing.text
    assert not (home / "clusters" / "demo" / "cluster.json").exists()
    assert ec2.describe_vpcs(Filters=[{"Name": "tag:gpuforge:cluster-id", "Values": [cluster_id]}])["Vpcs"] == []
