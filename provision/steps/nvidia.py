"""NVIDIA apt repository, driver, and Fabric Manager steps.

Order on a fresh Ubuntu VM (what `fab setup --dry-run` prints):
  nvidia-repo     CUDA network repository keyring, a version pin for every NVIDIA driver package, apt update
  nvidia-driver   nouveau off, kernel headers, the pinned driver (open or proprietary modules), hold,
                  reboot when the loaded driver changes, persistence daemon, then check what loaded
  fabric-manager  NVSwitch systems only: nvidia-fabricmanager-<branch> at exactly the driver's version

On a node that already runs a driver (a Deep Learning AMI/VM, a baked image) provision/drivers.py decides
whether it stays; a kept driver is not touched (persistence aside), Fabric Manager follows its version, and
nvidia-repo is skipped when nothing is left to install from NVIDIA's repository.
"""

from __future__ import annotations

from typing import Any

from provision.drivers import KEPT, DriverChoice
from provision.errors import MatrixError
from provision.facts import FABRIC_MANAGER_PROBE, parse_driver_flavor, parse_fabric_manager
from provision.steps.base import Cmd, Step, StepContext, fingerprint_of
from provision.steps.cuda import cuda_installs
from provision.steps.apt import apt_update
from provision.steps.gpu_common import (
    CACHE_DIR,
    apt_hold,
    apt_install,
    catalog_row,
    driver_choice,
    gpu_model_of,
    pinned,
    probe,
    sh,
    versions_for,
    write_file,
)
from provision.versions import CUDA_KEYRING_DEB, VersionSet

APT_PIN_FILE = "/etc/apt/preferences.d/gpuforge-nvidia-driver"
NOUVEAU_BLACKLIST = "/etc/modprobe.d/blacklist-nouveau.conf"
# The two lines NVIDIA's driver installation guide puts in blacklist-nouveau.conf.
NOUVEAU_LINES = ["blacklist nouveau", "options nouveau modeset=0"]
KEYRING_PACKAGE = "cuda-keyring"


def pin_lines(vs: VersionSet) -> list[str]:
    """apt preferences that keep every driver-versioned NVIDIA package (including the packages the meta
    package pulls in, and Fabric Manager) at the driver's version (the tested one, or the one a node keeps):
    priority 1001 also wins over newer ones."""
    return [
        f"Explanation: gpuforge keeps NVIDIA driver packages at {vs.driver_version}, the driver this node runs",
        "Package: nvidia-* libnvidia-* cuda-drivers* xserver-xorg-video-nvidia*",
        f"Pin: version {vs.driver_version}-*",
        "Pin-Priority: 1001",
    ]


class NvidiaRepoStep(Step):
    name = "nvidia-repo"
    description = "NVIDIA CUDA apt repository and driver version pin"
    gpu = True

    def skip_reason(self, ctx: StepContext) -> str | None:
        reason = super().skip_reason(ctx)
        if reason or ctx.facts is None or repo_users(ctx):
            return reason
        fabric_manager = ", Fabric Manager" if FabricManagerStep().skip_reason(ctx) is None else ""
        return f"nothing to install from NVIDIA's repository: the node's driver{fabric_manager} and CUDA stack are kept"

    def fingerprint(self, ctx: StepContext) -> str:
        vs = versions_for(ctx)
        return fingerprint_of(self.name, vs.cuda_keyring_url, pin_lines(vs))

    def probe_sections(self, ctx: StepContext) -> dict[str, str]:
        return {
            "keyring": f"dpkg-query -W -f='${{Status}}' {KEYRING_PACKAGE} 2>/dev/null",
            "sources": f"grep -rhs '{versions_for(ctx).cuda_repo_url.rstrip('/')}' /etc/apt/sources.list.d/",
            "pin": f"cat {APT_PIN_FILE} 2>/dev/null",
        }

    def check(self, conn: Any, ctx: StepContext) -> bool:
        vs = versions_for(ctx)
        out = probe(conn, self.probe_sections(ctx))
        return (
            out.get("keyring", "").endswith("installed")
            and bool(out.get("sources"))
            and out.get("pin", "").splitlines() == pin_lines(vs)
        )

    def plan(self, ctx: StepContext) -> list[Cmd]:
        vs = versions_for(ctx)
        deb = f"{CACHE_DIR}/{CUDA_KEYRING_DEB}"
        return [
            Cmd(f"install -d -m 0755 {CACHE_DIR}", sudo=True, desc="root-owned download directory"),
            Cmd(f"curl -fsSL --retry 3 -o {deb} {vs.cuda_keyring_url}", sudo=True,
                desc="NVIDIA's CUDA repository keyring (the signing key and the apt source)"),
            apt_install(deb, desc="install the keyring (apt waits for the dpkg lock; plain dpkg -i would not)"),
            write_file(APT_PIN_FILE, pin_lines(vs), desc=f"pin NVIDIA driver packages to {vs.driver_version}"),
            apt_update(desc="read the new repository"),
        ]


