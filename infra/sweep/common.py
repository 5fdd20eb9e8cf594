"""What the AWS and GCP halves of the sweep share: the Leftover record, one guarded delete, the table."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Leftover:
    cloud: str  # "aws" | "gcp"
    kind: str  # one of AWS_PURGE_ORDER / GCP_PURGE_ORDER
    id: str
    name: str
    region: str  # AWS: region; GCP: zone, region or "global"
    detail: str = ""  # state, size, why it is left


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


def render_leftovers(leftovers: list[Leftover]) -> Any:
    """A rich Table of leftovers for `fab down`."""
    from rich.table import Table

    table = Table(title=f"{len(leftovers)} leftover resource(s)")
    for column in ("cloud", "kind", "id", "name", "region", "detail"):
        table.add_column(column)
    for lo in leftovers:
        table.add_row(lo.cloud, lo.kind, lo.id, lo.name, lo.region, lo.detail)
    return table
