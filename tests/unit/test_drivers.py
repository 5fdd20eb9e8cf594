"""What setup does with a node's existing NVIDIA driver (provision/drivers.py): install, keep (and which torch
build follows), or refuse with what to do."""

from __future__ import annotations

import pytest

from provision.drivers import INSTALL, KEEP, choose_driver
from provision.errors import MatrixError
from provision.versions import NodeDriver, version_set

VS = version_set("ubuntu-22.04")


@pytest.mark.parametrize(
    "model, node, action, driver, build",
    [
        ("A100", NodeDriver(), INSTALL, "580.167.08", "cu130"),  # fresh VM
        ("V100", NodeDriver(), INSTALL, "580.167.08", "cu126"),  # CUDA 13 dropped Volta
        ("A100", NodeDriver("580.167.08", "apt", "open"), KEEP, "580.167.08", "cu130"),  # ours, or a baked image
        # apt switches the modules of its own driver
        ("A100", NodeDriver("580.167.08", "apt", "proprietary"), INSTALL, "580.167.08", "cu130"),
        ("A100", NodeDriver("580.167.08", "runfile", "open"), KEEP, "580.167.08", "cu130"),
        ("L4", NodeDriver("550.90.07", "apt", "proprietary"), INSTALL, "580.167.08", "cu130"),  # older apt: upgraded
        ("A100", NodeDriver("580.173.02", "apt", "open"), KEEP, "580.173.02", "cu130"),  # newer apt: kept
        ("H100", NodeDriver("590.48.01", "apt", "open"), KEEP, "590.48.01", "cu130"),
        ("A10G", NodeDriver("570.172.08", "runfile", "open"), KEEP, "570.172.08", "cu126"),  # DLAMI R570
        ("A10G", NodeDriver("580.95.05", "runfile", "open"), KEEP, "580.95.05", "cu130"),  # DLAMI R580
        ("H100", NodeDriver("595.91.07", "runfile", "open"), KEEP, "595.91.07", "cu130"),  # DLAMI R595
        ("L4", NodeDriver("570.133.20", "runfile", "proprietary"), KEEP, "570.133.20", "cu126"),  # GCP DLVM R570
        ("V100", NodeDriver("535.261.03", "", "proprietary"), KEEP, "535.261.03", "cu126"),  # unknown origin
    ],
)
def test_driver_decisions(model, node, action, driver, build):
    choice = choose_driver(VS, model, node)
    got = (choice.action, choice.versions.driver_version, choice.versions.torch_cuda_tag(model))
    assert got == (action, driver, build)
    assert choice.versions.fabric_manager == driver  # Fabric Manager always follows the driver that runs
    if choice.keeps and node.version != VS.driver_version:
        assert "already in place on this node" in choice.note and node.version in choice.note


def test_kept_r570_gets_the_cuda_12_6_stack_and_says_why():
    choice = choose_driver(VS, "NVIDIA A10G", NodeDriver("570.172.08", "runfile", "open"))
    assert (choice.versions.cuda, choice.versions.cuda_toolkit, choice.versions.nccl) == ("12.6", "12.6.3", "2.23.4")
    assert choice.note == (
        "already in place on this node: driver 570.172.08 (NVIDIA .run installer, open kernel modules) is too old "
        "for torch 2.13.0+cu130 (CUDA 13.0 needs driver >= 580.65.06) and apt cannot replace it, so this node gets "
        "torch 2.13.0+cu126 (CUDA 12.6 needs driver >= 525.60.13) and the CUDA 12.6 stack"
    )


@pytest.mark.parametrize(
    "model, node, message",
    [
        ("T4", NodeDriver("470.256.02", "runfile", "proprietary"),
         r"driver 470\.256\.02 \(NVIDIA \.run installer, proprietary kernel modules\) is too old for torch "
         r"2\.13\.0\+cu130 \(CUDA 13\.0 needs driver >= 580\.65\.06\) or torch 2\.13\.0\+cu126 \(CUDA 12\.6 needs "
         r"driver >= 525\.60\.13\).*sudo /usr/bin/nvidia-uninstall --silent"),
        # Regression (issue 8, defect 5): B200 was claimed, but its Fabric Manager needs nvlsm and ib_umad.
        ("NVIDIA B200", NodeDriver(), r"B200 is not supported: .*NVLink subnet manager \(nvlsm\) and ib_umad"),
        ("A100", NodeDriver("515.65.01", "", "open"), r"515\.65\.01 \(not from apt.*Remove it, or start the node"),
        ("A100", NodeDriver("580.95.05", "runfile", "open", gpus_visible=False), r"does not list every GPU"),
        ("H100", NodeDriver("590.48.01", "apt", "open", gpus_visible=False), r"newer branch than the tested R580"),
    ],
)
def test_drivers_that_can_be_neither_kept_nor_replaced_are_refused(model, node, message):
    with pytest.raises(MatrixError, match=message):
        choose_driver(VS, model, node)
