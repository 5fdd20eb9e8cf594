"""Nodes that already have a GPU stack (Deep Learning AMI/VM, baked image): what is right is kept and said so,
through the runner's own path (no marker, the step's check passes -> "already in place on this node"), and the
torch build follows the driver that stays."""

from __future__ import annotations

import re

import pytest
from invoke import Result

from provision.facts import SECTION
from provision.plan import render_plan
from provision.runner import CHANGED, SKIPPED, UNCHANGED, NodeReport, Runner
from provision.steps.core import PythonEnvStep
from provision.steps.gpu import GPU_STEPS, GPU_SYSTEM_STEPS
from provision.steps.gpu_common import probe_command, versions_for
from provision.steps.nvidia import pin_lines
from provision.versions import version_set
from tests.unit.test_gpu_plans import APT, STEPS, RecordingContext, fixture_ctx

MARKER_WRITE = re.compile(r"mkdir -p .*/\.gpuforge/markers && echo ")
P4D_TOOLKITS = "\n".join(f'cuda-{v[:4]}       "version" : "{v}"' for v in ("12.8.1", "12.9.1", "13.0.2", "13.2.0"))


def probe_output(sections: dict[str, str]) -> str:
    return "".join(f"{SECTION}{name}\n{text}\n" for name, text in sections.items())


def live_p4d_dlami() -> dict[str, str]:
    """What the steps' probes print on the p4d DLAMI of fixtures/facts/aws_p4d_a100_dlami.txt."""
    return {
        "nvidia-driver": probe_output({
            "smi": "595.91.07\n" * 8,
            "proc": "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  595.91.07  Release Build",
            "persistenced": "inactive", "pm": "Enabled\n" * 8,  # persistence mode on, no daemon unit
        }),
        "fabric-manager": probe_output({"version": "Fabric Manager version is : 595.91.07", "active": "active"}),
        "cuda-toolkit": probe_output({
            "pkgs": "", "nvcc": "Cuda compilation tools, release 13.0, V13.0.88", "toolkits": P4D_TOOLKITS,
            "nccl": "/usr/local/cuda-13.0/lib/libnccl.so.2.29.7\n/usr/local/cuda-13.2/lib/libnccl.so.2.29.7",
            "cuda-pkgs": "",
        }),
        "efa": probe_output({"installer": "# EFA installer version: 1.50.0", "fi": "ok", "ptrace": "1", "env": ""}),
    }


