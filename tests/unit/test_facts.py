"""Parsing node facts from recorded tool outputs, and checking them against the catalog."""

from __future__ import annotations

from pathlib import Path

import pytest

from provision.errors import FactsError
from provision.facts import (
    nccl_library_version,
    parse_cuda_toolkits,
    parse_driver_flavor,
    parse_efa_installer,
    parse_facts,
    parse_nvidia_smi,
    parse_secure_boot,
    short_bus_id,
    validate_gpu_facts,
)

FIXTURES = Path(__file__).parent / "fixtures" / "facts"


def load(name: str):
    return parse_facts((FIXTURES / name).read_text())


@pytest.mark.parametrize(
    "fixture, os_name, on_bus, visible, model, nvswitch, efa, driver, flavor, packaging",
    [
        ("aws_p4d_a100.txt", "ubuntu-22.04", 8, 8, "NVIDIA A100-SXM4-40GB", 6, 4, "580.167.08", "open", "apt"),
        ("aws_p4d_missing_gpu.txt", "ubuntu-22.04", 8, 7, "NVIDIA A100-SXM4-40GB", 6, 4, "580.167.08", "open", "apt"),
        ("aws_p5_h100_fresh.txt", "ubuntu-24.04", 8, 0, "H100 SXM5 80GB", 4, 32, "", "", ""),
        ("aws_g5_a10g_dlami.txt", "ubuntu-22.04", 1, 1, "NVIDIA A10G", 0, 0, "570.172.08", "open", "runfile"),
        ("aws_g5_a10g_dlami_580.txt", "ubuntu-22.04", 1, 1, "NVIDIA A10G", 0, 0, "580.95.05", "open", "runfile"),
        ("aws_p4d_a100_dlami.txt", "ubuntu-22.04", 8, 8, "NVIDIA A100-SXM4-40GB", 6, 4, "595.91.07", "open", "runfile"),
        ("gcp_g2_l4_dlvm.txt", "ubuntu-22.04", 1, 1, "NVIDIA L4", 0, 0, "570.133.20", "proprietary", "runfile"),
        ("gcp_g2_l4.txt", "ubuntu-22.04", 1, 1, "NVIDIA L4", 0, 0, "550.90.07", "proprietary", "apt"),
        ("gcp_n1_t4_nodriver.txt", "ubuntu-22.04", 1, 0, "Tesla T4", 0, 0, "", "", "apt"),
        ("gcp_a2_sysfs_only.txt", "ubuntu-24.04", 8, 0, "A100 SXM4 40GB", 6, 0, "", "", ""),
    ],
)
def test_parse_facts_reads_gpus_switches_efa_and_driver(
    fixture, os_name, on_bus, visible, model, nvswitch, efa, driver, flavor, packaging
):
    facts = load(fixture)
    assert facts.os_name == os_name
    assert (facts.gpu_pci_count, len(facts.gpus)) == (on_bus, visible)
    assert facts.gpu_model == model
    assert (facts.nvswitch_count, facts.efa_count) == (nvswitch, efa)
    assert (facts.driver_version, facts.driver_flavor, facts.driver_packaging) == (driver, flavor, packaging)
    assert facts.has_gpu and facts.gpu_count == on_bus


def test_parse_facts_p4d_details():
    facts = load("aws_p4d_a100.txt")
    assert facts.kernel == "6.8.0-1031-aws" and facts.cpus == 96 and facts.mem_gib == pytest.approx(1122.0, abs=1)
    assert facts.gpus[0].memory_mib == 40960 and facts.gpus[7].bus_id == "00000000:A0:1D.0"
    assert facts.gpu_pci_bus_ids[:2] == ("10:1c.0", "10:1d.0")
    assert facts.cuda_version == "13.0.2"
    assert facts.efa_installer == "1.50.0" and facts.secure_boot is False
    assert "nvidia-open-580=580.167.08-1ubuntu1" in facts.nvidia_packages
    assert facts.nvidia_smi_error == ""
    assert facts.summary() == "ubuntu-22.04, 96 CPUs, 1122 GiB, 8x NVIDIA A100-SXM4-40GB, driver 580.167.08"


def test_nvidia_smi_failure_is_kept_as_the_error_message():
    facts = load("gcp_n1_t4_nodriver.txt")
    assert facts.gpus == () and facts.driver_version == ""
    assert facts.nvidia_smi_error.startswith("NVIDIA-SMI has failed because it couldn't communicate")


def test_sysfs_only_node_gets_names_from_pci_ids():
    facts = load("gcp_a2_sysfs_only.txt")
    assert set(facts.gpu_pci_models) == {"A100 SXM4 40GB"}
    assert facts.gpu_pci_bus_ids[0] == "00:04.0"


def test_healthy_p4d_matches_its_catalog_row():
    validate_gpu_facts(load("aws_p4d_a100.txt"), 8, "A100", "p4d.24xlarge", require_driver=True)


def test_count_mismatch_names_both_numbers():
    with pytest.raises(FactsError, match=r"p4d\.24xlarge should have 8 A100 GPUs \(catalog\) but this node shows 7"):
        validate_gpu_facts(load("aws_p4d_seven_gpus.txt"), 8, "A100", "p4d.24xlarge")


