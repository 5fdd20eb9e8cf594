"""The GPU instance catalog: one CSV row per instance/machine type, and thin queries over it.

Data lives next to this module in `infra/catalog/*.csv` (each file says where its numbers come from):

    aws.csv               AWS instance types (g4dn, g5, g6, g6e, p4d, p4de, p5, p5e, p5en)
    gcp.csv               GCP machine types (g2, a2, a3 with built-in GPUs; n1 that take accelerators)
    gcp_accelerators.csv  GCP guest accelerators for n1 (T4, V100, P100, P4)
    regions.csv           public regions and zones of both clouds

    >>> from infra import catalog
    >>> catalog.gpus_of("aws", "p4d.24xlarge")
    ('A100', 8, 40)
    >>> catalog.hourly_cost("gcp", "n1-standard-8", nodes=2, accelerator="nvidia-tesla-t4:1")
    1.46

Every lookup of a name that is not there raises `CatalogError` naming the value and the valid choices,
closest matches first.
"""

from __future__ import annotations

import csv
import difflib
import functools
import logging
from dataclasses import dataclass
from pathlib import Path

from infra.errors import CatalogError

logger = logging.getLogger(__name__)

CATALOG_DIR = Path(__file__).resolve().parent / "catalog"
CLOUDS = ("aws", "gcp")
# Spot prices move by zone and hour; across the 2025 AWS and GCP spot data for these GPU types the spot
# rate was mostly 30-50% of on-demand. 0.4 is a planning estimate, not a quote.
SPOT_PRICE_FRACTION = 0.4
SOLD_AS = ("on-demand", "spot")
CLOSE_MATCHES = 3  # how many "did you mean" suggestions lead an error message


@dataclass(frozen=True)
class InstanceType:
    cloud: str  # "aws" | "gcp"
    name: str  # "p4d.24xlarge", "a2-highgpu-8g", "n1-standard-8"
    gpu_model: str  # "A100", "H100", "A10G", "L4", "T4", ... ("" for GCP n1: GPUs come from an accelerator)
    gpu_count: int
    gpu_memory_gib: int  # per GPU
    vcpus: int
    ram_gib: float
    efa_interfaces: int  # 0 when no EFA
    nvswitch: bool  # HGX board with NVSwitch -> needs Fabric Manager
    price_per_hour: float  # reference on-demand $/h (us-east-1 / us-central1)
    price_date: str  # month the price was read; the CSV header says from where
    accelerator_required: bool = False  # GCP n1: needs gpuforge:accelerator
    compact_placement: bool = True  # takes a compact placement policy / cluster placement group (GCP n1: no)
    gvnic: bool = False  # GCP: the series requires nicType GVNIC (A3)
    sold_as: str = "on-demand"  # "on-demand", or "spot" where the type is sold only as Spot/Flex-start VMs
    gpu_quota: str = ""  # GCP regional GPU quota metric (n1: from the accelerator)


@dataclass(frozen=True)
class Accelerator:  # GCP guest accelerators for n1
    name: str  # "nvidia-tesla-t4"
    gpu_model: str  # "T4"
    gpu_memory_gib: int
    counts: tuple[int, ...]  # allowed counts (1,2,4 / 1,2,4,8)
    price_per_hour: float  # per GPU
    price_date: str
    gpu_quota: str = ""  # GCP regional GPU quota metric, e.g. NVIDIA_T4_GPUS


def _read_rows(filename: str) -> list[dict[str, str]]:
    """CSV rows as dicts; lines starting with '#' are comments."""
    with open(CATALOG_DIR / filename, newline="") as fh:
        lines = [line for line in fh if not line.lstrip().startswith("#") and line.strip()]
    return list(csv.DictReader(lines))


def _parse_bool(value: str, where: str) -> bool:
    if value not in ("true", "false"):
        raise CatalogError(f"{where}: expected true or false, got {value!r}")
    return value == "true"


def _parse_sold_as(value: str, where: str) -> str:
    if value not in SOLD_AS:
        raise CatalogError(f"{where}: sold_as must be one of {', '.join(SOLD_AS)}, got {value!r}")
    return value


def _parse_instance(cloud: str, row: dict[str, str]) -> InstanceType:
    where = f"{cloud}.csv row {row.get('name')!r}"
    try:
        return InstanceType(
            cloud=cloud,
            name=row["name"],
            gpu_model=row["gpu_model"],
            gpu_count=int(row["gpu_count"]),
            gpu_memory_gib=int(row["gpu_memory_gib"]),
            vcpus=int(row["vcpus"]),
            ram_gib=float(row["ram_gib"]),
            efa_interfaces=int(row["efa_interfaces"]),
            nvswitch=_parse_bool(row["nvswitch"], where),
            price_per_hour=float(row["price_per_hour"]),
            price_date=row["price_date"],
            accelerator_required=_parse_bool(row["accelerator_required"], where),
            compact_placement=_parse_bool(row.get("compact_placement") or "true", where),
            gvnic=_parse_bool(row.get("gvnic") or "false", where),
            sold_as=_parse_sold_as(row.get("sold_as") or "on-demand", where),
            gpu_quota=row.get("gpu_quota") or "",
        )
    except (KeyError, ValueError) as exc:
        raise CatalogError(f"{where} is malformed: {exc}") from exc


@functools.cache
def _instances(cloud: str) -> dict[str, InstanceType]:
    _check_cloud(cloud)
    rows = [_parse_instance(cloud, row) for row in _read_rows(f"{cloud}.csv")]
    return {row.name: row for row in rows}


