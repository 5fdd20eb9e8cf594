"""What a run ran on, recorded in its summary.json: torch and its CUDA/NCCL, the NVIDIA driver, Python, and
the node lock (provision/data/node-requirements.txt) with any installed package that differs from it.

    >>> env = node_environment()
    >>> sorted(env)   # doctest: +NORMALIZE_WHITESPACE
    ['cuda', 'driver', 'lock', 'nccl', 'python', 'torch']
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import platform
import re
from importlib import resources
from pathlib import Path
from typing import Any

LOCK_RESOURCE = ("provision", "data/node-requirements.txt")  # a data file of the installed package
NVIDIA_VERSION_FILE = Path("/proc/driver/nvidia/version")


def lock_requirements(text: str | None = None) -> list[str]:
    """`name==version` lines of the node lock."""
    if text is None:
        package, name = LOCK_RESOURCE
        text = (resources.files(package) / name).read_text()
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def lock_digest(requirements: list[str] | None = None) -> str:
    """sha256 of the requirement lines (comments aside), 16 hex digits."""
    return hashlib.sha256("\n".join(requirements or lock_requirements()).encode()).hexdigest()[:16]


def lock_state() -> dict[str, Any]:
    """The lock's digest, and the packages whose installed version is not the locked one."""
    try:
        pins = lock_requirements()
    except (OSError, ModuleNotFoundError):
        return {"digest": "", "differs": {}}
    differs = {}
    for pin in pins:
        name, _, want = pin.partition("==")
        try:
            have = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            have = ""
        if have != want:
            differs[name] = {"locked": want, "installed": have or None}
    return {"digest": lock_digest(pins), "differs": differs}


def driver_version() -> str:
    """The loaded NVIDIA driver (`580.167.08`), "" without one."""
    try:
        match = re.search(r"NVRM version:.*?\b(\d{3,}\.\d+(?:\.\d+)?)\b", NVIDIA_VERSION_FILE.read_text())
    except OSError:
        return ""
    return match.group(1) if match else ""


def node_environment() -> dict[str, Any]:
    import torch

    nccl = ""
    if torch.cuda.is_available() and hasattr(torch.cuda, "nccl"):
        version = torch.cuda.nccl.version()
        nccl = ".".join(str(v) for v in version) if isinstance(version, tuple) else str(version)
    return {"torch": torch.__version__, "cuda": torch.version.cuda or "", "nccl": nccl, "driver": driver_version(),
            "python": platform.python_version(), "lock": lock_state()}
