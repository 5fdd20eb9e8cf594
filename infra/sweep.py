"""Find, report and purge what a cluster left behind after `pulumi destroy`.

`fab down` calls `find_aws_leftovers` / `find_gcp_leftovers` after the destroy, shows
`render_leftovers(...)`, and with `--purge` calls `purge_leftovers(...)`.

- AWS: every resource infra/aws.py creates carries the tag `gpuforge:cluster=<name>`; the sweep
  lists each EC2 kind with that tag filter, and the S3 buckets whose tagging has it.
- GCP: resources with labels carry `gpuforge-cluster=<name>`; those without (firewalls, networks,
  subnetworks, resource policies) are named `<name>-...`, so they are matched by that prefix, and
  firewalls and subnetworks also by sitting in one of the cluster's networks.

Baked images are never leftovers. Terminated instances are not leftovers.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

from infra.errors import SweepError

logger = logging.getLogger(__name__)

AWS_TAG_KEY = "gpuforge:cluster"  # put on every resource by infra/aws.py
GCP_LABEL_KEY = "gpuforge-cluster"  # put on every labellable resource by infra/gcp.py
AWS_LIVE_STATES = ["pending", "running", "shutting-down", "stopping", "stopped"]  # not terminated
AWS_TERMINATE_WAIT = {"Delay": 5, "MaxAttempts": 120}  # 10 min: GPU instances can take minutes to stop
# EC2 docs: a terminated instance's network interfaces can take a few minutes to go away, and until
# then its security group, subnet and VPC refuse deletion with DependencyViolation.
DEPENDENCY_RETRY_S = 180.0
DEPENDENCY_RETRY_DELAY_S = 5.0
AWS_GONE_CODES = ("NoSuchBucket", "InvalidPlacementGroup.Unknown")  # plus every *.NotFound code
S3_DELETE_BATCH = 1000  # DeleteObjects takes at most 1000 keys per call (S3 API reference)
GCP_OPERATION_TIMEOUT_S = 600.0  # deleting a GPU VM takes 1-3 min; operations.wait returns within 2
AWS_PURGE_ORDER = ("instance", "elastic-ip", "network-interface", "volume", "key-pair", "placement-group",
                   "security-group", "internet-gateway", "route-table", "subnet", "vpc", "bucket")
GCP_PURGE_ORDER = ("instance", "disk", "address", "resource-policy", "firewall", "subnetwork", "network",
                   "bucket")


@dataclass(frozen=True)
class Leftover:
    cloud: str  # "aws" | "gcp"
    kind: str  # one of AWS_PURGE_ORDER / GCP_PURGE_ORDER
    id: str
    name: str
    region: str  # AWS: region; GCP: zone, region or "global"
    detail: str = ""  # state, size, why it is left


# -- AWS: find --------------------------------------------------------------------------------

def tag_value(item: dict, key: str) -> str:
    return next((t["Value"] for t in item.get("Tags", []) if t["Key"] == key), "")


# kind -> (describe call, result key, id field, name field ("" = the Name tag), detail)
AWS_LISTERS: dict[str, tuple[str, str, str, str, Callable[[dict], str]]] = {
    "elastic-ip": ("describe_addresses", "Addresses", "AllocationId", "PublicIp",
                   lambda a: f"associated with {a.get('InstanceId') or a.get('NetworkInterfaceId')}"
                   if a.get("AssociationId") else "not associated"),
    "network-interface": ("describe_network_interfaces", "NetworkInterfaces", "NetworkInterfaceId", "",
                          lambda n: f"{n.get('Status', '')} {n.get('InterfaceType', '')}".strip()),
    "volume": ("describe_volumes", "Volumes", "VolumeId", "",
               lambda v: f"{v['State']}, {v['Size']} GiB, {v['AvailabilityZone']}"),
    "key-pair": ("describe_key_pairs", "KeyPairs", "KeyPairId", "KeyName", lambda k: ""),
    "placement-group": ("describe_placement_groups", "PlacementGroups", "GroupId", "GroupName",
                        lambda g: f"{g.get('Strategy', '')} {g.get('State', '')}".strip()),
    "security-group": ("describe_security_groups", "SecurityGroups", "GroupId", "GroupName",
                       lambda g: g.get("VpcId", "")),
    "internet-gateway": ("describe_internet_gateways", "InternetGateways", "InternetGatewayId", "",
                         lambda g: " ".join(a["VpcId"] for a in g.get("Attachments", []))),
    "route-table": ("describe_route_tables", "RouteTables", "RouteTableId", "", lambda r: r.get("VpcId", "")),
    "subnet": ("describe_subnets", "Subnets", "SubnetId", "",
               lambda s: f"{s['CidrBlock']} {s.get('AvailabilityZone', '')}"),
    "vpc": ("describe_vpcs", "Vpcs", "VpcId", "", lambda v: v["CidrBlock"]),
}


def aws_client(session: Any, service: str, region: str) -> Any:
    from botocore.config import Config

    return session.client(service, region_name=region, config=Config(retries={"mode": "standard"}))


def iter_aws_pages(client: Any, op: str, key: str, **params: Any) -> Iterator[dict]:
    if client.can_paginate(op):
        for page in client.get_paginator(op).paginate(**params):
            yield from page.get(key, [])
    else:
        yield from getattr(client, op)(**params).get(key, [])


def list_aws_kind(ec2: Any, kind: str, cluster: str, region: str) -> list[Leftover]:
    flt = [{"Name": f"tag:{AWS_TAG_KEY}", "Values": [cluster]}]
    if kind == "instance":
        flt.append({"Name": "instance-state-name", "Values": AWS_LIVE_STATES})
        return [Leftover("aws", "instance", i["InstanceId"], tag_value(i, "Name"), region,
                         f"{i['State']['Name']} {i.get('InstanceType', '')}".strip())
                for r in iter_aws_pages(ec2, "describe_instances", "Reservations", Filters=flt)
                for i in r["Instances"]]
    op, key, id_field, name_field, detail = AWS_LISTERS[kind]
    found = []
    for item in iter_aws_pages(ec2, op, key, Filters=flt):
        name = item.get(name_field, "") if name_field else tag_value(item, "Name")
        if kind == "security-group" and name == "default":
            continue  # deleted with its VPC, never by hand
        if kind == "route-table" and any(a.get("Main") for a in item.get("Associations", [])):
            continue  # the main route table goes with its VPC
        item_id = item.get(id_field) or name
        found.append(Leftover("aws", kind, item_id, name or tag_value(item, "Name"), region, detail(item)))
    return found


def list_aws_buckets(s3: Any, cluster: str, region: str) -> list[Leftover]:
    from botocore.exceptions import ClientError

    found = []
    for bucket in iter_aws_pages(s3, "list_buckets", "Buckets", BucketRegion=region):
        try:
            tags = s3.get_bucket_tagging(Bucket=bucket["Name"])["TagSet"]
        except ClientError as exc:
            code = exc.response["Error"]["Code"]
            if code == "AccessDenied":
                logger.warning("cannot read the tags of s3://%s (AccessDenied): not swept", bucket["Name"])
            if code in ("NoSuchTagSet", "NoSuchBucket", "AccessDenied"):
                continue
            raise
        if {"Key": AWS_TAG_KEY, "Value": cluster} not in tags:
            continue
        page = s3.list_object_versions(Bucket=bucket["Name"], MaxKeys=1)
        content = "has objects" if page.get("Versions") or page.get("DeleteMarkers") else "empty"
        found.append(Leftover("aws", "bucket", bucket["Name"], bucket["Name"], region,
                              f"{content}; kept by design unless gpuforge:forceDestroyBucket=true"))
    return found


def find_aws_leftovers(cluster: str, region: str, session: Any = None) -> list[Leftover]:
    """Everything in `region` tagged gpuforge:cluster=<cluster>, in purge order."""
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    session = session or boto3.Session(region_name=region)
    ec2 = aws_client(session, "ec2", region)
    found: list[Leftover] = []
    for kind in AWS_PURGE_ORDER:
        try:
            if kind == "bucket":
                found += list_aws_buckets(aws_client(session, "s3", region), cluster, region)
            else:
                found += list_aws_kind(ec2, kind, cluster, region)
        except (BotoCoreError, ClientError) as exc:
            raise SweepError(f"listing AWS {kind}s of cluster {cluster!r} in {region} failed: {exc}") from exc
    return found


# -- AWS: purge -------------------------------------------------------------------------------

def is_aws_gone(exc: Exception) -> bool:
    code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
    return code.endswith("NotFound") or code in AWS_GONE_CODES


def retry_dependency(call: Callable[[], Any]) -> Any:
    """Retry `call` while AWS says DependencyViolation (ENIs of terminated instances linger)."""
    from botocore.exceptions import ClientError

    deadline = time.monotonic() + DEPENDENCY_RETRY_S
    while True:
        try:
            return call()
        except ClientError as exc:
            if exc.response["Error"]["Code"] != "DependencyViolation" or time.monotonic() > deadline:
                raise
            logger.info("dependency still there, retrying in %.0fs: %s", DEPENDENCY_RETRY_DELAY_S, exc)
            time.sleep(DEPENDENCY_RETRY_DELAY_S)


def delete_aws_eip(ec2: Any, lo: Leftover) -> None:
    for address in ec2.describe_addresses(AllocationIds=[lo.id])["Addresses"]:
        if address.get("AssociationId"):
            ec2.disassociate_address(AssociationId=address["AssociationId"])
    ec2.release_address(AllocationId=lo.id)


def delete_aws_eni(ec2: Any, lo: Leftover) -> None:
    for eni in ec2.describe_network_interfaces(NetworkInterfaceIds=[lo.id])["NetworkInterfaces"]:
        attachment = eni.get("Attachment", {})
        if attachment.get("AttachmentId") and attachment.get("Status") != "detached":
            ec2.detach_network_interface(AttachmentId=attachment["AttachmentId"], Force=True)
            ec2.get_waiter("network_interface_available").wait(NetworkInterfaceIds=[lo.id])
    ec2.delete_network_interface(NetworkInterfaceId=lo.id)


def delete_aws_igw(ec2: Any, lo: Leftover) -> None:
    for igw in ec2.describe_internet_gateways(InternetGatewayIds=[lo.id])["InternetGateways"]:
        for attachment in igw.get("Attachments", []):
            retry_dependency(lambda: ec2.detach_internet_gateway(InternetGatewayId=lo.id,
                                                                VpcId=attachment["VpcId"]))
    ec2.delete_internet_gateway(InternetGatewayId=lo.id)


def delete_aws_route_table(ec2: Any, lo: Leftover) -> None:
    for table in ec2.describe_route_tables(RouteTableIds=[lo.id])["RouteTables"]:
        for assoc in table.get("Associations", []):
            if not assoc.get("Main") and assoc.get("RouteTableAssociationId"):
                ec2.disassociate_route_table(AssociationId=assoc["RouteTableAssociationId"])
    ec2.delete_route_table(RouteTableId=lo.id)


def empty_aws_bucket(s3: Any, bucket: str) -> None:
    """Delete every object version and delete marker, and abort multipart uploads."""
    keys = [{"Key": v["Key"], "VersionId": v["VersionId"]}
            for page in s3.get_paginator("list_object_versions").paginate(Bucket=bucket)
            for v in page.get("Versions", []) + page.get("DeleteMarkers", [])]
    for start in range(0, len(keys), S3_DELETE_BATCH):
        reply = s3.delete_objects(Bucket=bucket, Delete={"Objects": keys[start:start + S3_DELETE_BATCH],
                                                         "Quiet": True})
        if reply.get("Errors"):
            first = reply["Errors"][0]
            raise SweepError(f"deleting {len(reply['Errors'])} objects of s3://{bucket} failed, "
                             f"first {first['Key']}: {first.get('Code')} {first.get('Message')}")
    for upload in iter_aws_pages(s3, "list_multipart_uploads", "Uploads", Bucket=bucket):
        s3.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])


def delete_aws_bucket(s3: Any, lo: Leftover) -> None:
    empty_aws_bucket(s3, lo.id)
    s3.delete_bucket(Bucket=lo.id)


AWS_DELETERS: dict[str, Callable[[Any, Leftover], Any]] = {
    "elastic-ip": delete_aws_eip,
    "network-interface": delete_aws_eni,
    "volume": lambda ec2, lo: ec2.delete_volume(VolumeId=lo.id),
    "key-pair": lambda ec2, lo: ec2.delete_key_pair(KeyName=lo.name),
    "placement-group": lambda ec2, lo: ec2.delete_placement_group(GroupName=lo.name),
    "security-group": lambda ec2, lo: retry_dependency(lambda: ec2.delete_security_group(GroupId=lo.id)),
    "internet-gateway": delete_aws_igw,
    "route-table": delete_aws_route_table,
    "subnet": lambda ec2, lo: retry_dependency(lambda: ec2.delete_subnet(SubnetId=lo.id)),
    "vpc": lambda ec2, lo: retry_dependency(lambda: ec2.delete_vpc(VpcId=lo.id)),
    "bucket": delete_aws_bucket,
}


def attempt(call: Callable[[], Any], lo: Leftover, is_gone: Callable[[Exception], bool]) -> str | None:
    """Run one delete; None when it worked or the thing was already gone, else the error text."""
    try:
        call()
    except Exception as exc:  # noqa: BLE001 - a purge reports every failure and goes on
        if is_gone(exc):
            logger.info("%s %s already gone", lo.kind, lo.id)
            return None
        logger.warning("deleting %s %s failed: %s", lo.kind, lo.id, exc)
        return f"{type(exc).__name__}: {exc}"
    logger.debug("%s %s (%s): done", lo.kind, lo.id, lo.region)
    return None


def terminate_aws_instances(ec2: Any, instances: list[Leftover]) -> list[tuple[Leftover, str | None]]:
    started = {lo.id: attempt(lambda lo=lo: ec2.terminate_instances(InstanceIds=[lo.id]), lo, is_aws_gone)
               for lo in instances}
    waiting = [i for i, err in started.items() if err is None]
    if waiting:
        try:
            ec2.get_waiter("instance_terminated").wait(InstanceIds=waiting, WaiterConfig=AWS_TERMINATE_WAIT)
        except Exception as exc:  # noqa: BLE001 - reported per instance
            started.update({i: f"not terminated: {exc}" for i in waiting})
    return [(lo, started[lo.id]) for lo in instances]


def purge_aws(leftovers: list[Leftover], session: Any) -> list[tuple[Leftover, str | None]]:
    import boto3

    results: list[tuple[Leftover, str | None]] = []
    for region in sorted({lo.region for lo in leftovers}):
        here = [lo for lo in leftovers if lo.region == region]
        session_here = session or boto3.Session(region_name=region)
        ec2, s3 = aws_client(session_here, "ec2", region), aws_client(session_here, "s3", region)
        results += terminate_aws_instances(ec2, [lo for lo in here if lo.kind == "instance"])
        for kind in AWS_PURGE_ORDER[1:]:
            client = s3 if kind == "bucket" else ec2
            results += [(lo, attempt(lambda lo=lo: AWS_DELETERS[kind](client, lo), lo, is_aws_gone))
                        for lo in here if lo.kind == kind]
    return results


# -- GCP: find --------------------------------------------------------------------------------

def gcp_kwargs(client_options: Any, credentials: Any) -> dict:
    """Keyword arguments for every compute_v1 client: REST, and the caller's endpoint/credentials."""
    return {"transport": "rest", "client_options": client_options, "credentials": credentials}


