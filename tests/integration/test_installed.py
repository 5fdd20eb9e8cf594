"""gpuforge installed from its wheel (not editable, no checkout anywhere on the path) works from any folder:
`gpuforge --list` carries every task, and `gpuforge up` + `gpuforge launch task.yaml --down` run a task
on a 2-node local cluster, shipping the installed code to the nodes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

from infra.local import our_processes
from provision.wheel import build_wheel

SKIP = ("__editable__", "gpuforge", "_gpuforge", "__pycache__")


def make_venv(tmp_path: Path) -> Path:
    """A fresh venv with gpuforge installed from its wheel; its dependencies are linked from the dev venv
    (the same files pip would install, without downloading them again)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not entry.name.startswith(SKIP) and entry.suffix != ".pth":
            (site / entry.name).symlink_to(entry)
    wheel = build_wheel(tmp_path / "wheel-cache")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--quiet",
                    "--no-deps", "--no-index", "--disable-pip-version-check", str(wheel)], check=True)
    return venv


def test_the_console_command_from_a_wheel_runs_a_task_from_any_folder(tmp_path):
    venv = make_venv(tmp_path)
    gpuforge = str(venv / "bin" / "gpuforge")
    project = tmp_path / "somewhere" / "proj"
    project.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPUFORGE_", "PYTHONPATH", "VIRTUAL_ENV"))}
    env["GPUFORGE_HOME"] = str(tmp_path / "home")

    def run(*args, timeout=300):
        return subprocess.run([gpuforge, *args], cwd=project, env=env, capture_output=True, text=True, timeout=timeout)

    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import provision, workloads; print(provision.__file__)"],
                           cwd=project, env=env, capture_output=True, text=True)
    assert where.stdout.startswith(str(venv)), where.stdout + where.stderr
    listed = run("--list")
    for name in ("up", "setup", "launch", "train", "status", "logs", "cancel", "fetch", "exec", "down", "doctor"):
        assert f"  {name}" in listed.stdout, listed.stdout
    up = run("up", "--name", "wheel", "--nodes", "2")
    assert up.returncode == 0, up.stdout + up.stderr
    (project / "hello.py").write_text("import json, os\nos.makedirs('out', exist_ok=True)\n"
                                      "json.dump({'rank': os.environ['NODE_RANK']}, open('out/r.json', 'w'))\n")
    (project / "task.yaml").write_text("name: hello\nnodes: 2\nrun: python hello.py\noutputs: out\n")
    launched = run("launch", "task.yaml", "--run-id", "w1", "--down")
    assert launched.returncode == 0, launched.stdout + launched.stderr
    assert "fetched" in launched.stdout and "tearing down cluster wheel" in launched.stdout
    assert json.loads((project / "runs" / "w1" / "outputs" / "r.json").read_text()) == {"rank": "0"}
    assert json.loads((project / "runs" / "w1" / "outputs" / "node-1" / "r.json").read_text()) == {"rank": "1"}
    state = tmp_path / "home" / "clusters" / "wheel"
    assert not our_processes(state) and not (state / "cluster.json").exists()
