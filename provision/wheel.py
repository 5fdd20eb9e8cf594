"""Our code as a wheel: built on the controller once per source tree, shipped to every node.

The source fingerprint covers every file the wheel would contain, so a changed tree is re-shipped
and an unchanged one is not (the workload step compares it with what the node has).
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from provision.errors import ProvisionError

logger = logging.getLogger(__name__)

PACKAGES = ("infra", "provision", "workloads", "images")
SUFFIXES = (".py", ".csv", ".toml", ".json", ".yaml", ".txt")


def project_root() -> Path:
    """The source tree this package runs from (an editable install or a checkout)."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "pyproject.toml").exists():
        raise ProvisionError(f"cannot ship the workload code: no pyproject.toml at {root} "
                             "(gpuforge must run from a source checkout or an editable install)")
    return root


def source_files(root: Path) -> list[Path]:
    files = [root / "pyproject.toml"]
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*")):
            if path.is_file() and path.suffix in SUFFIXES and "__pycache__" not in path.parts:
                files.append(path)
    return files


def source_fingerprint(root: Path | None = None) -> str:
    root = root or project_root()
    h = hashlib.sha256()
    for path in source_files(root):
        h.update(path.relative_to(root).as_posix().encode())
        h.update(b"\0")
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def wheel_filename(root: Path | None = None) -> str:
    """The file name pip gives our wheel (PEP 427), from pyproject's name and version."""
    import tomllib

    project = tomllib.loads(((root or project_root()) / "pyproject.toml").read_text())["project"]
    return f"{project['name'].replace('-', '_')}-{project['version']}-py3-none-any.whl"


def wheel_cache(home: Path) -> Path:
    return Path(home).expanduser() / "wheels"


def build_wheel(home: Path, fingerprint: str | None = None) -> Path:
    """The wheel for the current source tree, built once and cached under <home>/wheels/<fp>/."""
    root = project_root()
    fingerprint = fingerprint or source_fingerprint(root)
    out = wheel_cache(home) / fingerprint
    existing = sorted(out.glob("gpuforge-*.whl"))
    if existing:
        return existing[-1]
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gpuforge-wheel-") as scratch:
        # Build from a copy of exactly the fingerprinted files: a stale build/ in the checkout
        # (setuptools reuses it) must never put deleted modules into the wheel.
        source = Path(scratch) / "src"
        for path in [*source_files(root), root / "README.md"]:
            if path.exists():
                target = source / path.relative_to(root)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target)
        built = Path(scratch) / "dist"
        cmd = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(built), str(source)]
        result = subprocess.run(cmd, capture_output=True, text=True, cwd=scratch)
        if result.returncode != 0:
            raise ProvisionError(f"building the gpuforge wheel failed: {' '.join(cmd)}\n{result.stderr[-2000:]}")
        for wheel in built.glob("gpuforge-*.whl"):
            shutil.move(str(wheel), out / wheel.name)
    return sorted(out.glob("gpuforge-*.whl"))[-1]
