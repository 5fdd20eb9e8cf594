"""`fab up` and `fab down` of AWS and GCP clusters: registration, preflight, zone failover, the recorded image, and the
data policy.

    up_cloud(home, "aws", "demo", {"instance_type": "p4d.24xlarge", "nodes": 2}, yes=True)
    down_cloud(home, "demo", delete_data=False, yes=False)

`up`: the spec is validated first (bad input: one line, nothing called or written). A later `up` of the same
cluster starts from its stack's config (what was not given again stays), keeps its zone and its recorded image.
Then the cluster is registered (`creating`) before the first cloud call; the read-only preflight picks the zones
that offer the type and checks quotas; the first `up` records its image in the stack (`gpuforge:image`); each
offered zone is tried in turn while the failure is for want of capacity (saying so); a quota error stops with the
quota's name and how to raise it. Rolling to a newer image (`--roll-image`, or `--image` that differs) is previewed
and confirmed first.

`down` works from any state (creating, failed, ready, or only data left): what the stack recorded is destroyed (the
data bucket is retained), then everything else carrying this cluster's tag and id is deleted; a same-named
cluster's resources (another id) are listed and left alone. Data: kept and reported, or with `--delete-data`
deleted after a confirmation naming it.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

from infra.errors import CapacityError, QuotaError, StackError
from infra.power import with_addresses
from provision import data, inventory, registry
from provision.errors import InventoryError, ProvisionError

logger = logging.getLogger(__name__)

FIELDS = ("nodes", "instance_type", "accelerator", "region", "zone", "spot", "disk_gb", "os", "ssh_cidrs", "project",
          "image", "autostop", "autodown")


def console() -> Any:
    from rich.console import Console

    return Console(highlight=False)


def ask(out: Any, question: str, yes: bool) -> None:
    if yes:
        return
    try:
        answer = out.input(f"{question} \\[y/N] ")
    except EOFError:
        answer = ""
    if not answer.strip().lower().startswith("y"):
        raise ProvisionError("cancelled; nothing was changed")


# -- up ------------------------------------------------------------------------------------------

def up_cloud(home: Path, cloud: str, name: str, given: dict[str, Any], yes: bool = False,
             roll_image: bool = False, may_move: bool = False) -> Any:
    """Create or update a cloud cluster (see the module docstring); returns its ClusterInfo. `may_move`
    (recovery's bring-up): when the cluster's zone has no capacity for it, the whole cluster moves to the next zone
    that offers the type (see up_in_zones)."""
    from infra.spec import ClusterSpec
    from infra.stacks import engine_for, require_cloud_packages, stack_config

    require_cloud_packages(cloud)  # a plain `pip install gpuforge`: one line naming the extra, before anything
    name = name or f"{cloud}-gpu"
    state = inventory.cluster_dir(home, name)
    known = registry.load(home, name)
    if known and known.cloud != cloud:
        raise ProvisionError(f"cluster {name} is a {known.cloud} cluster; `gpuforge down --cluster {name}` first")
    if inventory.known_clusters(home).count(name) and not known and not stack_exists(name, state):
        raise ProvisionError(f"a {cluster_cloud(home, name)} cluster named {name} exists; pick another --name")
    existing = stack_config(name, state) if state.exists() else {}
    values = spec_values(existing, cloud, name, given)
    spec = ClusterSpec(**values)  # SpecError names the bad value and the choices
    engine_for(state).check()  # no pulumi CLI: one line with how to install it, before anything is written
    if existing.get("gpuforge:zone") and given.get("zone") and given["zone"] != existing["gpuforge:zone"]:
        raise ProvisionError(f"cluster {name} runs in {existing['gpuforge:zone']}; another zone would replace every "
                             "node: `gpuforge down` it and `gpuforge up --zone ...` again")
    out = console()
    fresh = known is None and not existing
    cluster_id = spec.cluster_id or (known.cluster_id if known else "") or registry.new_cluster_id()
    registration = registry.save(home, known or registry.Registration(
        name=name, cloud=cloud, state=registry.CREATING, cluster_id=cluster_id, region=spec.region,
        project=spec.project))
    try:
        info = _up(home, spec, state, existing, given, registration, yes, roll_image, out, may_move)
    except BaseException as exc:
        if fresh and not stack_exists(name, state):  # nothing was created: leave no trace
            registry.forget(home, name)
            shutil.rmtree(state / "keys", ignore_errors=True)
            if state.exists() and not any(state.iterdir()):
                state.rmdir()
            raise
        after = registry.READY if registration.state == registry.READY else registry.FAILED
        registry.save(home, registration.with_state(after, error=str(exc)[:500]))
        hint = f"`gpuforge down --cluster {name}` removes what this `up` created"
        if isinstance(exc, KeyboardInterrupt):
            out.print(f"interrupted; {hint}")
            raise
        if after == registry.FAILED and isinstance(exc, Exception):
            raise ProvisionError(f"{exc}\n{hint}") from exc
        raise
    return info


def _up(home: Path, spec: Any, state: Path, existing: dict[str, str], given: dict[str, Any],
        registration: registry.Registration, yes: bool, roll_image: bool, out: Any, may_move: bool = False) -> Any:
    from infra.preflight import preflight
    from infra.stacks import stack_outputs, up_stack
    from provision.clusters import ensure_cluster_key

    public, private = ensure_cluster_key(home, spec.name)
    spec = spec.model_copy(update={"ssh_public_key": public, "ssh_key_path": private,
                                   "cluster_id": registration.cluster_id})
    spec.check_deployable()
    existing_nodes = len(stack_outputs(spec.name, state).get("cluster", {}).get("nodes", [])) if existing else 0
    pinned = bool(given.get("zone") or existing.get("gpuforge:zone")) and not may_move
    plan = cloud_call("the preflight checks", lambda: preflight(spec, zone_given=pinned, existing_nodes=existing_nodes))
    zones = [spec.zone] + [z for z in plan.zones if z != spec.zone] if may_move and spec.zone in plan.zones \
        else plan.zones
    image = cloud_call("choosing the image", lambda: choose_image(spec, existing, given, roll_image, out))
    spec = spec.model_copy(update={"image": image.id})
    if existing.get("gpuforge:image") and image.id != existing["gpuforge:image"]:
        preview_roll(spec, state, existing["gpuforge:image"], out, yes)
    if existing_nodes and spec.cloud == "gcp":
        note_scope_change(spec, existing, out)
    out.print(f"{spec.nodes} x {spec.instance_type} ({spec.gpu_count} x {spec.gpu_model or 'GPU'}) in "
              f"{zones[0]}{' (spot)' if spec.spot else ''}: about [bold]${spec.cost_per_hour:,.2f}/h[/] "
              f"(catalog reference price); image {image.describe()}")
    for note in plan.notes:
        out.print(f"  {note}")
    if not spec.ssh_cidrs:
        out.print("[yellow]no --ssh-cidr given: the nodes get no public SSH ingress[/]")
    for kept in registry.kept_data(home, spec.name):
        out.print(f"an earlier cluster {spec.name}'s data is still kept: {kept.describe()}")
    ask(out, "create it?" if not existing else "apply it?", yes)
    started = start_stopped_nodes(spec.name, state, out) if existing_nodes else {}
    info = with_addresses(up_in_zones(spec, zones, state, out, first_up=not existing_nodes, may_move=may_move),
                          started)
    registry.save(home, registration.with_state(registry.READY, zone=info.extra.get("zone", ""),
                                                region=info.region))
    return inventory.register(home, info)


def start_stopped_nodes(name: str, state: Path, out: Any) -> dict[str, str]:
    """A later `up` of a cluster whose nodes autostop stopped: start them (same disks); their new public addresses."""
    from infra.power import start_stopped
    from infra.stacks import cluster_from_outputs, stack_outputs

    started = cloud_call("starting the stopped nodes", lambda: start_stopped(
        cluster_from_outputs(stack_outputs(name, state))))
    if started:
        out.print(f"started {len(started)} stopped node(s): {', '.join(started)} (same disks, same data)")
    return started


def cloud_call(what: str, call: Any) -> Any:
    """A read-only cloud call; an SDK error (credentials, endpoint, permissions) becomes one PreflightError line."""
    from infra.errors import PreflightError

    try:
        return call()
    except Exception as exc:
        module = type(exc).__module__
        if module.startswith(("botocore", "boto3", "google.")):
            raise PreflightError(f"{what} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}") from exc
        raise


def spec_values(existing: dict[str, str], cloud: str, name: str, given: dict[str, Any]) -> dict[str, Any]:
    """The spec: the stack's config (a later `up` keeps what was not given again), with what was given on top."""
    from infra.spec import ClusterSpec

    values: dict[str, Any] = {}
    if existing:
        base = ClusterSpec.from_stack_config(existing, cloud_default=cloud, name=name)
        values = base.model_dump(exclude={"ssh_public_key", "ssh_key_path"})
    values.update({k: v for k, v in given.items() if k in FIELDS and v not in (None, "", 0, [], ())})
    values.update(cloud=cloud, name=name)
    return values


def choose_image(spec: Any, existing: dict[str, str], given: dict[str, Any], roll_image: bool, out: Any) -> Any:
    """The image given, else the stack's recorded one, else (first up, or a roll) the newest usable one."""
    from images import lookup

    pinned = existing.get("gpuforge:image", "")
    wanted = given.get("image") or ("" if roll_image else pinned)
    if spec.cloud == "aws":
        import boto3

        session = boto3.Session(region_name=spec.region)
        ec2, ssm = session.client("ec2"), session.client("ssm")
        try:
            return lookup.describe_aws_image(ec2, wanted) if wanted else lookup.find_aws_image(
                ec2, ssm, spec.os, spec.gpu_model)
        except LookupError as exc:
            raise ProvisionError(str(exc)) from exc
    from google.cloud import compute_v1

    from infra.gcp_api import compute_kwargs

    images = compute_v1.ImagesClient(**compute_kwargs())
    try:
        return lookup.describe_gcp_image(images, wanted) if wanted else lookup.find_gcp_image(
            images, spec.project, spec.os, spec.gpu_model)
    except LookupError as exc:
        raise ProvisionError(str(exc)) from exc


def note_scope_change(spec: Any, existing: dict[str, str], out: Any) -> None:
    """Turning GCP autodown on or off changes the nodes' scopes (the Compute scope they delete themselves with), which
    GCE changes only on a stopped VM: the provider stops and starts each node (allow_stopping_for_update)."""
    from infra.autostop import DEFAULT_S, gcp_self_delete, parse_autostop

    was = gcp_self_delete(existing.get("gpuforge:autodown") == "true",
                          parse_autostop(existing.get("gpuforge:autostop") or f"{DEFAULT_S}s"))
    if was != gcp_self_delete(spec.autodown, spec.autostop):
        out.print(f"[yellow]autodown {'on' if not was else 'off'} changes the nodes' access scopes, which GCE changes "
                  "only on a stopped VM: each node is stopped and started again (same disks; a run on it ends); "
                  "`gpuforge setup` then gives the watchers the new setting[/]")


def preview_roll(spec: Any, state: Path, pinned: str, out: Any, yes: bool) -> None:
    from infra.stacks import preview_stack

    plan = preview_stack(spec, state, on_output=lambda line: None)
    replaced = plan.of("replace", "Instance")
    out.print(f"rolling the image from {pinned} to {spec.image} replaces {len(replaced)} node(s): "
              f"{', '.join(replaced) or 'none'} (their disks go with them; the bucket stays)")
    ask(out, "roll the image?", yes)


def up_in_zones(spec: Any, zones: list[str], state: Path, out: Any, first_up: bool, may_move: bool = False) -> Any:
    """`pulumi up` in the first zone; on a capacity error the next offered one (a first up, or recovery's
    `may_move`: else an existing cluster's nodes stay where they are); a quota error names the quota and how to
    raise it.

    A cluster that moves, moves whole: its placement group (AWS) or compact placement policy (GCP) and its subnet
    (AWS: one per zone) hold nodes of one zone only, and nodes of two zones would train across zones (no EFA, no
    compact placement, cross-zone traffic billed). So every node is replaced in the new zone (new group, new subnet,
    created before the old ones go); their disks go with them, the bucket (regional) stays, and a resumed run goes
    on from its checkpoint there."""
    from infra.capacity import aws_quota_hint, classify, gcp_quota_hint
    from infra.stacks import up_stack

    tried = []
    for zone in zones:
        attempt = spec.model_copy(update={"zone": zone})
        try:
            return up_stack(attempt, state, on_output=lambda line: out.print(line, end="", markup=False))
        except StackError as exc:
            failure = classify(spec.cloud, str(exc), spec.instance_type, spec.spot)
            if failure.kind == "quota":
                hint = aws_quota_hint(failure.quota, failure.quota_name, spec.region) if spec.cloud == "aws" else \
                    gcp_quota_hint(failure.quota, spec.region, spec.project)
                raise QuotaError(f"the cloud refused for a quota, not for capacity: {hint}") from exc
            if failure.kind != "capacity" or not (first_up or may_move):
                raise
            tried.append(zone)
            rest = [z for z in zones if z not in tried]
            out.print(f"[yellow]{zone} has no {spec.instance_type} capacity now"
                      f"{'; trying ' + rest[0] + ' (it offers the type)' if rest else ''}[/]")
            if rest and not first_up:
                out.print(f"[yellow]moving cluster {spec.name} to {rest[0]}: all {spec.nodes} node(s) are replaced "
                          "there (placement and subnet hold one zone; their disks go, the bucket stays)[/]")
    raise CapacityError(f"no capacity for {spec.nodes} x {spec.instance_type} in any zone that offers it "
                        f"({', '.join(tried)}); try later, another region, or --spot")


def stack_exists(name: str, state: Path) -> bool:
    from infra.stacks import engine_for

    return state.exists() and engine_for(state).exists(name)


def cluster_cloud(home: Path, name: str) -> str:
    try:
        return inventory.resolve(home, name).cloud
    except InventoryError:
        return "known"


# -- down ----------------------------------------------------------------------------------------

def down_cloud(home: Path, name: str, cloud: str, region: str, project: str, cluster_id: str,
               delete_data: bool = False, yes: bool = False) -> None:
    """Destroy what the stack recorded, delete what else carries this cluster's tag and id, apply the data policy."""
    from infra.stacks import destroy_stack, recorded_resources

    out = console()
    state = inventory.cluster_dir(home, name)
    recorded = recorded_resources(name, state) if state.exists() else []
    keys = frozenset(k for r in recorded for k in r.keys())
    show = lambda line: out.print(line, end="", markup=False)  # noqa: E731
    if recorded:
        try:
            destroy_stack(name, cloud, state, on_output=show)
        except StackError as exc:
            # something the stack does not know blocks it (an instance a killed `up` made, in the placement group,
            # subnet or security group): delete what carries this cluster's id and is not recorded, then retry
            out.print(f"[yellow]the destroy stopped ({exc}); deleting what it does not know, then again[/]")
            orphans = [lo for lo in find_leftovers(cloud, name, region, project, keys)
                       if not lo.recorded and cluster_id and lo.owner_id == cluster_id and lo.kind != "bucket"]
            failed = purge(orphans, project, out)
            if failed:
                raise ProvisionError(f"{exc}; and could not delete: "
                                     + "; ".join(f"{lo.kind} {lo.id}: {err}" for lo, err in failed)) from exc
            destroy_stack(name, cloud, state, on_output=show)
    found = find_leftovers(cloud, name, region, project, keys)
    mine = [lo for lo in found if lo.recorded or (cluster_id and lo.owner_id == cluster_id)]
    others = [lo for lo in found if lo not in mine]
    held, rest = split_data(mine)
    failures = purge(rest, project, out)
    if others:
        from infra.sweep import render_leftovers

        out.print(render_leftovers(others, title=f"carrying the name {name} but another cluster id: not touched"))
        out.print(f"(another controller's cluster {name}? "
                  f"`gpuforge sweep --cloud {cloud} --cluster {name}` lists them)")
    kept = [data.kept_from_leftover(lo, project) for lo in held]
    finish_data(home, name, kept, delete_data, yes, out)
    if failures:
        raise ProvisionError("could not delete: " + "; ".join(f"{lo.kind} {lo.id}: {err}" for lo, err in failures))
    registry.forget(home, name)
    tidy(home, name)


def tidy(home: Path, name: str) -> None:
    """A cluster that is gone leaves its folder only to remember kept data (kept-data.json); else nothing."""
    folder = inventory.cluster_dir(home, name)
    if not folder.exists():
        return
    if not registry.kept_data(home, name):
        shutil.rmtree(folder, ignore_errors=True)
        return
    for entry in folder.iterdir():
        if entry.name not in ("kept-data.json", "storage"):
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)


