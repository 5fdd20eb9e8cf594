"""What a run's end says about recovering it: states of a run with a lost or preempted node, and diagnose()."""

from __future__ import annotations

import pytest
from invoke.exceptions import Exit

from provision.cli.run_tasks import check_recover, exit_status
from provision.recovery import diagnose
from workloads.preempt import PREEMPTED_EXIT
from workloads.runs import NodeStatus, RunStatus


def run(*nodes: tuple[str, str, bool, str]) -> RunStatus:
    return RunStatus("r", [NodeStatus(f"node-{i}", i, state, reason, secondary=secondary)
                           for i, (state, reason, secondary, _) in enumerate(nodes)])


@pytest.mark.parametrize("states, state, kind", [
    ((("failed", "Connection reset by peer", True, ""), ("unreachable", "no route", False, "")), "failed", "unreachable"),
    ((("running", "", False, ""), ("unreachable", "no route", False, "")), "running", "unreachable"),
    ((("succeeded", "", False, ""), ("unreachable", "no route", False, "")), "failed", "unreachable"),
    ((("failed", "Connection closed by peer", True, ""), ("dead", "its supervisor is gone", False, "")), "failed", "dead"),
    ((("preempted", "preempted: a peer had the notice", False, ""), ("preempted", "preempted: AWS spot", False, "")),
     "preempted", "preempted"),
    ((("stopped", "stopped because node-1 preempted", False, ""), ("preempted", "preempted: GCP", False, "")),
     "preempted", "preempted"),
    ((("failed", "Connection closed by peer", True, ""), ("failed", "Connection reset by peer", True, "")), "failed", "peer-loss"),
    ((("stopped", "stopped because node-1 failed", False, ""), ("failed", "ValueError: lr", False, "")), "failed", None),
    ((("failed", "Connection closed by peer", True, ""), ("failed", "ValueError: lr", False, "")), "failed", None),
])
def test_the_run_state_and_whether_recovery_helps(states, state, kind):
    status = run(*states)
    assert status.state == state
    loss = diagnose(status)
    assert (loss.kind if loss else None) == kind


def test_the_preempted_node_is_the_one_with_the_notice():
    loss = diagnose(run(("preempted", "preempted: a peer had the notice", False, ""), ("preempted", "preempted: AWS", False, "")))
    assert loss.nodes == ["node-1"]


def test_a_preempted_run_exits_with_the_preempted_status():
    assert exit_status(run(("preempted", "x", False, ""))) == PREEMPTED_EXIT


@pytest.mark.parametrize("bad", ["-1", "two", "101"])
def test_a_bad_recover_count_is_one_clear_line(bad):
    with pytest.raises(Exit) as info:
        check_recover(bad)
    assert f"--recover {bad}" in str(info.value.message) and "0 to 100" in str(info.value.message)
