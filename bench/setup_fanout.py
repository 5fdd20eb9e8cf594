"""Fan-out: `fab setup` on 4 nodes versus 1 node, measured in the same run (fresh clusters).

    .venv/bin/python bench/setup_fanout.py [--rounds 2]

Goal: 4 nodes take <= 1.5x the time of 1 node. The last line is `ratio: X.XX` (4 nodes / 1 node).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

from _common import local_cluster, timed_setup
from provision.wheel import build_wheel


def first_and_rerun(nodes: int, home: Path, name: str) -> tuple[float, float]:
    """The first setup (CPU-bound on a shared machine) and a re-run (SSH-latency-bound)."""
    with local_cluster(name, nodes, home) as cluster:
        return timed_setup(cluster, home), statistics.median(timed_setup(cluster, home) for _ in range(3))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gpuforge-bench-") as tmp:
        home = Path(tmp)
        build_wheel(home)  # both sides ship the same cached wheel: the comparison is about the nodes
        one, four = [], []
        for i in range(args.rounds):
            one.append(first_and_rerun(1, home, f"one{i}"))
            four.append(first_and_rerun(4, home, f"four{i}"))
    a, b = (statistics.median(t[0] for t in side) for side in (one, four))
    ra, rb = (statistics.median(t[1] for t in side) for side in (one, four))
    print(f"re-run (latency-bound), {args.rounds} rounds (medians): 1 node {ra:.2f} s, 4 nodes {rb:.2f} s, ratio {rb / ra:.2f}")
    print(f"first setup (CPU-bound: pip and torch imports share this machine's {os.cpu_count()} cores), "
          f"{args.rounds} rounds (medians): 1 node {a:.2f} s, 4 nodes {b:.2f} s (goal: ratio <= 1.5)")
    print(f"ratio: {b / a:.2f}")


if __name__ == "__main__":
    main()
