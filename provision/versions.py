"""The tested version matrix: driver, CUDA, NCCL, PyTorch, EFA and Fabric Manager per supported OS.

The data lives in provision/versions.toml (with the source of every number); this module loads it,
validates it where it is declared, and answers the questions the GPU steps ask:

    >>> vs = version_set("ubuntu-22.04")
    >>> vs.driver_version, vs.cuda, vs.torch
    ('580.167.08', '13.0', '2.13.0')
    >>> cpu_versions().torch
    '2.13.0'

The matrix constrains GPU stacks only: a CPU node runs the `[cpu]` torch build on any Debian or Ubuntu
release whose python3 torch supports (provision/support.py). What a GPU node keeps of its existing driver,
and which torch build follows from it, is decided in provision/drivers.py (choose_driver, torch_requirement);
this module imports nothing from there.
"""

from __future__ import annotations

import functools
import re
import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path

from provision.errors import MatrixError

VERSIONS_FILE = Path(__file__).resolve().parent / "versions.toml"
TORCH_INDEX_BASE = "https://download.pytorch.org/whl"
CUDA_REPO_BASE = "https://developer.download.nvidia.com/compute/cuda/repos"
# The keyring package NVIDIA's install guides use for the CUDA network repository (same name for every distro).
CUDA_KEYRING_DEB = "cuda-keyring_1.1-1_all.deb"
NCCL_ENV_FILE = "/etc/gpuforge/nccl.env"
"""NCCL/libfabric environment for EFA nodes; the launcher sources it (when present) before torchrun."""

# CUDA minor-version compatibility: the oldest driver that runs any toolkit of a CUDA major
# (CUDA Compatibility guide, "CUDA Toolkit 11.x, 12.x, and 13.x Driver Version Ranges"; 13.x: >= 580,
# 580.65.06 being the driver CUDA 13.0 GA shipped with).
MIN_DRIVER_FOR_CUDA_MAJOR = {11: "450.80.02", 12: "525.60.13", 13: "580.65.06"}
# Compute capabilities each PyTorch CUDA wheel carries kernels for (pytorch/pytorch RELEASE.md, "PyTorch CUDA
# Support Matrix"; .ci/manywheel/build_cuda.sh TORCH_CUDA_ARCH_LIST): cu126 sm_50..sm_90 (no Blackwell: CUDA 12.6
# predates sm_100), cu130 sm_75..sm_120 (CUDA 13 dropped Maxwell, Pascal and Volta).
TORCH_BUILD_ARCHS = {"cu126": ("5.0", "9.0"), "cu130": ("7.5", "12.0")}
# GCP image families: 1-63 chars, lowercase letters, digits and hyphens, starting with a letter
# (Compute Engine API, Image.family / RFC1035 names).
IMAGE_FAMILY_RE = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")


@dataclass(frozen=True)
class GpuGeneration:
    name: str
    compute_capability: str
    open_modules: bool
    """NVIDIA open kernel modules run on Turing and newer (required from Blackwell on); Maxwell, Pascal
    and Volta need the proprietary modules ("NVIDIA Transitions Fully Towards Open-Source GPU Kernel
    Modules", NVIDIA technical blog, July 2024)."""
    legacy_torch: bool = False
    """PyTorch's CUDA 13 wheels dropped this generation; it runs the CUDA 12.6 build instead."""
    supported: bool = True
    """R580 drives it (Kepler left the driver after R470)."""


