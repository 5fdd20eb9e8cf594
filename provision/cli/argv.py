"""What makes `fab` and `gpuforge` behave like a product CLI: argv conveniences, one-line errors, rich output.

- `fab train --job NAME key=value ...`: bare key=value words become the task's overrides.
- `fab exec -- CMD` and `fab train --script train.py -- ARGS`: the words after `--` go to the task
  (Fabric would otherwise try to run them as a shell command on `-H` hosts).
- Tasks chain as Invoke's do (`fab setup train --job J epochs=1`, `fab up exec -- hostname`).
- A number flag given a word (`--tail abc`) is one clear line, not Invoke's traceback.
All of it is applied by `adopt_argv()`: the repo's fabfile.py calls it (through `adopt_fab_argv()`) while
Fabric loads it, and the `gpuforge` program (provision/cli/main.py) before it parses its tasks.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from typing import Any, Iterator

from invoke.exceptions import Exit

OVERRIDE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*=")
REMAINDER: list[str] = []
OVERRIDES: list[str] = []
OVERRIDE_TASKS = ("train",)
REMAINDER_TASKS = ("exec", "train", "launch", "ssh")
# A bare word after these tasks is their --run (or, for ssh, --node): `fab fetch RUN`, `fab ssh node-1`.
WORD_FLAGS = {"fetch": "--run", "status": "--run", "logs": "--run", "cancel": "--run", "tensorboard": "--run",
              "serve": "--run", "ssh": "--node"}
RUN_TASKS = tuple(WORD_FLAGS)
TASK_NAMES = {"up", "down", "sweep", "use", "clusters", "setup", "train", "launch", "status", "logs", "cancel", "fetch",
              "exec", "bake", "doctor", "ssh", "ssh-config", "forward", "jupyter", "tensorboard", "serve"}

# flags that take a value: a word right after one of them is that flag's value, never a task or an override
VALUE_FLAGS = {"--job", "-j", "--script", "-s", "--nodes", "-n", "--run-id", "-r", "--cluster", "-c",
               "--nproc-per-node", "--start-timeout", "--set", "--env", "-e", "--storage", "--run", "--node", "--tail",
               "--dest", "-d", "-t", "--name", "--cloud", "--instance-type", "--accelerator", "--region", "--zone",
               "--disk-gb", "--os", "--ssh-cidr", "--project", "--hosts", "--keep", "--base-image", "--subnet-id",
               "--security-group-id", "--max-ship-mb", "-v", "-m", "--image", "--network", "--subnetwork",
               "--port", "-p", "--kind", "-k", "--max-batch", "--local-port", "-l", "--autostop"}


def adopt_fab_argv(collection: Any = None) -> None:
    """Rewrite the running `fab` program's unparsed task words (see the module docstring)."""
    main = sys.modules.get("fabric.main")
    program = getattr(main, "program", None)
    core = getattr(program, "core", None)
    if core is not None:
        try:
            adopt_argv(core, sys.argv[1:], collection)
        except Exit as exc:  # raised while Fabric imports the fabfile: say it the same way, and stop
            print(exc.message, file=sys.stderr)
            sys.exit(exc.code)


def segments(unparsed: list[str], names: set[str]) -> list[tuple[int, int]]:
    """(start, end) of each task's words in `unparsed`: a task name starts one unless it is a flag's value."""
    starts = [i for i, word in enumerate(unparsed)
              if word in names and (i == 0 or unparsed[i - 1] not in VALUE_FLAGS)]
    return [(s, e) for s, e in zip(starts, [*starts[1:], len(unparsed)])]


def help_first(argv: list[str], names: set[str]) -> list[str]:
    """`gpuforge TASK ... --help` as `gpuforge --help TASK`: Invoke would fill a required positional argument with
    the word `--help` (`sweep --help` ran the sweep with cloud '--help'), while `--help TASK` always prints the help."""
    words = argv[1:]
    words = words[: words.index("--")] if "--" in words else words
    spans = segments(words, names)
    if spans and any(w in ("--help", "-h") for w in words[spans[0][0] + 1 : spans[0][1]]):
        return [argv[0], "--help", words[spans[0][0]]]
    return argv


