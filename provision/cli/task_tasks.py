"""`gpuforge launch TASK.yaml`: a task file from start to end in one command.

    gpuforge launch task.yaml                      # on the selected cluster (or a new local one)
    gpuforge launch task.yaml --cluster lab        # on `lab`; a new cluster of the task's resources if none has that name
    gpuforge launch task.yaml --env EPOCHS=1 --down   # tear the cluster down at the end, whatever happened

In order: the task is validated, its secrets read and its workdir collected here (every refusal comes
before anything starts); the cluster is created if needed and set up (`fab setup`, idempotent); the
task's `setup:` runs on every node where it has not run as it is now; the run starts and is followed
to its end; the exit status is the failed rank's own. With `--down` the run's outputs are fetched
to `--dest` and the cluster is torn down, on success, failure or Ctrl-C.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

from invoke import task
from invoke.exceptions import Exit

from provision import inventory
from provision.cli import argv as cli
from provision.cli.cluster_tasks import CLUSTER_HELP
from provision.cli.run_tasks import ENV_HELP, exit_status


@task(positional=["task_file"], auto_shortflags=False,
      help={"task_file": "the task's YAML file", "cluster": CLUSTER_HELP + "; a new name creates a cluster of the task's resources",
            "run_id": "run id (default: <task>-<time>)", "resume": "start the ended run --run-id again",
            "down": "tear the cluster down at the end (outputs are fetched to --dest first)", "env": ENV_HELP,
            "detach": "start the run and return (follow it with `gpuforge logs --follow`)",
            "dest": "where --down fetches the run to (default ./runs)",
            "max_ship_mb": "refuse to ship a workdir bigger than this (default 100)"},
      iterable=["env"])
def launch(c, task_file, cluster=None, run_id="", resume=False, down=False, env=None, detach=False, dest="runs",
           max_ship_mb=0.0):
    """Run a task file: create the cluster if needed, set it up, run the task's setup, start the run, follow it."""
    from workloads.env_overrides import parse_env_overrides
    from workloads.task import load_task
    from workloads.task_launch import prepare_task

    home = inventory.home_dir()
    out = cli.console()
    with cli.user_errors():
        if detach and down:
            raise Exit("error: --detach and --down contradict each other (the cluster would go while the run goes on)",
                       code=2)
        if resume and not run_id:
            raise Exit("error: --resume needs the --run-id of the run to continue", code=2)
        cli.at_least("--max-ship-mb", max_ship_mb, 0)
        spec_task, workdir = load_task(task_file, parse_env_overrides(env or []))
        prepared = prepare_task(spec_task, workdir, float(max_ship_mb))
        out.print(prepared.bundle.describe())
        chosen = None
        previous = signal.signal(signal.SIGTERM, interrupt) if down else None
        try:
            chosen = pick_cluster(home, cluster, spec_task, out)
            code = run_on_cluster(home, chosen, prepared, run_id, resume, detach, down, Path(dest), out)
        finally:
            if down and chosen is not None:
                signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the teardown short
                from provision.clusters import destroy

                out.print(f"tearing down cluster [bold]{chosen.name}[/] (--down)")
                destroy(home, chosen.name, yes=True)
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        if code:
            raise Exit(code=code)


def interrupt(signum, frame):  # noqa: ARG001 - SIGTERM tears down like Ctrl-C
    raise KeyboardInterrupt


def run_on_cluster(home, chosen, prepared, run_id, resume, detach, down, dest: Path, out) -> int:
    from workloads.launch import start_run
    from workloads.task_launch import run_task_setup, task_run_spec

    task = prepared.task
    if task.nodes > len(chosen.nodes):
        from workloads.errors import ConfigError

        raise ConfigError(f"task {task.name} wants {task.nodes} node(s); cluster {chosen.name} has {len(chosen.nodes)}")
    set_up_cluster(home, chosen, out)
    nodes = list(chosen.nodes[: task.nodes])
    spec = task_run_spec(prepared, chosen, run_id, resume)
    from workloads.launch import check_run_id

    check_run_id(home, chosen, spec)  # before the task's setup: a taken run id is a refusal, not a wasted setup
    if task.setup.strip():
        out.print(f"task setup on {len(nodes)} node(s)")
    from provision.setup import log_dir

    for line in run_task_setup(chosen, nodes, prepared, out=lambda text: print(text, flush=True), log_dir=log_dir(chosen, home)):
        out.print(line, markup=False)
    started = False
    try:
        start_run(chosen, spec, home, prepared.secrets, prepared.bundle)
        started = True
        out.print(f"started run [bold]{spec.run_id}[/] of task {task.name} on {len(nodes)} node(s) of cluster {chosen.name}")
        if detach:
            out.print(f"`gpuforge logs --follow {spec.run_id}`, `gpuforge status {spec.run_id}`, `gpuforge fetch {spec.run_id}`")
            return 0
        from provision.cli.report import print_run_end
        from provision.recovery import follow_with_recovery

        try:  # `recovery: N`: a lost node is brought back and the run resumed, at most N times (provision/recovery.py)
            status = follow_with_recovery(chosen, home, spec.run_id, task.recovery, out=lambda text: print(text, flush=True),
                                          secrets=prepared.secrets)
        except KeyboardInterrupt:
            if not down:
                out.print(f"[yellow]stopped following; run {spec.run_id} goes on[/] (`gpuforge logs --follow {spec.run_id}`, "
                          f"`gpuforge cancel {spec.run_id}`)")
            raise
        print_run_end(chosen, status)
        return exit_status(status)
    finally:
        if down and started:
            fetch_before_down(home, chosen, spec.run_id, dest, out)


