"""The data policy on the embedded local cluster (real sshd nodes), through the real tasks: `down` keeps the storage
folder (every run's checkpoints and models) and says where and how much; `down --delete-data` deletes it after a
confirmation naming it; a new `up` of the same name carries on with the kept data."""

from __future__ import annotations

from pathlib import Path

import pytest

from infra.local import our_processes
from tests.integration.lifecycle import gpuforge

pytestmark = pytest.mark.integration


@pytest.fixture
def home(tmp_path, monkeypatch):
    from infra.local import destroy_local_cluster

    monkeypatch.setenv("GPUFORGE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("COLUMNS", "200")
    yield tmp_path / "home"
    for state in (tmp_path / "home" / "clusters").glob("*"):  # a failed test leaves no sshd behind
        destroy_local_cluster(state)


def test_local_down_keeps_the_storage_folder_and_delete_data_removes_it(home, capsys):
    """Regression: `fab down` of a local cluster deleted every run's checkpoints and models with its state."""
    assert gpuforge(capsys, "up", "--name", "lab", "--nodes", "1").code == 0
    state = home / "clusters" / "lab"
    storage = state / "storage"
    (storage / "runs" / "r1").mkdir(parents=True)
    (storage / "runs" / "r1" / "model.pth").write_bytes(b"w" * 1500)

    down = gpuforge(capsys, "down", "--name", "lab")  # as `up --name` took it (it said "No idea what '--name' is!")

    assert down.code == 0, down.text
    assert (storage / "runs" / "r1" / "model.pth").read_bytes() == b"w" * 1500
    text = " ".join(down.out.split())
    assert f"kept the data: {storage.resolve().as_uri()} (1 file(s), 1.5 KB)" in text
    assert "`gpuforge down --delete-data --cluster lab` deletes it" in text
    assert not our_processes(state) and not (state / "nodes").exists() and not (state / "cluster.json").exists()
    status = gpuforge(capsys, "status", "--cluster", "lab")
    assert status.code != 0 and "only its data is kept" in status.err

    again = gpuforge(capsys, "up", "--name", "lab", "--nodes", "1")  # a new cluster of the name finds the data
    assert again.code == 0, again.text
    assert (storage / "runs" / "r1" / "model.pth").exists()
    assert gpuforge(capsys, "down", "--cluster", "lab").code == 0

    refused = gpuforge(capsys, "down", "--cluster", "lab", "--delete-data", stdin="\n")
    assert refused.code == 1 and "nothing deleted" in refused.err and storage.resolve().as_uri() in refused.out
    assert (storage / "runs" / "r1" / "model.pth").exists()

    gone = gpuforge(capsys, "down", "--cluster", "lab", "--delete-data", "--yes")
    assert gone.code == 0, gone.text
    assert not state.exists()


def test_delete_data_on_a_running_local_cluster_asks_before_stopping_anything(home, capsys):
    assert gpuforge(capsys, "up", "--name", "lab", "--nodes", "1").code == 0
    state = home / "clusters" / "lab"
    (state / "storage" / "ckpt").write_text("x")

    refused = gpuforge(capsys, "down", "--cluster", "lab", "--delete-data", stdin="no\n")

    assert refused.code == 1 and (state / "cluster.json").exists() and our_processes(state)  # nothing stopped
    done = gpuforge(capsys, "down", "--cluster", "lab", "--delete-data", stdin="y\n")
    assert done.code == 0 and "deleted" in done.out
    assert "kept" not in done.out  # regression: it said "(its storage folder is kept)" and then deleted it
    assert not state.exists() and not our_processes(state)


def test_an_empty_storage_folder_goes_with_the_cluster(home, capsys):
    assert gpuforge(capsys, "up", "--name", "lab", "--nodes", "1").code == 0
    down = gpuforge(capsys, "down", "--cluster", "lab")
    assert down.code == 0 and "kept" not in down.out
    assert not (home / "clusters" / "lab").exists()


def test_fab_sweep_refuses_bad_input_in_one_line_before_any_call(home, capsys):
    for argv, message in ((["sweep", "--cloud", "azure"], "--cloud must be aws or gcp, got 'azure'"),
                          (["sweep", "--cloud", "gcp"], "--project is required with --cloud gcp"),
                          (["sweep", "--cloud", "aws", "--delete-data"], "--delete-data goes with --purge"),
                          (["sweep", "--cloud", "aws", "--region", "us-east-9"], "unknown aws region 'us-east-9'")):
        result = gpuforge(capsys, *argv)
        assert result.code in (1, 2) and result.err.strip().startswith(f"error: {message}"), result.err
        assert len(result.err.strip().splitlines()) == 1
    assert not Path(home).exists() or not list(Path(home).rglob("*.json"))