GENERATIONS = {
    "Kepler": GpuGeneration("Kepler", "3.7", open_modules=False, legacy_torch=True, supported=False),
    "Maxwell": GpuGeneration("Maxwell", "5.2", open_modules=False, legacy_torch=True),
    "Pascal": GpuGeneration("Pascal", "6.0", open_modules=False, legacy_torch=True),
    "Volta": GpuGeneration("Volta", "7.0", open_modules=False, legacy_torch=True),
    "Turing": GpuGeneration("Turing", "7.5", open_modules=True),
    "Ampere": GpuGeneration("Ampere", "8.0", open_modules=True),
    "Ada": GpuGeneration("Ada", "8.9", open_modules=True),
    "Hopper": GpuGeneration("Hopper", "9.0", open_modules=True),
    "Blackwell": GpuGeneration("Blackwell", "10.0", open_modules=True),
}
# Short GPU names as the catalog writes them -> generation. nvidia-smi and lspci names
# ("NVIDIA A100-SXM4-40GB", "GA100 [A100 SXM4 40GB]", "Tesla T4") contain one of these as a word.
GPU_FAMILIES = {
    "K80": "Kepler",
    "M60": "Maxwell",
    "P100": "Pascal", "P40": "Pascal", "P4": "Pascal",
    "V100": "Volta",
    "T4": "Turing",
    "A100": "Ampere", "A10G": "Ampere", "A10": "Ampere",
    "L4": "Ada", "L40": "Ada", "L40S": "Ada",
    "H100": "Hopper", "H200": "Hopper",
    "B200": "Blackwell",
}
# GPUs the matrix knows but gpuforge does not set up, and why. HGX B200 has fourth-generation NVSwitches: Fabric
# Manager there needs NVIDIA's NVLink subnet manager (nvlsm) and the ib_umad module, which no step installs yet
# (NVIDIA Fabric Manager User Guide, "NVLink 5 / fifth-generation NVLink systems").
UNSUPPORTED_FAMILIES = {
    "B200": "HGX B200 (fourth-generation NVSwitch) needs the NVLink subnet manager (nvlsm) and ib_umad for Fabric "
            "Manager, which gpuforge does not install yet; use an A100, H100 or H200 type (p4d, p5, p5e, a3)",
}


def gpu_family(model: str) -> str:
    """`NVIDIA A100-SXM4-40GB` / `GA100 [A100 SXM4 40GB]` / `A100` -> `A100`; "" when unknown."""
    words = re.split(r"[^A-Z0-9]+", model.upper())
    for word in words:
        if word in GPU_FAMILIES:
            return word
    return ""


def gpu_generation(model: str) -> GpuGeneration:
    family = gpu_family(model)
    if not family:
        known = ", ".join(GPU_FAMILIES)
        raise MatrixError(f"unknown GPU model {model!r}: the version matrix knows {known}")
    if family in UNSUPPORTED_FAMILIES:
        raise MatrixError(f"{family} is not supported: {UNSUPPORTED_FAMILIES[family]}")
    generation = GENERATIONS[GPU_FAMILIES[family]]
    if not generation.supported:
        raise MatrixError(
            f"{family} ({generation.name}) is not supported by the R580 driver the matrix pins; "
            "choose an instance type with a Maxwell or newer GPU"
        )
    return generation


def open_kernel_modules(gpu_model: str) -> bool:
    """True when the node should run NVIDIA's open kernel modules (Turing and newer)."""
    return gpu_generation(gpu_model).open_modules


def parse_version(version: str) -> tuple[int, ...]:
    """`580.167.08` -> (580, 167, 8); non-numeric parts end the tuple."""
    out = []
    for part in version.split("."):
        if not part.isdigit():
            break
        out.append(int(part))
    return tuple(out)


def cuda_of_build(build: str) -> str:
    """`cu126` -> `12.6`, `cu130` -> `13.0`."""
    digits = build.removeprefix("cu")
    return f"{digits[:-1]}.{digits[-1]}"


def min_driver_for_cuda(cuda: str) -> str:
    """Oldest driver that runs CUDA `cuda` (minor-version compatibility), e.g. `12.8` -> `525.60.13`."""
    major = parse_version(cuda)[:1]
    if not major or major[0] not in MIN_DRIVER_FOR_CUDA_MAJOR:
        known = ", ".join(f"{m}.x" for m in MIN_DRIVER_FOR_CUDA_MAJOR)
        raise MatrixError(f"no driver requirement known for CUDA {cuda!r}; known: {known}")
    return MIN_DRIVER_FOR_CUDA_MAJOR[major[0]]


