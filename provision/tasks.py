"""The `fab` tasks: a user's day is `fab up`, `fab setup`, `fab train ...`, `fab logs`, `fab down`.

    fab up [--nodes 2]                         # a local cluster of sshd nodes (no cloud account)
    fab up --cloud aws --instance-type p4d.24xlarge --nodes 2 --ssh-cidr 203.0.113.4/32
    fab up --hosts hosts.yaml                  # machines you already have
    fab setup [--dry-run]                      # driver, CUDA, NCCL, EFA, Python, our code; idempotent
    fab setup --dry-run --instance-type p4d.24xlarge --os ubuntu-22.04   # the plan, no cluster needed
    fab train --job convnet-digits --nodes 2 --follow [key=value ...]
    fab train --script path/to/train.py -- --batch_size 8
    fab status | fab logs [--node 1] | fab cancel | fab fetch [RUN]
    fab exec -- nvidia-smi
    fab down [--purge]

Every task takes --cluster NAME|HOSTS.yaml|pulumi:STACK; without it, the selected cluster is used.
State lives in $GPUFORGE_HOME (default ~/.gpuforge). Set GPUFORGE_DEBUG=1 for tracebacks.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from invoke import task
from invoke.exceptions import Exit

from provision import cli, inventory, report

CLUSTER_HELP = "cluster name, hosts .yaml, stack output .json or pulumi:STACK (default: the selected one)"


@task(help={"nodes": "number of nodes (default 2 locally, 1 on a cloud)", "name": "cluster name",
            "cloud": "aws or gcp (default: a local cluster)", "instance_type": "instance / machine type",
            "accelerator": "GCP n1 only, e.g. nvidia-tesla-t4:1", "region": "region", "zone": "zone",
            "spot": "spot / preemptible instances", "disk_gb": "root disk size", "os": "ubuntu-22.04 or ubuntu-24.04",
            "ssh_cidr": "who may SSH in (repeatable); without it nodes get no public SSH ingress",
            "project": "GCP project", "hosts": "register machines you already have (a hosts .yaml)",
            "yes": "skip the cost confirmation"},
      iterable=["ssh_cidr"])
def up(c, nodes="", name="", cloud="", instance_type="", accelerator="", region="", zone="", spot=False, disk_gb=0,
       os="", ssh_cidr=None, project="", hosts="", yes=False):
    """Create a cluster (local, aws, gcp) or register existing machines, and select it."""
    from provision.clusters import create_cloud_cluster, create_local, register_hosts

    home = inventory.home_dir()
    with cli.user_errors():
        count = parse_nodes(nodes)
        if hosts:
            cluster = register_hosts(home, Path(hosts))
        elif not cloud or cloud == "local":
            cluster = create_local(home, name or "local", count or 2)
        else:
            cluster = create_cloud_cluster(home, cloud=cloud, name=name, nodes=count or 1, instance_type=instance_type,
                                           accelerator=accelerator, region=region, zone=zone, spot=spot, disk_gb=disk_gb,
                                           os_name=os, ssh_cidrs=ssh_cidr or [], project=project, yes=yes)
        inventory.select(home, cluster.name)
        report.print_cluster(cluster)


@task(help={"cluster": CLUSTER_HELP, "purge": "delete resources the leftover sweep finds (cloud clusters)",
            "yes": "skip the confirmation"})
def down(c, cluster=None, purge=False, yes=False):
    """Tear the cluster down: stop its jobs and nodes, destroy cloud resources, sweep for leftovers."""
    from provision.clusters import destroy

    home = inventory.home_dir()
    with cli.user_errors():
        destroy(home, cluster, purge=purge, yes=yes)


@task(help={"cluster": "cluster to select"})
def use(c, cluster):
    """Select the cluster later commands use."""
    home = inventory.home_dir()
    with cli.user_errors():
        chosen = inventory.resolve(home, cluster)
        inventory.select(home, chosen.name)
        cli.console().print(f"selected cluster [bold]{chosen.name}[/] ({chosen.cloud}, {len(chosen.nodes)} nodes)")


@task
def clusters(c):
    """List the known clusters; the selected one is marked."""
    home = inventory.home_dir()
    with cli.user_errors():
        report.print_clusters(home)


@task(help={"cluster": CLUSTER_HELP, "dry_run": "print the plan per node, change nothing",
            "instance_type": "with --dry-run and no cluster: the plan for a fresh VM of this type",
            "os": "with --instance-type: ubuntu-22.04 or ubuntu-24.04", "cloud": "with --instance-type: aws or gcp",
            "accelerator": "with --instance-type on GCP n1: e.g. nvidia-tesla-t4:1",
            "allreduce": "run the cross-node all-reduce check on CPU clusters too (always on GPU clusters)"})
def setup(c, cluster=None, dry_run=False, instance_type="", os="ubuntu-22.04", cloud="", accelerator="", allreduce=False):
    """Configure every node: driver, CUDA, NCCL, EFA, Python env, our code, verify (idempotent)."""
    from provision.setup import check_cluster_allreduce, setup_cluster

    home = inventory.home_dir()
    with cli.user_errors():
        if instance_type:
            report.print_type_plan(cloud, instance_type, os, accelerator)
            return
        chosen = inventory.resolve(home, cluster)
        started = time.monotonic()
        with report.SetupProgress(chosen) as progress:
            reports = setup_cluster(chosen, home, dry_run=dry_run, on_event=progress.event)
        report.print_setup(chosen, reports, dry_run, time.monotonic() - started)
        if any(not r.ok for r in reports):
            raise Exit(code=1)
        if not dry_run:
            result = check_cluster_allreduce(chosen, home, reports, force=allreduce)
            if result is not None:
                print(result.table)
                cli.console().print(f"cluster [bold]{chosen.name}[/] is ready: all-reduce passed across {len(chosen.nodes)} node(s)")


@task(help={"job": "a job from `python -m workloads.train --list`", "script": "your own training script",
            "nodes": "nodes to use (default: all)", "nproc_per_node": "processes per node (default: GPUs, or 1)",
            "run_id": "run id (default: <job>-<time>); reusing one resumes that run", "follow": "stream rank 0's output until the run ends",
            "set": "key=value override (repeatable; bare key=value words work too)", "cluster": CLUSTER_HELP,
            "start_timeout": "seconds until the first training step before the run is failed"},
      iterable=["set"])
def train(c, job="", script="", nodes="", nproc_per_node=0, run_id="", follow=False, set=None, cluster=None,
          start_timeout=900.0):
    """Start a job (or your script) with torchrun on the cluster's nodes."""
    from workloads.launch import RunSpec, start_run

    home = inventory.home_dir()
    with cli.user_errors():
        chosen = inventory.resolve(home, cluster)
        args = [*(set or []), *cli.OVERRIDES] if job else list(cli.REMAINDER)
        spec = RunSpec(job=job, script=script, args=args, nodes=parse_nodes(nodes), nproc_per_node=nproc_per_node,
                       run_id=run_id, storage_url=chosen.storage_url, start_timeout=float(start_timeout))
        used = start_run(chosen, spec, home)
        cli.console().print(f"started run [bold]{spec.run_id}[/] on {len(used)} node(s): "
                            f"{', '.join(n.name for n in used)}; `fab logs`, `fab status`, `fab cancel`")
        if follow:
            code = follow_and_report(chosen, home, spec.run_id)
            if code:
                raise Exit(code=code)


