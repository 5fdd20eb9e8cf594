"""Bake a gpuforge GCE image into the family `gpuforge-<os>-cuXY-torchZ`: a builder VM provisioned
over SSH, stopped, imaged from its boot disk, always deleted.

    from images.gcp import bake_gcp
    from images.spec import BakeSpec
    result = bake_gcp(BakeSpec(cloud="gcp", project="my-project", ssh_cidrs=("203.0.113.4/32",)), home)

Flow: a temporary key (generated here, private 0600, in the builder's `ssh-keys` metadata, project
keys blocked); a temporary firewall rule on the network (default `default`) allowing SSH from
`ssh_cidrs` to the builder's network tag only; the builder from Canonical's Ubuntu family (no service
account: it needs no cloud API; labelled `gpuforge-cluster=<builder>` so `fab sweep` finds it after a
crash); provision over SSH and seal; stop; `images.insert` from its boot disk with the family and the
labels infra/gcp.py selects on; wait until READY. Whatever happens (an error, Ctrl-C, SIGTERM) the
builder (with its auto-delete boot disk) and the firewall rule are deleted, and an image whose
creation had started is deleted. Then images of the family beyond the newest `keep` are deleted.

Every operation is polled through an operations client built with the caller's client_options and
credentials: the one the library builds for `ExtendedOperation.result()` ignores the endpoint.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable

from images.common import (
    BakeRun,
    BuilderInstance,
    Cleanup,
    Event,
    builder_cluster,
    execute,
    gcp_labels,
    image_metadata,
    images_to_prune,
    make_builder_key,
    remove_state,
    run_provisioning,
)
from images.errors import BakeError, BakeSpecError
from images.spec import GCP_DEFAULT_NETWORK, BakeNames, BakeResult, BakeSpec
from infra.catalog import find_instance
from infra.cluster import CLUSTER_LABEL, ClusterInfo

logger = logging.getLogger(__name__)

BUILDER_LABEL = "gpuforge-builder"
BOOT_DISK_TYPE = "pd-balanced"  # as infra/gcp.py: supported by N1, G2, A2 and A3
# How long each kind of operation may take (operations.wait itself returns within 2 min, so we loop).
INSTANCE_OP_TIMEOUT_S = 900.0  # 15 min: creating, stopping or deleting a GPU VM usually takes 1-3 min
IMAGE_OP_TIMEOUT_S = 2400.0  # 40 min: imaging a 100 GB disk with CUDA and torch takes 5-20 min
FIREWALL_OP_TIMEOUT_S = 300.0
IMAGE_POLL_S = 10.0
SSH_PORT = "22"


def bake_gcp(spec: BakeSpec, home: Path, client_options: Any = None, credentials: Any = None,
             provision: Callable[[ClusterInfo, Path], Any] | None = None,
             connect_target: Callable[[BuilderInstance], ClusterInfo] | None = None,
             on_event: Event = print) -> BakeResult:
    """Bake a GCE image for `spec`; returns what was made. Raises BakeError (the builder is gone by then)."""
    if spec.cloud != "gcp":
        raise BakeSpecError(f"bake_gcp needs a spec with cloud='gcp', got {spec.cloud!r}")
    bake = GcpBake(spec, Path(home).expanduser(), client_options, credentials, on_event)
    return bake.run(provision, connect_target or builder_cluster)


def is_not_found(exc: Exception) -> bool:
    from google.api_core.exceptions import NotFound

    return isinstance(exc, NotFound)


class GcpBake(BakeRun):
    """One bake run's state: clients, names, what has been created (in `cleanup`)."""

    def __init__(self, spec: BakeSpec, home: Path, client_options: Any, credentials: Any, on_event: Event):
        from google.cloud import compute_v1

        self.compute = compute_v1
        from infra.gcp_api import compute_kwargs

        self.kw = compute_kwargs(client_options, credentials)  # the caller's endpoint, else GPUFORGE_GCP_ENDPOINT
        self.spec, self.home, self.on_event = spec, home, on_event
        self.project, self.zone = spec.project, spec.zone
        self.instances = compute_v1.InstancesClient(**self.kw)
        self.images = compute_v1.ImagesClient(**self.kw)
        self.firewalls = compute_v1.FirewallsClient(**self.kw)
        self.names = BakeNames.new(spec)
        self.state_dir = home / "bakes" / self.names.builder
        self.cleanup = Cleanup(on_event)
        self.builder_id = ""
        self.fingerprint = ""

    def call(self, what: str, fn: Callable[..., Any], **params: Any) -> Any:
        """One Compute call; an SDK error becomes a BakeError saying what was being done."""
        from google.api_core.exceptions import GoogleAPICallError

        try:
            return fn(**params)
        except GoogleAPICallError as exc:
            raise BakeError(f"{what} failed: {exc}") from exc

    def wait(self, what: str, op: Any, zonal: bool = True, timeout: float = INSTANCE_OP_TIMEOUT_S) -> None:
        """Wait for an operation through an operations client on the caller's endpoint (the one the library
        builds for ExtendedOperation.result() ignores client_options); its error becomes a BakeError."""
        c = self.compute
        client = c.ZoneOperationsClient(**self.kw) if zonal else c.GlobalOperationsClient(**self.kw)
        where = {"zone": self.zone} if zonal else {}
        deadline = time.monotonic() + timeout
        while op.status != c.Operation.Status.DONE:
            if time.monotonic() > deadline:
                raise BakeError(f"{what}: operation {op.name} not done after {timeout:.0f}s")
            op = self.call(what, client.wait, project=self.project, operation=op.name, **where)
        if op.error.errors:
            raise BakeError(f"{what} failed: " + "; ".join(e.message for e in op.error.errors))

    # -- the flow ----------------------------------------------------------------------------------
    def run(self, provision: Callable[..., Any] | None,
            connect_target: Callable[[BuilderInstance], ClusterInfo]) -> BakeResult:
        from provision.wheel import source_fingerprint

        started = time.monotonic()
        self.fingerprint = source_fingerprint()  # once: the label and what the builder gets agree
        labels = gcp_labels(image_metadata(self.spec, self.fingerprint))
        link, deleted, warnings = execute(self, labels, provision, connect_target)
        seconds = time.monotonic() - started
        self.on_event(f"baked {self.names.image} into family {self.spec.family} in {seconds:.0f}s")
        return BakeResult(cloud="gcp", image_id=link, name=self.names.image, family=self.spec.family, tags=labels,
                          builder_id=self.builder_id, seconds=seconds, deleted_images=deleted, warnings=warnings)

    def build(self, labels: dict[str, str], provision: Callable[..., Any] | None,
              connect_target: Callable[[BuilderInstance], ClusterInfo]) -> str:
        self.check_name_free()
        self.cleanup.add(f"local key {self.state_dir}", lambda: remove_state(self.state_dir))
        key_path, public = make_builder_key(self.state_dir, self.names.builder)
        self.create_firewall()
        builder = self.launch_builder(key_path, public)
        self.on_event(f"provisioning {builder.name} at {builder.public_address}")
        run_provisioning(connect_target(builder), self.home, provision, self.names.builder, self.on_event,
                         self.fingerprint)
        self.on_event(f"stopping {builder.name}")
        op = self.call("stopping the builder", self.instances.stop, project=self.project, zone=self.zone,
                       instance=builder.name)
        self.wait("stopping the builder", op)
        return self.create_image(builder.name, labels)

    def check_name_free(self) -> None:
        """Refuse an image name in use before launching anything (and so never delete someone's image
        when cleaning up a half-made one of that name)."""
        try:
            self.images.get(project=self.project, image=self.names.image)
        except Exception as exc:
            if is_not_found(exc):
                return
            raise BakeError(f"checking whether image {self.names.image} exists failed: {exc}") from exc
        raise BakeError(f"image {self.names.image} already exists in {self.project}; choose another name")

    def network_path(self) -> str:
        return f"global/networks/{self.spec.network or GCP_DEFAULT_NETWORK}"

    def create_firewall(self) -> None:
        from infra.cluster import ownership_marker

        c, name = self.compute, f"{self.names.builder}-ssh"
        rule = c.Firewall(
            name=name, network=self.network_path(), direction="INGRESS",
            allowed=[c.Allowed(I_p_protocol="tcp", ports=[SSH_PORT])], source_ranges=list(self.spec.ssh_cidrs),
            target_tags=[self.names.builder],
            # firewalls take no labels: the marker is how `fab sweep` knows the rule is ours after a crash
            description=f"gpuforge image bake: SSH from ssh_cidrs {ownership_marker(self.names.builder)}",
        )
        self.cleanup.add(f"firewall rule {name}", lambda: self.delete_firewall(name))
        op = self.call(f"creating firewall rule {name}", self.firewalls.insert, project=self.project,
                       firewall_resource=rule)
        self.wait(f"creating firewall rule {name}", op, zonal=False, timeout=FIREWALL_OP_TIMEOUT_S)

    def delete_firewall(self, name: str) -> None:
        try:
            op = self.firewalls.delete(project=self.project, firewall=name)
        except Exception as exc:
            if is_not_found(exc):
                return
            raise
        self.wait(f"deleting firewall rule {name}", op, zonal=False, timeout=FIREWALL_OP_TIMEOUT_S)

    def builder_resource(self, public_key: str) -> Any:
        c, spec, zone, name = self.compute, self.spec, self.zone, self.names.builder
        temp = {CLUSTER_LABEL: name, BUILDER_LABEL: name}
        nic = c.NetworkInterface(network=self.network_path(),
                                 access_configs=[c.AccessConfig(name="External NAT", type_="ONE_TO_ONE_NAT")])
        if spec.subnetwork:
            nic.subnetwork = f"regions/{spec.region}/subnetworks/{spec.subnetwork}"
        if find_instance("gcp", spec.instance_type).gvnic:  # A3 builders: the series requires gVNIC
            nic.nic_type = "GVNIC"
        accelerators = []
        if spec.accelerator:
            acc_name, _, count = spec.accelerator.partition(":")
            accelerators = [c.AcceleratorConfig(accelerator_type=f"zones/{zone}/acceleratorTypes/{acc_name}",
                                                accelerator_count=int(count))]
        return c.Instance(
            name=name, machine_type=f"zones/{zone}/machineTypes/{spec.instance_type}",
            disks=[c.AttachedDisk(boot=True, auto_delete=True, initialize_params=c.AttachedDiskInitializeParams(
                source_image=self.base_image, disk_size_gb=spec.disk_gb,
                disk_type=f"zones/{zone}/diskTypes/{BOOT_DISK_TYPE}", labels=temp))],
            network_interfaces=[nic], guest_accelerators=accelerators,
            metadata=c.Metadata(items=[
                c.Items(key="ssh-keys", value=f"ubuntu:{public_key}"),
                c.Items(key="block-project-ssh-keys", value="TRUE"),
                c.Items(key="enable-oslogin", value="FALSE"),  # the bake's key in metadata is the way in
            ]),
            tags=c.Tags(items=[name]), labels=temp,
            scheduling=c.Scheduling(on_host_maintenance="TERMINATE", automatic_restart=True),  # GPU VMs cannot migrate
        )

    @property
    def base_image(self) -> str:
        return self.spec.base_image_ref.removeprefix("https://www.googleapis.com/compute/v1/")

    def launch_builder(self, key_path: Path, public_key: str) -> BuilderInstance:
        spec, name = self.spec, self.names.builder
        # Registered before the insert: an interrupt during it may leave a VM we never heard of.
        self.cleanup.add(f"builder {name} (and its boot disk)", lambda: self.delete_instance(name))
        self.on_event(f"creating builder {name} ({spec.instance_type} in {self.zone}) from {self.base_image}")
        op = self.call(f"creating builder {name}", self.instances.insert, project=self.project, zone=self.zone,
                       instance_resource=self.builder_resource(public_key))
        self.wait(f"creating builder {name}", op)
        instance = self.call(f"reading builder {name}", self.instances.get, project=self.project, zone=self.zone,
                             instance=name)
        self.builder_id = str(instance.id)
        nic = instance.network_interfaces[0]
        public = nic.access_configs[0].nat_i_p if nic.access_configs else ""
        if not public:
            raise BakeError(f"builder {name} has no external IP address")
        model, count = spec.gpus
        return BuilderInstance(
            cloud="gcp", id=self.builder_id, name=name, public_address=public, private_address=nic.network_i_p,
            key_path=str(key_path), instance_type=spec.instance_type, region=spec.region, zone=self.zone,
            state_dir=str(self.state_dir), gpu_model=model, gpu_count=count, accelerator=spec.accelerator,
            os_name=spec.os_name,
        )

    def delete_instance(self, name: str) -> None:
        try:
            op = self.instances.delete(project=self.project, zone=self.zone, instance=name)
        except Exception as exc:
            if is_not_found(exc):
                return
            raise
        self.wait(f"deleting builder {name}", op)

    def create_image(self, instance_name: str, labels: dict[str, str]) -> str:
        c, name = self.compute, self.names.image
        instance = self.call("reading the stopped builder", self.instances.get, project=self.project,
                             zone=self.zone, instance=instance_name)
        boot = next(d for d in instance.disks if d.boot)
        self.cleanup.add(f"unfinished image {name}", lambda: self.delete_image(name), always=False)
        self.on_event(f"creating image {name} in family {self.spec.family} from {boot.source.rsplit('/', 1)[-1]}")
        image = c.Image(name=name, source_disk=boot.source, family=self.spec.family, labels=labels,
                        description=f"gpuforge {self.spec.family} baked on {self.spec.instance_type}")
        op = self.call(f"creating image {name}", self.images.insert, project=self.project, image_resource=image)
        self.wait(f"creating image {name}", op, zonal=False, timeout=IMAGE_OP_TIMEOUT_S)
        return self.wait_image_ready(name)

    def wait_image_ready(self, name: str) -> str:
        deadline = time.monotonic() + IMAGE_OP_TIMEOUT_S
        while True:
            image = self.call(f"reading image {name}", self.images.get, project=self.project, image=name)
            if image.status == "READY":
                return image.self_link
            if image.status == "FAILED" or time.monotonic() > deadline:
                raise BakeError(f"image {name} is {image.status}, not READY")
            time.sleep(IMAGE_POLL_S)

    def delete_image(self, name: str) -> None:
        try:
            op = self.images.delete(project=self.project, image=name)
        except Exception as exc:
            if is_not_found(exc):
                return
            raise
        self.wait(f"deleting image {name}", op, zonal=False)

    def prune(self, image_link: str) -> tuple[list[str], list[str]]:
        """Delete READY baked images of this family beyond the newest `keep`; failures become warnings."""
        c = self.compute
        where = f'(family = "{self.spec.family}") AND (labels.gpuforge-baked = "true")'
        try:
            images = [i for i in self.images.list(request=c.ListImagesRequest(project=self.project, filter=where))
                      if i.status == "READY"]
        except Exception as exc:  # noqa: BLE001 - the image is made; pruning is best effort
            return [], [f"listing images of {self.spec.family} to prune failed: {exc}"]
        old = images_to_prune(images, self.spec.keep, key=lambda i: (i.creation_timestamp, i.name),
                              keep_id=image_link, id_of=lambda i: i.self_link)
        deleted, warnings = [], []
        for image in old:
            try:
                self.delete_image(image.name)
                deleted.append(image.self_link)
                self.on_event(f"deleted old image {image.name}")
            except Exception as exc:  # noqa: BLE001
                warnings.append(f"could not delete image {image.name}: {exc}")
        return deleted, warnings
