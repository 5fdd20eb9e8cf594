"""The node-side watcher's own rules (provision/data/autostop_watch.py), without a node: what counts as work, and
when the stop comes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import importlib.util
from pathlib import Path

import pytest

WATCH = Path(__file__).resolve().parents[2] / "provision" / "data" / "autostop_watch.py"  # a file the nodes run
_spec = importlib.util.spec_from_file_location("autostop_watch", WATCH)
watch = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(watch)
Watcher, active_runs, decode_address = watch.Watcher, watch.active_runs, watch.decode_address


def write_status(runs, run_id: str, state: str, pid: int) -> None:
    (runs / run_id).mkdir(parents=True)
    (runs / run_id / "status.json").write_text(json.dumps({"state": state, "supervisor_pid": pid}))


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_only_runs_whose_supervisor_lives_count(tmp_path):
    write_status(tmp_path, "alive", "running", os.getpid())
    write_status(tmp_path, "starting", "starting", os.getpid())
    write_status(tmp_path, "crashed", "running", dead_pid())  # the node rebooted under it: no work any more
    write_status(tmp_path, "done", "succeeded", os.getpid())
    (tmp_path / "torn").mkdir()
    (tmp_path / "torn" / "status.json").write_text("{not json")
    assert active_runs(str(tmp_path)) == ["alive", "starting"]


@pytest.mark.parametrize("text, address", [("0100007F:0016", ("127.0.0.1", 22)), ("0300007F:D431", ("127.0.0.3", 54321))])
def test_proc_net_tcp_addresses_decode(text, address):
    assert decode_address(text) == address


def watcher(tmp_path, **changes) -> Watcher:
    config = {"idle_s": 10, "poll_s": 1, "session_min_s": 5, "runs_dir": str(tmp_path / "runs"), "ssh_port": 1,
              "ssh_address": "127.0.0.254", "state_path": str(tmp_path / "state.json"), "action": "stop-sshd"}
    return Watcher({**config, **changes})


def test_the_stop_comes_after_idle_s_without_work_and_work_resets_the_clock(tmp_path):
    w = watcher(tmp_path)
    start = w.last_busy
    assert not w.step(start + 9)
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["state"] == "idle" and state["stop_at"] == start + 10 and state["busy"] == []
    write_status(tmp_path / "runs", "r1", "running", os.getpid())
    assert not w.step(start + 11)  # a run: busy, the clock starts again
    assert json.loads((tmp_path / "state.json").read_text())["busy"] == ["run r1"]
    (tmp_path / "runs" / "r1" / "status.json").write_text(json.dumps({"state": "succeeded"}))
    assert not w.step(start + 20)
    assert w.step(start + 21)
    assert json.loads((tmp_path / "state.json").read_text())["state"] == "stopping"


def test_an_ssh_connection_counts_once_it_has_been_open_session_min_s(tmp_path, monkeypatch):
    open_now = {"a>b"}
    monkeypatch.setattr(watch, "ssh_connections", lambda port, address="": set(open_now))
    w = watcher(tmp_path)
    t = w.last_busy
    assert w.busy_reasons(t) == []  # a probe's connection: not yet a session
    assert w.busy_reasons(t + 4) == []
    assert w.busy_reasons(t + 5) == ["1 ssh session(s)"]
    open_now.clear()
    assert w.busy_reasons(t + 6) == []


def write_mark(tmp_path, run_id: str, port: int, written: float) -> Path:
    marks = tmp_path / "cluster-runs"
    marks.mkdir(exist_ok=True)
    mark = marks / f"{run_id}.json"
    mark.write_text(json.dumps({"run_id": run_id, "head": ["127.0.0.1", port]}))
    os.utime(mark, (written, written))
    return mark


def test_a_run_elsewhere_on_the_cluster_counts_while_its_head_answers_and_its_mark_ends_within_the_grace(tmp_path):
    """workloads/cluster_marks.py: the mark counts while the run's head supervisor answers, and at most
    mark_grace_s after it last did: a run that ended (or a head that went) keeps the node up no longer."""
    import socket

    head = socket.create_server(("127.0.0.1", 0))
    w = watcher(tmp_path, mark_grace_s=5)
    now = w.last_busy
    alive = write_mark(tmp_path, "long", head.getsockname()[1], written=now - 3600)  # written an hour ago
    assert not w.step(now)
    assert json.loads((tmp_path / "state.json").read_text())["busy"] == ["run long on the cluster"]
    head.close()  # the run ends: its supervisor's port closes
    assert not w.step(now + 4) and json.loads((tmp_path / "state.json").read_text())["busy"] == [
        "run long on the cluster"], "within the grace of the last answer"
    assert not w.step(now + 6)
    assert json.loads((tmp_path / "state.json").read_text())["busy"] == [] and not alive.exists()
    assert not w.step(now + 13) and w.step(now + 14)  # then its own idle clock: idle_s after the last busy look


def test_a_starting_run_s_mark_counts_for_the_grace_only_when_its_head_never_answers(tmp_path):
    """A crashed launch or a lost controller leaves a mark nobody answers: it keeps the node up mark_grace_s, no more."""
    import socket

    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    w = watcher(tmp_path, mark_grace_s=5)
    now = w.last_busy
    mark = write_mark(tmp_path, "lost", port, written=now)
    assert not w.step(now + 1)
    assert json.loads((tmp_path / "state.json").read_text())["busy"] == ["run lost on the cluster"]
    assert not w.step(now + 5.5) and not mark.exists()
    assert json.loads((tmp_path / "state.json").read_text())["busy"] == []
