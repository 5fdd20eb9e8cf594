"""What the AWS and GCP bakes share: the builder record, its SSH key, provisioning and sealing it,
image metadata, cleanup that always runs, interrupt handling, and which old images to prune.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from images.errors import BakeError, CleanupError
from images.spec import BakeSpec
from infra.cluster import DEFAULT_WORKDIR, ClusterInfo, NodeInfo

logger = logging.getLogger(__name__)

BUILDER_USER = "ubuntu"  # login user of Canonical's Ubuntu images on both clouds
# Tag/label values infra/aws.py and infra/gcp.py select baked images by (BAKED_TAG/OS_TAG, BAKED_LABEL/OS_LABEL).
AWS_TAG_PREFIX = "gpuforge:"
GCP_LABEL_PREFIX = "gpuforge-"
GCP_LABEL_MAX = 63  # label keys and values: at most 63 characters (Compute Engine labels docs)

Event = Callable[[str], None]


@dataclass(frozen=True)
class BuilderInstance:
    """The running builder, as `connect_target` receives it."""

    cloud: str
    id: str
    name: str
    public_address: str
    private_address: str
    key_path: str
    instance_type: str
    region: str
    zone: str
    state_dir: str
    gpu_model: str = ""
    gpu_count: int = 0
    accelerator: str = ""
    os_name: str = ""
    user: str = BUILDER_USER


def builder_cluster(builder: BuilderInstance) -> ClusterInfo:
    """The default connect_target: a one-node cluster at the builder's public address. Its host key is
    recorded on first connection (the instance was created seconds ago by this bake) in the bake's
    own known_hosts, which goes away with the builder."""
    node = NodeInfo(
        name=builder.name, rank=0, public_address=builder.public_address, private_address=builder.private_address,
        user=builder.user, key_path=builder.key_path, gpu_model=builder.gpu_model, gpu_count=builder.gpu_count,
        instance_type=builder.instance_type, workdir=DEFAULT_WORKDIR,
    )
    return ClusterInfo(
        name=builder.name, cloud=builder.cloud, nodes=(node,), region=builder.region, state_dir=builder.state_dir,
        known_hosts=str(Path(builder.state_dir) / "known_hosts"),
        extra={"zone": builder.zone, "accelerator": builder.accelerator, "os": builder.os_name, "bake": True},
    )


def provision_builder(cluster: ClusterInfo, home: Path, on_event: Event = print, fingerprint: str = "") -> None:
    """The default provision: every setup step on the builder over SSH, failing on any node error.
    `fingerprint` pins the source fingerprint the workload step records (the one the image is tagged with)."""
    from provision.errors import ProvisionError
    from provision.runner import CHANGED, FAILED
    from provision.setup import raise_for_failures, setup_cluster
    from provision.wheel import wheel_filename

    def progress(node: str, step: str, status: str) -> None:
        if status in (CHANGED, FAILED) and step:
            on_event(f"  {node}: {step} {status}")

    extra = None
    if fingerprint:
        extra = {"source_fingerprint": fingerprint, "wheel_name": f"{fingerprint}/{wheel_filename()}"}
    reports = setup_cluster(cluster, home, on_event=progress, extra_options=extra)
    try:
        raise_for_failures(reports)
    except ProvisionError as exc:
        raise BakeError(f"provisioning the builder failed: {exc}") from exc


def seal_commands(key_comment: str) -> list[tuple[str, bool]]:
    """(command, sudo) run on a cloud builder after provisioning, before it is stopped: the bake's own
    login key leaves the image, and cloud-init forgets this instance so the image boots as a fresh one."""
    return [
        (f"sed -i '/ {key_comment}$/d' ~/.ssh/authorized_keys", False),
        ("if command -v cloud-init >/dev/null; then cloud-init clean --logs; fi", True),
    ]


def seal_builder(conn: Any, key_comment: str) -> None:
    """Run seal_commands on an open connection; a failure is a BakeError naming the command."""
    for command, sudo in seal_commands(key_comment):
        result = (conn.sudo if sudo else conn.run)(command, hide=True, warn=True, in_stream=False)
        if result.exited != 0:
            output = (result.stderr or result.stdout)[-300:]
            raise BakeError(f"sealing the builder failed running {command!r}: {output}")


def seal_target(cluster: ClusterInfo, key_comment: str) -> None:
    """Seal a cloud builder over SSH; local nodes (tests) share their keys file and have no cloud-init."""
    if cluster.cloud == "local":
        return
    from infra.ssh import connect

    conn = connect(cluster, cluster.head)
    try:
        seal_builder(conn, key_comment)
    finally:
        conn.close()


def make_builder_key(state_dir: Path, comment: str) -> tuple[Path, str]:
    """A fresh ed25519 key for this bake only (private 0600); returns (private key path, public line)."""
    from infra.local import generate_key

    state_dir.mkdir(parents=True, exist_ok=True)
    state_dir.chmod(0o700)
    key = state_dir / "id_ed25519"
    return key, generate_key(key, comment)


def remove_state(state_dir: Path) -> None:
    shutil.rmtree(state_dir, ignore_errors=True)


# -- image metadata -----------------------------------------------------------------------------

def image_metadata(spec: BakeSpec, fingerprint: str) -> dict[str, str]:
    """What a baked image says about itself (before the cloud's key/value rules are applied)."""
    from provision.versions import open_kernel_modules, version_set
    from provision.wheel import package_version

    gpu_model, _ = spec.gpus
    base = version_set(spec.os_name)
    vs = base.for_torch_build(base.torch_cuda_tag(gpu_model))  # Volta and older get the cu126 stack
    project = {"version": package_version()}
    return {
        "baked": "true",
        "os": spec.os_name,
        "family": spec.family,
        "driver": vs.driver_version,
        "cuda": vs.cuda,
        "torch": vs.torch,
        "version": project["version"],
        "source": fingerprint,
        "gpu": gpu_model,
        "driver-modules": "open" if open_kernel_modules(gpu_model) else "proprietary",
    }


def aws_tags(meta: dict[str, str], extra: dict[str, str] | None = None) -> dict[str, str]:
    """`gpuforge:os=ubuntu-22.04`, ...: the keys infra/aws.py filters on, verbatim values."""
    return {**{AWS_TAG_PREFIX + k: v for k, v in meta.items()}, **(extra or {})}


def gcp_label_value(value: str) -> str:
    """Label values take lowercase letters, digits, '_' and '-' only: `580.167.08` -> `580-167-08`,
    `ubuntu-22.04` -> `ubuntu-2204` (as infra/gcp.py os_label writes it)."""
    value = value.lower()
    value = value.replace(".", "") if value.startswith("ubuntu-") else value.replace(".", "-")
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in value)[:GCP_LABEL_MAX]


