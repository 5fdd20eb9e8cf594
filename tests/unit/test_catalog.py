"""The instance catalog: well-formed rows, coverage, agreement with EC2's own data (via moto), queries."""

from __future__ import annotations

import re

import boto3
import pytest
from moto import mock_aws

from infra import catalog
from infra.errors import CatalogError

AWS_TYPES = catalog.instance_types("aws")
GCP_TYPES = catalog.instance_types("gcp")
ALL_TYPES = AWS_TYPES + GCP_TYPES
# EC2 reports usable GPU memory (A10G: 22888 MiB); the catalog holds NVIDIA's nominal size (24 GB).
GPU_MEMORY_TOLERANCE = 0.07


@pytest.mark.parametrize("row", ALL_TYPES, ids=lambda r: f"{r.cloud}:{r.name}")
def test_every_row_is_well_formed(row):
    assert row.cloud in catalog.CLOUDS
    assert row.vcpus > 0 and row.ram_gib > 0 and row.price_per_hour > 0
    assert re.fullmatch(r"\d{4}-\d{2}", row.price_date)
    assert row.efa_interfaces >= 0
    if row.accelerator_required:
        assert row.cloud == "gcp" and row.name.startswith("n1-")
        assert (row.gpu_model, row.gpu_count, row.gpu_memory_gib) == ("", 0, 0)
    else:
        assert row.gpu_model and row.gpu_count >= 1 and row.gpu_memory_gib >= 8
    if row.nvswitch:
        assert row.gpu_count >= 8, "NVSwitch (Fabric Manager) only on full HGX boards"
    if row.cloud == "gcp":
        assert row.efa_interfaces == 0


@pytest.mark.parametrize(
    "cloud,prefix",
    [("aws", f) for f in ("g4dn.", "g5.", "g6.", "g6e.", "p4d.", "p4de.", "p5.", "p5e.", "p5en.")]
    + [("gcp", f) for f in ("g2-standard-", "a2-highgpu-", "a2-ultragpu-", "a3-highgpu-", "a3-megagpu-8g", "n1-")],
)
def test_catalog_covers_required_families(cloud, prefix):
    assert any(r.name.startswith(prefix) for r in catalog.instance_types(cloud))


@pytest.mark.parametrize(
    "name,efa,nvswitch",
    [
        ("p4d.24xlarge", 4, True),
        ("p4de.24xlarge", 4, True),
        ("p5.48xlarge", 32, True),
        ("p5e.48xlarge", 32, True),
        ("p5en.48xlarge", 16, True),
        ("p5.4xlarge", 1, False),
        ("g5.48xlarge", 1, False),
        ("g6e.48xlarge", 4, False),
        ("g5.xlarge", 0, False),
    ],
)
def test_efa_and_nvswitch_of_key_aws_types(name, efa, nvswitch):
    row = catalog.find_instance("aws", name)
    assert (row.efa_interfaces, row.nvswitch) == (efa, nvswitch)


@pytest.fixture(scope="module")
def ec2_instance_types():
    """What EC2's DescribeInstanceTypes says about our AWS types, as moto records it."""
    names = [r.name for r in AWS_TYPES]
    with mock_aws():
        ec2 = boto3.client("ec2", region_name="us-east-1")
        known = {}
        for start in range(0, len(names), 100):
            for it in ec2.describe_instance_types(InstanceTypes=names[start : start + 100])["InstanceTypes"]:
                known[it["InstanceType"]] = it
    return known


def test_moto_knows_most_of_our_aws_types(ec2_instance_types):
    # The cross-check below is only worth something if it covers the catalog.
    assert len(ec2_instance_types) >= len(AWS_TYPES) - 2


@pytest.mark.parametrize("row", AWS_TYPES, ids=lambda r: r.name)
def test_aws_row_matches_describe_instance_types(row, ec2_instance_types):
    it = ec2_instance_types.get(row.name)
    if it is None:
        pytest.skip(f"moto does not know {row.name}")
    gpu = it["GpuInfo"]["Gpus"][0]
    assert (gpu["Name"], gpu["Count"]) == (row.gpu_model, row.gpu_count)
    nominal_mib = row.gpu_memory_gib * 1024
    assert abs(gpu["MemoryInfo"]["SizeInMiB"] - nominal_mib) <= GPU_MEMORY_TOLERANCE * nominal_mib
    assert it["VCpuInfo"]["DefaultVCpus"] == row.vcpus
    assert it["MemoryInfo"]["SizeInMiB"] == row.ram_gib * 1024
    efa = it["NetworkInfo"].get("EfaInfo", {}).get("MaximumEfaInterfaces", 0)
    assert efa == row.efa_interfaces


