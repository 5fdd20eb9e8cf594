"""Autostop in the real Pulumi program (infra/__main__.py, mocks with preview=False) and its parsing rules."""

from __future__ import annotations

import pytest

from infra.autostop import format_duration, parse_autostop
from infra.cluster import ClusterInfo
from infra.errors import SpecError
from infra.spec import ClusterSpec
from tests.unit.test_pulumi_aws import aws_config, run_program
from tests.unit.test_pulumi_gcp import gcp_config


@pytest.mark.parametrize("value, seconds", [("90", 5400), ("90s", 90), ("30m", 1800), ("2h", 7200), ("1d", 86400),
                                            ("off", 0), ("OFF", 0), (" 5 ", 300), (600, 600)])
def test_autostop_takes_minutes_a_unit_or_off(value, seconds):
    assert parse_autostop(value) == seconds


@pytest.mark.parametrize("value", ["ten", "-5", "1.5h", "90x", "", "h", "9000h", "0", "0s", "00m"])
def test_a_bad_autostop_names_the_value_and_the_valid_forms(value):
    with pytest.raises(ValueError) as err:
        parse_autostop(value)
    assert repr(value) in str(err.value) and "90s" in str(err.value) and "off" in str(err.value)


def test_durations_read_as_people_write_them():
    assert [format_duration(s) for s in (0, 45, 3600, 5400, 90061)] == ["off", "45s", "1h", "1h 30m", "1d 1h"]


def test_a_cloud_spec_autostops_after_an_hour_by_default_and_round_trips_through_stack_config():
    spec = ClusterSpec(cloud="aws", name="demo", instance_type="g5.xlarge")
    assert spec.autostop == 3600 and spec.autodown is False
    config = spec.to_stack_config()
    assert config["gpuforge:autostop"] == "3600s"
    assert ClusterSpec.from_stack_config(config).autostop == 3600
    off = ClusterSpec(cloud="aws", name="demo", autostop="off").to_stack_config()
    assert off["gpuforge:autostop"] == "off" and ClusterSpec.from_stack_config(off).autostop == 0
    with pytest.raises(SpecError, match="'soon' is not a duration"):
        ClusterSpec(cloud="aws", name="demo", autostop="soon")


@pytest.mark.parametrize("overrides, behaviour", [
    ({}, "stop"),
    ({"autodown": "true"}, "terminate"),
    ({"spot": "true"}, "terminate"),  # EC2 refuses to stop a one-time spot instance
    ({"autostop": "off"}, "stop"),
])
def test_aws_nodes_shutdown_behaviour_is_what_autostop_asks(overrides, behaviour):
    run = run_program(aws_config(nodes="2", **overrides))
    instances = run.of_type("ec2/instance:Instance")
    assert len(instances) == 2
    assert {i.inputs["instanceInitiatedShutdownBehavior"] for i in instances} == {behaviour}
    # on the instance, where EC2 changes it in place; a launch template change would make a new version
    assert "instanceInitiatedShutdownBehavior" not in run.one("ec2/launchTemplate:LaunchTemplate").inputs


@pytest.mark.parametrize("program, config", [(run_program, aws_config), (run_program, gcp_config)])
def test_the_cluster_record_carries_the_idle_timeout(program, config):
    cluster = ClusterInfo.from_dict(program(config(autostop="90s", autodown="true")).outputs["cluster"])
    assert cluster.extra["autostop_s"] == 90 and cluster.extra["autodown"] is True
    default = ClusterInfo.from_dict(program(config()).outputs["cluster"])
    assert default.extra["autostop_s"] == 3600 and default.extra["autodown"] is False


def test_gcp_nodes_stop_on_a_guest_shutdown_and_restart_after_maintenance():
    """A guest poweroff leaves a GCE VM TERMINATED (stopped, boot disk kept): the disk must not auto-delete with a
    stop (it does not: auto_delete acts on delete only) and nothing in scheduling may turn a stop into a delete."""
    run = run_program(gcp_config(nodes="1"))
    (instance,) = run.of_type("compute/instance:Instance")
    assert instance.inputs["scheduling"].get("instanceTerminationAction", "STOP") == "STOP"
    assert instance.inputs["allowStoppingForUpdate"] is True


def test_gcp_autodown_lets_each_node_delete_its_cluster_s_vms_and_nothing_else():
    """The grant is one instance IAM member per node (no project-wide role, no custom role), for the cluster's own
    service account, with a role that holds compute.instances.delete; the VMs get the Compute scope the call needs."""
    from infra.gcp import COMPUTE_SCOPE, NODE_SCOPES, SELF_DELETE_ROLE

    run = run_program(gcp_config(nodes="2", autodown="true"))
    (account,) = run.of_type("serviceaccount/account:Account")
    grants = run.of_type("compute/instanceIAMMember:InstanceIAMMember")
    nodes = {i.inputs["name"]: i for i in run.of_type("compute/instance:Instance")}
    assert sorted(g.inputs["instanceName"] for g in grants) == sorted(nodes)
    assert {(g.inputs["role"], g.inputs["member"], g.inputs["zone"]) for g in grants} == {
        (SELF_DELETE_ROLE, f"serviceAccount:{account.outputs['email']}", "us-central1-c")}
    assert {tuple(i.inputs["serviceAccount"]["scopes"]) for i in nodes.values()} == {(*NODE_SCOPES, COMPUTE_SCOPE)}
    assert all(i.inputs["bootDisk"]["autoDelete"] is True for i in nodes.values())  # the disk goes with the VM
    iam = [r.typ for r in run.resources if "IAM" in r.typ or "Role" in r.typ]  # project members, custom roles
    assert sorted(iam) == sorted(["gcp:storage/bucketIAMMember:BucketIAMMember",
                                  *["gcp:compute/instanceIAMMember:InstanceIAMMember"] * 2]), iam


@pytest.mark.parametrize("overrides", [{}, {"autodown": "false"}, {"autodown": "true", "autostop": "off"}])
def test_gcp_without_autodown_the_nodes_get_no_new_right(overrides):
    """What existing users' stacks hold is unchanged: no instance grant, the scopes as before."""
    from infra.gcp import NODE_SCOPES

    run = run_program(gcp_config(nodes="2", **overrides))
    assert run.of_type("compute/instanceIAMMember:InstanceIAMMember") == []
    assert {tuple(i.inputs["serviceAccount"]["scopes"]) for i in run.of_type("compute/instance:Instance")} == {
        tuple(NODE_SCOPES)}
