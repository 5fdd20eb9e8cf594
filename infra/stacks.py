"""The cloud path of `fab up` / `fab down`: the repo's Pulumi program driven by the Automation API.

    spec = ClusterSpec(cloud="aws", name="demo", nodes=2, instance_type="p4d.24xlarge", ...)
    info = up_stack(spec, state_dir)            # pulumi up; returns the ClusterInfo of the `cluster` output
    destroy_stack("demo", "aws", state_dir)     # pulumi destroy, then the stack is removed

The program is the same one `pulumi up` at the repo root runs (Pulumi.yaml, `main: infra/`); the stack's
name is the cluster's name and its config is set from the spec. It needs the `pulumi` CLI on PATH.

State: by default a file backend at `file://<state_dir>/pulumi` (PULUMI_BACKEND_URL, when set, wins: use it
for a shared backend such as s3://). A file backend encrypts secrets with a passphrase; when neither
PULUMI_CONFIG_PASSPHRASE nor PULUMI_CONFIG_PASSPHRASE_FILE is set, a random passphrase is generated once into
`<state_dir>/pulumi/passphrase` (mode 0600) and used for every later call, so `fab down` works without a prompt.
Keep that file with the state: without it the stack cannot be read. gpuforge stores no secret values in config.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from infra.cluster import ClusterInfo
from infra.errors import ClusterError, PulumiCliMissingError, StackError
from infra.spec import ClusterSpec

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent  # where Pulumi.yaml lives
PULUMI_INSTALL_HINT = (
    "install it with `curl -fsSL https://get.pulumi.com | sh` (then add ~/.pulumi/bin to PATH), "
    "or see https://www.pulumi.com/docs/iac/download-install/"
)
PASSPHRASE_BYTES = 32
ERROR_TAIL_LINES = 15  # lines of pulumi's stderr carried into our error message


def require_pulumi_cli() -> str:
    """Path of the `pulumi` CLI; a clear error with how to install it when it is missing."""
    path = shutil.which("pulumi")
    if path is None:
        raise PulumiCliMissingError(f"the pulumi CLI is not on PATH; {PULUMI_INSTALL_HINT}")
    return path


def backend_url(state_dir: Path) -> str:
    """PULUMI_BACKEND_URL when set, else a file backend under the state dir."""
    return os.environ.get("PULUMI_BACKEND_URL") or f"file://{(Path(state_dir) / 'pulumi').resolve()}"


def workspace_env(state_dir: Path) -> dict[str, str]:
    """Environment for the Pulumi CLI: backend URL and a passphrase source (see the module docstring)."""
    env = {"PULUMI_BACKEND_URL": backend_url(state_dir), "PULUMI_SKIP_UPDATE_CHECK": "true"}
    if "PULUMI_CONFIG_PASSPHRASE" in os.environ or "PULUMI_CONFIG_PASSPHRASE_FILE" in os.environ:
        return env  # the user's own passphrase reaches the CLI through the inherited environment
    env["PULUMI_CONFIG_PASSPHRASE_FILE"] = str(ensure_passphrase_file(Path(state_dir) / "pulumi" / "passphrase"))
    return env


def ensure_passphrase_file(path: Path) -> Path:
    """Create a random passphrase file (0600) once; later calls reuse it."""
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_urlsafe(PASSPHRASE_BYTES))
    logger.info("created a Pulumi passphrase at %s; keep it with the state", path)
    return path


def stale_config_keys(existing: Mapping[str, Any], wanted: Mapping[str, str]) -> list[str]:
    """gpuforge keys set on the stack by an earlier run that the spec no longer sets."""
    return sorted(k for k in existing if k.startswith("gpuforge:") and k not in wanted)


def _stack(name: str, state_dir: Path, create: bool) -> Any:
    """Select (or create) the stack `name` of the repo's program."""
    require_pulumi_cli()
    from pulumi import automation as auto

    opts = auto.LocalWorkspaceOptions(work_dir=str(REPO_ROOT), env_vars=workspace_env(state_dir))
    try:
        if create:
            return auto.create_or_select_stack(stack_name=name, work_dir=str(REPO_ROOT), opts=opts)
        return auto.select_stack(stack_name=name, work_dir=str(REPO_ROOT), opts=opts)
    except auto.StackNotFoundError as exc:
        raise StackError(f"no stack {name!r} in {backend_url(state_dir)}; `fab up` creates it") from exc
    except auto.CommandError as exc:
        raise StackError(f"cannot open stack {name!r} in {backend_url(state_dir)}: {_tail(exc)}") from exc


