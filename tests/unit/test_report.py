"""What `fab setup` prints at the end."""

from __future__ import annotations

from infra.cluster import ClusterInfo, NodeInfo
from provision.cli.report import print_setup
from provision.runner import CHANGED, UNCHANGED, NodeReport, StepReport


def test_setup_summary_prints_the_whole_run_time_not_a_step_time(capsys):
    """Regression (issue 8, defect 10): a loop variable shadowed `seconds`, so a 134 s setup said "in 2.6 s"."""
    node = NodeInfo(name="node-0", rank=0, public_address="127.0.0.2", private_address="127.0.0.2")
    cluster = ClusterInfo(name="c", cloud="local", nodes=(node,), state_dir="/tmp/c")
    report = NodeReport("node-0", node.address, steps=[StepReport("python_env", CHANGED, "venv", 2.6),
                                                       StepReport("verify", UNCHANGED, "already in place", 0.0)])
    print_setup(cluster, [report], dry_run=False, seconds=134.0)
    out = capsys.readouterr().out
    assert "1/1 node(s) set up in 134.0 s" in out
    assert "python_env (2.6 s)" in out


def test_status_shows_each_recovery_of_the_run(capsys, monkeypatch):
    from provision.cli.report import print_recoveries

    monkeypatch.setenv("COLUMNS", "250")
    record = {"spec": {"run_id": "r1"}, "recoveries": [
        {"time": 1764662400.0, "kind": "unreachable", "nodes": ["node-1"], "why": "node-1 unreachable: refused",
         "reached_step": 13, "resumed_from_step": 12, "steps_lost": 1,
         "seconds": {"detection": 3.3, "node_back": 1.2, "setup": 0.5, "restart": 1.3}}]}
    print_recoveries(record)
    out = capsys.readouterr().out
    assert "recoveries of run r1" in out and "node-1" in out and "unreachable: node-1 unreachable" in out
    assert "step 12" in out and "3.3/1.2/0.5/1.3" in out
    print_recoveries({"spec": {"run_id": "r2"}, "recoveries": []})
    assert capsys.readouterr().out == ""
