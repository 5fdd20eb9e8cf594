"""The node supervisor's pure parts: the NCCL env file and failure classification."""

from workloads.failures import explain_failure
from workloads.runs import NodeStatus, RunStatus
from workloads.supervise import load_env_file

TORCHRUN_SIGKILL = """torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
Root Cause (first observed failure):
[0]:
  rank      : 1 (local_rank: 0)
  exitcode  : -9 (pid: 4029)  (SIGKILL)
  traceback : Signal 9 (SIGKILL) received by PID 4029
"""
PEER_LOST = """error: RuntimeError: [../gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:5559.
Root Cause (first observed failure):
  exitcode  : 1 (pid: 4028)
"""


def test_env_file_is_sourced_like_a_shell_would(tmp_path, monkeypatch):
    monkeypatch.setenv("LD_LIBRARY_PATH", "/usr/lib/x")
    path = tmp_path / "nccl.env"
    path.write_text('# comment\nexport FI_PROVIDER="efa"\nexport LD_LIBRARY_PATH="/opt/efa/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"\n')
    env = load_env_file(str(path))
    assert env == {"FI_PROVIDER": "efa", "LD_LIBRARY_PATH": "/opt/efa/lib:/usr/lib/x"}
    assert load_env_file(str(tmp_path / "missing")) == {}


def test_a_killed_rank_is_named_by_its_signal():
    failure = explain_failure(1, TORCHRUN_SIGKILL)
    assert failure.reason == "rank 1 (local rank 0) was killed by signal 9 (SIGKILL)" and not failure.secondary
    assert failure.exit_code == -9 and failure.shell_code == 137


def test_a_rank_that_lost_its_peer_is_secondary():
    failure = explain_failure(1, PEER_LOST)
    assert failure.secondary and failure.reason.startswith("the process exited with code 1: RuntimeError:")
    assert "Connection closed by peer" in failure.reason


def test_the_culprit_is_the_node_that_failed_on_its_own():
    victim = NodeStatus("node-0", 0, "failed", "peer lost", ended=10.0, secondary=True)
    killer = NodeStatus("node-1", 1, "failed", "signal 9", ended=11.0)
    bystander = NodeStatus("node-2", 2, "stopped", "stopped because node-1 failed", ended=9.0)
    status = RunStatus("r", [victim, killer, bystander])
    assert status.state == "failed" and status.culprit is killer
