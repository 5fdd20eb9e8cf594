"""CUDA toolkit and system NCCL at the pinned versions, held.

PyTorch wheels bring their own CUDA runtime and NCCL; the toolkit (nvcc, headers) and the system NCCL
serve extensions built on the node and tools such as nccl-tests.
"""

from __future__ import annotations

from typing import Any

from provision.steps.base import Cmd, Step, StepContext, fingerprint_of
from provision.steps.gpu_common import apt_hold, apt_install, pinned, probe, sh, versions_for
from provision.versions import VersionSet

NCCL_PACKAGES = ("libnccl2", "libnccl-dev")


def nvcc_path(vs: VersionSet) -> str:
    return f"/usr/local/cuda-{vs.cuda}/bin/nvcc"


class CudaToolkitStep(Step):
    name = "cuda-toolkit"
    description = "CUDA toolkit and NCCL (pinned, held)"
    gpu = True

    def fingerprint(self, ctx: StepContext) -> str:
        vs = versions_for(ctx)
        return fingerprint_of(self.name, vs.cuda_toolkit_package, vs.cuda_toolkit, vs.nccl_deb_version)

    def probe_sections(self, ctx: StepContext) -> dict[str, str]:
        vs = versions_for(ctx)
        names = " ".join((vs.cuda_toolkit_package, *NCCL_PACKAGES))
        return {
            "pkgs": f"dpkg-query -W -f='${{Package}}=${{Version}}\\n' {names} 2>/dev/null",
            "nvcc": f"{nvcc_path(vs)} --version 2>/dev/null",
        }

    def check(self, conn: Any, ctx: StepContext) -> bool:
        vs = versions_for(ctx)
        out = probe(conn, self.probe_sections(ctx))
        installed = dict(line.split("=", 1) for line in out.get("pkgs", "").splitlines() if "=" in line)
        return (
            installed.get(vs.cuda_toolkit_package, "").startswith(vs.cuda_toolkit + "-")
            and all(installed.get(p) == vs.nccl_deb_version for p in NCCL_PACKAGES)
            and f"release {vs.cuda}" in out.get("nvcc", "")
        )

    def plan(self, ctx: StepContext) -> list[Cmd]:
        vs = versions_for(ctx)
        nccl = vs.nccl_deb_version
        return [
            apt_install(
                pinned(vs.cuda_toolkit_package, vs.cuda_toolkit),
                *(f"{p}={nccl}" for p in NCCL_PACKAGES),
                desc=f"CUDA toolkit {vs.cuda_toolkit} and NCCL {nccl}",
            ),
            apt_hold(vs.cuda_toolkit_package, *NCCL_PACKAGES),
            sh(f'{nvcc_path(vs)} --version | grep -q "release {vs.cuda}" && '
               f'[ "$(dpkg-query -W -f="\\${{Version}}" libnccl2)" = "{nccl}" ]',
               desc=f"verify: nvcc is CUDA {vs.cuda} and libnccl2 is {nccl}"),
        ]
