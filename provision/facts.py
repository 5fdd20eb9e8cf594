"""Node facts: OS, CPUs, RAM, GPUs, NVSwitches, EFA, the driver (version, kernel modules, packaging), CUDA.

Gathered with one shell command that prints tagged sections, then parsed here, so that the
parsing is tested on recorded outputs of the real tools (tests/unit/fixtures/facts/).
GPUs are counted twice on purpose: on the PCI bus (lspci, or sysfs where pciutils is missing) and by
the driver (nvidia-smi). `validate_gpu_facts` compares both with the catalog row of the instance type.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from provision.errors import FactsError

if TYPE_CHECKING:
    from provision.versions import NodeDriver

NVIDIA_VENDOR = "10de"
AMAZON_VENDOR = "1d0f"
GPU_PCI_CLASSES = ("0300", "0302")  # VGA controller, 3D controller
# NVSwitch PCI device ids (bridge class 0680): 1af1 = NVSwitch gen 2 (A100 HGX), 22a3 = gen 3 (H100/H200 HGX).
NVSWITCH_DEVICE_IDS = frozenset({"1af1", "22a3", "22a4"})
# EFA PCI device ids from the Amazon EFA driver (efa0 = gen1, efa1 = gen2, efa2/efa3 = gen3+).
EFA_DEVICE_IDS = frozenset({"efa0", "efa1", "efa2", "efa3"})
# Names for GPUs seen only through sysfs (no lspci): device id -> name as pci.ids writes it.
PCI_GPU_NAMES = {
    "20b0": "A100 SXM4 40GB", "20b2": "A100 SXM4 80GB", "20f1": "A100 PCIe 40GB", "20b5": "A100 PCIe 80GB",
    "2330": "H100 SXM5 80GB", "2331": "H100 PCIe", "2335": "H200 SXM 141GB", "2901": "B200",
    "2237": "A10G", "2236": "A10", "27b8": "L4", "26b5": "L40", "26b9": "L40S", "1eb8": "Tesla T4",
    "1db1": "Tesla V100 SXM2 16GB", "1db5": "Tesla V100 SXM2 32GB", "1db4": "Tesla V100 PCIe 16GB",
    "15f8": "Tesla P100 PCIe 16GB", "1bb3": "Tesla P4", "102d": "Tesla K80",
}
# Packages whose presence means the driver came from apt (NVIDIA's CUDA repo or Ubuntu's archive).
APT_DRIVER_PACKAGE = re.compile(r"^(nvidia-driver-|nvidia-open|cuda-drivers|libnvidia-compute-|nvidia-dkms-|nvidia-headless-)")
SECTION = "##gpuforge:"
# Read-only probes shared with the CUDA and Fabric Manager steps (they re-run them to check the live node).
# version.json: `"cuda" : { "name" : "CUDA SDK", "version" : "12.8.1" }` (the version is the second line after).
CUDA_VERSION_JSON = "grep -A2 -E '\"cuda\"[[:space:]]*:' {path} 2>/dev/null | grep '\"version\"'"
CUDA_TOOLKITS_PROBE = (
    'for d in /usr/local/cuda-*; do test -x "$d/bin/nvcc" && echo "${d##*/} $('
    + CUDA_VERSION_JSON.format(path='"$d/version.json"') + ')"; done 2>/dev/null'
)
"""One line per toolkit directory with an nvcc: `cuda-12.8 "version" : "12.8.1"` (apt, runfile, DLAMI)."""
NCCL_PROBE = "ls -1 /usr/local/cuda-*/lib/libnccl.so.2.* /usr/local/cuda-*/lib64/libnccl.so.2.* 2>/dev/null"
"""NCCL libraries inside toolkit directories, where Deep Learning AMIs build theirs."""
CUDA_PACKAGES_PROBE = (
    "dpkg-query -W -f='${db:Status-Abbrev}${Package}=${Version}\\n' 'cuda-toolkit-[0-9]*' libnccl2 libnccl-dev"
    " 2>/dev/null | grep '^ii'"
)
FABRIC_MANAGER_PROBE = "nv-fabricmanager --version 2>/dev/null"
PACKAGES_LIKE = 'printf "%s\\n" "$gf_pkgs" | while read -r l; do case "$l" in {patterns}) echo "$l";; esac; done'
"""The lines of `$gf_pkgs` (`ii name=version`) whose package matches one of the `case` patterns (builtins only)."""
NVIDIA_SMI_QUERY = (
    "nvidia-smi --query-gpu=index,name,memory.total,driver_version,pci.bus_id --format=csv,noheader,nounits"
)

NODE_PARTS = [
    # Shell builtins where they do (`read`, `case`): every process started here costs each node ~1 ms of CPU.
    f"echo '{SECTION}os'; while IFS= read -r l || [ -n \"$l\" ]; do echo \"$l\"; done < /etc/os-release 2>/dev/null",
    "gf_u=$(uname -rm)",
    f"echo '{SECTION}kernel'; echo \"${{gf_u% *}}\"",
    f"echo '{SECTION}arch'; echo \"${{gf_u##* }}\"",
    f"echo '{SECTION}cpus'; nproc",
    f"echo '{SECTION}mem'; while read -r k v u; do [ \"$k\" = MemTotal: ] && echo \"$k $v $u\" && break; done < /proc/meminfo",
    f"echo '{SECTION}python'; python3 --version 2>/dev/null",
    f"echo '{SECTION}cloud-init'; command -v cloud-init >/dev/null 2>&1 && echo present",
    f"echo '{SECTION}nvidia-smi'; {NVIDIA_SMI_QUERY} 2>&1; gf_rc=$?",
    f"echo '{SECTION}nvidia-smi-rc'; echo $gf_rc",
    f"echo '{SECTION}nvidia-version'; [ -e /proc/driver/nvidia/version ] && gf_nv=1 && cat /proc/driver/nvidia/version",
    f"echo '{SECTION}lspci'; command -v lspci >/dev/null && gf_lspci=$(lspci -nn 2>/dev/null | grep -Ei '\\[(10de|1d0f):')"
    ' && printf "%s\\n" "$gf_lspci"; case "$gf_lspci" in *"[10de:"*) gf_nv=1;; esac',

    # NVIDIA (10de) and Amazon (1d0f) devices from sysfs, which every Linux has
    f"echo '{SECTION}pci'; for d in /sys/bus/pci/devices/*; do"
    ' read c < $d/class; read v < $d/vendor; read i < $d/device;'
    ' case "$v" in 0x10de) gf_nv=1; echo "${d##*/} $c $v $i";; 0x1d0f) echo "${d##*/} $c $v $i";; esac; done 2>/dev/null',
    # NVIDIA's vendor id on the bus, an nvidia-smi (found, whatever it said) or a loaded driver: the rest applies
    '[ "$gf_rc" != 127 ] && gf_nv=1',
]
NVIDIA_PARTS = [
    f"echo '{SECTION}cuda'; [ -f /usr/local/cuda/version.json ] && "
    + CUDA_VERSION_JSON.format(path="/usr/local/cuda/version.json"),
    f"echo '{SECTION}cuda-toolkits'; {CUDA_TOOLKITS_PROBE}",
    f"echo '{SECTION}nccl'; {NCCL_PROBE}",
    # one dpkg-query for both package sections (each reads the whole status database: ~10 ms of CPU)
    "gf_pkgs=$(dpkg-query -W -f='${db:Status-Abbrev}${Package}=${Version}\\n' 'cuda-toolkit-[0-9]*' libnccl2"
    " libnccl-dev 'nvidia-*' 'libnvidia-compute-*' 'cuda-drivers*' 2>/dev/null | grep '^ii')",
    f"echo '{SECTION}cuda-pkgs'; " + PACKAGES_LIKE.format(patterns='"ii cuda-toolkit-"[0-9]*|"ii libnccl2="*|"ii libnccl-dev="*'),
    f"echo '{SECTION}fabricmanager'; {FABRIC_MANAGER_PROBE}",
    f"echo '{SECTION}nvidia-pkgs'; "
    + PACKAGES_LIKE.format(patterns='"ii nvidia-"*|"ii libnvidia-compute-"*|"ii cuda-drivers"*'),
    f"echo '{SECTION}runfile'; test -x /usr/bin/nvidia-uninstall && echo runfile",
    f"echo '{SECTION}secureboot'; mokutil --sb-state 2>/dev/null",
]
GATHER_COMMAND = "; ".join([
    *NODE_PARTS,
    # A node without anything NVIDIA skips the CUDA, NCCL, package and driver probes (sections left empty, as they
    # would read there): they cost it more CPU than the rest together, times every node of a big cluster.
    f"if [ -n \"$gf_nv\" ]; then {'; '.join(NVIDIA_PARTS)}; fi",
    f"echo '{SECTION}efa-installer'; [ -f /opt/amazon/efa_installed_packages ] && head -n 3 /opt/amazon/efa_installed_packages",
    f"echo '{SECTION}end'",
])


@dataclass(frozen=True)
class Gpu:
    index: int
    model: str
    memory_mib: int = 0
    bus_id: str = ""


@dataclass(frozen=True)
class Facts:
    os_id: str = ""
    os_version: str = ""
    kernel: str = ""
    arch: str = ""
    cpus: int = 0
    mem_gib: float = 0.0
    gpus: tuple[Gpu, ...] = ()
    """GPUs the driver sees (nvidia-smi)."""
    gpu_pci_count: int = 0
    """NVIDIA GPUs seen on the PCI bus, whether or not a driver is loaded."""
    gpu_pci_models: tuple[str, ...] = ()
    gpu_pci_bus_ids: tuple[str, ...] = ()
    """`10:1c.0` style (domain dropped), to name the GPUs nvidia-smi does not see."""
    nvswitch_count: int = 0
    efa_count: int = 0
    driver_version: str = ""
    driver_flavor: str = ""
    """`open` / `proprietary` kernel modules, from /proc/driver/nvidia/version ("" when not loaded)."""
    driver_packaging: str = ""
    """`apt` (a dpkg package provides it), `runfile` (NVIDIA's .run installer), "" (no driver / unknown)."""
    nvidia_packages: tuple[str, ...] = ()
    """Installed NVIDIA driver packages as `name=version`."""
    nvidia_smi_error: str = ""
    """What nvidia-smi printed besides GPU rows (e.g. "couldn't communicate with the NVIDIA driver")."""
    cuda_version: str = ""
    secure_boot: bool | None = None
    """None when unknown (no mokutil)."""
    efa_installer: str = ""
    """Version of the AWS EFA installer that last ran on the node ("" when never)."""
    cuda_toolkits: tuple[str, ...] = ()
    """CUDA toolkits under /usr/local/cuda-X.Y (with an nvcc), oldest first: `12.8.1` (`12.8` without a
    version.json)."""
    cuda_packages: tuple[str, ...] = ()
    """Installed `cuda-toolkit-X-Y`, `libnccl2`, `libnccl-dev` apt packages as `name=version`."""
    nccl_libraries: tuple[str, ...] = ()
    """`libnccl.so.2.X.Y` files inside toolkit directories (Deep Learning AMIs build NCCL there)."""
    fabric_manager: str = ""
    """Version `nv-fabricmanager --version` reports ("" when not installed)."""
    python: str = ""
    """The node's python3 (`3.10.12`; "" when there is none)."""
    cloud_init: bool = False
    """cloud-init is installed: a fresh VM may still be running it (and apt) during its first minutes."""
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def has_gpu(self) -> bool:
        return bool(self.gpus) or self.gpu_pci_count > 0

    @property
    def gpu_count(self) -> int:
        return max(len(self.gpus), self.gpu_pci_count)

    @property
    def os_name(self) -> str:
        """`ubuntu-22.04` style, the key of the version matrix."""
        return f"{self.os_id}-{self.os_version}" if self.os_id else ""

    def summary(self) -> str:
        gpus = f"{self.gpu_count}x {self.gpu_model or 'GPU'}" if self.has_gpu else "no GPU"
        driver = f", driver {self.driver_version}" if self.driver_version else ""
        return f"{self.os_name or 'unknown OS'}, {self.cpus} CPUs, {self.mem_gib:.0f} GiB, {gpus}{driver}"

    @property
    def existing_driver(self) -> NodeDriver:
        """The driver as provision.drivers.choose_driver weighs it (version, packaging, modules, GPUs seen)."""
        from provision.versions import NodeDriver  # versions imports nothing from here; keep facts importable alone

        return NodeDriver.from_facts(self)

    @property
    def gpu_model(self) -> str:
        if self.gpus:
            return self.gpus[0].model
        return self.gpu_pci_models[0] if self.gpu_pci_models else ""

    def to_dict(self) -> dict:
        return asdict(self)


def split_sections(output: str) -> dict[str, str]:
    sections: dict[str, list[str]] = {}
    current = None
    for line in output.splitlines():
        if line.startswith(SECTION):
            current = line[len(SECTION):].strip()
            sections[current] = []
        elif current is not None:
            sections[current].append(line)
    return {k: "\n".join(v).strip() for k, v in sections.items()}


def parse_os_release(text: str) -> tuple[str, str]:
    values = {}
    for line in text.splitlines():
        if "=" in line:
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip().strip('"')
    return values.get("ID", ""), values.get("VERSION_ID", "")


def parse_nvidia_smi(text: str) -> tuple[list[Gpu], str]:
    """Parse `nvidia-smi --query-gpu=index,name,memory.total,driver_version,pci.bus_id
    --format=csv,noheader,nounits`. Returns the GPUs and the driver version; other lines are ignored."""
    gpus, driver = [], ""
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 4 or not parts[0].isdigit():
            continue
        memory = int(float(parts[2])) if re.fullmatch(r"[\d.]+", parts[2]) else 0
        gpus.append(Gpu(int(parts[0]), parts[1], memory, parts[4] if len(parts) > 4 else ""))
        driver = driver or parts[3]
    return gpus, driver


def nvidia_smi_messages(text: str) -> str:
    """The lines of nvidia-smi output that are not GPU rows: its error messages."""
    lines = [line.strip() for line in text.splitlines()]
    return "\n".join(line for line in lines if line and not re.match(r"^\d+\s*,", line))


def parse_nvidia_version(text: str) -> str:
    """Driver version from /proc/driver/nvidia/version (`NVRM version: NVIDIA UNIX ... 550.90.07 ...`)."""
    match = re.search(r"NVRM version:.*?\b(\d{3,}\.\d+(?:\.\d+)?)\b", text)
    return match.group(1) if match else ""


def parse_driver_flavor(text: str) -> str:
    """`NVIDIA UNIX Open Kernel Module for x86_64` -> open; `NVIDIA UNIX x86_64 Kernel Module` -> proprietary."""
    line = next((x for x in text.splitlines() if x.startswith("NVRM version:")), "")
    if not line:
        return ""
    return "open" if "Open Kernel Module" in line else "proprietary"


@dataclass(frozen=True)
class PciDevice:
    slot: str
    cls: str
    vendor: str
    device: str
    description: str


PCI_LINE = re.compile(
    r"^(?P<slot>\S+)\s+(?P<clsname>.*?)\s*\[(?P<cls>[0-9a-f]{4})\]:\s*(?P<desc>.*?)"
    r"\s*\[(?P<vendor>[0-9a-f]{4}):(?P<device>[0-9a-f]{4})\]",
    re.IGNORECASE,
)


def parse_lspci(text: str) -> list[PciDevice]:
    """Parse `lspci -nn` lines, e.g.
    `00:1e.0 3D controller [0302]: NVIDIA Corporation GA100 [A100 SXM4 40GB] [10de:20b0] (rev a1)`."""
    devices = []
    for line in text.splitlines():
        m = PCI_LINE.match(line.strip())
        if m:
            devices.append(PciDevice(m["slot"], m["cls"].lower(), m["vendor"].lower(), m["device"].lower(), m["desc"]))
    return devices


def parse_sysfs_pci(text: str) -> list[PciDevice]:
    """Parse `<slot> <class> <vendor> <device>` lines read from /sys/bus/pci/devices/*, e.g.
    `0000:10:1c.0 0x030200 0x10de 0x20b0`."""
    devices = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) != 4 or not all(p.lower().startswith("0x") for p in parts[1:]):
            continue
        vendor, device = parts[2][2:].lower(), parts[3][2:].lower()
        name = PCI_GPU_NAMES.get(device, f"{vendor}:{device}") if vendor == NVIDIA_VENDOR else f"{vendor}:{device}"
        devices.append(PciDevice(parts[0], parts[1][2:6].lower(), vendor, device, f"[{name}]"))
    return devices


