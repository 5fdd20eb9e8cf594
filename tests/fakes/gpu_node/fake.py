#!/usr/bin/python3
"""Stand-ins for the tools the GPU plans run, installed into a VM-like node's /usr/local/bin (one file, many
names: the tool is argv[0]'s basename). Each call is recorded (tool, argv, uid, euid, a few environment
variables, the boot it happened in) in /var/lib/gpuforge-fake/calls.jsonl, and each answers as the real tool
does, from a small persistent state (the node's "dpkg database", holds, units) under /var/lib/gpuforge-fake:

- apt-get: `update` needs /var/lib/apt/lists/lock (fcntl, as apt takes it; another holder gets apt's own
  "Could not get lock" error), NVIDIA's packages exist only once the cuda-keyring .deb is installed and an
  update ran; `install` takes exact `pkg=version` (apt's `*` globs included), picks the newest otherwise (so an
  unpinned install would get a newer driver), refuses to change a held package without
  --allow-change-held-packages, installs local .deb files;
- apt-mark, dpkg-query (-W -f with ${Package} ${Version} ${Status} ${db:Status-Abbrev}, globs), dpkg -i;
- curl -o: the files gpuforge downloads (keyring, EFA installer with signature and key, GDRCopy source);
- gpg: verifies the EFA installer "signature" (its sha256) and prints VALIDSIG with the key's fingerprint;
- nvidia-smi: `not found` before the driver package, "couldn't communicate with the NVIDIA driver" until a boot
  loaded it, then the profile's GPUs; nv-fabricmanager and nvcc likewise after their packages;
- systemctl (enable --now, is-active), modprobe, update-initramfs, sysctl -w, lspci -nn, cloud-init status --wait.
Texts are those the real tools print (their documented formats), not recordings of live machines.
"""

from __future__ import annotations

import fcntl
import fnmatch
import gzip
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

STATE = Path("/var/lib/gpuforge-fake")
LIB = Path("/usr/local/lib/gpuforge-fake")
PROFILE = json.loads((LIB / "profile.json").read_text()) if (LIB / "profile.json").exists() else {}
RECORDED_ENV = ("DEBIAN_FRONTEND", "SUDO_USER", "EFA_INSTALLER_KEY", "CUDA", "GNUPGHOME")
DRIVER_PACKAGES = ("nvidia-open-", "cuda-drivers-")
EFA_KEY_FINGERPRINT = "4E9091BCBB97A96B26B15E59A05480B1DD2D3CCC"  # EC2 User Guide, "Verify the EFA installer"
NVIDIA_REPO = {  # what NVIDIA's CUDA repository offers (newer than the matrix too: pins must choose)
    **{f"{p}-580": ["580.126.09-1ubuntu1", "580.167.08-1ubuntu1", "580.201.04-1ubuntu1"] for p in ("nvidia-open", "cuda-drivers")},
    "nvidia-fabricmanager-580": ["580.126.09-1", "580.167.08-1", "580.201.04-1"],
    "cuda-toolkit-13-0": ["13.0.1-1", "13.0.2-1"], "cuda-toolkit-12-6": ["12.6.2-1", "12.6.3-1"],
    **{p: ["2.23.4-1+cuda12.6", "2.28.9-1+cuda13.0", "2.29.2-1+cuda13.0"] for p in ("libnccl2", "libnccl-dev")},
}
UBUNTU_ARCHIVE = ("build-essential", "devscripts", "debhelper", "check", "libsubunit-dev", "fakeroot", "pkg-config",
                  "dkms", "python3-venv", "python3-pip")


def load(name: str, default):
    path = STATE / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else default


def save(name: str, value) -> None:
    STATE.mkdir(parents=True, exist_ok=True)
    (STATE / f"{name}.json").write_text(json.dumps(value, indent=1, sort_keys=True))


def record(tool: str, argv: list[str], **extra) -> None:
    STATE.mkdir(parents=True, exist_ok=True)
    entry = {"tool": tool, "argv": argv, "uid": os.getuid(), "euid": os.geteuid(), "boot": load("boot", 0),
             "env": {k: os.environ[k] for k in RECORDED_ENV if k in os.environ}, "time": time.time(), **extra}
    with open(STATE / "calls.jsonl", "a") as f:
        f.write(json.dumps(entry) + "\n")
    if os.geteuid() == 0:
        os.chmod(STATE / "calls.jsonl", 0o666)


