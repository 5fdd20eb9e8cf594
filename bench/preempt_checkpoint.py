"""Checkpoint on a preemption notice: seconds from the notice (SIGUSR1, as the node's supervisor sends it,
workloads/preempt.py) to a complete checkpoint, for each built-in PyTorch job, against the clouds' warnings
(AWS spot: 120 s; GCP preemptible/spot: 30 s).

    .venv/bin/python bench/preempt_checkpoint.py                      # every torch job, on this machine
    python bench/preempt_checkpoint.py --jobs gpt-124m --storage s3://bucket/bench   # on a GPU node, to a bucket

The worst case is timed: the notice arrives one step after a background save started, so the trainer
waits for that save, then writes the notice's own. Batches are cut to the smallest the job allows (a
checkpoint's size is the model and optimizer state, not the batch); the trainer is the real one.
Prints one line per job: parameters, checkpoint MB, seconds, and the share of each cloud's warning used.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workloads.config import apply_overrides  # noqa: E402
from workloads.errors import Preempted  # noqa: E402
from workloads.jobs import describe_jobs, get_job  # noqa: E402
from workloads.runtime import init_runtime  # noqa: E402
from workloads.storage import open_store  # noqa: E402
from workloads.trainer import Trainer  # noqa: E402

AWS_WARNING_S, GCP_WARNING_S = 120.0, 30.0  # the clouds' documented notice times
SMALL = {"gpt-124m": ["batch_size=8", "grad_accum=1", "compile=false"]}  # CPU-sized batches; the state is full size


class NoticeAfter(Trainer):
    """The trainer, with the notice sent to itself right after the step that started a background save."""

    notice_step = 3

    def train_step(self):
        loss = super().train_step()
        if self.step == self.notice_step:
            os.kill(os.getpid(), signal.SIGUSR1)
        return loss


def bench_job(job: str, storage: str, extra: list[str]) -> tuple[int, float, float]:
    cfg = apply_overrides(get_job(job), ["tensorboard=false", "export=none", "quantize=false", "max_steps=100",
                                         "ckpt_every=2", "log_every=100", *SMALL.get(job, ["batch_size=8"]), *extra])
    runs = open_store(storage).child("runs")
    run_id = f"bench-preempt-{job}-{os.getpid()}"
    trainer = NoticeAfter(cfg, init_runtime(cfg.device), runs.child(run_id), runs, run_id)
    try:
        trainer.train()
    except Preempted as exc:
        size = sum(p.stat().st_size for p in Path(storage.removeprefix("file://"), "runs", run_id, f"step-{exc.step}").glob("*")) \
            if storage.startswith("file://") else 0
        params = sum(p.numel() for p in trainer.model.parameters())
        return params, size / 2**20, exc.save_s
    raise RuntimeError(f"{job}: the run ended without answering the notice")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", nargs="*", default=[name for name, doc in describe_jobs()
                                                      if "TensorFlow" not in doc and name != "convnet-digits-student"])
    parser.add_argument("--storage", default="")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        storage = args.storage or Path(tmp).as_uri()
        print(f"{'job':18} {'params':>11} {'ckpt MB':>8} {'notice->saved s':>16} {'of AWS 120 s':>13} {'of GCP 30 s':>12}")
        for job in args.jobs:
            params, mb, seconds = bench_job(job, storage, args.overrides)
            print(f"{job:18} {params:>11,} {mb:>8.1f} {seconds:>16.2f} {seconds / AWS_WARNING_S:>12.1%} "
                  f"{seconds / GCP_WARNING_S:>11.1%}", flush=True)


if __name__ == "__main__":
    main()
