"""GDRCopy on EFA instance types, as the EC2 User Guide's "Get started with EFA and NCCL" does it before the
EFA installer: build GDRCopy's .deb packages from the pinned NVIDIA/gdrcopy release against the node's CUDA
toolkit, install them with apt (gdrdrv-dkms builds the gdrdrv kernel module), hold them, load gdrdrv.
"""

from __future__ import annotations

from typing import Any

from provision.steps.base import Cmd, Step, StepContext, fingerprint_of
from provision.steps.cuda import cuda_on_node
from provision.steps.efa import EfaStep
from provision.steps.gpu_common import CACHE_DIR, apt_hold, apt_install, probe, sh, versions_for

RELEASE_URL = "https://github.com/NVIDIA/gdrcopy/archive/refs/tags/v{version}.tar.gz"
PACKAGES = ("gdrdrv-dkms", "libgdrapi", "gdrcopy-tests", "gdrcopy")
# What packages/build-deb-packages.sh needs (the EC2 guide's apt line for GDRCopy).
BUILD_DEPS = ("build-essential", "devscripts", "debhelper", "check", "libsubunit-dev", "fakeroot", "pkg-config", "dkms")


class GdrcopyStep(Step):
    name = "gdrcopy"
    description = "GDRCopy (gdrdrv kernel module and libgdrapi) at the pinned release, held (EFA types)"
    gpu = True

    def skip_reason(self, ctx: StepContext) -> str | None:
        reason = EfaStep().skip_reason(ctx)
        return reason.replace("EFA interface", "EFA interface (GDRCopy serves NCCL over EFA)") if reason else None

    def fingerprint(self, ctx: StepContext) -> str:
        return fingerprint_of(self.name, versions_for(ctx).gdrcopy)

    @staticmethod
    def probe_sections(ctx: StepContext | None = None) -> dict[str, str]:
        return {"pkgs": f"dpkg-query -W -f='${{Package}}=${{Version}}\\n' {' '.join(PACKAGES)} 2>/dev/null"}

    def check(self, conn: Any, ctx: StepContext) -> bool:
        want = versions_for(ctx).gdrcopy
        out = probe(conn, self.probe_sections(ctx))
        found = dict(line.split("=", 1) for line in out.get("pkgs", "").splitlines() if "=" in line)
        return all(found.get(p, "").startswith(want + "-") for p in PACKAGES)

    def plan(self, ctx: StepContext) -> list[Cmd]:
        version = versions_for(ctx).gdrcopy
        cuda = cuda_on_node(ctx).toolkit_dir if cuda_on_node(ctx).toolkit else f"/usr/local/cuda-{versions_for(ctx).cuda}"
        tarball, source = f"{CACHE_DIR}/gdrcopy-{version}.tar.gz", f"{CACHE_DIR}/gdrcopy-{version}"
        debs = tuple(f"{source}/packages/{p}_{version}-*.deb" for p in PACKAGES)  # globbed by the root shell
        return [
            apt_install(*BUILD_DEPS, desc="what GDRCopy's package build needs"),
            Cmd(f"install -d -m 0755 {CACHE_DIR}", sudo=True, desc="root-owned download directory"),
            Cmd(f"curl -fsSL --retry 3 -o {tarball} {RELEASE_URL.format(version=version)}", sudo=True,
                desc=f"GDRCopy {version} source release"),
            sh(f"rm -rf {source} && tar -xzf {tarball} -C {CACHE_DIR}", sudo=True, desc="unpack"),
            sh(f"cd {source}/packages && CUDA={cuda} ./build-deb-packages.sh", sudo=True,
               desc=f"build the .deb packages against {cuda}", timeout=1200.0),
            apt_install(desc="install them (DKMS builds gdrdrv for the running kernel)", raw=debs),
            apt_hold(*PACKAGES),
            Cmd("modprobe gdrdrv", sudo=True, desc="load gdrdrv now (its package loads it at boot)"),
        ]
