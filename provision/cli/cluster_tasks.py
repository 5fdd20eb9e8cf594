"""The cluster tasks (up, down, sweep, use, clusters, setup, bake, doctor); the run tasks are in run_tasks.py.

A user's day is `fab up`, `fab setup`, `fab train ...`, `fab logs`, `fab down`.

    fab up [--nodes 2]                         # a local cluster of sshd nodes (no cloud account)
    fab up --cloud aws --instance-type p4d.24xlarge --nodes 2 --ssh-cidr 203.0.113.4/32
    fab up --hosts hosts.yaml                  # machines you already have
    fab setup [--dry-run]                      # driver, CUDA, NCCL, EFA, Python, our code; idempotent
    fab setup --dry-run --instance-type p4d.24xlarge --os ubuntu-22.04   # the plan, no cluster needed
    fab train --job convnet-digits --nodes 2 --follow [key=value ...]
    fab train --script path/to/train.py -- --batch_size 8
    fab status | fab logs [--node 1] | fab cancel | fab fetch [RUN]
    fab exec -- nvidia-smi
    fab down [--delete-data]                   # the data (bucket / storage folder) is kept unless --delete-data
    fab sweep --cloud aws [--region R] [--cluster NAME] [--purge]   # what carries our tags

Every task takes --cluster NAME|HOSTS.yaml|pulumi:STACK; without it, the selected cluster is used.
State lives in $GPUFORGE_HOME (default ~/.gpuforge). Set GPUFORGE_DEBUG=1 for tracebacks.
"""

from __future__ import annotations

import time
from pathlib import Path

from invoke import task
from invoke.exceptions import Exit

from provision import inventory
from provision.cli import argv as cli
from provision.cli import report

CLUSTER_HELP = "cluster name, hosts .yaml, stack output .json or pulumi:STACK (default: the selected one)"


@task(help={"nodes": "number of nodes (default 2 locally, 1 on a cloud)", "name": "cluster name",
            "cloud": "aws or gcp (default: a local cluster)", "instance_type": "instance / machine type",
            "accelerator": "GCP n1 only, e.g. nvidia-tesla-t4:1", "region": "region",
            "zone": "zone (default: the first one that offers the type; on a capacity error the next)",
            "spot": "spot / preemptible instances", "disk_gb": "root disk size", "os": "ubuntu-22.04 or ubuntu-24.04",
            "ssh_cidr": "who may SSH in, IPv4 (repeatable); without it nodes get no public SSH ingress",
            "project": "GCP project", "hosts": "register machines you already have (a hosts .yaml)",
            "image": "boot this image (AMI id / GCE image path); a later up that changes it is a roll, previewed",
            "roll_image": "move the nodes to the newest usable image (previewed, confirmed; replaces the nodes)",
            "yes": "skip the confirmations",
            "login_user": "local only: VM-like nodes that log in as this sudo user and get the cloud plan (needs root)",
            "autostop": "stop the nodes after this long idle: minutes (90), 90s, 2h, or off (default on a cloud: 60; "
                        "local: off; a later up keeps the cluster's)",
            "autodown": "terminate the nodes instead of stopping them; the stack goes with the last one"},
      iterable=["ssh_cidr"])
def up(c, nodes="", name="", cloud="", instance_type="", accelerator="", region="", zone="", spot=False, disk_gb=0,
       os="", ssh_cidr=None, project="", hosts="", image="", roll_image=False, yes=False, login_user="", autostop="",
       autodown=False):
    """Create a cluster (local, aws, gcp) or register existing machines, and select it; up of a stopped cluster starts
    it again. A later up of a cloud cluster keeps its config, zone and image, and changes what is given."""
    from infra.autostop import parse_autostop
    from provision.clusters import create_cloud_cluster, create_local, register_hosts

    home = inventory.home_dir()
    with cli.user_errors():
        count = cli.parse_nodes(nodes)
        idle = parse_autostop(autostop) if autostop else None  # a bad value: one line, before anything starts
        finish_autodown_of(home, name or (f"{cloud}-gpu" if cloud and cloud != "local" else "local"))
        if hosts:
            cluster = register_hosts(home, Path(hosts))
        elif not cloud or cloud == "local":
            cluster = create_local(home, name or "local", count or 2, login_user=login_user, autostop=idle,
                                   autodown=autodown)
        else:
            first_up = not (inventory.cluster_dir(home, name or f"{cloud}-gpu") / "registration.json").exists()
            if not instance_type and first_up:
                raise Exit(f"error: {cli.type_choices(cloud)}", code=2)
            given = {"nodes": count, "instance_type": instance_type, "accelerator": accelerator, "region": region,
                     "zone": zone, "spot": spot, "disk_gb": int(disk_gb or 0), "os": os,
                     "ssh_cidrs": list(ssh_cidr or []), "project": project, "image": image,
                     "autostop": autostop.strip(), "autodown": autodown}
            cluster = create_cloud_cluster(home, cloud=cloud, name=name, given=given, yes=yes, roll_image=roll_image)
        inventory.select(home, cluster.name)
        report.print_cluster(cluster)