def repo_users(ctx: StepContext) -> list[str]:
    """The steps that will install packages from NVIDIA's repository on this node (judged from its facts)."""
    users = []
    if not driver_choice(ctx).keeps:
        users.append(NvidiaDriverStep.name)
    fabric_manager = FabricManagerStep()
    if fabric_manager.skip_reason(ctx) is None and fabric_manager.installs(ctx):
        users.append(fabric_manager.name)
    if cuda_installs(ctx):
        users.append("cuda-toolkit")
    return users


def expected_flavor(ctx: StepContext) -> str:
    return "open" if versions_for(ctx).open_kernel_modules(gpu_model_of(ctx)) else "proprietary"


def running_flavor(ctx: StepContext, choice: DriverChoice) -> str:
    """The kernel modules the node should run after this step: a kept driver's own, else the matrix's."""
    if choice.keeps and ctx.facts is not None and ctx.facts.driver_flavor:
        return ctx.facts.driver_flavor
    return expected_flavor(ctx)


def driver_state(ctx: StepContext) -> DriverChoice:
    """Keep or install (driver_choice); MatrixError when the node's driver can be neither, or when Secure Boot
    would block the DKMS modules apt would build."""
    choice = driver_choice(ctx)
    if not choice.keeps and ctx.facts is not None and ctx.facts.secure_boot:
        raise MatrixError(
            "UEFI Secure Boot is on: the NVIDIA modules built by DKMS are unsigned and would not load. "
            "Turn Secure Boot off for GPU nodes (GCP: --no-shielded-secure-boot; AWS: a non-UEFI-Secure-Boot AMI)."
        )
    return choice


def persistence_on(out: dict[str, str]) -> bool:
    """The persistence daemon runs, or (images without its unit) every GPU has persistence mode on."""
    modes = [line.strip() for line in out.get("pm", "").splitlines() if line.strip()]
    return out.get("persistenced") == "active" or (bool(modes) and all(m == "Enabled" for m in modes))


class NvidiaDriverStep(Step):
    name = "nvidia-driver"
    description = "NVIDIA driver (pinned branch and version, held), persistence daemon"
    gpu = True

    def fingerprint(self, ctx: StepContext) -> str:
        vs = versions_for(ctx)
        return fingerprint_of(self.name, vs.driver_version, vs.driver_package(gpu_model_of(ctx)))

    def probe_sections(self, ctx: StepContext) -> dict[str, str]:
        return {
            "smi": "nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null",
            "proc": "cat /proc/driver/nvidia/version 2>/dev/null",
            "persistenced": "systemctl is-active nvidia-persistenced 2>/dev/null",
            "pm": "nvidia-smi --query-gpu=persistence_mode --format=csv,noheader 2>/dev/null",
        }

    def check(self, conn: Any, ctx: StepContext) -> bool:
        choice = driver_choice(ctx)
        out = probe(conn, self.probe_sections(ctx))
        loaded = {v.strip() for v in out.get("smi", "").splitlines() if v.strip()}
        flavor = parse_driver_flavor(out.get("proc", ""))
        return (loaded == {choice.versions.driver_version} and flavor == running_flavor(ctx, choice)
                and persistence_on(out))

    def existing_note(self, ctx: StepContext) -> str:
        """What this step found on the node and what it does with it ("" on a node without a driver)."""
        return driver_choice(ctx).note if ctx.facts is not None and ctx.facts.driver_version else ""

    def plan(self, ctx: StepContext) -> list[Cmd]:
        choice = driver_state(ctx)
        vs = choice.versions
        if choice.keeps:
            return self.plan_persistence(vs, daemon_unit=ctx.facts is None or ctx.facts.driver_packaging == "apt")
        package = vs.driver_package(gpu_model_of(ctx))
        flavor = expected_flavor(ctx)
        return [
            write_file(NOUVEAU_BLACKLIST, NOUVEAU_LINES, desc="keep the nouveau driver off the GPUs"),
            Cmd("update-initramfs -u", sudo=True, desc="apply the blacklist at boot", timeout=600.0),
            apt_install(desc="headers for the running kernel (DKMS builds the NVIDIA modules against them)",
                        raw=("linux-headers-$(uname -r)",)),
            apt_install(pinned(package, vs.driver_version),
                        desc=f"NVIDIA driver {vs.driver_version}, {flavor} kernel modules"),
            apt_hold(package),
            Cmd("reboot", sudo=True, reboot=True,
                desc="load the new driver (setup waits for SSH to come back, then continues)"),
            *self.plan_persistence(vs),
        ]

    @staticmethod
    def plan_persistence(vs: VersionSet, daemon_unit: bool = True) -> list[Cmd]:
        """Persistence daemon (apt drivers ship its unit; a .run-installed driver may not, so fall back to
        the driver's persistence mode), then check that every GPU runs the expected driver."""
        want = vs.driver_version
        if daemon_unit:
            persistence = Cmd("systemctl enable --now nvidia-persistenced", sudo=True,
                              desc="persistence daemon: keeps the GPUs initialised between jobs")
        else:
            persistence = sh("systemctl enable --now nvidia-persistenced 2>/dev/null || nvidia-smi -pm 1", sudo=True,
                             desc="keep the GPUs initialised between jobs: the persistence daemon where the image "
                                  "has its unit, else the driver's persistence mode")
        return [
            persistence,
            sh(f'v=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader | sort -u); '
               f'[ "$v" = "{want}" ] || {{ echo "loaded driver is ${{v:-none}}, expected {want}" >&2; exit 1; }}',
               desc=f"verify: every GPU runs driver {want}"),
        ]


