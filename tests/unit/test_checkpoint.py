"""Checkpoint folders: complete only with a matching manifest; newest complete one wins; background saves."""

import threading

import pytest
import torch

from workloads.checkpoint import CheckpointManager
from workloads.errors import CheckpointError, StorageError
from workloads.storage import open_store
from workloads.storage.file import FileStore


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


class GatedStore(FileStore):
    """A file store that behaves like an object store (no local path: files are uploaded) and can hold
    a write of one key until the test opens the gate, or fail it."""

    def __init__(self, root, hold=None, fail=None):
        super().__init__("", str(root))
        self.hold, self.fail, self.gate = hold, fail, threading.Event()

    def child(self, *parts):
        return self

    def local_path(self, key=""):
        return None

    def _maybe_stop(self, key):
        if self.fail and key.endswith(self.fail):
            raise StorageError(f"injected failure writing {key}")
        if self.hold and key.endswith(self.hold):
            assert self.gate.wait(30), "the test never opened the gate"

    def write_bytes(self, key, data):
        self._maybe_stop(key)
        super().write_bytes(key, data)

    def upload_file(self, key, path):
        self._maybe_stop(key)
        super().upload_file(key, path)


def state(value: float) -> dict:
    return {"model": {"w": torch.full((1000,), value), "b": torch.arange(3)}}


def test_async_save_returns_before_the_checkpoint_is_complete(tmp_path):
    store = GatedStore(tmp_path, hold="manifest.json")
    ckpt = CheckpointManager(store)
    store.gate.set()
    ckpt.save(1, state(1.0), {"step": 1})
    store.gate.clear()
    ckpt.save_async(2, state(2.0), {"step": 2})  # returns although the manifest cannot be written yet
    assert not ckpt.is_complete(2) and ckpt.latest() == 1
    store.gate.set()
    assert ckpt.wait().endswith("/step-2")
    assert ckpt.latest() == 2 and ckpt.load(2)[0]["model"]["w"][0].item() == 2.0
    ckpt.close()


def test_state_changed_after_save_async_returns_is_not_in_the_checkpoint(tmp_path):
    ckpt = CheckpointManager(open_store(tmp_path.as_uri()))
    parts = state(3.0)
    ckpt.save_async(1, parts, {})
    parts["model"]["w"].add_(100.0)  # the next optimizer step, while the save is still being written
    ckpt.wait()
    assert torch.equal(ckpt.load(1)[0]["model"]["w"], torch.full((1000,), 3.0))
    ckpt.close()


def test_structure_around_the_tensors_round_trips_exactly(tmp_path):
    """DCP alone drops some non-tensor leaves (a list of None, the scheduler's lr_lambdas) and turns int keys
    into strings (the optimizer's state): the skeleton blob keeps them."""
    ckpt = CheckpointManager(open_store(tmp_path.as_uri()))
    parts = {"train_state": {"scheduler": {"lr_lambdas": [None, None], "base_lrs": [0.1, 0.2]},
                             "optimizer": {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"betas": (0.9, 0.95), "params": [0]}]},
                             "rng": torch.get_rng_state(), "name": "x"}}
    ckpt.save(4, parts, {})
    loaded = ckpt.load(4)[0]["train_state"]
    assert loaded["scheduler"] == parts["train_state"]["scheduler"]
    assert list(loaded["optimizer"]["state"]) == [0] and loaded["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.95)
    assert torch.equal(loaded["rng"], parts["train_state"]["rng"]) and loaded["name"] == "x"


@pytest.mark.parametrize("fail", ["__0_0.distcp", "meta.json", "manifest.json"])
def test_a_failed_background_save_raises_once_waited_for_and_is_never_picked(tmp_path, fail):
    store = GatedStore(tmp_path)
    ckpt = CheckpointManager(store)
    ckpt.save(1, state(1.0), {})
    store.fail = fail
    ckpt.save_async(2, state(2.0), {})
    with pytest.raises(CheckpointError, match=f"step-2 was not saved: StorageError: injected failure writing step-2/{fail}"):
        ckpt.wait()
    assert ckpt.latest() == 1 and not ckpt.is_complete(2)
    store.fail = None
    ckpt.save(3, state(3.0), {})
    assert ckpt.steps() == [1, 3], "the abandoned step-2 is pruned by the next complete save"
    ckpt.close()


def test_the_next_save_waits_for_the_one_in_flight(tmp_path):
    store = GatedStore(tmp_path, hold="step-1/manifest.json")
    ckpt = CheckpointManager(store)
    ckpt.save_async(1, state(1.0), {})
    opener = threading.Timer(0.3, store.gate.set)
    opener.start()
    ckpt.save_async(2, state(2.0), {})  # blocks until step 1 is complete
    assert ckpt.is_complete(1)
    ckpt.close()
    assert ckpt.latest() == 2