def gpu_name_from_pci(description: str) -> str:
    """`NVIDIA Corporation GA100 [A100 SXM4 40GB]` -> `A100 SXM4 40GB`."""
    bracketed = re.findall(r"\[([^\]]+)\]", description)
    return bracketed[-1] if bracketed else description.replace("NVIDIA Corporation", "").strip()


def short_bus_id(bus_id: str) -> str:
    """`00000000:10:1C.0` (nvidia-smi) / `0000:10:1c.0` (sysfs) / `10:1c.0` (lspci) -> `10:1c.0`."""
    return ":".join(bus_id.strip().lower().split(":")[-2:])


def parse_driver_packaging(packages: list[str], runfile: str) -> str:
    if "runfile" in runfile:
        return "runfile"
    if any(APT_DRIVER_PACKAGE.match(p) for p in packages):
        return "apt"
    return ""


def parse_secure_boot(text: str) -> bool | None:
    """`mokutil --sb-state`: "SecureBoot enabled" / "SecureBoot disabled" / "doesn't support Secure Boot"."""
    lowered = text.lower()
    if "secureboot enabled" in lowered:
        return True
    if "secureboot disabled" in lowered or re.search(r"(doesn't|does not|not) support", lowered):
        return False
    return None


def parse_efa_installer(text: str) -> str:
    """`# EFA installer version: 1.50.0` (first lines of /opt/amazon/efa_installed_packages)."""
    match = re.search(r"EFA installer version:\s*(\S+)", text)
    return match.group(1) if match else ""


