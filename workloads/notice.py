"""The trainer's side of a preemption notice (the watcher is workloads/preempt.py).

    notice = Notice(rt)        # installs the SIGUSR1 handler
    if notice.agreed():        # every step: True on every rank once any rank's node had the notice
        ...save, then raise Preempted

The signal reaches only the ranks of the node that had the notice, so the ranks agree at each step with a
one-element MAX all-reduce on a CPU tensor (gloo; a CUDA run's group has a gloo side for it, runtime.py), and all
of them save together at the same step.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from workloads.preempt import PREEMPTED_MARKER
from workloads.runtime import Runtime


class Notice:
    def __init__(self, rt: Runtime):
        self.rt = rt
        self.received_at: float | None = None  # monotonic time of the signal, on the ranks that had it
        self.flag = torch.zeros(1, dtype=torch.int32)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGUSR1, self._handle)

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        if self.received_at is None:
            self.received_at = time.monotonic()

    def agreed(self) -> bool:
        self.flag[0] = int(self.received_at is not None)
        if self.rt.distributed:
            dist.all_reduce(self.flag, op=dist.ReduceOp.MAX)
        if self.flag[0] and self.received_at is None:
            self.received_at = time.monotonic()  # a peer's node had it: this rank's clock starts now
        return bool(self.flag[0])

    def record(self, step: int) -> float:
        """Seconds from the notice to the complete checkpoint; written for the node's supervisor."""
        save_s = time.monotonic() - (self.received_at or time.monotonic())
        run_dir = os.environ.get("GPUFORGE_RUN_DIR")
        if run_dir and self.rt.local_rank == 0:
            path = Path(run_dir) / PREEMPTED_MARKER
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps({"step": step, "save_s": round(save_s, 3), "time": time.time()}))
            tmp.replace(path)
        return save_s
