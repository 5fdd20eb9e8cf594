"""The shell the GPU steps rely on, run for real: the facts command, file writes, and verify snippets
against a stand-in nvidia-smi (no GPU here, so the stand-in prints what the real one would)."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest

from provision.facts import GATHER_COMMAND, parse_facts
from provision.plan import plan_context
from provision.steps.efa import nccl_env_lines
from provision.steps.gpu import GPU_STEPS
from provision.steps.gpu_common import write_file
from provision.steps.nvidia import pin_lines
from provision.versions import version_set

pytestmark = pytest.mark.integration
STEPS = {step.name: step for step in GPU_STEPS}


def sh(command: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=30, env=env)


def test_gather_command_runs_in_sh_and_parses():
    proc = sh(GATHER_COMMAND)
    assert proc.returncode == 0, proc.stderr
    facts = parse_facts(proc.stdout)
    assert facts.os_id and facts.kernel and facts.cpus > 0 and facts.mem_gib > 0


@pytest.mark.parametrize("lines", [nccl_env_lines(True), pin_lines(version_set("ubuntu-22.04"))])
def test_write_file_writes_the_lines_verbatim(tmp_path, lines):
    target = tmp_path / "out"
    cmd = write_file(str(target), lines, desc="test")
    assert sh(cmd.run).returncode == 0
    assert target.read_text().splitlines() == lines


def test_nccl_env_file_sources_into_the_efa_library_path(tmp_path):
    env_file = tmp_path / "nccl.env"
    assert sh(write_file(str(env_file), nccl_env_lines(True), desc="").run).returncode == 0
    out = sh(f'LD_LIBRARY_PATH=/usr/lib/x; . {env_file}; echo "$FI_PROVIDER $FI_EFA_USE_DEVICE_RDMA $LD_LIBRARY_PATH"')
    assert out.stdout.split() == [
        "efa", "1",
        "/opt/amazon/ofi-nccl/lib/x86_64-linux-gnu:/opt/amazon/ofi-nccl/lib:/opt/amazon/efa/lib:/usr/lib/x",
    ]


def fake_nvidia_smi(tmp_path: Path, lines: list[str]) -> dict:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    tool = bindir / "nvidia-smi"
    tool.write_text("#!/bin/sh\n" + "".join(f"echo {shlex.quote(line)}\n" for line in lines))
    tool.chmod(0o755)
    return {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"}


@pytest.mark.parametrize(
    "loaded, ok",
    [(["580.167.08"] * 8, True), (["580.167.08"] * 7 + ["570.172.08"], False), ([], False)],
)
def test_driver_verify_snippet(tmp_path, loaded, ok):
    ctx = plan_context("aws", "p4d.24xlarge", "ubuntu-22.04")
    verify = STEPS["nvidia-driver"].plan(ctx)[-1]
    proc = sh(shlex.split(verify.run)[2], env=fake_nvidia_smi(tmp_path, loaded))
    assert (proc.returncode == 0) is ok
    if not ok:
        assert "expected 580.167.08" in proc.stderr


ERROR_LINE = "Unable to determine the device handle for GPU0000:10:1C.0: Unknown Error"


@pytest.mark.parametrize(
    "lines, ok, said",
    [([str(i) for i in range(8)], True, ""),
     ([str(i) for i in range(7)], False, "nvidia-smi sees 7 GPUs, expected 8"),
     # Regression (issue 8, defect 6): `wc -l` counted this error line as the eighth GPU.
     ([str(i) for i in range(7)] + [ERROR_LINE], False, "nvidia-smi sees 7 GPUs, expected 8")],
)
def test_gpu_count_verify_snippet(tmp_path, lines, ok, said):
    ctx = plan_context("aws", "p4d.24xlarge", "ubuntu-22.04")
    count = STEPS["gpu-verify"].plan(ctx)[0]
    proc = sh(shlex.split(count.run)[2], env=fake_nvidia_smi(tmp_path, lines))
    assert (proc.returncode == 0) is ok
    assert said in proc.stderr


def test_torch_check_fails_loudly_when_torch_cannot_use_cuda():
    """The verify step's inline script, run by this machine's CPU-only torch: it must exit non-zero and say why,
    never report a node ready with torch.cuda.is_available() false."""
    import sys

    ctx = plan_context("aws", "p4d.24xlarge", "ubuntu-22.04")
    words = shlex.split(STEPS["gpu-verify"].plan(ctx)[1].run)
    assert words[0] == "/opt/gpuforge/venv/bin/python" and words[-2:] == ["8", "13.0"]
    proc = subprocess.run([sys.executable, *words[1:]], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "cannot use the GPUs: torch.cuda.is_available() is False" in proc.stderr


VERSION_JSON = """{
   "cuda" : {
      "name" : "CUDA SDK",
      "version" : "12.8.1"
   },
   "cuda_cccl" : {
      "name" : "CUDA C++ Core Compute Libraries",
      "version" : "12.8.90"
   }
}
"""


def fake_toolkits(root: Path) -> None:
    """/usr/local as a Deep Learning AMI lays it out: toolkits with nvcc, NCCL built inside one of them."""
    for release, json_text in (("12.8", VERSION_JSON), ("12.6", None)):
        nvcc = root / f"cuda-{release}" / "bin" / "nvcc"
        nvcc.parent.mkdir(parents=True)
        nvcc.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {release}, V{release}.85'\n")
        nvcc.chmod(0o755)
        if json_text:
            (root / f"cuda-{release}" / "version.json").write_text(json_text)
    (root / "cuda-11.8" / "lib").mkdir(parents=True)  # no nvcc: not a toolkit
    (root / "cuda-12.8" / "lib").mkdir()
    (root / "cuda-12.8" / "lib" / "libnccl.so.2.26.2").write_text("")


def test_existing_cuda_probes_read_a_dlami_layout(tmp_path):
    """The facts/cuda-toolkit probes, run by sh over a fake /usr/local: version.json's SDK version (its "name"
    line comes first), toolkits without one by directory, and NCCL inside a toolkit."""
    from provision.facts import CUDA_TOOLKITS_PROBE, CUDA_VERSION_JSON, NCCL_PROBE, parse_cuda_toolkits, parse_facts

    fake_toolkits(tmp_path)
    moved = {name: text.replace("/usr/local/", f"{tmp_path}/") for name, text in
             {"toolkits": CUDA_TOOLKITS_PROBE, "nccl": NCCL_PROBE,
              "cuda": CUDA_VERSION_JSON.format(path="/usr/local/cuda-12.8/version.json")}.items()}
    assert parse_cuda_toolkits(sh(moved["toolkits"]).stdout) == ("12.6", "12.8.1")
    assert sh(moved["nccl"]).stdout.split() == [f"{tmp_path}/cuda-12.8/lib/libnccl.so.2.26.2"]
    assert parse_facts(f"##gpuforge:cuda\n{sh(moved['cuda']).stdout}").cuda_version == "12.8.1"


def test_kept_toolkit_verify_snippet(tmp_path):
    from tests.unit.test_gpu_plans import fixture_ctx

    fake_toolkits(tmp_path)
    ctx = fixture_ctx("gcp_g2_l4_dlvm.txt", "gcp", "g2-standard-8",
                      nccl_libraries=("/usr/local/cuda-12.8/lib/libnccl.so.2.26.2",), cuda_packages=())
    verify = STEPS["cuda-toolkit"].plan(ctx)[-1]
    script = shlex.split(verify.run)[2].replace("/usr/local/", f"{tmp_path}/")
    assert sh(script).returncode == 0
    (tmp_path / "cuda-12.8" / "lib" / "libnccl.so.2.26.2").unlink()
    assert sh(script.replace("/usr/lib/x86_64-linux-gnu/", f"{tmp_path}/none/")).returncode != 0


def test_probe_sections_survive_output_without_a_final_newline():
    """Found by executing the plans (issue 8): `dpkg-query -f='${Status}'` prints no newline, which glued the next
    section's tag to it, so nvidia-repo's check never passed and every setup re-ran it."""
    from provision.facts import split_sections
    from provision.steps.gpu_common import probe_command

    out = sh(probe_command({"keyring": "printf 'install ok installed'", "sources": "echo deb https://x /"})).stdout
    assert split_sections(out) == {"keyring": "install ok installed", "sources": "deb https://x /"}


A100_LSPCI = "10:1c.0 3D controller [0302]: NVIDIA Corporation GA100 [A100 SXM4 40GB] [10de:20b0] (rev a1)"


def fake_tool(tmp_path: Path, name: str, script: str) -> dict:
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    (bindir / name).write_text("#!/bin/sh\n" + script)
    (bindir / name).chmod(0o755)
    return {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"}


def test_one_package_query_feeds_both_package_sections(tmp_path):
    """The facts ask dpkg once; each section keeps only its own packages (what dpkg printed for the other's
    patterns, or anything else, stays out)."""
    lines = ["ii cuda-toolkit-12-8=12.8.1-1", "ii libnccl2=2.27.7-1+cuda12.8", "ii libnccl-dev=2.27.7-1+cuda12.8",
             "ii nvidia-driver-580-open=580.95.05-0ubuntu1", "ii libnvidia-compute-580=580.95.05-0ubuntu1",
             "ii cuda-drivers-580=580.95.05-1", "rc nvidia-driver-535=535.1-1", "ii libc6=2.36-9"]
    fake_tool(tmp_path, "dpkg-query", "".join(f"echo {shlex.quote(line)}\n" for line in lines))
    env = fake_tool(tmp_path, "lspci", f"echo {shlex.quote(A100_LSPCI)}\n")  # an A100 on the bus, no driver yet
    facts = parse_facts(sh(GATHER_COMMAND, env).stdout)
    assert facts.gpu_pci_count == 1 and not facts.gpus
    assert facts.cuda_packages == ("cuda-toolkit-12-8=12.8.1-1", "libnccl2=2.27.7-1+cuda12.8", "libnccl-dev=2.27.7-1+cuda12.8")
    assert facts.nvidia_packages == ("nvidia-driver-580-open=580.95.05-0ubuntu1", "libnvidia-compute-580=580.95.05-0ubuntu1",
                                     "cuda-drivers-580=580.95.05-1")
    assert facts.driver_packaging == "apt"


def test_a_node_without_anything_nvidia_skips_the_package_and_cuda_probes(tmp_path):
    """No NVIDIA device on the bus (lspci, sysfs), no nvidia-smi, no loaded driver: dpkg is never asked (it reads
    the whole package database, the costliest probe of all)."""
    calls = tmp_path / "calls"
    fake_tool(tmp_path, "dpkg-query", f"echo dpkg-query >> {calls}\n")
    env = fake_tool(tmp_path, "lspci", "echo '00:03.0 Ethernet controller [0200]: Red Hat, Inc. Virtio [1af4:1000]'\n")
    proc = sh(GATHER_COMMAND, env)
    facts = parse_facts(proc.stdout)
    assert proc.returncode == 0 and facts.os_id and not facts.has_gpu
    assert not calls.exists()
    assert "##gpuforge:efa-installer" in proc.stdout and proc.stdout.rstrip().endswith("##gpuforge:end")


def test_first_look_runs_in_sh_and_gives_each_probe_its_own_output_and_status(tmp_path):
    from provision.first_look import ProbeResult, first_look_command, parse_first_look

    markers = tmp_path / "markers"
    markers.mkdir()
    (markers / "base.json").write_text('{"step": "base", "fingerprint": "f00", "time": 1}\n')
    probes = {"plain": "printf 'abc'", "lines": "echo one; echo two", "fails": "echo gone >&2; false",
              "leaves": "cd / && exit 3", "after": "pwd"}
    proc = sh(f"cd {shlex.quote(str(tmp_path))} && " + first_look_command(str(markers), probes))
    assert proc.returncode == 0, proc.stderr
    first = parse_first_look(proc.stdout)
    assert parse_facts(first.facts_output).cpus > 0
    assert first.markers == {"base": "f00"}
    assert first.probes == {"plain": ProbeResult("abc", 0), "lines": ProbeResult("one\ntwo\n", 0),
                            "fails": ProbeResult("", 1), "leaves": ProbeResult("", 3),
                            "after": ProbeResult(f"{tmp_path}\n", 0)}  # a probe's cd and exit stay in its subshell
