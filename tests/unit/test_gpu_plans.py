"""GPU step plans per (OS, instance family), run through invoke.MockContext so the exact command sequence is
checked; idempotence (a passing check prevents apply); fingerprints that follow the pinned versions."""

from __future__ import annotations

import dataclasses
import shlex
from pathlib import Path

import pytest
from invoke import MockContext, Result

from infra.cluster import ClusterInfo, NodeInfo
from provision.errors import MatrixError
from provision.facts import SECTION, Facts, parse_facts
from provision.plan import plan_context, render_plan, synth_facts
from provision.steps.base import StepContext, command_line
from provision.steps.efa import nccl_env_lines
from provision.steps.gpu import GPU_STEPS, allreduce_command
from provision.steps.gpu_common import probe_command
from provision.steps.nvidia import pin_lines
from provision.versions import version_set

FIXTURES = Path(__file__).parent / "fixtures" / "facts"
STEPS = {step.name: step for step in GPU_STEPS}
ALL = ["nvidia-repo", "nvidia-driver", "fabric-manager", "cuda-toolkit", "gdrcopy", "efa", "gpu-verify"]
NO_FM_NO_EFA = ["nvidia-repo", "nvidia-driver", "cuda-toolkit", "gpu-verify"]
NO_EFA = ["nvidia-repo", "nvidia-driver", "fabric-manager", "cuda-toolkit", "gpu-verify"]


def has(commands, text: str) -> bool:
    return any(text in c for c in commands)
APT = "install -y --allow-change-held-packages --allow-downgrades"  # inside apt.py's lock-waiting loop
DRIVER_VERIFY = (
    "sh -c 'v=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader | sort -u); "
    '[ "$v" = "580.167.08" ] || { echo "loaded driver is ${v:-none}, expected 580.167.08" >&2; exit 1; }\''
)


class RecordingContext(MockContext):
    """MockContext that records, in order, which plan command each line sent stands for ("sudo" for the ones
    sent through root_command), and still raises on unknown ones. No `sudo()` call is ever expected."""

    def __init__(self, plan=(), run=None, sudo=None, **kwargs):
        """`plan`: answer its commands with exit 0; `run`: more answers keyed by what is sent; `sudo`: answers
        keyed by a root command's script (sent as root_command(script))."""
        lines = {command_line(object(), c): c for c in plan if not c.reboot}  # a non-root login
        answers = {line: Result(line, exited=0) for line in lines}
        for script, result in (sudo or {}).items():
            from provision.steps.base import Cmd

            cmd = Cmd(script, sudo=True)
            lines[command_line(object(), cmd)] = cmd
            answers[command_line(object(), cmd)] = result
        answers.update(run or {})
        super().__init__(run=answers, sudo={}, **kwargs)
        self._set("calls", [])
        self._set("lines", lines)

    def run(self, command, *args, **kwargs):
        cmd = self.lines.get(command)
        self.calls.append(("sudo" if cmd is not None and cmd.sudo else "run", cmd.run if cmd is not None else command))
        return super().run(command, *args, **kwargs)


def fixture_ctx(fixture: str, cloud: str, instance_type: str, **facts_changes) -> StepContext:
    facts = parse_facts((FIXTURES / fixture).read_text())
    facts = dataclasses.replace(facts, **facts_changes) if facts_changes else facts
    node = NodeInfo(name="gpu-0", rank=0, public_address="203.0.113.10", private_address="10.0.0.10",
                    instance_type=instance_type)
    cluster = ClusterInfo(name="t", cloud=cloud, nodes=(node,))
    return StepContext(cluster=cluster, node=node, facts=facts, options={"instance_type": instance_type})


def active(ctx: StepContext) -> list[str]:
    return [s.name for s in GPU_STEPS if s.skip_reason(ctx) is None]


def apply_recorded(step, ctx: StepContext) -> list[tuple[str, str]]:
    """Apply `step` against a MockContext that answers exactly its plan's commands; returns the calls in
    order, reboots included (through the runner's reboot hook)."""
    plan = step.plan(ctx)
    conn = RecordingContext(plan)
    ctx.options["reboot_hook"] = lambda conn, ctx, cmd: conn.calls.append(("reboot", cmd.run))
    step.apply(conn, ctx)
    return conn.calls


