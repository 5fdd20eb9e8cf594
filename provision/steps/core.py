"""The steps every node gets, GPU or not: base directories, Python env, our code, verify."""

from __future__ import annotations

import json
import shlex
import sys
import sysconfig
from pathlib import PurePosixPath
from typing import Any

from provision.drivers import torch_requirement
from provision.node_lock import LOCK_NAME, lock_digest, lock_requirements
from provision.pip_index import PIP_RETRIES, PIP_TIMEOUT_S, pip_index_args, probe_script
from provision.steps.apt import apt_install, wait_for_cloud_init
from provision.steps.base import Cmd, Step, StepContext, fingerprint_of, run_cmd, run_plan

SOURCE_STAMP = "gpuforge-source.txt"  # in the venv: the source fingerprint of the installed wheel
LOCK_STAMP = "gpuforge-lock.txt"  # in the venv: the digest of the node lock it was installed from


def q(path: str) -> str:
    return shlex.quote(path)


class BaseStep(Step):
    name = "base"
    description = "working directories; python3 with venv support"

    def plan(self, ctx: StepContext) -> list[Cmd]:
        w = q(ctx.workdir)
        dirs = f"{w}/.gpuforge/markers {w}/runs {w}/wheels"
        if ctx.shares_controller:
            return [Cmd(f"mkdir -p {dirs}", desc="node directories")]
        first_boot = [wait_for_cloud_init()] if ctx.facts is not None and ctx.facts.cloud_init else []
        return [
            *first_boot,
            Cmd(f'mkdir -p {w} && chown "${{SUDO_UID:-$(id -u)}}:${{SUDO_GID:-$(id -g)}}" {w}', sudo=True,
                desc="work directory owned by the login user"),
            Cmd(f"mkdir -p {dirs}", desc="node directories"),
            Cmd("python3 -c 'import ensurepip, venv' 2>/dev/null || { "
                + apt_install("python3-venv", "python3-pip", desc="").run + "; }",
                sudo=True, desc="python3 with venv", timeout=600, env=apt_install(desc="").env),
        ]

    def probe(self, ctx: StepContext) -> str:
        return f"test -d {q(ctx.workdir)}/.gpuforge/markers"


class PythonEnvStep(Step):
    name = "python_env"
    description = "a venv in the node directory: torch at the matrix's exact build and the node lock"

    def expected_torch(self, ctx: StepContext) -> tuple[str, str]:
        """(`torch==2.13.0+cpu`, its wheel index); quick local nodes take the controller's torch."""
        if ctx.shares_controller:
            return ctx.options["controller_torch"], ""
        facts = ctx.facts
        return torch_requirement(facts.os_name, facts.has_gpu, facts.gpu_model, facts.existing_driver)

    def requirements_file(self, ctx: StepContext) -> str:
        return f"{ctx.workdir}/{LOCK_NAME}"

    def plan(self, ctx: StepContext) -> list[Cmd]:
        venv, py = q(ctx.venv), q(ctx.python)
        if ctx.shares_controller:
            site = PurePosixPath(ctx.venv) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
            # Local nodes share the controller's packages (torch is not installed twice): a .pth line,
            # after the venv's own site-packages, so what a task's setup pip-installs there wins.
            return [
                Cmd(f"{q(ctx.options['controller_python'])} -m venv --without-pip {venv}", desc="venv"),
                Cmd(f"echo {q(ctx.options['controller_site'])} > {q(str(site / 'gpuforge-controller.pth'))}",
                    desc="controller site-packages on the node's path"),
                Cmd(local_pip_command(ctx.venv), desc="pip and pip3 that install into the node venv"),
            ]
        torch_spec, torch_index = self.expected_torch(ctx)
        index_args, probe_url = pip_index_args(ctx.options.get("pip_index", ""), torch_index)
        requirements = q(self.requirements_file(ctx))
        body = " ".join(q(line) for line in lock_requirements())
        pip = (f"{py} -m pip install --quiet --disable-pip-version-check --retries {PIP_RETRIES} "
               f"--timeout {PIP_TIMEOUT_S}{' ' + index_args if index_args else ''}")
        return [
            Cmd(f"python3 -m venv {venv}", desc="venv"),
            Cmd(f'printf "%s\\n" {body} > {requirements}', desc="the node lock (provision/data/node-requirements.txt)"),
            *([Cmd(probe_script(probe_url), desc="the package index answers (else fail now, not after pip's retries)",
                   timeout=60)] if probe_url else []),
            Cmd(f"{pip} -r {requirements} {q(torch_spec)}", desc=f"{torch_spec} and the locked packages", timeout=1800),
            Cmd(f"echo {lock_digest()} > {q(ctx.venv + '/' + LOCK_STAMP)}", desc="record the lock it was installed from"),
        ]

    def fingerprint(self, ctx: StepContext) -> str:
        if ctx.shares_controller:
            return fingerprint_of(self.name, [c.run for c in self.plan(ctx)], self.expected_torch(ctx))
        return fingerprint_of(self.name, self.expected_torch(ctx)[0], lock_digest())

    def probe(self, ctx: StepContext) -> str:
        """The venv's python, the stamp of the lock it was installed from and the installed torch's folder name
        (no interpreter start, which would cost ~60 ms per node)."""
        if ctx.shares_controller:
            return (f"test -x {q(ctx.python)} && test -x {q(ctx.venv)}/bin/pip && "
                    f"cat {q(ctx.venv)}/lib/python3*/site-packages/gpuforge-controller.pth")
        return (f"test -x {q(ctx.python)} && cat {q(ctx.venv + '/' + LOCK_STAMP)} && "
                f"ls -d {q(ctx.venv)}/lib/python3*/site-packages/torch-*.dist-info")

    def judge(self, ctx: StepContext, result: Any) -> bool:
        """The venv's python runs, torch is the expected build (local label included: `2.13.0+cu126` is not
        `2.13.0+cu130`), and the venv was installed from this lock."""
        if ctx.shares_controller:
            return result.ok and result.stdout.strip() == ctx.options["controller_site"]
        lines = result.stdout.split() if result.ok else []
        if len(lines) != 2 or lines[0] != lock_digest():
            return False
        found = lines[1].rsplit("/torch-", 1)[-1].removesuffix(".dist-info")
        return found == self.expected_torch(ctx)[0].split("==", 1)[1]


