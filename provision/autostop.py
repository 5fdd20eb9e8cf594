"""The controller's side of autostop: the setting in the cluster record, `up` of a stopped cluster, and what
`status` and `clusters` say (the node side is provision/steps/autostop.py and provision/data/autostop_watch.py).

    start_local(home, cluster, autostop=None, autodown=False)   # `fab up` of a local cluster that exists
    describe_nodes(cluster)                                     # ["node-0: stops in 42m (idle)", ...] for `status`
"""

from __future__ import annotations

import json
import shlex
from dataclasses import replace
from pathlib import Path
from typing import Any

from infra.autostop import describe, format_duration
from infra.cluster import ClusterInfo


def with_autostop(cluster: ClusterInfo, seconds: int, autodown: bool) -> ClusterInfo:
    return replace(cluster, extra={**cluster.extra, "autostop_s": seconds, "autodown": autodown})


def start_local(home: Path, cluster: ClusterInfo, autostop: int | None, autodown: bool) -> ClusterInfo:
    """`up` of a local cluster that exists: its stopped nodes boot again (sshd, then what they enabled: the watcher),
    their disks (node folders) and the storage as they were; a given --autostop is recorded (`setup` installs it)."""
    from provision.cloud_clusters import console

    out = console()
    stopped = wake_local(cluster)
    out.print(f"started {len(stopped)} stopped node(s) of {cluster.name}: {', '.join(stopped)}" if stopped else
              f"cluster {cluster.name} is up")
    if autostop is not None:
        was_on = bool(cluster.extra.get("autostop_s"))
        cluster = with_autostop(cluster, autostop, autodown)
        cluster.save(Path(cluster.state_dir) / "cluster.json")
        if not autostop and was_on:
            remove_watchers(cluster)  # `setup` skips autostop on a local cluster where it is off
        out.print(f"cluster {cluster.name}: {describe(autostop, autodown)}"
                  + ("; `gpuforge setup` applies it to the nodes" if autostop else ""))
    return cluster


def wake_local(cluster: ClusterInfo) -> list[str]:
    """Boot the stopped nodes of a local cluster again (sshd, then what they enabled); the names of those started."""
    from infra.local import restart_node
    from infra.power import power_states

    stopped = [name for name, state in power_states(cluster).items() if state == "stopped"]
    for name in stopped:
        restart_node(cluster, cluster.node(name).rank)
    return stopped


def start_for_work(cluster: ClusterInfo, out: Any) -> None:
    """Before `setup`, `train` or `launch`: a local cluster's nodes that autostop stopped are started, as `up` does;
    on a cloud with autostop on, stopped nodes are named with the `up` that starts them (without this, setup waited
    5 minutes for nodes that never come back by themselves, and train failed on them as unreachable)."""
    if cluster.cloud == "local":
        stopped = wake_local(cluster)
        if stopped:
            out.print(f"started {len(stopped)} stopped node(s) of {cluster.name}: {', '.join(stopped)}")
        return
    if cluster.cloud not in ("aws", "gcp") or not cluster.extra.get("autostop_s"):
        return
    from infra.power import power_states
    from provision.cloud_clusters import cloud_call
    from provision.errors import InventoryError

    stopped = [name for name, state in cloud_call("asking the nodes' state", lambda: power_states(cluster)).items()
               if state == "stopped"]
    if stopped:
        raise InventoryError(f"{', '.join(stopped)} of cluster {cluster.name} stopped (autostop); "
                             f"`gpuforge up --cloud {cluster.cloud} --name {cluster.name}` starts them")


def remove_watchers(cluster: ClusterInfo) -> None:
    from provision.steps.autostop import AutostopStep
    from provision.steps.base import StepContext, command_line
    from workloads.remote import on_nodes, raise_first

    step = AutostopStep()
    results = on_nodes(cluster, list(cluster.nodes), lambda c, n: c.run(
        command_line(c, step.removal_for(StepContext(cluster=cluster, node=n))), hide=True))
    raise_first(results, list(cluster.nodes), "removing the autostop watcher")


