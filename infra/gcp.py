"""GcpGpuCluster: a GPU cluster and its GCS bucket on GCP, as one Pulumi component.

Resources (labelled `gpuforge-cluster=<name>` wherever GCP takes labels, also through the provider's
default labels; networks, firewalls and the service account take none, and carry the name instead):

- a VPC network and one subnet in the region;
- firewall rules: SSH only from `ssh_cidrs` (none by default), all traffic between the cluster's nodes
  (selected by the network tag `gpuforge-<name>`);
- a compact placement policy when there is more than one node;
- one instance per node: the GPU machine type, or n1 plus guest accelerators; `onHostMaintenance:
  TERMINATE` (GPU VMs cannot live-migrate); the SPOT provisioning model when asked; a boot disk of
  `disk_gb` from the newest baked gpuforge image, else a Deep Learning VM image family; the cluster's public
  key in instance metadata (`ssh-keys`), project-wide keys blocked;
- a service account whose only storage grant is on this cluster's bucket (a bucket IAM member);
- a GCS bucket: uniform bucket-level access, public access prevention enforced, versioning, old versions
  deleted after a while, not force-destroyed unless configured.

Not done here: the 8 extra NICs that A3 Mega (GPUDirect-TCPXO) and A3 High (TCPX) need for full
inter-node bandwidth; the nodes talk over their one gVNIC.
"""

from __future__ import annotations

import logging
from typing import Any

import pulumi
import pulumi_gcp as gcp

from infra.cluster import CLUSTER_LABEL
from infra.spec import ClusterSpec

logger = logging.getLogger(__name__)

BAKED_LABEL = "gpuforge-baked"  # images/gcp.py labels the images it bakes with these three labels
OS_LABEL = "gpuforge-os"
MODULES_LABEL = "gpuforge-driver-modules"  # open | proprietary NVIDIA kernel modules (images/common.py)
SUBNET_CIDR = "10.42.0.0/20"
SSH_PORT = "22"
# Deep Learning VM image families (cloud.google.com/deep-learning-vm/docs/images): CUDA 12.8 with the
# NVIDIA 570 driver preinstalled. Override with gpuforge:image when Google retires a family.
DLVM_PROJECT = "deeplearning-platform-release"
DLVM_FAMILIES = {
    "ubuntu-22.04": "common-cu128-ubuntu-2204-nvidia-570",
    "ubuntu-24.04": "common-cu128-ubuntu-2404-nvidia-570",
}
BOOT_DISK_TYPE = "pd-balanced"  # supported by N1, G2, A2 and A3 High/Mega
GVNIC_FAMILIES = ("a3-",)  # A3 machine types require gVNIC
NONCURRENT_VERSION_DAYS = 30  # checkpoints overwritten more than a month ago are gone
BUCKET_ROLE = "roles/storage.objectAdmin"  # read, write, list and delete objects of this bucket only
NODE_SCOPES = [  # the service account's IAM grants decide what is allowed; scopes only narrow it further
    "https://www.googleapis.com/auth/devstorage.read_write",
    "https://www.googleapis.com/auth/logging.write",
    "https://www.googleapis.com/auth/monitoring.write",
]


def os_label(os_name: str) -> str:
    """'ubuntu-22.04' -> 'ubuntu-2204' (label values take no dots)."""
    return os_name.replace(".", "")


def dlvm_image(os_name: str) -> str:
    return f"projects/{DLVM_PROJECT}/global/images/family/{DLVM_FAMILIES[os_name]}"


def newest_image(images: list[Any]) -> str | None:
    """Self link of the newest image by creation timestamp (RFC 3339 strings sort by time)."""
    if not images:
        return None
    newest = max(images, key=lambda img: _field(img, "creation_timestamp"))
    return _field(newest, "self_link")


def _field(obj: Any, name: str) -> Any:
    return obj[name] if isinstance(obj, dict) else getattr(obj, name)