def finish_autodown_of(home: Path, name: str) -> None:
    """`up` of an autodown cluster whose nodes have all gone: the rest goes first, then the cluster is made anew."""
    from provision.autostop import finish_autodown

    if name in inventory.known_clusters(home):
        finish_autodown(home, inventory.resolve(home, name))


@task(help={"cluster": CLUSTER_HELP, "name": "the cluster's name, as `up --name` takes it (the same as --cluster NAME)",
            "delete_data": "also delete the cluster's data (bucket with every object version, or the local storage "
                           "folder), after a confirmation naming it and its size",
            "yes": "skip the confirmation"})
def down(c, cluster=None, name="", delete_data=False, yes=False):
    """Tear the cluster down from any state, ending its notebooks, servers and tunnels; its data (bucket /
    storage folder) is kept and reported unless --delete-data."""
    from provision.clusters import destroy

    home = inventory.home_dir()
    with cli.user_errors():
        if name and cluster and name != cluster:
            raise Exit(f"error: --name {name} and --cluster {cluster} name two clusters; give one", code=2)
        destroy(home, cluster or name or None, delete_data=delete_data, yes=yes)


@task(help={"cloud": "aws or gcp", "region": "region (default us-east-1 / us-central1)",
            "project": "GCP project (required with --cloud gcp)",
            "cluster": "only this cluster's resources (default: every gpuforge cluster's)",
            "purge": "delete what is found, after a confirmation", "delete_data": "with --purge: buckets holding data too",
            "yes": "skip the confirmations"})
def sweep(c, cloud, region="", project="", cluster=None, purge=False, delete_data=False, yes=False):
    """List what carries gpuforge's tags in a region (with --purge, delete it): leftovers of crashed ups and bakes.
    AWS_ENDPOINT_URL / GPUFORGE_GCP_ENDPOINT point it at an emulator."""
    from provision.leftovers import sweep as sweep_region

    home = inventory.home_dir()
    with cli.user_errors():
        sweep_region(home, cloud, region=region, project=project, cluster=cluster, purge_them=purge,
                     delete_data=delete_data, yes=yes)


@task(help={"cluster": "cluster to select"})
def use(c, cluster):
    """Select the cluster later commands use."""
    home = inventory.home_dir()
    with cli.user_errors():
        source = inventory.cluster_from_source(cluster, home)  # a hosts file or stack: remembered from now on
        chosen = inventory.register(home, inventory.attach(home, source)) if source else inventory.resolve(home, cluster)
        inventory.select(home, chosen.name)
        cli.console().print(f"selected cluster [bold]{chosen.name}[/] ({chosen.cloud}, {len(chosen.nodes)} nodes)")


@task
def clusters(c):
    """List the known clusters (running or stopped, their autostop); the selected one is marked. An autodown cluster
    whose nodes have all gone is removed (its data kept)."""
    from provision.autostop import finish_autodown

    home = inventory.home_dir()
    with cli.user_errors():
        for name in inventory.known_clusters(home):
            finish_autodown(home, inventory.resolve(home, name))
        report.print_clusters(home)


