"""CUDA toolkit and system NCCL at the pinned versions, held; or the ones the image already has.

PyTorch wheels bring their own CUDA runtime and NCCL; the toolkit (nvcc, headers) and the system NCCL
serve extensions built on the node and tools such as nccl-tests. A Deep Learning AMI/VM ships toolkits
under /usr/local/cuda-X.Y (NCCL built inside them on AWS): one of the same CUDA major as the node's torch
build, at or above the matrix's toolkit for that build, is kept, and so is an NCCL at or above the pinned
one beside it (or from apt, built for that CUDA major). Toolkits apt installed stay on the exact pin.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from provision.drivers import KEPT
from provision.facts import (
    CUDA_PACKAGES_PROBE,
    CUDA_TOOLKITS_PROBE,
    NCCL_PROBE,
    nccl_library_version,
    parse_cuda_toolkits,
    parse_nccl_libraries,
)
from provision.steps.base import Cmd, Step, StepContext, fingerprint_of
from provision.steps.gpu_common import apt_hold, apt_install, at_least, pinned, probe, sh, versions_for
from provision.versions import VersionSet, parse_version

if TYPE_CHECKING:
    from provision.facts import Facts

NCCL_PACKAGES = ("libnccl2", "libnccl-dev")
# A version.json patch number this large is a build date (runfile toolkits write `12.6.20241114`), not a
# patch release; such a toolkit counts as any patch of its minor release.
DATE_STAMPED_PATCH = 10_000
NCCL_DEB_RE = re.compile(r"^(\d+\.\d+\.\d+)-\d+\+cuda(\d+)\.\d+")  # `2.26.2-1+cuda12.8`


def nvcc_path(vs: VersionSet) -> str:
    return f"/usr/local/cuda-{vs.cuda}/bin/nvcc"


@dataclass(frozen=True)
class CudaOnNode:
    """What the node keeps of the CUDA stack it already has ("" where apt installs the pinned one)."""

    toolkit: str = ""
    nccl: str = ""

    @property
    def toolkit_dir(self) -> str:
        return "/usr/local/cuda-" + ".".join(self.toolkit.split(".")[:2])

    @property
    def complete(self) -> bool:
        return bool(self.toolkit and self.nccl)


def toolkit_at_least(found: str, wanted: str) -> bool:
    """`12.8.1` >= `12.6.3`; a toolkit known only as `12.6`, or with a date-stamped patch, counts as any 12.6."""
    have, want = parse_version(found), parse_version(wanted)
    if have[:2] != want[:2]:
        return have[:2] > want[:2]
    return len(have) < 3 or have[2] >= DATE_STAMPED_PATCH or have[2:] >= want[2:]


def existing_cuda(vs: VersionSet, toolkits: tuple[str, ...], packages: tuple[str, ...],
                  nccl_libraries: tuple[str, ...]) -> CudaOnNode:
    """The newest toolkit not from apt, of vs.cuda's major and at least vs.cuda_toolkit, and an NCCL at least
    vs.nccl inside it (or apt's libnccl2 + libnccl-dev built for that CUDA major)."""
    from_apt = {p.split("=")[0].removeprefix("cuda-toolkit-").replace("-", ".")
                for p in packages if p.startswith("cuda-toolkit-")}
    major = parse_version(vs.cuda)[0]
    usable = [t for t in toolkits if ".".join(t.split(".")[:2]) not in from_apt
              and parse_version(t)[0] == major and toolkit_at_least(t, vs.cuda_toolkit)]
    if not usable:
        return CudaOnNode()
    kept = CudaOnNode(toolkit=max(usable, key=parse_version))
    inside = [nccl_library_version(p) for p in nccl_libraries if p.startswith(kept.toolkit_dir + "/")]
    good = [v for v in inside if at_least(v, vs.nccl)]
    if good:
        return CudaOnNode(kept.toolkit, max(good, key=parse_version))
    debs = dict(p.split("=", 1) for p in packages if "=" in p)
    match = NCCL_DEB_RE.match(debs.get("libnccl2", ""))
    if match and int(match[2]) == major and at_least(match[1], vs.nccl) and "libnccl-dev" in debs:
        return CudaOnNode(kept.toolkit, match[1])
    return kept


def cuda_on_node(ctx: StepContext) -> CudaOnNode:
    facts: Facts | None = ctx.facts
    if facts is None:
        return CudaOnNode()
    return existing_cuda(versions_for(ctx), facts.cuda_toolkits, facts.cuda_packages, facts.nccl_libraries)


def cuda_installs(ctx: StepContext) -> bool:
    """Will the cuda-toolkit step install anything from NVIDIA's repository on this node?"""
    return not cuda_on_node(ctx).complete


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
            "toolkits": CUDA_TOOLKITS_PROBE,
            "nccl": NCCL_PROBE,
            "cuda-pkgs": CUDA_PACKAGES_PROBE,
        }

    def check(self, conn: Any, ctx: StepContext) -> bool:
        vs = versions_for(ctx)
        out = probe(conn, self.probe_sections(ctx))
        installed = dict(line.split("=", 1) for line in out.get("pkgs", "").splitlines() if "=" in line)
        apt_nccl = all(installed.get(p) == vs.nccl_deb_version for p in NCCL_PACKAGES)
        debs = tuple(line[3:].strip() for line in out.get("cuda-pkgs", "").splitlines() if line.startswith("ii"))
        live = existing_cuda(vs, parse_cuda_toolkits(out.get("toolkits", "")), debs,
                             parse_nccl_libraries(out.get("nccl", "")))
        if live.toolkit:
            return bool(live.nccl) or apt_nccl
        return (
            installed.get(vs.cuda_toolkit_package, "").startswith(vs.cuda_toolkit + "-")
            and apt_nccl
            and f"release {vs.cuda}" in out.get("nvcc", "")
        )

    def existing_note(self, ctx: StepContext) -> str:
        kept, vs = cuda_on_node(ctx), versions_for(ctx)
        if not kept.toolkit:
            return ""
        nccl = (f"NCCL {kept.nccl}" if kept.nccl
                else f"no NCCL >= {vs.nccl} beside it (apt installs {vs.nccl_deb_version})")
        return (f"{KEPT}: CUDA {kept.toolkit} in {kept.toolkit_dir} (torch {vs.torch}+{vs.torch_cuda} wants "
                f">= {vs.cuda_toolkit}), {nccl}")

    def plan(self, ctx: StepContext) -> list[Cmd]:
        vs = versions_for(ctx)
        nccl = vs.nccl_deb_version
        kept = cuda_on_node(ctx)
        if kept.toolkit:
            return self.plan_kept(vs, kept)
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

    @staticmethod
    def plan_kept(vs: VersionSet, kept: CudaOnNode) -> list[Cmd]:
        """The image's toolkit stays; NCCL too when it has a new enough one, else apt adds the pinned one."""
        release = ".".join(kept.toolkit.split(".")[:2])
        check_toolkit = f'{kept.toolkit_dir}/bin/nvcc --version | grep -q "release {release}"'
        if kept.nccl:
            return [sh(f"{check_toolkit} && ls {kept.toolkit_dir}/lib*/libnccl.so.2* /usr/lib/x86_64-linux-gnu/"
                       "libnccl.so.2* 2>/dev/null | grep -q .",
                       desc=f"verify: the image's CUDA {kept.toolkit} and NCCL {kept.nccl} are there (kept)")]
        nccl = vs.nccl_deb_version
        return [
            apt_install(*(f"{p}={nccl}" for p in NCCL_PACKAGES), desc=f"NCCL {nccl} beside the image's CUDA {release}"),
            apt_hold(*NCCL_PACKAGES),
            sh(f'{check_toolkit} && [ "$(dpkg-query -W -f="\\${{Version}}" libnccl2)" = "{nccl}" ]',
               desc=f"verify: the image's CUDA {kept.toolkit} is there and libnccl2 is {nccl}"),
        ]
