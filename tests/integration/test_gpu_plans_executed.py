"""The GPU plans, executed: on a VM-like node that looks like a fresh GPU instance (tests/fakes/gpu_node/), the
real runner runs base and every GPU system step of p4d.24xlarge, p5.48xlarge, g5.xlarge, g4dn.xlarge and GCP
a3-highgpu-8g on both Ubuntu releases, against stand-ins for apt-get, dpkg, curl, gpg, nvidia-smi, modprobe,
update-initramfs, systemctl, sysctl and the EFA installer that record who ran them and answer as the real tools
do (driver missing, then present after the reboot). Asserted: what happened, not what the plan says.

Not executed here: python_env/workload/verify with a CUDA torch build (no such wheel is reachable; the same steps
run for real with the CPU build in test_vm_like.py), and gpu-verify's torch matmul (needs a GPU).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from infra.local import create_local_cluster, destroy_local_cluster
from infra.ssh import connect
from provision.setup import setup_cluster
from provision.steps import BaseStep
from provision.steps.base import run_cmd
from provision.steps.gpu import GPU_SYSTEM_STEPS, GpuVerifyStep
from provision.plan import plan_context
from provision.versions import version_set
from tests.fakes.gpu_node import SHAPES, boot_hook, calls, state
from tests.vm_like import vm_home, vm_like_unavailable, vm_user

pytestmark = [pytest.mark.integration, pytest.mark.skipif(bool(vm_like_unavailable()), reason=vm_like_unavailable())]
STEPS = [BaseStep(), *GPU_SYSTEM_STEPS]
PLANS = [(t, o) for t in SHAPES for o in ("ubuntu-22.04", "ubuntu-24.04")]
# Tools that change the node: every call of these must have run as root.
PRIVILEGED = {"apt-get", "apt-mark", "curl", "update-initramfs", "modprobe", "sysctl", "efa_installer.sh",
              "build-deb-packages.sh", "cloud-init"}


@pytest.fixture(scope="module")
def rig():
    with vm_user("gfgpu") as user, vm_home("gpuforge-gpu-") as home:
        yield user, home


class GpuNode:
    """One fresh stand-in GPU instance (a 1-node VM-like cluster) and what setup did on it."""

    def __init__(self, rig, instance_type: str, os_name: str, hazards: dict | None = None, name: str = "gpu"):
        user, home = rig
        self.home, self.instance_type, self.os_name = home, instance_type, os_name
        hook = boot_hook(home / f"kit-{name}", instance_type, os_name, hazards)
        self.cluster = create_local_cluster(name, 1, home, login_user=user, boot_hook=hook)
        self.options = {"instance_type": instance_type, "cloud": SHAPES[instance_type].cloud}

    def setup(self, **options):
        (report,) = setup_cluster(self.cluster, self.home, steps=STEPS, extra_options={**self.options, **options})
        return report

    def close(self) -> None:
        destroy_local_cluster(Path(self.cluster.state_dir))

    def boots(self) -> int:
        return state(self.cluster, "boot", 0)

    def reboot_log(self) -> str:
        return (Path(self.cluster.state_dir) / "nodes" / "node-0" / "boot.log").read_text()


@pytest.fixture
def node(rig, request):
    instance_type, os_name = request.param
    n = GpuNode(rig, instance_type, os_name)
    yield n
    n.close()


def changing_calls(node_calls: list[dict]) -> list[dict]:
    return [c for c in node_calls if c["tool"] in PRIVILEGED or (c["tool"] == "systemctl" and c["argv"][:1] == ["enable"])
            or (c["tool"] == "nvidia-smi" and "-pm" in c["argv"])]


@pytest.mark.parametrize("node", PLANS, indirect=True, ids=[f"{t}-{o}" for t, o in PLANS])
def test_gpu_plan_runs_as_root_pins_holds_reboots_once_and_is_idempotent(node):
    shape, vs = SHAPES[node.instance_type], version_set(node.os_name)
    first = node.setup()
    assert first.ok, first.error
    nvswitch, efa = shape.nvswitches > 0, shape.efa > 0
    want = {"base", "nvidia-repo", "nvidia-driver", "cuda-toolkit"} | ({"fabric-manager"} if nvswitch else set()) \
        | ({"gdrcopy", "efa"} if efa else set())
    assert set(first.changed) == want, [(s.step, s.status, s.detail) for s in first.steps]

    # Every change to the node ran as root, through the one root function; the login user stayed unprivileged.
    recorded = calls(node.cluster)
    assert changing_calls(recorded) and all(c["euid"] == 0 for c in changing_calls(recorded))
    assert all(c["env"].get("DEBIAN_FRONTEND") == "noninteractive" for c in recorded if c["tool"] == "apt-get")
    assert {c["uid"] for c in recorded if c["tool"] == "dpkg-query"} != {0}  # read-only probes need no root

    # Pinned and held: the repository offers newer builds (580.201.04, NCCL 2.29.2); the matrix's were installed.
    db, holds = state(node.cluster, "dpkg"), set(state(node.cluster, "holds"))
    gpu = node.cluster.node(0)
    driver = vs.driver_package(plan_context(shape.cloud, node.instance_type, node.os_name).facts.gpu_model)
    expected = {driver: "580.167.08-1ubuntu1", vs.cuda_toolkit_package: f"{vs.cuda_toolkit}-1",
                "libnccl2": vs.nccl_deb_version, "libnccl-dev": vs.nccl_deb_version}
    if nvswitch:
        expected[vs.fabric_manager_package] = "580.167.08-1"
    if efa:
        expected.update({p: f"{vs.gdrcopy}-1" for p in ("gdrdrv-dkms", "libgdrapi", "gdrcopy-tests", "gdrcopy")})
    assert {p: db.get(p) for p in expected} == expected
    assert set(expected) <= holds

    # One reboot (the driver's; the EFA installer reloads its module and asks for none), and setup carried on:
    # facts were gathered again after it, and the steps after the driver ran against the loaded driver.
    assert node.boots() == 2 and "reboot requested by uid 0" in node.reboot_log()
    assert first.facts.driver_version == "580.167.08" and first.facts.driver_flavor == "open"
    boot_of = {c["tool"]: c["boot"] for c in recorded}
    assert boot_of["systemctl"] == 2 and all(c["boot"] == 2 for c in recorded if c["tool"] == "efa_installer.sh")

    # gpu-verify's count check, on the node, against the driver that loaded.
    ctx = plan_context(shape.cloud, node.instance_type, node.os_name)
    conn = connect(node.cluster, gpu)
    try:
        run_cmd(conn, gpu.name, "gpu-verify", GpuVerifyStep().plan(ctx)[0])
    finally:
        conn.close()

    # A second run changes nothing: no privileged call, no reboot.
    before = len(changing_calls(calls(node.cluster)))
    again = node.setup()
    assert again.ok and again.changed == [], [(s.step, s.status, s.detail) for s in again.steps]
    assert len(changing_calls(calls(node.cluster))) == before and node.boots() == 2


@pytest.mark.parametrize("node", [("p4d.24xlarge", "ubuntu-22.04")], indirect=True, ids=["p4d"])
def test_a_changed_matrix_entry_reruns_only_what_depends_on_it(node):
    assert node.setup().ok
    newer_nccl = dataclasses.replace(version_set("ubuntu-22.04"), nccl="2.29.2")
    changed = node.setup(versions=newer_nccl)
    assert changed.ok and changed.changed == ["cuda-toolkit"], [(s.step, s.status) for s in changed.steps]
    assert state(node.cluster, "dpkg")["libnccl2"] == "2.29.2-1+cuda13.0" and node.boots() == 2


def test_apt_waits_for_cloud_init_and_the_lists_lock_and_retries_a_failed_fetch(rig):
    """Regression (issue 8, defect 1): on a fresh VM cloud-init and apt-daily hold apt; `DPkg::Lock::Timeout` does
    not cover /var/lib/apt/lists/lock, so `apt-get update` failed at once. Now: wait for cloud-init, wait for the
    lock, retry a transient fetch failure."""
    hazards = {"cloud_init_s": 2, "lists_lock_s": 4, "apt_update_failures": 1}
    node = GpuNode(rig, "g5.xlarge", "ubuntu-22.04", hazards, name="busy")
    try:
        report = node.setup()
        assert report.ok, report.error
        recorded = calls(node.cluster)
        waited = next(c for c in recorded if c["tool"] == "cloud-init")
        apt = [c for c in recorded if c["tool"] == "apt-get"]
        assert waited["time"] < apt[0]["time"] and "--wait" in waited["argv"]
        updates = [c for c in apt if c["argv"][-1:] == ["update"]]
        assert len(updates) >= 3  # refused (lock held), failed (fetch), then done
        log = (node.home / "clusters" / "busy" / "logs" / "setup-node-0.log").read_text()
        assert "E: Could not get lock /var/lib/apt/lists/lock" in log and "Temporary failure resolving" in log
    finally:
        node.close()


def test_the_efa_installer_asking_for_a_reboot_gets_one(rig):
    """Regression (issue 8, defect 8): EFA types rebooted twice. Now a second reboot happens only when the
    installer asks for it, and then setup carries on after it."""
    node = GpuNode(rig, "p4d.24xlarge", "ubuntu-24.04", {"efa_asks_reboot": True}, name="efaboot")
    try:
        report = node.setup()
        assert report.ok, report.error
        assert node.boots() == 3 and node.reboot_log().count("reboot requested by uid 0") == 2
        assert [c["tool"] for c in calls(node.cluster) if c["boot"] == 3][-1] == "fi_info"  # the verify after it
    finally:
        node.close()
