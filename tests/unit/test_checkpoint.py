"""Checkpoint folders: complete only with a matching manifest; newest complete one wins."""

import pytest
import torch

from workloads.checkpoint import CheckpointManager
from workloads.errors import CheckpointError
from workloads.storage import open_store


@pytest.fixture
def ckpt(tmp_path):
    return CheckpointManager(open_store(tmp_path.as_uri()), keep_last=2)


def save(ckpt, step):
    return ckpt.save(step, {"model": {"w": torch.full((3,), float(step))}}, {"step": step})


def test_latest_is_the_newest_complete(ckpt):
    save(ckpt, 5)
    save(ckpt, 10)
    assert ckpt.latest() == 10
    parts, meta = ckpt.load(10)
    assert parts["model"]["w"].tolist() == [10.0] * 3 and meta["step"] == 10


def test_a_partial_checkpoint_is_never_picked(ckpt, tmp_path):
    save(ckpt, 5)
    partial = tmp_path / "step-9"
    partial.mkdir()
    torch.save({"w": torch.zeros(3)}, partial / "model.pt")  # crashed before the manifest
    assert ckpt.latest() == 5


def test_a_truncated_file_fails_the_hash_check(ckpt, tmp_path):
    save(ckpt, 5)
    path = tmp_path / "step-5" / "__0_0.distcp"  # DCP's data file
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="does not match its manifest"):
        ckpt.load(5)


def test_only_the_latest_k_are_kept_and_partials_pruned(ckpt, tmp_path):
    save(ckpt, 1)
    (tmp_path / "step-2").mkdir()
    (tmp_path / "step-2" / "model.pt").write_bytes(b"half")
    for step in (3, 4, 5):
        save(ckpt, step)
    assert ckpt.steps() == [4, 5]
