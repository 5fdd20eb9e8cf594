"""GCP half of the sweep. Instances, disks, addresses and buckets carry the label `gpuforge-cluster=<name>` (and
`gpuforge-cluster-id=<id>`); networks, subnetworks, firewalls, resource policies and service accounts take no
labels and carry the same facts as a marker in their description (infra/cluster.py `ownership_marker`). A resource
is claimed by its label or marker, or because the stack recorded it; never by its name, so a user's own
`prod-allow-https` firewall is nobody's business of cluster `prod`'s sweep."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import replace
from typing import Any

from infra.cluster import CLUSTER_ID_LABEL, CLUSTER_LABEL, read_marker
from infra.errors import SweepError
from infra.gcp_api import ServiceAccountsApi, compute_kwargs
from infra.sweep.common import Claim, Leftover, attempt

logger = logging.getLogger(__name__)

GCP_LABEL_KEY = CLUSTER_LABEL  # put on every labellable resource by infra/gcp.py
GCP_OPERATION_TIMEOUT_S = 600.0  # deleting a GPU VM takes 1-3 min; operations.wait returns within 2
GCP_PURGE_ORDER = ("instance", "disk", "address", "resource-policy", "firewall", "subnetwork", "network",
                   "service-account", "bucket")


# -- GCP: find --------------------------------------------------------------------------------

def gcp_kwargs(client_options: Any, credentials: Any) -> dict:
    """Keyword arguments for every compute_v1 client: REST, and the caller's endpoint/credentials (or ours)."""
    return compute_kwargs(client_options, credentials)


def scope_name(scope: str) -> str:
    """`zones/us-central1-a` or a full zone URL -> `us-central1-a`."""
    return scope.rstrip("/").rsplit("/", 1)[-1]


def in_region(location: str, region: str) -> bool:
    return location == region or location.startswith(f"{region}-")


def label_filter(claim: Claim) -> str:
    if claim.cluster is None:
        return f"labels.{GCP_LABEL_KEY}:*"
    return f'labels.{GCP_LABEL_KEY} = "{claim.cluster}"'


def describe_gcp(kind: str, item: Any) -> str:
    if kind == "instance":
        return f"{item.status} {scope_name(item.machine_type)}"
    if kind == "disk":
        users = ", ".join(scope_name(u) for u in item.users)
        return f"{item.status}, {item.size_gb} GB" + (f", used by {users}" if users else "")
    if kind == "address":
        return f"{item.status} {item.address}"
    return ""


def labelled(kind: str, item: Any, where: str, claim: Claim, detail: str = "") -> Leftover:
    labels = dict(item.labels or {})
    return Leftover("gcp", kind, str(item.id), item.name, where, detail, owner=labels.get(GCP_LABEL_KEY, ""),
                    owner_id=labels.get(CLUSTER_ID_LABEL, ""),
                    recorded=claim.is_recorded(*unique_keys(item)))


def unique_keys(item: Any) -> tuple[str, ...]:
    """What names one resource only: its self link (and the path in it, as Pulumi records ids) and numeric id;
    never its name, which another zone, region or project may share."""
    link = getattr(item, "self_link", "") or ""
    return link, link.split("/compute/v1/", 1)[-1] if link else "", str(getattr(item, "id", "") or "")


def marked(kind: str, item: Any, where: str, claim: Claim, detail: str = "") -> Leftover:
    owner, owner_id = read_marker(getattr(item, "description", "") or "") or ("", "")
    return Leftover("gcp", kind, str(item.id), item.name, where, detail, owner=owner, owner_id=owner_id,
                    recorded=claim.is_recorded(*unique_keys(item)))


def list_gcp_labelled(compute: Any, kw: dict, project: str, region: str, claim: Claim) -> list[Leftover]:
    """Instances, disks and addresses in `region` whose label claims them."""
    found = []
    for kind, client_name, request_name, field in (
            ("instance", "InstancesClient", "AggregatedListInstancesRequest", "instances"),
            ("disk", "DisksClient", "AggregatedListDisksRequest", "disks"),
            ("address", "AddressesClient", "AggregatedListAddressesRequest", "addresses")):
        client = getattr(compute, client_name)(**kw)
        request = getattr(compute, request_name)(project=project, filter=label_filter(claim))
        for scope, scoped in client.aggregated_list(request=request):
            where = scope_name(scope)
            if not in_region(where, region):
                continue
            found += [labelled(kind, item, where, claim, describe_gcp(kind, item)) for item in getattr(scoped, field)]
    return [lo for lo in found if claim.owns(lo)]


