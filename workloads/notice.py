"""The trainer's side of a preemption notice (the watcher is workloads/preempt.py).

    notice = Notice(rt)        # installs the SIGUSR1 handler
    if notice.agreed():        # every step: True on every rank once any rank's node had the notice
        ...save, then raise Preempted

The signal reaches only the ranks of the node that had the notice, so the ranks agree with a one-element MAX
all-reduce on a CPU tensor (gloo; a CUDA run's group has a gloo side for it, runtime.py). It is asynchronous, off
the step's path: the all-reduce started at one step is waited for at the next, where it has long finished (a
blocking one cost 0.6 ms per step on 2 local ranks, more across nodes: bench/trainer_overhead.py --notice). Every
rank starts and reads the same all-reduces at the same steps, so all of them still see the notice at the same
step and save it together; the notice is acted on one step later than a blocking check would. Where no notice
can come (the launcher sets GPUFORGE_PREEMPTIBLE=1 only on spot/preemptible nodes, whose supervisors watch for
one), the ranks do not check at all.
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
        self.pending = None  # the all-reduce in flight (started at the previous step)
        self.possible = os.environ.get("GPUFORGE_PREEMPTIBLE") == "1"  # workloads/launch.py PREEMPTIBLE_ENV
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGUSR1, self._handle)

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        if self.received_at is None:
            self.received_at = time.monotonic()

    def agreed(self) -> bool:
        """Called by every rank before every step; True on all of them at the same step once a node had it."""
        if not self.rt.distributed:
            return self.received_at is not None
        if not self.possible:
            return False
        seen = False
        if self.pending is not None:
            self.pending.wait()
            self.pending = None
            seen = bool(self.flag[0])
        if seen:
            if self.received_at is None:
                self.received_at = time.monotonic()  # a peer's node had it: this rank's clock starts now
            return True
        self.flag = torch.tensor([int(self.received_at is not None)], dtype=torch.int32)
        self.pending = dist.all_reduce(self.flag, op=dist.ReduceOp.MAX, async_op=True)
        return False

    def close(self) -> None:
        """The loop ended (on every rank at the same step): the all-reduce in flight completes."""
        if self.pending is not None:
            self.pending.wait()
            self.pending = None

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
