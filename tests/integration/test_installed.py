"""gpuforge installed from its wheel (not editable, no checkout anywhere on the path) works from any folder:
`gpuforge --list` carries every task, and `gpuforge up` + `gpuforge launch task.yaml --down` run a task
on a 2-node local cluster, shipping the installed code to the nodes; the cloud path finds its Pulumi project
(shipped in the package) and, with no Pulumi CLI, stops at one line saying how to install it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from infra.local import destroy_local_cluster, our_processes
from provision.wheel import build_wheel

SKIP = ("__editable__", "gpuforge", "_gpuforge", "__pycache__")
REPO = Path(__file__).resolve().parents[2]


def make_venv(tmp_path: Path, leave_out: tuple[str, ...] = ()) -> Path:
    """A fresh venv with gpuforge installed from its wheel; its dependencies are linked from the dev venv
    (the same files pip would install, without downloading them again), but for the packages in `leave_out`."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    link_packages(venv, lambda name: not name.startswith(SKIP) and not left_out(name, leave_out))
    wheel = build_wheel(tmp_path / "wheel-cache")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--quiet",
                    "--no-deps", "--no-index", "--disable-pip-version-check", str(wheel)], check=True)
    return venv


def left_out(name: str, packages: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(f"{p}-") for p in packages)  # the package and its .dist-info


def link_packages(venv: Path, wanted) -> None:
    """Link the dev venv's site-packages entries whose name `wanted` takes into `venv`'s."""
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if wanted(entry.name) and entry.suffix != ".pth" and not (site / entry.name).exists():
            (site / entry.name).symlink_to(entry)


def test_the_console_command_from_a_wheel_runs_a_task_from_any_folder(tmp_path):
    venv = make_venv(tmp_path)
    gpuforge = str(venv / "bin" / "gpuforge")
    project = tmp_path / "somewhere" / "proj"
    project.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPUFORGE_", "PYTHONPATH", "VIRTUAL_ENV"))}
    env["GPUFORGE_HOME"] = str(tmp_path / "home")

    def run(*args, timeout=300):
        return subprocess.run([gpuforge, *args], cwd=project, env=env, capture_output=True, text=True, timeout=timeout)

    state = tmp_path / "home" / "clusters" / "wheel"
    try:
        where = subprocess.run([str(venv / "bin" / "python"), "-c",
                                "import provision, workloads; print(provision.__file__)"],
                               cwd=project, env=env, capture_output=True, text=True)
        assert where.stdout.startswith(str(venv)), where.stdout + where.stderr
        listed = run("--list")
        for name in ("up", "setup", "launch", "train", "status", "logs", "cancel", "fetch", "exec", "down", "doctor"):
            assert f"  {name}" in listed.stdout, listed.stdout
        up = run("up", "--name", "wheel", "--nodes", "2")
        assert up.returncode == 0, up.stdout + up.stderr
        # the hints name commands that work here; `fab` needs the repo's fabfile (no collection named 'fabfile')
        assert "Next: `gpuforge setup`" in up.stdout, up.stdout
        no_runs = run("status")
        said = no_runs.stdout + no_runs.stderr
        assert "start one with `gpuforge train --job NAME`" in said, said
        (project / "hello.py").write_text("import json, os\nos.makedirs('out', exist_ok=True)\n"
                                          "json.dump({'rank': os.environ['NODE_RANK']}, open('out/r.json', 'w'))\n")
        (project / "task.yaml").write_text("name: hello\nnodes: 2\nrun: python hello.py\noutputs: out\n")
        launched = run("launch", "task.yaml", "--run-id", "w1", "--down")
        assert launched.returncode == 0, launched.stdout + launched.stderr
        assert "fetched" in launched.stdout and "tearing down cluster wheel" in launched.stdout
        assert json.loads((project / "runs" / "w1" / "outputs" / "r.json").read_text()) == {"rank": "0"}
        assert json.loads((project / "runs" / "w1" / "outputs" / "node-1" / "r.json").read_text()) == {"rank": "1"}
        assert not our_processes(state) and not (state / "cluster.json").exists()
    finally:  # a failure before `--down` must not leave the nodes' sshd processes running
        destroy_local_cluster(state)


def test_the_cloud_path_from_a_wheel_uses_the_packaged_pulumi_project_from_any_folder(tmp_path):
    """Regression: the Automation API ran in the folder above the installed `infra` package (site-packages), looking
    for the repo's Pulumi.yaml, so from a wheel install every stack call failed with "no Pulumi.yaml project file
    found"; and with no Pulumi CLI, `up --cloud aws` must still stop at one line before anything is written."""
    extra = ("boto3", "pulumi_aws")  # of the `cloud` extra, which a plain `pip install gpuforge` leaves out
    venv = make_venv(tmp_path, leave_out=extra)
    project = tmp_path / "somewhere" / "proj"
    project.mkdir(parents=True)
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPUFORGE_", "PYTHONPATH", "VIRTUAL_ENV", "PULUMI_"))}
    env.update(GPUFORGE_HOME=str(home), PATH=f"{venv / 'bin'}:/usr/bin:/bin")

    def run(*args):
        return subprocess.run([str(venv / "bin" / "gpuforge"), *args], cwd=project, env=env, capture_output=True,
                              text=True, timeout=120)

    up = ("up", "--cloud", "aws", "--name", "w", "--instance-type", "g5.xlarge", "--region", "us-east-1")
    for argv, missing in ((up, "pulumi_aws, boto3"), (("sweep", "--cloud", "aws"), "boto3")):
        no_extra = run(*argv)
        assert no_extra.returncode == 1 and "Traceback" not in no_extra.stderr, no_extra.stdout + no_extra.stderr
        assert f"aws clusters need {missing}, which this install lacks; install them with: pip install " \
               "'gpuforge[cloud]'" in no_extra.stderr, no_extra.stderr
    assert not home.exists()

    link_packages(venv, lambda name: left_out(name, extra))  # the extra installed
    no_cli = run(*up)
    assert no_cli.returncode != 0 and "Traceback" not in no_cli.stderr, no_cli.stdout + no_cli.stderr
    assert "the pulumi CLI is not on PATH" in no_cli.stdout + no_cli.stderr and "get.pulumi.com" in no_cli.stderr
    assert not (home / "clusters" / "w").exists()

    bin_dir = tmp_path / "bin"  # the recording stand-in for the CLI; it fails as the real one does without a project
    bin_dir.mkdir()
    shutil.copy(REPO / "tests" / "fakes" / "pulumi_cli.py", bin_dir / "pulumi")
    (bin_dir / "pulumi").chmod(0o755)
    log = tmp_path / "pulumi-calls.jsonl"
    env.update(PATH=f"{bin_dir}:{env['PATH']}", FAKE_PULUMI_LOG=str(log),
               FAKE_PULUMI_OUTPUTS=str(REPO / "tests" / "unit" / "fixtures" / "stack_output_aws.json"))
    (home / "clusters" / "w").mkdir(parents=True)  # what `fab up` of cluster w left: its stack's backend
    used = run("use", "pulumi:w")

    assert used.returncode == 0, used.stdout + used.stderr
    assert "selected cluster llm-a100" in used.stdout
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    selects = [c for c in calls if "select" in c["argv"]]
    assert selects and all(c["project"] == "gpuforge" for c in selects), calls
    assert all(not c["cwd"].startswith(str(REPO)) and not c["cwd"].startswith(str(venv)) for c in selects), calls
    assert all(c["backend"] == f"file://{(home / 'clusters' / 'w').resolve()}/pulumi" for c in selects), calls