def parse_nodes(raw: str) -> int:
    """--nodes: empty means every node of the cluster; otherwise a whole number >= 1."""
    from workloads.errors import ConfigError

    if raw in ("", None):
        return 0
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"--nodes must be a whole number >= 1; got {raw!r}") from None
    if value < 1:
        raise ConfigError(f"--nodes must be >= 1; got {value}")
    return value


def follow_and_report(cluster, home, run_id) -> int:
    from workloads.launch import follow_run

    status = follow_run(cluster, home, run_id, out=lambda text: print(text, flush=True))
    report.print_run_end(cluster, status)
    return 0 if status.state == "succeeded" else 1


@task(help={"run": "run id (default: the newest)", "cluster": CLUSTER_HELP})
def status(c, run=None, cluster=None):
    """Show a run's state per node: alive, finished or failed, last step and loss."""
    from workloads.launch import run_status
    from workloads.runs import list_runs

    home = inventory.home_dir()
    with cli.user_errors():
        chosen = inventory.resolve(home, cluster)
        status = run_status(chosen, home, run)
        if run is None:
            report.print_runs(list_runs(home, chosen))
        report.print_status(status)


@task(help={"run": "run id (default: the newest)", "node": "one node (rank or name)", "tail": "last N lines only",
            "follow": "stream rank 0's output until the run ends", "cluster": CLUSTER_HELP})
