"""Runs as the controller knows them: the record of each started run, and the state of its nodes."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from infra.cluster import ClusterInfo, NodeInfo
from workloads.errors import WorkloadError
from workloads.failures import awaits_culprit

if TYPE_CHECKING:
    from workloads.launch import RunSpec

TERMINAL = ("succeeded", "failed", "cancelled", "stopped", "preempted", "dead")
LOST = ("unreachable", "dead")  # a node that went away (its machine, or its supervisor) without saying how the run ended


class LaunchError(WorkloadError):
    """A run cannot be started, found or controlled."""


@dataclass
class NodeStatus:
    node: str
    rank: int
    state: str = "unknown"
    reason: str = ""
    exit_code: int | None = None
    step: int | None = None
    total_steps: int | None = None
    loss: float | None = None
    tail: str = ""
    ended: float | None = None
    secondary: bool = False
    """Failed only because a peer went away (gloo/NCCL lost the connection)."""
    failed_rank: int | None = None
    """The global rank whose failure torchrun reported first, when it did."""
    error: str = ""
    """That rank's error: its error file, the last traceback of the log, or our trainer's `error:` line."""


@dataclass
class RunStatus:
    run_id: str
    nodes: list[NodeStatus]

    @property
    def state(self) -> str:
        states = [n.state for n in self.nodes]
        if all(s == "succeeded" for s in states):
            return "succeeded"
        ended = all(s in TERMINAL or s in LOST for s in states)
        if "preempted" in states and ended:
            return "preempted"
        if any(s in ("failed", "stopped", "dead") for s in states) or (ended and "unreachable" in states):
            if awaits_culprit([(n.state, n.secondary, n.ended) for n in self.nodes], time.time()):
                return "running"  # a victim failed first; the rank that broke is still ending
            return "failed"
        if any(s == "cancelled" for s in states) and all(s in TERMINAL for s in states):
            return "cancelled"
        return "running"

    @property
    def culprit(self) -> NodeStatus | None:
        """The node that failed first (a 'stopped' node was stopped because of another)."""
        for group in ([n for n in self.nodes if n.state == "failed" and not n.secondary],
                      [n for n in self.nodes if n.state == "failed"],
                      [n for n in self.nodes if n.state == "stopped"]):
            if group:
                return min(group, key=lambda n: n.ended or float("inf"))
        return None


# -- controller-side records --------------------------------------------------------------------


def runs_dir(home: Path, cluster: ClusterInfo) -> Path:
    return Path(home).expanduser() / "clusters" / cluster.name / "runs"


def save_record(home: Path, cluster: ClusterInfo, spec: RunSpec, nodes: list[NodeInfo], port: int, attempt: int = 1) -> None:
    """The run as the controller remembers it: the spec (secret names only, never values), nodes, port, attempt."""
    path = runs_dir(home, cluster) / f"{spec.run_id}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    earlier = json.loads(path.read_text()) if path.exists() else {}
    tmp.write_text(json.dumps({"spec": asdict(spec), "nodes": [n.name for n in nodes], "master_port": port,
                               "started": time.time(), "attempt": attempt,
                               "recoveries": earlier.get("recoveries", []) if attempt > 1 else []}, indent=2))
    tmp.replace(path)


def find_record(home: Path, cluster: ClusterInfo, run_id: str) -> dict[str, Any] | None:
    path = runs_dir(home, cluster) / f"{run_id}.json"
    return json.loads(path.read_text()) if path.exists() else None


def load_record(home: Path, cluster: ClusterInfo, run_id: str | None) -> dict[str, Any]:
    """A run by id, or the newest one when run_id is None."""
    folder = runs_dir(home, cluster)
    records = sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime) if folder.exists() else []
    if run_id is None:
        if not records:
            raise LaunchError(f"no runs on cluster {cluster.name} yet; start one with `gpuforge train --job NAME`")
        return json.loads(records[-1].read_text())
    path = folder / f"{run_id}.json"
    if not path.exists():
        known = ", ".join(p.stem for p in records[-10:]) or "none"
        raise LaunchError(f"no run {run_id!r} on cluster {cluster.name}; recent runs: {known}")
    return json.loads(path.read_text())


def add_recovery(home: Path, cluster: ClusterInfo, run_id: str, recovery: dict[str, Any]) -> None:
    """Append one recovery (when, node, why, steps lost, seconds per phase) to the run's record."""
    path = runs_dir(home, cluster) / f"{run_id}.json"
    record = json.loads(path.read_text())
    record.setdefault("recoveries", []).append(recovery)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(path)


def list_runs(home: Path, cluster: ClusterInfo, limit: int = 10) -> list[dict[str, Any]]:
    """The cluster's newest run records, newest first."""
    folder = runs_dir(home, cluster)
    paths = sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True) if folder.exists() else []
    return [json.loads(p.read_text()) for p in paths[:limit]]


def record_nodes(cluster: ClusterInfo, record: dict[str, Any]) -> list[NodeInfo]:
    return [cluster.node(name) for name in record["nodes"]]