def scope_name(scope: str) -> str:
    """`zones/us-central1-a` or a full zone URL -> `us-central1-a`."""
    return scope.rstrip("/").rsplit("/", 1)[-1]


def in_region(location: str, region: str) -> bool:
    return location == region or location.startswith(f"{region}-")


def owns_name(name: str, cluster: str, others: Iterable[str]) -> bool:
    """`<cluster>-x` is ours unless it is `<other>-x` of a longer cluster name, e.g. `demo-2-net`."""
    prefix = f"{cluster}-"
    return name.startswith(prefix) and not any(
        o.startswith(prefix) and name.startswith(f"{o}-") for o in others)


def describe_gcp(kind: str, item: Any) -> str:
    if kind == "instance":
        return f"{item.status} {scope_name(item.machine_type)}"
    if kind == "disk":
        users = ", ".join(scope_name(u) for u in item.users)
        return f"{item.status}, {item.size_gb} GB" + (f", used by {users}" if users else "")
    if kind == "address":
        return f"{item.status} {item.address}"
    return ""


def list_gcp_labelled(compute: Any, kw: dict, project: str, region: str,
                      cluster: str) -> tuple[list[Leftover], set[str]]:
    """Instances, disks and addresses with the cluster label in `region`; and the other cluster
    names seen, so that name-prefix matches can leave a longer-named cluster's resources alone."""
    found, others = [], set()
    for kind, client_name, request_name, field in (
            ("instance", "InstancesClient", "AggregatedListInstancesRequest", "instances"),
            ("disk", "DisksClient", "AggregatedListDisksRequest", "disks"),
            ("address", "AddressesClient", "AggregatedListAddressesRequest", "addresses")):
        client = getattr(compute, client_name)(**kw)
        request = getattr(compute, request_name)(project=project, filter=f"labels.{GCP_LABEL_KEY}:*")
        for scope, scoped in client.aggregated_list(request=request):
            for item in getattr(scoped, field):
                owner = item.labels.get(GCP_LABEL_KEY, "")
                if owner != cluster:
                    others.add(owner)
                elif in_region(scope_name(scope), region):
                    found.append(Leftover("gcp", kind, str(item.id), item.name, scope_name(scope),
                                          describe_gcp(kind, item)))
    return found, others