def _tail(exc: Exception) -> str:
    text = str(getattr(exc, "stderr", "") or exc)
    return " | ".join(line.strip() for line in text.strip().splitlines()[-ERROR_TAIL_LINES:] if line.strip())


def _output_values(outputs: Mapping[str, Any]) -> dict[str, Any]:
    """Automation API OutputMap (OutputValue objects) -> plain values."""
    return {k: getattr(v, "value", v) for k, v in outputs.items()}


def up_stack(spec: ClusterSpec, state_dir: Path, on_output: Callable[[str], Any] = print) -> ClusterInfo:
    """Create or update the cluster of `spec`; returns its ClusterInfo (state_dir set to `state_dir`)."""
    if spec.cloud not in ("aws", "gcp"):
        raise StackError(f"up_stack creates aws or gcp clusters, not {spec.cloud!r}")
    spec.check_deployable()
    stack = _stack(spec.name, Path(state_dir), create=True)
    from pulumi import automation as auto

    wanted = spec.to_stack_config()
    try:
        stale = stale_config_keys(stack.get_all_config(), wanted)
        if stale:
            stack.remove_all_config(stale)
        stack.set_all_config({k: auto.ConfigValue(value=v) for k, v in wanted.items()})
        logger.info("pulumi up: stack %s, %d x %s, about $%.2f/h", spec.name, spec.nodes, spec.instance_type,
                    spec.cost_per_hour)
        result = stack.up(on_output=on_output)
    except auto.CommandError as exc:
        raise StackError(f"pulumi up failed for stack {spec.name!r}: {_tail(exc)}") from exc
    info = cluster_from_outputs(_output_values(result.outputs))
    return replace(info, state_dir=str(state_dir))


def destroy_stack(name: str, cloud: str, state_dir: Path, on_output: Callable[[str], Any] = print) -> None:
    """Destroy every resource of the stack `name`, then remove the stack from the backend."""
    stack = _stack(name, Path(state_dir), create=False)
    from pulumi import automation as auto

    try:
        configured = stack.get_all_config().get("gpuforge:cloud")
        configured_cloud = getattr(configured, "value", None)
        if configured_cloud and configured_cloud != cloud:
            raise StackError(f"stack {name!r} is a {configured_cloud} cluster, not {cloud}; nothing destroyed")
        stack.destroy(on_output=on_output, remove=True)  # remove=True: the stack goes once it is empty
    except auto.CommandError as exc:
        raise StackError(f"pulumi destroy failed for stack {name!r}: {_tail(exc)}") from exc


def stack_outputs(name: str, state_dir: Path) -> dict[str, Any]:
    """The stack's outputs as plain values ({"cluster": {...}, "costPerHour": ...})."""
    stack = _stack(name, Path(state_dir), create=False)
    from pulumi import automation as auto

    try:
        return _output_values(stack.outputs())
    except auto.CommandError as exc:
        raise StackError(f"cannot read the outputs of stack {name!r}: {_tail(exc)}") from exc


def cluster_from_outputs(outputs: Mapping[str, Any] | str) -> ClusterInfo:
    """ClusterInfo from stack outputs: the JSON of `pulumi stack output --json` (text or parsed), or the
    Automation API's output map."""
    if isinstance(outputs, str):
        try:
            outputs = json.loads(outputs)
        except json.JSONDecodeError as exc:
            raise StackError(f"stack outputs are not valid JSON: {exc}") from exc
    if not isinstance(outputs, Mapping):
        raise StackError(f"stack outputs must be a JSON object, got {type(outputs).__name__}")
    values = _output_values(outputs)
    if "cluster" not in values:
        raise StackError(
            f"stack outputs have no 'cluster' (keys: {sorted(values) or 'none'}); "
            "is this a stack of gpuforge's program, and did `pulumi up` finish?"
        )
    record = values["cluster"]
    if isinstance(record, str):
        try:
            record = json.loads(record)
        except json.JSONDecodeError as exc:
            raise StackError(f"the stack's 'cluster' output is not valid JSON: {exc}") from exc
    try:
        info = ClusterInfo.from_dict(record)
    except (ClusterError, TypeError, AttributeError) as exc:
        raise StackError(f"the stack's 'cluster' output is not a cluster record: {exc}") from exc
    if info.cloud not in ("aws", "gcp"):
        raise StackError(f"the stack's 'cluster' output is a {info.cloud!r} cluster; expected aws or gcp")
    if "costPerHour" in values and "cost_per_hour" not in info.extra:
        info = replace(info, extra={**info.extra, "cost_per_hour": values["costPerHour"]})
    return info
