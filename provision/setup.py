"""`fab setup` as a library call: options for the steps, the runner, a progress display, a report."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any, Callable

from infra.cluster import ClusterInfo, NodeInfo
from provision.errors import ProvisionError
from provision.facts import Facts
from provision.runner import FAILED, NodeReport, Runner
from provision.steps import all_steps
from provision.steps.base import Step
from provision.wheel import build_wheel, source_fingerprint, wheel_filename

logger = logging.getLogger(__name__)


def step_options(cluster: ClusterInfo, home: Path, pip_index: str = "") -> dict[str, Any]:
    """Run-wide inputs of the steps: the source fingerprint, the wheel (built lazily, once), the
    controller's Python for quick local nodes, the package index setting (provision/pip_index.py), and the
    cluster's accelerator for GPU steps."""
    from provision.pip_index import resolve_pip_index
    from provision.steps.base import CONTROLLER_MODE, node_mode
    from provision.steps.core import controller_options

    fingerprint = source_fingerprint()
    cache: dict[str, Path] = {}
    lock = threading.Lock()

    def wheel_path() -> Path:
        with lock:  # every node's thread asks; the first builds, the others wait for it
            if "wheel" not in cache:
                cache["wheel"] = build_wheel(home, fingerprint)
            return cache["wheel"]

    options: dict[str, Any] = {
        "source_fingerprint": fingerprint,
        "wheel_name": f"{fingerprint}/{wheel_filename()}",  # one folder per source tree on the node
        "wheel_path": wheel_path,
        "cloud": cluster.cloud,
        "pip_index": resolve_pip_index(pip_index, str(cluster.extra.get("pip_index") or "")),
    }
    if node_mode(cluster) == CONTROLLER_MODE:
        options.update(controller_options())
    for key in ("accelerator",):
        if cluster.extra.get(key):
            options[key] = cluster.extra[key]
    return options


def catalog_validator(cluster: ClusterInfo) -> Callable[[NodeInfo, Facts], None] | None:
    """Stop setup on a cloud node whose GPUs differ from its instance type's catalog row."""
    if cluster.cloud not in ("aws", "gcp"):
        return None
    from infra.catalog import gpus_of
    from infra.errors import CatalogError
    from provision.facts import validate_gpu_facts

    def validate(node: NodeInfo, facts: Facts) -> None:
        try:
            model, count, _ = gpus_of(cluster.cloud, node.instance_type, cluster.extra.get("accelerator"))
        except CatalogError:
            return
        validate_gpu_facts(facts, count, model, node.instance_type)

    return validate


def setup_cluster(cluster: ClusterInfo, home: Path, steps: list[Step] | None = None, dry_run: bool = False,
                  on_event: Callable[[str, str, str], None] | None = None, ssh_wait: float | None = None,
                  extra_options: dict[str, Any] | None = None, pip_index: str = "") -> list[NodeReport]:
    options = {**step_options(cluster, home, pip_index), **(extra_options or {})}
    kwargs = {"ssh_wait": ssh_wait} if ssh_wait is not None else {}
    runner = Runner(cluster, steps if steps is not None else all_steps(), options,
                    log_dir=log_dir(cluster, home), on_event=on_event, validate_facts=catalog_validator(cluster), **kwargs)
    reports = runner.run(dry_run=dry_run)
    if not dry_run:
        save_facts(cluster, home, reports)
    return reports


def check_cluster_allreduce(cluster: ClusterInfo, home: Path, reports: list[NodeReport], force: bool = False,
                            pip_index: str = ""):
    """After every node passed: the cross-node all-reduce (always on GPU clusters, on CPU ones when
    forced). Returns its result, or None when it does not apply."""
    gpus = any(r.facts is not None and r.facts.has_gpu for r in reports)
    if not (gpus or force) or any(not r.ok for r in reports):
        return None
    from provision.allreduce_check import run_allreduce

    return run_allreduce(cluster, list(cluster.nodes), gpus, step_options(cluster, home, pip_index))


def log_dir(cluster: ClusterInfo, home: Path) -> Path:
    return Path(home).expanduser() / "clusters" / cluster.name / "logs"


def save_facts(cluster: ClusterInfo, home: Path, reports: list[NodeReport]) -> None:
    path = Path(home).expanduser() / "clusters" / cluster.name / "facts.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    known = json.loads(path.read_text()) if path.exists() else {}
    for r in reports:
        if r.facts is not None:
            known[r.node] = r.facts.to_dict()
    path.write_text(json.dumps(known, indent=2, default=str))


def raise_for_failures(reports: list[NodeReport]) -> None:
    failed = [r for r in reports if not r.ok]
    if failed:
        raise ProvisionError("; ".join(r.error.splitlines()[0] for r in failed))


__all__ = ["setup_cluster", "step_options", "raise_for_failures", "NodeReport", "FAILED"]