def find_leftovers(cloud: str, cluster: str | None, region: str, project: str, keys: frozenset[str]) -> list[Any]:
    from infra.sweep import find_aws_leftovers, find_gcp_leftovers

    if cloud == "aws":
        return find_aws_leftovers(cluster, region, recorded=keys)
    return find_gcp_leftovers(cluster, project, region, recorded=keys)


def split_data(leftovers: list[Any]) -> tuple[list[Any], list[Any]]:
    from infra.sweep import split_data as split

    return split(leftovers)


def purge(leftovers: list[Any], project: str, out: Any) -> list[tuple[Any, str]]:
    from infra.sweep import purge_leftovers

    if not leftovers:
        return []
    results = purge_leftovers(leftovers, project=project)
    deleted = [lo for lo, err in results if err is None]
    if deleted:
        out.print(f"deleted {len(deleted)} resource(s) the destroy left: "
                  + ", ".join(f"{lo.kind} {lo.name or lo.id}" for lo in deleted))
    return [(lo, err) for lo, err in results if err]


def finish_data(home: Path, name: str, kept: list[registry.KeptData], delete_data: bool, yes: bool, out: Any) -> None:
    """The data policy at the end of a `down`: report what is kept, or delete it after a confirmation."""
    every = registry.kept_data(home, name)
    every = [d for d in every if d.url not in {k.url for k in kept}] + kept
    if delete_data:
        live = [d for d in (data.measure(d) if d not in kept else d for d in every)]
        data.confirm_deletion(out, live, yes)
        for item in live:
            data.delete_kept(item)
            out.print(f"deleted {item.describe()}")
        registry.drop_data(home, name, {d.url for d in every})
        return
    if kept:
        registry.keep_data(home, name, kept)
    if every:
        out.print(f"[bold]kept the data[/]: {data.summary(every)}; "
                  f"`gpuforge down --delete-data --cluster {name}` deletes it")
