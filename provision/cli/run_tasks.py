"""The run tasks: train, status, logs, cancel, fetch, exec (cluster tasks: cluster_tasks.py; launch: task_tasks.py)."""

from __future__ import annotations

import sys
from pathlib import Path

from invoke import task
from invoke.exceptions import Exit

from provision import inventory
from provision.cli import argv as cli
from provision.cli import report
from provision.cli.cluster_tasks import CLUSTER_HELP

ENV_HELP = "NAME=VALUE for the run's environment (repeatable); NAME alone takes $NAME from here"


@task(help={"job": "a job from `gpuforge train --list`", "script": "your own training script (its folder is shipped)",
            "nodes": "nodes to use (default: all)", "nproc_per_node": "processes per node (default: GPUs, or 1)",
            "run_id": "run id (default: <job>-<time>)",
            "resume": "start the ended run --run-id again: a job continues from its newest complete checkpoint",
            "follow": "stream rank 0's output until the run ends; exit with the failed rank's exit code",
            "set": "key=value override (repeatable; bare key=value words work too)", "cluster": CLUSTER_HELP,
            "env": ENV_HELP, "list": "list the jobs", "max_ship_mb": "refuse to ship a script folder bigger than this (default 100)",
            "start_timeout": "seconds until the first training step before the run is failed (jobs)",
            "recover": "when a node is lost (preempted, terminated, unreachable) or ranks fail on a lost peer: bring the "
                       "cluster back, set it up and resume from the last checkpoint, at most N times (implies --follow)"},
      iterable=["set", "env"])
def train(c, job="", script="", nodes="", nproc_per_node=0, run_id="", follow=False, set=None, cluster=None,
          start_timeout=900.0, resume=False, env=None, list=False, max_ship_mb=0.0, recover=0):
    """Start a job (or your script) with torchrun on the cluster's nodes: train --job NAME | --script FILE -- ARGS."""
    from workloads.launch import RunSpec, resume_spec, start_run
    from workloads.env_overrides import parse_env_overrides

    if list:
        from workloads.jobs import describe_jobs

        for name, doc in describe_jobs():
            print(f"{name:24} {doc}")
        return
    home = inventory.home_dir()
    with cli.user_errors():
        if script and cli.OVERRIDES:
            raise Exit(f"error: {' '.join(cli.OVERRIDES)}: words after --script go to your script only after `--`: "
                       f"gpuforge train --script {script} -- {' '.join(cli.OVERRIDES)}", code=2)
        if resume and not run_id:
            raise Exit("error: --resume needs the --run-id of the run to continue", code=2)
        cli.at_least("--nproc-per-node", nproc_per_node, 0)
        cli.at_least("--start-timeout", start_timeout, 1)
        check_recover(recover)
        envs = parse_env_overrides(env or [])
        chosen = inventory.resolve(home, cluster)
        if resume and not (job or script):
            spec = resume_spec(home, chosen, run_id)
            spec.env.update(envs)
        else:
            spec = script_spec(chosen, script, nodes, nproc_per_node, run_id, envs, float(max_ship_mb)) if script else \
                RunSpec(job=job, args=[*(set or []), *cli.OVERRIDES], nodes=cli.parse_nodes(nodes),
                        nproc_per_node=nproc_per_node, run_id=run_id, storage_url=chosen.storage_url,
                        start_timeout=float(start_timeout), env=envs)
            spec.resume = resume
        from provision.autostop import start_for_work

        start_for_work(chosen, cli.console())
        used = start_run(chosen, spec, home)
        verb = "resumed" if resume else "started"
        cli.console().print(f"{verb} run [bold]{spec.run_id}[/] on {len(used)} node(s): "
                            f"{', '.join(n.name for n in used)}; `gpuforge logs`, `gpuforge status`, `gpuforge cancel`")
        if follow or recover:
            code = follow_and_report(chosen, home, spec.run_id, int(recover))
            if code:
                raise Exit(code=code)


def check_recover(recover) -> None:
    from provision.recovery import MAX_RECOVER

    if not str(recover).isdigit() or int(recover) > MAX_RECOVER:
        raise Exit(f"error: --recover {recover}: give a number of recoveries from 0 to {MAX_RECOVER}", code=2)


