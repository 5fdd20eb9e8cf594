"""Creating and destroying clusters for `fab up` / `fab down`, whatever their source."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from infra.cluster import ClusterInfo
from provision import inventory
from provision.errors import InventoryError, ProvisionError

logger = logging.getLogger(__name__)


def create_local(home: Path, name: str, nodes: int) -> ClusterInfo:
    from infra.local import create_local_cluster

    if not inventory.NAME.match(name):
        raise InventoryError(f"cluster name {name!r} must be lowercase letters, digits and '-' (max 39)")
    if nodes < 1:
        raise InventoryError(f"--nodes must be >= 1; got {nodes}")
    from infra.ssh_config import write_ssh_config

    cluster = create_local_cluster(name, nodes, home)
    write_ssh_config(home, cluster)  # `ssh <name>-node-0`, VS Code Remote-SSH (`gpuforge ssh-config`)
    return cluster


def register_hosts(home: Path, path: Path) -> ClusterInfo:
    if not path.is_file():
        raise InventoryError(f"hosts file {path} does not exist")
    return inventory.register(home, inventory.load_hosts_file(path))


def ensure_cluster_key(home: Path, name: str) -> tuple[str, str]:
    """The cluster's SSH key pair under its folder (private 0600): (public key line, private key path)."""
    from infra.local import generate_key

    keys = inventory.cluster_dir(home, name) / "keys"
    keys.mkdir(parents=True, exist_ok=True)
    private = keys / "id_ed25519"
    if not private.exists():
        generate_key(private, f"gpuforge-{name}")
    return private.with_suffix(".pub").read_text().strip(), str(private)


def create_cloud_cluster(home: Path, *, cloud: str, name: str, nodes: int, instance_type: str, accelerator: str,
                         region: str, zone: str, spot: bool, disk_gb: int, os_name: str, ssh_cidrs: list[str],
                         project: str, yes: bool) -> ClusterInfo:
    """Validate the spec (no cloud call yet), show the cost, confirm, then `pulumi up` via Automation API."""
    from infra.spec import ClusterSpec
    from infra.stacks import require_pulumi_cli, up_stack

    values = {"cloud": cloud, "name": name or f"{cloud}-gpu", "nodes": nodes, "spot": spot, "ssh_cidrs": ssh_cidrs}
    optional = {"instance_type": instance_type, "accelerator": accelerator, "region": region, "zone": zone,
                "disk_gb": disk_gb, "os": os_name, "project": project}
    values.update({k: v for k, v in optional.items() if v})
    spec = ClusterSpec(**values)  # SpecError names the bad value and the choices
    require_pulumi_cli()
    public, private = ensure_cluster_key(home, spec.name)
    spec = spec.model_copy(update={"ssh_public_key": public, "ssh_key_path": private})
    spec.check_deployable()
    from rich.console import Console

    console = Console(highlight=False)
    console.print(f"{spec.nodes} x {spec.instance_type} ({spec.gpu_count} x {spec.gpu_model or 'GPU'}) in "
                  f"{spec.zone}{' (spot)' if spec.spot else ''}: about [bold]${spec.cost_per_hour:,.2f}/h[/] "
                  f"(catalog reference price)")
    if not spec.ssh_cidrs:
        console.print("[yellow]no --ssh-cidr given: the nodes get no public SSH ingress[/]")
    if not yes and not console.input("create it? [y/N] ").strip().lower().startswith("y"):
        raise ProvisionError("cancelled; nothing was created")
    state = inventory.cluster_dir(home, spec.name)
    cluster = up_stack(spec, state, on_output=lambda line: console.print(line, end=""))
    return inventory.register(home, cluster)


def destroy(home: Path, ref: str | None, purge: bool = False, yes: bool = False) -> None:
    from rich.console import Console

    console = Console(highlight=False)
    cluster = inventory.resolve(home, ref)
    from infra.ssh_config import remove_ssh_config

    remove_ssh_config(home, cluster)  # its hosts go away with it, whatever the teardown finds below
    if cluster.cloud == "local":
        from infra.local import destroy_local_cluster

        console.print(destroy_local_cluster(Path(cluster.state_dir)))
    elif cluster.cloud in ("aws", "gcp"):
        destroy_cloud(home, cluster, purge, console)
    else:
        stop_host_runs(home, cluster, console)
        shutil.rmtree(inventory.cluster_dir(home, cluster.name), ignore_errors=True)
        console.print(f"forgot hosts cluster {cluster.name} (its machines are yours and keep running)")
    if inventory.current_name(home) == cluster.name:
        inventory.select(home, None)


def stop_host_runs(home: Path, cluster: ClusterInfo, console) -> None:
    from workloads.launch import cancel_run
    from workloads.runs import runs_dir

    for record in sorted(runs_dir(home, cluster).glob("*.json")):
        for line in cancel_run(cluster, home, record.stem):
            logger.info(line)


def destroy_cloud(home: Path, cluster: ClusterInfo, purge: bool, console) -> None:
    from infra.stacks import destroy_stack
    from infra.sweep import find_aws_leftovers, find_gcp_leftovers, purge_leftovers, render_leftovers

    state = inventory.cluster_dir(home, cluster.name)
    destroy_stack(cluster.name, cluster.cloud, state, on_output=lambda line: console.print(line, end=""))
    if cluster.cloud == "aws":
        leftovers = find_aws_leftovers(cluster.name, cluster.region)
    else:
        leftovers = find_gcp_leftovers(cluster.name, cluster.extra.get("project", ""), cluster.region)
    if not leftovers:
        console.print(f"no resources tagged gpuforge:cluster={cluster.name} are left")
        shutil.rmtree(state, ignore_errors=True)
        return
    console.print(render_leftovers(leftovers))
    if not purge:
        raise ProvisionError(f"{len(leftovers)} resource(s) of cluster {cluster.name} are left (listed above); "
                             "`fab down --purge` deletes them")
    failures = [(lo, err) for lo, err in purge_leftovers(leftovers, project=cluster.extra.get("project", "")) if err]
    if failures:
        raise ProvisionError("could not delete: " + "; ".join(f"{lo.kind} {lo.id}: {err}" for lo, err in failures))
    console.print(f"deleted {len(leftovers)} leftover resource(s)")
    shutil.rmtree(state, ignore_errors=True)
