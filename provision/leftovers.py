"""`fab sweep`: what carries our tags in a region (or the stack of a cluster recorded), whoever made it, and with
`--purge` (after a confirmation `--yes` skips) deletes it. Buckets holding data are the user's: deleted only with
`--delete-data`, and named with their size before that. Baked images are never swept.

    fab sweep --cloud aws [--region us-east-1] [--cluster NAME] [--purge] [--delete-data] [--yes]
    fab sweep --cloud gcp --project P [--region us-central1] [--cluster NAME] [--purge]

It talks to the real clouds, or to emulators: boto3 honours AWS_ENDPOINT_URL; for GCP, GPUFORGE_GCP_ENDPOINT points
the Compute and IAM clients at a local endpoint (and STORAGE_EMULATOR_HOST the GCS client).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from provision import data, inventory, registry
from provision.cloud_clusters import ask, console, find_leftovers, purge, split_data
from provision.errors import ProvisionError

DEFAULT_REGIONS = {"aws": "us-east-1", "gcp": "us-central1"}


def sweep(home: Path, cloud: str, region: str = "", project: str = "", cluster: str | None = None,
          purge_them: bool = False, delete_data: bool = False, yes: bool = False) -> list[Any]:
    """List (and with purge_them, delete) our resources; returns what is left of ours afterwards."""
    from infra.sweep import render_leftovers

    if cloud not in DEFAULT_REGIONS:
        raise ProvisionError(f"--cloud must be aws or gcp, got {cloud!r}")
    if cloud == "gcp" and not project:
        raise ProvisionError("--project is required with --cloud gcp (the project to sweep)")
    if delete_data and not purge_them:
        raise ProvisionError("--delete-data goes with --purge")
    region = region or DEFAULT_REGIONS[cloud]
    from infra import catalog
    from infra.stacks import require_cloud_packages

    require_cloud_packages(cloud, programs=False)

    catalog.zones(cloud, region)  # an unknown region: one line with the choices, before any call
    out = console()
    keys = recorded_keys(home, cluster) if cluster else frozenset()
    found = find_leftovers(cloud, cluster, region, project, keys)
    who = f"cluster {cluster}" if cluster else "any gpuforge cluster"
    if not found:
        out.print(f"nothing of {who} in {cloud} {project + '/' if project else ''}{region}")
        return []
    known = set(inventory.known_clusters(home)) | set(registry.registered_names(home))
    out.print(render_leftovers(found, title=f"{len(found)} resource(s) of {who} in {region}"))
    strangers = sorted({lo.owner for lo in found if lo.owner and lo.owner not in known})
    if strangers:
        out.print(f"clusters this controller does not know: {', '.join(strangers)} (another controller's, a crashed "
                  "bake's, or from before this GPUFORGE_HOME)")
    held, rest = split_data(found)
    if not purge_them:
        out.print(f"`gpuforge sweep --cloud {cloud} ... --purge` deletes them"
                  + (f" (buckets holding data only with --delete-data: {data.summary(kept(held, project))})"
                     if held else ""))
        return found
    owners = sorted({lo.owner or "recorded by a stack" for lo in rest})
    if rest:
        ask(out, f"delete these {len(rest)} resource(s) of {', '.join(owners)}?", yes)
    failures = purge(rest, project, out)
    if held and delete_data:
        items = kept(held, project)
        data.confirm_deletion(out, items, yes)
        failures += purge(held, project, out)
    elif held:
        out.print(f"kept {len(held)} bucket(s) holding data: {data.summary(kept(held, project))}; "
                  "add --delete-data to delete them")
    if failures:
        raise ProvisionError("could not delete: " + "; ".join(f"{lo.kind} {lo.id}: {err}" for lo, err in failures))
    return find_leftovers(cloud, cluster, region, project, keys)


def kept(held: list[Any], project: str) -> list[registry.KeptData]:
    return [data.kept_from_leftover(lo, project) for lo in held]


def recorded_keys(home: Path, cluster: str) -> frozenset[str]:
    """What the stack of `cluster` (if this controller has it) records, claimed whatever it carries."""
    from infra.errors import PulumiCliMissingError
    from infra.stacks import recorded_resources

    state = inventory.cluster_dir(home, cluster)
    if not state.exists():
        return frozenset()
    try:
        return frozenset(k for r in recorded_resources(cluster, state) for k in r.keys())
    except PulumiCliMissingError:  # the sweep works by tags without the CLI
        return frozenset()
