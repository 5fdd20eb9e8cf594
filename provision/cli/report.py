"""What the `fab` tasks print: tables, progress displays and one-line outcomes (rich)."""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from infra.cluster import ClusterInfo
from provision.runner import CHANGED, FAILED, PLANNED, SKIPPED, UNCHANGED, NodeReport

STYLE = {CHANGED: "green", UNCHANGED: "dim", SKIPPED: "yellow", FAILED: "bold red", PLANNED: "cyan",
         "succeeded": "green", "failed": "bold red", "stopped": "red", "cancelled": "yellow", "running": "cyan",
         "preempted": "yellow", "dead": "red", "unreachable": "red"}


def console() -> Console:
    return Console(highlight=False, soft_wrap=True)


def print_cluster(cluster: ClusterInfo) -> None:
    table = Table(title=f"cluster {cluster.name} ({cluster.cloud}{', ' + cluster.region if cluster.region else ''})")
    for col in ("node", "ssh", "private address", "GPUs", "workdir"):
        table.add_column(col)
    for n in cluster.nodes:
        table.add_row(n.name, f"{n.user}@{n.address}", n.private_address,
                      f"{n.gpu_count} x {n.gpu_model}" if n.gpu_count else "-", n.workdir)
    out = console()
    out.print(table)
    from provision.autostop import setting

    idle = "" if cluster.cloud == "hosts" else f"{setting(cluster)}; "
    out.print(f"storage: {cluster.storage_url or '-'}; {idle}selected. Next: `gpuforge setup`")


def print_clusters(home: Path) -> None:
    from provision import inventory

    current = inventory.current_name(home)
    table = Table(title="clusters")
    from provision.autostop import cluster_power, setting

    for col in ("", "name", "cloud", "nodes", "storage", "state", "autostop"):
        table.add_column(col)
    known = inventory.known_clusters(home)
    for name in known:
        c = inventory.resolve(home, name)
        table.add_row("*" if name == current else "", name, c.cloud, str(len(c.nodes)), c.storage_url,
                      cluster_power(home, c), setting(c))
    from provision import registry

    for name in registry.registered_names(home):
        if name in known:
            continue
        reg = registry.load(home, name)
        kept = registry.kept_data(home, name)
        state = f"{reg.state} ({reg.cloud})" if reg else "down, data kept"
        table.add_row("", name, state, "-", ", ".join(d.url for d in kept) or "-", "-", "-")
    console().print(table)


class SetupProgress:
    """A live table: one row per node with its current step, refreshed as the runner reports."""

    def __init__(self, cluster: ClusterInfo):
        self.rows = {n.name: ("waiting", "") for n in cluster.nodes}
        self.counts = {n.name: 0 for n in cluster.nodes}
        self.lock = threading.Lock()
        self.live = Live(self.render(), console=console(), refresh_per_second=8, transient=True) if sys.stdout.isatty() else None

    def render(self) -> Table:
        table = Table(show_header=True, box=None)
        table.add_column("node")
        table.add_column("step")
        table.add_column("state")
        for node, (step, state) in self.rows.items():
            table.add_row(node, step, f"[{STYLE.get(state, 'cyan')}]{state}[/]")
        return table

    def event(self, node: str, step: str, state: str) -> None:
        with self.lock:
            self.rows[node] = (step or self.rows[node][0], state)
            if self.live is not None:
                self.live.update(self.render())

    def __enter__(self) -> SetupProgress:
        if self.live is not None:
            self.live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.live is not None:
            self.live.__exit__(*exc)