def expected_calls(plan) -> list[tuple[str, str]]:
    return [("reboot" if c.reboot else "sudo" if c.sudo else "run", c.run) for c in plan
            if not c.reboot_when]  # a conditional reboot needs its trigger in the output (the mock prints none)


@pytest.mark.parametrize(
    "cloud, instance_type, accelerator, os_name, steps, driver_package, gpus",
    [
        ("aws", "g5.xlarge", None, "ubuntu-22.04", NO_FM_NO_EFA, "nvidia-open-580", 1),
        ("aws", "p4d.24xlarge", None, "ubuntu-22.04", ALL, "nvidia-open-580", 8),
        ("aws", "p5.48xlarge", None, "ubuntu-24.04", ALL, "nvidia-open-580", 8),
        ("gcp", "a2-highgpu-8g", None, "ubuntu-22.04", NO_EFA, "nvidia-open-580", 8),
        ("gcp", "a3-highgpu-8g", None, "ubuntu-24.04", NO_EFA, "nvidia-open-580", 8),
        ("gcp", "g2-standard-8", None, "ubuntu-22.04", NO_FM_NO_EFA, "nvidia-open-580", 1),
        ("gcp", "n1-standard-8", "nvidia-tesla-t4:1", "ubuntu-22.04", NO_FM_NO_EFA, "nvidia-open-580", 1),
        ("gcp", "n1-standard-8", "nvidia-tesla-v100:2", "ubuntu-24.04", NO_FM_NO_EFA, "cuda-drivers-580", 2),
    ],
)
def test_plan_per_instance_family(cloud, instance_type, accelerator, os_name, steps, driver_package, gpus):
    ctx = plan_context(cloud, instance_type, os_name, accelerator)
    assert active(ctx) == steps
    calls = []
    for name in steps:
        step = STEPS[name]
        recorded = apply_recorded(step, ctx)
        assert recorded == expected_calls(step.plan(ctx))  # apply runs the plan in order, sudo where marked
        calls += recorded
    commands = [c for _, c in calls]
    assert has(commands, f"{APT} '{driver_package}=580.167.08-*'")
    assert [c for c in calls if c[0] == "reboot"] == [("reboot", "reboot")]  # one reboot: the driver's
    assert any(f'[ "$n" -eq {gpus} ]' in c for c in commands)
    assert any("nvidia-fabricmanager-580=580.167.08-*" in c for c in commands) == ("fabric-manager" in steps)
    assert any("efa_installer.sh" in c for c in commands) == ("efa" in steps)
    repo = version_set(os_name).cuda_repo
    assert any(f"/compute/cuda/repos/{repo}/x86_64/cuda-keyring_1.1-1_all.deb" in c for c in commands)


def test_p4d_driver_and_fabric_manager_run_these_exact_commands():
    ctx = plan_context("aws", "p4d.24xlarge", "ubuntu-22.04")
    calls = apply_recorded(STEPS["nvidia-driver"], ctx)
    assert [kind for kind, _ in calls] == ["sudo"] * 5 + ["reboot", "sudo", "run"]
    assert calls[0][1] == ('printf "%s\\n" "blacklist nouveau" "options nouveau modeset=0" > '
                           "/etc/modprobe.d/blacklist-nouveau.conf")
    assert calls[1][1] == "update-initramfs -u" and f"{APT} linux-headers-$(uname -r)" in calls[2][1]
    assert f"{APT} 'nvidia-open-580=580.167.08-*'" in calls[3][1] and calls[4][1] == "apt-mark hold nvidia-open-580"
    assert calls[6:] == [("sudo", "systemctl enable --now nvidia-persistenced"), ("run", DRIVER_VERIFY)]
    calls = apply_recorded(STEPS["fabric-manager"], ctx)
    assert f"{APT} 'nvidia-fabricmanager-580=580.167.08-*'" in calls[0][1]
    assert calls[1:] == [
        ("sudo", "apt-mark hold nvidia-fabricmanager-580"),
        ("sudo", "systemctl enable --now nvidia-fabricmanager"),
        ("run", "sh -c 'systemctl is-active --quiet nvidia-fabricmanager && nv-fabricmanager --version | grep -qF 580.167.08'"),
    ]


