"""NVIDIA apt repository, driver, and Fabric Manager steps.

Order on a fresh Ubuntu VM (what `fab setup --dry-run` prints):
  nvidia-repo     CUDA network repository keyring, a version pin for every NVIDIA driver package, apt update
  nvidia-driver   nouveau off, kernel headers, the pinned driver (open or proprietary modules), hold,
                  reboot when the loaded driver changes, persistence daemon, then check what loaded
  fabric-manager  NVSwitch systems only: nvidia-fabricmanager-<branch> at exactly the driver's version
"""

from __future__ import annotations

import re
from typing import Any

from provision.errors import MatrixError
from provision.facts import parse_driver_flavor
from provision.steps.base import Cmd, Step, StepContext, fingerprint_of
from provision.steps.gpu_common import (
    CACHE_DIR,
    apt_hold,
    apt_install,
    catalog_row,
    gpu_model_of,
    pinned,
    probe,
    sh,
    versions_for,
    write_file,
)
from provision.versions import CUDA_KEYRING_DEB, VersionSet, check_driver

APT_PIN_FILE = "/etc/apt/preferences.d/gpuforge-nvidia-driver"
NOUVEAU_BLACKLIST = "/etc/modprobe.d/blacklist-nouveau.conf"
# The two lines NVIDIA's driver installation guide puts in blacklist-nouveau.conf.
NOUVEAU_LINES = ["blacklist nouveau", "options nouveau modeset=0"]
KEYRING_PACKAGE = "cuda-keyring"


def pin_lines(vs: VersionSet) -> list[str]:
    """apt preferences that keep every driver-versioned NVIDIA package (including the packages the meta
    package pulls in, and Fabric Manager) at the tested version: priority 1001 also wins over newer ones."""
    return [
        f"Explanation: gpuforge keeps NVIDIA driver packages at {vs.driver_version} (provision/versions.toml)",
        "Package: nvidia-* libnvidia-* cuda-drivers* xserver-xorg-video-nvidia*",
        f"Pin: version {vs.driver_version}-*",
        "Pin-Priority: 1001",
    ]


class NvidiaRepoStep(Step):
    name = "nvidia-repo"
    description = "NVIDIA CUDA apt repository and driver version pin"
    gpu = True

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
            Cmd("apt-get update", sudo=True, desc="read the new repository", timeout=600.0),
        ]


def expected_flavor(ctx: StepContext) -> str:
    return "open" if versions_for(ctx).open_kernel_modules(gpu_model_of(ctx)) else "proprietary"


def driver_state(ctx: StepContext) -> str:
    """`ok` when the pinned driver with the right kernel modules is loaded, else `upgrade`; MatrixError
    when the node's driver cannot be replaced in place (check_driver) or Secure Boot would block ours."""
    vs, facts = versions_for(ctx), ctx.facts
    if facts is None:
        return "upgrade"
    state = check_driver(facts.driver_version, vs, facts.driver_packaging)
    if state == "ok" and facts.driver_flavor not in ("", expected_flavor(ctx)):
        if facts.driver_packaging != "apt":
            raise MatrixError(
                f"driver {facts.driver_version} runs {facts.driver_flavor} kernel modules but {gpu_model_of(ctx)} "
                f"should run {expected_flavor(ctx)} ones, and it was not installed with apt"
            )
        state = "upgrade"
    if state == "upgrade" and facts.secure_boot:
        raise MatrixError(
            "UEFI Secure Boot is on: the NVIDIA modules built by DKMS are unsigned and would not load. "
            "Turn Secure Boot off for GPU nodes (GCP: --no-shielded-secure-boot; AWS: a non-UEFI-Secure-Boot AMI)."
        )
    return state


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
        }

    def check(self, conn: Any, ctx: StepContext) -> bool:
        vs = versions_for(ctx)
        out = probe(conn, self.probe_sections(ctx))
        loaded = {v.strip() for v in out.get("smi", "").splitlines() if v.strip()}
        flavor = parse_driver_flavor(out.get("proc", ""))
        return loaded == {vs.driver_version} and flavor == expected_flavor(ctx) and out.get("persistenced") == "active"

    def plan(self, ctx: StepContext) -> list[Cmd]:
        vs = versions_for(ctx)
        if driver_state(ctx) == "ok":
            return self.plan_persistence(vs)
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
    def plan_persistence(vs: VersionSet) -> list[Cmd]:
        want = vs.driver_version
        return [
            Cmd("systemctl enable --now nvidia-persistenced", sudo=True,
                desc="persistence daemon: keeps the GPUs initialised between jobs"),
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
            "version": "nv-fabricmanager --version 2>/dev/null",
            "active": "systemctl is-active nvidia-fabricmanager 2>/dev/null",
        }

    def check(self, conn: Any, ctx: StepContext) -> bool:
        vs = versions_for(ctx)
        out = probe(conn, self.probe_sections(ctx))
        return running_version(out.get("version", "")) == vs.fabric_manager and out.get("active") == "active"

    def plan(self, ctx: StepContext) -> list[Cmd]:
        vs = versions_for(ctx)
        want = vs.fabric_manager
        return [
            apt_install(pinned(vs.fabric_manager_package, want), desc=f"Fabric Manager {want} (= driver version)"),
            apt_hold(vs.fabric_manager_package),
            Cmd("systemctl enable --now nvidia-fabricmanager", sudo=True, desc="start it now and at every boot"),
            sh(f"systemctl is-active --quiet nvidia-fabricmanager && nv-fabricmanager --version | grep -qF {want}",
               desc=f"verify: Fabric Manager {want} is running"),
        ]


def running_version(text: str) -> str:
    """`Fabric Manager version is : 580.167.08` -> `580.167.08`."""
    match = re.search(r"\b(\d+\.\d+(?:\.\d+)?)\b", text)
    return match.group(1) if match else ""
