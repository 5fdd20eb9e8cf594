"""Find, report and purge what a cluster left behind after `pulumi destroy`.

`fab down` calls `find_aws_leftovers` / `find_gcp_leftovers` after the destroy, shows
`render_leftovers(...)`, and with `--purge` calls `purge_leftovers(...)`.

- AWS: every resource infra/aws.py creates carries the tag `gpuforge:cluster=<name>`; the sweep
  lists each EC2 kind with that tag filter, and the S3 buckets whose tagging has it.
- GCP: resources with labels carry `gpuforge-cluster=<name>`; those without (firewalls, networks,
  subnetworks, resource policies) are named `<name>-...`, so they are matched by that prefix, and
  firewalls and subnetworks also by sitting in one of the cluster's networks.

Baked images are never leftovers. Terminated instances are not leftovers.

Layout: `common` (the Leftover record and what both clouds share), `aws` and `gcp` (find and purge for
each); this module dispatches a purge to both and re-exports their public names.
"""

from __future__ import annotations

from typing import Any

from infra.errors import SweepError
from infra.sweep.aws import (
    AWS_DELETERS,
    AWS_GONE_CODES,
    AWS_LISTERS,
    AWS_LIVE_STATES,
    AWS_PURGE_ORDER,
    AWS_TAG_KEY,
    AWS_TERMINATE_WAIT,
    DEPENDENCY_RETRY_DELAY_S,
    DEPENDENCY_RETRY_S,
    S3_DELETE_BATCH,
    aws_client,
    delete_aws_bucket,
    delete_aws_eip,
    delete_aws_eni,
    delete_aws_igw,
    delete_aws_route_table,
    empty_aws_bucket,
    find_aws_leftovers,
    is_aws_gone,
    iter_aws_pages,
    list_aws_buckets,
    list_aws_kind,
    purge_aws,
    retry_dependency,
    tag_value,
    terminate_aws_instances,
)
from infra.sweep.common import Leftover, attempt, render_leftovers
from infra.sweep.gcp import (
    GCP_DELETERS,
    GCP_LABEL_KEY,
    GCP_OPERATION_TIMEOUT_S,
    GCP_OPERATIONS,
    GCP_PURGE_ORDER,
    describe_gcp,
    find_gcp_leftovers,
    gcp_kwargs,
    in_region,
    list_gcp_buckets,
    list_gcp_labelled,
    list_gcp_named,
    owns_name,
    purge_gcp,
    purge_gcp_bucket,
    scope_name,
    storage_client,
    wait_gcp_operation,
)


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


__all__ = [
    "AWS_DELETERS", "AWS_GONE_CODES", "AWS_LISTERS", "AWS_LIVE_STATES", "AWS_PURGE_ORDER", "AWS_TAG_KEY",
    "AWS_TERMINATE_WAIT", "DEPENDENCY_RETRY_DELAY_S", "DEPENDENCY_RETRY_S", "GCP_DELETERS", "GCP_LABEL_KEY",
    "GCP_OPERATION_TIMEOUT_S", "GCP_OPERATIONS", "GCP_PURGE_ORDER", "S3_DELETE_BATCH",
    "Leftover", "SweepError",
    "attempt", "aws_client", "delete_aws_bucket", "delete_aws_eip", "delete_aws_eni", "delete_aws_igw",
    "delete_aws_route_table", "describe_gcp", "empty_aws_bucket", "find_aws_leftovers", "find_gcp_leftovers",
    "gcp_kwargs", "in_region", "is_aws_gone", "iter_aws_pages", "list_aws_buckets", "list_aws_kind",
    "list_gcp_buckets", "list_gcp_labelled", "list_gcp_named", "owns_name", "purge_aws", "purge_gcp",
    "purge_gcp_bucket", "purge_leftovers", "render_leftovers", "retry_dependency", "scope_name",
    "storage_client", "tag_value", "terminate_aws_instances", "wait_gcp_operation",
]