def parse_cuda_toolkits(text: str) -> tuple[str, ...]:
    """CUDA_TOOLKITS_PROBE lines -> versions, oldest first: version.json's when it belongs to the directory's
    release, else the directory's `X.Y`."""
    found = []
    for line in text.splitlines():
        match = re.match(r"cuda-(\d+\.\d+)\b(.*)", line.strip())
        if not match:
            continue
        listed = re.search(r'"version"\s*:\s*"(\d+(?:\.\d+)+)"', match[2])
        found.append(listed[1] if listed and listed[1].startswith(match[1] + ".") else match[1])
    return tuple(sorted(set(found), key=lambda v: tuple(int(p) for p in v.split("."))))


def parse_nccl_libraries(text: str) -> tuple[str, ...]:
    return tuple(sorted({line.strip() for line in text.splitlines() if re.search(r"libnccl\.so\.2\.\d+", line)}))


def nccl_library_version(path: str) -> str:
    """`/usr/local/cuda-12.8/lib/libnccl.so.2.26.2` -> `2.26.2`."""
    match = re.search(r"libnccl\.so\.(\d+\.\d+\.\d+)$", path.strip())
    return match.group(1) if match else ""


def parse_fabric_manager(text: str) -> str:
    """`Fabric Manager version is : 580.167.08` -> `580.167.08`."""
    match = re.search(r"\b(\d+\.\d+(?:\.\d+)?)\b", text)
    return match.group(1) if match else ""


