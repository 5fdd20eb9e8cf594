"""What setup does with the NVIDIA driver a node already has, and the version set that follows from it.

    >>> from provision.versions import version_set
    >>> vs = version_set("ubuntu-22.04")
    >>> choose_driver(vs, "A10G", NodeDriver("570.172.08", "runfile", "open")).versions.torch_cuda
    'cu126'
    >>> torch_requirement("ubuntu-22.04", True, "A10G", NodeDriver("570.172.08", "runfile"))  # a DLAMI's R570
    ('torch==2.13.0+cu126', 'https://download.pytorch.org/whl/cu126')

The rules (issue 5: "A node that already has a matching stack skips what is already right, and says so";
"a driver older than the PyTorch build needs is upgraded or refused with a clear message"):

- no driver: apt installs the matrix's driver (`install`);
- an apt driver: the matrix's version is kept (apt switches the kernel modules when they are the wrong
  flavour); an older one is upgraded to it; a newer one that runs the matrix's torch build is kept;
- a driver apt does not manage (NVIDIA's .run installer, as Deep Learning AMIs/VMs ship it) cannot be
  replaced in place: it is kept when it runs one of the matrix's torch builds for this GPU (the tested
  cu130 first, else cu126: then the CUDA toolkit and NCCL follow that build), and refused otherwise with
  what to do.

A kept driver makes the node's VersionSet differ from the matrix row: driver and Fabric Manager are the
node's driver version, and CUDA/NCCL/torch are those of the chosen torch build. Every GPU step reads that
set (provision/steps/gpu_common.py versions_for), and python_env installs the same torch build
(torch_requirement), so gpu-verify checks what was installed.
"""

from __future__ import annotations

from dataclasses import dataclass

from provision.errors import MatrixError
from provision.versions import (
    NodeDriver,
    VersionSet,
    cpu_versions,
    cuda_of_build,
    min_driver_for_cuda,
    open_kernel_modules,
    parse_version,
    version_set,
)

INSTALL, KEEP = "install", "keep"
KEPT = "already in place on this node"
"""What the runner reports for a step whose check passes without a marker; the notes below say it too."""
UNINSTALL_RUNFILE = "sudo /usr/bin/nvidia-uninstall --silent"  # the uninstaller NVIDIA's .run installer leaves


@dataclass(frozen=True)
class DriverChoice:
    action: str
    """`install` (apt installs the matrix's driver, reboot included) or `keep` (the node's driver stays)."""
    versions: VersionSet
    """The combination this node runs once set up."""
    note: str
    """One line for plans and logs: what was found, and what follows from it."""

    @property
    def keeps(self) -> bool:
        return self.action == KEEP


def wanted_flavor(gpu_model: str) -> str:
    """`open` or `proprietary` kernel modules for this GPU ("" when the model is not known)."""
    if not gpu_model:
        return ""
    return "open" if open_kernel_modules(gpu_model) else "proprietary"


def runs_build(driver: str, build: str) -> bool:
    """Can `driver` run torch's `build` (cu126, cu130)? CUDA minor-version compatibility: any driver at or
    above the CUDA major's minimum."""
    return parse_version(driver) >= parse_version(min_driver_for_cuda(cuda_of_build(build)))


def needs(build: str, torch: str) -> str:
    """`torch 2.13.0+cu130 (CUDA 13.0 needs driver >= 580.65.06)`."""
    cuda = cuda_of_build(build)
    return f"torch {torch}+{build} (CUDA {cuda} needs driver >= {min_driver_for_cuda(cuda)})"


def choose_driver(vs: VersionSet, gpu_model: str, node: NodeDriver) -> DriverChoice:
    """Install, keep, or refuse (MatrixError) the node's driver; see the module docstring for the rules."""
    builds = vs.torch_builds(gpu_model)  # MatrixError for GPUs the matrix does not know or support
    if not builds:
        raise MatrixError(f"no torch build of the matrix ({vs.torch_cuda}, {vs.torch_cuda_legacy}) runs on {gpu_model}")
    tested = vs.for_torch_build(builds[0])
    if not node.version:
        return DriverChoice(INSTALL, tested, f"no NVIDIA driver loaded: apt installs {vs.driver_version}")
    if node.packaging == "apt":
        return choose_apt_driver(vs, tested, builds[0], gpu_model, node)
    return choose_foreign_driver(vs, builds, node)


