"""ClusterSpec: what the user asks for, validated against the catalog before any cloud call.

    >>> spec = ClusterSpec(cloud="aws", name="demo", nodes=2, instance_type="p4d.24xlarge",
    ...                    ssh_cidrs=["203.0.113.4/32"], ssh_public_key="ssh-ed25519 AAAA... me")
    >>> spec.gpu_count, spec.efa_interfaces, spec.cost_per_hour
    (8, 4, 43.9153)

A bad value raises `SpecError` with one line that names the value and the valid choices. Stack config
(`gpuforge:*` keys, as `pulumi config` stores them) becomes a spec through `ClusterSpec.from_stack_config`.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from infra import autostop as autostop_rules
from infra import catalog
from infra.cluster import ClusterInfo, NodeInfo
from infra.errors import SpecError

logger = logging.getLogger(__name__)

# Lowercase DNS label, short enough that every derived cloud name fits: the GCP service account id
# "gf-<name>-sa" has a 30-character limit, the S3 bucket prefix "gpuforge-<name>-" a 37-character one.
NAME_RE = re.compile(r"^[a-z]([a-z0-9-]{0,22}[a-z0-9])?$")
MAX_NODES = 128  # a guard against typos (nodes=200 instead of 2); raise it when you really mean it
# The Deep Learning AMIs and DLVM images ship ~75 GB root images; 100 GB leaves room for the venv and data.
MIN_DISK_GB = 100
MAX_DISK_GB = 16384  # gp3 and pd-balanced volumes stop at 16 TiB
DEFAULT_DISK_GB = 200
GCP_PROJECT_RE = re.compile(r"^[a-z][a-z0-9-]{4,28}[a-z0-9]$")  # GCP project id rules
SSH_KEY_TYPES = (
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
)
# EC2 ImportKeyPair imports only RSA and ED25519 public keys (EC2 API reference, ImportKeyPair); GCE metadata
# `ssh-keys` takes every OpenSSH type above.
AWS_SSH_KEY_TYPES = ("ssh-ed25519", "ssh-rsa")
CLUSTER_ID_RE = re.compile(r"^[a-z0-9]{6,32}$")  # a GCP label value and an AWS tag value alike
NODE_USER = "ubuntu"  # the login user of Ubuntu cloud images, DLAMI and DLVM alike
NODE_SSH_PORT = 22
DEFAULTS = {  # per cloud: the cheapest widely available single-GPU type and the reference price region
    "aws": {"instance_type": "g5.xlarge", "region": "us-east-1"},
    "gcp": {"instance_type": "g2-standard-8", "region": "us-central1"},
}
# Stack config key (namespace gpuforge) -> ClusterSpec field.
STACK_KEYS = {
    "cloud": "cloud",
    "name": "name",
    "nodes": "nodes",
    "instanceType": "instance_type",
    "accelerator": "accelerator",
    "region": "region",
    "zone": "zone",
    "spot": "spot",
    "diskGb": "disk_gb",
    "sshCidrs": "ssh_cidrs",
    "sshPublicKey": "ssh_public_key",
    "sshKeyPath": "ssh_key_path",
    "image": "image",
    "os": "os",
    "clusterId": "cluster_id",
    "autostop": "autostop",
    "autodown": "autodown",
}
# Keys an earlier release took, with what replaces them.
RETIRED_KEYS = {
    "forceDestroyBucket": "the bucket is kept by every `gpuforge down` / `pulumi destroy` (data policy); "
                          "`gpuforge down --delete-data` deletes it after a confirmation",
}
SSH_CIDRS_HINT = (
    "gpuforge:sshCidrs is empty, so the nodes accept no SSH from the internet. Allow your address with: "
    "pulumi config set --path 'gpuforge:sshCidrs[0]' 203.0.113.4/32"
)


def _parse_cidrs(value: Any) -> tuple[str, ...]:
    """A JSON list, a comma-separated string or a sequence -> normalized CIDR strings."""
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"ssh_cidrs {text!r} is not a JSON list: {exc.msg}") from exc
        else:
            value = [part for part in text.split(",") if part.strip()]
    if not isinstance(value, list | tuple):
        raise ValueError(f"ssh_cidrs must be a list of CIDRs, got {value!r}")
    out = []
    for item in value:
        text = str(item).strip()
        try:
            out.append(str(ipaddress.ip_network(text, strict=True)))
        except ValueError as exc:
            raise ValueError(
                f"ssh_cidrs entry {text!r} is not a CIDR ({exc}); write e.g. 203.0.113.4/32 or 2001:db8::/64"
            ) from exc
    return tuple(dict.fromkeys(out))


class ClusterSpec(BaseModel):
    """A GPU cluster request. Frozen; construction validates everything against the catalog."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    cloud: Literal["local", "aws", "gcp"] = "local"
    name: str = "gpuforge"
    nodes: int = 1
    instance_type: str = ""
    accelerator: str = ""  # GCP n1 only: "nvidia-tesla-t4:1"
    region: str = ""
    zone: str = ""
    spot: bool = False
    disk_gb: int = DEFAULT_DISK_GB
    ssh_cidrs: tuple[str, ...] = ()  # empty: no SSH ingress from the internet
    ssh_public_key: str = ""
    ssh_key_path: str = ""  # private key on the controller, carried into ClusterInfo
    image: str = ""  # override: AMI id / GCE image self link or family URL
    os: Literal["ubuntu-22.04", "ubuntu-24.04"] = "ubuntu-22.04"
    project: str = ""  # GCP project
    cluster_id: str = ""  # random id given at registration: tags tell this cluster from another of its name
    autostop: int = autostop_rules.DEFAULT_S  # seconds idle before the nodes stop themselves; 0: never
    autodown: bool = False  # terminate instead of stop (and the stack goes when the last node does)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise SpecError(_one_line(exc)) from exc

    # -- field checks -------------------------------------------------------------------------
    @field_validator("name")
    @classmethod
    def _check_name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError(
                f"name {v!r} must be 1-24 characters of lowercase letters, digits and '-', "
                "starting with a letter and not ending with '-'"
            )
        return v

    @field_validator("nodes")
    @classmethod
    def _check_nodes(cls, v: int) -> int:
        if not 1 <= v <= MAX_NODES:
            raise ValueError(f"nodes must be between 1 and {MAX_NODES}, got {v}")
        return v

    @field_validator("disk_gb")
    @classmethod
    def _check_disk(cls, v: int) -> int:
        if not MIN_DISK_GB <= v <= MAX_DISK_GB:
            raise ValueError(f"disk_gb must be between {MIN_DISK_GB} and {MAX_DISK_GB}, got {v}")
        return v

    @field_validator("ssh_cidrs", mode="before")
    @classmethod
    def _check_cidrs(cls, v: Any) -> tuple[str, ...]:
        return _parse_cidrs(v)

    @field_validator("ssh_public_key")
    @classmethod
    def _check_public_key(cls, v: str) -> str:
        v = v.strip()
        if not v:
            return v
        if "PRIVATE KEY" in v:
            raise ValueError("ssh_public_key holds a private key; give the public key (the .pub file) instead")
        parts = v.split()
        if "\n" in v or len(parts) < 2 or parts[0] not in SSH_KEY_TYPES:
            raise ValueError(
                f"ssh_public_key {v[:24]!r}... is not one OpenSSH public key line; expected "
                f"'<type> <base64> [comment]' with type one of {', '.join(SSH_KEY_TYPES)}"
            )
        return v

    @field_validator("accelerator")
    @classmethod
    def _normalize_accelerator(cls, v: str) -> str:
        if not v.strip():
            return ""
        acc, count = catalog.parse_accelerator(v.strip())
        return f"{acc.name}:{count}"

    @field_validator("cluster_id")
    @classmethod
    def _check_cluster_id(cls, v: str) -> str:
        if v and not CLUSTER_ID_RE.match(v):
            raise ValueError(f"cluster_id {v!r} must be 6-32 lowercase letters and digits")
        return v

    @field_validator("autostop", mode="before")
    @classmethod
    def _parse_autostop(cls, v: Any) -> int:
        return autostop_rules.parse_autostop(v)  # "90" minutes, "90s", "2h", "off"; ints are seconds

    @field_validator("project")
    @classmethod
    def _check_project(cls, v: str) -> str:
        if v and not GCP_PROJECT_RE.match(v):
            raise ValueError(f"project {v!r} is not a GCP project id (6-30 lowercase letters, digits, '-')")
        return v

    # -- cross-field checks ------------------------------------------------------------------
    @model_validator(mode="before")
    @classmethod
    def _fill_cloud_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("cloud") not in DEFAULTS:
            return data
        data = dict(data)
        for key, default in DEFAULTS[data["cloud"]].items():
            if not data.get(key):
                data[key] = default
        if not data.get("zone") and data["region"] in catalog.regions(data["cloud"]):
            data["zone"] = catalog.zones(data["cloud"], data["region"])[0]
        return data

    @model_validator(mode="after")
    def _check_against_catalog(self) -> ClusterSpec:
        if self.cloud == "local":
            return self
        inst = catalog.find_instance(self.cloud, self.instance_type)
        zones = catalog.zones(self.cloud, self.region)
        if self.zone not in zones:
            raise ValueError(_zone_message(self.cloud, self.region, self.zone, zones))
        self._check_accelerator(inst)
        self._check_cloud_network()
        return self

    def _check_cloud_network(self) -> None:
        """What the cloud takes: EC2 imports RSA and ED25519 keys only; our VPCs and networks are IPv4-only."""
        key_type = self.ssh_public_key.split()[0] if self.ssh_public_key else ""
        if self.cloud == "aws" and key_type and key_type not in AWS_SSH_KEY_TYPES:
            raise ValueError(
                f"ssh_public_key has type {key_type}, but EC2 imports only {' and '.join(AWS_SSH_KEY_TYPES)} keys; "
                "make one with: ssh-keygen -t ed25519 -f ~/.ssh/gpuforge_ed25519"
            )
        ipv6 = [c for c in self.ssh_cidrs if ipaddress.ip_network(c).version == 6]
        if ipv6:
            raise ValueError(
                f"ssh_cidrs entry {ipv6[0]!r} is IPv6, but gpuforge's {self.cloud} networks are IPv4-only (the nodes "
                "get no IPv6 address, so the rule would let nobody in); give the IPv4 address you connect from, "
                "e.g. 203.0.113.4/32"
            )

    def _check_accelerator(self, inst: catalog.InstanceType) -> None:
        names = [a.name for a in catalog.accelerators()]
        if inst.accelerator_required and not self.accelerator:
            raise ValueError(
                f"{inst.name} has no built-in GPUs: set accelerator (gpuforge:accelerator) to NAME:COUNT, "
                f"e.g. nvidia-tesla-t4:1; valid names: {', '.join(names)}"
            )
        if self.accelerator and not inst.accelerator_required:
            raise ValueError(
                f"accelerator {self.accelerator!r} applies only to GCP n1 machine types; "
                f"{self.cloud} type {inst.name} has its GPUs built in, so leave accelerator empty"
            )
        if self.accelerator:
            acc, count = catalog.parse_accelerator(self.accelerator)
            limit = catalog.max_vcpus_for(acc.name, count)
            if inst.vcpus > limit:
                raise ValueError(
                    f"{inst.name} has {inst.vcpus} vCPUs but {count} x {acc.name} allows at most {limit}; "
                    "pick a smaller n1 machine type or more GPUs"
                )

    # -- what the rest of gpuforge reads -----------------------------------------------------
    @property
    def instance(self) -> catalog.InstanceType | None:
        """The catalog row (None for the local cloud)."""
        return None if self.cloud == "local" else catalog.find_instance(self.cloud, self.instance_type)

    @property
    def accelerator_name(self) -> str:
        return self.accelerator.partition(":")[0] if self.accelerator else ""

    @property
    def accelerator_count(self) -> int:
        return catalog.parse_accelerator(self.accelerator)[1] if self.accelerator else 0

    def _gpus(self) -> tuple[str, int, int]:
        if self.cloud == "local":
            return "", 0, 0
        return catalog.gpus_of(self.cloud, self.instance_type, self.accelerator or None)

    @property
    def gpu_model(self) -> str:
        return self._gpus()[0]

    @property
    def gpu_count(self) -> int:
        """GPUs per node."""
        return self._gpus()[1]

    @property
    def gpu_memory_gib(self) -> int:
        return self._gpus()[2]

    @property
    def efa_interfaces(self) -> int:
        return self.instance.efa_interfaces if self.instance else 0

    @property
    def nvswitch(self) -> bool:
        return bool(self.instance and self.instance.nvswitch)

    @property
    def cost_per_hour(self) -> float:
        """Estimated $/h for the whole cluster at catalog reference prices."""
        if self.cloud == "local":
            return 0.0
        return catalog.hourly_cost(self.cloud, self.instance_type, self.nodes, self.accelerator or None, self.spot)

    def check_deployable(self) -> None:
        """What a cloud deployment needs beyond a valid spec: a public key, and a project on GCP."""
        if self.cloud == "local":
            return
        if not self.ssh_public_key:
            raise SpecError(
                "ssh_public_key is empty: the nodes need the cluster's public key; set it with "
                "pulumi config set gpuforge:sshPublicKey \"$(cat ~/.ssh/id_ed25519.pub)\""
            )
        if self.cloud == "gcp" and not self.project:
            raise SpecError("project is empty: a GCP cluster needs one; set it with pulumi config set gcp:project ID")

    def node_name(self, rank: int) -> str:
        return f"{self.name}-{rank}"

    def cluster_info(
        self, addresses: list[tuple[str, str]], storage_url: str, extra: Mapping[str, Any] | None = None
    ) -> ClusterInfo:
        """The ClusterInfo of this spec's nodes, given (public, private) addresses in rank order."""
        if len(addresses) != self.nodes:
            raise SpecError(f"cluster {self.name} has {self.nodes} nodes but {len(addresses)} addresses were given")
        nodes = tuple(
            NodeInfo(
                name=self.node_name(rank),
                rank=rank,
                public_address=public,
                private_address=private,
                ssh_port=NODE_SSH_PORT,
                user=NODE_USER,
                key_path=self.ssh_key_path,
                gpu_model=self.gpu_model,
                gpu_count=self.gpu_count,
                instance_type=self.instance_type,
            )
            for rank, (public, private) in enumerate(addresses)
        )
        return ClusterInfo(
            name=self.name,
            cloud=self.cloud,
            nodes=nodes,
            region=self.region,
            storage_url=storage_url,
            extra={
                "zone": self.zone,
                "spot": self.spot,
                "accelerator": self.accelerator,
                "gpu_memory_gib": self.gpu_memory_gib,
                "efa_interfaces": self.efa_interfaces,
                "nvswitch": self.nvswitch,
                "os": self.os,
                "cost_per_hour": self.cost_per_hour,
                "project": self.project,
                "cluster_id": self.cluster_id,
                "autostop_s": self.autostop,
                "autodown": self.autodown,
                **(extra or {}),
            },
        )

    # -- stack config ------------------------------------------------------------------------
    @classmethod
    def from_stack_config(
        cls, values: Mapping[str, Any], cloud_default: str = "aws", name: str | None = None
    ) -> ClusterSpec:
        """Build a spec from stack config (`gpuforge:*` keys; `gcp:project`; `aws:region`/`gcp:region`
        as fallbacks). `name` (usually the stack name) applies when `gpuforge:name` is not set."""
        retired = sorted(k for k in values if k.partition(":")[2] in RETIRED_KEYS and k.startswith("gpuforge:"))
        if retired:
            key = retired[0].partition(":")[2]
            raise SpecError(f"stack config key gpuforge:{key} is no longer used: {RETIRED_KEYS[key]}; "
                            f"remove it with: pulumi config rm gpuforge:{key}")
        unknown = sorted(k for k in values if k.startswith("gpuforge:") and k.partition(":")[2] not in STACK_KEYS)
        if unknown:
            valid = ", ".join(f"gpuforge:{k}" for k in STACK_KEYS)
            raise SpecError(f"unknown stack config key(s) {', '.join(unknown)}; valid keys: {valid}, gcp:project")
        data: dict[str, Any] = {
            STACK_KEYS[k.partition(":")[2]]: v for k, v in values.items() if k.startswith("gpuforge:")
        }
        data.setdefault("cloud", cloud_default)
        if name and "name" not in data:
            data["name"] = name
        if values.get("gcp:project"):
            data.setdefault("project", values["gcp:project"])
        provider_region = values.get(f"{data['cloud']}:region")
        if provider_region and not data.get("region"):
            data["region"] = provider_region
        if data["cloud"] == "gcp" and values.get("gcp:zone") and not data.get("zone"):
            data["zone"] = values["gcp:zone"]
        return cls(**data)

    def to_stack_config(self) -> dict[str, str]:
        """The inverse of from_stack_config: every set field as a `gpuforge:*` string (plus gcp:project)."""
        out: dict[str, str] = {}
        for key, field in STACK_KEYS.items():
            value = getattr(self, field)
            if field == "autostop":
                out[f"gpuforge:{key}"] = autostop_rules.stack_value(value)
            elif isinstance(value, bool):
                out[f"gpuforge:{key}"] = "true" if value else "false"
            elif isinstance(value, tuple):
                out[f"gpuforge:{key}"] = json.dumps(list(value))
            elif value not in ("", None):
                out[f"gpuforge:{key}"] = str(value)
        if self.project:
            out["gcp:project"] = self.project
        return out


def _zone_message(cloud: str, region: str, zone: str, zones: list[str]) -> str:
    for other in catalog.regions(cloud):
        if zone in catalog.zones(cloud, other):
            return f"zone {zone!r} is in region {other}, not {region}; zones of {region}: {', '.join(zones)}"
    return f"unknown zone {zone!r} for {cloud} region {region}; {catalog.choices_message(zone, zones)}"


def _one_line(exc: ValidationError) -> str:
    """pydantic's multi-line report -> one line per problem, joined; our own messages pass through."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            valid = ", ".join(ClusterSpec.model_fields)
            parts.append(f"unknown field {loc!r}; valid fields: {valid}")
        elif err["type"] == "value_error":
            parts.append(msg)
        else:
            parts.append(f"{loc}: {msg} (got {err['input']!r})")
    return "; ".join(parts)
