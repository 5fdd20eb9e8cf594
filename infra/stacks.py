"""The cloud path of `fab up` / `fab down`: the repo's Pulumi program, driven through a stack engine.

    engine = engine_for(state_dir)                     # the Automation API (needs the `pulumi` CLI)
    info = up_stack(spec, state_dir)                   # pulumi up; the ClusterInfo of the `cluster` output
    plan = preview_stack(spec, state_dir)              # what an up with this spec would change
    destroy_stack("demo", "aws", state_dir)            # pulumi destroy (the data bucket is retained), stack removed

The program is the same one `pulumi up` at the repo root runs (Pulumi.yaml, `main: infra/`), shipped in the package:
the Automation API runs `infra.__main__.run` inline, in this process, so `gpuforge up --cloud ...` works from a wheel
install in any folder (no checkout, no Pulumi.yaml beside the code, no virtualenv for the CLI to find). The project
(name `gpuforge`, as in the repo's Pulumi.yaml, so both drive the same stacks under one backend) and the stack's
config file (Pulumi.<stack>.yaml) live in `<state_dir>/pulumi/project`. The stack's name is the cluster's name and
its config is set from the spec. The engine fetches the aws/gcp provider plugins on first use, for inline programs as
for others (Pulumi's Automation API docs, "Plugins"), at the versions of the installed pulumi_aws/pulumi_gcp.

The engine is a seam: `ENGINE_FACTORY(state_dir)` gives the object that runs the program. In production it is
`AutomationEngine` (Pulumi's Automation API over the CLI). The lifecycle tests put a stand-in there that runs the same
program under Pulumi's mocks with preview=False and creates the resources in moto / a local Compute endpoint
(tests/fakes/engine.py, which says where it differs from a real `pulumi up`).

State: by default a file backend at `file://<state_dir>/pulumi` (PULUMI_BACKEND_URL, when set, wins: use it for a
shared backend such as s3://). A file backend encrypts secrets with a passphrase; when neither
PULUMI_CONFIG_PASSPHRASE nor PULUMI_CONFIG_PASSPHRASE_FILE is set, a random passphrase is generated once into
`<state_dir>/pulumi/passphrase` (mode 0600) and used for every later call, so `fab down` works without a prompt, and
`--cluster pulumi:STACK` reads the stack with the same backend and passphrase. Keep that file with the state.
gpuforge stores no secret values in config.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import secrets
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from infra.cluster import ClusterInfo
from infra.errors import CloudPackagesMissingError, ClusterError, PulumiCliMissingError, StackError
from infra.spec import ClusterSpec

logger = logging.getLogger(__name__)

PROJECT_NAME = "gpuforge"  # the repo's Pulumi.yaml names the same project: one set of stacks per backend
PROJECT_DESCRIPTION = "GPU training clusters on your own AWS or GCP account"
PULUMI_INSTALL_HINT = (
    "install it with `curl -fsSL https://get.pulumi.com | sh` (then add ~/.pulumi/bin to PATH), "
    "or see https://www.pulumi.com/docs/iac/download-install/"
)
# what the cloud path imports, per cloud: the `cloud` extra of pyproject.toml (a plain `pip install gpuforge` lacks it)
CLOUD_CLIENTS = {"aws": ("boto3",), "gcp": ("google.cloud.compute_v1", "google.cloud.storage")}
PULUMI_SDKS = {"aws": ("pulumi", "pulumi_aws"), "gcp": ("pulumi", "pulumi_gcp")}
PASSPHRASE_BYTES = 32
ERROR_TAIL_LINES = 15  # lines of pulumi's stderr carried into our error message
Output = Callable[[str], Any]


@dataclass(frozen=True)
class Recorded:
    """One resource the stack records: what the sweep claims besides tags."""

    type: str
    name: str
    id: str
    outputs: dict[str, Any] = field(default_factory=dict)
    retain: bool = False

    def keys(self) -> set[str]:
        """The identifiers the clouds list it by: id, self link, email, bucket name, and physical names (the sweep
        matches a name only for kinds whose names are unique)."""
        found = {self.id}
        for key in ("name", "selfLink", "email", "bucket", "keyName", "arn", "allocationId"):
            value = self.outputs.get(key)
            if isinstance(value, str):
                found.add(value)
        return {k for k in found if k}


@dataclass(frozen=True)
class Preview:
    """What an up would do: op -> count, and (op, type, name) for each resource that changes."""

    counts: dict[str, int]
    steps: list[tuple[str, str, str]]

    def of(self, op: str, type_suffix: str = "") -> list[str]:
        return [name for o, typ, name in self.steps if o == op and typ.endswith(type_suffix)]


class StackEngine(Protocol):
    def check(self) -> None: ...  # raises when the engine cannot run (no pulumi CLI)
    def exists(self, stack: str) -> bool: ...
    def config(self, stack: str) -> dict[str, str]: ...
    def up(self, stack: str, config: Mapping[str, str], on_output: Output) -> dict[str, Any]: ...
    def preview(self, stack: str, config: Mapping[str, str], on_output: Output) -> Preview: ...
    def destroy(self, stack: str, on_output: Output) -> None: ...
    def refresh(self, stack: str, on_output: Output) -> None: ...  # the state made to match the cloud (gone = dropped)
    def outputs(self, stack: str) -> dict[str, Any]: ...
    def recorded(self, stack: str) -> list[Recorded]: ...


def require_pulumi_cli() -> str:
    """Path of the `pulumi` CLI; a clear error with how to install it when it is missing."""
    path = shutil.which("pulumi")
    if path is None:
        raise PulumiCliMissingError(f"the pulumi CLI is not on PATH; {PULUMI_INSTALL_HINT}")
    return path


def require_cloud_packages(cloud: str, programs: bool = True) -> None:
    """A clear error naming the extra to install when the cloud path's Python packages are missing (the cloud's
    clients; with `programs`, the Pulumi SDKs the program needs too)."""
    wanted = (*(PULUMI_SDKS.get(cloud, ()) if programs else ()), *CLOUD_CLIENTS.get(cloud, ()))
    missing = [name for name in wanted if not _importable(name)]
    if missing:
        raise CloudPackagesMissingError(f"{cloud} clusters need {', '.join(missing)}, which this install lacks; "
                                        "install them with: pip install 'gpuforge[cloud]'")


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a missing parent package (google.cloud)
        return False


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


def project_dir(state_dir: Path) -> Path:
    """Where the Automation API keeps the project file and the stack's config file for the clusters of `state_dir`."""
    return Path(state_dir) / "pulumi" / "project"