def test_p4d_dlami_keeps_driver_fabric_manager_cuda_and_efa_installer(tmp_path):
    """The runner on a Deep Learning AMI with a new-enough driver: only read-only probes and gpuforge's own
    markers; no apt, no driver, Fabric Manager, CUDA or EFA installs, no reboot."""
    ctx = fixture_ctx("aws_p4d_a100_dlami.txt", "aws", "p4d.24xlarge")
    live = live_p4d_dlami()
    efa_writes = [c.run for c in STEPS["efa"].plan(ctx) if c.sudo]
    efa_verify = [c.run for c in STEPS["efa"].plan(ctx) if not c.sudo]  # fi_info and the plugin: read-only
    gdrcopy = STEPS["gdrcopy"].plan(ctx)  # a DLAMI's own GDRCopy is not recognised: the pinned one is built
    conn = RecordingContext(
        gdrcopy,
        run={**{probe_command(STEPS[n].probe_sections(ctx)): Result(out) for n, out in live.items()},
             probe_command({"pkgs": STEPS["gdrcopy"].probe_sections()["pkgs"]}): Result(""),
             MARKER_WRITE: Result(""), **{cmd: Result("") for cmd in efa_verify}},
        sudo={cmd: Result("") for cmd in efa_writes},
    )
    runner = Runner(ctx.cluster, steps=GPU_SYSTEM_STEPS, log_dir=tmp_path)
    report = NodeReport("gpu-0", "203.0.113.10")
    ctx.options["reboot_hook"] = lambda *args: pytest.fail("nothing on a DLAMI needs a reboot")
    results = {s.name: runner.run_step(conn, ctx, s, {}, False, report) for s in GPU_SYSTEM_STEPS}

    assert {n: r.status for n, r in results.items()} == {
        "nvidia-repo": SKIPPED, "nvidia-driver": UNCHANGED, "fabric-manager": UNCHANGED,
        "efa": CHANGED, "cuda-toolkit": UNCHANGED,  # efa: only ptrace and the NCCL environment file
        "gdrcopy": CHANGED,
    }
    assert results["nvidia-repo"].detail.startswith("nothing to install from NVIDIA's repository")
    assert results["nvidia-driver"].detail.startswith("already in place on this node: driver 595.91.07")
    gdr = {c.run for c in gdrcopy}
    sudo = [c for kind, c in conn.calls if kind == "sudo" and c not in gdr]
    assert sudo == efa_writes and not any(w in c for c in sudo for w in ("apt-get", "curl", "efa_installer", "reboot"))
    assert not any("nvidia" in c or "cuda-toolkit" in c for c in gdr)  # GDRCopy's build touches no driver or CUDA
    probes = ({probe_command(STEPS[n].probe_sections(ctx)) for n in live} | set(efa_verify)
              | {probe_command({"pkgs": STEPS["gdrcopy"].probe_sections()["pkgs"]})})
    assert all(c in probes or MARKER_WRITE.match(c) for kind, c in conn.calls if kind == "run")


def test_p4d_dlami_plan_says_what_is_already_in_place():
    ctx = fixture_ctx("aws_p4d_a100_dlami.txt", "aws", "p4d.24xlarge")
    ctx.options["versions"] = version_set("ubuntu-22.04")  # as `fab setup --dry-run` on a cluster passes it
    text = render_plan(GPU_STEPS, ctx)
    assert ("[1] nvidia-repo: skipped (nothing to install from NVIDIA's repository: the node's driver, "
            "Fabric Manager and CUDA stack are kept)") in text
    assert ("    = already in place on this node: driver 595.91.07 (NVIDIA .run installer, open kernel modules) runs "
            "torch 2.13.0+cu130 (CUDA 13.0 needs driver >= 580.65.06)") in text
    assert "    = already in place on this node: Fabric Manager 595.91.07, the version of the driver" in text
    assert "    = already in place on this node: CUDA 13.2.0 in /usr/local/cuda-13.2" in text
    assert "    = already in place on this node: EFA installer 1.50.0 (>= 1.50.0)" in text
    assert "Versions: driver 595.91.07, CUDA 13.0.2, NCCL 2.28.9, torch 2.13.0+cu130" in text
    assert "apt-get install" not in text and "efa_installer.sh" not in text and "<- reboot" not in text


def test_fabric_manager_follows_the_driver_a_p4d_dlami_keeps():
    ctx = fixture_ctx("aws_p4d_a100_dlami.txt", "aws", "p4d.24xlarge", fabric_manager="")
    assert versions_for(ctx).fabric_manager == "595.91.07"
    install, hold = [c.run for c in STEPS["fabric-manager"].plan(ctx)][:2]
    assert f"{APT} 'nvidia-fabricmanager-595=595.91.07-*' 2>&1" in install  # never 580.167.08 over a 595 driver
    assert hold == "apt-mark hold nvidia-fabricmanager-595"
    assert STEPS["nvidia-repo"].skip_reason(ctx) is None  # Fabric Manager now comes from NVIDIA's repository
    assert "Pin: version 595.91.07-*" in pin_lines(versions_for(ctx))
    matrix_fm = probe_output({"version": "Fabric Manager version is : 580.167.08", "active": "active"})
    step = STEPS["fabric-manager"]
    assert not step.check(RecordingContext(run={probe_command(step.probe_sections(ctx)): Result(matrix_fm)}), ctx)