def adopt_argv(core, argv: list[str], collection: Any = None) -> None:
    """The same rewrite for any Invoke program (`fab`, `gpuforge`): `core` is its parsed core context."""
    unparsed = core.unparsed
    names = set(collection.task_names) if collection is not None else TASK_NAMES
    spans = segments(unparsed, names)
    if "--" in argv and any(unparsed[s] in REMAINDER_TASKS for s, _ in spans):
        REMAINDER[:] = argv[argv.index("--") + 1 :]
        core.remainder = ""  # handled by our task, not by Fabric's `fab -H host -- cmd` runner
    kept: list[str] = []
    for start, end in spans or [(0, len(unparsed))]:
        words = unparsed[start:end]
        if words and words[0] in RUN_TASKS:
            adopt_run_word(words, names, WORD_FLAGS[words[0]])
        if words and words[0] in OVERRIDE_TASKS:
            words = take_overrides(words)
        kept.extend(words)
    if spans and spans[0][0] > 0:
        kept = unparsed[: spans[0][0]] + kept
    unparsed[:] = kept
    if collection is not None:
        check_numbers(unparsed, collection, names)


def take_overrides(words: list[str]) -> list[str]:
    kept = [words[0]]
    for word in words[1:]:
        if OVERRIDE.match(word) and kept[-1] not in VALUE_FLAGS:
            OVERRIDES.append(word)
        else:
            kept.append(word)
    return kept


def adopt_run_word(unparsed: list[str], names: set[str] = TASK_NAMES, flag: str = "--run") -> None:
    """`fab fetch RUN` / `fab status RUN`: a bare word after the task is its run id (`--run RUN`)."""
    for i in range(1, len(unparsed)):
        word, before = unparsed[i], unparsed[i - 1]
        if not word.startswith("-") and before not in VALUE_FLAGS and word not in names and flag not in unparsed:
            unparsed.insert(i, flag)
            return


def number_range(name: str) -> str:
    """What a number flag's valid values are, said when a word is given (as the flag's own check says it for a
    number); looked up only then (workloads.task imports pydantic)."""
    if name == "recover":
        from workloads.task import MAX_RECOVERY

        return f" of recoveries from 0 to {MAX_RECOVERY}"
    return ""


def check_numbers(unparsed: list[str], collection: Any, names: set[str]) -> None:
    """A whole-number or number flag given a word is refused here, in one line, before Invoke converts it."""
    for start, end in segments(unparsed, names):
        kinds = {}
        task = collection[unparsed[start]]
        helps = dict(task.help)  # Invoke's get_arguments() pops the help texts that `TASK --help` prints later
        arguments = task.get_arguments()
        task.help.update(helps)
        ranges = {}
        for arg in arguments:
            if arg.kind in (int, float):
                for name in arg.names:
                    flag = ("--" if len(name) > 1 else "-") + name.replace("_", "-")
                    kinds[flag] = arg.kind
                    ranges[flag] = arg.name
        words = unparsed[start + 1 : end]
        for i, word in enumerate(words):
            flag, eq, value = word.partition("=")
            if flag not in kinds:
                continue
            if not eq:
                value = words[i + 1] if i + 1 < len(words) else ""
            try:
                kinds[flag](value)
            except ValueError:
                what = "a whole number" if kinds[flag] is int else "a number"
                raise Exit(f"error: {flag} expects {what}{number_range(ranges[flag])}; got {value!r}", code=2) from None


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


def at_least(flag: str, value: float, minimum: float) -> float:
    """A number flag's lower bound (`--tail -5` is refused, not passed on)."""
    from workloads.errors import ConfigError

    if value < minimum:
        raise ConfigError(f"{flag} must be >= {minimum:g}; got {value:g}")
    return value


def type_choices(cloud: str) -> str:
    """`up --cloud C` without a type: what you would pay for is your choice; the cheapest GPU types, with prices."""
    from infra.catalog import CLOUDS, choices_message, instance_types

    if cloud not in CLOUDS:
        return f"--cloud {cloud!r}: {choices_message(cloud, ('local', *CLOUDS))}"
    rows = sorted((r for r in instance_types(cloud) if r.gpu_count and not r.accelerator_required),
                  key=lambda r: r.price_per_hour)[:4]
    shown = ", ".join(f"{r.name} ({r.gpu_count} x {r.gpu_model}, ${r.price_per_hour:.2f}/h)" for r in rows)
    return f"--instance-type is required with --cloud {cloud}; e.g. {shown} (all: infra/catalog/{cloud}.csv)"


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

    return Console(highlight=False, soft_wrap=True)