@dataclass(frozen=True)
class VersionSet:
    """One tested combination (a row of provision/versions.toml)."""

    os_name: str
    cuda_repo: str
    python: str
    driver_branch: str
    driver_version: str
    fabric_manager: str
    cuda: str
    cuda_toolkit: str
    nccl: str
    torch: str
    torch_cuda: str
    torch_cuda_legacy: str
    cuda_toolkit_legacy: str
    nccl_legacy: str
    efa_installer: str
    aws_ofi_nccl: str
    gdrcopy: str

    def __post_init__(self) -> None:
        where = f"versions.toml [{self.os_name}]"
        if self.fabric_manager != self.driver_version:
            raise MatrixError(
                f"{where}: fabric_manager {self.fabric_manager} must equal driver_version {self.driver_version}"
            )
        if not self.driver_version.startswith(self.driver_branch + "."):
            raise MatrixError(f"{where}: driver_version {self.driver_version} is not on branch {self.driver_branch}")
        if parse_version(self.driver_version) < parse_version(min_driver_for_cuda(self.cuda)):
            raise MatrixError(
                f"{where}: driver {self.driver_version} is older than CUDA {self.cuda} needs "
                f"({min_driver_for_cuda(self.cuda)})"
            )
        if not self.cuda_toolkit.startswith(self.cuda + "."):
            raise MatrixError(f"{where}: cuda_toolkit {self.cuda_toolkit} is not a CUDA {self.cuda} release")
        if self.torch_cuda != "cu" + self.cuda.replace(".", ""):
            raise MatrixError(f"{where}: torch_cuda {self.torch_cuda} does not match CUDA {self.cuda}")
        for tag in (self.torch_cuda, self.torch_cuda_legacy):
            if tag not in TORCH_BUILD_ARCHS:
                raise MatrixError(f"{where}: torch build {tag} is not one of {', '.join(TORCH_BUILD_ARCHS)}")
        if not self.cuda_toolkit_legacy.startswith(cuda_of_build(self.torch_cuda_legacy) + "."):
            raise MatrixError(
                f"{where}: cuda_toolkit_legacy {self.cuda_toolkit_legacy} is not a CUDA "
                f"{cuda_of_build(self.torch_cuda_legacy)} release ({self.torch_cuda_legacy})"
            )

    # -- apt packages and repository -------------------------------------------------------------------
    @property
    def cuda_repo_url(self) -> str:
        return f"{CUDA_REPO_BASE}/{self.cuda_repo}/x86_64/"

    @property
    def cuda_keyring_url(self) -> str:
        return self.cuda_repo_url + CUDA_KEYRING_DEB

    @property
    def cuda_toolkit_package(self) -> str:
        """`cuda-toolkit-13-0`: the toolkit of one CUDA minor release, without a driver."""
        return "cuda-toolkit-" + self.cuda.replace(".", "-")

    @property
    def nccl_deb_version(self) -> str:
        """`2.28.9-1+cuda13.0`: how the CUDA repository versions libnccl2/libnccl-dev."""
        return f"{self.nccl}-1+cuda{self.cuda}"

    @property
    def fabric_manager_package(self) -> str:
        return f"nvidia-fabricmanager-{self.driver_branch}"

    def open_kernel_modules(self, gpu_model: str) -> bool:
        return open_kernel_modules(gpu_model)

    def driver_package(self, gpu_model: str) -> str:
        """The branch meta package: `nvidia-open-580` (open modules) or `cuda-drivers-580` (proprietary),
        as NVIDIA's driver installation guide and AWS's EFA/NCCL guide name them for Ubuntu."""
        if self.open_kernel_modules(gpu_model):
            return f"nvidia-open-{self.driver_branch}"
        return f"cuda-drivers-{self.driver_branch}"

    # -- PyTorch ---------------------------------------------------------------------------------------
    def torch_cuda_tag(self, gpu_model: str) -> str:
        """`cu130`, or `cu126` for GPUs the CUDA 13 wheels dropped (Volta, Pascal, Maxwell)."""
        return self.torch_cuda_legacy if gpu_generation(gpu_model).legacy_torch else self.torch_cuda

    def torch_builds(self, gpu_model: str = "") -> list[str]:
        """The matrix's torch CUDA builds that carry kernels for this GPU, the tested one first:
        `['cu130', 'cu126']` on Turing..Hopper, `['cu126']` on Volta and older, `['cu130']` on Blackwell."""
        builds = [self.torch_cuda, *([self.torch_cuda_legacy] if self.torch_cuda_legacy != self.torch_cuda else [])]
        if not gpu_model:
            return builds
        preferred = self.torch_cuda_tag(gpu_model)
        capability = parse_version(gpu_generation(gpu_model).compute_capability)
        usable = [b for b in builds if parse_version(TORCH_BUILD_ARCHS[b][0]) <= capability
                  <= parse_version(TORCH_BUILD_ARCHS[b][1])]
        return sorted(usable, key=lambda b: b != preferred)

    def for_torch_build(self, build: str) -> VersionSet:
        """This row with the CUDA stack (toolkit, NCCL) that goes with torch build `build` (cu130 or cu126)."""
        if build == self.torch_cuda:
            return self
        if build != self.torch_cuda_legacy:
            raise MatrixError(f"torch build {build} is not in the matrix ({self.torch_cuda}, {self.torch_cuda_legacy})")
        return replace(self, cuda=cuda_of_build(build), cuda_toolkit=self.cuda_toolkit_legacy, nccl=self.nccl_legacy,
                       torch_cuda=build)

    def with_driver(self, driver_version: str) -> VersionSet:
        """This row around a driver the node already runs: Fabric Manager must then equal that driver."""
        if driver_version == self.driver_version:
            return self
        branch = str(parse_version(driver_version)[0])
        return replace(self, driver_branch=branch, driver_version=driver_version, fabric_manager=driver_version)

    def torch_index_url(self, gpu_model: str = "") -> str:
        tag = self.torch_cuda_tag(gpu_model) if gpu_model else self.torch_cuda
        return f"{TORCH_INDEX_BASE}/{tag}"

    def torch_spec(self, gpu_model: str = "") -> str:
        """`torch==2.13.0+cu130`: the exact build (CUDA tag included) this node gets."""
        tag = self.torch_cuda_tag(gpu_model) if gpu_model else self.torch_cuda
        return f"torch=={self.torch}+{tag}"

    def torch_cuda_version(self, gpu_model: str = "") -> str:
        """What `torch.version.cuda` reports for the build this node gets: `13.0` or `12.6`."""
        return cuda_of_build(self.torch_cuda_tag(gpu_model) if gpu_model else self.torch_cuda)


