"""Trainer overhead: our Trainer's step time versus a bare PyTorch loop on the same model, batch
and data, measured side by side in one run (alternating blocks, so machine noise hits both).

    .venv/bin/python bench/trainer_overhead.py [--steps 30] [--rounds 5]
    .venv/bin/python bench/trainer_overhead.py --notice     # 2 ranks (gloo): the preemption notice check's cost

The last line is `ratio: X.XX` (trainer / bare; goal <= 1.05). With --notice: two processes train the same job with
DDP over gloo, alternating blocks of the trainer's step alone and of the step with the notice check train() makes
before each step (workloads/notice.py); `notice ratio: X.XX` (with / without).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workloads.config import apply_overrides  # noqa: E402
from workloads.jobs import get_job  # noqa: E402
from workloads.models import build_model  # noqa: E402
from workloads.runtime import init_runtime  # noqa: E402
from workloads.storage import open_store  # noqa: E402
from workloads.trainer import Trainer  # noqa: E402


def make_trainer(tmp: str) -> Trainer:
    cfg = apply_overrides(get_job("convnet-digits"), ["augment=false", "tensorboard=false", "max_steps=100000"])
    runs = open_store(Path(tmp).as_uri()).child("runs")
    return Trainer(cfg, init_runtime("cpu"), runs.child("bench"), runs, "bench")


def bare_loop(trainer: Trainer):
    """The same model, optimizer settings, batch size and data tensors, with nothing else."""
    cfg = trainer.cfg
    torch.manual_seed(cfg.seed)
    model = build_model(cfg)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
    x_all, y_all = trainer.images.train.x, trainer.images.train.y
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(x_all), generator=g)
    state = {"pos": 0}

    def step() -> torch.Tensor:
        i = state["pos"]
        if i + cfg.batch_size > len(order):
            i = 0
        idx = order[i : i + cfg.batch_size]
        state["pos"] = i + cfg.batch_size
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x_all[idx]), y_all[idx])
        loss.backward()
        opt.step()
        return loss.detach()

    return model, step


def time_block(step, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - start) / n


def notice_rank(rank: int, port: int, steps: int, rounds: int, out: str) -> None:
    """One of two ranks: blocks of train_step alone and with the notice check, alternating."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", GPUFORGE_PREEMPTIBLE="1")
    torch.set_num_threads(1)
    from workloads.notice import Notice

    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_trainer(tmp)
        trainer.net.train()
        notice = Notice(trainer.rt)

        def checked() -> None:
            if notice.agreed():
                raise RuntimeError("no notice was sent")
            trainer.train_step()

        for step in (trainer.train_step, checked):
            time_block(step, 5)
        without, with_ = [], []
        for i in range(rounds):
            pair = [(without, trainer.train_step), (with_, checked)]
            for times, step in pair if i % 2 == 0 else pair[::-1]:
                times.append(time_block(step, steps))
        calls = []  # the check alone, as a step sees it: the time between two checks is a step's (5 ms here)
        for _ in range(200):
            time.sleep(0.005)
            start = time.perf_counter()
            notice.agreed()
            calls.append(time.perf_counter() - start)
    if rank == 0:
        ratio = statistics.median(w / o for w, o in zip(with_, without))
        Path(out).write_text(f"2 ranks (gloo, 1 thread each), {rounds} x {steps} steps each side\n"
                             f"step alone:        {statistics.median(without) * 1000:.2f} ms\n"
                             f"step with notice:  {statistics.median(with_) * 1000:.2f} ms\n"
                             f"notice check alone: {statistics.median(calls) * 1e6:.0f} us per step (median of 200)\n"
                             f"notice ratio: {ratio:.3f}\n")


def notice_bench(steps: int, rounds: int) -> None:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "result.txt")
        mp.spawn(notice_rank, args=(port, steps, rounds, out), nprocs=2)
        print(Path(out).read_text(), end="")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="steps per timed block")
    parser.add_argument("--rounds", type=int, default=15, help="alternating blocks per side")
    parser.add_argument("--notice", action="store_true", help="the preemption notice check's cost, on 2 ranks")
    args = parser.parse_args()
    if args.notice:
        notice_bench(args.steps, args.rounds)
        return
    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_trainer(tmp)
        trainer.net.train()
        _, bare = bare_loop(trainer)
        for step in (trainer.train_step, bare):  # warm-up: allocator, oneDNN primitive caches
            time_block(step, 5)
        ours, theirs = [], []
        for i in range(args.rounds):  # alternate which side goes first, so drift favours neither
            pair = [(ours, trainer.train_step), (theirs, bare)]
            for times, step in pair if i % 2 == 0 else pair[::-1]:
                times.append(time_block(step, args.steps))
    t, b = statistics.median(ours), statistics.median(theirs)
    ratio = statistics.median(o / t_ for o, t_ in zip(ours, theirs))  # per-round ratios cancel slow load drift
    print(f"model: seed_convnet (8.3M params), batch {trainer.cfg.batch_size}, digits 1x64x64, "
          f"{torch.get_num_threads()} threads, {args.rounds} x {args.steps} steps each side")
    print(f"bare loop:  {b * 1000:.1f} ms/step (median of blocks)")
    print(f"trainer:    {t * 1000:.1f} ms/step (median of blocks)")
    print(f"ratio: {ratio:.2f}")


if __name__ == "__main__":
    main()
