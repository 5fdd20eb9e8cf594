"""Fan-out: a `fab setup` re-run on 32 local nodes versus 1 node, measured in the same run.

    .venv/bin/python bench/setup_fanout.py [--nodes 32] [--rounds 7]

Both clusters are up at once; each gets its first setup (printed, not compared: on this machine's few cores a
first setup is CPU-bound, pip and torch imports on every node), then re-runs that find everything in place
alternate between the two (latency-bound: an SSH handshake and one command per node, all nodes at once). Goal:
32 nodes take <= 2x the time of 1. The last line is `ratio: X.XX` (re-run on N nodes / on 1 node, medians).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

from _common import local_cluster, timed_setup
from provision.wheel import build_wheel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gpuforge-bench-") as tmp:
        home = Path(tmp)
        build_wheel(home)  # both ship the same cached wheel: the comparison is about the nodes
        with local_cluster("one", 1, home) as one, local_cluster("many", args.nodes, home) as many:
            first_one, first_many = timed_setup(one, home), timed_setup(many, home)
            timed_setup(one, home), timed_setup(many, home)  # not counted: the first re-run warms the caches
            small, large = [], []
            for i in range(args.rounds):
                pair = [(small, one), (large, many)]
                for times, cluster in pair if i % 2 == 0 else pair[::-1]:
                    times.append(timed_setup(cluster, home))
                print(f"round {i + 1}/{args.rounds}: 1 node {small[-1]:.2f} s, {args.nodes} nodes {large[-1]:.2f} s", flush=True)
    a, b = statistics.median(small), statistics.median(large)
    print(f"first setup (CPU-bound: pip and torch imports share this machine's {os.cpu_count()} cores, not compared): "
          f"1 node {first_one:.1f} s, {args.nodes} nodes {first_many:.1f} s")
    print(f"re-run that finds everything in place, {args.rounds} rounds alternating (medians): 1 node {a:.2f} s, "
          f"{args.nodes} nodes {b:.2f} s (goal: ratio <= 2)")
    print(f"ratio: {b / a:.2f}")


if __name__ == "__main__":
    main()