@functools.cache
def load_matrix(path: Path = VERSIONS_FILE) -> dict[str, VersionSet]:
    """OS name -> VersionSet, from the TOML data file."""
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise MatrixError(f"cannot read the version matrix {path}: {exc}") from exc
    names = {f.name for f in fields(VersionSet)} - {"os_name"}
    matrix = {}
    for os_name, row in data.get("os", {}).items():
        unknown, missing = sorted(set(row) - names), sorted(names - set(row))
        if unknown or missing:
            raise MatrixError(f"{path.name} [{os_name}]: unknown keys {unknown}, missing keys {missing}")
        matrix[os_name] = VersionSet(os_name=os_name, **{k: str(v) for k, v in row.items()})
    if not matrix:
        raise MatrixError(f"{path} defines no [os.\"...\"] tables")
    return matrix


def supported_os() -> list[str]:
    return sorted(load_matrix())


def version_set(os_name: str) -> VersionSet:
    matrix = load_matrix()
    if os_name not in matrix:
        shown = os_name or "an unknown OS"
        raise MatrixError(f"no tested version combination for {shown}; supported: {', '.join(sorted(matrix))}")
    return matrix[os_name]


@dataclass(frozen=True)
class CpuVersions:
    """The `[cpu]` table: the torch build every CPU node gets, and the python3 releases it supports."""

    torch: str
    python_min: str
    python_max: str

    @property
    def torch_spec(self) -> str:
        """`torch==2.13.0+cpu`: the exact build, local label included (PEP 440 ignores a label only when the
        specifier has none, so `torch==2.13.0` would accept a CUDA build that is already there)."""
        return f"torch=={self.torch}+cpu"

    @property
    def torch_index_url(self) -> str:
        return f"{TORCH_INDEX_BASE}/cpu"

    def supports_python(self, version: str) -> bool:
        minor = parse_version(version)[:2]
        return parse_version(self.python_min)[:2] <= minor <= parse_version(self.python_max)[:2]


