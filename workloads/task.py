"""A task file: your own code as one small YAML file, validated before anything starts.

    name: finetune
    nodes: 2
    resources: {cloud: aws, gpu: A10G:1, spot: true, disk_gb: 200}   # used when a cluster is created
    workdir: .                          # shipped to every node (.gitignore and .gpuforgeignore honoured)
    setup: pip install -r requirements.txt
    run: |
      torchrun --nnodes $NNODES --nproc-per-node $NPROC_PER_NODE --node-rank $NODE_RANK \
        --master-addr $MASTER_ADDR --master-port $MASTER_PORT train.py --out out
    envs: {EPOCHS: 3}
    secrets: [HF_TOKEN]                 # from this machine's environment (or {name: X, file: PATH})
    outputs: out                        # synced to the run's storage at the end and every few minutes
    recovery: 2                         # a lost node is brought back and the run resumed, at most twice

`gpuforge launch task.yaml` runs it; `load_task()` returns a `Task` or raises one ConfigError whose
message has one line per bad field (unknown keys are refused with the valid ones listed).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from workloads.env_overrides import ENV_NAME, RESERVED_ENVS
from workloads.errors import ConfigError

NAME = re.compile(r"^[a-z][a-z0-9-]{0,38}$")
CLOUDS = ("local", "aws", "gcp")
MAX_RECOVERY = 100  # `recovery:` and --recover's ceiling: a run that needs more has a problem recovery does not solve
DEFAULT_OUTPUTS_EVERY_S = 300.0  # "every few minutes": a lost node costs at most this much of its outputs


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Resources(Strict):
    """What a cluster created for the task is made of (ignored when the task runs on a given cluster)."""

    cloud: str = "local"
    instance_type: str = ""
    gpu: str = ""
    """GPU model and count per node, e.g. A100:8; the catalog's cheapest type that has it is used."""
    accelerator: str = ""
    """GCP n1 only, e.g. nvidia-tesla-t4:1."""
    region: str = ""
    zone: str = ""
    spot: bool = False
    disk_gb: int = Field(default=0, ge=0)
    os: str = ""
    ssh_cidrs: list[str] = []
    """Who may SSH to a created cloud cluster (this machine's address/32); without it nodes get no public SSH."""

    @field_validator("cloud")
    @classmethod
    def _check_cloud(cls, v: str) -> str:
        if v not in CLOUDS:
            raise ValueError(f"must be one of {', '.join(CLOUDS)}; got {v!r}")
        return v

    @field_validator("gpu")
    @classmethod
    def _check_gpu(cls, v: str) -> str:
        if v and not re.match(r"^[A-Za-z0-9-]+(:[1-9][0-9]*)?$", v):
            raise ValueError(f"must be MODEL or MODEL:COUNT, e.g. A100:8; got {v!r}")
        return v


class Secret(Strict):
    name: str
    """The variable the run sees."""
    env: str = ""
    """Read from this variable of the controller's environment (default: the same name)."""
    file: str = ""
    """Or read from this file on the controller (surrounding whitespace stripped)."""

    @model_validator(mode="after")
    def _one_source(self) -> Secret:
        if not ENV_NAME.match(self.name):
            raise ValueError(f"secret name {self.name!r} is not a variable name")
        if self.env and self.file:
            raise ValueError(f"secret {self.name}: give `env:` or `file:`, not both")
        return self


class Outputs(Strict):
    path: str
    """A folder relative to the run's working directory on every node."""
    every: float = Field(default=DEFAULT_OUTPUTS_EVERY_S, gt=0)
    """Seconds between syncs while the run goes on; it is always synced at the end."""

    @field_validator("path")
    @classmethod
    def _relative(cls, v: str) -> str:
        if not v or v.startswith("/") or ".." in Path(v).parts:
            raise ValueError(f"must be a folder inside the run's working directory (relative, no '..'); got {v!r}")
        return v.rstrip("/")


