"""Errors raised by provisioning; the CLI turns each into one clear line."""

from __future__ import annotations

from infra.errors import HostKeyError, NodeUnreachableError, SshError  # noqa: F401 - raised by infra.ssh, caught here too


class ProvisionError(Exception):
    """Base class for provisioning errors."""


class InventoryError(ProvisionError):
    """The chosen cluster cannot be resolved (unknown name, bad hosts file, bad stack output)."""


class StepError(ProvisionError):
    """A provisioning step failed on a node; carries what ran, where, and what it printed."""

    def __init__(self, node: str, step: str, command: str, exit_code: int | None, output_tail: str):
        self.node, self.step, self.command = node, step, command
        self.exit_code, self.output_tail = exit_code, output_tail
        code = "no exit code" if exit_code is None else f"exit {exit_code}"
        super().__init__(f"{node}: step {step} failed ({code}) running: {command}\n{output_tail}".rstrip())


class MatrixError(ProvisionError):
    """No tested version combination for a node, or a node's stack conflicts with it."""


class FactsError(ProvisionError):
    """A node's hardware or software does not match what its instance type promises (GPU count, model)."""
