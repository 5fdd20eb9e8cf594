"""Helpers the GPU steps share: file writes, probes, holds, and what a step knows about its node.

A root command (Cmd.sudo) is a whole shell line that runs as root through base.root_command; quoting is done
with shlex so that nothing is left to a second shell's interpretation by accident. apt runs through
provision/steps/apt.py (cloud-init, lock waits, bounded retries).
"""

from __future__ import annotations

import logging
import shlex
from typing import TYPE_CHECKING, Any

from provision.facts import SECTION, split_sections
from provision.steps.apt import apt_install  # noqa: F401 - the GPU steps import apt_install from here
from provision.steps.base import Cmd
from provision.drivers import DriverChoice, choose_driver
from provision.versions import NodeDriver, VersionSet, gpu_family, parse_version, version_set

if TYPE_CHECKING:
    from infra.catalog import InstanceType
    from provision.steps.base import StepContext

logger = logging.getLogger(__name__)

CACHE_DIR = "/var/cache/gpuforge"
"""Root-owned download directory on nodes (not /tmp: a predictable path there could be pre-planted)."""


def sh(script: str, sudo: bool = False, desc: str = "", timeout: float | None = None) -> Cmd:
    """A command that needs a POSIX shell (pipes, redirects, tests): as root the whole script goes to
    root_command's `sh -c`; as the login user it is wrapped in `sh -c '<script>'` (the login shell may be any)."""
    if sudo:
        return Cmd(script, sudo=True, desc=desc, timeout=timeout)
    return Cmd(f"sh -c {shlex.quote(script)}", desc=desc, timeout=timeout)


def dquote(text: str) -> str:
    """Double-quote for sh, leaving nothing for the shell to expand."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$").replace("`", "\\`")
    return f'"{escaped}"'


def write_file(path: str, lines: list[str], desc: str) -> Cmd:
    """Write `lines` to `path` as root (the whole file; rewriting it is idempotent)."""
    body = " ".join(dquote(line) for line in lines)
    return sh(f'printf "%s\\n" {body} > {path}', sudo=True, desc=desc)


def apt_hold(*packages: str) -> Cmd:
    """`apt-mark hold`: unattended upgrades and `apt upgrade` then leave the pinned packages alone."""
    return Cmd(f"apt-mark hold {' '.join(packages)}", sudo=True, desc="hold them so apt upgrades leave them alone")


def pinned(package: str, version: str) -> str:
    """`pkg=580.167.08-*`: the upstream version exactly, whatever the Debian revision (apt prefix match)."""
    return f"{package}={version}-*"


def probe_command(sections: dict[str, str]) -> str:
    """One read-only command that runs several shell snippets and tags each one's output."""
    # A newline before each tag: a snippet whose output has none (dpkg-query -f='${Status}') must not swallow it.
    script = "; ".join(f"printf '\\n{SECTION}{name}\\n'; {snippet}" for name, snippet in sections.items())
    return f"sh -c {shlex.quote(script)}"


def probe(conn: Any, sections: dict[str, str]) -> dict[str, str]:
    """Run `probe_command(sections)` in one round trip; returns each snippet's output by name."""
    result = conn.run(probe_command(sections), hide=True, warn=True)
    return split_sections(result.stdout or "")


def matrix_for(ctx: StepContext) -> VersionSet:
    """The matrix row for this node: ctx.options["versions"] when the runner chose one, else by the node's OS."""
    chosen = ctx.options.get("versions")
    if isinstance(chosen, VersionSet):
        return chosen
    return version_set(ctx.facts.os_name if ctx.facts else "")


def driver_choice(ctx: StepContext) -> DriverChoice:
    """Install or keep the node's driver, and the versions that follow (provision/drivers.py); MatrixError
    when the node's driver can be neither kept nor replaced."""
    node = ctx.facts.existing_driver if ctx.facts is not None else NodeDriver()
    return choose_driver(matrix_for(ctx), gpu_model_of(ctx), node)


def versions_for(ctx: StepContext) -> VersionSet:
    """What this node runs once set up: the matrix row, around the node's own driver where it keeps one
    (then Fabric Manager follows that driver, and CUDA/NCCL/torch the torch build it runs)."""
    return driver_choice(ctx).versions


def gpu_model_of(ctx: StepContext) -> str:
    """The node's GPU model as facts or the inventory name it ("A100", "NVIDIA H100 80GB HBM3", ...)."""
    if ctx.facts and ctx.facts.gpu_model:
        return ctx.facts.gpu_model
    return ctx.node.gpu_model


def instance_type_of(ctx: StepContext) -> str:
    return ctx.options.get("instance_type") or ctx.node.instance_type


def catalog_row(ctx: StepContext) -> InstanceType | None:
    """The catalog row of the node's instance type, or None (local/hosts clusters, unknown types)."""
    name, cloud = instance_type_of(ctx), ctx.options.get("cloud") or ctx.cluster.cloud
    if not name or cloud not in ("aws", "gcp"):
        return None
    from infra.catalog import find_instance  # the catalog is only needed on cloud nodes
    from infra.errors import CatalogError

    try:
        return find_instance(cloud, name)
    except CatalogError:
        logger.warning("instance type %s is not in the %s catalog", name, cloud)
        return None


def expected_gpu_count(ctx: StepContext) -> int:
    """GPUs this node should show: the catalog's count (on GCP n1, the count in ctx.options["accelerator"],
    e.g. `nvidia-tesla-t4:4`), else what the bus shows."""
    row = catalog_row(ctx)
    accelerator = ctx.options.get("accelerator")
    if row is not None and accelerator:
        from infra.catalog import parse_accelerator

        return parse_accelerator(accelerator)[1]
    if row is not None and row.gpu_count:
        return row.gpu_count
    if ctx.facts and ctx.facts.gpu_pci_count:
        return ctx.facts.gpu_pci_count
    return ctx.node.gpu_count


def at_least(found: str, wanted: str) -> bool:
    """`found` >= `wanted` as dotted versions ("" is never enough)."""
    return bool(found) and parse_version(found) >= parse_version(wanted)


def efa_rdma(ctx: StepContext) -> bool:
    """GPUDirect RDMA over EFA: p4d/p4de/p5/p5e/p5en/p6 (A100, H100, H200, B200); aws-ofi-nccl
    doc/efa-env-var.md: "only p4 and p5 instances support both EFA and NVIDIA GPUDirect RDMA"."""
    return gpu_family(gpu_model_of(ctx)) in {"A100", "H100", "H200", "B200"}
