"""`fab` tasks for gpuforge (a thin shim over provision/tasks.py): run `fab --list`."""

from provision.cli import adopt_fab_argv
from provision.tasks import bake, cancel, clusters, doctor, down, exec_, fetch, logs, setup, status, train, up, use

adopt_fab_argv()

__all__ = ["up", "down", "use", "clusters", "setup", "train", "status", "logs", "cancel", "fetch", "exec_", "bake", "doctor"]