def fetch_before_down(home, chosen, run_id: str, dest: Path, out) -> None:
    from workloads.launch import fetch_run
    from workloads.runs import LaunchError

    try:
        files = fetch_run(chosen, home, run_id, dest)
        out.print(f"fetched {len(files)} file(s) of run {run_id} to {dest / run_id}")
    except (LaunchError, OSError) as exc:
        out.print(f"[yellow]could not fetch run {run_id} before teardown:[/] {exc}")


def set_up_cluster(home, chosen, out) -> None:
    from provision.cli.report import SetupProgress
    from provision.autostop import start_for_work
    from provision.setup import raise_for_failures, setup_cluster

    start_for_work(chosen, out)
    started = time.monotonic()
    with SetupProgress(chosen) as progress:
        reports = setup_cluster(chosen, home, on_event=progress.event)
    raise_for_failures(reports)
    changed = sum(len(r.changed) for r in reports)
    out.print(f"cluster [bold]{chosen.name}[/]: {len(reports)} node(s) set up in {time.monotonic() - started:.1f} s"
              + (f"; {changed} step(s) changed" if changed else "; nothing changed"))


def pick_cluster(home, ref, task, out):
    """The cluster to run on: --cluster, else the task's own (with `resources:`), else the selected one;
    created (and selected) when it does not exist yet."""
    from provision.errors import InventoryError

    if ref is None and "resources" not in task.model_fields_set:
        try:
            return inventory.resolve(home, None)
        except InventoryError:
            ref = task.name  # nothing selected: a local cluster of the task's name
    name = ref or task.name
    try:
        return inventory.resolve(home, name)
    except InventoryError:
        if not inventory.NAME.match(name):
            raise
    cluster = create_for_task(home, name, task, out)
    inventory.select(home, cluster.name)
    return cluster


def create_for_task(home, name: str, task, out):
    from provision.clusters import create_cloud_cluster, create_local

    res = task.resources
    if res.cloud == "local":
        out.print(f"creating local cluster [bold]{name}[/] ({task.nodes} node(s))")
        return create_local(home, name, task.nodes)
    instance_type = res.instance_type or (instance_for_gpu(res.cloud, res.gpu) if res.gpu else "")
    if not instance_type and not res.accelerator:
        from workloads.errors import ConfigError

        raise ConfigError(f"task {task.name}: resources need `instance_type:` or `gpu:` to create a {res.cloud} cluster")
    return create_cloud_cluster(home, cloud=res.cloud, name=name, nodes=task.nodes, instance_type=instance_type,
                                accelerator=res.accelerator, region=res.region, zone=res.zone, spot=res.spot,
                                disk_gb=res.disk_gb, os_name=res.os, ssh_cidrs=list(res.ssh_cidrs), project="", yes=False)


def instance_for_gpu(cloud: str, gpu: str) -> str:
    """The catalog's cheapest instance type with `gpu` (MODEL or MODEL:COUNT) per node."""
    from infra.catalog import instance_types
    from workloads.errors import ConfigError

    model, _, count = gpu.partition(":")
    rows = [r for r in instance_types(cloud) if r.gpu_model.lower() == model.lower() and r.gpu_count == int(count or 1)]
    if not rows:
        models = sorted({f"{r.gpu_model}:{r.gpu_count}" for r in instance_types(cloud) if r.gpu_model})
        raise ConfigError(f"resources.gpu {gpu!r}: no {cloud} instance type in the catalog has it; there are: {', '.join(models)}")
    return min(rows, key=lambda r: r.price_per_hour).name
