"""Peak throughput per GPU model, for model FLOPs utilisation (MFU): `infra/catalog/gpus.csv` and a
thin query over it.

    >>> from infra import gpus
    >>> gpus.peak_for_device("NVIDIA H100 80GB HBM3").tflops("bf16")
    989.4
    >>> gpus.peak_for_model("A100").variant
    'SXM4/PCIe'

The data is separate from the instance catalogs (aws.csv, gcp.csv): those say which GPU a machine has,
this file says what that GPU can do. Every figure is dense (no 2:4 sparsity) and the row says its source.
"""

from __future__ import annotations

import csv
import functools
import re
from dataclasses import dataclass
from pathlib import Path

from infra.errors import CatalogError

GPUS_CSV = Path(__file__).resolve().parent / "catalog" / "gpus.csv"
DTYPES = ("bf16", "fp16", "tf32", "fp32")


@dataclass(frozen=True)
class GpuPeak:
    gpu_model: str  # as the instance catalogs name it: "H100", "A100", "T4"
    variant: str  # "SXM", "PCIe", "NVL", ...
    default: bool  # the variant the clouds in our catalog ship
    match: str  # regular expression tried against torch.cuda.get_device_name()
    peaks_tflops: dict[str, float | None]  # dtype -> dense TFLOPS, None where the GPU lacks it
    source: str

    def tflops(self, dtype: str) -> float | None:
        if dtype not in DTYPES:
            raise CatalogError(f"unknown dtype {dtype!r} for GPU peaks; valid: {', '.join(DTYPES)}")
        return self.peaks_tflops[dtype]


def _number(row: dict[str, str], column: str) -> float | None:
    text = row[column].strip()
    if not text:
        return None
    try:
        return float(text)
    except ValueError as exc:
        raise CatalogError(f"gpus.csv row {row['gpu_model']} {row['variant']}: {column} {text!r} is not a number") from exc


@functools.cache
def gpu_peaks() -> tuple[GpuPeak, ...]:
    """Every row of gpus.csv, in file order (the order names are matched in)."""
    with open(GPUS_CSV, newline="") as fh:
        lines = [line for line in fh if line.strip() and not line.lstrip().startswith("#")]
    rows = []
    for row in csv.DictReader(lines):
        rows.append(GpuPeak(
            gpu_model=row["gpu_model"], variant=row["variant"], default=row["default"] == "true", match=row["match"],
            peaks_tflops={dtype: _number(row, f"{dtype}_tflops") for dtype in DTYPES}, source=row["source"],
        ))
    return tuple(rows)


def peak_for_device(device_name: str) -> GpuPeak | None:
    """The row for a name as torch.cuda.get_device_name() reports it; None for a GPU not in the file."""
    for row in gpu_peaks():
        if re.search(row.match, device_name):
            return row
    return None


def peak_for_model(gpu_model: str) -> GpuPeak:
    """The default variant of a catalog GPU model ("H100" -> the SXM board)."""
    rows = [r for r in gpu_peaks() if r.gpu_model == gpu_model]
    if not rows:
        models = sorted({r.gpu_model for r in gpu_peaks()})
        raise CatalogError(f"no peak figures for GPU model {gpu_model!r}; known: {', '.join(models)}")
    return next((r for r in rows if r.default), rows[0])
