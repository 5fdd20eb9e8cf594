"""Watching and controlling started runs: status, logs, follow, cancel, fetch, exec, busy nodes."""

from __future__ import annotations

import json
import re
import shlex
import time
from pathlib import Path
from typing import Any, Callable

from infra.cluster import ClusterInfo, NodeInfo
from workloads.remote import on_nodes
from workloads.runs import TERMINAL, LaunchError, NodeStatus, RunStatus, find_record, load_record, record_nodes, runs_dir

FETCH_SKIP = re.compile(r"^(step-\d+|nodes)/")  # checkpoints stay in storage unless asked for
# Written into each fetched run's folder: results, not code, so git and the next launch's shipping (which honours
# .gitignore files) leave them out; `launch --down` fetches into ./runs/ of the very folder it ships.
FETCHED_IGNORE = "# fetched by gpuforge: a run's results, not code (git and `gpuforge launch` leave them out)\n*\n"
STATUS_PROBE = ('cat {d}/status.json 2>/dev/null || echo "{{}}"; echo; echo "#progress"; cat {d}/progress.json 2>/dev/null; '
                'echo; echo "#alive"; p=$(sed -n \'s/.*"supervisor_pid": *\\([0-9]*\\).*/\\1/p\' {d}/status.json 2>/dev/null); '
                '[ -n "$p" ] && kill -0 "$p" 2>/dev/null && echo yes; true')
# The runs whose supervisor is alive on a node: one line per run id.
BUSY_PROBE = (
    'for f in {w}/runs/*/status.json; do [ -f "$f" ] || continue; '
    's=$(sed -n \'s/.*"state": *"\\([a-z ]*\\)".*/\\1/p\' "$f"); '
    'case "$s" in running|starting) p=$(sed -n \'s/.*"supervisor_pid": *\\([0-9]*\\).*/\\1/p\' "$f"); '
    '[ -n "$p" ] && kill -0 "$p" 2>/dev/null && basename "$(dirname "$f")";; esac; done; true'
)
CANCEL_SCRIPT = (
    "d={d}; [ -f $d/status.json ] || exit 0; "
    "sup=$(sed -n 's/.*\"supervisor_pid\": *\\([0-9]*\\).*/\\1/p' $d/status.json); "
    "pg=$(sed -n 's/.*\"pgid\": *\\([0-9]*\\).*/\\1/p' $d/status.json); "
    "[ -n \"$sup\" ] && kill -TERM $sup 2>/dev/null; "
    "for i in $(seq 1 60); do [ -n \"$sup\" ] && kill -0 $sup 2>/dev/null || break; sleep 0.25; done; "
    "[ -n \"$pg\" ] && kill -KILL -$pg 2>/dev/null; rm -f $d/secrets.json; true"
)


def run_dir(node: NodeInfo, run_id: str) -> str:
    return f"{node.workdir}/runs/{run_id}"


def node_status(conn: Any, node: NodeInfo, run_id: str) -> NodeStatus:
    d = shlex.quote(run_dir(node, run_id))
    out = conn.run(STATUS_PROBE.format(d=d), hide=True, warn=True).stdout
    status_text, _, rest = out.partition("#progress")
    progress_text, _, alive = rest.partition("#alive")
    status = json.loads(status_text.strip() or "{}")
    progress = json.loads(progress_text.strip() or "{}")
    state, reason = status.get("state", "not started"), status.get("reason", "")
    if state in ("starting", "running") and alive.strip() != "yes":  # the node rebooted, or the supervisor was killed
        state, reason = "dead", f"its supervisor (pid {status.get('supervisor_pid')}) is gone: the node restarted or was lost"
    return NodeStatus(node=node.name, rank=node.rank, state=state,
                      reason=reason, exit_code=status.get("exit_code"), step=progress.get("step"),
                      total_steps=progress.get("total_steps"), loss=progress.get("loss"), tail=status.get("tail", ""),
                      ended=status.get("ended"), secondary=bool(status.get("secondary")),
                      failed_rank=status.get("failed_rank"), error=status.get("error", ""))


