"""Whether a cluster's nodes are running or stopped, and starting stopped ones: what `clusters`, `status` and `up`
need after autostop (infra/autostop.py).

    power_states(cluster)          # {"demo-0": "running", "demo-1": "stopped"}
    start_stopped(cluster)         # starts the stopped nodes (same disks), waits until they run; their new addresses

States are one word per node: running, stopped, starting, stopping, gone (terminated or deleted; an autodown node
that went), unknown. Local nodes: running when their sshd answers, else stopped. Cloud nodes are found by the
cluster's id tag/label (AWS_ENDPOINT_URL / GPUFORGE_GCP_ENDPOINT point the calls at an emulator).
"""

from __future__ import annotations

import socket
import time
from typing import Any

from infra.cluster import CLUSTER_ID_LABEL, CLUSTER_ID_TAG, ClusterInfo

PORT_TIMEOUT_S = 1.0
START_TIMEOUT_S = 600.0  # a stopped GPU instance is usually back in one or two minutes
POLL_S = 2.0
AWS_STATES = {"pending": "starting", "running": "running", "stopping": "stopping", "stopped": "stopped",
              "shutting-down": "gone", "terminated": "gone"}
GCE_STATES = {"PROVISIONING": "starting", "STAGING": "starting", "RUNNING": "running", "STOPPING": "stopping",
              "SUSPENDING": "stopping", "SUSPENDED": "stopped", "TERMINATED": "stopped", "REPAIRING": "starting"}


def power_states(cluster: ClusterInfo) -> dict[str, str]:
    if cluster.cloud == "local":
        return {n.name: "running" if port_open(n.public_address, n.ssh_port) else "stopped" for n in cluster.nodes}
    if cluster.cloud == "aws":
        found = {name: AWS_STATES.get(state, "unknown") for name, (_, state, _) in aws_instances(cluster).items()}
    elif cluster.cloud == "gcp":
        found = {name: GCE_STATES.get(state, "unknown") for name, (state, _) in gce_instances(cluster).items()}
    else:
        return {n.name: "unknown" for n in cluster.nodes}
    return {n.name: found.get(n.name, "gone") for n in cluster.nodes}


def summary(states: dict[str, str]) -> str:
    """One word for the cluster: running, stopped, gone, or `partly stopped` and the like."""
    words = set(states.values())
    if len(words) == 1:
        return words.pop()
    stopped = sum(1 for s in states.values() if s in ("stopped", "gone"))
    return f"{stopped}/{len(states)} nodes stopped" if stopped else "/".join(sorted(words))


def port_open(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=PORT_TIMEOUT_S):
            return True
    except OSError:
        return False


# -- AWS ------------------------------------------------------------------------------------------

def ec2_client(cluster: ClusterInfo) -> Any:
    import boto3

    return boto3.Session(region_name=cluster.region).client("ec2")


def aws_instances(cluster: ClusterInfo, ec2: Any = None) -> dict[str, tuple[str, str, str]]:
    """Name tag -> (instance id, state, public address) of this cluster's instances (by its id tag), newest last."""
    ec2 = ec2 or ec2_client(cluster)
    flt = [{"Name": f"tag:{CLUSTER_ID_TAG}", "Values": [cluster.extra.get("cluster_id", "")]}]
    found: dict[str, tuple[str, str, str]] = {}
    for page in ec2.get_paginator("describe_instances").paginate(Filters=flt):
        for reservation in page["Reservations"]:
            for inst in sorted(reservation["Instances"], key=lambda i: str(i.get("LaunchTime", ""))):
                name = next((t["Value"] for t in inst.get("Tags", []) if t["Key"] == "Name"), inst["InstanceId"])
                state = inst["State"]["Name"]
                if state == "terminated" and name in found:
                    continue  # a replaced node's old instance
                found[name] = (inst["InstanceId"], state, inst.get("PublicIpAddress", ""))
    return found


def start_aws(cluster: ClusterInfo, names: list[str]) -> dict[str, str]:
    ec2 = ec2_client(cluster)
    known = aws_instances(cluster, ec2)
    ids = [known[n][0] for n in names]
    ec2.start_instances(InstanceIds=ids)
    ec2.get_waiter("instance_running").wait(InstanceIds=ids, WaiterConfig={"Delay": POLL_S,
                                                                            "MaxAttempts": int(START_TIMEOUT_S / POLL_S)})
    live = aws_instances(cluster, ec2)
    return {n: live[n][2] for n in names}


# -- GCP ------------------------------------------------------------------------------------------

def gce_client() -> Any:
    from google.cloud import compute_v1

    from infra.gcp_api import compute_kwargs

    return compute_v1.InstancesClient(**compute_kwargs())


def gce_instances(cluster: ClusterInfo, client: Any = None) -> dict[str, tuple[str, str]]:
    """VM name -> (status, external address) of this cluster's VMs in its zone (by its id label)."""
    from google.cloud import compute_v1

    client = client or gce_client()
    request = compute_v1.ListInstancesRequest(
        project=cluster.extra.get("project", ""), zone=cluster.extra.get("zone", ""),
        filter=f"labels.{CLUSTER_ID_LABEL} = \"{cluster.extra.get('cluster_id', '')}\"")
    found = {}
    for vm in client.list(request=request):
        configs = vm.network_interfaces[0].access_configs if vm.network_interfaces else []
        found[vm.name] = (vm.status, configs[0].nat_i_p if configs else "")
    return found


def start_gcp(cluster: ClusterInfo, names: list[str]) -> dict[str, str]:
    from google.cloud import compute_v1

    from infra.gcp_api import compute_kwargs
    from infra.sweep.gcp import wait_gcp_operation

    client = gce_client()
    project, zone = cluster.extra.get("project", ""), cluster.extra.get("zone", "")
    for name in names:  # polled on our endpoint (the library's own poller ignores it)
        wait_gcp_operation(compute_v1, compute_kwargs(), project, "zone", zone,
                           client.start(project=project, zone=zone, instance=name))
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        live = gce_instances(cluster, client)
        if all(live.get(n, ("",))[0] == "RUNNING" for n in names) or time.monotonic() > deadline:
            return {n: live.get(n, ("", ""))[1] for n in names}
        time.sleep(POLL_S)


def start_stopped(cluster: ClusterInfo) -> dict[str, str]:
    """Start the cluster's stopped cloud nodes (their disks are where they were); node name -> its public address
    now (a stopped instance comes back with a new one unless it has an Elastic IP)."""
    stopped = [name for name, state in power_states(cluster).items() if state == "stopped"]
    if not stopped:
        return {}
    return start_aws(cluster, stopped) if cluster.cloud == "aws" else start_gcp(cluster, stopped)


def with_addresses(cluster: ClusterInfo, addresses: dict[str, str]) -> ClusterInfo:
    """The record with the nodes' new public addresses (an empty one keeps the old)."""
    from dataclasses import replace

    return cluster.with_nodes([replace(n, public_address=addresses.get(n.name) or n.public_address)
                               for n in cluster.nodes])
