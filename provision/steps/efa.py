"""EFA step: the AWS EFA installer (libfabric, EFA driver, aws-ofi-nccl plugin), ptrace, NCCL environment.

Follows the EC2 User Guide, "Get started with EFA and NCCL" (EFA installer 1.50.0 edition): download the
installer tarball, verify its GPG signature against AWS's published key fingerprint, run
`efa_installer.sh -y --mpi=openmpi5 --check-signatures`; libfabric lands in /opt/amazon/efa and the
aws-ofi-nccl plugin in /opt/amazon/ofi-nccl. An installer at or above the pinned one that already ran (Deep
Learning AMIs ship one) is kept: the step then only sets ptrace and writes the NCCL environment.
"""

from __future__ import annotations

from typing import Any

from provision.facts import parse_efa_installer
from provision.steps.base import Cmd, Step, StepContext, fingerprint_of
from provision.drivers import KEPT
from provision.steps.gpu_common import CACHE_DIR, at_least, catalog_row, efa_rdma, probe, sh, versions_for, write_file
from provision.versions import NCCL_ENV_FILE

EFA_BASE_URL = "https://efa-installer.amazonaws.com"
# EC2 User Guide, "Verify the EFA installer": the GPG key fingerprint the installer signature must match.
EFA_KEY_FINGERPRINT = "4E9091BCBB97A96B26B15E59A05480B1DD2D3CCC"
EFA_KEY_FILE = f"{CACHE_DIR}/aws-efa-installer.key"
EFA_DIR = f"{CACHE_DIR}/aws-efa-installer"
FI_INFO = "/opt/amazon/efa/bin/fi_info"
EFA_REBOOT_REQUEST = "Please reboot to complete the installation"  # efa_installer.sh's closing banner
# Ubuntu ships /etc/sysctl.d/10-ptrace.conf with ptrace_scope = 1; a later file overrides it without
# editing a distro conffile. ptrace_scope=0 lets libfabric's shared-memory provider use cross-memory
# attach between a job's processes (EC2 User Guide, "Get started with EFA and MPI": disable ptrace protection).
PTRACE_SYSCTL_FILE = "/etc/sysctl.d/99-gpuforge-ptrace.conf"
# Where the EFA installer puts the plugin on Ubuntu (older releases: lib/x86_64-linux-gnu) and libfabric.
NCCL_LIBRARY_PATH = "/opt/amazon/ofi-nccl/lib/x86_64-linux-gnu:/opt/amazon/ofi-nccl/lib:/opt/amazon/efa/lib"


def nccl_env(rdma: bool) -> dict[str, str]:
    """The NCCL/libfabric variables for EFA nodes, per aws-ofi-nccl doc/efa-env-var.md:
    FI_PROVIDER=efa makes libfabric use EFA (and fail loudly rather than fall back to TCP);
    FI_EFA_USE_DEVICE_RDMA=1 only where GPUDirect RDMA exists (p4/p5; implied since aws-ofi-nccl 1.7,
    harmless to set). NCCL_PROTO is left unset: `NCCL_PROTO=simple` is only for aws-ofi-nccl <= 1.5.0,
    and forcing it slows small messages on the 1.21 plugin the matrix pins."""
    env = {"FI_PROVIDER": "efa"}
    if rdma:
        env["FI_EFA_USE_DEVICE_RDMA"] = "1"
    env["LD_LIBRARY_PATH"] = NCCL_LIBRARY_PATH + "${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    return env


def nccl_env_lines(rdma: bool) -> list[str]:
    """The contents of NCCL_ENV_FILE (shell syntax: the launcher sources it)."""
    lines = [
        "# gpuforge: NCCL over EFA (provision/steps/efa.py); sourced by the launcher before torchrun.",
        "# NCCL_PROTO stays unset: aws-ofi-nccl doc/efa-env-var.md wants NCCL_PROTO=simple only for plugin <= 1.5.0.",
    ]
    lines += [f'export {key}="{value}"' for key, value in nccl_env(rdma).items()]
    return lines