@task(help={"cluster": CLUSTER_HELP, "dry_run": "print the plan per node, change nothing",
            "instance_type": "with --dry-run and no cluster: the plan for a fresh VM of this type",
            "os": "with --instance-type: ubuntu-22.04 or ubuntu-24.04", "cloud": "with --instance-type: aws or gcp",
            "accelerator": "with --instance-type on GCP n1: e.g. nvidia-tesla-t4:1",
            "allreduce": "run the cross-node all-reduce check on CPU clusters too (always on GPU clusters)",
            "pip_index": "package index for the nodes: a URL (mirror/proxy) or `node` (the node's own pip config); "
                         "default $GPUFORGE_PIP_INDEX, then the hosts file's pip_index",
            "tensorflow": "also install TensorFlow (the build for the nodes' CUDA); remembered for later setups"})
def setup(c, cluster=None, dry_run=False, instance_type="", os="ubuntu-22.04", cloud="", accelerator="", allreduce=False,
          pip_index="", tensorflow=False):
    """Configure every node: driver, CUDA, NCCL, EFA, Python env, our code, verify (idempotent)."""
    from provision.setup import check_cluster_allreduce, setup_cluster

    home = inventory.home_dir()
    with cli.user_errors():
        if instance_type:
            report.print_type_plan(cloud, instance_type, os, accelerator, ["tensorflow"] if tensorflow else [])
            return
        chosen = inventory.resolve(home, cluster)
        from provision.pip_index import resolve_pip_index
        from provision.steps.tensorflow import remember_frameworks

        resolve_pip_index(pip_index, str(chosen.extra.get("pip_index") or ""))  # a bad value stops here, before SSH
        frameworks = remember_frameworks(inventory.cluster_dir(home, chosen.name), ["tensorflow"] if tensorflow else [],
                                         save=not dry_run)
        if not dry_run:
            from provision.autostop import start_for_work

            start_for_work(chosen, cli.console())
        started = time.monotonic()
        with report.SetupProgress(chosen) as progress:
            reports = setup_cluster(chosen, home, dry_run=dry_run, on_event=progress.event, pip_index=pip_index,
                                    extra_options={"frameworks": frameworks})
        report.print_setup(chosen, reports, dry_run, time.monotonic() - started)
        if any(not r.ok for r in reports):
            raise Exit(code=1)
        if not dry_run:
            result = check_cluster_allreduce(chosen, home, reports, force=allreduce, pip_index=pip_index)
            if result is not None:
                print(result.table)
                cli.console().print(f"cluster [bold]{chosen.name}[/] is ready: {result.verdict}")


@task(help={"cloud": "aws or gcp", "os": "ubuntu-22.04 or ubuntu-24.04", "instance_type": "builder type (a GPU type)",
            "accelerator": "GCP n1 builders: e.g. nvidia-tesla-t4:1", "region": "region", "zone": "zone",
            "project": "GCP project", "ssh_cidr": "who may SSH to the builder (repeatable; required)",
            "keep": "newest images per family to keep", "base_image": "override the plain Ubuntu base image",
            "subnet_id": "AWS: the subnet to launch in (default: a temporary VPC)",
            "security_group_id": "AWS: the security group to use (needs --subnet-id)",
            "network": "GCP: the VPC network (default: `default`)",
            "subnetwork": "GCP: the subnetwork in the region (custom-mode networks)"},
      iterable=["ssh_cidr"])
def bake(c, cloud, os="ubuntu-22.04", instance_type="", accelerator="", region="", zone="", project="", ssh_cidr=None,
         keep=3, base_image="", subnet_id="", security_group_id="", network="", subnetwork=""):
    """Bake a machine image with `gpuforge setup` already done (the builder is always removed)."""
    from images import BakeSpec
    from images import bake as bake_image

    home = inventory.home_dir()
    with cli.user_errors():
        spec = BakeSpec(cloud=cloud, os_name=os, instance_type=instance_type, accelerator=accelerator, region=region,
                        zone=zone, project=project, ssh_cidrs=tuple(ssh_cidr or ()), keep=int(keep),
                        base_image=base_image, subnet_id=subnet_id, security_group_id=security_group_id,
                        network=network, subnetwork=subnetwork)
        result = bake_image(spec, home, on_event=lambda text: cli.console().print(text, markup=False))
        report.print_bake(result)


@task(help={"cluster": CLUSTER_HELP})
def doctor(c, cluster=None):
    """Check this machine and the selected cluster: tools, credentials, nodes, their set-up."""
    from provision.cli.doctor import run_checks

    home = inventory.home_dir()
    with cli.user_errors():
        if not report.print_checks(*run_checks(home, cluster)):
            raise Exit(code=1)
