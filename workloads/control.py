"""Watching and controlling started runs: status, logs, follow, cancel, fetch, exec, busy nodes."""

from __future__ import annotations

import json
import re
import shlex
import time
from pathlib import Path
from typing import Any, Callable

from infra.cluster import ClusterInfo, NodeInfo
from workloads.remote import Connections, on_nodes
from workloads.runs import TERMINAL, LaunchError, NodeStatus, RunStatus, find_record, load_record, record_nodes, runs_dir
from workloads.supervise import STOP_REASON

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
    "d={d}; [ -f $d/status.json ] || exit 0; {why}"
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


def run_status(cluster: ClusterInfo, home: Path, run_id: str | None = None, enforce: bool = True,
               pool: Connections | None = None) -> RunStatus:
    """Every node's state; with `enforce`, a failed run's still-running nodes are stopped (fail-fast)."""
    record = load_record(home, cluster, run_id)
    run_id = record["spec"]["run_id"]
    nodes = record_nodes(cluster, record)
    results = on_nodes(cluster, nodes, lambda c, n: node_status(c, n, run_id), pool)
    statuses = [r if not isinstance(r, Exception) else NodeStatus(n.name, n.rank, "unreachable", str(r))
                for n, r in zip(nodes, results)]
    status = RunStatus(run_id, statuses)
    if enforce and status.state == "failed" and any(n.state == "running" for n in statuses):
        culprit = status.culprit
        stop_run(cluster, nodes, run_id, pool, why=f"{culprit.node} {culprit.state}: {culprit.reason}" if culprit
                 else "the run failed")
        return run_status(cluster, home, run_id, enforce=False, pool=pool)
    return status


def busy_runs(cluster: ClusterInfo, nodes: list[NodeInfo] | None = None, pool: Connections | None = None) -> dict[str, list[str]]:
    """run id -> the nodes where its supervisor is alive (unreachable nodes are skipped)."""
    nodes = list(nodes or cluster.nodes)
    results = on_nodes(cluster, nodes, lambda c, n: c.run(BUSY_PROBE.format(w=shlex.quote(n.workdir)), hide=True,
                                                          warn=True).stdout.split(), pool)
    busy: dict[str, list[str]] = {}
    for node, ids in zip(nodes, results):
        for run_id in ([] if isinstance(ids, Exception) else ids):
            busy.setdefault(run_id, []).append(node.name)
    return busy


def stop_run(cluster: ClusterInfo, nodes: list[NodeInfo], run_id: str, pool: Connections | None = None,
             why: str = "") -> list[Any]:
    """Stop the run's process groups on `nodes` (the supervisor forwards SIGTERM, then SIGKILL). `why` is what their
    status says ("stopped because ..."); without it they were "cancelled by the user"."""
    def script(node: NodeInfo) -> str:
        d = shlex.quote(run_dir(node, run_id))
        note = f"printf '%s' {shlex.quote(why)} > $d/{STOP_REASON}; " if why else ""
        return CANCEL_SCRIPT.format(d=d, why=note)

    return on_nodes(cluster, nodes, lambda c, n: c.run(script(n), hide=True, warn=True), pool)


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


FOLLOW_SCRIPT = (
    # rank 0's log from byte {start}, as it grows, until that node's status.json says the run ended there (read
    # with builtins every 0.1 s); also ends when its supervisor is gone without saying so, or never wrote a status.
    # Not `tail --pid`: an exited supervisor stays a zombie until init reaps it, which can take seconds.
    "d={d}; tail -c +{start} -F $d/output.log 2>/dev/null & t=$!; n=0; "
    "while :; do s=; p=; "
    "while IFS= read -r l; do case \"$l\" in "
    "' \"state\": \"'*) s=${{l#*: \\\"}}; s=${{s%%\\\"*}};; "
    "' \"supervisor_pid\": '*) p=${{l#*: }}; p=${{p%,}};; esac; done 2>/dev/null < $d/status.json; "
    "case \"$s\" in succeeded|failed|cancelled|stopped) break;; esac; "
    "if [ -z \"$p\" ]; then n=$((n + 1)); [ $n -gt 100 ] && break; elif ! kill -0 \"$p\" 2>/dev/null; then break; fi; "
    "sleep 0.1; done; sleep 0.2; kill $t 2>/dev/null; wait $t 2>/dev/null; true"
)
FOLLOW_POLL_S = 1.0  # how often the other nodes are asked while rank 0's log streams (a failure there stops rank 0)
ENDING_POLL_S = 0.05  # after rank 0's supervisor exits: until every node has written its final state
STREAM_END_S = 10.0  # how long rank 0's stream may outlast the run's final state, and the others rank 0's


class LineWriter:
    """A file-like sink for Fabric's output stream: whole lines go to `out`, a line's start waits for its end."""

    def __init__(self, out: Callable[[str], None]):
        self.out, self.pending, self.bytes = out, "", 0

    def write(self, text: str) -> None:
        self.bytes += len(text.encode())
        complete, _, self.pending = (self.pending + text).rpartition("\n")
        if complete.rstrip("\n"):
            self.out(complete.rstrip("\n"))

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if self.pending.rstrip("\n"):
            self.out(self.pending.rstrip("\n"))
        self.pending = ""


def follow_run(cluster: ClusterInfo, home: Path, run_id: str | None = None, out: Callable[[str], None] = print,
               poll: float = FOLLOW_POLL_S, timeout: float | None = None) -> RunStatus:
    """Stream rank 0's output until the run ends (stopping the others on a failure); the final status.

    The log comes as it is written, over one SSH channel (`tail --pid` on rank 0's node, which ends when that
    node's supervisor does); the nodes' states are read over connections kept open for the whole follow."""
    import threading

    record = load_record(home, cluster, run_id)
    run_id = record["spec"]["run_id"]
    head = record_nodes(cluster, record)[0]
    deadline = time.monotonic() + timeout if timeout else None
    sink = LineWriter(out)
    with Connections(cluster) as pool:
        status = run_status(cluster, home, run_id, pool=pool)
        offset = 0
        if status.state == "running":
            conn = pool.get(head)  # the stream is a channel of its own on the same connection
            script = FOLLOW_SCRIPT.format(d=shlex.quote(run_dir(head, run_id)), start=1)

            def stream() -> None:
                try:
                    conn.run(script, hide="err", warn=True, out_stream=sink)
                except Exception:  # noqa: BLE001 - a dropped stream: what it missed is read below
                    pass

            tailing = threading.Thread(target=stream, daemon=True, name="follow-log")
            tailing.start()
            stream_ended = 0.0
            while status.state == "running":
                if deadline is not None and time.monotonic() > deadline:
                    raise LaunchError(f"run {run_id} still running after {timeout:.0f} s")
                if tailing.is_alive():
                    tailing.join(poll)
                else:  # rank 0 ended: the others end with it (asked often for a while), or are stopped
                    stream_ended = stream_ended or time.monotonic()
                    time.sleep(ENDING_POLL_S if time.monotonic() - stream_ended < STREAM_END_S else poll)
                status = run_status(cluster, home, run_id, pool=pool)
            tailing.join(STREAM_END_S)  # the stream stops ~0.3 s after rank 0's final state
            if tailing.is_alive():  # rank 0 still stopping: what the stream showed stays shown, nothing twice
                sink.close()
                return status
            offset = sink.bytes
        text, _ = read_log(pool.get(head), head, run_id, offset)  # what the stream had not shown (all of an ended run)
        sink.write(text)
        sink.close()
        return status


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
