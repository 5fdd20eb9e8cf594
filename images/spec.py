"""BakeSpec: what `fab bake` is asked for, validated before any cloud call; BakeResult: what it made.

    >>> spec = BakeSpec(cloud="aws", ssh_cidrs=("203.0.113.4/32",))
    >>> spec.instance_type, spec.region, spec.zone, spec.family
    ('g5.xlarge', 'us-east-1', 'us-east-1a', 'gpuforge-ubuntu2204-cu130-torch213')

Choices made here, and why:

- The builder is a GPU instance type from the catalog (default: the cheapest single-GPU type, as for
  clusters). CPU-only builders are refused: the driver step picks open or proprietary kernel modules
  and the PyTorch CUDA build from the GPU model, and verify needs a GPU to prove the driver loads, so
  an image baked without one would hold no driver and a CPU torch. The image records the GPU model and
  module flavour it was baked for (tags/labels `gpu`, `driver-modules`).
- The base image is plain Ubuntu from Canonical (AWS: Canonical's SSM parameter; GCP: the
  ubuntu-os-cloud family), not a Deep Learning AMI/VM: those ship NVIDIA's .run driver, which the
  driver step keeps only when it runs a torch build of the matrix (provision/drivers.py). `base_image` overrides it.
- SSH to the builder comes only from `ssh_cidrs`, which is required: the controller's public address
  cannot be known offline, so the caller passes it (`fab bake` takes the stack's gpuforge:sshCidrs).
  On AWS an existing `security_group_id` may stand in for it (its rules decide).
- The root disk is small (default 100 GB): an image's size is the smallest disk an instance can boot
  from it, and clusters start at infra.spec.MIN_DISK_GB.
"""

from __future__ import annotations

import logging
import re
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timezone

from images.errors import BakeSpecError
from infra.catalog import choices_message
from infra.errors import SpecError
from infra.spec import MIN_DISK_GB, ClusterSpec

logger = logging.getLogger(__name__)

CLOUDS = ("aws", "gcp")
DEFAULT_OS = "ubuntu-22.04"
DEFAULT_KEEP = 3  # images per family kept after a bake: the new one and two to roll back to
MIN_BAKE_DISK_GB = 40  # Ubuntu (~3 GB) + driver, CUDA 13 toolkit (~8 GB), torch cu130 venv (~6 GB), headroom
DEFAULT_BAKE_DISK_GB = MIN_DISK_GB  # the largest size every cluster (>= MIN_DISK_GB) can boot from
# Canonical's public SSM parameters for its Ubuntu AMIs (ubuntu.com/aws "Find Ubuntu images": 24.04
# images are published as ebs-gp3 only, 22.04 as ebs-gp2).
AWS_BASE_PARAMETERS = {
    "ubuntu-22.04": "/aws/service/canonical/ubuntu/server/22.04/stable/current/amd64/hvm/ebs-gp2/ami-id",
    "ubuntu-24.04": "/aws/service/canonical/ubuntu/server/24.04/stable/current/amd64/hvm/ebs-gp3/ami-id",
}
# Canonical's GCE image families (project ubuntu-os-cloud; 24.04 is published only as -amd64/-arm64).
GCP_BASE_FAMILIES = {
    "ubuntu-22.04": "projects/ubuntu-os-cloud/global/images/family/ubuntu-2204-lts",
    "ubuntu-24.04": "projects/ubuntu-os-cloud/global/images/family/ubuntu-2404-lts-amd64",
}
GCP_DEFAULT_NETWORK = "default"
# GCE resource names (RFC 1035, 1-63 chars); AMI names allow more, we keep one rule for both clouds.
IMAGE_NAME_RE = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
AMI_ID_RE = re.compile(r"^ami-[0-9a-f]{8,17}$")
SSM_PATH_RE = re.compile(r"^(resolve:ssm:)?/[\w./-]+$")
GCE_IMAGE_RE = re.compile(
    r"^(https://www\.googleapis\.com/compute/v1/)?projects/[a-z][-a-z0-9]{4,28}[a-z0-9]"
    r"/global/images/(family/)?[a-z]([-a-z0-9]{0,61}[a-z0-9])?$"
)
SUBNET_RE = re.compile(r"^subnet-[0-9a-f]{8,17}$")
SECURITY_GROUP_RE = re.compile(r"^sg-[0-9a-f]{8,17}$")
WORLD = ("0.0.0.0/0", "::/0")
AWS_ONLY = ("subnet_id", "security_group_id")
GCP_ONLY = ("project", "network", "subnetwork", "accelerator")