def run_status(cluster: ClusterInfo, home: Path, run_id: str | None = None, enforce: bool = True) -> RunStatus:
    """Every node's state; with `enforce`, a failed run's still-running nodes are stopped (fail-fast)."""
    record = load_record(home, cluster, run_id)
    run_id = record["spec"]["run_id"]
    nodes = record_nodes(cluster, record)
    results = on_nodes(cluster, nodes, lambda c, n: node_status(c, n, run_id))
    statuses = [r if not isinstance(r, Exception) else NodeStatus(n.name, n.rank, "unreachable", str(r))
                for n, r in zip(nodes, results)]
    status = RunStatus(run_id, statuses)
    if enforce and status.state == "failed" and any(n.state == "running" for n in statuses):
        stop_run(cluster, nodes, run_id)
        return run_status(cluster, home, run_id, enforce=False)
    return status


def busy_runs(cluster: ClusterInfo, nodes: list[NodeInfo] | None = None) -> dict[str, list[str]]:
    """run id -> the nodes where its supervisor is alive (unreachable nodes are skipped)."""
    nodes = list(nodes or cluster.nodes)
    results = on_nodes(cluster, nodes, lambda c, n: c.run(BUSY_PROBE.format(w=shlex.quote(n.workdir)), hide=True,
                                                          warn=True).stdout.split())
    busy: dict[str, list[str]] = {}
    for node, ids in zip(nodes, results):
        for run_id in ([] if isinstance(ids, Exception) else ids):
            busy.setdefault(run_id, []).append(node.name)
    return busy


def stop_run(cluster: ClusterInfo, nodes: list[NodeInfo], run_id: str) -> list[Any]:
    """Stop the run's process groups on `nodes` (the supervisor forwards SIGTERM, then SIGKILL)."""
    return on_nodes(cluster, nodes, lambda c, n: c.run(CANCEL_SCRIPT.format(d=shlex.quote(run_dir(n, run_id))),
                                                         hide=True, warn=True))


def cancel_run(cluster: ClusterInfo, home: Path, run_id: str | None = None) -> list[str]:
    """Cancel one run, or (without an id) every run that is running; one line per outcome."""
    if run_id is None:
        busy = busy_runs(cluster)
        if not busy:
            return [f"nothing is running on cluster {cluster.name}"]
        lines = []
        for rid, names in sorted(busy.items()):
            if find_record(home, cluster, rid) is None:  # started from another machine: stop it where it runs
                results = stop_run(cluster, [cluster.node(n) for n in names], rid)
                lines += [f"run {rid} on {n}: " + ("stopped" if not isinstance(r, Exception) else f"cancel failed: {r}")
                          for n, r in zip(names, results)]
            else:
                lines += cancel_run(cluster, home, rid)
        return lines
    record = load_record(home, cluster, run_id)
    nodes = record_nodes(cluster, record)
    before = run_status(cluster, home, run_id, enforce=False)
    if before.state != "running":
        return [f"run {run_id} already ended ({before.state}); nothing to cancel"]
    results = stop_run(cluster, nodes, run_id)
    after = {n.node: n for n in run_status(cluster, home, run_id, enforce=False).nodes}
    return [f"run {run_id} on {n.name}: " + (f"{after[n.name].state}" if not isinstance(r, Exception) else f"cancel failed: {r}")
            for n, r in zip(nodes, results)]


def read_log(conn: Any, node: NodeInfo, run_id: str, offset: int = 0, tail_lines: int = 0) -> tuple[str, int]:
    path = shlex.quote(f"{run_dir(node, run_id)}/output.log")
    if tail_lines:
        return conn.run(f"tail -n {int(tail_lines)} {path} 2>/dev/null", hide=True, warn=True).stdout, 0
    out = conn.run(f"tail -c +{offset + 1} {path} 2>/dev/null", hide=True, warn=True).stdout
    return out, offset + len(out.encode())


