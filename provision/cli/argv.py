"""What makes `fab` behave like a product CLI: argv conveniences, one-line errors, rich output.

- `fab train --job NAME key=value ...`: bare key=value words become the task's overrides.
- `fab exec -- CMD` and `fab train --script train.py -- ARGS`: the words after `--` go to the task
  (Fabric would otherwise try to run them as a shell command on `-H` hosts).
Both are applied by `adopt_argv()`: the repo's fabfile.py calls it (through `adopt_fab_argv()`) while
Fabric loads it, and the `gpuforge` program (provision/cli/main.py) before it parses its tasks.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from typing import Iterator

from invoke.exceptions import Exit

OVERRIDE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*=")
REMAINDER: list[str] = []
OVERRIDES: list[str] = []
OVERRIDE_TASKS = ("train",)
REMAINDER_TASKS = ("exec", "train", "ssh")
# A bare word after these tasks is their --run (or, for ssh, --node): `fab fetch RUN`, `fab ssh node-1`.
WORD_FLAGS = {"fetch": "--run", "status": "--run", "logs": "--run", "cancel": "--run", "tensorboard": "--run",
              "serve": "--run", "ssh": "--node"}
RUN_TASKS = tuple(WORD_FLAGS)
TASK_NAMES = {"up", "down", "use", "clusters", "setup", "train", "status", "logs", "cancel", "fetch", "exec", "bake", "doctor",
              "ssh", "ssh-config", "forward", "jupyter", "tensorboard", "serve"}


def adopt_fab_argv() -> None:
    """Rewrite the running `fab` program's unparsed task words (see the module docstring)."""
    main = sys.modules.get("fabric.main")
    program = getattr(main, "program", None)
    core = getattr(program, "core", None)
    if core is not None:
        adopt_argv(core, sys.argv[1:])


def adopt_argv(core, argv: list[str]) -> None:
    """The same rewrite for any Invoke program (`fab`, `gpuforge`): `core` is its parsed core context."""
    unparsed = core.unparsed
    if "--" in argv and unparsed and unparsed[0] in REMAINDER_TASKS:
        REMAINDER[:] = argv[argv.index("--") + 1 :]
        core.remainder = ""  # handled by our task, not by Fabric's `fab -H host -- cmd` runner
    if unparsed and unparsed[0] in RUN_TASKS:
        adopt_run_word(unparsed, WORD_FLAGS[unparsed[0]])
    if not unparsed or unparsed[0] not in OVERRIDE_TASKS:
        return
    kept = [unparsed[0]]
    for word in unparsed[1:]:
        if OVERRIDE.match(word) and kept[-1] not in VALUE_FLAGS:
            OVERRIDES.append(word)
        else:
            kept.append(word)
    unparsed[:] = kept


def adopt_run_word(unparsed: list[str], flag: str = "--run") -> None:
    """`fab fetch RUN` / `fab status RUN`: a bare word after the task is its run id (`--run RUN`)."""
    for i in range(1, len(unparsed)):
        word, before = unparsed[i], unparsed[i - 1]
        if not word.startswith("-") and before not in VALUE_FLAGS and word not in TASK_NAMES and flag not in unparsed:
            unparsed.insert(i, flag)
            return


# train's flags that take a value: a `key=value` right after one of them is that flag's value
VALUE_FLAGS = {"--job", "-j", "--script", "-s", "--nodes", "-n", "--run-id", "-r", "--cluster", "-c",
               "--nproc-per-node", "--start-timeout", "--set", "--env", "--storage", "--run", "--node", "--tail",
               "--dest", "-d", "-t", "--port", "-p", "--kind", "-k", "--max-batch", "--local-port", "-l"}


def remainder_command() -> str:
    """The words after `--`, joined with spaces as ssh does (`fab exec -- 'a | b'` keeps the pipe)."""
    return " ".join(REMAINDER)


def parse_nodes(raw: str) -> int:
    """--nodes: empty means every node of the cluster; otherwise a whole number >= 1."""
    from workloads.errors import ConfigError

    if raw in ("", None):
        return 0
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"--nodes must be a whole number >= 1; got {raw!r}") from None
    if value < 1:
        raise ConfigError(f"--nodes must be >= 1; got {value}")
    return value


def debug_enabled() -> bool:
    return os.environ.get("GPUFORGE_DEBUG", "") not in ("", "0")


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Our own errors become one line on stderr and exit status 1 (2 for bad input); tracebacks
    only with GPUFORGE_DEBUG=1."""
    from images.errors import BakeError
    from infra.errors import InfraError
    from provision.errors import ProvisionError
    from workloads.errors import ConfigError, WorkloadError

    try:
        yield
    except (ConfigError, ValueError) as exc:
        if debug_enabled():
            raise
        raise Exit(f"error: {exc}", code=2) from None
    except (InfraError, ProvisionError, WorkloadError, BakeError) as exc:
        if debug_enabled():
            raise
        raise Exit(f"error: {exc}", code=1) from None
    except KeyboardInterrupt:
        raise Exit("interrupted", code=130) from None


def console():
    from rich.console import Console

    return Console(highlight=False)
