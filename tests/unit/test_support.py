"""Which nodes `fab setup` takes (regression, issue 8 defect 9): the version matrix constrains GPU stacks only; a
CPU node on any Debian or Ubuntu with a supported python3 is taken, a GPU node off the matrix is refused by name."""

from __future__ import annotations

import pytest

from provision.errors import MatrixError
from provision.facts import Facts
from provision.support import check_supported


@pytest.mark.parametrize("os_id, version", [("debian", "12"), ("debian", "13"), ("ubuntu", "20.04"), ("ubuntu", "24.04")])
def test_cpu_nodes_on_any_debian_or_ubuntu_are_taken(os_id, version):
    check_supported(Facts(os_id=os_id, os_version=version, python="3.11.2"))


@pytest.mark.parametrize(
    "facts, message",
    [(Facts(os_id="debian", os_version="12", gpu_pci_count=1),
      r"GPU nodes need a tested OS release \(ubuntu-22.04, ubuntu-24.04\); this node runs debian-12"),
     (Facts(os_id="rocky", os_version="9", python="3.11.2"),
      r"CPU nodes need Debian or Ubuntu \(setup installs with apt\); this node runs rocky-9"),
     (Facts(os_id="ubuntu", os_version="18.04", python="3.6.9"), r"this node's python3 is 3.6.9; torch 2.13.0 supports")],
)
def test_nodes_setup_cannot_take_are_refused_naming_what_is_supported(facts, message):
    with pytest.raises(MatrixError, match=message):
        check_supported(facts)
