"""Read-only checks `fab up` runs before it creates anything: which zones offer the type, whether it is sold the way
asked (on-demand / spot), whether the quotas leave room for the nodes, and which image the nodes boot.

    plan = preflight(spec, zone_given=False, existing_nodes=0)
    plan.zones    # zones of the region that offer the type, the one to try first first
    plan.notes    # what was checked, for the user

AWS: DescribeInstanceTypes (SupportedUsageClasses), DescribeInstanceTypeOfferings (LocationType availability-zone),
Service Quotas GetServiceQuota (the instance class's vCPU quota; "EC2-VPC Elastic IPs" when nodes get Elastic IPs)
against what runs now (DescribeInstances, DescribeAddresses). A quota that cannot be read (no servicequotas
permission) is a warning, not a stop.
GCP: machineTypes / acceleratorTypes per zone (aggregatedList filtered by name), the catalog's `sold_as`, and the
region's and project's GPU quotas (regions.get / projects.get `quotas`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from infra import catalog
from infra.capacity import AWS_EIP_QUOTA, AWS_VCPU_QUOTAS, aws_quota_hint, gcp_quota_hint
from infra.errors import PreflightError, QuotaError
from infra.spec import ClusterSpec

logger = logging.getLogger(__name__)

LIVE_STATES = ["pending", "running", "stopping", "stopped"]  # instances that hold vCPU quota


@dataclass
class Plan:
    zones: list[str]
    notes: list[str] = field(default_factory=list)


def preflight(spec: ClusterSpec, zone_given: bool, existing_nodes: int = 0, **clients: Any) -> Plan:
    if spec.cloud == "aws":
        return preflight_aws(spec, zone_given, existing_nodes, clients.get("session"))
    return preflight_gcp(spec, zone_given, existing_nodes, clients.get("client_options"), clients.get("credentials"))


def order_zones(offered: set[str], catalog_zones: list[str], first: str, zone_given: bool, cloud: str,
                instance_type: str, region: str) -> list[str]:
    """The offered zones, catalog order; a given zone alone (refused when it does not offer the type)."""
    ordered = [z for z in catalog_zones if z in offered] + sorted(offered - set(catalog_zones))
    if not ordered:
        raise PreflightError(f"no zone of {cloud} region {region} offers {instance_type}; pick another region or type")
    if zone_given:
        if first not in offered:
            raise PreflightError(f"zone {first} does not offer {instance_type}; zones of {region} that do: "
                                 f"{', '.join(ordered)}")
        return [first]
    return ordered


# -- AWS ---------------------------------------------------------------------------------------------

def preflight_aws(spec: ClusterSpec, zone_given: bool, existing_nodes: int, session: Any = None) -> Plan:
    import boto3

    session = session or boto3.Session(region_name=spec.region)
    ec2 = session.client("ec2", region_name=spec.region)
    types = ec2.describe_instance_types(InstanceTypes=[spec.instance_type])["InstanceTypes"]
    usage = set(types[0].get("SupportedUsageClasses", ["on-demand", "spot"])) if types else set()
    wanted = "spot" if spec.spot else "on-demand"
    if types and wanted not in usage:
        sold = " and ".join(sorted(usage)) or "nothing"
        hint = "reserve an EC2 Capacity Block for ML and launch into it" if "capacity-block" in usage else \
            ("use --spot" if "spot" in usage else "pick another type")
        raise PreflightError(f"{spec.instance_type} is sold in {spec.region} only as {sold}, not {wanted}; {hint}")
    offerings = ec2.describe_instance_type_offerings(
        LocationType="availability-zone", Filters=[{"Name": "instance-type", "Values": [spec.instance_type]}])
    offered = {o["Location"] for o in offerings["InstanceTypeOfferings"]}
    zones = order_zones(offered, catalog.zones("aws", spec.region), spec.zone, zone_given, "aws",
                        spec.instance_type, spec.region)
    plan = Plan(zones, [f"{spec.instance_type} is offered in {', '.join(zones)}"])
    new_nodes = max(spec.nodes - existing_nodes, 0)
    if new_nodes:
        check_aws_vcpus(session, ec2, spec, new_nodes, plan)
        if spec.efa_interfaces:
            check_aws_eips(session, ec2, spec, new_nodes, plan)
    return plan


def read_aws_quota(session: Any, region: str, code: str, plan: Plan) -> float | None:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        quotas = session.client("service-quotas", region_name=region)
        return float(quotas.get_service_quota(ServiceCode="ec2", QuotaCode=code)["Quota"]["Value"])
    except (ClientError, BotoCoreError) as exc:
        plan.notes.append(f"could not read quota {code} ({exc}); not checked")
        logger.warning("could not read AWS quota %s: %s", code, exc)
        return None


def check_aws_vcpus(session: Any, ec2: Any, spec: ClusterSpec, new_nodes: int, plan: Plan) -> None:
    code, name = AWS_VCPU_QUOTAS.get((spec.instance_type[:1], spec.spot), ("", ""))
    if not code:
        return
    limit = read_aws_quota(session, spec.region, code, plan)
    if limit is None:
        return
    used_types: list[str] = []
    for page in ec2.get_paginator("describe_instances").paginate(Filters=[
            {"Name": "instance-state-name", "Values": LIVE_STATES},
            {"Name": "instance-type", "Values": [f"{spec.instance_type[:1]}*"]}]):
        for reservation in page["Reservations"]:
            used_types += [i["InstanceType"] for i in reservation["Instances"]
                           if (i.get("InstanceLifecycle") == "spot") == spec.spot]
    vcpus = {t["InstanceType"]: t["VCpuInfo"]["DefaultVCpus"]
             for t in (ec2.describe_instance_types(InstanceTypes=sorted(set(used_types)))["InstanceTypes"]
                       if used_types else [])}
    used = sum(vcpus.get(t, 0) for t in used_types)
    need = new_nodes * spec.instance.vcpus
    if used + need > limit:
        raise QuotaError(f"{new_nodes} x {spec.instance_type} need {need} vCPUs, but {used:.0f} of the {limit:.0f} "
                         f"allowed are in use: {aws_quota_hint(code, name, spec.region, used + need)}")
    plan.notes.append(f"vCPU quota {code}: {used + need:.0f} of {limit:.0f} with this cluster")


def check_aws_eips(session: Any, ec2: Any, spec: ClusterSpec, new_nodes: int, plan: Plan) -> None:
    """Nodes with EFA get an Elastic IP each (an instance with several interfaces gets no public IP)."""
    code, name = AWS_EIP_QUOTA
    limit = read_aws_quota(session, spec.region, code, plan)
    if limit is None:
        return
    used = len(ec2.describe_addresses()["Addresses"])
    if used + new_nodes > limit:
        raise QuotaError(f"{new_nodes} node(s) with EFA need {new_nodes} Elastic IP(s), but {used} of the "
                         f"{limit:.0f} allowed are in use: {aws_quota_hint(code, name, spec.region, used + new_nodes)}")
    plan.notes.append(f"Elastic IPs: {used + new_nodes} of {limit:.0f} with this cluster")


# -- GCP ---------------------------------------------------------------------------------------------

def gpu_quota_metric(spec: ClusterSpec) -> str:
    metric = catalog.find_accelerator(spec.accelerator_name).gpu_quota if spec.accelerator else spec.instance.gpu_quota
    return f"PREEMPTIBLE_{metric}" if metric and spec.spot else metric


def preflight_gcp(spec: ClusterSpec, zone_given: bool, existing_nodes: int, client_options: Any = None,
                  credentials: Any = None) -> Plan:
    from google.cloud import compute_v1

    from infra.gcp_api import compute_kwargs

    if spec.instance.sold_as == "spot" and not spec.spot:
        raise PreflightError(f"{spec.instance_type} is sold only as Spot (or Flex-start) VMs; add --spot")
    kw = compute_kwargs(client_options, credentials)
    offered = zones_offering(compute_v1.MachineTypesClient(**kw), compute_v1.AggregatedListMachineTypesRequest,
                             spec.project, spec.instance_type, spec.region)
    if spec.accelerator:
        offered &= zones_offering(compute_v1.AcceleratorTypesClient(**kw),
                                  compute_v1.AggregatedListAcceleratorTypesRequest, spec.project,
                                  spec.accelerator_name, spec.region)
    what = f"{spec.instance_type}" + (f" with {spec.accelerator}" if spec.accelerator else "")
    zones = order_zones(offered, catalog.zones("gcp", spec.region), spec.zone, zone_given, "gcp", what, spec.region)
    plan = Plan(zones, [f"{what} is offered in {', '.join(zones)}"])
    new_gpus = max(spec.nodes - existing_nodes, 0) * spec.gpu_count
    metric = gpu_quota_metric(spec)
    if new_gpus and metric:
        region = compute_v1.RegionsClient(**kw).get(project=spec.project, region=spec.region)
        project = compute_v1.ProjectsClient(**kw).get(project=spec.project)
        for quotas, name, where in ((region.quotas, metric, spec.region), (project.quotas, "GPUS_ALL_REGIONS", "global")):
            quota = next((q for q in quotas if q.metric == name), None)
            if quota is None:
                continue
            if quota.usage + new_gpus > quota.limit:
                raise QuotaError(f"{spec.nodes - existing_nodes} node(s) need {new_gpus} GPU(s), but {quota.usage:.0f} "
                                 f"of the {quota.limit:.0f} allowed are in use: "
                                 f"{gcp_quota_hint(name, where, spec.project)}")
            plan.notes.append(f"GPU quota {name}: {quota.usage + new_gpus:.0f} of {quota.limit:.0f} with this cluster")
    return plan


def zones_offering(client: Any, request_type: Any, project: str, name: str, region: str) -> set[str]:
    request = request_type(project=project, filter=f'name = "{name}"')
    return {scope.rsplit("/", 1)[-1] for scope, scoped in client.aggregated_list(request=request)
            for _ in (getattr(scoped, "machine_types", None) or getattr(scoped, "accelerator_types", None) or [])
            if scope.rsplit("/", 1)[-1].startswith(f"{region}-")}