def test_v100_gets_proprietary_modules_and_the_cuda_12_6_torch():
    ctx = plan_context("gcp", "n1-standard-8", "ubuntu-22.04", "nvidia-tesla-v100:1")
    driver = [c.run for c in STEPS["nvidia-driver"].plan(ctx)]
    assert has(driver, f"{APT} 'cuda-drivers-580=580.167.08-*'") and not has(driver, "nvidia-open")
    assert STEPS["gpu-verify"].plan(ctx)[-1].run.endswith(" 1 12.6")
    assert (f"{APT} 'cuda-toolkit-12-6=12.6.3-*' libnccl2=2.23.4-1+cuda12.6 libnccl-dev=2.23.4-1+cuda12.6 2>&1"
            in STEPS["cuda-toolkit"].plan(ctx)[0].run)  # CUDA 13 has no Volta: the toolkit follows the cu126 torch build


def test_cuda_step_pins_toolkit_and_nccl():
    ctx = plan_context("aws", "g5.xlarge", "ubuntu-22.04")
    install, hold = [c.run for c in STEPS["cuda-toolkit"].plan(ctx)][:2]
    assert f"{APT} 'cuda-toolkit-13-0=13.0.2-*' libnccl2=2.28.9-1+cuda13.0 libnccl-dev=2.28.9-1+cuda13.0 2>&1" in install
    assert hold == "apt-mark hold cuda-toolkit-13-0 libnccl2 libnccl-dev"


@pytest.mark.parametrize("instance_type, rdma", [("p4d.24xlarge", True), ("p5.48xlarge", True), ("g5.48xlarge", False)])
def test_efa_plan_verifies_the_installer_and_writes_the_nccl_env(instance_type, rdma):
    ctx = plan_context("aws", instance_type, "ubuntu-22.04")
    commands = [c.run for c in STEPS["efa"].plan(ctx)]
    assert "curl -fsSL --retry 3 -o /var/cache/gpuforge/aws-efa-installer-1.50.0.tar.gz https://efa-installer.amazonaws.com/aws-efa-installer-1.50.0.tar.gz" in commands
    assert any("VALIDSIG .*4E9091BCBB97A96B26B15E59A05480B1DD2D3CCC" in c for c in commands)
    assert any("--check-signatures" in c for c in commands)
    assert "sysctl -w kernel.yama.ptrace_scope=0" in commands
    env_cmd = next(c for c in commands if "/etc/gpuforge/nccl.env" in c)
    assert ("FI_EFA_USE_DEVICE_RDMA" in env_cmd) is rdma and "FI_PROVIDER" in env_cmd
    assert "export NCCL_PROTO" not in "\n".join(nccl_env_lines(rdma))
    reboot = next(c for c in STEPS["efa"].plan(ctx) if c.reboot)
    assert reboot.reboot_when == "Please reboot to complete the installation"  # only when the installer asks
    assert commands.index("reboot") < len(commands) - 1  # verify runs after the module reload


def test_efa_skips_reboot_when_the_pinned_installer_already_ran():
    ctx = fixture_ctx("aws_p4d_a100.txt", "aws", "p4d.24xlarge")
    assert not any(c.reboot for c in STEPS["efa"].plan(ctx))


def probe_output(sections: dict[str, str]) -> str:
    return "".join(f"{SECTION}{name}\n{text}\n" for name, text in sections.items())