def list_gcp_named(compute: Any, kw: dict, project: str, region: str, cluster: str,
                   others: set[str]) -> list[Leftover]:
    """Networks, firewalls, subnetworks and resource policies by name prefix or network."""
    prefix = f"name eq {re.escape(cluster)}-.*"
    nets = [n for n in compute.NetworksClient(**kw).list(
        request=compute.ListNetworksRequest(project=project, filter=prefix)) if owns_name(n.name, cluster, others)]
    names = {n.name for n in nets}
    found = [Leftover("gcp", "network", str(n.id), n.name, "global") for n in nets]
    found += [Leftover("gcp", "firewall", str(f.id), f.name, "global", f"network {scope_name(f.network)}")
              for f in compute.FirewallsClient(**kw).list(request=compute.ListFirewallsRequest(project=project))
              if owns_name(f.name, cluster, others) or scope_name(f.network) in names]
    subnets = compute.SubnetworksClient(**kw).aggregated_list(
        request=compute.AggregatedListSubnetworksRequest(project=project))
    found += [Leftover("gcp", "subnetwork", str(s.id), s.name, scope_name(scope), s.ip_cidr_range)
              for scope, scoped in subnets for s in scoped.subnetworks
              if in_region(scope_name(scope), region)
              and (owns_name(s.name, cluster, others) or scope_name(s.network) in names)]
    policies = compute.ResourcePoliciesClient(**kw).aggregated_list(
        request=compute.AggregatedListResourcePoliciesRequest(project=project, filter=prefix))
    found += [Leftover("gcp", "resource-policy", str(p.id), p.name, scope_name(scope))
              for scope, scoped in policies for p in scoped.resource_policies
              if in_region(scope_name(scope), region) and owns_name(p.name, cluster, others)]
    return found


