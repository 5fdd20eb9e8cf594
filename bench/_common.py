"""What the cluster benchmarks share: a local cluster that is always torn down, a timed setup."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from infra.cluster import ClusterInfo  # noqa: E402
from infra.local import create_local_cluster, destroy_local_cluster  # noqa: E402
from provision.setup import setup_cluster  # noqa: E402


@contextmanager
def local_cluster(name: str, nodes: int, home: Path) -> Iterator[ClusterInfo]:
    cluster = create_local_cluster(name, nodes, home)
    try:
        yield cluster
    finally:
        destroy_local_cluster(Path(cluster.state_dir))


def timed_setup(cluster: ClusterInfo, home: Path) -> float:
    """Seconds for one `fab setup` of the whole cluster; a failed node ends the benchmark."""
    started = time.perf_counter()
    reports = setup_cluster(cluster, home)
    elapsed = time.perf_counter() - started
    bad = [r.error for r in reports if not r.ok]
    if bad:
        raise SystemExit(f"setup failed: {bad}")
    return elapsed
