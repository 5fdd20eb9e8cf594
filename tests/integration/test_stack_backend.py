"""`--cluster pulumi:STACK` reads the stack with the backend and passphrase `fab up` used, through the Automation API
and a recording stand-in for the `pulumi` CLI (tests/fakes/pulumi_cli.py) that logs the environment it was run with.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from infra import stacks
from tests.integration.lifecycle import gpuforge

pytestmark = pytest.mark.integration

FIXTURES = Path(__file__).parents[1] / "unit" / "fixtures"


@pytest.fixture
def fake_cli(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shutil.copy(Path(__file__).parents[1] / "fakes" / "pulumi_cli.py", bin_dir / "pulumi")
    (bin_dir / "pulumi").chmod(0o755)
    log = tmp_path / "pulumi-calls.jsonl"
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_PULUMI_LOG", str(log))
    monkeypatch.setenv("FAKE_PULUMI_OUTPUTS", str(FIXTURES / "stack_output_aws.json"))
    for name in ("PULUMI_BACKEND_URL", "PULUMI_CONFIG_PASSPHRASE", "PULUMI_CONFIG_PASSPHRASE_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("GPUFORGE_HOME", str(tmp_path / "home"))
    return log


def calls(log: Path) -> list[dict]:
    """The logged calls, without the global --non-interactive flag the Automation API adds."""
    found = [json.loads(line) for line in log.read_text().splitlines()]
    return [{**c, "argv": [a for a in c["argv"] if a != "--non-interactive"]} for c in found]


def test_a_stack_fab_up_made_is_read_with_its_backend_and_passphrase(fake_cli, tmp_path, capsys):
    """Regression: `pulumi:STACK` ran `pulumi stack output` with the CLI's own login, not the file backend and
    generated passphrase `fab up` keeps under $GPUFORGE_HOME, so the stack was not found."""
    state = tmp_path / "home" / "clusters" / "demo"
    env = stacks.workspace_env(state)  # what `fab up` of cluster demo set up

    used = gpuforge(capsys, "use", "pulumi:demo")

    assert used.code == 0, used.text
    assert "selected cluster llm-a100" in used.out
    outputs = [c for c in calls(fake_cli) if c["argv"][:2] == ["stack", "output"]]
    assert outputs and all(c["backend"] == env["PULUMI_BACKEND_URL"] == f"file://{state.resolve()}/pulumi"
                           for c in outputs)
    assert all(c["passphrase_file"] == env["PULUMI_CONFIG_PASSPHRASE_FILE"] for c in outputs)


def test_a_stack_of_a_bare_pulumi_up_is_read_with_the_clis_own_login(fake_cli, capsys):
    used = gpuforge(capsys, "use", "pulumi:other")

    assert used.code == 0, used.text
    (call,) = [c for c in calls(fake_cli) if c["argv"][:2] == ["stack", "output"]]
    assert call["backend"] == "" and call["argv"][-2:] == ["--stack", "other"]
