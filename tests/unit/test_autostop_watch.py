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