def storage_client(project: str, client_options: Any, credentials: Any) -> Any:
    """A GCS client, or None when compute points at a custom endpoint and GCS has no emulator."""
    endpoint = getattr(client_options, "api_endpoint", None) or (
        client_options.get("api_endpoint") if isinstance(client_options, dict) else None)
    if endpoint and not os.environ.get("STORAGE_EMULATOR_HOST"):
        logger.warning("compute endpoint %s is custom and STORAGE_EMULATOR_HOST is unset: "
                       "GCS buckets not swept", endpoint)
        return None
    from google.cloud import storage

    return storage.Client(project=project, credentials=credentials)


def list_gcp_buckets(gcs: Any, project: str, cluster: str) -> list[Leftover]:
    found = []
    for bucket in gcs.list_buckets(project=project):
        if (bucket.labels or {}).get(GCP_LABEL_KEY) != cluster:
            continue
        content = "has objects" if any(True for _ in gcs.list_blobs(bucket.name, max_results=1)) else "empty"
        found.append(Leftover("gcp", "bucket", bucket.name, bucket.name, (bucket.location or "").lower(),
                              f"{content}; kept by design unless gpuforge:forceDestroyBucket=true"))
    return found


def find_gcp_leftovers(cluster: str, project: str, region: str, client_options: Any = None,
                       credentials: Any = None) -> list[Leftover]:
    """Everything of `cluster` in `project` (zonal/regional ones in `region`), in purge order."""
    from google.api_core.exceptions import GoogleAPIError
    from google.cloud import compute_v1

    kw = gcp_kwargs(client_options, credentials)
    try:
        found, others = list_gcp_labelled(compute_v1, kw, project, region, cluster)
        found += list_gcp_named(compute_v1, kw, project, region, cluster, others)
        gcs = storage_client(project, client_options, credentials)
        found += list_gcp_buckets(gcs, project, cluster) if gcs else []
    except GoogleAPIError as exc:
        raise SweepError(f"listing GCP resources of cluster {cluster!r} in {project}/{region} "
                         f"failed: {exc}") from exc
    return sorted(found, key=lambda lo: GCP_PURGE_ORDER.index(lo.kind))