class GcpGpuCluster(pulumi.ComponentResource):
    """The cluster of `spec` on GCP; `cluster` is its ClusterInfo as a dict."""

    cluster: pulumi.Output[dict[str, Any]]

    def __init__(self, name: str, spec: ClusterSpec, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("gpuforge:gcp:GpuCluster", name, None, opts)
        self._name = name
        self._spec = spec
        self._labels = {CLUSTER_LABEL: spec.name}
        self._tag = f"gpuforge-{spec.name}"
        provider = gcp.Provider(
            f"{name}-gcp",
            project=spec.project,
            region=spec.region,
            zone=spec.zone,
            default_labels=self._labels,
            opts=pulumi.ResourceOptions(parent=self),
        )
        self._provider = provider
        self._child = pulumi.ResourceOptions(parent=self, provider=provider)

        subnet = self._create_network()
        account = gcp.serviceaccount.Account(
            f"{name}-sa", account_id=f"gf-{spec.name}-sa", display_name=f"gpuforge cluster {spec.name} nodes",
            opts=self._child,
        )
        bucket = self._create_bucket(account)
        policy = self._create_placement_policy()
        self.image = self._resolve_image()
        addresses = [self._create_node(rank, subnet, account, policy) for rank in range(spec.nodes)]

        self.bucket_name = bucket.name
        self.cluster = self._cluster_output(addresses, bucket.name)
        self.register_outputs({"cluster": self.cluster, "bucket": bucket.name, "image": self.image})

    def _create_network(self) -> gcp.compute.Subnetwork:
        n, spec = self._name, self._spec
        network = gcp.compute.Network(
            f"{n}-net", auto_create_subnetworks=False, description=f"gpuforge cluster {spec.name}", opts=self._child
        )
        subnet = gcp.compute.Subnetwork(
            f"{n}-subnet", network=network.id, region=spec.region, ip_cidr_range=SUBNET_CIDR,
            private_ip_google_access=True, description=f"gpuforge cluster {spec.name}", opts=self._child,
        )
        if spec.ssh_cidrs:
            gcp.compute.Firewall(
                f"{n}-ssh", network=network.id, direction="INGRESS",
                allows=[{"protocol": "tcp", "ports": [SSH_PORT]}], source_ranges=list(spec.ssh_cidrs),
                target_tags=[self._tag], description="SSH from gpuforge:sshCidrs", opts=self._child,
            )
        gcp.compute.Firewall(
            f"{n}-internal", network=network.id, direction="INGRESS", allows=[{"protocol": "all"}],
            source_tags=[self._tag], target_tags=[self._tag],
            description="all traffic between cluster nodes (NCCL)", opts=self._child,
        )
        return subnet

    def _create_bucket(self, account: gcp.serviceaccount.Account) -> gcp.storage.Bucket:
        n, spec = self._name, self._spec
        bucket = gcp.storage.Bucket(
            f"gpuforge-{spec.name}",  # Pulumi appends a random suffix: bucket names are global
            location=spec.region.upper(),
            uniform_bucket_level_access=True,
            public_access_prevention="enforced",
            versioning={"enabled": True},
            lifecycle_rules=[{
                "action": {"type": "Delete"},
                "condition": {"days_since_noncurrent_time": NONCURRENT_VERSION_DAYS, "with_state": "ARCHIVED"},
            }],
            force_destroy=spec.force_destroy_bucket,
            labels=self._labels,
            opts=self._child,
        )
        gcp.storage.BucketIAMMember(
            f"{n}-bucket-access", bucket=bucket.name, role=BUCKET_ROLE,
            member=account.email.apply(lambda email: f"serviceAccount:{email}"), opts=self._child,
        )
        return bucket

    def _create_placement_policy(self) -> gcp.compute.ResourcePolicy | None:
        if self._spec.nodes == 1:
            return None
        return gcp.compute.ResourcePolicy(
            f"{self._name}-placement", region=self._spec.region,
            group_placement_policy={"collocation": "COLLOCATED"},
            description=f"compact placement for gpuforge cluster {self._spec.name}", opts=self._child,
        )

    def _resolve_image(self) -> pulumi.Output[str]:
        """The override, else the newest baked gpuforge image for the OS and the GPU's kernel-module flavour (an
        image baked for V100s runs proprietary modules and torch cu126, one for A100s open modules and cu130),
        else a Deep Learning VM family."""
        spec = self._spec
        if spec.image:
            return pulumi.Output.from_input(spec.image)
        from provision.versions import open_kernel_modules  # provision is only needed to pick a baked image

        modules = "open" if open_kernel_modules(spec.gpu_model) else "proprietary"
        baked = gcp.compute.get_images_output(
            filter=(f"labels.{BAKED_LABEL}=true AND labels.{OS_LABEL}={os_label(spec.os)} "
                    f"AND labels.{MODULES_LABEL}={modules}"),
            project=spec.project,
            opts=pulumi.InvokeOutputOptions(provider=self._provider, parent=self),
        )

        def pick(images: list[Any]) -> str:
            link = newest_image(images)
            if link is None:
                pulumi.log.info(f"no baked gpuforge image for {spec.os} with {modules} driver modules in "
                                f"{spec.project}; using the DLVM image")
                return dlvm_image(spec.os)
            return link

        return baked.images.apply(pick)

    def _scheduling(self) -> dict[str, Any]:
        # GPU VMs cannot live-migrate: they must stop for host maintenance.
        if self._spec.spot:
            return {
                "provisioning_model": "SPOT", "preemptible": True, "automatic_restart": False,
                "on_host_maintenance": "TERMINATE", "instance_termination_action": "STOP",
            }
        return {"provisioning_model": "STANDARD", "automatic_restart": True, "on_host_maintenance": "TERMINATE"}

    def _create_node(
        self,
        rank: int,
        subnet: gcp.compute.Subnetwork,
        account: gcp.serviceaccount.Account,
        policy: gcp.compute.ResourcePolicy | None,
    ) -> tuple[pulumi.Output[str], pulumi.Output[str]]:
        """One VM; returns its (public, private) address."""
        spec = self._spec
        nic: dict[str, Any] = {"subnetwork": subnet.id, "access_configs": [{}]}  # ephemeral external IP
        if spec.instance_type.startswith(GVNIC_FAMILIES):
            nic["nic_type"] = "GVNIC"
        accelerators = []
        if spec.accelerator:
            accelerators = [{"type": spec.accelerator_name, "count": spec.accelerator_count}]
        instance = gcp.compute.Instance(
            f"{self._name}-node-{rank}",
            name=spec.node_name(rank),
            machine_type=spec.instance_type,
            zone=spec.zone,
            boot_disk={
                "auto_delete": True,
                "initialize_params": {
                    "image": self.image, "size": spec.disk_gb, "type": BOOT_DISK_TYPE, "labels": self._labels,
                },
            },
            network_interfaces=[nic],
            guest_accelerators=accelerators,
            scheduling=self._scheduling(),
            resource_policies=policy.self_link if policy else None,
            service_account={"email": account.email, "scopes": NODE_SCOPES},
            metadata={
                "ssh-keys": f"ubuntu:{spec.ssh_public_key}",
                "block-project-ssh-keys": "TRUE",
                "enable-oslogin": "FALSE",  # the cluster key in metadata is the way in
                "install-nvidia-driver": "True",  # DLVM images install the driver on first boot if missing
            },
            tags=[self._tag],
            labels={**self._labels, "gpuforge-rank": str(rank)},
            allow_stopping_for_update=True,
            opts=self._child,
        )
        nic_out = instance.network_interfaces[0]
        public = nic_out.access_configs.apply(lambda configs: configs[0].nat_ip if configs else "")
        return public, nic_out.network_ip

    def _cluster_output(
        self, addresses: list[tuple[pulumi.Output[str], pulumi.Output[str]]], bucket: pulumi.Output[str]
    ) -> pulumi.Output[dict[str, Any]]:
        flat = [value for pair in addresses for value in pair]

        def build(values: list[Any]) -> dict[str, Any]:
            bucket_name, image, *ips = values
            pairs = list(zip(ips[0::2], ips[1::2], strict=True))
            return self._spec.cluster_info(pairs, f"gs://{bucket_name}", extra={"image": image}).to_dict()

        return pulumi.Output.all(bucket, self.image, *flat).apply(build)