def parse_python(text: str) -> str:
    """`Python 3.10.12` -> `3.10.12`."""
    match = re.search(r"Python (\d+\.\d+(?:\.\d+)?)", text)
    return match.group(1) if match else ""


def parse_facts(output: str) -> Facts:
    s = split_sections(output)
    os_id, os_version = parse_os_release(s.get("os", ""))
    mem_kib = re.search(r"(\d+)", s.get("mem", ""))
    smi_text = s.get("nvidia-smi", "")
    gpus, driver = parse_nvidia_smi(smi_text)
    pci = parse_lspci(s.get("lspci", "")) or parse_sysfs_pci(s.get("pci", ""))
    pci_gpus = [d for d in pci if d.vendor == NVIDIA_VENDOR and d.cls in GPU_PCI_CLASSES]
    nvswitches = [d for d in pci if d.vendor == NVIDIA_VENDOR and d.device in NVSWITCH_DEVICE_IDS]
    efa = [d for d in pci if d.vendor == AMAZON_VENDOR and d.device in EFA_DEVICE_IDS]
    cuda = re.search(r"(\d+\.\d+(?:\.\d+)?)", s.get("cuda", ""))
    proc_version = s.get("nvidia-version", "")
    driver = driver or parse_nvidia_version(proc_version)
    packages = [line[3:].strip() for line in s.get("nvidia-pkgs", "").splitlines() if line.startswith("ii")]
    return Facts(
        os_id=os_id,
        os_version=os_version,
        kernel=s.get("kernel", ""),
        arch=s.get("arch", ""),
        cpus=int(s["cpus"]) if s.get("cpus", "").isdigit() else 0,
        mem_gib=round(int(mem_kib.group(1)) / 1024 / 1024, 1) if mem_kib else 0.0,
        gpus=tuple(gpus),
        gpu_pci_count=len(pci_gpus),
        gpu_pci_models=tuple(gpu_name_from_pci(d.description) for d in pci_gpus),
        gpu_pci_bus_ids=tuple(short_bus_id(d.slot) for d in pci_gpus),
        nvswitch_count=len(nvswitches),
        efa_count=len(efa),
        driver_version=driver,
        driver_flavor=parse_driver_flavor(proc_version),
        driver_packaging=parse_driver_packaging(packages, s.get("runfile", "")),
        nvidia_packages=tuple(packages),
        nvidia_smi_error=nvidia_smi_messages(smi_text),
        cuda_version=cuda.group(1) if cuda else "",
        secure_boot=parse_secure_boot(s.get("secureboot", "")),
        efa_installer=parse_efa_installer(s.get("efa-installer", "")),
        cuda_toolkits=parse_cuda_toolkits(s.get("cuda-toolkits", "")),
        cuda_packages=tuple(line[3:].strip() for line in s.get("cuda-pkgs", "").splitlines() if line.startswith("ii")),
        nccl_libraries=parse_nccl_libraries(s.get("nccl", "")),
        fabric_manager=parse_fabric_manager(s.get("fabricmanager", "")),
        python=parse_python(s.get("python", "")),
        cloud_init=s.get("cloud-init", "") == "present",
    )