def logs(c, run=None, node=None, tail=0, follow=False, cluster=None):
    """Print a run's output, per node."""
    from workloads.launch import logs as read_logs

    home = inventory.home_dir()
    with cli.user_errors():
        chosen = inventory.resolve(home, cluster)
        if follow:
            code = follow_and_report(chosen, home, run)
            if code:
                raise Exit(code=code)
            return
        texts = read_logs(chosen, home, run, node=node, tail_lines=int(tail))
        for name, text in texts.items():
            if len(texts) > 1:
                cli.console().rule(name)
            sys.stdout.write(text)


@task(help={"run": "run id (default: the newest)", "cluster": CLUSTER_HELP})
def cancel(c, run=None, cluster=None):
    """Stop a run's processes on every node."""
    from workloads.launch import cancel_run

    home = inventory.home_dir()
    with cli.user_errors():
        chosen = inventory.resolve(home, cluster)
        for line in cancel_run(chosen, home, run):
            print(line)


@task(help={"run": "run id (default: the newest)", "dest": "where to copy (default ./runs)",
            "checkpoints": "also copy step-N checkpoints", "cluster": CLUSTER_HELP})
def fetch(c, run=None, dest="runs", checkpoints=False, cluster=None):
    """Copy a run's summary, metrics and model from storage to this machine."""
    from workloads.launch import fetch_run

    home = inventory.home_dir()
    with cli.user_errors():
        chosen = inventory.resolve(home, cluster)
        files = fetch_run(chosen, home, run, Path(dest), checkpoints=checkpoints)
        report.print_fetched(files)


@task(name="exec", help={"cluster": CLUSTER_HELP})
def exec_(c, cluster=None):
    """Run a command on every node: fab exec -- CMD (output prefixed by node)."""
    from workloads.launch import exec_on_nodes

    home = inventory.home_dir()
    with cli.user_errors():
        command = cli.remainder_command()
        if not command:
            raise Exit("error: give the command after --, e.g. fab exec -- nvidia-smi", code=2)
        chosen = inventory.resolve(home, cluster)
        failed = report.print_exec(exec_on_nodes(chosen, command))
        if failed:
            raise Exit(code=1)


@task(help={"cloud": "aws or gcp", "os": "ubuntu-22.04 or ubuntu-24.04", "instance_type": "builder type (a GPU type)",
            "accelerator": "GCP n1 builders: e.g. nvidia-tesla-t4:1", "region": "region", "zone": "zone",
            "project": "GCP project", "ssh_cidr": "who may SSH to the builder (repeatable; required)",
            "keep": "newest images per family to keep", "base_image": "override the plain Ubuntu base image",
            "subnet_id": "AWS: the subnet to launch in (default: a temporary VPC)",
            "security_group_id": "AWS: the security group to use (needs --subnet-id)"},
      iterable=["ssh_cidr"])
def bake(c, cloud, os="ubuntu-22.04", instance_type="", accelerator="", region="", zone="", project="", ssh_cidr=None,
         keep=3, base_image="", subnet_id="", security_group_id=""):
    """Bake a machine image with `fab setup` already done (the builder is always removed)."""
    from images import BakeSpec
    from images import bake as bake_image

    home = inventory.home_dir()
    with cli.user_errors():
        spec = BakeSpec(cloud=cloud, os_name=os, instance_type=instance_type, accelerator=accelerator, region=region,
                        zone=zone, project=project, ssh_cidrs=tuple(ssh_cidr or ()), keep=int(keep),
                        base_image=base_image, subnet_id=subnet_id, security_group_id=security_group_id)
        result = bake_image(spec, home, on_event=lambda text: cli.console().print(text, markup=False))
        report.print_bake(result)


@task(help={"cluster": CLUSTER_HELP})
def doctor(c, cluster=None):
    """Check this machine and the selected cluster: tools, credentials, nodes, their set-up."""
    from provision.doctor import run_checks

    home = inventory.home_dir()
    with cli.user_errors():
        if not report.print_checks(run_checks(home, cluster)):
            raise Exit(code=1)