def print_setup(cluster: ClusterInfo, reports: list[NodeReport], dry_run: bool, seconds: float) -> None:
    out = console()
    for r in reports:
        facts = r.facts.summary() if r.facts else "facts unknown"
        out.print(f"[bold]{r.node}[/] ({r.address}): {facts}")
        for status, names, detail, step_seconds in grouped_steps(r.steps):
            shown = names[0] if len(names) == 1 else f"{len(names)} steps ({', '.join(names)})"
            note = f" - {detail}" if detail and status != CHANGED else ""
            took = f" ({step_seconds:.1f} s)" if status == CHANGED else ""
            out.print(f"  [{STYLE[status]}]{status:9}[/] {shown}{note}{took}")
        for step, cmds in r.plan:
            out.print(f"  [cyan]plan[/] {step}:")
            for cmd in cmds:
                out.print(f"      {'(root) ' if cmd.sudo else ''}{cmd.run}", markup=False)
        if r.error:
            out.print(f"  [bold red]FAILED[/] {r.error}", markup=True)
    gpu_skips = {s.detail for r in reports for s in r.steps if s.status == SKIPPED and "GPU" in s.detail}
    if gpu_skips:
        out.print("[yellow]GPU steps skipped: no NVIDIA GPU on the nodes[/]")
    ok = sum(r.ok for r in reports)
    changed = sum(len(r.changed) for r in reports)
    verb = "planned" if dry_run else "set up"
    summary = f"{ok}/{len(reports)} node(s) {verb} in {seconds:.1f} s"
    if not dry_run:
        summary += f"; {changed} step(s) changed" if changed else "; nothing changed"
    out.print(summary + (f"; logs in {Path(cluster.state_dir) / 'logs'}" if not dry_run else ""))


def grouped_steps(steps: list[Any]) -> list[tuple[str, list[str], str, float]]:
    """Consecutive steps skipped for the same reason (the GPU steps on a CPU node) become one line."""
    groups: list[tuple[str, list[str], str, float]] = []
    for s in steps:
        if groups and s.status == SKIPPED and groups[-1][0] == SKIPPED and groups[-1][2] == s.detail:
            groups[-1][1].append(s.step)
        else:
            groups.append((s.status, [s.step], s.detail, s.seconds))
    return groups


def print_type_plan(cloud: str, instance_type: str, os_name: str, accelerator: str, frameworks: list[str] = ()) -> None:
    from infra.catalog import CLOUDS, find_instance
    from infra.errors import CatalogError
    from provision.plan import plan_context, render_plan
    from provision.steps import all_steps

    if not cloud:  # guess the cloud from the type: AWS types have a dot
        cloud = "aws" if "." in instance_type else "gcp"
    if cloud not in CLOUDS:
        raise CatalogError(f"--cloud must be one of {', '.join(CLOUDS)}; got {cloud!r}")
    find_instance(cloud, instance_type)
    from provision.inventory import home_dir
    from provision.setup import step_options

    ctx = plan_context(cloud, instance_type, os_name, accelerator or None)
    ctx.options = {**step_options(ctx.cluster, home_dir()), **ctx.options, "frameworks": list(frameworks)}
    print(render_plan(all_steps(), ctx))


def print_runs(records: list[dict[str, Any]]) -> None:
    import time

    table = Table(title="runs (newest first)")
    for col in ("run", "what", "nodes", "started"):
        table.add_column(col)
    for r in records:
        spec = r["spec"]
        what = spec.get("task") or spec["job"] or spec["script"] or spec.get("command", "")[:40]
        table.add_row(spec["run_id"], what, str(len(r["nodes"])), time.strftime("%Y-%m-%d %H:%M", time.localtime(r["started"])))
    console().print(table)


def print_autostop(cluster: ClusterInfo) -> None:
    """`status`: each node's state and the time left before autostop stops it."""
    from provision.autostop import describe_nodes, setting

    lines = describe_nodes(cluster)
    if lines:
        console().print(f"cluster {cluster.name}: {setting(cluster)}\n  " + "\n  ".join(escape(line) for line in lines))


def print_status(status: Any) -> None:
    table = Table(title=f"run {status.run_id}: {status.state}")
    for col in ("node", "state", "step", "loss", "exit", "reason"):
        table.add_column(col)
    for n in status.nodes:
        step = f"{n.step}/{n.total_steps}" if n.step is not None else "-"
        loss = f"{n.loss:.4f}" if isinstance(n.loss, (int, float)) else "-"
        table.add_row(n.node, f"[{STYLE.get(n.state, 'white')}]{n.state}[/]", step, loss,
                      "-" if n.exit_code is None else str(n.exit_code), escape(n.reason) if n.state != "running" else "")
    console().print(table)


