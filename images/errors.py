"""Errors raised while baking machine images; the CLI turns each into one clear line."""

from __future__ import annotations


class BakeError(Exception):
    """A bake failed. By the time it is raised the builder and the temporary resources are gone,
    unless a `CleanupError` says otherwise."""


class BakeSpecError(BakeError, ValueError):
    """A bake specification value is invalid; the message names it and the valid choices."""


class CleanupError(BakeError):
    """Something the bake created could not be removed; the message lists each leftover with its id
    and the command that removes it."""

    def __init__(self, leftovers: list[str]):
        self.leftovers = list(leftovers)
        lines = "\n".join(f"  - {item}" for item in self.leftovers)
        super().__init__(f"the bake could not remove {len(self.leftovers)} resource(s); remove them by hand:\n{lines}")