class EfaStep(Step):
    name = "efa"
    description = "EFA software (libfabric, driver, aws-ofi-nccl), ptrace for CMA, NCCL environment"
    gpu = True

    def skip_reason(self, ctx: StepContext) -> str | None:
        reason = super().skip_reason(ctx)
        if reason:
            return reason
        row = catalog_row(ctx)
        devices = ctx.facts.efa_count if ctx.facts else 0
        if devices == 0 and not (row and row.efa_interfaces > 0):
            return "no EFA interface on this node or its instance type"
        return None

    def fingerprint(self, ctx: StepContext) -> str:
        vs = versions_for(ctx)
        return fingerprint_of(self.name, vs.efa_installer, vs.aws_ofi_nccl, nccl_env_lines(efa_rdma(ctx)))

    def probe_sections(self, ctx: StepContext) -> dict[str, str]:
        return {
            "installer": "head -n 3 /opt/amazon/efa_installed_packages 2>/dev/null",
            "fi": f"{FI_INFO} -p efa -t FI_EP_RDM >/dev/null 2>&1 && echo ok",
            "ptrace": "cat /proc/sys/kernel/yama/ptrace_scope 2>/dev/null",
            "env": f"cat {NCCL_ENV_FILE} 2>/dev/null",
        }

    def check(self, conn: Any, ctx: StepContext) -> bool:
        vs = versions_for(ctx)
        out = probe(conn, self.probe_sections(ctx))
        return (
            at_least(parse_efa_installer(out.get("installer", "")), vs.efa_installer)
            and out.get("fi") == "ok"
            and out.get("ptrace") == "0"
            and out.get("env", "").splitlines() == nccl_env_lines(efa_rdma(ctx))
        )

    def installer_kept(self, ctx: StepContext) -> bool:
        """The node already ran an EFA installer at or above the pinned one."""
        return ctx.facts is not None and at_least(ctx.facts.efa_installer, versions_for(ctx).efa_installer)

    def existing_note(self, ctx: StepContext) -> str:
        found, want = (ctx.facts.efa_installer if ctx.facts else ""), versions_for(ctx).efa_installer
        if not found:
            return ""
        if self.installer_kept(ctx):
            return f"{KEPT}: EFA installer {found} (>= {want})"
        return f"EFA installer {found} is older than {want}: the {want} installer runs"

    def plan(self, ctx: StepContext) -> list[Cmd]:
        env_dir = NCCL_ENV_FILE.rsplit("/", 1)[0]
        kept = self.installer_kept(ctx)
        cmds = [
            write_file(PTRACE_SYSCTL_FILE, ["kernel.yama.ptrace_scope = 0"], desc="allow cross-memory attach at boot"),
            Cmd("sysctl -w kernel.yama.ptrace_scope=0", sudo=True, desc="and now"),
            Cmd(f"install -d -m 0755 {env_dir}", sudo=True, desc="gpuforge configuration directory"),
            write_file(NCCL_ENV_FILE, nccl_env_lines(efa_rdma(ctx)), desc="NCCL environment the launcher sources"),
        ]
        if not kept:
            # The installer reloads the EFA module itself and says "Please reboot to complete the installation"
            # only when it could not (efa_installer.sh NEED_REBOOT); the driver step's reboot came before.
            cmds += [*self.plan_installer(ctx),
                     Cmd("reboot", sudo=True, reboot=True, reboot_when=EFA_REBOOT_REQUEST,
                         desc="only if the installer asked for it (setup waits for SSH, then continues)")]
        cmds.append(sh(
            f"{FI_INFO} -p efa -t FI_EP_RDM >/dev/null || "
            '{ echo "no EFA device answers: launch the instance with EFA network interfaces" >&2; exit 1; }; '
            "ls /opt/amazon/ofi-nccl/lib/x86_64-linux-gnu/libnccl-net*.so /opt/amazon/ofi-nccl/lib/libnccl-net*.so "
            '2>/dev/null | grep -q . || { echo "aws-ofi-nccl plugin missing under /opt/amazon/ofi-nccl" >&2; exit 1; }',
            desc="verify: libfabric sees the EFA devices and the NCCL plugin is installed"))
        return cmds

    def plan_installer(self, ctx: StepContext) -> list[Cmd]:
        """Download, verify and run the pinned EFA installer."""
        vs = versions_for(ctx)
        tarball = f"aws-efa-installer-{vs.efa_installer}.tar.gz"
        local = f"{CACHE_DIR}/{tarball}"
        return [
            Cmd(f"install -d -m 0755 {CACHE_DIR}", sudo=True, desc="root-owned download directory"),
            Cmd(f"curl -fsSL --retry 3 -o {local} {EFA_BASE_URL}/{tarball}", sudo=True,
                desc=f"EFA installer {vs.efa_installer} (bundles aws-ofi-nccl {vs.aws_ofi_nccl})"),
            Cmd(f"curl -fsSL --retry 3 -o {local}.sig {EFA_BASE_URL}/{tarball}.sig", sudo=True,
                desc="its GPG signature"),
            Cmd(f"curl -fsSL --retry 3 -o {EFA_KEY_FILE} {EFA_BASE_URL}/aws-efa-installer.key", sudo=True,
                desc="AWS's EFA signing key"),
            sh(f'export GNUPGHOME="$(mktemp -d)" && gpg --batch --quiet --import {EFA_KEY_FILE} && '
               f'gpg --batch --status-fd 1 --verify {local}.sig {local} | grep -q "VALIDSIG .*{EFA_KEY_FINGERPRINT}"; '
               'rc=$?; rm -rf "$GNUPGHOME"; exit $rc',
               desc=f"verify: signed by the key with fingerprint {EFA_KEY_FINGERPRINT}"),
            Cmd(f"rm -rf {EFA_DIR}", sudo=True, desc="no leftovers from an older installer"),
            Cmd(f"tar -xzf {local} -C {CACHE_DIR}", sudo=True, desc="unpack"),
            sh(f"cd {EFA_DIR} && EFA_INSTALLER_KEY={EFA_KEY_FILE} ./efa_installer.sh -y --mpi=openmpi5 --check-signatures",
               sudo=True, desc="install libfabric, the EFA driver, aws-ofi-nccl and Open MPI 5 (packages signature-checked)",
               timeout=1800.0),
        ]