def print_recoveries(record: dict[str, Any]) -> None:
    """The run's recoveries (provision/recovery.py): when, which node, why, steps lost, seconds per phase."""
    import time

    recoveries = record.get("recoveries") or []
    if not recoveries:
        return
    table = Table(title=f"recoveries of run {record['spec']['run_id']}")
    for col in ("when", "node", "why", "resumed from", "steps lost", "seconds (detect/back/setup/restart)"):
        table.add_column(col)
    for r in recoveries:
        sec = r.get("seconds", {})
        phases = "/".join(f"{sec.get(k, 0):.1f}" for k in ("detection", "node_back", "setup", "restart"))
        table.add_row(time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["time"])), ", ".join(r["nodes"]),
                      escape(f"{r['kind']}: {r['why']}"[:120]),
                      "-" if r.get("resumed_from_step") is None else f"step {r['resumed_from_step']}",
                      "-" if r.get("steps_lost") is None else str(r["steps_lost"]), phases)
    console().print(table)


def print_run_end(cluster: ClusterInfo, status: Any) -> None:
    out = console()
    if status.state == "succeeded":
        out.print(f"run {status.run_id} [green]succeeded[/] on {len(status.nodes)} node(s); `gpuforge fetch {status.run_id}`")
        return
    if status.state == "preempted":
        noticed = [n for n in status.nodes if n.state == "preempted"]
        out.print(f"run {status.run_id} [yellow]preempted[/]: {escape(noticed[0].reason)}; "
                  f"`gpuforge train --resume --run-id {status.run_id}` continues from its last checkpoint")
        return
    culprit = status.culprit
    if culprit is not None:
        node = cluster.node(culprit.node)
        out.print(f"run {status.run_id} [bold red]failed[/] on {culprit.node} ({node.address}): {escape(culprit.reason)}")
        if culprit.tail:
            out.print(culprit.tail, markup=False)
    else:
        out.print(f"run {status.run_id} ended: {status.state}")


def print_fetched(files: list[Path]) -> None:
    out = console()
    summary = next((f for f in files if f.name == "summary.json"), None)
    import os

    root = os.path.commonpath([str(f) for f in files]) if len(files) > 1 else (str(files[0].parent) if files else "-")
    out.print(f"fetched {len(files)} file(s) to {root}")
    if summary is not None:
        import json

        data = json.loads(summary.read_text())
        if "test_accuracy" in data:
            out.print(f"test accuracy: {data['test_accuracy']:.4f}")
        model = next((f for f in files if f.name == "model.pth"), None)
        if model is not None:
            out.print(f"model: {model}")


def print_exec(results: list[tuple[Any, Any]]) -> bool:
    failed = False
    for node, result in results:
        if isinstance(result, Exception):
            print(f"[{node.name}] unreachable: {result}")
            failed = True
            continue
        for line in (result.stdout + result.stderr).splitlines():
            print(f"[{node.name}] {line}")
        if result.exited != 0:
            print(f"[{node.name}] exit {result.exited}")
            failed = True
    return failed


def print_bake(result: Any) -> None:
    out = console()
    out.print(f"baked [bold]{result.image_id}[/] ({result.name}) in family {result.family} in {result.seconds:.0f} s")
    for key, value in sorted(result.tags.items()):
        out.print(f"  {key} = {value}")
    if result.deleted_images:
        out.print(f"deleted older images: {', '.join(result.deleted_images)}")
    for warning in result.warnings:
        out.print(f"[yellow]warning:[/] {warning}")


def print_checks(checks: list[Any], verdict: str) -> bool:
    """The doctor's table (checks the cluster does not need are marked so) and its one-line verdict; all needed ok?"""
    table = Table(title="gpuforge doctor")
    for col in ("check", "ok", "detail"):
        table.add_column(col)
    for check in checks:
        mark = "[green]ok[/]" if check.ok else ("[bold red]no[/]" if check.needed else "[yellow]no[/] (not needed)")
        table.add_row(check.name, mark, escape(check.detail))
    out = console()
    out.print(table)
    out.print(verdict, markup=False)
    return all(c.ok for c in checks if c.needed)