def list_gcp_marked(compute: Any, kw: dict, project: str, region: str, claim: Claim) -> list[Leftover]:
    """Networks, firewalls, subnetworks and resource policies whose description marker (or the stack) claims them."""
    found = [marked("network", n, "global", claim) for n in compute.NetworksClient(**kw).list(
        request=compute.ListNetworksRequest(project=project))]
    found += [marked("firewall", f, "global", claim, f"network {scope_name(f.network)}")
              for f in compute.FirewallsClient(**kw).list(request=compute.ListFirewallsRequest(project=project))]
    subnets = compute.SubnetworksClient(**kw).aggregated_list(
        request=compute.AggregatedListSubnetworksRequest(project=project))
    found += [marked("subnetwork", s, scope_name(scope), claim, s.ip_cidr_range)
              for scope, scoped in subnets for s in scoped.subnetworks if in_region(scope_name(scope), region)]
    policies = compute.ResourcePoliciesClient(**kw).aggregated_list(
        request=compute.AggregatedListResourcePoliciesRequest(project=project))
    found += [marked("resource-policy", p, scope_name(scope), claim)
              for scope, scoped in policies for p in scoped.resource_policies if in_region(scope_name(scope), region)]
    return [lo for lo in found if claim.owns(lo)]


def list_gcp_service_accounts(accounts: Any, project: str, claim: Claim) -> list[Leftover]:
    found = []
    for account in accounts.list(project):
        owner, owner_id = read_marker(account.get("description", "")) or ("", "")
        email = account["email"]
        lo = Leftover("gcp", "service-account", email, email.split("@")[0], "global", account.get("displayName", ""),
                      owner=owner, owner_id=owner_id, recorded=claim.is_recorded(email, account.get("uniqueId", "")))
        if claim.owns(lo):
            found.append(lo)
    return found


def storage_client(project: str, client_options: Any, credentials: Any) -> Any:
    """A GCS client, or None when compute points at a custom endpoint and GCS has no emulator."""
    endpoint = getattr(client_options, "api_endpoint", None) or (
        client_options.get("api_endpoint") if isinstance(client_options, dict) else None)
    if (endpoint or os.environ.get("GPUFORGE_GCP_ENDPOINT")) and not os.environ.get("STORAGE_EMULATOR_HOST"):
        logger.warning("the compute endpoint is custom and STORAGE_EMULATOR_HOST is unset: GCS buckets not swept")
        return None
    from google.cloud import storage

    return storage.Client(project=project, credentials=credentials)


def gcs_content(gcs: Any, bucket: str) -> tuple[int, int]:
    """(object generations, bytes) in a bucket, noncurrent versions included."""
    count = size = 0
    for blob in gcs.list_blobs(bucket, versions=True):
        count += 1
        size += int(blob.size or 0)
    return count, size


def list_gcp_buckets(gcs: Any, project: str, claim: Claim) -> list[Leftover]:
    found = []
    for bucket in gcs.list_buckets(project=project):
        labels = dict(bucket.labels or {})
        lo = Leftover("gcp", "bucket", bucket.name, bucket.name, (bucket.location or "").lower(),
                      owner=labels.get(GCP_LABEL_KEY, ""), owner_id=labels.get(CLUSTER_ID_LABEL, ""),
                      recorded=claim.is_recorded(bucket.name))
        if not claim.owns(lo):
            continue
        count, size = gcs_content(gcs, bucket.name)
        found.append(replace(lo, detail=f"{count} object version(s), {size} bytes" if count else "empty"))
    return found


def find_gcp_leftovers(cluster: str | None, project: str, region: str, client_options: Any = None,
                       credentials: Any = None, recorded: frozenset[str] = frozenset()) -> list[Leftover]:
    """Everything of `cluster` (None: of any gpuforge cluster) in `project` (zonal/regional ones in `region`), and
    what the stack recorded (`recorded`: names, ids, self links, emails), in purge order."""
    from google.api_core.exceptions import GoogleAPIError
    from google.cloud import compute_v1

    if not project:
        raise SweepError("the GCP sweep needs a project id; pass --project")
    claim = Claim(cluster, frozenset(recorded))
    kw = gcp_kwargs(client_options, credentials)
    try:
        found = list_gcp_labelled(compute_v1, kw, project, region, claim)
        found += list_gcp_marked(compute_v1, kw, project, region, claim)
        found += list_gcp_service_accounts(ServiceAccountsApi(kw["client_options"], kw["credentials"]), project, claim)
        gcs = storage_client(project, kw["client_options"], credentials)
        found += list_gcp_buckets(gcs, project, claim) if gcs else []
    except GoogleAPIError as exc:
        who = f"cluster {cluster!r}" if cluster else "gpuforge clusters"
        raise SweepError(f"listing GCP resources of {who} in {project}/{region} failed: {exc}") from exc
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
    """Delete every generation (noncurrent versions included), then the bucket."""
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
        if not batch:
            continue
        if kind == "bucket":
            gcs = storage_client(project, kw["client_options"], credentials)
            results += [(lo, attempt(lambda lo=lo: purge_gcp_bucket(gcs, lo), lo, gone)) for lo in batch]
            continue
        if kind == "service-account":
            accounts = ServiceAccountsApi(kw["client_options"], kw["credentials"])
            results += [(lo, attempt(lambda lo=lo: accounts.delete(project, lo.id), lo, gone)) for lo in batch]
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