def done_outputs(ctx: StepContext) -> dict[str, str]:
    vs = version_set("ubuntu-22.04")
    return {
        "nvidia-repo": probe_output({
            "keyring": "install ok installed",
            "sources": f"deb [signed-by=/usr/share/keyrings/cuda-archive-keyring.gpg] {vs.cuda_repo_url} /",
            "pin": "\n".join(pin_lines(vs)),
        }),
        "nvidia-driver": probe_output({
            "smi": "580.167.08\n" * 8,
            "proc": "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.167.08  Release Build",
            "persistenced": "active",
        }),
        "fabric-manager": probe_output({"version": "Fabric Manager version is : 580.167.08", "active": "active"}),
        "efa": probe_output({
            "installer": "# EFA installer version: 1.50.0\n# Debug packages installed: no",
            "fi": "ok", "ptrace": "0", "env": "\n".join(nccl_env_lines(True)),
        }),
        "cuda-toolkit": probe_output({
            "pkgs": "cuda-toolkit-13-0=13.0.2-1\nlibnccl2=2.28.9-1+cuda13.0\nlibnccl-dev=2.28.9-1+cuda13.0",
            "nvcc": "Cuda compilation tools, release 13.0, V13.0.88",
        }),
    }


@pytest.mark.parametrize("name", ["nvidia-repo", "nvidia-driver", "fabric-manager", "efa", "cuda-toolkit"])
def test_check_that_reports_done_prevents_apply(name):
    ctx = fixture_ctx("aws_p4d_a100.txt", "aws", "p4d.24xlarge")
    step = STEPS[name]
    probe = probe_command(step.probe_sections(ctx))
    conn = MockContext(run={probe: Result(done_outputs(ctx)[name])}, sudo={})
    if not step.check(conn, ctx):
        step.apply(conn, ctx)  # would raise NotImplementedError: no apply command is answered
    assert step.check(conn, ctx)
    assert [c.args[0] for c in conn.run.call_args_list] == [probe, probe] and conn.sudo.call_count == 0


@pytest.mark.parametrize(
    "name, stale",
    [
        ("nvidia-driver", ("580.167.08", "570.172.08")),
        ("fabric-manager", ("is : 580.167.08", "is : 570.172.08")),
        ("efa", ("version: 1.50.0", "version: 1.43.2")),
        ("cuda-toolkit", ("libnccl2=2.28.9-1+cuda13.0", "libnccl2=2.27.7-1+cuda13.0")),
        ("nvidia-repo", ("Pin: version 580.167.08-*", "Pin: version 570.172.08-*")),
    ],
)
def test_check_that_sees_another_version_lets_apply_run(name, stale):
    ctx = plan_context("aws", "p4d.24xlarge", "ubuntu-22.04")
    step = STEPS[name]
    output = done_outputs(ctx)[name].replace(*stale)
    assert not step.check(MockContext(run={probe_command(step.probe_sections(ctx)): Result(output)}), ctx)


def test_driver_already_loaded_but_daemon_off_only_starts_the_daemon():
    ctx = fixture_ctx("aws_p4d_a100.txt", "aws", "p4d.24xlarge")
    assert apply_recorded(STEPS["nvidia-driver"], ctx) == [
        ("sudo", "systemctl enable --now nvidia-persistenced"),
        ("run", DRIVER_VERIFY),
    ]


def test_old_apt_driver_is_upgraded_with_a_reboot():
    ctx = fixture_ctx("gcp_g2_l4.txt", "gcp", "g2-standard-8")
    plan = STEPS["nvidia-driver"].plan(ctx)
    assert has([c.run for c in plan], f"{APT} 'nvidia-open-580=580.167.08-*'")
    assert [c.run for c in plan if c.reboot] == ["reboot"]


def test_installed_but_unloaded_driver_still_reboots():
    ctx = fixture_ctx("gcp_n1_t4_nodriver.txt", "gcp", "n1-standard-8")
    assert any(c.reboot for c in STEPS["nvidia-driver"].plan(ctx))


def test_proprietary_modules_on_an_a100_are_switched_to_open():
    ctx = fixture_ctx("aws_p4d_a100.txt", "aws", "p4d.24xlarge", driver_flavor="proprietary")
    plan = STEPS["nvidia-driver"].plan(ctx)
    assert any(c.reboot for c in plan) and has([c.run for c in plan], f"{APT} 'nvidia-open-580=580.167.08-*'")