def validate_gpu_facts(
    facts: Facts, expected_count: int, expected_model: str, instance_type: str, require_driver: bool = False
) -> None:
    """Stop setup when the node is not the machine its instance type promises.

    Raises FactsError naming both numbers when the GPU count differs from the catalog's, when the GPU
    model differs, and when the PCI bus shows more GPUs than nvidia-smi sees: always once a driver is
    loaded, and with `require_driver` (after the driver step) also when nvidia-smi sees none at all.
    """
    from provision.versions import gpu_family  # versions imports nothing from here; keep facts importable alone

    seen = facts.gpu_count
    if seen != expected_count:
        raise FactsError(
            f"{instance_type} should have {expected_count} {expected_model} GPUs (catalog) but this node shows "
            f"{seen}; a GPU may have failed. Stop and start the instance to move it to healthy hardware."
        )
    want = gpu_family(expected_model) or expected_model
    models = {m for m in (*facts.gpu_pci_models, *(g.model for g in facts.gpus)) if m}
    wrong = sorted(m for m in models if (gpu_family(m) or m) != want)
    if wrong:
        raise FactsError(f"{instance_type} should have {expected_model} GPUs (catalog) but this node has {', '.join(wrong)}")
    check_driver_sees_all(facts, require_driver)


def check_driver_sees_all(facts: Facts, require_driver: bool = False) -> None:
    """FactsError when lspci shows more NVIDIA GPUs than nvidia-smi lists (driver not loaded, or a GPU
    fell off the bus)."""
    on_bus, visible = facts.gpu_pci_count, len(facts.gpus)
    if visible >= on_bus or not (require_driver or facts.driver_version):
        return
    smi_bus = {short_bus_id(g.bus_id) for g in facts.gpus}
    missing = [b for b in facts.gpu_pci_bus_ids if b not in smi_bus]
    detail = f" (not visible: {', '.join(missing)})" if missing and visible else ""
    said = facts.nvidia_smi_error.splitlines()[0] if facts.nvidia_smi_error else ""
    said = f"; nvidia-smi said: {said}" if said else ""
    raise FactsError(
        f"lspci shows {on_bus} NVIDIA GPUs but nvidia-smi sees {visible}{detail}{said}. The driver is not "
        "loaded or a GPU has fallen off the bus (Xid 79): reboot the node; if it persists, stop and start "
        "the instance to move it to healthy hardware."
    )
