"""The Automation API path: the missing-CLI error, backend/passphrase handling, and ClusterInfo from
recorded `pulumi stack output --json` files."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from pulumi.automation import OutputValue

from infra import stacks
from infra.errors import PulumiCliMissingError, SpecError, StackError
from infra.spec import ClusterSpec

FIXTURES = Path(__file__).parent / "fixtures"
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHxZ9p7test gpuforge@test"


@pytest.fixture
def no_pulumi_on_path(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))


def test_missing_cli_says_how_to_install_it(no_pulumi_on_path):
    with pytest.raises(PulumiCliMissingError) as err:
        stacks.require_pulumi_cli()
    assert "the pulumi CLI is not on PATH" in str(err.value)
    assert "curl -fsSL https://get.pulumi.com | sh" in str(err.value)


@pytest.mark.parametrize(
    "call",
    [
        lambda state: stacks.up_stack(ClusterSpec(cloud="aws", name="demo", ssh_public_key=KEY), state),
        lambda state: stacks.destroy_stack("demo", "aws", state),
        lambda state: stacks.stack_outputs("demo", state),
    ],
    ids=["up", "destroy", "outputs"],
)
def test_every_stack_operation_stops_at_the_missing_cli_before_touching_state(call, no_pulumi_on_path, tmp_path):
    state = tmp_path / "state"
    with pytest.raises(PulumiCliMissingError, match="get.pulumi.com"):
        call(state)
    assert not state.exists()


def test_up_stack_checks_the_spec_first(no_pulumi_on_path, tmp_path):
    with pytest.raises(SpecError, match="ssh_public_key is empty"):
        stacks.up_stack(ClusterSpec(cloud="aws", name="demo"), tmp_path)
    with pytest.raises(StackError, match="not 'local'"):
        stacks.up_stack(ClusterSpec(), tmp_path)


def test_file_backend_under_the_state_dir_with_a_private_reused_passphrase(monkeypatch, tmp_path):
    for var in ("PULUMI_BACKEND_URL", "PULUMI_CONFIG_PASSPHRASE", "PULUMI_CONFIG_PASSPHRASE_FILE"):
        monkeypatch.delenv(var, raising=False)
    env = stacks.workspace_env(tmp_path)
    assert env["PULUMI_BACKEND_URL"] == f"file://{tmp_path.resolve()}/pulumi"
    passphrase = Path(env["PULUMI_CONFIG_PASSPHRASE_FILE"])
    assert passphrase.parent == tmp_path / "pulumi"
    assert stat.S_IMODE(passphrase.stat().st_mode) == 0o600
    first = passphrase.read_text()
    assert len(first) >= 32
    assert stacks.workspace_env(tmp_path)["PULUMI_CONFIG_PASSPHRASE_FILE"] == str(passphrase)
    assert passphrase.read_text() == first  # reused, or `fab down` could not read the stack


def test_users_own_backend_and_passphrase_win(monkeypatch, tmp_path):
    monkeypatch.setenv("PULUMI_BACKEND_URL", "s3://team-pulumi-state")
    monkeypatch.setenv("PULUMI_CONFIG_PASSPHRASE", "correct horse")
    env = stacks.workspace_env(tmp_path)
    assert env["PULUMI_BACKEND_URL"] == "s3://team-pulumi-state"
    assert "PULUMI_CONFIG_PASSPHRASE_FILE" not in env and "PULUMI_CONFIG_PASSPHRASE" not in env
    assert not (tmp_path / "pulumi" / "passphrase").exists()


def test_stale_gpuforge_keys_are_removed_on_the_next_up():
    existing = {"gpuforge:image": "ami-old", "gpuforge:nodes": "2", "aws:region": "us-east-1"}
    assert stacks.stale_config_keys(existing, {"gpuforge:nodes": "3"}) == ["gpuforge:image"]


# -- ClusterInfo from recorded outputs ------------------------------------------------------------------
@pytest.mark.parametrize(
    "fixture,cloud,scheme,gpu",
    [("stack_output_aws.json", "aws", "s3://", ("A100", 8)), ("stack_output_gcp.json", "gcp", "gs://", ("T4", 1))],
)
def test_cluster_from_recorded_stack_output(fixture, cloud, scheme, gpu):
    text = (FIXTURES / fixture).read_text()
    raw = json.loads(text)
    for source in (raw, text):  # parsed JSON or the text of `pulumi stack output --json`
        info = stacks.cluster_from_outputs(source)
        assert info.cloud == cloud and info.storage_url.startswith(scheme)
        assert [n.rank for n in info.nodes] == [0, 1]
        assert [n.public_address for n in info.nodes] == [n["public_address"] for n in raw["cluster"]["nodes"]]
        assert info.head.private_address == raw["cluster"]["nodes"][0]["private_address"]
        assert (info.head.gpu_model, info.head.gpu_count) == gpu
        assert info.head.user == "ubuntu" and info.head.key_path.endswith("id_ed25519")
        assert info.extra["cost_per_hour"] == raw["costPerHour"]


def test_cluster_from_automation_api_output_map():
    raw = json.loads((FIXTURES / "stack_output_aws.json").read_text())
    outputs = {k: OutputValue(value=v, secret=False) for k, v in raw.items()}
    assert stacks.cluster_from_outputs(outputs) == stacks.cluster_from_outputs(raw)


def test_cluster_output_exported_as_a_json_string_is_accepted():
    raw = json.loads((FIXTURES / "stack_output_gcp.json").read_text())
    assert stacks.cluster_from_outputs({"cluster": json.dumps(raw["cluster"])}).name == "t4-pair"


@pytest.mark.parametrize(
    "outputs,fragment",
    [
        ((FIXTURES / "stack_output_malformed.json").read_text(), "not a cluster record: node 1"),
        ("{}", "stack outputs have no 'cluster' (keys: none)"),
        ('{"costPerHour": 1.0}', "have no 'cluster' (keys: ['costPerHour'])"),
        ("[1, 2]", "must be a JSON object, got list"),
        ("Current stack outputs (2):", "stack outputs are not valid JSON"),
        ({"cluster": "{not json"}, "'cluster' output is not valid JSON"),
        ({"cluster": {"name": "x", "cloud": "aws", "nodes": "oops"}}, "not a cluster record"),
        ({"cluster": {"name": "x", "cloud": "aws"}}, "is missing ['nodes']"),
        (
            {"cluster": {"name": "x", "cloud": "local", "nodes": [
                {"name": "n0", "rank": 0, "public_address": "127.0.0.2", "private_address": "127.0.0.2"}]}},
            "expected aws or gcp",
        ),
    ],
)
def test_malformed_outputs_give_a_clear_error(outputs, fragment):
    with pytest.raises(StackError) as err:
        stacks.cluster_from_outputs(outputs)
    assert fragment in str(err.value)


def test_the_workspace_runs_the_packaged_program_in_a_project_of_the_state_dir(monkeypatch, tmp_path):
    """`fab up` needs no Pulumi.yaml beside the code (a wheel install has none); it names the repo's project, so
    `pulumi` at the repo root and `fab up` see the same stacks under one backend."""
    import yaml

    from infra.__main__ import run

    monkeypatch.setenv("PULUMI_CONFIG_PASSPHRASE", "x")
    opts = stacks.workspace_options(tmp_path)
    assert opts.program is run
    assert Path(opts.work_dir) == tmp_path / "pulumi" / "project" and Path(opts.work_dir).is_dir()
    repo_project = yaml.safe_load((Path(__file__).parents[2] / "Pulumi.yaml").read_text())
    assert opts.project_settings.name == repo_project["name"] == stacks.PROJECT_NAME
    assert opts.project_settings.runtime == "python"