def test_runfile_driver_too_old_for_every_torch_build_is_refused():
    """Regression: a .run-installed driver used to be refused whatever its version; now only one no torch build
    of the matrix runs on is, and the message says what torch needs and how to remove the driver."""
    ctx = fixture_ctx("aws_g5_a10g_dlami.txt", "aws", "g5.xlarge", driver_version="470.256.02")
    message = r"driver 470\.256\.02 \(NVIDIA \.run installer.*needs driver >= 525\.60\.13\).*nvidia-uninstall"
    with pytest.raises(MatrixError, match=message):
        STEPS["nvidia-driver"].plan(ctx)
    with pytest.raises(MatrixError, match=message):
        render_plan(GPU_STEPS, ctx)


def test_secure_boot_blocks_the_dkms_driver_with_a_clear_error():
    ctx = fixture_ctx("aws_p5_h100_fresh.txt", "aws", "p5.48xlarge", secure_boot=True)
    with pytest.raises(MatrixError, match="Secure Boot is on"):
        STEPS["nvidia-driver"].plan(ctx)


def test_unknown_os_is_refused_naming_the_supported_ones():
    ctx = fixture_ctx("aws_p5_h100_fresh.txt", "aws", "p5.48xlarge", os_id="debian", os_version="12")
    with pytest.raises(MatrixError, match="debian-12; supported: ubuntu-22.04, ubuntu-24.04"):
        STEPS["nvidia-driver"].plan(ctx)


def test_cpu_node_skips_every_gpu_step():
    ctx = fixture_ctx("aws_p5_h100_fresh.txt", "local", "", gpu_pci_count=0, gpu_pci_models=(), nvswitch_count=0, efa_count=0)
    assert {s.skip_reason(ctx) for s in GPU_STEPS} == {"no NVIDIA GPU on this node"}


@pytest.mark.parametrize("nvswitches, runs", [(6, True), (0, False)])
def test_fabric_manager_follows_the_nvswitches_on_hosts_clusters(nvswitches, runs):
    ctx = fixture_ctx("aws_p4d_a100.txt", "hosts", "", nvswitch_count=nvswitches)
    assert (STEPS["fabric-manager"].skip_reason(ctx) is None) is runs


@pytest.mark.parametrize(
    "change, changed",
    [
        ({"driver_version": "580.173.02", "fabric_manager": "580.173.02"}, {"nvidia-repo", "nvidia-driver", "fabric-manager"}),
        ({"nccl": "2.29.7"}, {"cuda-toolkit"}),
        ({"cuda_toolkit": "13.0.3"}, {"cuda-toolkit"}),
        ({"efa_installer": "1.51.0", "aws_ofi_nccl": "1.22.0"}, {"efa"}),
        ({"torch": "2.14.0"}, {"gpu-verify"}),
    ],
)
def test_changed_pin_changes_exactly_the_affected_fingerprints(change, changed):
    ctx = plan_context("aws", "p4d.24xlarge", "ubuntu-22.04")
    before = {s.name: s.fingerprint(ctx) for s in GPU_STEPS}
    ctx.options["versions"] = dataclasses.replace(ctx.options["versions"], **change)
    after = {s.name: s.fingerprint(ctx) for s in GPU_STEPS}
    assert {name for name in before if before[name] != after[name]} == changed


def test_driver_fingerprint_does_not_change_once_the_driver_is_loaded():
    """Regression guard: the plan loses its reboot once the driver runs; the fingerprint must not follow."""
    fresh = fixture_ctx("aws_p4d_a100.txt", "aws", "p4d.24xlarge", driver_version="", driver_flavor="")
    loaded = fixture_ctx("aws_p4d_a100.txt", "aws", "p4d.24xlarge")
    step = STEPS["nvidia-driver"]
    assert step.plan(fresh) != step.plan(loaded)
    assert step.fingerprint(fresh) == step.fingerprint(loaded)


