"""provision.allreduce under torchrun: two CPU processes with gloo, tiny messages; and its bandwidth math."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from provision.allreduce import bandwidth, bus_factor, check_sum, parse_allreduce_output, parse_size

pytestmark = pytest.mark.integration

TORCHRUN_TIMEOUT = 120  # seconds; a hung rendezvous or collective must not eat CI


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_run_prints_table_and_json():
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2",
        "--master-addr=127.0.0.1", f"--master-port={free_port()}", "--max-restarts=0",
        "-m", "provision.allreduce", "--sizes", "4K,64K", "--iters", "3", "--warmup", "1", "--timeout", "60",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TORCHRUN_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[0] == "all-reduce float32 over gloo: 2 ranks on 1 node, busbw = algbw * 2(n-1)/n"
    assert lines[1].split() == ["size", "bytes", "time(us)", "algbw(GB/s)", "busbw(GB/s)"]
    assert [line.split()[:2] for line in lines[2:4]] == [["4K", "4096"], ["64K", "65536"]]
    record = parse_allreduce_output(proc.stdout)
    assert (record["backend"], record["world_size"], record["nodes"], record["iters"]) == ("gloo", 2, 1, 3)
    assert [r["bytes"] for r in record["results"]] == [4096, 65536]
    for r in record["results"]:
        assert r["time_us"] > 0
        assert r["algbw_gbps"] == pytest.approx(r["bytes"] / (r["time_us"] / 1e6) / 1e9, rel=1e-3)
        assert r["busbw_gbps"] == pytest.approx(r["algbw_gbps"] * 2 * (2 - 1) / 2, rel=1e-3)


@pytest.mark.parametrize("text, size", [("4K", 4096), ("1M", 1048576), ("2G", 2 * 1024**3), ("512", 512), ("16MB", 16 * 1024**2)])
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "1X", "0", "3", "-4K"])
def test_parse_size_refuses_bad_values(text):
    with pytest.raises(ValueError):
        parse_size(text)


@pytest.mark.parametrize("ranks, factor", [(1, 0.0), (2, 1.0), (8, 1.75), (16, 1.875)])
def test_bus_factor_is_the_nccl_tests_allreduce_factor(ranks, factor):
    assert bus_factor(ranks) == factor


def test_bandwidth_in_gb_per_second():
    algbw, busbw = bandwidth(256 * 1024**2, 0.01, 16)
    assert algbw == pytest.approx(26.8435456) and busbw == pytest.approx(26.8435456 * 1.875)


def test_wrong_sum_is_reported_as_a_broken_collective():
    with pytest.raises(RuntimeError, match="expected 3.0"):
        check_sum([3.0, 2.0], 2, "4K")


def test_missing_result_line_is_an_error():
    with pytest.raises(ValueError, match="no all-reduce result"):
        parse_allreduce_output("rank 1: all-reduce check failed: timeout\n")
