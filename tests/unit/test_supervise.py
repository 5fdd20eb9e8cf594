"""The node supervisor's pure parts: the NCCL env file and failure classification."""

import time

from workloads.failures import PEER_GRACE_S, explain_failure
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


def test_a_peers_loss_named_in_passing_does_not_make_the_rank_that_broke_a_victim():
    log = USER_TRACEBACK + "[W TCPStore.cpp:125] recvValue failed: Connection reset by peer\n"
    assert not explain_failure(1, log).secondary


def test_while_only_victims_have_failed_the_run_waits_for_the_rank_that_broke():
    """Regression (issue 10, defect 3): the victim's node, failing first, was named, and the culprit was stopped."""
    victim = NodeStatus("node-0", 0, "failed", "peer lost", ended=time.time() - 2, secondary=True)
    status = RunStatus("r", [victim, NodeStatus("node-1", 1, "running")])
    assert status.state == "running"
    victim.ended = time.time() - PEER_GRACE_S - 1
    assert status.state == "failed" and status.culprit is victim


def test_the_culprit_is_the_node_that_failed_on_its_own():
    victim = NodeStatus("node-0", 0, "failed", "peer lost", ended=10.0, secondary=True)
    killer = NodeStatus("node-1", 1, "failed", "signal 9", ended=11.0)
    bystander = NodeStatus("node-2", 2, "stopped", "stopped because node-1 failed", ended=9.0)
    status = RunStatus("r", [victim, killer, bystander])
    assert status.state == "failed" and status.culprit is killer


# torchrun 2.13's report for a worker that called sys.exit(3) (taken from a run on the local cluster)
TORCHRUN_EXIT_3 = """[rank1]: something went wrong
E1201 22:57:56.123000 5990 torch/distributed/elastic/multiprocessing/api.py:882] failed (exitcode: 3) local_rank: 0 (pid: 5992)
Traceback (most recent call last):
  File "/venv/lib/python3.11/site-packages/torch/distributed/run.py", line 940, in main
    run(args)
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
/runs/crash/code/crash.py FAILED
------------------------------------------------------------
Failures:
  <NO_OTHER_FAILURES>
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-12-01_22:57:56
  host      : localhost
  rank      : 1 (local_rank: 0)
  exitcode  : 3 (pid: 5992)
  error_file: <N/A>
  traceback : To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html
============================================================
"""
USER_TRACEBACK = """Traceback (most recent call last):
  File "/code/train.py", line 5, in <module>
    raise ValueError("lr must be > 0, got -1")
ValueError: lr must be > 0, got -1
""" + TORCHRUN_EXIT_3.replace("exitcode  : 3", "exitcode  : 1")


def test_the_workers_own_exit_code_and_rank_are_reported_not_torchruns():
    failure = explain_failure(1, TORCHRUN_EXIT_3)
    assert (failure.exit_code, failure.rank, failure.local_rank, failure.secondary) == (3, 1, 0, False)
    assert failure.reason == "rank 1 (local rank 0) exited with code 3" and failure.shell_code == 3


def test_the_users_last_traceback_is_the_error_not_torchruns():
    failure = explain_failure(1, USER_TRACEBACK)
    assert failure.reason == "rank 1 (local rank 0) exited with code 1: ValueError: lr must be > 0, got -1"


# What torch 2.13's torchrun logged for a `script:` that raised on rank 1 (a user's first try, 2 Dec 2026): each line of
# the worker's traceback is prefixed `[rank1]: `, and the reason said only "exited with code 1".
RANK_PREFIXED = """[rank1]: Traceback (most recent call last):
[rank1]:   File "/nodes/node-1/runs/r1/code/raise.py", line 5, in <module>
[rank1]:     raise ValueError("lr must be > 0")
[rank1]: ValueError: lr must be > 0
E1202 12:54:35.237000 12155 torch/distributed/elastic/multiprocessing/api.py:1002] failed (exitcode: 1) local_rank: 0
Traceback (most recent call last):
  File "/venv/lib/python3.11/site-packages/torch/distributed/launcher/api.py", line 383, in launch_agent
    raise ChildFailedError(
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
Root Cause (first observed failure):
[0]:
  time      : 2026-12-02_12:54:35
  host      : localhost
  rank      : 1 (local_rank: 0)
  exitcode  : 1 (pid: 12210)
  error_file: <N/A>
  traceback : To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html
============================================================
"""


def test_a_rank_prefixed_traceback_gives_the_users_error():
    failure = explain_failure(1, RANK_PREFIXED)
    assert failure.reason == "rank 1 (local rank 0) exited with code 1: ValueError: lr must be > 0"
    assert not failure.secondary


def test_an_error_file_gives_the_error(tmp_path):
    error_file = tmp_path / "error.json"
    error_file.write_text('{"message": {"message": "RuntimeError: CUDA out of memory", "extraInfo": {}}}')
    log = TORCHRUN_EXIT_3.replace("error_file: <N/A>", f"error_file: {error_file}")
    assert explain_failure(1, log).error == "RuntimeError: CUDA out of memory"


def test_a_plain_command_keeps_its_exit_code_and_traceback():
    failure = explain_failure(4, "Traceback (most recent call last):\n  File \"x.py\", line 1\nKeyError: 'a'\n")
    assert failure.reason == "the process exited with code 4: KeyError: 'a'" and failure.shell_code == 4


def test_an_agent_that_lost_the_store_is_secondary():
    log = "torch.distributed.DistNetworkError: failed to recv, got 0 bytes\n"
    assert explain_failure(1, log).secondary
