"""Provisioning steps, in the order `fab setup` runs them on every node."""

from __future__ import annotations

from provision.steps.autostop import AutostopStep
from provision.steps.base import Step
from provision.steps.core import BaseStep, PythonEnvStep, VerifyStep, WorkloadStep
from provision.steps.gpu import GPU_SYSTEM_STEPS, GPU_VERIFY_STEP
from provision.steps.tensorflow import TENSORFLOW_STEPS


def all_steps() -> list[Step]:
    """base; the autostop watcher (early: a node whose setup fails later still stops when idle); the GPU system
    steps (skipped without a GPU); python env; TensorFlow (only where asked for); our code; verify."""
    return [BaseStep(), AutostopStep(), *GPU_SYSTEM_STEPS, PythonEnvStep(), *TENSORFLOW_STEPS, WorkloadStep(), GPU_VERIFY_STEP,
            VerifyStep()]


def step_names() -> list[str]:
    return [s.name for s in all_steps()]
