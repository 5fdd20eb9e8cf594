"""Telling a capacity error (try the next zone) from a quota error (ask for more; another zone will not help) in
what a failed `pulumi up` printed, and saying how to raise a quota.

The texts are the providers' (recorded in public issue trackers, cited by tests/unit/test_capacity.py):
- AWS: `InsufficientInstanceCapacity: We currently do not have sufficient p4d.24xlarge capacity in the Availability
  Zone you requested (us-east-1a)...`; `Unsupported: Your requested instance type (...) is not supported in your
  requested Availability Zone`; quotas: `VcpuLimitExceeded: You have requested more vCPU capacity than your current
  vCPU limit of 32 allows...`, `AddressLimitExceeded: The maximum number of addresses has been reached.`,
  `InstanceLimitExceeded`.
- GCP: `ZONE_RESOURCE_POOL_EXHAUSTED[_WITH_DETAILS]` / "The zone 'projects/P/zones/Z' does not have enough resources
  available to fulfill the request"; quotas: `QUOTA_EXCEEDED` / "Quota 'NVIDIA_A100_GPUS' exceeded.  Limit: 8.0 in
  region us-central1."

InsufficientInstanceCapacity is not transient (STYLE.md): it means try elsewhere, which `fab up` does zone by zone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

AWS_CAPACITY = ("InsufficientInstanceCapacity", "InsufficientHostCapacity", "InsufficientReservedInstanceCapacity",
                "not supported in your requested Availability Zone")
GCP_CAPACITY = ("ZONE_RESOURCE_POOL_EXHAUSTED", "does not have enough resources available to fulfill the request")
# AWS quota error code -> (Service Quotas code, name); None: depends on the instance class
AWS_QUOTA_CODES = {"VcpuLimitExceeded": None, "AddressLimitExceeded": ("L-0263D0A3", "EC2-VPC Elastic IPs"),
                   "InstanceLimitExceeded": None, "MaxSpotInstanceCountExceeded": None}
# instance class (first letter of the type) and spot -> Service Quotas code and name (EC2 user guide, instance quotas)
AWS_VCPU_QUOTAS = {
    ("p", False): ("L-417A185B", "Running On-Demand P instances"),
    ("g", False): ("L-DB2E81BA", "Running On-Demand G and VT instances"),
    ("p", True): ("L-7212CCBC", "All P Spot Instance Requests"),
    ("g", True): ("L-3819A6DF", "All G and VT Spot Instance Requests"),
}
AWS_EIP_QUOTA = ("L-0263D0A3", "EC2-VPC Elastic IPs")
GCP_QUOTA_RE = re.compile(r"Quota '([A-Z0-9_]+)' exceeded\.?\s+Limit: ([\d.]+)(?: in region ([a-z0-9-]+)| globally)?")


@dataclass(frozen=True)
class Failure:
    kind: str  # "capacity" | "quota" | "other"
    message: str
    quota: str = ""  # the quota's code or metric, when kind == "quota"
    quota_name: str = ""
    limit: str = ""


def classify(cloud: str, text: str, instance_type: str = "", spot: bool = False) -> Failure:
    """What kind of failure a provider's error text is."""
    if cloud == "aws":
        if any(marker in text for marker in AWS_CAPACITY):
            return Failure("capacity", text)
        for code, quota in AWS_QUOTA_CODES.items():
            if code in text:
                quota = quota or AWS_VCPU_QUOTAS.get((instance_type[:1], spot), ("", "instance vCPUs"))
                limit = re.search(r"vCPU limit of (\d+)", text)
                return Failure("quota", text, quota[0], quota[1], limit.group(1) if limit else "")
        return Failure("other", text)
    if any(marker in text for marker in GCP_CAPACITY):
        return Failure("capacity", text)
    match = GCP_QUOTA_RE.search(text)
    if match or "QUOTA_EXCEEDED" in text:
        metric = match.group(1) if match else ""
        where = f"region {match.group(3)}" if match and match.group(3) else "all regions"
        return Failure("quota", text, metric, f"{metric} ({where})", match.group(2) if match else "")
    return Failure("other", text)


def aws_quota_hint(code: str, name: str, region: str, wanted: float | None = None) -> str:
    value = f" --desired-value {wanted:.0f}" if wanted else " --desired-value N"
    return (f"AWS quota {code} \"{name}\" in {region}; raise it in the Service Quotas console "
            f"(https://{region}.console.aws.amazon.com/servicequotas/home/services/ec2/quotas/{code}) or with: "
            f"aws service-quotas request-service-quota-increase --service-code ec2 --quota-code {code}{value} "
            f"--region {region}")


def gcp_quota_hint(metric: str, region: str, project: str) -> str:
    where = f"region {region}" if region != "global" else "all regions"
    return (f"GCP quota {metric} ({where}) of project {project}; raise it at "
            f"https://console.cloud.google.com/iam-admin/quotas?project={project} (filter: {metric})")
