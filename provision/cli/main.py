"""The `gpuforge` console command: every task of the `fab` shim, from any folder.

    gpuforge up                       # a local cluster of sshd nodes
    gpuforge setup && gpuforge train --job convnet-digits --follow
    gpuforge --list                   # every task; gpuforge --help TASK for one

It is Invoke's own way of shipping a program over a task collection (`Program(namespace=...)`):
the same task functions as the repo's fabfile.py, with the same argv conveniences (provision/cli/argv.py).
"""

from __future__ import annotations

import sys

from invoke import Collection, Program

from provision.cli import argv

MODULES = ("provision.cli.cluster_tasks", "provision.cli.run_tasks", "provision.cli.task_tasks",
           "provision.cli.dev_tasks")


def namespace() -> Collection:
    """Every task, at the root of one collection (what `fab --list` and `gpuforge --list` show)."""
    import importlib

    ns = Collection()
    for name in MODULES:
        module = importlib.import_module(name)
        for task in Collection.from_module(module).tasks.values():
            ns.add_task(task)
    return ns


class GpuforgeProgram(Program):
    """Invoke's Program, plus our argv conveniences before the task words are parsed, and our version looked up
    only for `--version` (importlib.metadata costs every other command ~30 ms)."""

    def parse_tasks(self) -> None:
        argv.adopt_argv(self.core, self.argv[1:], self.collection)
        super().parse_tasks()

    @property
    def version(self) -> str:
        return release()

    @version.setter
    def version(self, value: str) -> None:
        pass  # Program.__init__ sets it; ours is looked up when asked for


def release() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gpuforge")
    except PackageNotFoundError:
        return "source"


def program() -> GpuforgeProgram:
    return GpuforgeProgram(name="gpuforge", binary="gpuforge", namespace=namespace())


def main() -> None:
    import signal

    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `gpuforge train --list | head` ends quietly, as a shell tool does
    prog = program()
    prog.run(argv.help_first(sys.argv, set(prog.namespace.task_names)))


if __name__ == "__main__":
    main()
