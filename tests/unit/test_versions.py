"""The version matrix: data consistency, GPU generations, torch builds, image families (driver decisions:
test_drivers.py)."""

from __future__ import annotations

import dataclasses

import pytest

from provision.errors import MatrixError
from provision.versions import (
    IMAGE_FAMILY_RE,
    gpu_family,
    image_family,
    load_matrix,
    matrix_markdown,
    matrix_table,
    NodeDriver,
    min_driver_for_cuda,
    open_kernel_modules,
    parse_version,
    supported_os,
    version_set,
)
from provision.drivers import torch_requirement


def test_supported_os_are_the_two_ubuntu_lts():
    assert supported_os() == ["ubuntu-22.04", "ubuntu-24.04"]


def test_unknown_os_names_it_and_the_supported_ones():
    with pytest.raises(MatrixError, match=r"debian-12; supported: ubuntu-22.04, ubuntu-24.04"):
        version_set("debian-12")


@pytest.mark.parametrize("os_name", ["ubuntu-22.04", "ubuntu-24.04"])
def test_each_row_is_consistent(os_name):
    vs = version_set(os_name)
    assert vs.fabric_manager == vs.driver_version  # same full version string
    assert vs.driver_version.startswith(vs.driver_branch + ".")
    assert parse_version(vs.driver_version) >= parse_version(min_driver_for_cuda(vs.cuda))
    assert vs.cuda_toolkit.startswith(vs.cuda + ".")
    assert vs.torch_index_url() == f"https://download.pytorch.org/whl/cu{vs.cuda.replace('.', '')}"
    assert vs.nccl_deb_version == f"{vs.nccl}-1+cuda{vs.cuda}"
    assert vs.cuda_keyring_url.endswith(f"/{vs.cuda_repo}/x86_64/cuda-keyring_1.1-1_all.deb")


@pytest.mark.parametrize(
    "cuda, driver",
    [("11.8", "450.80.02"), ("12.8", "525.60.13"), ("12.9", "525.60.13"), ("13.0", "580.65.06")],
)
def test_min_driver_for_cuda(cuda, driver):
    assert min_driver_for_cuda(cuda) == driver


def test_min_driver_for_unknown_cuda_is_refused():
    with pytest.raises(MatrixError, match="14.0"):
        min_driver_for_cuda("14.0")


@pytest.mark.parametrize(
    "model, family, open_modules",
    [
        ("NVIDIA A100-SXM4-40GB", "A100", True),
        ("GA100 [A100 SXM4 40GB]", "A100", True),
        ("NVIDIA H100 80GB HBM3", "H100", True),
        ("NVIDIA H200", "H200", True),
        ("NVIDIA A10G", "A10G", True),
        ("AD104GL [L4]", "L4", True),
        ("Tesla T4", "T4", True),
        ("NVIDIA L40S", "L40S", True),
        ("Tesla V100-SXM2-16GB", "V100", False),
        ("Tesla P100-PCIE-16GB", "P100", False),
        ("Tesla P4", "P4", False),
    ],
)
def test_open_kernel_modules_follow_the_gpu_generation(model, family, open_modules):
    assert gpu_family(model) == family
    assert open_kernel_modules(model) is open_modules


@pytest.mark.parametrize("model, message", [("Tesla K80", "not supported by the R580"), ("Radeon MI300X", "unknown GPU")])
def test_unsupported_or_unknown_gpus_are_refused(model, message):
    with pytest.raises(MatrixError, match=message):
        open_kernel_modules(model)


@pytest.mark.parametrize(
    "has_gpu, model, build",
    [(True, "", "cu130"), (True, "NVIDIA H100 80GB HBM3", "cu130"), (True, "Tesla V100-SXM2-16GB", "cu126"),
     (False, "", "cpu")],
)
def test_torch_requirement_names_the_exact_build(has_gpu, model, build):
    """Regression (issue 8, defect 2): `torch==2.13.0` is satisfied by an installed 2.13.0+cu126 (PEP 440 ignores
    local labels when the specifier has none), so a changed build was never applied; the label is now part of it."""
    assert torch_requirement("ubuntu-22.04", has_gpu, model) == (
        f"torch==2.13.0+{build}", f"https://download.pytorch.org/whl/{build}")


def test_a_cpu_node_needs_no_matrix_row():
    """Regression (issue 8, defect 9): a CPU node on Debian 12 was refused ("no tested version combination")."""
    assert torch_requirement("debian-12", False) == ("torch==2.13.0+cpu", "https://download.pytorch.org/whl/cpu")


def test_torch_cuda_version_for_legacy_gpus():
    vs = version_set("ubuntu-24.04")
    assert vs.torch_cuda_version("A100") == "13.0" and vs.torch_cuda_version("V100") == "12.6"