@dataclass(frozen=True, kw_only=True)
class BakeSpec:
    cloud: str
    """aws or gcp."""
    os_name: str = DEFAULT_OS
    """A row of the version matrix (provision/versions.toml)."""
    instance_type: str = ""
    """The builder: a GPU type from the catalog; default g5.xlarge (AWS) / g2-standard-8 (GCP)."""
    accelerator: str = ""
    """GCP n1 builders only: NAME:COUNT, e.g. nvidia-tesla-t4:1."""
    region: str = ""
    """Default us-east-1 / us-central1; the image lives here (AMIs are regional)."""
    zone: str = ""
    """Default: the region's first zone in the catalog."""
    project: str = ""
    """GCP project (required on GCP)."""
    base_image: str = ""
    """AMI id or SSM parameter path (AWS); image or family path/URL (GCP). Default: plain Ubuntu."""
    disk_gb: int = DEFAULT_BAKE_DISK_GB
    """Root disk of the builder, hence the image's size."""
    keep: int = DEFAULT_KEEP
    """Newest images of the family kept after a successful bake (the new one included)."""
    ssh_cidrs: tuple[str, ...] = ()
    """Who may SSH to the builder; required unless security_group_id is given (AWS)."""
    subnet_id: str = ""
    """AWS: launch the builder in this subnet (e.g. the cluster's); default: a temporary VPC."""
    security_group_id: str = ""
    """AWS: use this security group (needs subnet_id); default: a temporary one for ssh_cidrs."""
    network: str = ""
    """GCP: VPC network name; default `default`. The bake adds a temporary SSH firewall rule."""
    subnetwork: str = ""
    """GCP: subnetwork name in the region, for custom-mode networks."""
    name: str = ""
    """Image name; default <family>-<UTC yyyymmdd-hhmmss>."""

    def __post_init__(self) -> None:
        if self.cloud not in CLOUDS:
            raise BakeSpecError(f"cloud {self.cloud!r} cannot be baked for; {choices_message(str(self.cloud), CLOUDS)}")
        self._check_os()
        self._check_cloud_only_fields()
        cluster = self._cluster_spec()
        for key in ("instance_type", "region", "zone", "ssh_cidrs"):
            object.__setattr__(self, key, getattr(cluster, key))
        if self.cloud == "gcp" and not self.project:
            raise BakeSpecError("project is empty: a GCP bake needs the project the image goes to")
        if not isinstance(self.keep, int) or self.keep < 1:
            raise BakeSpecError(
                f"keep must be an integer >= 1 (the image just baked is always kept), got {self.keep!r}")
        if not isinstance(self.disk_gb, int) or not MIN_BAKE_DISK_GB <= self.disk_gb <= MIN_DISK_GB:
            raise BakeSpecError(
                f"disk_gb must be between {MIN_BAKE_DISK_GB} and {MIN_DISK_GB}, got {self.disk_gb!r}: the image's "
                f"size is the smallest disk a node can boot it from, and clusters start at {MIN_DISK_GB} GB"
            )
        if self.name and not IMAGE_NAME_RE.match(self.name):
            raise BakeSpecError(
                f"name {self.name!r} must be 1-63 lowercase letters, digits and '-', starting with a letter "
                "and not ending with '-'"
            )
        self._check_base_image()
        self._check_network()

    def _check_os(self) -> None:
        from provision.errors import MatrixError
        from provision.versions import supported_os, version_set

        try:
            version_set(self.os_name)
        except MatrixError as exc:
            choices = choices_message(str(self.os_name), supported_os())
            raise BakeSpecError(f"os_name {self.os_name!r}: {choices}") from exc

    def _check_cloud_only_fields(self) -> None:
        other = GCP_ONLY if self.cloud == "aws" else AWS_ONLY
        for key in other:
            if getattr(self, key):
                where = "gcp" if key in GCP_ONLY else "aws"
                raise BakeSpecError(f"{key} applies only to {where} bakes; leave it empty for a {self.cloud} bake")

    def _cluster_spec(self) -> ClusterSpec:
        """The catalog checks ClusterSpec does (type, accelerator, region, zone, CIDRs), with its defaults."""
        try:
            return ClusterSpec(
                cloud=self.cloud, name="bake", instance_type=self.instance_type, accelerator=self.accelerator,
                region=self.region, zone=self.zone, ssh_cidrs=self.ssh_cidrs, project=self.project,
            )
        except SpecError as exc:
            raise BakeSpecError(f"bake spec: {exc}") from exc

    def _check_base_image(self) -> None:
        if not self.base_image:
            return
        if self.cloud == "aws" and not (AMI_ID_RE.match(self.base_image) or SSM_PATH_RE.match(self.base_image)):
            raise BakeSpecError(
                f"base_image {self.base_image!r} is neither an AMI id (ami-0123456789abcdef0) nor an SSM parameter "
                f"path (e.g. {AWS_BASE_PARAMETERS[DEFAULT_OS]})"
            )
        if self.cloud == "gcp" and not GCE_IMAGE_RE.match(self.base_image):
            raise BakeSpecError(
                f"base_image {self.base_image!r} is not a GCE image path; write projects/PROJECT/global/images/NAME "
                f"or projects/PROJECT/global/images/family/FAMILY (e.g. {GCP_BASE_FAMILIES[DEFAULT_OS]})"
            )

    def _check_network(self) -> None:
        if self.subnet_id and not SUBNET_RE.match(self.subnet_id):
            raise BakeSpecError(f"subnet_id {self.subnet_id!r} is not a subnet id (subnet-0123456789abcdef0)")
        if self.security_group_id and not SECURITY_GROUP_RE.match(self.security_group_id):
            raise BakeSpecError(f"security_group_id {self.security_group_id!r} is not a security group id (sg-...)")
        if self.security_group_id and not self.subnet_id:
            raise BakeSpecError("security_group_id needs subnet_id: a security group belongs to one VPC")
        for key in ("network", "subnetwork"):
            value = getattr(self, key)
            if value and not IMAGE_NAME_RE.match(value):
                raise BakeSpecError(f"{key} {value!r} is not a GCE resource name (lowercase letters, digits, '-')")
        if not self.ssh_cidrs and not self.security_group_id:
            raise BakeSpecError(
                "ssh_cidrs is empty: the controller must reach the builder over SSH, and its public address "
                "cannot be guessed; give your address as the internet sees it: "
                "`gpuforge bake --ssh-cidr 203.0.113.4/32` "
                "(ssh_cidrs=('203.0.113.4/32',) in Python)"
            )
        if any(c in WORLD for c in self.ssh_cidrs):
            logger.warning("ssh_cidrs %s opens the builder's SSH to the whole internet for the bake", self.ssh_cidrs)

    # -- derived --------------------------------------------------------------------------------
    @property
    def family(self) -> str:
        """GCE image family, and the `family` tag of AMIs: one per OS, CUDA and torch release."""
        from provision.versions import image_family

        return image_family(self.os_name, self.gpus[0])

    @property
    def gpus(self) -> tuple[str, int]:
        """(GPU model, count) of the builder."""
        from infra.catalog import gpus_of

        model, count, _ = gpus_of(self.cloud, self.instance_type, self.accelerator or None)
        return model, count

    @property
    def base_image_ref(self) -> str:
        """The base image to resolve: the override, else Canonical's Ubuntu for the OS."""
        if self.base_image:
            return self.base_image
        return (AWS_BASE_PARAMETERS if self.cloud == "aws" else GCP_BASE_FAMILIES)[self.os_name]


@dataclass(frozen=True)
class BakeNames:
    """Names of one bake run: the builder (also the `gpuforge:cluster` tag of every temporary
    resource, so `fab sweep --cluster <builder>` finds them if the controller dies mid-bake) and the image."""

    builder: str
    image: str

    @classmethod
    def new(cls, spec: BakeSpec, now: datetime | None = None) -> BakeNames:
        now = now or datetime.now(timezone.utc)
        builder = f"bake-{now:%y%m%d-%H%M%S}-{secrets.token_hex(2)}"  # 23 chars: a valid cluster name
        return cls(builder=builder, image=spec.name or f"{spec.family}-{now:%Y%m%d-%H%M%S}")


@dataclass
class BakeResult:
    cloud: str
    image_id: str
    """AMI id, or the GCE image's self link."""
    name: str
    family: str
    tags: dict[str, str]
    """AMI tags, or GCE image labels."""
    builder_id: str
    seconds: float
    deleted_images: list[str] = field(default_factory=list)
    """Older images of the family removed to keep `keep` (AMIs with their snapshots)."""
    warnings: list[str] = field(default_factory=list)
    """What went wrong after the image was made (pruning), without failing the bake."""
