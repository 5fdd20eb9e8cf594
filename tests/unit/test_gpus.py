"""GPU peaks (infra/catalog/gpus.csv): every GPU the instance catalogs name has one, device names match."""

from __future__ import annotations

import pytest

from infra import catalog, gpus
from infra.errors import CatalogError

# Names as the NVIDIA driver reports them (`nvidia-smi --query-gpu=name`, the same string as
# torch.cuda.get_device_name). Written from the driver's naming, not recorded on these machines, except the
# A100/A10G/L4 ones, which also appear in tests/unit/fixtures/facts/. gpu-check.sh records the real one.
DEVICE_NAMES = [
    ("NVIDIA H100 80GB HBM3", "H100", "SXM", 989.4),
    ("NVIDIA H100 PCIe", "H100", "PCIe", 756.5),
    ("NVIDIA H100 NVL", "H100", "NVL", 835.5),
    ("NVIDIA H200", "H200", "SXM", 989.4),
    ("NVIDIA H200 NVL", "H200", "NVL", 835.5),
    ("NVIDIA A100-SXM4-40GB", "A100", "SXM4/PCIe", 312),
    ("NVIDIA A100-SXM4-80GB", "A100", "SXM4/PCIe", 312),
    ("NVIDIA A100 80GB PCIe", "A100", "SXM4/PCIe", 312),
    ("NVIDIA A10G", "A10G", "AWS", 70),
    ("NVIDIA L4", "L4", "PCIe", 121),
    ("NVIDIA L40S", "L40S", "PCIe", 362.05),
    ("Tesla T4", "T4", "PCIe", None),
    ("Tesla V100-SXM2-16GB", "V100", "SXM2", None),
    ("Tesla V100-PCIE-16GB", "V100", "PCIe", None),
    ("Tesla P100-PCIE-16GB", "P100", "PCIe", None),
    ("Tesla P4", "P4", "PCIe", None),
]


def catalog_gpu_models() -> set[str]:
    models = {r.gpu_model for cloud in catalog.CLOUDS for r in catalog.instance_types(cloud) if r.gpu_model}
    return models | {a.gpu_model for a in catalog.accelerators()}


@pytest.mark.parametrize("model", sorted(catalog_gpu_models()))
def test_every_catalog_gpu_has_a_default_peak_with_a_source(model):
    row = gpus.peak_for_model(model)
    assert row.default and row.source
    assert row.tflops("fp32") > 0
    assert any(row.tflops(d) for d in ("bf16", "fp16")) or model == "P4"


@pytest.mark.parametrize("row", gpus.gpu_peaks(), ids=lambda r: f"{r.gpu_model}-{r.variant}")
def test_rows_are_dense_figures_in_a_sane_order(row):
    values = row.peaks_tflops
    if values["bf16"]:
        assert values["bf16"] == values["fp16"], "bf16 and fp16 tensor peaks are equal on every board with both"
        assert values["bf16"] > values["fp32"]
    if values["tf32"]:
        assert values["tf32"] * 2 == pytest.approx(values["bf16"], rel=0.02) or row.gpu_model == "A10G"
    assert row.source and "nvidia" in row.source.lower() or "baseten" in row.source.lower()


@pytest.mark.parametrize("name, model, variant, bf16", DEVICE_NAMES)
def test_device_names_find_their_board(name, model, variant, bf16):
    row = gpus.peak_for_device(name)
    assert (row.gpu_model, row.variant) == (model, variant)
    assert row.tflops("bf16") == bf16


def test_unknown_device_and_model():
    assert gpus.peak_for_device("NVIDIA RTX PRO 6000 Blackwell") is None
    with pytest.raises(CatalogError, match="no peak figures for GPU model 'B300'; known: A100, A10G"):
        gpus.peak_for_model("B300")
    with pytest.raises(CatalogError, match="unknown dtype 'int8'"):
        gpus.peak_for_model("H100").tflops("int8")
