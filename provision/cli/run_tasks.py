"""The run tasks: train, status, logs, cancel, fetch, exec (the cluster tasks are in cluster_tasks.py)."""

from __future__ import annotations

import sys
from pathlib import Path

from invoke import task
from invoke.exceptions import Exit

from provision import inventory
from provision.cli import argv as cli
from provision.cli import report
from provision.cli.cluster_tasks import CLUSTER_HELP


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
        spec = RunSpec(job=job, script=script, args=args, nodes=cli.parse_nodes(nodes), nproc_per_node=nproc_per_node,
                       run_id=run_id, storage_url=chosen.storage_url, start_timeout=float(start_timeout))
        used = start_run(chosen, spec, home)
        cli.console().print(f"started run [bold]{spec.run_id}[/] on {len(used)} node(s): "
                            f"{', '.join(n.name for n in used)}; `fab logs`, `fab status`, `fab cancel`")
        if follow:
            code = follow_and_report(chosen, home, spec.run_id)
            if code:
                raise Exit(code=code)


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