# -- GCP: purge -------------------------------------------------------------------------------

# kind -> (client, name argument, scope argument or "" for global)
GCP_DELETERS = {"instance": ("InstancesClient", "instance", "zone"), "disk": ("DisksClient", "disk", "zone"),
                "address": ("AddressesClient", "address", "region"),
                "resource-policy": ("ResourcePoliciesClient", "resource_policy", "region"),
                "firewall": ("FirewallsClient", "firewall", ""),
                "subnetwork": ("SubnetworksClient", "subnetwork", "region"),
                "network": ("NetworksClient", "network", "")}
GCP_OPERATIONS = {"zone": "ZoneOperationsClient", "region": "RegionOperationsClient",
                  "": "GlobalOperationsClient"}


def wait_gcp_operation(compute: Any, kw: dict, project: str, scope: str, location: str, op: Any) -> None:
    """Poll `op` with an operations client on the caller's endpoint (the one the library builds
    for ExtendedOperation.result() ignores client_options), and raise its error if it has one."""
    client = getattr(compute, GCP_OPERATIONS[scope])(**kw)
    where = {scope: location} if scope else {}
    deadline = time.monotonic() + GCP_OPERATION_TIMEOUT_S
    while op.status != compute.Operation.Status.DONE:
        if time.monotonic() > deadline:
            raise SweepError(f"operation {op.name} not done after {GCP_OPERATION_TIMEOUT_S:.0f}s")
        op = client.wait(project=project, operation=op.name, **where)
    if op.error.errors:
        raise SweepError("; ".join(e.message for e in op.error.errors))


