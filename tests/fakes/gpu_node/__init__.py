"""A VM-like local node that looks like a fresh GPU instance to `fab setup` (no GPU, NVIDIA repository or EFA
device exists here): the instance type's PCI devices, the OS release asked for, and stand-ins (fake.py) for the
tools the GPU plans run, which record who ran them and answer as the real tools do.

The device lists follow `lspci -nn`'s format with PCI ids from pci.ids (as tests/unit/fixtures/facts/ do) and the
instance types' published shapes (the catalog: GPUs, NVSwitches, EFA interfaces); they were not recorded on live
machines.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from infra.cluster import ClusterInfo

KIT = Path(__file__).resolve().parent
OS_RELEASE = {  # Ubuntu's /etc/os-release (the fields facts read: ID, VERSION_ID)
    "ubuntu-22.04": 'PRETTY_NAME="Ubuntu 22.04.5 LTS"\nNAME="Ubuntu"\nVERSION_ID="22.04"\n'
                    'VERSION="22.04.5 LTS (Jammy Jellyfish)"\nVERSION_CODENAME=jammy\nID=ubuntu\nID_LIKE=debian\n',
    "ubuntu-24.04": 'PRETTY_NAME="Ubuntu 24.04.3 LTS"\nNAME="Ubuntu"\nVERSION_ID="24.04"\n'
                    'VERSION="24.04.3 LTS (Noble Numbat)"\nVERSION_CODENAME=noble\nID=ubuntu\nID_LIKE=debian\n',
}
# (GPU name as nvidia-smi reports it, MiB, lspci description [vendor:device]), per GPU model.
GPU = {
    "A100": ("NVIDIA A100-SXM4-40GB", 40960, "3D controller [0302]: NVIDIA Corporation GA100 [A100 SXM4 40GB] [10de:20b0] (rev a1)"),
    "H100": ("NVIDIA H100 80GB HBM3", 81559, "3D controller [0302]: NVIDIA Corporation GH100 [H100 SXM5 80GB] [10de:2330] (rev a1)"),
    "A10G": ("NVIDIA A10G", 23028, "3D controller [0302]: NVIDIA Corporation GA102GL [A10G] [10de:2237] (rev a1)"),
    "T4": ("Tesla T4", 15360, "3D controller [0302]: NVIDIA Corporation TU104GL [Tesla T4] [10de:1eb8] (rev a1)"),
}
NVSWITCH = {"A100": "Bridge [0680]: NVIDIA Corporation GA100 [A100 NVSwitch] [10de:1af1] (rev a1)",
            "H100": "Bridge [0680]: NVIDIA Corporation GH100 [H100 NVSwitch] [10de:22a3] (rev a1)"}
EFA = {"efa0": "Ethernet controller [0200]: Amazon.com, Inc. Elastic Fabric Adapter (EFA) [1d0f:efa0]",
       "efa1": "Ethernet controller [0200]: Amazon.com, Inc. Elastic Fabric Adapter (EFA) [1d0f:efa1]"}


@dataclass(frozen=True)
class Shape:
    cloud: str
    gpu: str
    gpus: int
    nvswitches: int = 0
    efa: int = 0
    efa_id: str = "efa0"


SHAPES = {  # the catalog's rows (infra/catalog/*.csv) and the HGX boards' NVSwitch counts (provision/plan.py)
    "p4d.24xlarge": Shape("aws", "A100", 8, nvswitches=6, efa=4, efa_id="efa0"),
    "p5.48xlarge": Shape("aws", "H100", 8, nvswitches=4, efa=32, efa_id="efa1"),
    "g5.xlarge": Shape("aws", "A10G", 1),
    "g4dn.xlarge": Shape("aws", "T4", 1),
    "a3-highgpu-8g": Shape("gcp", "H100", 8, nvswitches=4),
}


def profile(instance_type: str, os_name: str, hazards: dict | None = None) -> dict:
    shape = SHAPES[instance_type]
    name, memory, pci = GPU[shape.gpu]
    lspci = ["00:04.0 Non-Volatile memory controller [0108]: Amazon.com, Inc. NVMe EBS Controller [1d0f:8061]"]
    lspci += [f"{0x07 + i:02x}:00.0 {NVSWITCH[shape.gpu]}" for i in range(shape.nvswitches)]
    gpus = []
    for i in range(shape.gpus):
        bus = f"{0x10 + 0x10 * i:02x}:1c.0" if shape.gpus > 1 else "00:1e.0"
        lspci.append(f"{bus} {pci}")
        gpus.append({"index": i, "name": name, "memory_mib": memory, "bus_id": f"00000000:{bus.upper()}"})
    lspci += [f"{0x80 + i:02x}:00.0 {EFA[shape.efa_id]}" for i in range(shape.efa)]
    return {"instance_type": instance_type, "cloud": shape.cloud, "os_release": OS_RELEASE[os_name], "lspci": lspci,
            "gpus": gpus, "efa": shape.efa, "hazards": hazards or {}}


def boot_hook(folder: Path, instance_type: str, os_name: str, hazards: dict | None = None) -> str:
    """An executable that boots the stand-in node (root, inside the node): what create_local_cluster takes."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "profile.json").write_text(json.dumps(profile(instance_type, os_name, hazards)))
    hook = folder / "boot-hook"
    hook.write_text(f"#!/bin/sh\nexec /usr/bin/python3 {KIT / 'boot.py'} {folder / 'profile.json'}\n")
    hook.chmod(0o755)
    return str(hook)


def node_state(cluster: ClusterInfo, rank: int = 0) -> Path:
    """The node's /var/lib/gpuforge-fake, as its overlay keeps it (the host reads it without SSH)."""
    return Path(cluster.state_dir) / "nodes" / f"node-{rank}" / "disk" / "var-lib" / "upper" / "gpuforge-fake"


def calls(cluster: ClusterInfo, rank: int = 0) -> list[dict]:
    path = node_state(cluster, rank) / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def state(cluster: ClusterInfo, name: str, default=None, rank: int = 0):
    path = node_state(cluster, rank) / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else default