class Task(Strict):
    name: str = ""
    nodes: int = Field(default=1, ge=1)
    nproc_per_node: int = Field(default=0, ge=0)
    """Processes per node for `script:` (default: the node's GPUs, or 1)."""
    resources: Resources = Resources()
    workdir: str = ""
    """The folder shipped to every node (default: the task file's folder); relative to the task file."""
    setup: str = ""
    run: str = ""
    script: str = ""
    """A script in the workdir that we start under torchrun (instead of `run:`)."""
    args: list[str] = []
    envs: dict[str, str] = {}
    secrets: list[Secret] = []
    outputs: Outputs | None = None
    start_timeout: float = Field(default=0.0, ge=0)
    """Seconds until the run's first step before it is failed (0: no limit; our jobs report steps)."""
    recovery: int = 0
    """After a lost node (preempted, terminated, unreachable): bring it back, set up, resume; at most this many times."""

    @field_validator("recovery", mode="before")
    @classmethod
    def _check_recovery(cls, v: Any) -> int:
        # before pydantic's lax int: `recovery: true` would otherwise launch with one recovery
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_RECOVERY:
            raise ValueError(f"give a whole number of recoveries from 0 to {MAX_RECOVERY} (0: off); got {v!r}")
        return v

    @field_validator("name")
    @classmethod
    def _check_name(cls, v: str) -> str:
        if v and not NAME.match(v):
            raise ValueError(f"must be lowercase letters, digits and '-' (at most 39), starting with a letter; got {v!r}")
        return v

    @field_validator("envs", mode="before")
    @classmethod
    def _stringify_envs(cls, v: Any) -> Any:
        if not isinstance(v, dict):
            return v
        out = {}
        for key, value in v.items():
            if not isinstance(key, str) or not ENV_NAME.match(key):
                raise ValueError(f"{key!r} is not a variable name")
            if key in RESERVED_ENVS:
                raise ValueError(f"{key} is set by gpuforge for every process; pick another name")
            if isinstance(value, (dict, list)) or value is None:
                raise ValueError(f"{key} must be a string or a number; got {value!r}")
            out[key] = str(value).lower() if isinstance(value, bool) else str(value)
        return out

    @field_validator("secrets", mode="before")
    @classmethod
    def _names_are_secrets(cls, v: Any) -> Any:
        if isinstance(v, list):
            return [{"name": item} if isinstance(item, str) else item for item in v]
        if isinstance(v, dict):  # {NAME: {file: PATH}} or {NAME: null}
            return [{"name": k, **(item or {})} if isinstance(item, (dict, type(None))) else {"name": k, "env": item}
                    for k, item in v.items()]
        return v

    @field_validator("outputs", mode="before")
    @classmethod
    def _outputs_shorthand(cls, v: Any) -> Any:
        return {"path": v} if isinstance(v, str) else v

    @field_validator("args", mode="before")
    @classmethod
    def _stringify_args(cls, v: Any) -> Any:
        return [str(a) for a in v] if isinstance(v, list) else v

    @model_validator(mode="after")
    def _run_or_script(self) -> Task:
        if bool(self.run.strip()) == bool(self.script):
            raise ValueError("give exactly one of `run:` (a shell command for every node) or `script:` (a Python script "
                             "we start under torchrun)")
        if self.args and not self.script:
            raise ValueError("`args:` goes with `script:`; with `run:` put the arguments in the command")
        names = [s.name for s in self.secrets]
        clash = sorted(set(names) & set(self.envs)) or sorted({n for n in names if names.count(n) > 1})
        if clash:
            raise ValueError(f"{', '.join(clash)} is given twice (envs and secrets, or two secrets)")
        return self

    @property
    def kind(self) -> str:
        return "script" if self.script else "run"


def field_list(model: type[BaseModel]) -> str:
    return ", ".join(model.model_fields)


def model_at(loc: tuple) -> type[BaseModel]:
    """The model whose field a pydantic error location points into (for 'valid fields' lists)."""
    model: type[BaseModel] = Task
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        annotation = model.model_fields[part].annotation if part in model.model_fields else None
        for candidate in (Resources, Secret, Outputs):
            if annotation is candidate or candidate.__name__ in str(annotation):
                model = candidate
    return model


def error_lines(where: str, exc: ValidationError) -> list[str]:
    """One line per bad field, each naming the field, the problem and the valid choices."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            lines.append(f"{where}: unknown key {loc!r}; valid keys: {field_list(model_at(err['loc']))}")
        elif err["type"] == "value_error":
            lines.append(f"{where}: {loc}: {msg}" if err["loc"] else f"{where}: {msg}")
        else:
            lines.append(f"{where}: {loc}: {msg}; got {err['input']!r}")
    return lines


def default_name(stem: str, fallback: str) -> str:
    """A task name from a file name: `Train_GPT.yaml` -> train-gpt."""
    name = re.sub(r"[^a-z0-9-]+", "-", stem.lower()).strip("-")[:39].rstrip("-")
    return name if NAME.match(name) else fallback


def load_task(path: Path | str, env_overrides: dict[str, str] | None = None) -> tuple[Task, Path]:
    """The task in `path` (with --env overrides applied) and its workdir, resolved; ConfigError when bad."""
    path = Path(path).expanduser()
    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.y*ml"))
        raise ConfigError(f"{path} is a folder; give a task file" + (f" (there: {', '.join(found)})" if found else ""))
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"task file {path} does not exist") from None
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: not readable YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a task file is a YAML mapping with keys {field_list(Task)}")
    if "name" not in data:
        data["name"] = default_name(path.stem, "task")
    try:
        task = Task(**data)
    except ValidationError as exc:
        raise ConfigError("\n".join(error_lines(str(path), exc))) from None
    except TypeError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if env_overrides:
        task = task.model_copy(update={"envs": {**task.envs, **env_overrides}})
    workdir = (path.parent / Path(task.workdir or ".").expanduser()).resolve()
    if not workdir.is_dir():
        raise ConfigError(f"{path}: workdir {task.workdir or '.'} ({workdir}) is not a folder")
    if task.script and not (workdir / task.script).is_file():
        raise ConfigError(f"{path}: script {task.script} is not a file in the workdir {workdir}")
    return task, workdir


def script_task(script: str, args: list[str], nodes: int, nproc_per_node: int, envs: dict[str, str]) -> tuple[Task, Path]:
    """`train --script PATH -- ARGS`: the short form of a task with only a script (its folder is the workdir)."""
    path = Path(script).expanduser()
    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.py"))[:5]
        hint = f" (there: {', '.join(found)})" if found else ""
        raise ConfigError(f"--script {script} is a folder; give the script file in it, e.g. {script.rstrip('/')}/train.py{hint}")
    if not path.is_file():
        raise ConfigError(f"--script {script}: no such file")
    task = Task(name=default_name(path.stem, "script"), nodes=max(1, nodes), nproc_per_node=nproc_per_node,
                script=path.name, args=args, envs=envs)
    return task, path.resolve().parent