def workspace_options(state_dir: Path) -> Any:
    """The Automation API workspace of `state_dir`: the packaged program inline, its project, backend and secrets."""
    from pulumi import automation as auto

    from infra.__main__ import run

    work = project_dir(state_dir)
    work.mkdir(parents=True, exist_ok=True)
    project = auto.ProjectSettings(name=PROJECT_NAME, runtime="python", main=str(work),
                                   description=PROJECT_DESCRIPTION)
    return auto.LocalWorkspaceOptions(work_dir=str(work), program=run, project_settings=project,
                                      env_vars=workspace_env(state_dir))


def stale_config_keys(existing: Mapping[str, Any], wanted: Mapping[str, str]) -> list[str]:
    """gpuforge keys set on the stack by an earlier run that the spec no longer sets."""
    return sorted(k for k in existing if k.startswith("gpuforge:") and k not in wanted)


def _tail(exc: Exception) -> str:
    text = str(getattr(exc, "stderr", "") or exc)
    return " | ".join(line.strip() for line in text.strip().splitlines()[-ERROR_TAIL_LINES:] if line.strip())


def _output_values(outputs: Mapping[str, Any]) -> dict[str, Any]:
    """Automation API OutputMap (OutputValue objects) -> plain values."""
    return {k: getattr(v, "value", v) for k, v in outputs.items()}