def logs(cluster: ClusterInfo, home: Path, run_id: str | None = None, node: str | None = None, tail_lines: int = 0) -> dict[str, str]:
    record = load_record(home, cluster, run_id)
    nodes = record_nodes(cluster, record)
    if node is not None:
        nodes = [cluster.node(node)]
    results = on_nodes(cluster, nodes, lambda c, n: read_log(c, n, record["spec"]["run_id"], tail_lines=tail_lines)[0])
    return {n.name: (r if not isinstance(r, Exception) else f"<unreachable: {r}>") for n, r in zip(nodes, results)}


def follow_run(cluster: ClusterInfo, home: Path, run_id: str | None = None, out: Callable[[str], None] = print,
               poll: float = 1.0, timeout: float | None = None) -> RunStatus:
    """Stream rank 0's output until the run ends (stopping the others on a failure); the final status."""
    from infra.ssh import connect

    record = load_record(home, cluster, run_id)
    run_id = record["spec"]["run_id"]
    head = record_nodes(cluster, record)[0]
    conn = connect(cluster, head)
    offset, deadline = 0, time.monotonic() + timeout if timeout else None
    pending = ""  # a line's start, until its end arrives: a line is never cut in two

    def show(text: str, last: bool = False) -> None:
        nonlocal pending
        pending += text
        complete, sep, pending = pending.rpartition("\n") if not last else (pending, "", "")
        if complete.rstrip("\n"):
            out(complete.rstrip("\n"))

    try:
        while True:
            text, offset = read_log(conn, head, run_id, offset)
            show(text)
            status = run_status(cluster, home, run_id)
            if status.state != "running":
                text, offset = read_log(conn, head, run_id, offset)
                show(text, last=True)
                return status
            if deadline is not None and time.monotonic() > deadline:
                raise LaunchError(f"run {run_id} still running after {timeout:.0f} s")
            time.sleep(poll)
    finally:
        conn.close()


def fetch_run(cluster: ClusterInfo, home: Path, run_id: str | None, dest: Path, checkpoints: bool = False) -> list[Path]:
    """Copy the run's summary, metrics, model and outputs from storage to `dest/<run id>/`."""
    from workloads.storage import open_store

    record = load_record(home, cluster, run_id)
    run_id = record["spec"]["run_id"]
    store = open_store(record["spec"]["storage_url"]).child("runs", run_id)
    keys = [k for k in store.list() if checkpoints or not FETCH_SKIP.match(k)]
    if not keys:
        raise LaunchError(f"run {run_id} has nothing in {store.url} yet")
    target = Path(dest) / run_id
    copied = []
    for key in keys:
        path = target / key
        path.parent.mkdir(parents=True, exist_ok=True)
        store.download_file(key, path)
        copied.append(path)
    ignore = target / ".gitignore"
    if not ignore.exists():
        ignore.write_text(FETCHED_IGNORE)
    return copied


def exec_on_nodes(cluster: ClusterInfo, command: str, nodes: list[NodeInfo] | None = None) -> list[tuple[NodeInfo, Any]]:
    """Run a shell command on every node, in its work directory with its venv first on PATH (so `pip`
    and `python` are the node environment's); results in rank order."""
    nodes = nodes or list(cluster.nodes)

    def run(conn: Any, node: NodeInfo) -> Any:
        w = shlex.quote(node.workdir)
        return conn.run(f"cd {w} 2>/dev/null; export PATH={w}/venv/bin:$PATH VIRTUAL_ENV={w}/venv; {command}",
                        hide=True, warn=True, pty=False)

    return list(zip(nodes, on_nodes(cluster, nodes, run)))


def known_run_ids(home: Path, cluster: ClusterInfo) -> list[str]:
    folder = runs_dir(home, cluster)
    return sorted(p.stem for p in folder.glob("*.json")) if folder.exists() else []


__all__ = ["TERMINAL", "busy_runs", "cancel_run", "exec_on_nodes", "fetch_run", "follow_run", "logs", "node_status",
           "read_log", "run_dir", "run_status", "stop_run"]