@pytest.mark.parametrize(
    "cloud, instance_type, options, on_bus, expected",
    [
        ("aws", "p4d.24xlarge", {}, 7, 8),  # the catalog, not the (short) bus, sets the bar
        ("gcp", "n1-standard-8", {"accelerator": "nvidia-tesla-t4:4"}, 3, 4),
        ("hosts", "", {}, 2, 2),  # no catalog row: what the bus shows
    ],
)
def test_gpu_verify_expects_the_catalog_count(cloud, instance_type, options, on_bus, expected):
    ctx = fixture_ctx("gcp_n1_t4_nodriver.txt", cloud, instance_type, gpu_pci_count=on_bus)
    ctx.options.update(options, cloud=cloud)
    assert f'[ "$n" -eq {expected} ]' in STEPS["gpu-verify"].plan(ctx)[0].run


def test_gpu_verify_always_runs():
    ctx = fixture_ctx("aws_p4d_a100.txt", "aws", "p4d.24xlarge")
    assert STEPS["gpu-verify"].check(MockContext(run={}), ctx) is False


def test_synth_facts_describe_a_fresh_vm_from_the_catalog():
    p5 = synth_facts("aws", "p5.48xlarge", "ubuntu-24.04")
    assert (p5.gpu_pci_count, p5.nvswitch_count, p5.efa_count, p5.driver_version) == (8, 4, 32, "")
    assert p5.os_name == "ubuntu-24.04" and p5.gpu_model == "H100"
    t4 = synth_facts("gcp", "n1-standard-8", "ubuntu-22.04", "nvidia-tesla-t4:4")
    assert (t4.gpu_pci_count, t4.gpu_model, t4.nvswitch_count, t4.efa_count) == (4, "T4", 0, 0)
    with pytest.raises(MatrixError, match="supported: ubuntu-22.04, ubuntu-24.04"):
        synth_facts("aws", "p5.48xlarge", "ubuntu-20.04")


def test_dry_run_plan_for_p4d_lists_every_step_and_command():
    text = render_plan(GPU_STEPS, plan_context("aws", "p4d.24xlarge", "ubuntu-22.04"))
    assert text.startswith("Setup plan for p4d.24xlarge: ubuntu-22.04, 96 CPUs, 1152 GiB, 8x A100")
    assert "[3] fabric-manager: NVIDIA Fabric Manager" in text and "[6] efa: EFA software" in text
    assert "[5] gdrcopy: GDRCopy" in text
    assert ("  1.2 (root) curl -fsSL --retry 3 -o /var/cache/gpuforge/cuda-keyring_1.1-1_all.deb "
            "https://developer.download.nvidia.com/compute/cuda/repos/ubuntu2204/x86_64/cuda-keyring_1.1-1_all.deb") in text
    assert text.count("(root) reboot   <- reboot\n") == 1  # the driver's
    assert text.count("(root) reboot   <- reboot, only if the step's previous command printed") == 1  # EFA's
    small = render_plan(GPU_STEPS, plan_context("aws", "g5.xlarge", "ubuntu-22.04"))
    assert "[3] fabric-manager: skipped (no NVSwitch" in small and "[6] efa: skipped (no EFA" in small


def test_allreduce_command_is_a_pasteable_torchrun_line():
    ctx = plan_context("aws", "p4d.24xlarge", "ubuntu-22.04")
    words = shlex.split(allreduce_command(ctx, nnodes=2, node_rank=1, master_addr="10.0.0.5", master_port=29500, nproc=8,
                                          backend="nccl", nccl_debug=True))
    assert words[:2] == ["sh", "-c"]
    assert words[2] == (
        "export NCCL_DEBUG=INFO NCCL_DEBUG_SUBSYS=INIT,NET; "
        "if [ -r /etc/gpuforge/nccl.env ]; then . /etc/gpuforge/nccl.env; fi; exec /opt/gpuforge/venv/bin/python "
        "-m torch.distributed.run --nnodes=2 --nproc-per-node=8 --node-rank=1 --master-addr=10.0.0.5 "
        "--master-port=29500 --max-restarts=0 -m provision.allreduce --sizes 1M,16M,256M --iters 20 --backend nccl"
    )  # NCCL forced on GPU nodes (`auto` could fall back to gloo), its log names the transport


def test_facts_default_has_no_gpu():
    assert not Facts().has_gpu