@functools.cache
def _accelerators() -> dict[str, tuple[Accelerator, tuple[int, ...]]]:
    """name -> (accelerator, max vCPUs for each allowed count)."""
    out = {}
    for row in _read_rows("gcp_accelerators.csv"):
        counts = tuple(int(c) for c in row["counts"].split("|"))
        max_vcpus = tuple(int(c) for c in row["max_vcpus"].split("|"))
        if len(counts) != len(max_vcpus):
            raise CatalogError(f"gcp_accelerators.csv row {row['name']!r}: counts and max_vcpus differ in length")
        acc = Accelerator(
            name=row["name"],
            gpu_model=row["gpu_model"],
            gpu_memory_gib=int(row["gpu_memory_gib"]),
            counts=counts,
            price_per_hour=float(row["price_per_hour"]),
            price_date=row["price_date"],
            gpu_quota=row.get("gpu_quota") or "",
        )
        out[acc.name] = (acc, max_vcpus)
    return out


@functools.cache
def _regions() -> dict[str, dict[str, tuple[str, ...]]]:
    """cloud -> region -> zones, in file order."""
    out: dict[str, dict[str, list[str]]] = {cloud: {} for cloud in CLOUDS}
    for row in _read_rows("regions.csv"):
        out[row["cloud"]].setdefault(row["region"], []).append(row["zone"])
    return {cloud: {r: tuple(z) for r, z in regions.items()} for cloud, regions in out.items()}


def choices_message(value: str, choices: list[str] | tuple[str, ...]) -> str:
    """'did you mean a, b?; valid choices: ...' with the closest matches first."""
    close = difflib.get_close_matches(value, choices, n=CLOSE_MATCHES, cutoff=0.5)
    rest = [c for c in choices if c not in close]
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    return f"{hint}valid choices: {', '.join(close + rest)}"


def _check_cloud(cloud: str) -> None:
    if cloud not in CLOUDS:
        raise CatalogError(f"the catalog has no cloud {cloud!r}; {choices_message(cloud, CLOUDS)}")


def instance_types(cloud: str) -> list[InstanceType]:
    """Every catalog row of one cloud, in file order."""
    return list(_instances(cloud).values())


def find_instance(cloud: str, name: str) -> InstanceType:
    table = _instances(cloud)
    if name not in table:
        raise CatalogError(f"unknown {cloud} instance type {name!r}; {choices_message(name, list(table))}")
    return table[name]


def accelerators() -> list[Accelerator]:
    """Every GCP guest accelerator, in file order."""
    return [acc for acc, _ in _accelerators().values()]


def find_accelerator(name: str) -> Accelerator:
    table = _accelerators()
    if name not in table:
        raise CatalogError(f"unknown GCP accelerator {name!r}; {choices_message(name, list(table))}")
    return table[name][0]


def max_vcpus_for(accelerator: str, count: int) -> int:
    """The largest n1 vCPU count GCP allows with `count` GPUs of this accelerator."""
    acc = find_accelerator(accelerator)
    if count not in acc.counts:
        allowed = ", ".join(str(c) for c in acc.counts)
        raise CatalogError(f"{accelerator} cannot be attached {count} at a time; valid counts: {allowed}")
    return _accelerators()[accelerator][1][acc.counts.index(count)]


def parse_accelerator(value: str) -> tuple[Accelerator, int]:
    """'nvidia-tesla-t4:2' -> (T4 accelerator, 2); a bare name means one GPU."""
    name, _, count_text = value.partition(":")
    acc = find_accelerator(name.strip())
    try:
        count = int(count_text) if count_text.strip() else 1
    except ValueError as exc:
        raise CatalogError(f"accelerator {value!r}: count {count_text!r} is not a number; use NAME:COUNT") from exc
    if count not in acc.counts:
        allowed = ", ".join(str(c) for c in acc.counts)
        raise CatalogError(f"accelerator {value!r}: {acc.name} comes in counts {allowed}, not {count}")
    return acc, count


def regions(cloud: str) -> list[str]:
    _check_cloud(cloud)
    return list(_regions()[cloud])


def zones(cloud: str, region: str) -> list[str]:
    _check_cloud(cloud)
    table = _regions()[cloud]
    if region not in table:
        raise CatalogError(f"unknown {cloud} region {region!r}; {choices_message(region, list(table))}")
    return list(table[region])


def gpus_of(cloud: str, instance_type: str, accelerator: str | None = None) -> tuple[str, int, int]:
    """(GPU model, GPUs per node, GiB per GPU); n1 machine types take theirs from the accelerator."""
    inst = find_instance(cloud, instance_type)
    if accelerator:
        acc, count = parse_accelerator(accelerator)
        return acc.gpu_model, count, acc.gpu_memory_gib
    return inst.gpu_model, inst.gpu_count, inst.gpu_memory_gib


def hourly_cost(
    cloud: str, instance_type: str, nodes: int, accelerator: str | None = None, spot: bool = False
) -> float:
    """Estimated $/h for `nodes` nodes at the catalog's reference prices (spot: a planning fraction)."""
    if nodes < 0:
        raise CatalogError(f"nodes must be >= 0, got {nodes}")
    per_node = find_instance(cloud, instance_type).price_per_hour
    if accelerator:
        acc, count = parse_accelerator(accelerator)
        per_node += acc.price_per_hour * count
    total = per_node * nodes * (SPOT_PRICE_FRACTION if spot else 1.0)
    return round(total, 4)
