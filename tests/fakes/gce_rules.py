"""The rules Compute Engine applies to an instance insert, for tests/fakes/gce.py, with where each comes from.

- Offerings: a machine type or accelerator type exists only in some zones (machineTypes.list / acceleratorTypes.list
  per zone). Inserting one elsewhere is a 400: "Invalid value for field 'resource.machineType': '...'. Machine type
  with name 'X' does not exist in zone 'Z'." `DEFAULT_OFFERINGS` below is a small stand-in table in the spirit of
  cloud.google.com/compute/docs/gpus/gpu-regions-zones, not Google's real availability; tests set their own.
- gVNIC: "A3 ... machine types require gVNIC" (compute/docs/networking/using-gvnic): an A3 instance whose network
  interface is not `nicType: GVNIC` is refused with 400.
- Compact placement: a resource policy with groupPlacementPolicy (COLLOCATED) is accepted only for the supported
  series (AI Hypercomputer "Compact placement policy and workload policy overview": A4X, A4, A3, A2, G4, G2 among the
  GPU series; N1 is not one) -> 400 for an n1 instance.
- Capacity: when a zone has no capacity for a type the insert operation ends with error code
  ZONE_RESOURCE_POOL_EXHAUSTED and "The zone 'projects/P/zones/Z' does not have enough resources available to
  fulfill the request.  '(resource type:compute)'." and no instance is left (as recorded in scylladb/
  scylla-cluster-tests#12477 and googleapis/nodejs-compute#377).
- GPU quota: GPUs count against a regional quota per model (compute/resource-usage#gpu_quota: NVIDIA_A100_GPUS,
  NVIDIA_L4_GPUS, ...; Spot VMs against PREEMPTIBLE_NVIDIA_..._GPUS) and the project-wide GPUS_ALL_REGIONS. Past it
  the operation ends with QUOTA_EXCEEDED, "Quota 'NVIDIA_A100_GPUS' exceeded.  Limit: 8.0 in region us-central1."
"""

from __future__ import annotations

import re

# The GPUs of accelerator-optimized machine types (compute/docs/accelerator-optimized-machines).
G2_GPUS = {"4": 1, "8": 1, "12": 1, "16": 1, "24": 2, "32": 1, "48": 4, "96": 8}
ACCELERATOR_METRICS = {"nvidia-tesla-t4": "NVIDIA_T4_GPUS", "nvidia-tesla-v100": "NVIDIA_V100_GPUS",
                       "nvidia-tesla-p100": "NVIDIA_P100_GPUS", "nvidia-tesla-p4": "NVIDIA_P4_GPUS"}
COMPACT_SERIES = ("a2-", "a3-", "a4-", "g2-", "g4-")
GVNIC_SERIES = ("a3-",)
GLOBAL_GPU_METRIC = "GPUS_ALL_REGIONS"

_ALL_N1 = [f"n1-{kind}-{size}" for kind in ("standard", "highmem", "highcpu") for size in (1, 2, 4, 8, 16, 32, 64, 96)
           if not (kind != "standard" and size == 1)]
_G2 = [f"g2-standard-{n}" for n in G2_GPUS]
_A2 = ([f"a2-highgpu-{n}g" for n in (1, 2, 4, 8)] + ["a2-megagpu-16g"] + [f"a2-ultragpu-{n}g" for n in (1, 2, 4, 8)])
_A3 = [f"a3-highgpu-{n}g" for n in (1, 2, 4, 8)] + ["a3-megagpu-8g"]
DEFAULT_OFFERINGS: dict[str, dict[str, list[str]]] = {
    "us-central1-a": {"machineTypes": _ALL_N1 + _G2 + _A2[:5], "acceleratorTypes": ["nvidia-tesla-t4", "nvidia-tesla-v100", "nvidia-tesla-p4"]},
    "us-central1-b": {"machineTypes": _ALL_N1 + _G2 + _A2 + _A3, "acceleratorTypes": ["nvidia-tesla-t4", "nvidia-tesla-v100"]},
    "us-central1-c": {"machineTypes": _ALL_N1 + _G2 + _A2 + _A3, "acceleratorTypes": ["nvidia-tesla-t4", "nvidia-tesla-v100", "nvidia-tesla-p100"]},
    "us-central1-f": {"machineTypes": _ALL_N1 + _A2[:5], "acceleratorTypes": ["nvidia-tesla-t4", "nvidia-tesla-v100", "nvidia-tesla-p100"]},
    "europe-west4-a": {"machineTypes": _ALL_N1 + _G2 + _A2[:5], "acceleratorTypes": ["nvidia-tesla-t4", "nvidia-tesla-v100"]},
}