def test_gpu_missing_from_nvidia_smi_names_the_bus_id():
    with pytest.raises(FactsError) as err:
        validate_gpu_facts(load("aws_p4d_missing_gpu.txt"), 8, "A100", "p4d.24xlarge")
    message = str(err.value)
    assert "lspci shows 8 NVIDIA GPUs but nvidia-smi sees 7" in message
    assert "not visible: a0:1d.0" in message
    assert "Unable to determine the device handle" in message


def test_no_driver_is_fine_before_the_driver_step_and_an_error_after():
    facts = load("gcp_n1_t4_nodriver.txt")
    validate_gpu_facts(facts, 1, "T4", "n1-standard-8")
    with pytest.raises(FactsError, match="lspci shows 1 NVIDIA GPUs but nvidia-smi sees 0; nvidia-smi said: NVIDIA-SMI has failed"):
        validate_gpu_facts(facts, 1, "T4", "n1-standard-8", require_driver=True)


def test_model_mismatch_names_the_model_found():
    with pytest.raises(FactsError, match="should have H100 GPUs .* has .*A100"):
        validate_gpu_facts(load("aws_p4d_a100.txt"), 8, "H100", "p5.48xlarge")


@pytest.mark.parametrize(
    "line, gpus",
    [
        ("0, NVIDIA H100 80GB HBM3, 81559, 580.167.08, 00000000:53:00.0", 1),
        ("0, Tesla T4, 15360, 550.90.07, 00000000:00:04.0\n1, Tesla T4, 15360, 550.90.07, 00000000:00:05.0", 2),
        ("No devices were found", 0),
        ("0, NVIDIA A10G, [N/A], 570.172.08, 00000000:00:1E.0", 1),
    ],
)
def test_parse_nvidia_smi_rows(line, gpus):
    parsed, driver = parse_nvidia_smi(line)
    assert len(parsed) == gpus
    if gpus:
        assert driver and parsed[0].index == 0


@pytest.mark.parametrize(
    "text, flavor",
    [
        ("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.167.08  Release Build  (dvs-builder@x)", "open"),
        ("NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.90.07  Fri May 31 09:35:42 UTC 2024", "proprietary"),
        ("", ""),
    ],
)
def test_parse_driver_flavor(text, flavor):
    assert parse_driver_flavor(text) == flavor


@pytest.mark.parametrize(
    "text, state",
    [("SecureBoot enabled", True), ("SecureBoot disabled", False),
     ("This system doesn't support Secure Boot", False), ("", None)],
)
def test_parse_secure_boot(text, state):
    assert parse_secure_boot(text) is state


@pytest.mark.parametrize(
    "bus, short", [("00000000:10:1C.0", "10:1c.0"), ("0000:a0:1d.0", "a0:1d.0"), ("00:04.0", "00:04.0")]
)
def test_short_bus_id(bus, short):
    assert short_bus_id(bus) == short


def test_parse_efa_installer_header():
    assert parse_efa_installer("# EFA installer version: 1.43.2\n# Debug packages installed: no") == "1.43.2"
    assert parse_efa_installer("") == ""


@pytest.mark.parametrize(
    "fixture, toolkits, default_cuda, nccl, packages, fabric_manager, efa",
    [
        ("aws_g5_a10g_dlami.txt", ("12.4.1", "12.5.1", "12.6.20241114", "12.8.1"), "12.8.1",
         ("2.21.5", "2.22.3", "2.23.4", "2.26.2"), (), "570.172.08", "1.42.0"),
        ("aws_p4d_a100_dlami.txt", ("12.8.1", "12.9.1", "13.0.2", "13.2.0"), "13.2.0",
         ("2.27.7", "2.27.7", "2.29.7", "2.29.7"), (), "595.91.07", "1.50.0"),
        ("gcp_g2_l4_dlvm.txt", ("12.8.1",), "12.8.1", (),
         ("libnccl-dev=2.26.2-1+cuda12.8", "libnccl2=2.26.2-1+cuda12.8"), "", ""),
        ("aws_p4d_a100.txt", (), "13.0.2", (), (), "", "1.50.0"),  # facts recorded before these sections existed
    ],
)
def test_parse_facts_reads_what_an_image_already_has(
    fixture, toolkits, default_cuda, nccl, packages, fabric_manager, efa
):
    facts = load(fixture)
    assert facts.cuda_toolkits == toolkits and facts.cuda_version == default_cuda
    assert tuple(nccl_library_version(p) for p in facts.nccl_libraries) == nccl
    assert facts.cuda_packages == packages
    assert (facts.fabric_manager, facts.efa_installer) == (fabric_manager, efa)


def test_existing_driver_is_what_the_driver_decision_weighs():
    dlami = load("aws_g5_a10g_dlami.txt").existing_driver
    assert (dlami.version, dlami.packaging, dlami.flavor, dlami.gpus_visible) == ("570.172.08", "runfile", "open", True)
    assert load("aws_p4d_missing_gpu.txt").existing_driver.gpus_visible is False  # 7 of 8 GPUs listed
    assert load("aws_p5_h100_fresh.txt").existing_driver.version == ""


@pytest.mark.parametrize(
    "text, toolkits",
    [
        ('cuda-12.8       "version" : "12.8.1"\ncuda-12.6 ', ("12.6", "12.8.1")),  # no version.json: the directory
        ('cuda-13.0 "version" : "12.9.1"', ("13.0",)),  # a version.json of another release is not believed
        ("", ()),
    ],
)
def test_parse_cuda_toolkits(text, toolkits):
    assert parse_cuda_toolkits(text) == toolkits
