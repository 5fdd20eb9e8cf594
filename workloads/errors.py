"""Errors raised by the workloads package; the CLI turns each into one clear line."""

from __future__ import annotations


class WorkloadError(Exception):
    """Base class for workload errors."""


class ConfigError(WorkloadError, ValueError):
    """A job, run or trainer setting is invalid; the message names it and the valid choices."""


class StorageError(WorkloadError):
    """A storage URL is invalid or cannot be read/written; the message names the URL."""


class StorageNotFound(StorageError):
    """The object or file at a storage URL does not exist."""


class CheckpointError(WorkloadError):
    """A checkpoint cannot be written, found or loaded."""


class Preempted(WorkloadError):
    """The node had a preemption notice: a complete checkpoint of `step` was saved and the run stops."""

    def __init__(self, step: int, save_s: float):
        super().__init__(f"preempted: checkpoint of step {step} saved in {save_s:.2f} s")
        self.step, self.save_s = step, save_s
