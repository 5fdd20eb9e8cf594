"""Node side of a task's `setup:`: run a shell script in the node's Python environment.

    python -m workloads.task_exec --env-file F --cwd DIR -- bash -e -c 'pip install -r requirements.txt'

The env file (0600; the task's envs and secrets) is read and deleted before the command starts,
so no value is on a command line; the node venv's bin/ comes first on PATH (`pip`, `python`).
"""

from __future__ import annotations

import argparse
import os
import sys

from workloads.secretfile import take_secrets


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workloads.task_exec")
    parser.add_argument("--env-file", default="")
    parser.add_argument("--cwd", required=True)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    env = {**os.environ, **take_secrets(args.env_file)}
    venv = os.path.dirname(os.path.dirname(os.path.abspath(sys.executable)))
    env["PATH"] = f"{venv}/bin:{env.get('PATH') or '/usr/local/bin:/usr/bin:/bin'}"
    env["VIRTUAL_ENV"] = venv
    env["PYTHONUNBUFFERED"] = "1"
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    os.chdir(args.cwd)
    sys.stdout.flush()
    os.execvpe(command[0], command, env)
    return 127


if __name__ == "__main__":
    sys.exit(main())
