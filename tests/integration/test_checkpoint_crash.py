"""A process killed in the middle of a background checkpoint save leaves nothing that resume would pick.

The child saves step 1 completely, then starts an async save of step 2 whose storage holds one write
(the data file, meta.json or the manifest) until the child is SIGKILLed; the parent then resumes.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from tests.support import ROOT, child_env
from workloads.checkpoint import CheckpointManager
from workloads.storage import open_store

CHILD = textwrap.dedent("""
    import sys, time, torch
    from workloads.checkpoint import CheckpointManager
    from workloads.storage.file import FileStore

    root, hold, upload = sys.argv[1], sys.argv[2], sys.argv[3] == "upload"

    class HoldingStore(FileStore):
        def child(self, *parts):
            return self
        def local_path(self, key=""):
            return None if upload else super().local_path(key)
        def _hold(self, key):
            if key == hold:
                print("mid-save", flush=True)
                time.sleep(600)
        def write_bytes(self, key, data):
            self._hold(key)
            super().write_bytes(key, data)
        def upload_file(self, key, path):
            self._hold(key)
            super().upload_file(key, path)

    ckpt = CheckpointManager(HoldingStore("", root))
    ckpt.save(1, {"model": {"w": torch.full((100000,), 1.0)}}, {"step": 1})
    ckpt.save_async(2, {"model": {"w": torch.full((100000,), 2.0)}}, {"step": 2})
    print("training on", flush=True)
    time.sleep(600)
""")


@pytest.mark.parametrize("hold, upload", [
    ("step-2/__0_0.distcp", True),   # object storage: the data file is being uploaded
    ("step-2/meta.json", False),     # file storage: DCP's files are written, meta is not
    ("step-2/manifest.json", False), # everything but the manifest
])
def test_kill_mid_save_leaves_the_previous_checkpoint_as_latest(tmp_path, hold, upload):
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path), hold, "upload" if upload else "file"],
                            cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line.strip())
            if "mid-save" in lines and "training on" in lines:
                break
        assert "mid-save" in lines, proc.stderr.read()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert (tmp_path / "step-2").is_dir(), "the kill landed before the save started writing"
    ckpt = CheckpointManager(open_store(tmp_path.as_uri()))
    assert ckpt.steps() == [1, 2] and not ckpt.is_complete(2)
    assert ckpt.latest() == 1
    parts, meta = ckpt.load(1)
    assert torch.equal(parts["model"]["w"], torch.full((100000,), 1.0)) and meta["step"] == 1
    ckpt.save(3, {"model": {"w": torch.zeros(3)}}, {"step": 3})  # the resumed run's next save
    assert ckpt.steps() == [1, 3]
    ckpt.close()
