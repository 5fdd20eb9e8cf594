"""Re-running `fab setup` on a set-up 2-node local cluster versus the first run, side by side.

    .venv/bin/python bench/setup_rerun.py [--rounds 3]

Goal: the re-run takes <= 2 s and <= 10 % of the first run. The last line is `ratio: X.XX`.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from _common import local_cluster, timed_setup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="fresh clusters: one first run and one re-run each")
    args = parser.parse_args()
    firsts, reruns = [], []
    for i in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix="gpuforge-bench-") as tmp:
            home = Path(tmp)  # a fresh home: the first run also builds the wheel, as a user's first setup does
            with local_cluster(f"bench{i}", 2, home) as cluster:
                firsts.append(timed_setup(cluster, home))
                reruns.append(timed_setup(cluster, home))
    first, rerun = statistics.median(firsts), statistics.median(reruns)
    print(f"2-node local cluster, {args.rounds} rounds (medians)")
    print(f"first setup: {first:.2f} s")
    print(f"re-run:      {rerun:.2f} s (goal <= 2 s)")
    print(f"ratio: {rerun / first:.2f}")


if __name__ == "__main__":
    main()