def choose_apt_driver(vs: VersionSet, tested: VersionSet, build: str, gpu_model: str, node: NodeDriver) -> DriverChoice:
    found, flavor = node.describe(), wanted_flavor(gpu_model)
    if node.version == vs.driver_version:
        if node.flavor and flavor and node.flavor != flavor:
            return DriverChoice(INSTALL, tested, f"{found} on {gpu_model}: apt switches to {flavor} kernel modules")
        return DriverChoice(KEEP, tested, f"{KEPT}: {found}, the tested version")
    if parse_version(node.version) < parse_version(vs.driver_version):
        return DriverChoice(INSTALL, tested, f"{found} is older than the tested {vs.driver_version}: apt upgrades it")
    if node.gpus_visible and runs_build(node.version, build):
        return DriverChoice(KEEP, tested.with_driver(node.version),
                            f"{KEPT}: {found} is newer than the tested {vs.driver_version} and runs "
                            f"{needs(build, vs.torch)}")
    if parse_version(node.version)[:1] == parse_version(vs.driver_version)[:1]:
        return DriverChoice(INSTALL, tested, f"{found} does not show every GPU: apt moves it to {vs.driver_version}")
    raise MatrixError(
        f"NVIDIA {found} is on a newer branch than the tested R{vs.driver_branch} ({vs.driver_version}) and "
        f"nvidia-smi does not list every GPU; gpuforge does not downgrade drivers across branches. Repair or "
        "purge it (`sudo apt-get purge 'nvidia-*' 'libnvidia-*'`, reboot), or use a plain Ubuntu image or a "
        "gpuforge baked image."
    )


def choose_foreign_driver(vs: VersionSet, builds: list[str], node: NodeDriver) -> DriverChoice:
    """A driver apt cannot replace (runfile, or of unknown origin): keep it when it can, else say what to do."""
    found = node.describe()
    if node.packaging == "runfile":
        remedy = (f"Remove it with `{UNINSTALL_RUNFILE}`, reboot and run setup again (gpuforge then installs the "
                  f"tested {vs.driver_version} from apt), or start the node from a plain Ubuntu image or a "
                  "gpuforge baked image (`gpuforge bake`).")
    else:
        remedy = ("Remove it, or start the node from a plain Ubuntu image or a gpuforge baked image (`gpuforge bake`); "
                  "gpuforge installs its drivers with apt and will not overwrite one it cannot account for.")
    if not node.gpus_visible:
        raise MatrixError(f"NVIDIA {found} is loaded but nvidia-smi does not list every GPU, and gpuforge cannot "
                          f"replace a driver apt did not install. {remedy}")
    for build in builds:
        if not runs_build(node.version, build):
            continue
        versions = vs.for_torch_build(build).with_driver(node.version)
        if build == builds[0]:
            return DriverChoice(KEEP, versions, f"{KEPT}: {found} runs {needs(build, vs.torch)}")
        return DriverChoice(KEEP, versions,
                            f"{KEPT}: {found} is too old for {needs(builds[0], vs.torch)} and apt cannot replace "
                            f"it, so this node gets {needs(build, vs.torch)} and the CUDA {versions.cuda} stack")
    wanted = " or ".join(needs(b, vs.torch) for b in builds)
    raise MatrixError(f"NVIDIA {found} is too old for {wanted}, and gpuforge cannot replace a driver apt did not "
                      f"install. {remedy}")


def torch_requirement(
    os_name: str, has_gpu: bool, gpu_model: str = "", existing_driver: str | NodeDriver = ""
) -> tuple[str, str]:
    """(`torch==X+build`, the PyTorch wheel index of that build) for a node: the `[cpu]` build without a GPU (on
    any OS: provision/support.py decides which run it); on GPU nodes the CUDA build the node's driver will run
    after setup (choose_driver): the matrix's cu130, or cu126 for Volta/Pascal/Maxwell and for nodes that keep
    an existing pre-R580 driver (a Deep Learning AMI/VM).

    `existing_driver` is Facts.existing_driver (a NodeDriver); a bare version string is taken as a driver
    apt does not manage (NVIDIA's .run installer, as Deep Learning AMIs/VMs ship), which setup keeps."""
    if not has_gpu:
        cpu = cpu_versions()
        return cpu.torch_spec, cpu.torch_index_url
    vs = version_set(os_name)
    node = existing_driver if isinstance(existing_driver, NodeDriver) else NodeDriver(existing_driver)
    if node.version:
        vs = choose_driver(vs, gpu_model, node).versions
    return vs.torch_spec(gpu_model), vs.torch_index_url(gpu_model)
