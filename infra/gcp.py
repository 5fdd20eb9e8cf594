"""GcpGpuCluster: a GPU cluster and its GCS bucket on GCP, as one Pulumi component.

Resources (labelled `gpuforge-cluster=<name>` and `gpuforge-cluster-id=<id>` wherever GCP takes labels, also
through the provider's default labels; networks, subnetworks, firewalls, the placement policy and the service
account take none, and carry the same two facts as a marker in their description, which the sweep reads):

- a VPC network and one subnet in the region;
- firewall rules: SSH only from `ssh_cidrs` (none by default; IPv4 only), all traffic between the cluster's nodes
  (selected by the network tag `gpuforge-<name>`);
- a compact placement policy when there is more than one node of a series that takes one (catalog: not N1);
- one instance per node: the GPU machine type, or n1 plus guest accelerators; `onHostMaintenance:
  TERMINATE` (GPU VMs cannot live-migrate); the SPOT provisioning model when asked; gVNIC where the series
  requires it (A3); a boot disk of `disk_gb` from the image the stack records (`gpuforge:image`, set by `fab up`
  at the first up), else our baked family, else a Deep Learning VM family; the cluster's public
  key in instance metadata (`ssh-keys`), project-wide keys blocked;
- a service account whose only storage grant is on this cluster's bucket (a bucket IAM member); with autodown (and
  autostop on) also SELF_DELETE_ROLE on each of the cluster's own instances (an instance IAM member per node, no
  project-wide grant) and the Compute scope, so an idle node's watcher can delete its own VM (infra/autostop.py);
- a GCS bucket: uniform bucket-level access, public access prevention enforced, versioning, old versions
  deleted after a while. It holds the user's data: `retain_on_delete`, so `pulumi destroy` leaves it.

Not done here: the 8 extra NICs that A3 Mega (GPUDirect-TCPXO) and A3 High (TCPX) need for full
inter-node bandwidth; the nodes talk over their one gVNIC.
"""

from __future__ import annotations

import logging
from typing import Any

import pulumi
import pulumi_gcp as gcp

from images.lookup import DLVM_FAMILIES, DLVM_PROJECT, baked_image_filter, image_family
from infra.autostop import gcp_self_delete
from infra.cluster import CLUSTER_ID_LABEL, CLUSTER_LABEL, ownership_marker
from infra.spec import ClusterSpec

logger = logging.getLogger(__name__)

SUBNET_CIDR = "10.42.0.0/20"
SSH_PORT = "22"
BOOT_DISK_TYPE = "pd-balanced"  # supported by N1, G2, A2 and A3 High/Mega
UNPINNED_IMAGE_HINT = (
    "gpuforge:image is not set, so this run picked {image}; pin it so later `pulumi up`s keep the nodes on what they "
    "booted: pulumi config set gpuforge:image {image} (`gpuforge up` does this for you)"
)
NONCURRENT_VERSION_DAYS = 30  # checkpoints overwritten more than a month ago are gone
BUCKET_ROLE = "roles/storage.objectAdmin"  # read, write, list and delete objects of this bucket only
NODE_SCOPES = [  # the service account's IAM grants decide what is allowed; scopes only narrow it further
    "https://www.googleapis.com/auth/devstorage.read_write",
    "https://www.googleapis.com/auth/logging.write",
    "https://www.googleapis.com/auth/monitoring.write",
]
# Autodown: instances.delete takes the compute (or cloud-platform) OAuth scope and compute.instances.delete on the
# instance (Compute API reference, instances.delete). The narrowest predefined role that holds it and can be granted
# on one instance is Compute Instance Admin (v1); granted per instance it reaches that VM only (IAM roles for Compute
# Engine: "Lowest-level resources where you can grant this role: ... Instance"). A custom role holding just the one
# permission would be narrower, but it needs iam.roles.create of whoever runs `up`, and a deleted custom role keeps
# its id for 37 days (IAM: "you can't create a new role with the same ID" until it is purged), so each cluster would
# need a fresh id and leave one behind. The boot disk goes with the VM: its auto_delete is set (below).
COMPUTE_SCOPE = "https://www.googleapis.com/auth/compute"
SELF_DELETE_ROLE = "roles/compute.instanceAdmin.v1"