WATCH_PROBE = "cat {state} 2>/dev/null || echo '{{}}'; echo; date +%s"


def node_timer(conn: Any, cluster: ClusterInfo, node: Any) -> dict[str, Any]:
    """The node's watcher state, with `left` (seconds before it stops, by the node's own clock)."""
    from provision.steps.autostop import state_path

    out = conn.run(WATCH_PROBE.format(state=shlex.quote(state_path(cluster, node))), hide=True, warn=True).stdout
    text, _, now = out.strip().rpartition("\n")
    state = json.loads(text.strip() or "{}")
    if state:
        state["left"] = max(0.0, float(state["stop_at"]) - float(now or state["checked_at"]))
    return state


def describe_nodes(cluster: ClusterInfo) -> list[str]:
    """One line per node: stopped, busy (why), or how long before it stops; or that autostop is off."""
    from infra.power import power_states
    from workloads.remote import on_nodes

    seconds = int(cluster.extra.get("autostop_s") or 0)
    if cluster.cloud == "hosts":
        return []
    try:
        states = power_states(cluster)
    except Exception as exc:  # noqa: BLE001 - `status` still shows the run when the cloud cannot be asked
        return [f"the nodes' state is unknown: asking {cluster.cloud} failed: {type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:200] if str(exc) else ''}"]
    up = [n for n in cluster.nodes if states.get(n.name) == "running"]
    timers = dict(zip([n.name for n in up], on_nodes(cluster, up, lambda c, n: node_timer(c, cluster, n))))
    lines = []
    for node in cluster.nodes:
        timer = timers.get(node.name)
        if states.get(node.name) != "running":
            lines.append(f"{node.name}: {states.get(node.name, 'unknown')}")
        elif isinstance(timer, Exception) or timer is None:
            lines.append(f"{node.name}: running (its autostop state is unreadable: {timer})")
        elif not timer:
            lines.append(f"{node.name}: running, no autostop watcher"
                         + (" yet (`gpuforge setup` installs it)" if seconds else ""))
        elif timer.get("busy"):
            lines.append(f"{node.name}: busy ({', '.join(timer['busy'])}); stops {format_duration(timer['idle_s'])} "
                         "after the work ends")
        else:
            lines.append(f"{node.name}: idle, stops in {format_duration(timer['left']) if timer['left'] else 'now'}")
    return lines


def cluster_power(home: Path, cluster: ClusterInfo) -> str:
    """`clusters`' state column: running / stopped / gone ...; for a cloud cluster the cloud is asked."""
    from infra.power import power_states, summary

    if cluster.cloud == "hosts":
        return "-"
    try:
        return summary(power_states(cluster))
    except Exception as exc:  # noqa: BLE001 - a listing must not die of one cluster's credentials
        return f"unknown ({type(exc).__name__})"


def setting(cluster: ClusterInfo) -> str:
    if cluster.cloud == "hosts":
        return "-"
    return describe(int(cluster.extra.get("autostop_s") or 0), bool(cluster.extra.get("autodown")))


def finish_autodown(home: Path, cluster: ClusterInfo) -> bool:
    """An autodown cluster whose every node has gone (terminated on AWS, deleted itself on GCP; stopped on a local
    cluster, or a GCP node that could not delete itself and powered off instead) is removed the next time the
    controller looks, as `fab down` would (its data kept): the nodes cannot remove the stack, whose state lives on
    this machine. True when it was removed."""
    from infra.power import power_states
    from provision.cloud_clusters import console
    from provision.clusters import destroy

    if not cluster.extra.get("autodown") or cluster.cloud not in ("local", "aws", "gcp"):
        return False
    try:
        states = power_states(cluster)
    except Exception:  # noqa: BLE001 - not knowing is no reason to remove anything
        return False
    if not states or any(state not in ("stopped", "gone") for state in states.values()):
        return False
    console().print(f"every node of autodown cluster {cluster.name} has gone: removing the rest of it, as "
                    "`gpuforge down` does (its data is kept)")
    destroy(home, cluster.name, delete_data=False, yes=True)
    return True
