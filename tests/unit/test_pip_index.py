"""The package index setting for nodes (issue 8): the `fab setup` option wins over GPUFORGE_PIP_INDEX, which wins
over the hosts file; `node` passes no index of ours; a named index is probed first."""

from __future__ import annotations

import pytest

from provision.errors import ProvisionError
from provision.pip_index import pip_index_args, resolve_pip_index

MIRROR = "https://pypi.example.corp/simple"
TORCH = "https://download.pytorch.org/whl/cpu"


@pytest.mark.parametrize(
    "option, env, hosts, want",
    [("", "", "", ""), ("", "", MIRROR, MIRROR), ("", "node", MIRROR, "node"), (MIRROR, "node", "", MIRROR)],
)
def test_the_option_wins_over_the_variable_which_wins_over_the_hosts_file(monkeypatch, option, env, hosts, want):
    monkeypatch.setenv("GPUFORGE_PIP_INDEX", env)
    assert resolve_pip_index(option, hosts) == want


def test_a_bad_variable_is_named(monkeypatch):
    monkeypatch.setenv("GPUFORGE_PIP_INDEX", "pypi.example.corp")
    with pytest.raises(ProvisionError, match="GPUFORGE_PIP_INDEX must be a package index URL .* got 'pypi.example.corp'"):
        resolve_pip_index()


@pytest.mark.parametrize(
    "setting, args, probed",
    [("", f"--extra-index-url {TORCH}", TORCH),  # torch's own wheel index, beside the node's default
     ("node", "", ""),  # the node's pip configuration alone
     (MIRROR, f"--index-url {MIRROR}", MIRROR),  # the mirror alone: it must carry the torch build
     ("file:///srv/wheels", "--index-url file:///srv/wheels", "")],  # a local folder needs no probe
)
def test_what_pip_is_given_and_what_is_probed_first(setting, args, probed):
    assert pip_index_args(setting, TORCH) == (args, probed)