# The borrowed pip (the controller's, on the node's path) run by the node venv's python installs into
# the node venv: pip installs into sys.prefix, and leaves packages outside it alone.
PIP_SCRIPT = "#!{python}\nimport sys\nfrom pip._internal.cli.main import main\nsys.exit(main())\n"


def local_pip_command(venv: str) -> str:
    script = PIP_SCRIPT.format(python=f"{venv}/bin/python")
    return " && ".join(f"printf %s {q(script)} > {q(venv)}/bin/{name} && chmod 755 {q(venv)}/bin/{name}"
                       for name in ("pip", "pip3"))


class WorkloadStep(Step):
    name = "workload"
    description = "our code, as a wheel built on the controller, installed into the node venv"

    def remote_wheel(self, ctx: StepContext) -> str:
        return f"{ctx.workdir}/wheels/{ctx.options['wheel_name']}"

    def plan(self, ctx: StepContext) -> list[Cmd]:
        stamp = q(f"{ctx.venv}/{SOURCE_STAMP}")
        return [
            Cmd(f"# sftp put {ctx.options['wheel_name']} {self.remote_wheel(ctx)}", desc="upload the wheel"),
            # --no-compile: modules compile on first import; byte-compiling all of them here doubles pip's time
            Cmd(f"{q(ctx.python)} -m pip install --quiet --no-deps --force-reinstall --no-index --no-compile "
                f"--disable-pip-version-check {q(self.remote_wheel(ctx))}",
                desc="install", timeout=600),
            Cmd(f"echo {ctx.options['source_fingerprint']} > {stamp}", desc="record the source fingerprint"),
        ]

    def fingerprint(self, ctx: StepContext) -> str:
        return fingerprint_of(self.name, ctx.options["source_fingerprint"])

    def probe(self, ctx: StepContext) -> str:
        return f"cat {q(ctx.venv + '/' + SOURCE_STAMP)}"

    def judge(self, ctx: StepContext, result: Any) -> bool:
        return result.ok and result.stdout.strip() == ctx.options["source_fingerprint"]

    def apply(self, conn: Any, ctx: StepContext) -> None:
        wheel = ctx.options["wheel_path"]()  # built on first need, once per setup
        remote = self.remote_wheel(ctx)
        run_cmd(conn, ctx.node.name, self.name, Cmd(f"mkdir -p {q(str(PurePosixPath(remote).parent))}"))
        conn.put(str(wheel), remote)
        run_plan(conn, ctx, self.name, self.plan(ctx)[1:])


VERIFY_SCRIPT = (
    "import json, platform, torch, workloads.trainer, workloads.supervise; "
    "print(json.dumps({'python': platform.python_version(), 'torch': torch.__version__, "
    "'cuda': torch.cuda.is_available(), 'gpus': torch.cuda.device_count()}))"
)


class VerifyStep(Step):
    name = "verify"
    description = "the node venv imports torch and our trainer"

    def plan(self, ctx: StepContext) -> list[Cmd]:
        return [Cmd(f"cd {q(ctx.workdir)} && {q(ctx.python)} -c {q(VERIFY_SCRIPT)}", desc="import check", timeout=300)]

    def fingerprint(self, ctx: StepContext) -> str:
        return fingerprint_of(self.name, ctx.options["source_fingerprint"], PythonEnvStep().fingerprint(ctx))

    def apply(self, conn: Any, ctx: StepContext) -> None:
        result = run_cmd(conn, ctx.node.name, self.name, self.plan(ctx)[0])
        report = json.loads(result.stdout.strip().splitlines()[-1])
        if ctx.facts is not None and ctx.facts.has_gpu and not report["cuda"]:
            from provision.errors import StepError

            raise StepError(ctx.node.name, self.name, VERIFY_SCRIPT, 0,
                            f"torch {report['torch']} sees no GPU although the node has {ctx.facts.gpu_count}")
        ctx.options.setdefault("verify_reports", {})[ctx.node.name] = report


def controller_options() -> dict[str, Any]:
    """What local nodes reuse from the controller's Python."""
    import importlib.metadata

    return {
        "controller_python": sys.executable,
        "controller_site": sysconfig.get_paths()["purelib"],
        "controller_torch": f"torch=={importlib.metadata.version('torch')}",
    }
