"""Which cluster a command talks to, resolved to a ClusterInfo.

Sources: the local provider's state, a Pulumi stack's `cluster` output (`pulumi stack output
--json`, or a saved copy of it), or a hosts file for machines the user already has. The cluster is
chosen once and remembered (`fab use NAME`, like `pulumi stack select`), or per call with
`--cluster NAME|FILE|pulumi:STACK`. Every known cluster has a folder under $GPUFORGE_HOME/clusters.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import yaml

from infra.cluster import DEFAULT_WORKDIR, ClusterInfo, NodeInfo
from infra.errors import ClusterError
from provision.errors import InventoryError, ProvisionError

DEFAULT_HOME = "~/.gpuforge"
NAME = re.compile(r"^[a-z][a-z0-9-]{0,38}$")
HOST_FIELDS = {"address", "private_address", "port", "user", "key", "name", "gpus", "gpu_model", "workdir", "jump",
               "frameworks"}
FILE_FIELDS = {"name", "hosts", "user", "key", "port", "storage", "workdir", "pip_index", "frameworks"}
FRAMEWORKS = ("tensorflow",)  # what a node can ask setup for beyond PyTorch (provision/steps/tensorflow.py)


def home_dir() -> Path:
    return Path(os.environ.get("GPUFORGE_HOME", DEFAULT_HOME)).expanduser()


def cluster_dir(home: Path, name: str) -> Path:
    return Path(home) / "clusters" / name


def known_clusters(home: Path) -> list[str]:
    root = Path(home) / "clusters"
    return sorted(p.parent.name for p in root.glob("*/cluster.json")) if root.exists() else []


def current_name(home: Path) -> str | None:
    path = Path(home) / "current"
    return path.read_text().strip() or None if path.exists() else None


def select(home: Path, name: str | None) -> None:
    path = Path(home) / "current"
    path.parent.mkdir(parents=True, exist_ok=True)
    if name is None:
        path.unlink(missing_ok=True)
    else:
        path.write_text(name + "\n")


def register(home: Path, cluster: ClusterInfo) -> ClusterInfo:
    """Remember a cluster (cloud or hosts file) under home, with a known_hosts for its pins."""
    folder = cluster_dir(home, cluster.name)
    folder.mkdir(parents=True, exist_ok=True)
    from dataclasses import replace

    cluster = replace(cluster, state_dir=cluster.state_dir or str(folder),
                      known_hosts=cluster.known_hosts or str(folder / "known_hosts"))
    cluster.save(folder / "cluster.json")
    from infra.ssh_config import write_ssh_config

    write_ssh_config(home, cluster)  # `ssh <cluster>-<node>` follows the record
    return cluster


def resolve(home: Path, ref: str | None = None) -> ClusterInfo:
    """The cluster named by `ref` (name, hosts file, stack output JSON, pulumi:STACK) or the current one."""
    if ref is None:
        ref = current_name(home)
        if ref is None:
            known = ", ".join(known_clusters(home))
            there = f"known clusters: {known}; pick one with `gpuforge use NAME`" if known else "there are none yet"
            raise InventoryError(f"no cluster selected ({there}): create one with `gpuforge up`, "
                                 "or pass --cluster NAME|HOSTS.yaml|pulumi:STACK")
    source = cluster_from_source(ref, home)
    if source is not None:
        return attach(home, source)
    record = cluster_dir(home, ref) / "cluster.json"
    if record.exists():
        try:
            return ClusterInfo.load(record)
        except ClusterError as exc:
            raise InventoryError(f"cluster {ref}: {exc}") from exc
    pending = cluster_dir(home, ref) / "registration.json"
    if pending.exists():
        state = json.loads(pending.read_text())
        why = state.get("error") or "its `gpuforge up` has not finished"
        raise InventoryError(f"cluster {ref} is {state.get('state')} ({why}); `gpuforge up` again, or "
                             f"`gpuforge down --cluster {ref}` removes what it made")
    if (cluster_dir(home, ref) / "kept-data.json").exists():
        raise InventoryError(f"cluster {ref} is down; only its data is kept "
                             f"(`gpuforge down --delete-data --cluster {ref}` deletes it)")
    known = ", ".join(known_clusters(home)) or "none yet"
    raise InventoryError(f"unknown cluster {ref!r}; known clusters: {known} (or give a hosts .yaml, a stack output .json, or pulumi:STACK)")


def cluster_from_source(ref: str, home: Path | None = None) -> ClusterInfo | None:
    """The cluster a file or stack reference describes, or None when `ref` is a name."""
    if ref.startswith("pulumi:"):
        return cluster_from_stack(ref.removeprefix("pulumi:"), home)
    path = Path(ref).expanduser()
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return load_hosts_file(path)
    if path.suffix == ".json" and path.is_file():
        return load_cluster_json(path)
    return None


def attach(home: Path, cluster: ClusterInfo) -> ClusterInfo:
    """A cluster used for this call only (`--cluster hosts.yaml`): its state (pinned host keys, runs) lives
    in its folder, but it is not registered (`fab clusters` does not list it) unless `up --hosts` or `use`
    registers it. A registered cluster of the same name from another source is never overwritten."""
    from dataclasses import replace

    folder = cluster_dir(home, cluster.name)
    record = folder / "cluster.json"
    if record.exists():
        try:
            known = ClusterInfo.load(record)
        except ClusterError:
            known = None
        if known is not None and (known.cloud, known.extra.get("hosts_file")) != (cluster.cloud, cluster.extra.get("hosts_file")):
            raise InventoryError(f"cluster {cluster.name} already exists ({known.cloud}); give the file another `name:`")
    folder.mkdir(parents=True, exist_ok=True)
    return replace(cluster, state_dir=cluster.state_dir or str(folder),
                   known_hosts=cluster.known_hosts or str(folder / "known_hosts"))


def load_cluster_json(path: Path) -> ClusterInfo:
    """A saved ClusterInfo, or the JSON of `pulumi stack output --json` (with its `cluster` key)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InventoryError(f"{path}: not readable JSON: {exc}") from exc
    try:
        if isinstance(data, dict) and "cluster" in data:
            from infra.stacks import cluster_from_outputs

            return cluster_from_outputs(data)
        return ClusterInfo.from_dict(data)
    except ClusterError as exc:
        raise InventoryError(f"{path}: {exc}") from exc