def gcp_labels(meta: dict[str, str]) -> dict[str, str]:
    return {GCP_LABEL_PREFIX + k: gcp_label_value(v) for k, v in meta.items()}


# -- pruning --------------------------------------------------------------------------------------

def images_to_prune(images: list[Any], keep: int, key: Callable[[Any], tuple], keep_id: str,
                    id_of: Callable[[Any], str]) -> list[Any]:
    """The images beyond the newest `keep` (ordered by `key`, larger is newer), oldest last; the image
    just baked (`keep_id`) is always among the kept ones."""
    ordered = sorted(images, key=key, reverse=True)
    kept = {keep_id}
    for img in ordered:
        if len(kept) >= keep:
            break
        kept.add(id_of(img))
    return [img for img in ordered if id_of(img) not in kept]


# -- cleanup and interrupts ---------------------------------------------------------------------------

class Cleanup:
    """Undo actions, run newest first. `always` ones run after every bake; the others only when it
    failed (a half-made image). Each action is tried even if an earlier one failed; what could not be
    removed is reported as one CleanupError listing the leftovers."""

    def __init__(self, on_event: Event):
        self.actions: list[tuple[str, Callable[[], None], bool]] = []
        self.on_event = on_event

    def add(self, what: str, action: Callable[[], None], always: bool = True) -> None:
        self.actions.append((what, action, always))

    def run(self, failed: bool) -> None:
        leftovers = []
        with deferred_interrupts(self.on_event):  # a CleanupError raised inside wins over a deferred Ctrl-C
            while self.actions:
                what, action, always = self.actions.pop()
                if not (always or failed):
                    continue
                try:
                    action()
                    self.on_event(f"removed {what}")
                except Exception as exc:  # noqa: BLE001 - every resource gets its own try
                    logger.debug("cleanup of %s failed", what, exc_info=True)
                    leftovers.append(f"{what}: {exc}")
            if leftovers:
                raise CleanupError(leftovers)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


@contextlib.contextmanager
def interrupts_raise() -> Iterator[None]:
    """During the bake, SIGTERM (a CI cancel, `kill`) raises KeyboardInterrupt like Ctrl-C does, so the
    same finally-blocks remove the builder. Only the main thread can set handlers; elsewhere this is a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def deferred_interrupts(on_event: Event) -> Iterator[None]:
    """While cleaning up, Ctrl-C and SIGTERM are noted, not obeyed (a second Ctrl-C must not leave a
    GPU builder running); the interrupt is raised once cleanup is done."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def note(signum: int, frame: Any) -> None:
        received.append(signum)
        on_event("interrupt received: finishing cleanup first so nothing is left running")

    previous = {sig: signal.signal(sig, note) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:
        raise KeyboardInterrupt(f"signal {signal.Signals(received[0]).name} during cleanup")


class BakeRun:
    """What the cloud modules implement; `execute` drives it."""

    names: Any
    cleanup: Cleanup
    on_event: Event
    builder_id: str

    def build(self, labels: dict[str, str], provision: Callable[..., Any] | None,
              connect_target: Callable[[BuilderInstance], ClusterInfo]) -> str:
        raise NotImplementedError

    def prune(self, image_id: str) -> tuple[list[str], list[str]]:
        raise NotImplementedError


def execute(bake: BakeRun, labels: dict[str, str], provision: Callable[..., Any] | None,
            connect_target: Callable[[BuilderInstance], ClusterInfo]) -> tuple[str, list[str], list[str]]:
    """Build the image with cleanup that always runs (also on Ctrl-C and SIGTERM), then prune.
    Returns (image id, deleted images, warnings). On failure the original error is raised, with what
    cleanup could not remove attached as a note."""
    with interrupts_raise():
        try:
            image_id = bake.build(labels, provision, connect_target)
        except BaseException as exc:
            bake.on_event(f"bake failed ({type(exc).__name__}: {exc}); removing what it created")
            try:
                bake.cleanup.run(failed=True)
            except CleanupError as cleanup_exc:
                exc.add_note(str(cleanup_exc))
            raise
        try:
            bake.cleanup.run(failed=False)
        except CleanupError as exc:
            exc.add_note(f"the image itself was made: {image_id}")
            raise
    deleted, warnings = bake.prune(image_id)
    for warning in warnings:
        bake.on_event(f"warning: {warning}")
    return image_id, deleted, warnings


def run_provisioning(target: ClusterInfo, home: Path, provision: Callable[..., Any] | None, key_comment: str,
                     on_event: Event, fingerprint: str = "") -> None:
    """Provision the target (default: setup_cluster over SSH), then seal it."""
    if provision is None:
        provision_builder(target, home, on_event, fingerprint)
    else:
        provision(target, home)
    seal_target(target, key_comment)
