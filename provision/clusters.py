"""Creating and destroying clusters for `fab up` / `fab down`, whatever their source and state.

Cloud clusters are in provision/cloud_clusters.py. The data policy (provision/data.py) is the same for all: `down`
keeps the data and says where and how much, `down --delete-data` deletes it after a confirmation. For a local
cluster the data is its storage folder (`<home>/clusters/<name>/storage`, every run's checkpoints and models).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from infra.cluster import ClusterInfo
from provision import data, inventory, registry
from provision.errors import InventoryError, ProvisionError

logger = logging.getLogger(__name__)


def create_local(home: Path, name: str, nodes: int, login_user: str = "", autostop: int | None = None,
                 autodown: bool = False) -> ClusterInfo:
    """A new local cluster; `up` of one that exists starts its stopped nodes (autostop) and keeps the rest. Local
    clusters bill nothing: autostop is off unless asked (`--autostop 30s` tests the whole path in seconds)."""
    from infra.local import create_local_cluster

    if not inventory.NAME.match(name):
        raise InventoryError(f"cluster name {name!r} must be lowercase letters, digits and '-' (max 39)")
    if nodes < 1:
        raise InventoryError(f"--nodes must be >= 1; got {nodes}")
    if registry.load(home, name) is not None:
        raise InventoryError(f"a cloud cluster named {name} is registered; `gpuforge down --cluster {name}` first")
    from infra.ssh_config import write_ssh_config

    if (inventory.cluster_dir(home, name) / "cluster.json").exists():
        from provision.autostop import start_local

        return start_local(home, inventory.resolve(home, name), autostop, autodown)
    cluster = create_local_cluster(name, nodes, home, login_user=login_user)
    if autostop:
        from provision.autostop import with_autostop

        cluster = with_autostop(cluster, autostop, autodown)
        cluster.save(Path(cluster.state_dir) / "cluster.json")
    registry.drop_data(home, name, {Path(cluster.storage_url.removeprefix("file://")).resolve().as_uri()})
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


def destroy(home: Path, ref: str | None, delete_data: bool = False, yes: bool = False) -> None:
    """`fab down`: from any state (ready, creating, failed, or only its data left)."""
    from provision.cloud_clusters import console, down_cloud, finish_data, tidy

    out = console()
    name = ref or inventory.current_name(home)
    registration = registry.load(home, name) if name and inventory.NAME.match(name) else None
    cluster = None
    try:
        cluster = inventory.resolve(home, ref)
    except InventoryError:
        if registration is None and not (name and registry.kept_data(home, name)):
            raise
    if cluster is not None and cluster.cloud == "local":
        destroy_local(home, cluster, delete_data, yes)
    elif cluster is not None and cluster.cloud == "hosts":
        end_dev_sessions(home, cluster, out, servers=True)  # the machines are the user's: nothing of ours keeps running
        stop_host_runs(home, cluster, out)
        shutil.rmtree(inventory.cluster_dir(home, cluster.name), ignore_errors=True)
        out.print(f"forgot hosts cluster {cluster.name} (its machines are yours and keep running)")
    elif cluster is not None or registration is not None:
        name = cluster.name if cluster else registration.name
        cloud = cluster.cloud if cluster else registration.cloud
        region = (registration.region if registration else "") or (cluster.region if cluster else "")
        project = (registration.project if registration else "") or (cluster.extra.get("project", "") if cluster else "")
        cluster_id = (registration.cluster_id if registration else "") or (
            cluster.extra.get("cluster_id", "") if cluster else "")
        if cluster is not None:
            end_dev_sessions(home, cluster, out, servers=False)  # the servers go with the machines
        down_cloud(home, name, cloud, region, project, cluster_id, delete_data=delete_data, yes=yes)
    else:  # only its kept data is left
        kept = registry.kept_data(home, name)
        if not delete_data:
            out.print(f"cluster {name} is down; its data is kept: {data.summary(kept)}; "
                      f"`gpuforge down --delete-data --cluster {name}` deletes it")
            return
        finish_data(home, name, [], True, yes, out)
        tidy(home, name)
    if cluster is not None:  # its hosts go with it (a failed teardown above keeps them)
        from infra.ssh_config import remove_ssh_config

        remove_ssh_config(home, cluster)
    if inventory.current_name(home) == name:
        inventory.select(home, None)


def destroy_local(home: Path, cluster: ClusterInfo, delete_data: bool, yes: bool) -> None:
    """Stop the local cluster and remove its state; the storage folder is the data: kept unless told."""
    from infra.local import destroy_local_cluster
    from provision.cloud_clusters import console, finish_data, tidy

    out = console()
    storage = Path(cluster.storage_url.removeprefix("file://")) if cluster.storage_url.startswith("file://") else None
    held = data.measure_folder(storage) if storage and storage.exists() else None
    if delete_data and held and held.objects:
        data.confirm_deletion(out, [held], yes)  # before anything stops: a "no" changes nothing
    out.print(destroy_local_cluster(Path(cluster.state_dir), keep_storage=True))
    kept = [held] if held and held.objects else []
    if held and not held.objects and storage is not None:
        shutil.rmtree(storage, ignore_errors=True)
    finish_data(home, cluster.name, kept, delete_data, True, out)
    tidy(home, cluster.name)


def end_dev_sessions(home: Path, cluster: ClusterInfo, out, servers: bool) -> None:
    from provision.services import end_sessions

    ended = end_sessions(home, cluster, servers)
    if ended:
        out.print(f"ended {', '.join(ended)}")


def stop_host_runs(home: Path, cluster: ClusterInfo, console) -> None:
    from workloads.launch import cancel_run
    from workloads.runs import runs_dir

    for record in sorted(runs_dir(home, cluster).glob("*.json")):
        for line in cancel_run(cluster, home, record.stem):
            logger.info(line)


def create_cloud_cluster(home: Path, *, cloud: str, name: str, yes: bool, given: dict | None = None,
                         roll_image: bool = False, **fields) -> ClusterInfo:
    """`up` of a cloud cluster (provision/cloud_clusters.py). `given` holds what the user gave (a later up keeps the
    rest); the keyword form (nodes=, instance_type=, os_name=, ssh_cidrs=, ...) is the same thing."""
    from provision.cloud_clusters import up_cloud

    if cloud not in ("aws", "gcp"):
        raise ProvisionError(f"--cloud must be aws, gcp or local, got {cloud!r}")
    if given is None:
        given = {("os" if k == "os_name" else k): v for k, v in fields.items()}
    return up_cloud(home, cloud, name, given, yes=yes, roll_image=roll_image)
