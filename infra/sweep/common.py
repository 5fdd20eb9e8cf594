"""What the AWS and GCP halves of the sweep share: the Leftover record, the claim rule, one guarded delete, the table.

The claim rule (DESIGN.md, "Ownership"): a resource is ours when it carries our tag/label, or (for the GCP types
that take no labels) our marker in its description, or when the stack recorded it. Never by its name.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Leftover:
    cloud: str  # "aws" | "gcp"
    kind: str  # one of AWS_PURGE_ORDER / GCP_PURGE_ORDER
    id: str
    name: str
    region: str  # AWS: region ("global" for IAM); GCP: zone, region or "global"
    detail: str = ""  # state, size, why it is left
    owner: str = ""  # the cluster its tag/label/marker names ("" when only the stack recorded it)
    owner_id: str = ""  # the cluster id it carries ("" for resources made before ids, or by a bake)
    recorded: bool = False  # the stack recorded it


@dataclass(frozen=True)
class Claim:
    """Whose resources a sweep lists: one cluster's (`cluster`), or every one of ours (`cluster=None`); plus the
    ids, names and self links a stack recorded, which are claimed whatever they carry."""

    cluster: str | None = None
    recorded: frozenset[str] = field(default_factory=frozenset)

    def owns(self, lo: Leftover) -> bool:
        """Recorded by the stack, or carrying our tag/label/marker for the cluster asked about."""
        return lo.recorded or (bool(lo.owner) and (self.cluster is None or lo.owner == self.cluster))

    def is_recorded(self, *keys: str) -> bool:
        return any(key and key in self.recorded for key in keys)


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


def render_leftovers(leftovers: list[Leftover], title: str = "") -> Any:
    """A rich Table of leftovers."""
    from rich.table import Table

    table = Table(title=title or f"{len(leftovers)} resource(s)")
    for column in ("cluster", "kind", "id", "name", "where", "detail"):
        table.add_column(column)
    for lo in leftovers:
        owner = lo.owner + (f" ({lo.owner_id})" if lo.owner_id else "") or ("recorded by the stack" if lo.recorded else "")
        table.add_row(owner, lo.kind, lo.id, lo.name, lo.region, lo.detail)
    return table
