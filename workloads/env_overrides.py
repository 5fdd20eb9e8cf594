"""The names a run's environment may use, and `--env` words: light enough for every `train` (no pydantic)."""

from __future__ import annotations

import os
import re

from workloads.errors import ConfigError

ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Variables the launcher sets for every process; a task may not redefine them (they describe the cluster).
RESERVED_ENVS = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "NNODES", "NPROC_PER_NODE", "RANK", "WORLD_SIZE",
                 "LOCAL_RANK", "GPUFORGE_RUN_ID", "GPUFORGE_STORAGE", "GPUFORGE_RUN_DIR", "GPUFORGE_NODE",
                 "GPUFORGE_OUTPUTS")


def parse_env_overrides(items: list[str]) -> dict[str, str]:
    """`--env K=V` words (repeatable); `--env K` takes K's value from this machine's environment."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not ENV_NAME.match(key):
            raise ConfigError(f"--env {item!r}: expected NAME=VALUE (NAME letters, digits and '_')")
        if key in RESERVED_ENVS:
            raise ConfigError(f"--env {key}: set by gpuforge for every process; pick another name")
        if not sep:
            if key not in os.environ:
                raise ConfigError(f"--env {key}: no value given and ${key} is not set here")
            value = os.environ[key]
        out[key] = value
    return out
