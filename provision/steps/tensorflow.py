"""TensorFlow on the nodes that ask for it: the build matching the node's CUDA, then a verify.

A node asks with `fab setup --tensorflow` (remembered in the cluster record as `frameworks`, so later
setups keep it), per node with the cluster record's `node_frameworks` (`{"node-1": ["tensorflow"]}`),
or for one setup through `setup_cluster(..., extra_options={"frameworks": ["tensorflow"]})` (what a task
that needs TensorFlow passes). Every other node skips both steps and gets no TensorFlow.

    tensorflow         pip install of provision/tensorflow.toml's pin into the node's own venv:
                       tensorflow-cpu on CPU nodes, tensorflow[and-cuda] beside the node's CUDA stack;
                       constrained by the node lock (TensorFlow never moves a locked package: a conflict
                       fails the step instead of breaking torch or the workload), from the setup's
                       package index (provision/pip_index.py)
    tensorflow-verify  imports it from the node's venv and lists its devices (a GPU node must show its GPUs)
"""

from __future__ import annotations

import functools
import json
import shlex
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from provision.errors import MatrixError, StepError
from provision.steps.base import Cmd, Step, StepContext, fingerprint_of, run_cmd

TF_MATRIX_FILE = Path(__file__).resolve().parents[1] / "tensorflow.toml"
FRAMEWORK = "tensorflow"
PIP = "-m pip install --quiet --disable-pip-version-check --no-warn-script-location"
DISTS = {"tensorflow-cpu": "tensorflow_cpu", "tensorflow[and-cuda]": "tensorflow"}  # package -> dist-info name


@dataclass(frozen=True)
class TfBuild:
    package: str
    version: str
    cuda_libraries: str = ""
    min_compute_capability: str = ""

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def dist(self) -> str:
        return DISTS[self.package]


@functools.cache
def load_tf_matrix(path: Path = TF_MATRIX_FILE) -> dict[str, TfBuild]:
    """'cpu' and each node CUDA ('13.0', '12.6') -> the TensorFlow build that goes with it."""
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise MatrixError(f"cannot read the TensorFlow matrix {path}: {exc}") from exc
    rows = {"cpu": data.get("cpu", {}), **data.get("cuda", {})}
    builds = {}
    for key, row in rows.items():
        if row.get("package") not in DISTS:
            raise MatrixError(f"{path.name} [{key}]: package must be one of {', '.join(DISTS)}; got {row.get('package')!r}")
        try:
            builds[key] = TfBuild(**{k: str(v) for k, v in row.items()})
        except TypeError as exc:
            raise MatrixError(f"{path.name} [{key}]: {exc}") from exc
    return builds


def node_cuda(ctx: StepContext) -> str:
    """The CUDA the node's torch build runs (the version matrix's choice for this GPU and driver)."""
    from provision.drivers import torch_requirement
    from provision.versions import cuda_of_build

    facts = ctx.facts
    _, index = torch_requirement(facts.os_name, True, facts.gpu_model, facts.existing_driver)
    return cuda_of_build(index.rstrip("/").rsplit("/", 1)[-1])


def tf_build(ctx: StepContext) -> TfBuild:
    """CPU build without a GPU; on GPU nodes the row of the node's CUDA, refused on GPUs it has no kernels for."""
    matrix = load_tf_matrix()
    if ctx.facts is None or not ctx.facts.has_gpu:
        return matrix["cpu"]
    cuda = node_cuda(ctx)
    if cuda not in matrix:
        raise MatrixError(f"no TensorFlow build for CUDA {cuda} in {TF_MATRIX_FILE.name}; known: "
                          f"{', '.join(k for k in matrix if k != 'cpu')}")
    build = matrix[cuda]
    from provision.versions import gpu_generation, parse_version

    generation = gpu_generation(ctx.facts.gpu_model)
    if parse_version(generation.compute_capability) < parse_version(build.min_compute_capability):
        raise MatrixError(f"TensorFlow {build.version} has no kernels for {ctx.facts.gpu_model} ({generation.name}, "
                          f"compute capability {generation.compute_capability} < {build.min_compute_capability})")
    return build


def remember_frameworks(cluster_dir: Path, add: list[str], save: bool = True) -> list[str]:
    """The frameworks a cluster's setup installs: those asked for before (`frameworks.json` in the cluster's
    folder) and `add`; saved, so a later plain `fab setup` keeps them."""
    path = Path(cluster_dir) / "frameworks.json"
    known = json.loads(path.read_text()) if path.exists() else []
    wanted = sorted(set(known) | set(add))
    if save and wanted != known:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(wanted) + "\n")
    return wanted