def cluster_from_stack(stack: str, home: Path | None = None) -> ClusterInfo:
    """The `cluster` output of a stack. A stack `fab up` made is read with the backend and passphrase `fab up` used
    (its folder under $GPUFORGE_HOME); any other with the Pulumi CLI's own login."""
    from infra.stacks import cluster_from_outputs, require_pulumi_cli, stack_outputs

    state = cluster_dir(home, stack) if home is not None else None
    try:
        if state is not None and state.exists():
            return cluster_from_outputs(stack_outputs(stack, state))
        pulumi = require_pulumi_cli()
    except ClusterError as exc:
        raise InventoryError(f"stack {stack}: {exc}") from exc
    result = subprocess.run([pulumi, "stack", "output", "--json", "--show-secrets", "--stack", stack],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise InventoryError(f"pulumi stack output --stack {stack} failed: {result.stderr.strip()[-500:]}")
    try:
        return cluster_from_outputs(result.stdout)
    except ClusterError as exc:
        raise InventoryError(f"stack {stack}: {exc}") from exc


def load_hosts_file(path: Path) -> ClusterInfo:
    """Machines the user already has:

        name: lab                     # optional; default: the file's name
        user: ubuntu                  # defaults for every host
        key: ~/.ssh/id_ed25519
        storage: s3://my-bucket       # shared storage for checkpoints (needed for multi-node resume)
        pip_index: https://pypi.example.corp/simple   # optional: the nodes' package index (a URL, or `node`)
        frameworks: [tensorflow]      # optional: TensorFlow on every host (or per host, below)
        hosts:
          - address: 203.0.113.10     # SSH address; private_address defaults to it
            private_address: 10.0.0.10
            port: 22
            gpus: 8
          - address: 10.0.0.11        # no public address: reached through the first host (ProxyJump)
            jump: true
    """
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise InventoryError(f"{path}: cannot read the hosts file: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("hosts"), list) or not data["hosts"]:
        raise InventoryError(f"{path}: needs a non-empty `hosts:` list (each with at least `address:`)")
    unknown = sorted(set(data) - FILE_FIELDS)
    if unknown:
        raise InventoryError(f"{path}: unknown field(s) {unknown}; valid: {sorted(FILE_FIELDS)}")
    name = str(data.get("name") or Path(path).stem).lower().replace("_", "-")
    if not NAME.match(name):
        raise InventoryError(f"{path}: cluster name {name!r} must be lowercase letters, digits and '-' (max 39)")
    nodes = [host_node(path, i, h, data) for i, h in enumerate(data["hosts"])]
    seen: dict[tuple[str, int], int] = {}
    for i, node in enumerate(nodes):
        where = seen.setdefault((node.public_address, node.ssh_port), i)
        if where != i:
            raise InventoryError(f"{path}: hosts[{i}] is {node.public_address}:{node.ssh_port}, the same machine as "
                                 f"hosts[{where}]; each host once (use `gpus:` for a machine's GPUs)")
    node_names = [n.name for n in nodes]
    for i, node_name in enumerate(node_names):
        if node_names.index(node_name) != i:
            raise InventoryError(f"{path}: hosts[{i}] has the name {node_name!r} of hosts[{node_names.index(node_name)}]; "
                                 "names must differ")
    storage = str(data.get("storage") or "")
    if storage and not re.match(r"^(file|s3|gs)://", storage):
        raise InventoryError(f"{path}: storage {storage!r} must be a file://, s3:// or gs:// URL")
    extra: dict[str, Any] = {"hosts_file": str(Path(path).resolve())}
    if data.get("pip_index"):
        from provision.pip_index import check_setting

        try:
            extra["pip_index"] = check_setting(str(data["pip_index"]), f"{path}: pip_index")
        except ProvisionError as exc:
            raise InventoryError(str(exc)) from exc
    extra.update(host_options(path, data, nodes))
    try:
        return ClusterInfo(name=name, cloud="hosts", nodes=tuple(nodes), region="", storage_url=storage, extra=extra)
    except ClusterError as exc:
        raise InventoryError(f"{path}: {exc}") from exc


def check_frameworks(where: str, value: Any) -> list[str]:
    if not isinstance(value, list) or any(v not in FRAMEWORKS for v in value):
        raise InventoryError(f"{where}: frameworks must be a list of {', '.join(FRAMEWORKS)}; got {value!r}")
    return list(value)


def host_options(path: Path, data: dict[str, Any], nodes: list[NodeInfo]) -> dict[str, Any]:
    """The cluster record's `frameworks`, `node_frameworks` and `proxy_jump` (nodes reached through node 0)."""
    out: dict[str, Any] = {}
    if "frameworks" in data:
        out["frameworks"] = check_frameworks(str(path), data["frameworks"])
    per_node = {n.name: check_frameworks(f"{path}: hosts[{i}]", h["frameworks"])
                for i, (n, h) in enumerate(zip(nodes, data["hosts"])) if "frameworks" in h}
    if per_node:
        out["node_frameworks"] = per_node
    jumps = []
    for i, (n, h) in enumerate(zip(nodes, data["hosts"])):
        if not isinstance(h.get("jump", False), bool):
            raise InventoryError(f"{path}: hosts[{i}]: jump must be true or false, got {h['jump']!r}")
        if h.get("jump") and i == 0:
            raise InventoryError(f"{path}: hosts[0] is the jump host itself; `jump: true` goes on the others")
        if h.get("jump"):
            jumps.append(n.name)
    if jumps:
        out["proxy_jump"] = jumps
    return out


def host_node(path: Path, index: int, host: Any, defaults: dict[str, Any]) -> NodeInfo:
    where = f"{path}: hosts[{index}]"
    if not isinstance(host, dict) or "address" not in host:
        raise InventoryError(f"{where}: each host needs `address:` (got {host!r})")
    unknown = sorted(set(host) - HOST_FIELDS)
    if unknown:
        raise InventoryError(f"{where}: unknown field(s) {unknown}; valid: {sorted(HOST_FIELDS)}")
    address = str(host["address"])
    check_address(where, address)
    port = host.get("port", defaults.get("port", 22))
    if not isinstance(port, int) or not 0 < port < 65536:
        raise InventoryError(f"{where}: port must be 1..65535, got {port!r}")
    key = str(host.get("key", defaults.get("key", "")))
    if key and not Path(key).expanduser().is_file():
        raise InventoryError(f"{where}: key file {key} does not exist")
    gpus = host.get("gpus", 0)
    if not isinstance(gpus, int) or gpus < 0:
        raise InventoryError(f"{where}: gpus must be a whole number >= 0, got {gpus!r}")
    return NodeInfo(name=str(host.get("name") or f"node-{index}"), rank=index, public_address=address,
                    private_address=str(host.get("private_address") or address), ssh_port=port,
                    user=str(host.get("user", defaults.get("user", "ubuntu"))), key_path=key, gpu_count=gpus,
                    gpu_model=str(host.get("gpu_model", "")), instance_type="",
                    workdir=str(host.get("workdir", defaults.get("workdir", DEFAULT_WORKDIR))))


def check_address(where: str, address: str) -> None:
    try:
        ipaddress.ip_address(address)
        return
    except ValueError:
        pass
    if not re.match(r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$", address):
        raise InventoryError(f"{where}: address {address!r} is neither an IP address nor a host name")
