#!/usr/bin/python3
"""Boot hook of a stand-in GPU node (infra/local_vm.py runs it as root inside the node at every boot).

    boot.py PROFILE.json

First boot: the profile's /etc/os-release, the stand-in tools (fake.py) in /usr/local/bin. Every boot, as a
kernel and systemd would: /proc/driver/nvidia/version exists only when a driver package is installed (the
module loads at boot, not when apt installs it); kernel.yama.ptrace_scope starts at Ubuntu's 1 and
/etc/sysctl.d is applied; enabled units are started; cloud-init runs for the profile's seconds on the first
boot; another apt may hold /var/lib/apt/lists/lock for a while (apt-daily).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

KIT = Path(__file__).resolve().parent
LIB = Path("/usr/local/lib/gpuforge-fake")
STATE = Path("/var/lib/gpuforge-fake")
UBUNTU_DIRS = ("/etc/modprobe.d", "/etc/sysctl.d", "/etc/apt/preferences.d", "/etc/apt/sources.list.d")
TOOLS = ("apt-get", "apt-mark", "dpkg-query", "curl", "gpg", "nvidia-smi", "nv-fabricmanager", "systemctl",
         "modprobe", "sysctl", "lspci", "update-initramfs", "cloud-init")
# /proc/driver/nvidia/version of the driver the matrix pins, as the open and the proprietary modules write it.
NVRM = {"open": "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  {v}  Release Build  (dvs-builder@U22-I3-AF03-09-1)",
        "proprietary": "NVRM version: NVIDIA UNIX x86_64 Kernel Module  {v}  Release Build  (dvs-builder@U22-I3-AF03-09-1)"}


def first_boot(profile: dict) -> None:
    LIB.mkdir(parents=True, exist_ok=True)
    shutil.copy(KIT / "fake.py", LIB / "fake.py")
    os.chmod(LIB / "fake.py", 0o755)
    (LIB / "profile.json").write_text(json.dumps(profile))
    for tool in TOOLS:
        link = Path("/usr/local/bin") / tool
        link.unlink(missing_ok=True)
        link.symlink_to(LIB / "fake.py")
    for toolkit in Path("/usr/local").glob("cuda*"):  # this host's own CUDA is no part of a fresh instance
        if toolkit.is_symlink() or toolkit.is_file():
            toolkit.unlink()
        else:
            shutil.rmtree(toolkit)
    for folder in UBUNTU_DIRS:  # what an Ubuntu image has and this Debian host may lack (kmod is not installed)
        Path(folder).mkdir(parents=True, exist_ok=True)
    os_release = Path("/etc/os-release")
    os_release.unlink(missing_ok=True)  # Debian's is a symlink into /usr/lib; the node's own file replaces it
    os_release.write_text(profile["os_release"])
    STATE.mkdir(parents=True, exist_ok=True)
    until = time.time() + profile.get("hazards", {}).get("cloud_init_s", 0)
    (STATE / "cloud-init-until.json").write_text(json.dumps(until))


def mount_tmpfs(path: str) -> None:
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", path], check=True)


def fake_kernel_sysctls() -> None:
    """This kernel has no Yama; give the node the Ubuntu default and apply /etc/sysctl.d like systemd-sysctl."""
    kernel = Path("/proc/sys/kernel")
    saved = {}
    for entry in kernel.iterdir():
        try:
            if entry.is_file():
                saved[entry.name] = entry.read_text()
        except OSError:
            continue
    mount_tmpfs(str(kernel))
    for name, text in saved.items():
        (kernel / name).write_text(text)
    (kernel / "yama").mkdir()
    (kernel / "yama" / "ptrace_scope").write_text("1\n")
    for conf in sorted(Path("/etc/sysctl.d").glob("*.conf")):
        for line in conf.read_text().splitlines():
            match = re.match(r"^\s*kernel\.yama\.ptrace_scope\s*=\s*(\d+)", line)
            if match:
                (kernel / "yama" / "ptrace_scope").write_text(match[1] + "\n")


def load(name: str, default):
    path = STATE / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else default


def boot(profile: dict) -> None:
    if not (LIB / "fake.py").exists():
        first_boot(profile)
    boots = load("boot", 0) + 1
    (STATE / "boot.json").write_text(json.dumps(boots))
    mount_tmpfs("/proc/driver")
    driver = next(((p, v) for p, v in load("dpkg", {}).items() if p.startswith(("nvidia-open-", "cuda-drivers-"))), None)
    if driver is not None:
        (Path("/proc/driver/nvidia")).mkdir()
        flavor = "open" if driver[0].startswith("nvidia-open-") else "proprietary"
        (Path("/proc/driver/nvidia/version")).write_text(NVRM[flavor].format(v=driver[1].split("-")[0]) + "\n")
    fake_kernel_sysctls()
    enabled = load("enabled", [])
    (STATE / "active.json").write_text(json.dumps(enabled if driver is not None else []))
    (STATE / "persistence.json").write_text(json.dumps({"mode": False}))
    hold = profile.get("hazards", {}).get("lists_lock_s", 0)
    if hold and boots == 1:  # apt-daily on the first boot: holds the lists lock for a while
        Path("/var/lib/apt/lists").mkdir(parents=True, exist_ok=True)
        subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(hold)], start_new_session=True,
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.3)
    with open(STATE / "calls.jsonl", "a") as f:
        f.write(json.dumps({"tool": "boot", "argv": [], "uid": 0, "euid": 0, "boot": boots, "time": time.time()}) + "\n")
    os.chmod(STATE / "calls.jsonl", 0o666)


LOCK_HOLDER = """
import fcntl, os, sys, time
fd = os.open("/var/lib/apt/lists/lock", os.O_RDWR | os.O_CREAT, 0o640)
fcntl.lockf(fd, fcntl.LOCK_EX)
open("/var/lib/apt/lists/lock.holder", "w").write(str(os.getpid()))
time.sleep(float(sys.argv[1]))
"""

if __name__ == "__main__":
    boot(json.loads(Path(sys.argv[1]).read_text()))
