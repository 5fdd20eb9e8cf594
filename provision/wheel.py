"""Our code as a wheel: built on the controller once per source tree, shipped to every node.

From a source checkout (or an editable install) the wheel is built from the tree with pip; when
gpuforge itself was installed from a wheel (`pip install gpuforge`, no pyproject.toml around), the
node wheel is written from the installed files of the distribution. Either way the fingerprint
covers every file the wheel contains, so changed code is re-shipped and unchanged code is not
(the workload step compares it with what the node has).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import zipfile
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from provision.errors import ProvisionError

logger = logging.getLogger(__name__)

PACKAGES = ("infra", "provision", "workloads", "images")
SUFFIXES = (".py", ".csv", ".toml", ".json", ".yaml")


DIST = "gpuforge"


def checkout_root() -> Path | None:
    """The source tree this package runs from (a checkout or an editable install), or None when installed."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").exists() and (root / "provision").is_dir() else None


def project_root() -> Path:
    root = checkout_root()
    if root is None:
        raise ProvisionError(f"{Path(__file__).resolve().parents[1]} is not a source checkout (gpuforge is installed)")
    return root


def installed_files() -> list[tuple[str, Path]]:
    """(path in the wheel, file) of every module and data file of the installed distribution."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution(DIST)
    except PackageNotFoundError as exc:
        raise ProvisionError("cannot ship the workload code: gpuforge is neither a source checkout nor installed") from exc
    out = []
    for f in dist.files or []:
        parts = Path(str(f)).parts
        if parts and parts[0] in PACKAGES and f.suffix in SUFFIXES and "__pycache__" not in parts:
            out.append((Path(str(f)).as_posix(), Path(dist.locate_file(f))))
    if not out:
        raise ProvisionError("cannot ship the workload code: the installed gpuforge lists no files")
    return sorted(out)


def package_version() -> str:
    """gpuforge's version: pyproject's in a checkout, the installed distribution's otherwise."""
    import tomllib

    root = checkout_root()
    if root is not None:
        return tomllib.loads((root / "pyproject.toml").read_text())["project"]["version"]
    return installed_version()


def installed_version() -> str:
    from importlib.metadata import version

    return version(DIST)


def source_files(root: Path) -> list[Path]:
    files = [root / "pyproject.toml"]
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*")):
            if path.is_file() and path.suffix in SUFFIXES and "__pycache__" not in path.parts:
                files.append(path)
    return files


def source_fingerprint(root: Path | None = None) -> str:
    root = root or checkout_root()
    h = hashlib.sha256()
    if root is None:
        h.update(installed_version().encode() + b"\0")
        for rel, path in installed_files():
            h.update(rel.encode() + b"\0" + path.read_bytes())
        return h.hexdigest()[:16]
    for path in source_files(root):
        h.update(path.relative_to(root).as_posix().encode())
        h.update(b"\0")
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def wheel_filename(root: Path | None = None) -> str:
    """The file name pip gives our wheel (PEP 427), from pyproject's name and version."""
    import tomllib

    root = root or checkout_root()
    if root is None:
        return f"{DIST}-{installed_version()}-py3-none-any.whl"
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    return f"{project['name'].replace('-', '_')}-{project['version']}-py3-none-any.whl"


def wheel_cache(home: Path) -> Path:
    return Path(home).expanduser() / "wheels"


def build_wheel(home: Path, fingerprint: str | None = None) -> Path:
    """The wheel for the current source tree, built once and cached under <home>/wheels/<fp>/."""
    root = checkout_root()
    fingerprint = fingerprint or source_fingerprint(root)
    out = wheel_cache(home) / fingerprint
    existing = sorted(out.glob("gpuforge-*.whl"))
    if existing:
        return existing[-1]
    out.mkdir(parents=True, exist_ok=True)
    if root is None:
        return write_installed_wheel(out)
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


def record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def write_installed_wheel(out: Path) -> Path:
    """A wheel (PEP 427) of the installed distribution's files, with its own metadata and entry points."""
    from importlib.metadata import distribution

    dist = distribution(DIST)
    version = installed_version()
    info = f"{DIST}-{version}.dist-info"
    entries: list[tuple[str, bytes]] = [(rel, path.read_bytes()) for rel, path in installed_files()]
    entries.append((f"{info}/METADATA", (dist.read_text("METADATA") or f"Metadata-Version: 2.1\nName: {DIST}\n"
                                                                     f"Version: {version}\n").encode()))
    entries.append((f"{info}/WHEEL", b"Wheel-Version: 1.0\nGenerator: gpuforge\nRoot-Is-Purelib: true\nTag: py3-none-any\n"))
    if dist.read_text("entry_points.txt"):
        entries.append((f"{info}/entry_points.txt", dist.read_text("entry_points.txt").encode()))
    record = "".join(f"{name},{record_hash(data)},{len(data)}\n" for name, data in entries) + f"{info}/RECORD,,\n"
    target = out / f"{DIST}-{version}-py3-none-any.whl"
    tmp = target.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as whl:
        for name, data in entries:
            whl.writestr(name, data)
        whl.writestr(f"{info}/RECORD", record)
    tmp.replace(target)
    return target
