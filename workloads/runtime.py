"""Process runtime: distributed init from torchrun's environment, device choice, clean exit."""

from __future__ import annotations

import datetime
import logging
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

# Bound every collective and the rendezvous store, so one dead peer cannot hang a run for the
# default 30 minutes; GPUFORGE_DIST_TIMEOUT (seconds) overrides it.
DEFAULT_DIST_TIMEOUT_S = 600


@dataclass
class Runtime:
    rank: int
    local_rank: int
    world: int
    device: torch.device
    distributed: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def broadcast_object(self, obj: object) -> object:
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather_object(self, obj: object) -> list:
        if not self.distributed:
            return [obj]
        out: list = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


def pick_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            from workloads.errors import ConfigError

            raise ConfigError("device=cuda but torch.cuda.is_available() is False (no GPU, or a driver older than this torch build needs)")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_runtime(requested_device: str = "auto") -> Runtime:
    """Join the process group when started by torchrun (RANK/WORLD_SIZE set), else run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(requested_device, local_rank)
    distributed = world > 1
    if distributed and not dist.is_initialized():
        # NCCL for CUDA tensors; gloo beside it for CPU ones (background checkpoint saves ask for a CPU backend)
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=float(os.environ.get("GPUFORGE_DIST_TIMEOUT", DEFAULT_DIST_TIMEOUT_S)))
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, timeout=timeout, **kwargs)
    return Runtime(rank, local_rank, world, device, distributed)


def finish(code: int) -> None:
    """Leave the process group and exit without running interpreter teardown.

    Worker processes under torchrun abort at exit now and then ("terminate called without an
    active exception", see shared/TOOLCHAIN.md); flushing and `os._exit` avoids that teardown.
    """
    try:
        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception as exc:  # noqa: BLE001 - exiting anyway; say why the group did not close cleanly
        logger.warning("destroy_process_group failed: %s", exc)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