@pytest.mark.parametrize("cloud", catalog.CLOUDS)
def test_every_region_has_zones_named_after_it(cloud):
    regions = catalog.regions(cloud)
    assert len(regions) >= 25  # all public regions, not a handful
    for region in regions:
        zones = catalog.zones(cloud, region)
        assert zones and all(z.startswith(region) for z in zones)


@pytest.mark.parametrize(
    "cloud,region,zone",
    [("aws", "us-east-1", "us-east-1a"), ("aws", "eu-west-1", "eu-west-1c"), ("gcp", "us-central1", "us-central1-f")],
)
def test_known_zones_are_present(cloud, region, zone):
    assert zone in catalog.zones(cloud, region)


@pytest.mark.parametrize(
    "call,fragment",
    [
        (lambda: catalog.find_instance("aws", "p4d.24xlage"), "did you mean p4d.24xlarge"),
        (lambda: catalog.find_instance("gcp", "a2-highgpu-8"), "did you mean a2-highgpu-8g"),
        (lambda: catalog.find_accelerator("nvidia-t4"), "valid choices: nvidia-tesla-t4"),
        (lambda: catalog.zones("aws", "us-east-9"), "unknown aws region 'us-east-9'"),
        (lambda: catalog.regions("azure"), "no cloud 'azure'"),
        (lambda: catalog.parse_accelerator("nvidia-tesla-v100:3"), "counts 1, 2, 4, 8, not 3"),
        (lambda: catalog.parse_accelerator("nvidia-tesla-t4:x"), "is not a number"),
    ],
)
def test_lookup_errors_name_value_and_choices(call, fragment):
    with pytest.raises(CatalogError, match=re.escape(fragment)):
        call()


def test_close_matches_lead_the_valid_choices():
    with pytest.raises(CatalogError) as err:
        catalog.find_instance("aws", "g5.48xlarg")
    choices = str(err.value).split("valid choices: ")[1].split(", ")
    assert choices[0] == "g5.48xlarge"
    assert sorted(choices) == sorted(r.name for r in AWS_TYPES)


@pytest.mark.parametrize(
    "cloud,name,accelerator,expected",
    [
        ("aws", "p4de.24xlarge", None, ("A100", 8, 80)),
        ("aws", "g6e.xlarge", None, ("L40S", 1, 48)),
        ("gcp", "a3-highgpu-8g", None, ("H100", 8, 80)),
        ("gcp", "n1-standard-8", "nvidia-tesla-t4:2", ("T4", 2, 16)),
        ("gcp", "n1-standard-8", "nvidia-tesla-v100", ("V100", 1, 16)),
    ],
)
def test_gpus_of(cloud, name, accelerator, expected):
    assert catalog.gpus_of(cloud, name, accelerator) == expected


def test_hourly_cost_scales_with_nodes_adds_accelerators_and_discounts_spot():
    one = catalog.find_instance("aws", "p5.48xlarge").price_per_hour
    assert catalog.hourly_cost("aws", "p5.48xlarge", nodes=3) == pytest.approx(3 * one, abs=1e-3)
    assert catalog.hourly_cost("aws", "p5.48xlarge", nodes=3, spot=True) == pytest.approx(
        3 * one * catalog.SPOT_PRICE_FRACTION, abs=1e-3
    )
    vm = catalog.find_instance("gcp", "n1-standard-8").price_per_hour
    t4 = catalog.find_accelerator("nvidia-tesla-t4").price_per_hour
    assert catalog.hourly_cost("gcp", "n1-standard-8", 2, "nvidia-tesla-t4:4") == pytest.approx(2 * (vm + 4 * t4))


def test_accelerator_vcpu_limits_follow_counts():
    for acc in catalog.accelerators():
        assert list(acc.counts) == sorted(acc.counts)
        limits = [catalog.max_vcpus_for(acc.name, c) for c in acc.counts]
        assert limits == sorted(limits) and limits[-1] <= 96
