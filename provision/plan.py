"""Setup plans without a cluster: what `fab setup --dry-run --instance-type p4d.24xlarge --os ubuntu-22.04`
prints, the exact ordered steps and commands gpuforge would run as root on a fresh VM of that type.

    >>> ctx = plan_context("aws", "p4d.24xlarge", "ubuntu-22.04")
    >>> print(render_plan(GPU_STEPS, ctx))        # doctest: +SKIP

The facts of the imagined VM come from the instance catalog (GPUs, NVSwitch, EFA) and the OS name;
a fresh VM has no driver, so every GPU step shows its full plan, reboots included. With a real node's facts
(a Deep Learning AMI's, say) each step first says what it found and keeps (`= already in place on this node:
...`).
"""

from __future__ import annotations

from provision.facts import Facts
from provision.steps.base import Step, StepContext
from provision.steps.gpu_common import gpu_model_of, versions_for
from provision.versions import gpu_family, version_set

# NVSwitch chips on an HGX baseboard (what lspci lists as NVIDIA bridges): HGX A100 8-GPU has six
# third-generation NVSwitches, HGX H100/H200 8-GPU four (NVIDIA HGX platform briefs).
NVSWITCHES_PER_BOARD = {"A100": 6, "H100": 4, "H200": 4, "B200": 2}
DRY_RUN_NODE = "dry-run"


def synth_facts(cloud: str, instance_type: str, os_name: str, accelerator: str | None = None) -> Facts:
    """The facts a fresh VM of this type would report before setup: its GPUs on the PCI bus, NVSwitches and
    EFA devices per the catalog, the OS asked for, and no NVIDIA driver yet."""
    from infra.catalog import find_instance, gpus_of

    vs = version_set(os_name)  # MatrixError names the supported OSes
    row = find_instance(cloud, instance_type)
    model, count, _ = gpus_of(cloud, instance_type, accelerator)
    os_id, _, os_version = vs.os_name.partition("-")
    nvswitches = NVSWITCHES_PER_BOARD.get(gpu_family(model), 1) if row.nvswitch else 0
    return Facts(
        os_id=os_id,
        os_version=os_version,
        arch="x86_64",
        cpus=row.vcpus,
        mem_gib=row.ram_gib,
        gpu_pci_count=count,
        gpu_pci_models=(model,) * count,
        nvswitch_count=nvswitches,
        efa_count=row.efa_interfaces,
    )


def plan_context(cloud: str, instance_type: str, os_name: str, accelerator: str | None = None) -> StepContext:
    """A StepContext for one imagined node of this type (cluster and node records included)."""
    from infra.catalog import gpus_of
    from infra.cluster import ClusterInfo, NodeInfo

    facts = synth_facts(cloud, instance_type, os_name, accelerator)
    model, count, _ = gpus_of(cloud, instance_type, accelerator)
    node = NodeInfo(
        name=DRY_RUN_NODE, rank=0, public_address="(new VM)", private_address="(new VM)",
        gpu_model=model, gpu_count=count, instance_type=instance_type,
    )
    cluster = ClusterInfo(name=DRY_RUN_NODE, cloud=cloud, nodes=(node,))
    options = {"instance_type": instance_type, "cloud": cloud, "versions": version_set(os_name)}
    if accelerator:
        options["accelerator"] = accelerator
    return StepContext(cluster=cluster, node=node, facts=facts, options=options)


def render_plan(steps: list[Step], ctx: StepContext) -> str:
    """Every step in order: skipped ones with the reason, the others with their numbered commands
    (`(root) ` where the whole line runs as root, `VAR=value` for what it exports first, reboots marked)."""
    what = ctx.options.get("instance_type") or ctx.node.instance_type or ctx.node.name
    lines = [f"Setup plan for {what}: {ctx.facts.summary() if ctx.facts else 'no facts'}"]
    if ctx.options.get("versions") is not None:
        vs = versions_for(ctx)  # the matrix row around what the node keeps (a Deep Learning AMI's driver ...)
        lines.append(
            f"Versions: driver {vs.driver_version}, CUDA {vs.cuda_toolkit}, NCCL {vs.nccl}, torch {vs.torch}+"
            f"{vs.torch_cuda_tag(gpu_model_of(ctx)) if gpu_model_of(ctx) else vs.torch_cuda}, "
            f"EFA installer {vs.efa_installer} (provision/versions.toml)"
        )
    for number, step in enumerate(steps, 1):
        reason = step.skip_reason(ctx)
        if reason:
            lines.append(f"\n[{number}] {step.name}: skipped ({reason})")
            continue
        lines.append(f"\n[{number}] {step.name}: {step.description}")
        note = step.existing_note(ctx) if hasattr(step, "existing_note") else ""
        if note:
            lines.append(f"    = {note}")
        for i, cmd in enumerate(step.plan(ctx), 1):
            if cmd.desc:
                lines.append(f"    # {cmd.desc}")
            prefix = "(root) " if cmd.sudo else ""  # sent through steps.base.root_command: sudo -n sh -c '...'
            env = "".join(f"{key}={value} " for key, value in cmd.env)
            marker = "   <- reboot" if cmd.reboot else ""
            if cmd.reboot_when:
                marker += f", only if the step's previous command printed {cmd.reboot_when!r}"
            lines.append(f"  {number}.{i} {prefix}{env}{cmd.run}{marker}")
    return "\n".join(lines)