def purge_gcp_bucket(gcs: Any, lo: Leftover) -> None:
    if gcs is None:
        raise SweepError("no GCS endpoint: set STORAGE_EMULATOR_HOST next to a custom compute endpoint")
    bucket = gcs.bucket(lo.id)
    for blob in gcs.list_blobs(lo.id, versions=True):
        bucket.delete_blob(blob.name, generation=blob.generation)
    bucket.delete()


def purge_gcp(leftovers: list[Leftover], project: str, client_options: Any,
              credentials: Any) -> list[tuple[Leftover, str | None]]:
    from google.api_core.exceptions import NotFound
    from google.cloud import compute_v1

    kw = gcp_kwargs(client_options, credentials)
    gone = lambda exc: isinstance(exc, NotFound)  # noqa: E731
    results: list[tuple[Leftover, str | None]] = []
    for kind in GCP_PURGE_ORDER:
        batch = [lo for lo in leftovers if lo.kind == kind]
        if kind == "bucket" and batch:
            gcs = storage_client(project, client_options, credentials)
            results += [(lo, attempt(lambda lo=lo: purge_gcp_bucket(gcs, lo), lo, gone)) for lo in batch]
            continue
        if not batch:
            continue
        client_name, arg, scope = GCP_DELETERS[kind]
        client = getattr(compute_v1, client_name)(**kw)
        ops: dict[Leftover, Any] = {}

        def start(lo: Leftover) -> None:
            where = {scope: lo.region} if scope else {}
            ops[lo] = client.delete_unary(project=project, **{arg: lo.name}, **where)

        # start every delete of this kind, then wait for all of them: VMs go down in parallel
        started = {lo: attempt(lambda lo=lo: start(lo), lo, gone) for lo in batch}
        for lo in batch:
            error = started[lo]
            if error is None and lo in ops:
                error = attempt(lambda lo=lo: wait_gcp_operation(compute_v1, kw, project, scope, lo.region,
                                                                 ops[lo]), lo, gone)
            results.append((lo, error))
    return results


