"""Node facts: OS, CPUs, RAM, GPUs, NVSwitches, EFA, existing driver and CUDA.

Gathered with one shell command that prints tagged sections, then parsed here, so that the
parsing is tested on recorded outputs of the real tools (tests/unit/fixtures/facts/).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

NVIDIA_VENDOR = "10de"
AMAZON_VENDOR = "1d0f"
# NVSwitch PCI device ids (bridge class 0680): 1af1 = NVSwitch gen 2 (A100 HGX), 22a3 = gen 3 (H100/H200 HGX).
NVSWITCH_DEVICE_IDS = frozenset({"1af1", "22a3", "22a4"})
# EFA PCI device ids from the Amazon EFA driver (efa0 = gen1, efa1 = gen2, efa2/efa3 = gen3+).
EFA_DEVICE_IDS = frozenset({"efa0", "efa1", "efa2", "efa3"})
SECTION = "##gpuforge:"

GATHER_COMMAND = "; ".join(
    [
        f"echo '{SECTION}os'; cat /etc/os-release 2>/dev/null",
        f"echo '{SECTION}kernel'; uname -r",
        f"echo '{SECTION}arch'; uname -m",
        f"echo '{SECTION}cpus'; nproc",
        f"echo '{SECTION}mem'; grep MemTotal /proc/meminfo",
        f"echo '{SECTION}nvidia-smi'; nvidia-smi --query-gpu=index,name,memory.total,driver_version,pci.bus_id"
        " --format=csv,noheader,nounits 2>/dev/null",
        f"echo '{SECTION}nvidia-version'; cat /proc/driver/nvidia/version 2>/dev/null",
        f"echo '{SECTION}lspci'; lspci -nn 2>/dev/null | grep -Ei '\\[(10de|1d0f):' ",
        f"echo '{SECTION}cuda'; cat /usr/local/cuda/version.json 2>/dev/null | grep -A1 '\"cuda\"' | grep version",
        f"echo '{SECTION}end'",
    ]
)


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
    gpu_pci_count: int = 0
    """NVIDIA GPUs seen on the PCI bus, whether or not a driver is loaded."""
    gpu_pci_models: tuple[str, ...] = ()
    nvswitch_count: int = 0
    efa_count: int = 0
    driver_version: str = ""
    cuda_version: str = ""
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
        return f"{self.os_name or 'unknown OS'}, {self.cpus} CPUs, {self.mem_gib:.0f} GiB, {gpus}"

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
    --format=csv,noheader,nounits`. Returns the GPUs and the driver version."""
    gpus, driver = [], ""
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 4 or not parts[0].isdigit():
            continue
        memory = int(float(parts[2])) if re.fullmatch(r"[\d.]+", parts[2]) else 0
        gpus.append(Gpu(int(parts[0]), parts[1], memory, parts[4] if len(parts) > 4 else ""))
        driver = driver or parts[3]
    return gpus, driver


def parse_nvidia_version(text: str) -> str:
    """Driver version from /proc/driver/nvidia/version (`NVRM version: NVIDIA UNIX ... 550.90.07 ...`)."""
    match = re.search(r"NVRM version:.*?\b(\d{3,}\.\d+(?:\.\d+)?)\b", text)
    return match.group(1) if match else ""


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


def gpu_name_from_pci(description: str) -> str:
    """`NVIDIA Corporation GA100 [A100 SXM4 40GB]` -> `A100 SXM4 40GB`."""
    bracketed = re.findall(r"\[([^\]]+)\]", description)
    return bracketed[-1] if bracketed else description.replace("NVIDIA Corporation", "").strip()


def parse_facts(output: str) -> Facts:
    s = split_sections(output)
    os_id, os_version = parse_os_release(s.get("os", ""))
    mem_kib = re.search(r"(\d+)", s.get("mem", ""))
    gpus, driver = parse_nvidia_smi(s.get("nvidia-smi", ""))
    pci = parse_lspci(s.get("lspci", ""))
    pci_gpus = [d for d in pci if d.vendor == NVIDIA_VENDOR and d.cls in ("0300", "0302")]
    nvswitches = [d for d in pci if d.vendor == NVIDIA_VENDOR and d.device in NVSWITCH_DEVICE_IDS]
    efa = [d for d in pci if d.vendor == AMAZON_VENDOR and d.device in EFA_DEVICE_IDS]
    cuda = re.search(r"(\d+\.\d+(?:\.\d+)?)", s.get("cuda", ""))
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
        nvswitch_count=len(nvswitches),
        efa_count=len(efa),
        driver_version=driver or parse_nvidia_version(s.get("nvidia-version", "")),
        cuda_version=cuda.group(1) if cuda else "",
    )
