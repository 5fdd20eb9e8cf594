"""The 2-node PyTorch DDP job of bench/peer_ray.py: the same model, data and steps under both tools.

    torchrun ... ddp_job.py --steps 60 --markers DIR          # what `gpuforge train --script` starts on each node
    python ddp_job.py --ray --steps 60 --markers DIR          # on Ray's head (`ray submit`): Ray Train's TorchTrainer

Rank 0 writes a marker file per milestone into DIR (a folder both nodes see), each holding time.time():
`start` (the process began, before `import torch`), `imported` (torch), `joined` (in the process group), `first_step`, `end`.
"""

from __future__ import annotations

import time

STARTED = time.time()

import argparse  # noqa: E402
import os  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

IMPORTED = time.time()


def mark(markers: str, name: str, when: float | None = None) -> None:
    path = Path(markers) / name
    tmp = path.with_suffix(".tmp")
    tmp.write_text(repr(when or time.time()))
    tmp.replace(path)


def train_loop(config: dict) -> None:
    """One DDP training run; the process group is already joined (torchrun: main(); Ray: TorchTrainer)."""
    rank, markers = dist.get_rank(), config["markers"]
    if rank == 0:
        mark(markers, "joined")
    torch.set_num_threads(1)
    torch.manual_seed(0)  # identical initial weights on both ranks
    model = nn.parallel.DistributedDataParallel(
        nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(1 + rank)
    x_all, y_all = torch.randn(4096, 256, generator=g), torch.randint(0, 10, (4096,), generator=g)
    for step in range(1, config["steps"] + 1):
        idx = torch.randint(0, len(x_all), (64,), generator=g)
        loss = F.cross_entropy(model(x_all[idx]), y_all[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step == 1 and rank == 0:
            mark(markers, "first_step")
    if rank == 0:
        print(f"rank 0: {config['steps']} steps, loss {loss.item():.4f}", flush=True)
        mark(markers, "end")


def run_torchrun(config: dict) -> None:
    dist.init_process_group("gloo")
    if dist.get_rank() == 0:
        mark(config["markers"], "start", STARTED)
        mark(config["markers"], "imported", IMPORTED)
    try:
        train_loop(config)
    finally:
        dist.destroy_process_group()


def run_ray(config: dict) -> None:
    mark(config["markers"], "start", STARTED)
    mark(config["markers"], "imported", IMPORTED)
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ray.init(address="auto", log_to_driver=True)
    trainer = TorchTrainer(
        train_loop, train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False, placement_strategy="STRICT_SPREAD"),
        run_config=RunConfig(name="peer-ddp", storage_path=config["ray_storage"]),
    )
    trainer.fit()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--markers", required=True, help="a folder every node sees")
    parser.add_argument("--ray", action="store_true", help="run under Ray Train's TorchTrainer (on Ray's head)")
    args = parser.parse_args()
    config = {"steps": args.steps, "markers": args.markers, "ray_storage": os.path.join(args.markers, "ray-train")}
    (run_ray if args.ray else run_torchrun)(config)


if __name__ == "__main__":
    main()
