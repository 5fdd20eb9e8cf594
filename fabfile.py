"""`fab` tasks for gpuforge at the repo root (a thin shim over provision/cli/): run `fab --list`.

The same tasks are the `gpuforge` console command, which works from any folder.
"""

from provision.cli.argv import adopt_fab_argv
from provision.cli.main import namespace

ns = namespace()
adopt_fab_argv(ns)