class AutomationEngine:
    """Pulumi's Automation API over the CLI, with the backend and passphrase of `state_dir`."""

    def __init__(self, state_dir: Path):
        self.state_dir = Path(state_dir)

    def check(self) -> None:
        require_pulumi_cli()

    def _stack(self, name: str, create: bool) -> Any:
        require_pulumi_cli()
        from pulumi import automation as auto

        opts = workspace_options(self.state_dir)
        try:
            if create:
                return auto.create_or_select_stack(stack_name=name, project_name=PROJECT_NAME, program=opts.program,
                                                   opts=opts)
            return auto.select_stack(stack_name=name, project_name=PROJECT_NAME, program=opts.program, opts=opts)
        except auto.StackNotFoundError as exc:
            raise StackError(f"no stack {name!r} in {backend_url(self.state_dir)}; `gpuforge up` creates it") from exc
        except auto.CommandError as exc:
            raise StackError(f"cannot open stack {name!r} in {backend_url(self.state_dir)}: {_tail(exc)}") from exc

    def _set_config(self, stack: Any, config: Mapping[str, str]) -> None:
        from pulumi import automation as auto

        stale = stale_config_keys(stack.get_all_config(), config)
        if stale:
            stack.remove_all_config(stale)
        stack.set_all_config({k: auto.ConfigValue(value=v) for k, v in config.items()})

    def exists(self, stack: str) -> bool:
        try:
            self._stack(stack, create=False)
        except StackError:
            return False
        return True

    def config(self, stack: str) -> dict[str, str]:
        return {k: getattr(v, "value", v) for k, v in self._stack(stack, create=False).get_all_config().items()}

    def up(self, stack: str, config: Mapping[str, str], on_output: Output) -> dict[str, Any]:
        from pulumi import automation as auto

        handle = self._stack(stack, create=True)
        try:
            self._set_config(handle, config)
            return _output_values(handle.up(on_output=on_output).outputs)
        except auto.CommandError as exc:
            raise StackError(f"pulumi up failed for stack {stack!r}: {_tail(exc)}") from exc

    def preview(self, stack: str, config: Mapping[str, str], on_output: Output) -> Preview:
        """A preview with `config`; the stack's own config is put back afterwards."""
        from pulumi import automation as auto

        handle = self._stack(stack, create=True)
        before = self.config(stack)
        steps: list[tuple[str, str, str]] = []

        def on_event(event: Any) -> None:
            pre = getattr(event, "resource_pre_event", None)
            if pre is not None and pre.metadata.op.value != "same":
                steps.append((pre.metadata.op.value, pre.metadata.type, pre.metadata.urn.rsplit("::", 1)[-1]))

        try:
            self._set_config(handle, config)
            result = handle.preview(on_output=on_output, on_event=on_event)
        except auto.CommandError as exc:
            raise StackError(f"pulumi preview failed for stack {stack!r}: {_tail(exc)}") from exc
        finally:
            self._set_config(handle, before)
        return Preview({getattr(k, "value", k): v for k, v in result.change_summary.items()}, steps)

    def destroy(self, stack: str, on_output: Output) -> None:
        from pulumi import automation as auto

        try:
            self._stack(stack, create=False).destroy(on_output=on_output, remove=True)
        except auto.CommandError as exc:
            raise StackError(f"pulumi destroy failed for stack {stack!r}: {_tail(exc)}") from exc

    def refresh(self, stack: str, on_output: Output) -> None:
        from pulumi import automation as auto

        try:
            self._stack(stack, create=False).refresh(on_output=on_output)
        except auto.CommandError as exc:
            raise StackError(f"pulumi refresh failed for stack {stack!r}: {_tail(exc)}") from exc

    def outputs(self, stack: str) -> dict[str, Any]:
        from pulumi import automation as auto

        try:
            return _output_values(self._stack(stack, create=False).outputs())
        except auto.CommandError as exc:
            raise StackError(f"cannot read the outputs of stack {stack!r}: {_tail(exc)}") from exc

    def recorded(self, stack: str) -> list[Recorded]:
        deployment = self._stack(stack, create=False).export_stack().deployment or {}
        return [Recorded(type=r.get("type", ""), name=r.get("urn", "").rsplit("::", 1)[-1], id=r.get("id", ""),
                         outputs=r.get("outputs", {}) or {}, retain=bool(r.get("retainOnDelete")))
                for r in deployment.get("resources", []) if r.get("custom") and r.get("id")]


ENGINE_FACTORY: Callable[[Path], StackEngine] = AutomationEngine  # the seam (module docstring)


def engine_for(state_dir: Path) -> StackEngine:
    return ENGINE_FACTORY(Path(state_dir))


def up_stack(spec: ClusterSpec, state_dir: Path, on_output: Output = print) -> ClusterInfo:
    """Create or update the cluster of `spec`; returns its ClusterInfo (state_dir set to `state_dir`)."""
    if spec.cloud not in ("aws", "gcp"):
        raise StackError(f"up_stack creates aws or gcp clusters, not {spec.cloud!r}")
    spec.check_deployable()
    engine = engine_for(state_dir)
    logger.info("pulumi up: stack %s, %d x %s, about $%.2f/h", spec.name, spec.nodes, spec.instance_type,
                spec.cost_per_hour)
    outputs = engine.up(spec.name, spec.to_stack_config(), on_output)
    return replace(cluster_from_outputs(outputs), state_dir=str(state_dir))


def preview_stack(spec: ClusterSpec, state_dir: Path, on_output: Output = print) -> Preview:
    spec.check_deployable()
    return engine_for(state_dir).preview(spec.name, spec.to_stack_config(), on_output)


def stack_config(name: str, state_dir: Path) -> dict[str, str]:
    """The stack's config ({} when there is no stack yet)."""
    engine = engine_for(state_dir)
    return engine.config(name) if engine.exists(name) else {}


def recorded_resources(name: str, state_dir: Path) -> list[Recorded]:
    engine = engine_for(state_dir)
    return engine.recorded(name) if engine.exists(name) else []


def refresh_stack(name: str, state_dir: Path, on_output: Output = print) -> None:
    """Read what the stack's resources are in the cloud: a lost instance (terminated, preempted) leaves the state,
    so the next up creates it again (`pulumi up` alone would not look)."""
    engine_for(state_dir).refresh(name, on_output)


def destroy_stack(name: str, cloud: str, state_dir: Path, on_output: Output = print) -> None:
    """Destroy every resource of the stack `name` (the retained data bucket stays), then remove the stack."""
    engine = engine_for(state_dir)
    configured = engine.config(name).get("gpuforge:cloud")
    if configured and configured != cloud:
        raise StackError(f"stack {name!r} is a {configured} cluster, not {cloud}; nothing destroyed")
    engine.destroy(name, on_output)


def stack_outputs(name: str, state_dir: Path) -> dict[str, Any]:
    """The stack's outputs as plain values ({"cluster": {...}, "costPerHour": ...})."""
    return engine_for(state_dir).outputs(name)


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