@pytest.mark.parametrize(
    "model, existing, index",
    [
        ("NVIDIA A10G", NodeDriver("570.172.08", "runfile", "open"), "cu126"),  # a DLAMI's R570 is kept
        ("NVIDIA A10G", "570.172.08", "cu126"),  # a bare version: a driver apt does not manage
        ("NVIDIA A10G", NodeDriver("570.172.08", "apt", "open"), "cu130"),  # apt upgrades it to R580
        ("NVIDIA A10G", NodeDriver("580.95.05", "runfile", "open"), "cu130"),
        ("Tesla V100-SXM2-16GB", NodeDriver("580.95.05", "runfile", "proprietary"), "cu126"),
    ],
)
def test_torch_requirement_follows_the_driver_the_node_keeps(model, existing, index):
    assert torch_requirement("ubuntu-22.04", True, model, existing) == (
        f"torch==2.13.0+{index}", f"https://download.pytorch.org/whl/{index}")


@pytest.mark.parametrize(
    "model, builds",
    [("A100", ["cu130", "cu126"]), ("T4", ["cu130", "cu126"]), ("V100", ["cu126"]), ("P4", ["cu126"]),
     ("", ["cu130", "cu126"])],
)
def test_torch_builds_carry_kernels_for_the_gpu(model, builds):
    assert version_set("ubuntu-22.04").torch_builds(model) == builds


def test_the_cu126_build_brings_its_own_cuda_stack():
    vs = version_set("ubuntu-24.04").for_torch_build("cu126")
    assert (vs.cuda, vs.cuda_toolkit, vs.torch_cuda) == ("12.6", "12.6.3", "cu126")
    assert vs.nccl_deb_version == "2.23.4-1+cuda12.6"
    assert vs.cuda_toolkit_package == "cuda-toolkit-12-6" and vs.torch_index_url("A100").endswith("/cu126")
    assert vs.driver_version == "580.167.08"  # the driver is not part of the torch build


def test_a_kept_driver_carries_fabric_manager_with_it():
    vs = version_set("ubuntu-22.04").with_driver("595.91.07")
    assert (vs.driver_branch, vs.driver_version, vs.fabric_manager) == ("595", "595.91.07", "595.91.07")
    assert vs.fabric_manager_package == "nvidia-fabricmanager-595"


@pytest.mark.parametrize(
    "os_name, family",
    [("ubuntu-22.04", "gpuforge-ubuntu2204-cu130-torch213"), ("ubuntu-24.04", "gpuforge-ubuntu2404-cu130-torch213")],
)
def test_image_family_follows_gcp_naming_rules(os_name, family):
    assert image_family(os_name) == family
    assert IMAGE_FAMILY_RE.match(family) and len(family) <= 63


def test_matrix_table_has_a_row_per_os_for_the_readme():
    rows = matrix_table()
    assert [r["os"] for r in rows] == supported_os()
    assert rows[0]["fabric_manager"] == version_set(rows[0]["os"]).driver_version
    table = matrix_markdown()
    assert table.splitlines()[0].startswith("| os | driver |") and "ubuntu-24.04" in table


@pytest.mark.parametrize(
    "change, message",
    [
        ({"fabric_manager": "580.159.04"}, "fabric_manager 580.159.04 must equal driver_version"),
        ({"driver_version": "570.172.08", "fabric_manager": "570.172.08"}, "not on branch 580"),
        ({"driver_branch": "575", "driver_version": "575.57.08", "fabric_manager": "575.57.08"}, "older than CUDA 13.0 needs"),
        ({"torch_cuda": "cu128"}, "does not match CUDA 13.0"),
        ({"cuda_toolkit_legacy": "13.0.2"}, "cuda_toolkit_legacy 13.0.2 is not a CUDA 12.6 release"),
        ({"torch_cuda_legacy": "cu118"}, "torch build cu118 is not one of cu126, cu130"),
    ],
)
def test_inconsistent_rows_are_refused_where_declared(change, message):
    with pytest.raises(MatrixError, match=message):
        dataclasses.replace(version_set("ubuntu-22.04"), **change)


def test_matrix_file_with_unknown_keys_is_refused(tmp_path):
    bad = tmp_path / "versions.toml"
    bad.write_text('[os."ubuntu-22.04"]\ndriver = "580"\n')
    with pytest.raises(MatrixError, match=r"unknown keys \['driver'\]"):
        load_matrix(bad)


def test_python_env_check_compares_the_whole_build(tmp_path):
    """Regression (issue 8, defect 2): the check stripped `+cuXXX`, so an installed 2.13.0+cu126 passed for cu130."""
    from invoke import MockContext, Result

    from provision.node_lock import lock_digest
    from provision.plan import plan_context
    from provision.steps.core import PythonEnvStep

    ctx = plan_context("aws", "g5.xlarge", "ubuntu-22.04")
    step = PythonEnvStep()
    assert step.expected_torch(ctx)[0] == "torch==2.13.0+cu130"
    site = "/opt/gpuforge/venv/lib/python3.10/site-packages"
    for build, ok in (("cu130", True), ("cu126", False)):
        probe = MockContext(run=Result(f"{lock_digest()}\n{site}/torch-2.13.0+{build}.dist-info\n"))
        assert step.check(probe, ctx) is ok
