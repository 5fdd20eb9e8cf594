"""The tested version matrix: driver, CUDA, NCCL, PyTorch, EFA and Fabric Manager per supported OS.

The data lives in provision/versions.toml (with the source of every number); this module loads it,
validates it where it is declared, and answers the questions the GPU steps ask:

    >>> vs = version_set("ubuntu-22.04")
    >>> vs.driver_version, vs.cuda, vs.torch
    ('580.167.08', '13.0', '2.13.0')
    >>> torch_requirement("ubuntu-22.04", has_gpu=True)
    ('torch==2.13.0', 'https://download.pytorch.org/whl/cu130')
    >>> check_driver("570.172.08", vs)        # an apt-installed older driver
    'upgrade'
"""

from __future__ import annotations

import functools
import re
import tomllib
from dataclasses import dataclass, fields
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
    efa_installer: str
    aws_ofi_nccl: str

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

    def torch_index_url(self, gpu_model: str = "") -> str:
        tag = self.torch_cuda_tag(gpu_model) if gpu_model else self.torch_cuda
        return f"{TORCH_INDEX_BASE}/{tag}"

    def torch_cuda_version(self, gpu_model: str = "") -> str:
        """What `torch.version.cuda` reports for the build this node gets: `13.0` or `12.6`."""
        tag = self.torch_cuda_tag(gpu_model) if gpu_model else self.torch_cuda
        digits = tag.removeprefix("cu")
        return f"{digits[:-1]}.{digits[-1]}"


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


def torch_requirement(os_name: str, has_gpu: bool, gpu_model: str = "") -> tuple[str, str | None]:
    """(`torch==X`, wheel index URL) for a node: the CUDA build on GPU nodes (the CUDA 12.6 build for
    Volta/Pascal/Maxwell when `gpu_model` says so), the CPU build elsewhere."""
    vs = version_set(os_name)
    if not has_gpu:
        return f"torch=={vs.torch}", f"{TORCH_INDEX_BASE}/cpu"
    return f"torch=={vs.torch}", vs.torch_index_url(gpu_model)


def check_driver(existing: str, vs: VersionSet, packaging: str = "") -> str:
    """What to do with the node's current driver: `ok` (it is the pinned one) or `upgrade` (none yet, or an
    older apt-installed one: the driver step installs the pinned version and reboots).

    Raises MatrixError when the present driver cannot be replaced in place: it came from NVIDIA's .run
    installer or another non-apt source, or it is on a newer branch than the matrix (a downgrade).
    `packaging` is Facts.driver_packaging: "apt", "runfile", or "" when unknown.
    """
    if not existing:
        return "upgrade"
    if existing == vs.driver_version:
        return "ok"
    if packaging == "runfile":
        raise MatrixError(
            f"NVIDIA driver {existing} was installed with NVIDIA's .run installer (a Deep Learning AMI/VM?); "
            f"gpuforge installs the tested {vs.driver_version} from apt and cannot replace a runfile driver in "
            "place. Use a plain Ubuntu image or a gpuforge baked image, or remove it with "
            "`sudo nvidia-uninstall` and run setup again."
        )
    if packaging != "apt":
        raise MatrixError(
            f"NVIDIA driver {existing} is loaded but no apt package provides it; gpuforge installs the tested "
            f"{vs.driver_version} from apt and will not overwrite a driver it cannot account for. Use a plain "
            "Ubuntu image or a gpuforge baked image."
        )
    if parse_version(existing)[:1] > parse_version(vs.driver_version)[:1]:
        raise MatrixError(
            f"NVIDIA driver {existing} is on a newer branch than the tested R{vs.driver_branch} "
            f"({vs.driver_version}); gpuforge does not downgrade drivers across branches. Use a plain Ubuntu "
            "image or a gpuforge baked image."
        )
    return "upgrade"


def image_family(os_name: str) -> str:
    """GCP image family (and AWS AMI name prefix) for images baked from this row, e.g.
    `gpuforge-ubuntu2204-cu130-torch213`."""
    vs = version_set(os_name)
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
        rows.append({
            "os": os_name,
            "driver": f"{vs.driver_version} (R{vs.driver_branch}; open modules on Turing+, proprietary on Volta and older)",
            "fabric_manager": vs.fabric_manager,
            "cuda": f"{vs.cuda} ({vs.cuda_toolkit})",
            "nccl": vs.nccl_deb_version,
            "torch": f"{vs.torch} ({vs.torch_cuda}; {vs.torch_cuda_legacy} on Volta/Pascal/Maxwell)",
            "torch_index_url": vs.torch_index_url(),
            "efa_installer": vs.efa_installer,
            "aws_ofi_nccl": vs.aws_ofi_nccl,
            "python": vs.python,
            "image_family": image_family(os_name),
        })
    return rows


def matrix_markdown() -> str:
    """The matrix as a Markdown table (README)."""
    rows = matrix_table()
    keys = ["os", "driver", "fabric_manager", "cuda", "nccl", "torch", "efa_installer", "aws_ofi_nccl", "python"]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(row[k] for k in keys) + " |" for row in rows]
    return "\n".join(lines)
