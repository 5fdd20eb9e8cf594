"""Which nodes `fab setup` takes, decided from what the node is before any step runs.

The version matrix (provision/versions.toml) constrains GPU stacks: a GPU node must run one of its OS
releases. A CPU node needs none of that: any Debian or Ubuntu release with a python3 the `[cpu]` torch
supports works (so machines users already have need not pretend to be Ubuntu).

    >>> check_supported(Facts(os_id="debian", os_version="12", python="3.11.2"))   # a CPU node: fine
    >>> check_supported(Facts(os_id="debian", os_version="12", gpu_pci_count=1))
    Traceback (most recent call last):
    ...
    provision.errors.MatrixError: GPU nodes need a tested OS release (ubuntu-22.04, ubuntu-24.04); this node runs debian-12
"""

from __future__ import annotations

from provision.errors import MatrixError
from provision.facts import Facts
from provision.versions import cpu_versions, supported_os

APT_DISTROS = ("debian", "ubuntu")  # the steps install system packages with apt


def check_supported(facts: Facts) -> None:
    """MatrixError naming what is supported when setup cannot take this node."""
    shown = facts.os_name or "an unknown OS"
    if facts.has_gpu:
        if facts.os_name not in supported_os():
            raise MatrixError(f"GPU nodes need a tested OS release ({', '.join(supported_os())}); this node runs {shown}")
        return
    if facts.os_id not in APT_DISTROS:
        raise MatrixError(f"CPU nodes need Debian or Ubuntu (setup installs with apt); this node runs {shown}")
    cpu = cpu_versions()
    if not facts.python:
        return  # the base step installs python3's venv support; a node without python3 fails there, named
    if not cpu.supports_python(facts.python):
        raise MatrixError(f"this node's python3 is {facts.python}; torch {cpu.torch} supports Python "
                          f"{cpu.python_min} to {cpu.python_max}")