def wants_tensorflow(ctx: StepContext) -> bool:
    extra = ctx.cluster.extra or {}
    asked = [*ctx.options.get("frameworks", ()), *extra.get("frameworks", ()),
             *extra.get("node_frameworks", {}).get(ctx.node.name, ())]
    return FRAMEWORK in asked


def dist_glob(ctx: StepContext, dist: str, version: str = "*") -> str:
    return f"{shlex.quote(ctx.venv)}/lib/python3*/site-packages/{dist}-{version}.dist-info"


class TensorflowStep(Step):
    name = "tensorflow"
    description = "TensorFlow (the build for the node's CUDA, or the CPU build) in the node venv, when asked for"

    def skip_reason(self, ctx: StepContext) -> str | None:
        if not wants_tensorflow(ctx):
            return "not asked for (gpuforge setup --tensorflow)"
        return None

    def plan(self, ctx: StepContext) -> list[Cmd]:
        from provision.pip_index import tool_index_args
        from provision.steps.core import PythonEnvStep

        build = tf_build(ctx)
        py = shlex.quote(ctx.python)
        other = [p for p in DISTS if p != build.package][0]
        # quick local nodes borrow the controller's packages and have no lock file of their own
        lock = "" if ctx.shares_controller else f" -c {shlex.quote(PythonEnvStep().requirements_file(ctx))}"
        index = tool_index_args(ctx.options.get("pip_index", ""))
        cmds = [
            # switching CPU <-> GPU build: the two distributions share the `tensorflow` package folder
            Cmd(f"if ls -d {dist_glob(ctx, DISTS[other])} >/dev/null 2>&1; then "
                f"{py} -m pip uninstall --yes --quiet {other.split('[')[0]}; fi", desc=f"no {other}"),
            Cmd(f"{py} {PIP}{index}{lock} {shlex.quote(build.requirement)}", desc=build.requirement, timeout=1800),
        ]
        return cmds

    def check(self, conn: Any, ctx: StepContext) -> bool:
        """The pinned distribution is in the node's own venv (not borrowed from elsewhere)."""
        build = tf_build(ctx)
        return conn.run(f"ls -d {dist_glob(ctx, build.dist, build.version)}", hide=True, warn=True).ok


VERIFY_TF = (
    "import json, tensorflow as tf; "
    "print(json.dumps({'tensorflow': tf.__version__, 'file': tf.__file__, 'cuda_build': tf.test.is_built_with_cuda(), "
    "'devices': [d.device_type + ':' + d.name.rsplit(':', 1)[-1] for d in tf.config.list_physical_devices()]}))"
)


class TensorflowVerifyStep(Step):
    name = "tensorflow-verify"
    description = "the node venv imports TensorFlow from its own site-packages and lists its devices"

    def skip_reason(self, ctx: StepContext) -> str | None:
        return TensorflowStep().skip_reason(ctx)

    def plan(self, ctx: StepContext) -> list[Cmd]:
        env = "TF_CPP_MIN_LOG_LEVEL=2"  # TensorFlow's start-up chatter goes to stderr; the JSON line is ours
        return [Cmd(f"cd {shlex.quote(ctx.workdir)} && {env} {shlex.quote(ctx.python)} -c {shlex.quote(VERIFY_TF)}",
                    desc="import and list devices", timeout=300)]

    def fingerprint(self, ctx: StepContext) -> str:
        return fingerprint_of(self.name, TensorflowStep().fingerprint(ctx), VERIFY_TF)

    def apply(self, conn: Any, ctx: StepContext) -> None:
        result = run_cmd(conn, ctx.node.name, self.name, self.plan(ctx)[0])
        report = json.loads(result.stdout.strip().splitlines()[-1])
        command = VERIFY_TF
        if not report["file"].startswith(ctx.venv.rstrip("/") + "/"):
            raise StepError(ctx.node.name, self.name, command, 0,
                            f"TensorFlow is imported from {report['file']}, not from the node's venv {ctx.venv}")
        gpus = [d for d in report["devices"] if d.startswith("GPU:")]
        if ctx.facts is not None and ctx.facts.has_gpu and not gpus:
            raise StepError(ctx.node.name, self.name, command, 0,
                            f"TensorFlow {report['tensorflow']} sees no GPU although the node has "
                            f"{ctx.facts.gpu_count} (devices: {', '.join(report['devices'])})")
        ctx.options.setdefault("tensorflow_reports", {})[ctx.node.name] = report


TENSORFLOW_STEPS: list[Step] = [TensorflowStep(), TensorflowVerifyStep()]