@pytest.mark.parametrize(
    "fixture, cloud, instance_type, index, toolkit",
    [
        ("aws_g5_a10g_dlami.txt", "aws", "g5.xlarge", "cu126", "CUDA 12.8.1 in /usr/local/cuda-12.8"),
        ("gcp_g2_l4_dlvm.txt", "gcp", "g2-standard-8", "cu126", "CUDA 12.8.1 in /usr/local/cuda-12.8"),
    ],
)
def test_r570_images_keep_their_stack_and_get_the_cu126_torch(fixture, cloud, instance_type, index, toolkit):
    """The DLAMI/DLVM fallback images of infra/ ship R570: too old for cu130, so the node keeps it and every step,
    python_env included, follows torch's cu126 build; gpu-verify then expects CUDA 12.6 from torch."""
    ctx = fixture_ctx(fixture, cloud, instance_type)
    driver = STEPS["nvidia-driver"].plan(ctx)
    assert not any("apt-get" in c.run or c.reboot for c in driver)
    assert driver[0].run == "systemctl enable --now nvidia-persistenced 2>/dev/null || nvidia-smi -pm 1"
    assert driver[0].sudo
    assert "too old for torch 2.13.0+cu130" in STEPS["nvidia-driver"].existing_note(ctx)
    assert STEPS["nvidia-repo"].skip_reason(ctx).startswith("nothing to install")
    assert toolkit in STEPS["cuda-toolkit"].existing_note(ctx)
    assert [c.sudo for c in STEPS["cuda-toolkit"].plan(ctx)] == [False]  # one read-only verify
    assert PythonEnvStep().expected_torch(ctx) == (f"torch==2.13.0+{index}", f"https://download.pytorch.org/whl/{index}")
    assert STEPS["gpu-verify"].plan(ctx)[-1].run.endswith(" 1 12.6")


def test_dlami_with_an_old_nccl_gets_only_the_pinned_nccl():
    ctx = fixture_ctx("aws_g5_a10g_dlami_580.txt", "aws", "g5.xlarge")
    assert versions_for(ctx).torch_cuda == "cu130" and versions_for(ctx).driver_version == "580.95.05"
    commands = [c.run for c in STEPS["cuda-toolkit"].plan(ctx)]
    assert f"{APT} libnccl2=2.28.9-1+cuda13.0 libnccl-dev=2.28.9-1+cuda13.0 2>&1" in commands[0]
    assert commands[1] == "apt-mark hold libnccl2 libnccl-dev"
    assert not any("cuda-toolkit-13-0" in c for c in commands)  # the image's CUDA 13.0.2 stays
    assert STEPS["nvidia-repo"].skip_reason(ctx) is None  # NCCL comes from NVIDIA's repository


def test_dlami_with_an_older_efa_installer_runs_the_pinned_one():
    ctx = fixture_ctx("aws_p4d_a100_dlami.txt", "aws", "p4d.24xlarge", efa_installer="1.43.3")
    plan = STEPS["efa"].plan(ctx)
    assert any("efa_installer.sh" in c.run for c in plan) and any(c.reboot for c in plan)
    assert STEPS["efa"].existing_note(ctx) == "EFA installer 1.43.3 is older than 1.50.0: the 1.50.0 installer runs"


def test_kept_runfile_driver_check_accepts_persistence_mode_without_the_daemon():
    ctx = fixture_ctx("aws_g5_a10g_dlami.txt", "aws", "g5.xlarge")
    step = STEPS["nvidia-driver"]
    probe = probe_command(step.probe_sections(ctx))
    loaded = {"smi": "570.172.08", "persistenced": "inactive",
              "proc": "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  570.172.08  Release Build"}
    assert step.check(RecordingContext(run={probe: Result(probe_output({**loaded, "pm": "Enabled"}))}), ctx)
    assert not step.check(RecordingContext(run={probe: Result(probe_output({**loaded, "pm": "Disabled"}))}), ctx)
