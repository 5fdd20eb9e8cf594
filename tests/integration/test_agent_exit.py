"""The exit barrier of a successful 2-node run logs no error (workloads/agent.py), even when node 1's
agent reads the barrier's last key after node 0's agent has finished (tests/fakes/slow_barrier.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from tests.support import ROOT

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_agents(tmp_path, module: str) -> tuple[list[int], str]:
    worker = tmp_path / "hello.py"
    worker.write_text("import os\nprint('hello from rank', os.environ['RANK'], flush=True)\n")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = []
    for rank in (0, 1):
        args = ["--nnodes=2", "--nproc-per-node=1", f"--node-rank={rank}", "--master-addr=127.0.0.1",
                f"--master-port={port}", "--max-restarts=0", str(worker)]
        entry = ["-m", module] if rank == 0 else [str(ROOT / "tests" / "fakes" / "slow_barrier.py"), module]
        procs.append(subprocess.Popen([sys.executable, *entry, *args], cwd=tmp_path, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=180)[0] for p in procs]
    return [p.returncode for p in procs], "\n".join(outs)


def test_plain_torchrun_logs_an_exit_barrier_error_when_node_1_is_late(tmp_path):
    """The stand-in reproduces the defect: without our agent, a successful run logs the traceback."""
    codes, out = run_two_agents(tmp_path, "torch.distributed.run")
    assert "hello from rank 1" in out
    assert "Error waiting on exit barrier" in out, out[-3000:]


def test_our_agent_keeps_the_store_until_every_node_left_the_barrier(tmp_path):
    codes, out = run_two_agents(tmp_path, "workloads.agent")
    assert codes == [0, 0], out[-3000:]
    assert "hello from rank 0" in out and "hello from rank 1" in out
    assert "Traceback" not in out and "Error waiting on exit barrier" not in out, out[-3000:]
