"""First `fab setup` on a VM-like local node (a fresh machine: sudo user, /opt/gpuforge, a new venv with the exact
torch build and the node lock), and the venv step done with uv instead of pip on the same node, side by side.

    sudo .venv/bin/python bench/first_setup.py [--rounds 1]      # root: it creates a throwaway login user

Both start cold (no pip or uv cache) and take packages from the node's own index setting (GPUFORGE_PIP_INDEX=node:
this machine's registry); uv does not read pip's configuration, so it is given the same find-links and told to
use the system's certificates (pip's config names the CA here) explicitly.
The uv figure includes installing uv itself, as a fresh node would have to. The last line is `ratio: X.XX`
(uv's venv time / pip's).
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import time
from pathlib import Path

from _common import ROOT  # noqa: F401 - puts the repo on sys.path

from infra.local import create_local_cluster, destroy_local_cluster
from infra.ssh import connect
from provision.drivers import torch_requirement
from provision.node_lock import LOCK_NAME
from provision.setup import setup_cluster
from tests.vm_like import vm_home, vm_like_unavailable, vm_user

UV_VENV = "/opt/gpuforge/uv-venv"


def uv_venv_seconds(cluster) -> float:
    """The python_env step's work with uv: bootstrap uv, `uv venv`, `uv pip install` the lock and torch."""
    torch_spec = torch_requirement("", False)[0]
    conn = connect(cluster, cluster.head)
    try:
        links = conn.run("python3 -m pip config get global.find-links 2>/dev/null", hide=True, warn=True).stdout.split()
        find_links = " ".join(f"--find-links {shlex.quote(link)}" for link in links)
        script = (f"set -e; export UV_CACHE_DIR=$(mktemp -d); python3 -m venv /opt/gpuforge/uv-boot; "
                  f"/opt/gpuforge/uv-boot/bin/pip install --quiet --disable-pip-version-check uv; "
                  f"/opt/gpuforge/uv-boot/bin/uv venv --quiet -p python3 {UV_VENV}; "
                  f"VIRTUAL_ENV={UV_VENV} /opt/gpuforge/uv-boot/bin/uv pip install --quiet --system-certs {find_links} "
                  f"-r /opt/gpuforge/{LOCK_NAME} {shlex.quote(torch_spec)}; "
                  f"{UV_VENV}/bin/python -c 'import torch'; rm -rf \"$UV_CACHE_DIR\"")
        started = time.perf_counter()
        result = conn.run(f"sh -c {shlex.quote(script)}", hide=True, warn=True)
        took = time.perf_counter() - started
        if not result.ok:
            raise SystemExit(f"the uv venv failed: {result.stderr[-2000:]}")
        return took
    finally:
        conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=1, help="fresh users and nodes, one first setup each")
    args = parser.parse_args()
    why = vm_like_unavailable()
    if why:
        raise SystemExit(f"bench/first_setup.py: {why}")
    totals, pips, uvs = [], [], []
    for i in range(args.rounds):
        with vm_user("gfbench") as user, vm_home("gpuforge-bench-") as home:
            cluster = create_local_cluster(f"first{i}", 1, home, login_user=user)
            try:
                started = time.perf_counter()
                (report,) = setup_cluster(cluster, home, pip_index="node")
                totals.append(time.perf_counter() - started)
                if not report.ok:
                    raise SystemExit(f"setup failed: {report.error}")
                pips.append(next(s.seconds for s in report.steps if s.step == "python_env"))
                uvs.append(uv_venv_seconds(cluster))
            finally:
                destroy_local_cluster(Path(cluster.state_dir))
    total, pip, uv = statistics.median(totals), statistics.median(pips), statistics.median(uvs)
    print(f"VM-like node, 1 node, {args.rounds} round(s) (medians), cold caches")
    print(f"first setup:       {total:.1f} s (python_env with pip: {pip:.1f} s)")
    print(f"venv with uv:      {uv:.1f} s (installing uv included)")
    print(f"ratio: {uv / pip:.2f}")


if __name__ == "__main__":
    main()
