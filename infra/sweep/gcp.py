"""GCP half of the sweep: resources with labels carry `gpuforge-cluster=<name>`; those without (firewalls,
networks, subnetworks, resource policies) are named `<name>-...`, so they are matched by that prefix, and
firewalls and subnetworks also by sitting in one of the cluster's networks."""

from __future__ import annotations

import logging
import os
import re
import time
from typing import Any, Iterable

from infra.cluster import CLUSTER_LABEL
from infra.errors import SweepError
from infra.sweep.common import Leftover, attempt

logger = logging.getLogger(__name__)

GCP_LABEL_KEY = CLUSTER_LABEL  # put on every labellable resource by infra/gcp.py
GCP_OPERATION_TIMEOUT_S = 600.0  # deleting a GPU VM takes 1-3 min; operations.wait returns within 2
GCP_PURGE_ORDER = ("instance", "disk", "address", "resource-policy", "firewall", "subnetwork", "network",
                   "bucket")


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

