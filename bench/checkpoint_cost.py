"""Checkpoint cost: training time lost to one checkpoint save, as a fraction of one step's time, for a
save that waits until the checkpoint is written and for a background one (DCP async_save), side by side.

    .venv/bin/python bench/checkpoint_cost.py                         # gpt-stdlib-tiny on this machine
    python bench/checkpoint_cost.py --job gpt-124m --steps 4 max_steps=100000   # on a GPU

Each round times three blocks of the same training steps, in rotating order: no save; a waiting save
then the steps; a background save then the steps and a wait for the save at the end (so work it has
not finished by then counts as lost too). Lost time = block with a save - block without.
The last line is `ratio: X.XX`: the background save's lost time over one step's time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workloads.config import apply_overrides  # noqa: E402
from workloads.jobs import get_job  # noqa: E402
from workloads.runtime import init_runtime  # noqa: E402
from workloads.storage import open_store  # noqa: E402
from workloads.trainer import Trainer  # noqa: E402

DEFAULTS = ["tensorboard=false", "max_steps=100000", "export=none"]


def sync_device(trainer: Trainer) -> None:
    if trainer.rt.device.type == "cuda":
        torch.cuda.synchronize()


def timed(trainer: Trainer, steps: int, save: str) -> float:
    sync_device(trainer)
    started = time.perf_counter()
    if save != "none":
        trainer.save_checkpoint(wait=save == "waiting")
    for _ in range(steps):
        trainer.train_step()
    trainer.ckpt.wait()
    sync_device(trainer)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--job", default="gpt-stdlib-tiny")
    parser.add_argument("--steps", type=int, default=10, help="training steps per timed block")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    cfg = apply_overrides(get_job(args.job), DEFAULTS + args.overrides)
    with tempfile.TemporaryDirectory(prefix="gpuforge-bench-") as tmp:
        runs = open_store(Path(tmp).as_uri()).child("runs")
        trainer = Trainer(cfg, init_runtime(cfg.device), runs.child("bench"), runs, "bench")
        trainer.net.train()
        for save in ("none", "waiting", "background"):  # warm-up: compile, allocator, DCP's first save
            timed(trainer, 2, save)
        times: dict[str, list[float]] = {"none": [], "waiting": [], "background": []}
        order = list(times)
        for i in range(args.rounds):
            for save in order[i % 3:] + order[: i % 3]:
                times[save].append(timed(trainer, args.steps, save))
        size = sum(p.stat().st_size for p in (Path(tmp) / "runs/bench").glob(f"step-{trainer.ckpt.latest()}/*"))
        trainer.ckpt.close()
    base = statistics.median(times["none"])
    step = base / args.steps
    lost = {k: statistics.median(t - n for t, n in zip(times[k], times["none"])) for k in ("waiting", "background")}
    print(f"job {args.job} on {trainer.rt.device} ({torch.get_num_threads()} threads), checkpoint {size / 2**20:.1f} MiB, "
          f"{args.rounds} rounds x {args.steps} steps per block (medians)")
    print(f"step time: {step * 1000:.1f} ms")
    for kind in ("waiting", "background"):
        print(f"{kind} save: {lost[kind] * 1000:.1f} ms lost = {lost[kind] / step:.2f} steps")
    print(f"ratio: {max(lost['background'], 0.0) / step:.2f}")


if __name__ == "__main__":
    main()