class FabricManagerStep(Step):
    name = "fabric-manager"
    description = "NVIDIA Fabric Manager at exactly the driver's version (NVSwitch systems)"
    gpu = True

    def skip_reason(self, ctx: StepContext) -> str | None:
        reason = super().skip_reason(ctx)
        if reason:
            return reason
        row = catalog_row(ctx)
        if ctx.facts is not None and ctx.facts.nvswitch_count == 0 and not (row and row.nvswitch):
            return "no NVSwitch on this node; Fabric Manager is only for NVSwitch systems"
        return None

    def fingerprint(self, ctx: StepContext) -> str:
        vs = versions_for(ctx)
        return fingerprint_of(self.name, vs.fabric_manager_package, vs.fabric_manager)

    def probe_sections(self, ctx: StepContext) -> dict[str, str]:
        # The binary's own version, not dpkg's: newer Ubuntu multiverse nvidia-fabricmanager-<old> packages
        # are empty transitional packages that pull in a newer branch's binary.
        return {
            "version": FABRIC_MANAGER_PROBE,
            "active": "systemctl is-active nvidia-fabricmanager 2>/dev/null",
        }

    def installs(self, ctx: StepContext) -> bool:
        """Does the node need the package? Not when the Fabric Manager it has (a Deep Learning AMI's, or ours)
        already equals the driver it keeps."""
        return ctx.facts is None or ctx.facts.fabric_manager != versions_for(ctx).fabric_manager

    def existing_note(self, ctx: StepContext) -> str:
        found = ctx.facts.fabric_manager if ctx.facts is not None else ""
        if not found:
            return ""
        want = versions_for(ctx).fabric_manager
        if found == want:
            return f"{KEPT}: Fabric Manager {found}, the version of the driver"
        return f"Fabric Manager {found} differs from driver {want}: apt installs {want}"

    def check(self, conn: Any, ctx: StepContext) -> bool:
        vs = versions_for(ctx)
        out = probe(conn, self.probe_sections(ctx))
        return running_version(out.get("version", "")) == vs.fabric_manager and out.get("active") == "active"

    def plan(self, ctx: StepContext) -> list[Cmd]:
        vs = versions_for(ctx)
        want = vs.fabric_manager
        install = [
            apt_install(pinned(vs.fabric_manager_package, want), desc=f"Fabric Manager {want} (= driver version)"),
            apt_hold(vs.fabric_manager_package),
        ]
        return [
            *(install if self.installs(ctx) else []),
            Cmd("systemctl enable --now nvidia-fabricmanager", sudo=True, desc="start it now and at every boot"),
            sh(f"systemctl is-active --quiet nvidia-fabricmanager && nv-fabricmanager --version | grep -qF {want}",
               desc=f"verify: Fabric Manager {want} is running"),
        ]


running_version = parse_fabric_manager
"""`Fabric Manager version is : 580.167.08` -> `580.167.08`."""