@functools.cache
def cpu_versions(path: Path = VERSIONS_FILE) -> CpuVersions:
    try:
        row = tomllib.loads(path.read_text()).get("cpu")
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise MatrixError(f"cannot read the version matrix {path}: {exc}") from exc
    names = {f.name for f in fields(CpuVersions)}
    if not isinstance(row, dict) or set(row) != names:
        raise MatrixError(f"{path.name} [cpu] needs exactly the keys {sorted(names)}")
    return CpuVersions(**{k: str(v) for k, v in row.items()})


@dataclass(frozen=True)
class NodeDriver:
    """The NVIDIA driver a node runs before setup, as its facts show it."""

    version: str = ""
    packaging: str = ""
    """`apt`, `runfile` (NVIDIA's .run installer), or "" (no driver, or from somewhere else)."""
    flavor: str = ""
    """`open` / `proprietary` kernel modules ("" when unknown)."""
    gpus_visible: bool = True
    """nvidia-smi lists every NVIDIA GPU on the PCI bus."""

    @classmethod
    def from_facts(cls, facts: object) -> NodeDriver:
        """From a provision.facts.Facts (duck-typed: this module does not import facts)."""
        gpus, on_bus = getattr(facts, "gpus", ()), getattr(facts, "gpu_pci_count", 0)
        return cls(getattr(facts, "driver_version", ""), getattr(facts, "driver_packaging", ""),
                   getattr(facts, "driver_flavor", ""), bool(gpus) and len(gpus) >= on_bus)

    def describe(self) -> str:
        """`driver 570.172.08 (NVIDIA .run installer, open kernel modules)`."""
        how = {"apt": "apt", "runfile": "NVIDIA .run installer"}.get(self.packaging, "not from apt")
        modules = f", {self.flavor} kernel modules" if self.flavor else ""
        return f"driver {self.version} ({how}{modules})"


def image_family(os_name: str, gpu_model: str = "") -> str:
    """GCP image family (and AWS AMI name prefix) for images baked from this row for this GPU, e.g.
    `gpuforge-ubuntu2204-cu130-torch213` (`-cu126-` for Volta and older, which CUDA 13 dropped)."""
    vs = version_set(os_name)
    if gpu_model:
        vs = vs.for_torch_build(vs.torch_cuda_tag(gpu_model))
    os_part = re.sub(r"[^a-z0-9]", "", os_name.lower())
    torch_part = "".join(str(p) for p in parse_version(vs.torch)[:2])
    family = f"gpuforge-{os_part}-cu{vs.cuda.replace('.', '')}-torch{torch_part}"
    if not IMAGE_FAMILY_RE.match(family):
        raise MatrixError(f"image family {family!r} breaks GCP naming rules ({IMAGE_FAMILY_RE.pattern})")
    return family


def matrix_table() -> list[dict[str, str]]:
    """One dict per supported OS, for the README table and `fab setup --dry-run`."""
    rows = []
    for os_name in supported_os():
        vs = version_set(os_name)
        legacy = vs.for_torch_build(vs.torch_cuda_legacy)
        rows.append({
            "os": os_name,
            "driver": f"{vs.driver_version} (R{vs.driver_branch}; open modules on Turing+, proprietary on Volta and older)",
            "fabric_manager": vs.fabric_manager,
            "cuda": f"{vs.cuda} ({vs.cuda_toolkit}); {legacy.cuda} ({legacy.cuda_toolkit}) with {legacy.torch_cuda}",
            "nccl": f"{vs.nccl_deb_version}; {legacy.nccl_deb_version} with {legacy.torch_cuda}",
            "torch": f"{vs.torch} ({vs.torch_cuda}; {vs.torch_cuda_legacy} on Volta/Pascal/Maxwell and with a kept "
                     "pre-R580 driver)",
            "torch_index_url": vs.torch_index_url(),
            "efa_installer": vs.efa_installer,
            "aws_ofi_nccl": vs.aws_ofi_nccl,
            "gdrcopy": vs.gdrcopy,
            "python": vs.python,
            "image_family": image_family(os_name),
        })
    return rows


def matrix_markdown() -> str:
    """The matrix as a Markdown table (README)."""
    rows = matrix_table()
    keys = ["os", "driver", "fabric_manager", "cuda", "nccl", "torch", "efa_installer", "aws_ofi_nccl", "gdrcopy", "python"]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(row[k] for k in keys) + " |" for row in rows]
    return "\n".join(lines)
