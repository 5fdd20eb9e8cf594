"""The lock of what a node's venv needs besides torch: exact versions of the workload's packages and of
everything they and torch pull in, the same for every node (provision/data/node-requirements.txt).

    python -m provision.node_lock            # re-resolve it (here, from this machine's index), then review the diff

The lock is resolved for the oldest Python a node may run (Ubuntu 22.04's 3.10) with binary wheels only and
checked for the newer ones, so one file serves every supported node. `fab setup` installs it together with
the node's exact torch build; a changed lock changes the python_env fingerprint, so the next setup applies it.
Each run's summary records the lock's digest beside the torch, CUDA, NCCL and driver versions.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from importlib import resources
from pathlib import Path

LOCK_NAME = "node-requirements.txt"
# The `train` extra of pyproject.toml minus torch (its build comes from the version matrix), plus what the
# supervisor and trainer import; torch's own requirements (its wheel's METADATA) are locked too.
NODE_PACKAGES = ("numpy", "scikit-learn", "tensorboard", "boto3", "google-cloud-storage", "pydantic", "rich", "pyyaml")
TORCH_REQUIREMENTS = ("filelock", "typing-extensions>=4.10.0", "setuptools>=77.0.3", "sympy>=1.13.3",
                      "networkx>=2.5.1", "jinja2", "fsspec>=0.8.5")
RESOLVE_PYTHON = "3.10"  # the oldest python3 of a supported node (Ubuntu 22.04)
CHECK_PYTHONS = ("3.11", "3.12", "3.13")  # Debian 12, Ubuntu 24.04, Debian 13
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "linux_x86_64")


def lock_path() -> Path:
    return Path(str(resources.files("provision") / "data" / LOCK_NAME))


# One parser for setup and for the runs that record the lock (workloads/ imports nothing from provision/).
from workloads.environment import lock_digest, lock_requirements  # noqa: E402,F401


def resolve(python_version: str, requirements: list[str]) -> list[str]:
    """What pip would install for `requirements` on a node with this Python (binary wheels only)."""
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "report.json"
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed",
               "--report", str(report), "--python-version", python_version, "--only-binary=:all:",
               *(f"--platform={p}" for p in PLATFORMS), "--target", str(Path(scratch) / "t"), *requirements]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(f"resolving for Python {python_version} failed:\n{result.stderr[-2000:]}")
        installed = json.loads(report.read_text())["install"]
    return sorted(f"{i['metadata']['name']}=={i['metadata']['version']}" for i in installed)


def main() -> None:
    pins = resolve(RESOLVE_PYTHON, [*NODE_PACKAGES, *TORCH_REQUIREMENTS])
    for version in CHECK_PYTHONS:
        resolve(version, pins)  # the same pins must install there too
    header = [
        "# The node lock: exact versions for every node's venv (besides torch, whose exact build comes from",
        "# provision/versions.toml). Written by `python -m provision.node_lock`; resolved for Python "
        f"{RESOLVE_PYTHON}, checked for {', '.join(CHECK_PYTHONS)}.",
        f"# Top level: {' '.join(NODE_PACKAGES)}; and torch's requirements.",
    ]
    lock_path().write_text("\n".join([*header, *pins]) + "\n")
    print(f"wrote {len(pins)} pins to {lock_path()}")


if __name__ == "__main__":
    main()
