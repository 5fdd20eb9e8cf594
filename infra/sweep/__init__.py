"""Find, report and purge what carries our tags, for `fab down` (after the destroy) and `fab sweep`.

    found = find_aws_leftovers("demo", "us-east-1", recorded=frozenset(ids_the_stack_recorded))
    data, rest = split_data(found)          # buckets with objects are the user's data: never purged silently
    results = purge_leftovers(rest)         # [(leftover, error or None)], in dependency order

- AWS: every resource infra/aws.py creates carries `gpuforge:cluster=<name>` (and `gpuforge:cluster-id`): each EC2
  kind (launch templates included) is listed with a tag filter, IAM roles and instance profiles under /gpuforge/
  by their tags (and their region tag), S3 buckets by their tagging.
- GCP: labelled types by the label; networks, subnetworks, firewalls, resource policies and service accounts by the
  ownership marker in their description.
- Either: what the stack recorded (ids, names, self links) is claimed too. Nothing is ever claimed by its name.

Baked images are never leftovers. Terminated instances are not leftovers.
"""

from __future__ import annotations

from typing import Any

from infra.errors import SweepError
from infra.sweep.aws import AWS_PURGE_ORDER, delete_aws_igw, delete_aws_route_table, find_aws_leftovers, \
    purge_aws, retry_dependency
from infra.sweep.common import Claim, Leftover, attempt, render_leftovers
from infra.sweep.gcp import GCP_PURGE_ORDER, find_gcp_leftovers, purge_gcp


def holds_data(lo: Leftover) -> bool:
    """A bucket that is not empty (detail "N object version(s), B bytes")."""
    return lo.kind == "bucket" and lo.detail != "empty"


def split_data(leftovers: list[Leftover]) -> tuple[list[Leftover], list[Leftover]]:
    """(buckets holding data, everything else)."""
    return [lo for lo in leftovers if holds_data(lo)], [lo for lo in leftovers if not holds_data(lo)]


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


__all__ = ["AWS_PURGE_ORDER", "GCP_PURGE_ORDER", "Claim", "Leftover", "SweepError", "attempt", "delete_aws_igw",
           "delete_aws_route_table", "find_aws_leftovers", "find_gcp_leftovers", "holds_data", "purge_leftovers",
           "render_leftovers", "retry_dependency", "split_data"]
