"""ClusterInfo / NodeInfo: the one record that infra, provision and workloads share.

Every source produces it: the local provider (infra/local.py), a Pulumi stack's `cluster`
output, or a hosts file for machines the user already has (provision/inventory.py).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from infra.errors import ClusterError

CLOUDS = ("local", "aws", "gcp", "hosts")
DEFAULT_WORKDIR = "/opt/gpuforge"  # where provisioning puts the venv, code and runs on a cloud node
# Every cloud resource of a cluster carries its name here; the leftover sweep and cost reports select on it.
CLUSTER_TAG = "gpuforge:cluster"  # AWS tag key
CLUSTER_LABEL = "gpuforge-cluster"  # GCP label key (labels allow no ':')
# A random id per cluster, given when it is registered: tells this cluster from another one of the same name (say, a
# colleague's `demo` in the same account), so `fab down` deletes leftovers of its own cluster only.
CLUSTER_ID_TAG = "gpuforge:cluster-id"
CLUSTER_ID_LABEL = "gpuforge-cluster-id"
# GCP types that take no labels (networks, subnetworks, firewalls, resource policies, service accounts) carry the
# same two facts in their description: "... [gpuforge-cluster=demo gpuforge-cluster-id=ab12cd34ef56]".
MARKER_RE = re.compile(r"\[gpuforge-cluster=([a-z0-9-]+)(?: gpuforge-cluster-id=([a-z0-9]+))?\]")


def ownership_marker(cluster: str, cluster_id: str = "") -> str:
    """The marker put in the description of an unlabelled GCP resource of `cluster`."""
    return f"[{CLUSTER_LABEL}={cluster}" + (f" {CLUSTER_ID_LABEL}={cluster_id}" if cluster_id else "") + "]"


def read_marker(description: str) -> tuple[str, str] | None:
    """(cluster, cluster id or "") from a description carrying our marker; None when it carries none."""
    match = MARKER_RE.search(description or "")
    return (match.group(1), match.group(2) or "") if match else None


@dataclass(frozen=True)
class NodeInfo:
    name: str
    rank: int
    public_address: str
    private_address: str
    ssh_port: int = 22
    user: str = "ubuntu"
    key_path: str = ""
    gpu_model: str = ""
    gpu_count: int = 0
    instance_type: str = ""
    workdir: str = DEFAULT_WORKDIR

    def __post_init__(self) -> None:
        if not self.name:
            raise ClusterError("node name must not be empty")
        if self.rank < 0:
            raise ClusterError(f"node {self.name}: rank must be >= 0, got {self.rank}")
        if not self.public_address:
            raise ClusterError(f"node {self.name}: public_address must not be empty")
        if not 0 < int(self.ssh_port) < 65536:
            raise ClusterError(f"node {self.name}: ssh_port must be 1..65535, got {self.ssh_port}")
        if self.gpu_count < 0:
            raise ClusterError(f"node {self.name}: gpu_count must be >= 0, got {self.gpu_count}")

    @property
    def address(self) -> str:
        """host:port as shown to users."""
        return f"{self.public_address}:{self.ssh_port}"


@dataclass(frozen=True)
class ClusterInfo:
    name: str
    cloud: str
    nodes: tuple[NodeInfo, ...]
    region: str = ""
    storage_url: str = ""
    state_dir: str = ""
    known_hosts: str = ""
    created_at: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.cloud not in CLOUDS:
            raise ClusterError(f"cluster {self.name}: cloud must be one of {', '.join(CLOUDS)}, got {self.cloud!r}")
        if not self.nodes:
            raise ClusterError(f"cluster {self.name}: has no nodes")
        ranks = sorted(n.rank for n in self.nodes)
        if ranks != list(range(len(self.nodes))):
            raise ClusterError(f"cluster {self.name}: node ranks must be 0..{len(self.nodes) - 1}, got {ranks}")
        names = [n.name for n in self.nodes]
        if len(set(names)) != len(names):
            raise ClusterError(f"cluster {self.name}: duplicate node names in {names}")
        object.__setattr__(self, "nodes", tuple(sorted(self.nodes, key=lambda n: n.rank)))

    @property
    def head(self) -> NodeInfo:
        """Rank 0: its private address is the torchrun master."""
        return self.nodes[0]

    def node(self, key: str | int) -> NodeInfo:
        """A node by rank or name; the error lists the nodes there are."""
        for n in self.nodes:
            if str(key) in (n.name, str(n.rank)):
                return n
        choices = ", ".join(f"{n.rank}/{n.name}" for n in self.nodes)
        raise ClusterError(f"cluster {self.name} has no node {key!r}; nodes: {choices}")

    def with_nodes(self, nodes: list[NodeInfo] | tuple[NodeInfo, ...]) -> ClusterInfo:
        return replace(self, nodes=tuple(nodes))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["nodes"] = [asdict(n) for n in self.nodes]
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClusterInfo:
        if not isinstance(data, dict):
            raise ClusterError(f"a cluster record must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ClusterError(f"unknown cluster field(s) {unknown}; valid: {sorted(known)}")
        missing = [k for k in ("name", "cloud", "nodes") if k not in data]
        if missing:
            raise ClusterError(f"cluster record is missing {missing}")
        node_fields = {f.name for f in fields(NodeInfo)}
        nodes = []
        for i, raw in enumerate(data["nodes"]):
            bad = sorted(set(raw) - node_fields)
            if bad:
                raise ClusterError(f"node {i}: unknown field(s) {bad}; valid: {sorted(node_fields)}")
            try:
                nodes.append(NodeInfo(**raw))
            except TypeError as exc:
                raise ClusterError(f"node {i}: {exc}") from exc
        return cls(**{**data, "nodes": tuple(nodes)})

    @classmethod
    def from_json(cls, text: str) -> ClusterInfo:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ClusterError(f"cluster record is not valid JSON: {exc}") from exc
        return cls.from_dict(data)

    def save(self, path: Path) -> None:
        """Write atomically: a reader never sees half a record."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(self.to_json())
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> ClusterInfo:
        try:
            return cls.from_json(Path(path).read_text())
        except FileNotFoundError as exc:
            raise ClusterError(f"no cluster record at {path}") from exc