def fail(message: str, code: int) -> None:
    print(message, file=sys.stderr)
    sys.exit(code)


def need_root(tool: str) -> None:
    if os.geteuid() != 0:
        fail(f"E: Could not open lock file /var/lib/dpkg/lock-frontend - open (13: Permission denied)\n"
             f"E: Unable to acquire the dpkg frontend lock (/var/lib/dpkg/lock-frontend), are you root?"
             if tool.startswith("apt") else f"{tool}: Permission denied (are you root?)", 100)


def installed() -> dict[str, str]:
    return load("dpkg", {})


def driver_package() -> tuple[str, str] | None:
    return next(((p, v) for p, v in installed().items() if p.startswith(DRIVER_PACKAGES)), None)


def upstream(version: str) -> str:
    return version.split("-", 1)[0]


def driver_loaded() -> bool:
    return Path("/proc/driver/nvidia/version").exists()


# -- apt ---------------------------------------------------------------------------------------------------
def take_lock(path: str, wait_s: float = 0.0):
    """apt's GetLock: fcntl F_SETLK, retried for DPkg::Lock::Timeout seconds on the dpkg locks only."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o640)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except OSError:
            if time.monotonic() >= deadline:
                break
            time.sleep(0.2)
    holder = Path(str(path) + ".holder").read_text().strip() if Path(str(path) + ".holder").exists() else "?"
    fail(f"E: Could not get lock {path}. It is held by process {holder} (apt-get)\n"
         f"E: Unable to lock directory {Path(path).parent}/", 100)


def available() -> dict[str, list[str]]:
    offer = {p: ["1.0-1"] for p in UBUNTU_ARCHIVE}
    offer[f"linux-headers-{os.uname().release}"] = ["6.8.0-1015.16"]
    if load("lists", {}).get("nvidia"):
        offer.update(NVIDIA_REPO)
    return offer


def apt_get(argv: list[str]) -> None:
    need_root("apt-get")
    words, options, config = [], [], {}
    it = iter(argv)
    for arg in it:
        if arg == "-o":
            key, _, value = next(it).partition("=")
            config[key] = value
        elif arg.startswith("-"):
            options.append(arg)
        else:
            words.append(arg)
    command, specs = words[0], words[1:]
    wait = float(config.get("DPkg::Lock::Timeout", "0"))
    if command == "update":
        Path("/var/lib/apt/lists").mkdir(parents=True, exist_ok=True)
        lock = take_lock("/var/lib/apt/lists/lock")  # noqa: F841 - DPkg::Lock::Timeout does not cover this one
        failures = load("apt-update-failures", PROFILE.get("hazards", {}).get("apt_update_failures", 0))
        if failures > 0:
            save("apt-update-failures", failures - 1)
            fail("Err:1 https://developer.download.nvidia.com/compute/cuda/repos InRelease\n"
                 "  Temporary failure resolving 'developer.download.nvidia.com'\n"
                 "W: Failed to fetch https://developer.download.nvidia.com/compute/cuda/repos/InRelease  "
                 "Temporary failure resolving 'developer.download.nvidia.com'\n"
                 "W: Some index files failed to download. They have been ignored, or old ones used instead.", 100)
        lists = load("lists", {})
        lists["nvidia"] = bool(list(Path("/etc/apt/sources.list.d").glob("cuda-*.list")))
        save("lists", lists)
        print("Reading package lists... Done")
        return
    if command != "install":
        fail(f"E: Invalid operation {command}", 100)
    Path("/var/lib/dpkg").mkdir(parents=True, exist_ok=True)
    lock = take_lock("/var/lib/dpkg/lock-frontend", wait)  # noqa: F841 - held until apt-get exits
    db, holds, offer = installed(), load("holds", []), available()
    plan = {}
    for spec in specs:
        if spec.endswith(".deb"):
            deb = json.loads(Path(spec).read_text())
            plan[deb["package"]] = (deb["version"], deb)
            continue
        name, _, want = spec.partition("=")
        versions = offer.get(name)
        if versions is None:
            fail(f"E: Unable to locate package {name}", 100)
        chosen = [v for v in versions if not want or fnmatch.fnmatchcase(v, want)]
        if not chosen:
            fail(f"E: Version '{want}' for '{name}' was not found", 100)
        plan[name] = (sorted(chosen, key=version_key)[-1], None)
    for name, (version, _) in plan.items():
        if name in holds and db.get(name) not in (None, version) and "--allow-change-held-packages" not in options:
            fail("E: Held packages were changed and -y was used without --allow-change-held-packages.", 100)
    for name, (version, deb) in plan.items():
        db[name] = version
        install_files(name, version, deb)
        print(f"Setting up {name} ({version}) ...")
    save("dpkg", db)


def version_key(version: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"[.\-+~]", version)]


def install_files(name: str, version: str, deb) -> None:
    """What a package puts where the plans and facts look."""
    if name == "cuda-keyring":
        repo = deb["repo"]
        Path("/etc/apt/sources.list.d").mkdir(parents=True, exist_ok=True)
        slug = repo.rstrip("/").split("/repos/")[1].replace("/", "-")
        Path(f"/etc/apt/sources.list.d/cuda-{slug}.list").write_text(
            f"deb [signed-by=/usr/share/keyrings/cuda-archive-keyring.gpg] {repo} /\n")
    if name.startswith("cuda-toolkit-"):
        release = name.removeprefix("cuda-toolkit-").replace("-", ".")
        root = Path(f"/usr/local/cuda-{release}")
        (root / "bin").mkdir(parents=True, exist_ok=True)
        (root / "version.json").write_text(json.dumps({"cuda": {"name": "CUDA SDK", "version": upstream(version)}}, indent=3))
        link = root / "bin" / "nvcc"
        if not link.exists():
            link.symlink_to(LIB / "fake.py")


def apt_mark(argv: list[str]) -> None:
    need_root("apt-mark")
    if argv[:1] == ["hold"]:
        holds = set(load("holds", []))
        db = installed()
        for name in argv[1:]:
            if name not in db:
                fail(f"E: Unable to locate package {name}", 100)
            holds.add(name)
            print(f"{name} set on hold.")
        save("holds", sorted(holds))
    elif argv[:1] == ["showhold"]:
        print("\n".join(load("holds", [])))


def dpkg_query(argv: list[str]) -> None:
    fmt, patterns = "${Package}\t${Version}\n", []
    for arg in argv:
        if arg.startswith("-f=") or arg.startswith("--showformat="):
            fmt = arg.split("=", 1)[1]
        elif not arg.startswith("-"):
            patterns.append(arg)
    fmt = fmt.replace("\\n", "\n")
    db, missing = installed(), []
    for pattern in patterns:
        hits = sorted(p for p in db if fnmatch.fnmatchcase(p, pattern))
        if not hits:
            missing.append(pattern)
        for name in hits:
            sys.stdout.write(fmt.replace("${Package}", name).replace("${Version}", db[name])
                             .replace("${Status}", "install ok installed").replace("${db:Status-Abbrev}", "ii "))
    for pattern in missing:
        print(f"dpkg-query: no packages found matching {pattern}", file=sys.stderr)
    sys.exit(1 if missing else 0)


# -- downloads ---------------------------------------------------------------------------------------------
def tarball(members: dict[str, tuple[str, int]]) -> bytes:
    """The same bytes on every download (fixed mtimes): the signature of one must match the other."""
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", mtime=0) as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        for name, (text, mode) in members.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), mode, 0
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def stand_in_script(tool: str) -> str:
    return f"#!/bin/sh\nexec {LIB / 'fake.py'} {tool} \"$@\"\n"


def download(url: str) -> bytes | None:
    if url.endswith("/cuda-keyring_1.1-1_all.deb"):
        return json.dumps({"package": "cuda-keyring", "version": "1.1-1", "repo": url.rsplit("/", 1)[0] + "/"}).encode()
    match = re.search(r"/aws-efa-installer-(\d+\.\d+\.\d+)\.tar\.gz(\.sig)?$", url)
    if match:
        body = tarball({"aws-efa-installer/efa_installer.sh": (stand_in_script("efa_installer.sh"), 0o755)})
        return hashlib.sha256(body).hexdigest().encode() if match[2] else body
    if url.endswith("/aws-efa-installer.key"):
        return f"-----BEGIN PGP PUBLIC KEY BLOCK----- (stand-in) {EFA_KEY_FINGERPRINT}\n".encode()
    match = re.search(r"/NVIDIA/gdrcopy/archive/refs/tags/v(\d+\.\d+\.\d+)\.tar\.gz$", url)
    if match:
        return tarball({f"gdrcopy-{match[1]}/packages/build-deb-packages.sh": (stand_in_script("build-deb-packages.sh"), 0o755)})
    return None


def curl(argv: list[str]) -> None:
    out = argv[argv.index("-o") + 1] if "-o" in argv else None
    url = [a for a in argv if a.startswith("http")][-1]
    data = download(url)
    if data is None:
        fail("curl: (22) The requested URL returned error: 404", 22)
    try:
        Path(out).write_bytes(data)
    except OSError as exc:
        fail(f"curl: (23) Failure writing output to destination ({exc.strerror})", 23)


def gpg(argv: list[str]) -> None:
    if "--import" in argv:
        return
    if "--verify" in argv:
        sig, target = argv[argv.index("--verify") + 1: argv.index("--verify") + 3]
        if Path(sig).read_text().strip() == hashlib.sha256(Path(target).read_bytes()).hexdigest():
            print(f"[GNUPG:] GOODSIG A05480B1DD2D3CCC Amazon EC2 EFA <ec2-efa-maintainers@amazon.com>")
            print(f"[GNUPG:] VALIDSIG {EFA_KEY_FINGERPRINT} 2026-08-21 0 4 0 1 10 00 {EFA_KEY_FINGERPRINT}")
            return
        print("[GNUPG:] BADSIG A05480B1DD2D3CCC")
        sys.exit(1)


def efa_installer(argv: list[str]) -> None:
    if os.geteuid() != 0:
        fail("Error: This script must be run as root", 1)
    version = PROFILE.get("efa_installer", "1.50.0")
    base = Path("/opt/amazon")
    (base / "efa" / "bin").mkdir(parents=True, exist_ok=True)
    (base / "efa_installed_packages").write_text(f"# EFA installer version: {version}\n# Debug packages installed: no\n")
    fi_info = base / "efa" / "bin" / "fi_info"
    fi_info.write_text(stand_in_script("fi_info"))
    fi_info.chmod(0o755)
    plugin = base / "ofi-nccl" / "lib" / "x86_64-linux-gnu"
    plugin.mkdir(parents=True, exist_ok=True)
    (plugin / "libnccl-net-ofi.so").write_text("")
    subprocess.run(["modprobe", "efa"], check=True)
    action = "reboot" if PROFILE.get("hazards", {}).get("efa_asks_reboot") else "logout/login"
    print(f"= Starting Amazon Elastic Fabric Adapter Installation Script =\n= EFA Installer Version: {version} =\n"
          "===================================================\nEFA installation complete.\n"
          f"- Please {action} to complete the installation.\n- Libfabric was installed in /opt/amazon/efa\n"
          "- Open MPI was installed in /opt/amazon/openmpi5\n===================================================")


def build_debs(argv: list[str]) -> None:
    if os.geteuid() != 0:
        fail("build-deb-packages.sh: cannot write packages here", 1)
    cuda = os.environ.get("CUDA", "")
    if not Path(cuda, "bin", "nvcc").exists():
        fail(f"CUDA is not found at {cuda or '(unset)'}: set CUDA=/path/to/cuda", 1)
    version = Path.cwd().parent.name.removeprefix("gdrcopy-")
    for name in ("gdrdrv-dkms", "libgdrapi", "gdrcopy-tests", "gdrcopy"):
        Path(f"{name}_{version}-1_amd64.Ubuntu22_04.deb").write_text(
            json.dumps({"package": name, "version": f"{version}-1"}))


# -- the driver and its tools ------------------------------------------------------------------------------
def nvidia_smi(argv: list[str]) -> None:
    if driver_package() is None:
        fail("sh: 1: nvidia-smi: not found", 127)
    if not driver_loaded():
        print("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. Make sure that the "
              "latest NVIDIA driver is installed and running.")
        sys.exit(9)
    state = load("persistence", {"mode": False})
    if "-pm" in argv:
        need_root("nvidia-smi")
        save("persistence", {"mode": argv[argv.index("-pm") + 1] == "1"})
        return
    query = next((a.split("=", 1)[1] for a in argv if a.startswith("--query-gpu=")), "")
    units = "nounits" not in " ".join(argv)
    version = upstream(driver_package()[1])
    persistent = state["mode"] or "nvidia-persistenced" in load("active", [])
    for gpu in PROFILE["gpus"]:
        values = {"index": str(gpu["index"]), "name": gpu["name"],
                  "memory.total": f"{gpu['memory_mib']}{' MiB' if units else ''}", "driver_version": version,
                  "pci.bus_id": gpu["bus_id"], "persistence_mode": "Enabled" if persistent else "Disabled"}
        print(", ".join(values[field] for field in query.split(",")))


def nv_fabricmanager(argv: list[str]) -> None:
    version = installed().get("nvidia-fabricmanager-580")
    if version is None:
        fail("sh: 1: nv-fabricmanager: not found", 127)
    print(f"Fabric Manager version is : {upstream(version)}")


def nvcc(argv: list[str]) -> None:
    release = Path(sys.argv[0]).parent.parent.name  # /usr/local/cuda-13.0/bin/nvcc
    version = json.loads(Path(f"/usr/local/{release}/version.json").read_text())["cuda"]["version"]
    print(f"nvcc: NVIDIA (R) Cuda compiler driver\nCuda compilation tools, release {release.removeprefix('cuda-')}, "
          f"V{version}")


UNIT_PACKAGES = {"nvidia-persistenced": DRIVER_PACKAGES, "nvidia-fabricmanager": ("nvidia-fabricmanager-",)}


def systemctl(argv: list[str]) -> None:
    words = [a for a in argv if not a.startswith("-")]
    verb, units = words[0], words[1:]
    active, enabled = load("active", []), load("enabled", [])
    if verb == "enable":
        need_root("systemctl")
        for unit in units:
            prefixes = UNIT_PACKAGES.get(unit.removesuffix(".service"), ())
            if not any(p.startswith(prefixes) for p in installed()):
                fail(f"Failed to enable unit: Unit file {unit}.service does not exist.", 1)
            enabled = sorted({*enabled, unit})
            if "--now" in argv:
                if unit == "nvidia-fabricmanager" and not driver_loaded():
                    fail("Job for nvidia-fabricmanager.service failed because the control process exited with "
                         "error code.", 1)
                active = sorted({*active, unit})
        save("enabled", enabled)
        save("active", active)
    elif verb == "is-active":
        state = "active" if all(u in active for u in units) else "inactive"
        if "--quiet" not in argv:
            print(state)
        sys.exit(0 if state == "active" else 3)


def modprobe(argv: list[str]) -> None:
    need_root("modprobe")
    module = [a for a in argv if not a.startswith("-")][0]
    if module == "gdrdrv" and "gdrdrv-dkms" not in installed():
        fail(f"modprobe: FATAL: Module gdrdrv not found in directory /lib/modules/{os.uname().release}", 1)


def sysctl(argv: list[str]) -> None:
    need_root("sysctl")
    key, _, value = argv[argv.index("-w") + 1].partition("=")
    Path("/proc/sys", *key.split(".")).write_text(value + "\n")
    print(f"{key} = {value}")


def lspci(argv: list[str]) -> None:
    print("\n".join(PROFILE["lspci"]))


def fi_info(argv: list[str]) -> None:
    if PROFILE.get("efa", 0) == 0:
        fail("fi_getinfo: -61 (No data available)", 1)
    print("provider: efa\n    fabric: efa\n    domain: rdmap16s27-rdm\n    version: 122.0\n    type: FI_EP_RDM\n"
          "    protocol: FI_PROTO_EFA")


def cloud_init(argv: list[str]) -> None:
    until = load("cloud-init-until", 0)
    if "--wait" in argv:
        while time.time() < until:
            time.sleep(0.2)
    print("status: done" if time.time() >= until else "status: running")


def quiet_ok(argv: list[str]) -> None:
    need_root(TOOL)


TOOLS = {"apt-get": apt_get, "apt-mark": apt_mark, "dpkg-query": dpkg_query, "curl": curl, "gpg": gpg,
         "efa_installer.sh": efa_installer, "build-deb-packages.sh": build_debs, "nvidia-smi": nvidia_smi,
         "nv-fabricmanager": nv_fabricmanager, "nvcc": nvcc, "systemctl": systemctl, "modprobe": modprobe,
         "sysctl": sysctl, "lspci": lspci, "fi_info": fi_info, "cloud-init": cloud_init,
         "update-initramfs": quiet_ok}

if __name__ == "__main__":
    TOOL = Path(sys.argv[0]).name
    args = sys.argv[1:]
    if TOOL == "fake.py":  # called through a wrapper script: the tool is the first argument
        TOOL, args = args[0], args[1:]
    record(TOOL, args, cwd=os.getcwd())
    TOOLS[TOOL](args)