# -- both -------------------------------------------------------------------------------------

def purge_leftovers(leftovers: list[Leftover], session: Any = None, client_options: Any = None,
                    credentials: Any = None, project: str = "") -> list[tuple[Leftover, str | None]]:
    """Delete `leftovers` in dependency order; one (leftover, error or None) per item, never
    stopping at the first failure. Things already gone count as deleted."""
    known = {"aws": AWS_PURGE_ORDER, "gcp": GCP_PURGE_ORDER}
    refused = [(lo, f"cannot purge a {lo.cloud} {lo.kind}: only {', '.join(known.get(lo.cloud, ()))}")
               for lo in leftovers if lo.kind not in known.get(lo.cloud, ())]
    aws = [lo for lo in leftovers if lo.cloud == "aws" and lo.kind in AWS_PURGE_ORDER]
    gcp = [lo for lo in leftovers if lo.cloud == "gcp" and lo.kind in GCP_PURGE_ORDER]
    if gcp and not project:
        raise SweepError("purging GCP leftovers needs project=<GCP project id>, got none")
    results = purge_aws(aws, session) if aws else []
    results += purge_gcp(gcp, project, client_options, credentials) if gcp else []
    return results + refused


def render_leftovers(leftovers: list[Leftover]) -> Any:
    """A rich Table of leftovers for `fab down`."""
    from rich.table import Table

    table = Table(title=f"{len(leftovers)} leftover resource(s)")
    for column in ("cloud", "kind", "id", "name", "region", "detail"):
        table.add_column(column)
    for lo in leftovers:
        table.add_row(lo.cloud, lo.kind, lo.id, lo.name, lo.region, lo.detail)
    return table
