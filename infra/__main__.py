"""The Pulumi program behind `pulumi up` at the repo root (Pulumi.yaml: `main: infra/`), and behind `fab up`
(infra/stacks.py runs `run` inline through the Automation API, from a checkout or a wheel).

    pulumi stack init dev
    pulumi config set gpuforge:cloud aws                 # or gcp (then also: pulumi config set gcp:project ID)
    pulumi config set gpuforge:instanceType p4d.24xlarge
    pulumi config set gpuforge:nodes 2
    pulumi config set gpuforge:region us-east-1
    pulumi config set gpuforge:sshPublicKey "$(cat ~/.ssh/id_ed25519.pub)"
    pulumi config set gpuforge:sshKeyPath ~/.ssh/id_ed25519
    pulumi config set --path 'gpuforge:sshCidrs[0]' 203.0.113.4/32
    pulumi up

Every value is validated into a ClusterSpec before any resource is registered. Outputs: `cluster` (the
ClusterInfo record `fab setup` reads), `costPerHour` (catalog estimate, USD), `image` (what the nodes boot) and
`bucket` (the data bucket, which `pulumi destroy` keeps: see the README's data policy).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

# Pulumi runs this directory as a script; make `import infra` work from the repo root.
_REPO_ROOT = str(Path(__file__).resolve().parent.parent)
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

import pulumi  # noqa: E402

from infra.errors import SpecError  # noqa: E402
from infra.spec import SSH_CIDRS_HINT, ClusterSpec  # noqa: E402

PROVIDER_KEYS = ("gcp:project", "gcp:region", "gcp:zone", "aws:region")  # read as fallbacks
WORLD = ("0.0.0.0/0", "::/0")


def read_stack_config() -> dict[str, Any]:
    """Every `gpuforge:*` key of the stack (plus the provider keys we fall back on)."""
    from pulumi.runtime import config as runtime_config

    values = {**runtime_config.get_config_env(), **runtime_config.CONFIG.get()}
    return {k: v for k, v in values.items() if k.startswith("gpuforge:") or k in PROVIDER_KEYS}


def name_from_stack(stack: str) -> str:
    """A cluster name from the stack name: lowercase, other characters become '-', at most 24."""
    return re.sub(r"[^a-z0-9-]+", "-", stack.lower()).strip("-")[:24].rstrip("-") or "gpuforge"


def load_spec() -> ClusterSpec:
    """The stack's ClusterSpec; raises SpecError (before anything is created) when a value is wrong."""
    spec = ClusterSpec.from_stack_config(
        read_stack_config(), cloud_default="aws", name=name_from_stack(pulumi.get_stack())
    )
    if spec.cloud == "local":
        raise SpecError("gpuforge:cloud is 'local': the Pulumi program creates aws or gcp clusters; use `gpuforge up`")
    spec.check_deployable()
    return spec


def run() -> dict[str, Any]:
    """Build the cluster of this stack and export its outputs; returns them too (for tests)."""
    spec = load_spec()
    if not spec.ssh_cidrs:
        pulumi.log.warn(SSH_CIDRS_HINT)
    elif any(c in WORLD for c in spec.ssh_cidrs):
        pulumi.log.warn("gpuforge:sshCidrs opens SSH to the whole internet; prefer your own address/32")
    if spec.cloud == "aws":
        from infra.aws import AwsGpuCluster

        component: Any = AwsGpuCluster(spec.name, spec)
    else:
        from infra.gcp import GcpGpuCluster

        component = GcpGpuCluster(spec.name, spec)
    outputs = {"cluster": component.cluster, "costPerHour": spec.cost_per_hour, "image": component.image,
               "bucket": component.bucket_name}
    for key, value in outputs.items():
        pulumi.export(key, value)
    return outputs


if __name__ == "__main__":
    run()