class InsertRefused(Exception):
    def __init__(self, code: int, reason: str, message: str):
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message


def last(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


def gpu_demand(instance: dict) -> tuple[str, int]:
    """(quota metric, GPUs) an instance body asks for; ("", 0) for a VM without GPUs."""
    machine = last(instance.get("machineType", ""))
    spot = instance.get("scheduling", {}).get("provisioningModel") == "SPOT" or \
        instance.get("scheduling", {}).get("preemptible") is True
    metric, count = "", 0
    if machine.startswith("g2-standard-"):
        metric, count = "NVIDIA_L4_GPUS", G2_GPUS.get(machine.rsplit("-", 1)[1], 0)
    elif match := re.fullmatch(r"a2-(highgpu|megagpu|ultragpu)-(\d+)g", machine):
        metric = "NVIDIA_A100_80GB_GPUS" if match.group(1) == "ultragpu" else "NVIDIA_A100_GPUS"
        count = int(match.group(2))
    elif match := re.fullmatch(r"a3-(highgpu|megagpu)-(\d+)g", machine):
        metric = "NVIDIA_H100_MEGA_GPUS" if match.group(1) == "megagpu" else "NVIDIA_H100_GPUS"
        count = int(match.group(2))
    for accelerator in instance.get("guestAccelerators", []):
        metric = ACCELERATOR_METRICS.get(last(accelerator.get("acceleratorType", "")), metric)
        count += int(accelerator.get("acceleratorCount", 0))
    if metric and spot:
        metric = f"PREEMPTIBLE_{metric}"
    return metric, count


def check_instance(body: dict, zone: str, offerings: dict[str, dict[str, list[str]]],
                   policies: dict[str, dict]) -> None:
    """The synchronous 400s of instances.insert; `policies` maps a resource policy's self link to its body."""
    machine_ref = body.get("machineType", "")
    machine = last(machine_ref)
    if "/zones/" in f"/{machine_ref}" and f"zones/{zone}/" not in machine_ref:
        raise InsertRefused(400, "invalid", f"Invalid value for field 'resource.machineType': '{machine_ref}'. "
                                            f"Machine type must be in zone '{zone}'.")
    offered = offerings.get(zone, {})
    if machine not in offered.get("machineTypes", []):
        raise InsertRefused(400, "invalid", f"Invalid value for field 'resource.machineType': '{machine_ref}'. "
                                            f"Machine type with name '{machine}' does not exist in zone '{zone}'.")
    for i, accelerator in enumerate(body.get("guestAccelerators", [])):
        name = last(accelerator.get("acceleratorType", ""))
        if name not in offered.get("acceleratorTypes", []):
            raise InsertRefused(400, "invalid",
                                f"Invalid value for field 'resource.guestAccelerators[{i}].acceleratorType': "
                                f"'{accelerator.get('acceleratorType')}'. Accelerator type '{name}' does not exist "
                                f"in zone '{zone}'.")
    if machine.startswith(GVNIC_SERIES):
        for i, nic in enumerate(body.get("networkInterfaces", [])):
            if nic.get("nicType") != "GVNIC":
                raise InsertRefused(400, "invalid",
                                    f"Invalid value for field 'resource.networkInterfaces[{i}].nicType': "
                                    f"'{nic.get('nicType', '')}'. {machine} requires the GVNIC network interface type.")
    for link in body.get("resourcePolicies", []):
        policy = policies.get(link)
        if policy and policy.get("groupPlacementPolicy") and not machine.startswith(COMPACT_SERIES):
            raise InsertRefused(400, "invalid",
                                f"Invalid value for field 'resource.resourcePolicies': '{link}'. Compact placement "
                                f"policies are not supported for machine type {machine}.")


def capacity_error(project: str, zone: str) -> dict:
    return {"code": "ZONE_RESOURCE_POOL_EXHAUSTED",
            "message": f"The zone 'projects/{project}/zones/{zone}' does not have enough resources available to "
                       "fulfill the request.  '(resource type:compute)'."}


def quota_error(metric: str, limit: float, where: str) -> dict:
    return {"code": "QUOTA_EXCEEDED", "message": f"Quota '{metric}' exceeded.  Limit: {limit:.1f} {where}."}