def script_spec(cluster, script: str, nodes: str, nproc_per_node: int, run_id: str, envs: dict, limit_mb: float):
    """`train --script FILE -- ARGS`: the short form of a task with only a script (its folder shipped safely)."""
    from workloads.ship import DEFAULT_LIMIT_MB, collect_workdir
    from workloads.launch import RunSpec
    from workloads.task import script_task

    count = cli.parse_nodes(nodes) or len(cluster.nodes)
    task, workdir = script_task(script, list(cli.REMAINDER), count, nproc_per_node, envs)
    bundle = collect_workdir(workdir, limit_mb or DEFAULT_LIMIT_MB)
    cli.console().print(bundle.describe())
    return RunSpec(script=task.script, args=list(task.args), workdir=str(workdir), nodes=count,
                   nproc_per_node=nproc_per_node, run_id=run_id, storage_url=cluster.storage_url, env=envs,
                   ship_limit_mb=limit_mb)


def follow_and_report(cluster, home, run_id, recover: int = 0, secrets=None) -> int:
    """Follow the run to its end (recovering it at most `recover` times); the exit status to give: 0, or the
    failed rank's own exit code."""
    from provision.recovery import follow_with_recovery

    status = follow_with_recovery(cluster, home, run_id, recover, out=lambda text: print(text, flush=True), secrets=secrets)
    report.print_run_end(cluster, status)
    return exit_status(status)


def exit_status(status) -> int:
    from workloads.preempt import PREEMPTED_EXIT

    if status.state == "succeeded":
        return 0
    if status.state == "preempted":
        return PREEMPTED_EXIT
    culprit = status.culprit
    code = culprit.exit_code if culprit is not None else None
    if code is None or code == 0:
        return 1
    return 128 - code if code < 0 else code


@task(help={"run": "run id (default: the newest)", "cluster": CLUSTER_HELP})
def status(c, run=None, cluster=None):
    """Show the nodes (running or stopped, time left before autostop) and a run's state per node: alive, finished or
    failed (which rank, exit code, error), last step and loss."""
    from provision.autostop import finish_autodown
    from workloads.launch import run_status
    from workloads.runs import list_runs, load_record

    home = inventory.home_dir()
    with cli.user_errors():
        chosen = inventory.resolve(home, cluster)
        if finish_autodown(home, chosen):
            return
        report.print_autostop(chosen)
        if run is None and not list_runs(home, chosen):
            cli.console().print(f"no runs on cluster {chosen.name} yet; start one with `gpuforge train --job NAME`")
            return
        status = run_status(chosen, home, run)
        if run is None:
            report.print_runs(list_runs(home, chosen))
        report.print_status(status)
        report.print_recoveries(load_record(home, chosen, status.run_id))
        if status.state == "failed":
            report.print_run_end(chosen, status)


@task(help={"run": "run id (default: the newest)", "node": "one node (rank or name)", "tail": "last N lines only",
            "follow": "stream rank 0's output until the run ends", "cluster": CLUSTER_HELP})
def logs(c, run=None, node=None, tail=0, follow=False, cluster=None):
    """Print a run's output, per node."""
    from workloads.launch import logs as read_logs

    home = inventory.home_dir()
    with cli.user_errors():
        cli.at_least("--tail", tail, 0)
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


@task(help={"run": "run id (default: every running run)", "cluster": CLUSTER_HELP})
def cancel(c, run=None, cluster=None):
    """Stop a run's processes on every node (without a run id: every run that is running)."""
    from workloads.launch import cancel_run

    home = inventory.home_dir()
    with cli.user_errors():
        chosen = inventory.resolve(home, cluster)
        for line in cancel_run(chosen, home, run):
            print(line)


@task(help={"run": "run id (default: the newest)", "dest": "where to copy (default ./runs)",
            "checkpoints": "also copy step-N checkpoints", "cluster": CLUSTER_HELP})
def fetch(c, run=None, dest="runs", checkpoints=False, cluster=None):
    """Copy a run's summary, metrics, model and outputs from storage to this machine."""
    from workloads.launch import fetch_run

    home = inventory.home_dir()
    with cli.user_errors():
        chosen = inventory.resolve(home, cluster)
        files = fetch_run(chosen, home, run, Path(dest), checkpoints=checkpoints)
        report.print_fetched(files)


@task(name="exec", help={"cluster": CLUSTER_HELP})
def exec_(c, cluster=None):
    """Run a command on every node, in the node's Python environment: exec -- CMD (output prefixed by node)."""
    from workloads.launch import exec_on_nodes

    home = inventory.home_dir()
    with cli.user_errors():
        command = cli.remainder_command()
        if not command:
            raise Exit("error: give the command after --, e.g. gpuforge exec -- nvidia-smi", code=2)
        chosen = inventory.resolve(home, cluster)
        failed = report.print_exec(exec_on_nodes(chosen, command))
        if failed:
            raise Exit(code=1)