def dlvm_image(os_name: str) -> str:
    return f"projects/{DLVM_PROJECT}/global/images/family/{DLVM_FAMILIES[os_name]}"


def cluster_labels(spec: ClusterSpec) -> dict[str, str]:
    """The labels every labellable resource of the cluster carries (the sweep claims by them)."""
    labels = {CLUSTER_LABEL: spec.name}
    if spec.cluster_id:
        labels[CLUSTER_ID_LABEL] = spec.cluster_id
    return labels


def described(text: str, spec: ClusterSpec) -> str:
    """A description with our ownership marker, for the types that take no labels."""
    return f"{text} {ownership_marker(spec.name, spec.cluster_id)}"


def self_deletes(spec: ClusterSpec) -> bool:
    """Autodown with autostop on: the nodes get the right to delete their own VMs (else nothing new is made)."""
    return gcp_self_delete(spec.autodown, spec.autostop)


def warn_unpinned(image: str) -> str:
    pulumi.log.warn(UNPINNED_IMAGE_HINT.format(image=image))
    return image


class GcpGpuCluster(pulumi.ComponentResource):
    """The cluster of `spec` on GCP; `cluster` is its ClusterInfo as a dict."""

    cluster: pulumi.Output[dict[str, Any]]

    def __init__(self, name: str, spec: ClusterSpec, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("gpuforge:gcp:GpuCluster", name, None, opts)
        self._name = name
        self._spec = spec
        self._labels = cluster_labels(spec)
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
            description=described("gpuforge cluster nodes", spec), opts=self._child,
        )
        bucket = self._create_bucket(account)
        policy = self._create_placement_policy()
        self.image = self._resolve_image()
        self._member = account.email.apply(lambda email: f"serviceAccount:{email}")
        addresses = [self._create_node(rank, subnet, account, policy) for rank in range(spec.nodes)]

        self.bucket_name = bucket.name
        self.cluster = self._cluster_output(addresses, bucket.name)
        self.register_outputs({"cluster": self.cluster, "bucket": bucket.name, "image": self.image})

    def _create_network(self) -> gcp.compute.Subnetwork:
        n, spec = self._name, self._spec
        network = gcp.compute.Network(
            f"{n}-net", auto_create_subnetworks=False, description=described("gpuforge cluster", spec), opts=self._child
        )
        subnet = gcp.compute.Subnetwork(
            f"{n}-subnet", network=network.id, region=spec.region, ip_cidr_range=SUBNET_CIDR,
            private_ip_google_access=True, description=described("gpuforge cluster", spec), opts=self._child,
        )
        if spec.ssh_cidrs:
            gcp.compute.Firewall(
                f"{n}-ssh", network=network.id, direction="INGRESS",
                allows=[{"protocol": "tcp", "ports": [SSH_PORT]}], source_ranges=list(spec.ssh_cidrs),
                target_tags=[self._tag], description=described("SSH from gpuforge:sshCidrs", spec), opts=self._child,
            )
        gcp.compute.Firewall(
            f"{n}-internal", network=network.id, direction="INGRESS", allows=[{"protocol": "all"}],
            source_tags=[self._tag], target_tags=[self._tag],
            description=described("all traffic between cluster nodes (NCCL)", spec), opts=self._child,
        )
        return subnet

    def _create_bucket(self, account: gcp.serviceaccount.Account) -> gcp.storage.Bucket:
        """The data bucket: retained by `pulumi destroy` (data policy: `fab down --delete-data` deletes it)."""
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
            force_destroy=False,
            labels=self._labels,
            opts=pulumi.ResourceOptions.merge(self._child, pulumi.ResourceOptions(retain_on_delete=True)),
        )
        gcp.storage.BucketIAMMember(
            f"{n}-bucket-access", bucket=bucket.name, role=BUCKET_ROLE,
            member=account.email.apply(lambda email: f"serviceAccount:{email}"), opts=self._child,
        )
        return bucket

    def _create_placement_policy(self) -> gcp.compute.ResourcePolicy | None:
        """A compact placement policy for several nodes of a series that takes one (catalog: A2, A3, G2; not N1)."""
        spec = self._spec
        if spec.nodes == 1 or not spec.instance.compact_placement:
            return None
        return gcp.compute.ResourcePolicy(
            f"{self._name}-placement-{spec.zone}", region=spec.region,  # one per zone, as AWS's (infra/aws.py)
            group_placement_policy={"collocation": "COLLOCATED"},
            description=described("compact placement for gpuforge cluster nodes", spec), opts=self._child,
        )

    def _resolve_image(self) -> pulumi.Output[str]:
        """The image the stack records (`gpuforge:image`, which `fab up` sets at the first up), else our baked
        family for the OS and GPU when it holds a READY image (GCE then boots its newest non-deprecated one), else
        the Deep Learning VM family."""
        spec = self._spec
        if spec.image:
            return pulumi.Output.from_input(spec.image)
        family = image_family(spec.os, spec.gpu_model)
        baked = gcp.compute.get_images_output(
            filter=f'{baked_image_filter(spec.os, spec.gpu_model)} (status = "READY")',
            project=spec.project,
            opts=pulumi.InvokeOutputOptions(provider=self._provider, parent=self),
        )

        def pick(images: list[Any]) -> str:
            if not images:
                pulumi.log.info(f"no baked gpuforge image in family {family} of {spec.project}; using the DLVM image")
                return dlvm_image(spec.os)
            return f"projects/{spec.project}/global/images/family/{family}"

        return baked.images.apply(pick).apply(warn_unpinned)

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
        if spec.instance.gvnic:  # A3 requires gVNIC (catalog)
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
                "auto_delete": True,  # the disk goes with the VM: `down`, and an autodown node deleting itself
                "initialize_params": {
                    "image": self.image, "size": spec.disk_gb, "type": BOOT_DISK_TYPE, "labels": self._labels,
                },
            },
            network_interfaces=[nic],
            guest_accelerators=accelerators,
            scheduling=self._scheduling(),
            resource_policies=policy.self_link if policy else None,
            service_account={"email": account.email, "scopes": self._scopes()},
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
            **self._shutdown_options(),
        )
        if self_deletes(spec):
            gcp.compute.InstanceIAMMember(
                f"{self._name}-node-{rank}-self-delete", instance_name=instance.name, zone=spec.zone,
                project=spec.project or None, role=SELF_DELETE_ROLE, member=self._member, opts=self._child,
            )
        nic_out = instance.network_interfaces[0]
        public = nic_out.access_configs.apply(lambda configs: configs[0].nat_ip if configs else "")
        return public, nic_out.network_ip

    def _scopes(self) -> list[str]:
        return [*NODE_SCOPES, COMPUTE_SCOPE] if self_deletes(self._spec) else list(NODE_SCOPES)

    def _shutdown_options(self) -> dict[str, Any]:
        """Instance arguments for what a VM does when its OS shuts down or it is preempted. Autostop needs none: a
        guest `poweroff` leaves a GCE VM TERMINATED (stopped, disks kept), and no instance setting deletes it
        instead; with autodown the node's watcher deletes its own VM through the API (the grant above)."""
        return {}

    def _cluster_output(
        self, addresses: list[tuple[pulumi.Output[str], pulumi.Output[str]]], bucket: pulumi.Output[str]
    ) -> pulumi.Output[dict[str, Any]]:
        flat = [value for pair in addresses for value in pair]

        def build(values: list[Any]) -> dict[str, Any]:
            bucket_name, image, *ips = values
            pairs = list(zip(ips[0::2], ips[1::2], strict=True))
            return self._spec.cluster_info(pairs, f"gs://{bucket_name}", extra={"image": image, "spot": self._spec.spot}).to_dict()

        return pulumi.Output.all(bucket, self.image, *flat).apply(build)
