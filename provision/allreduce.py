"""All-reduce bus bandwidth across every process of a job, per message size (NCCL on GPUs, gloo on CPUs).

One node, eight GPUs:

    torchrun --nproc-per-node=8 -m provision.allreduce --sizes 1M,16M,256M --iters 20

Two nodes (run on each with its NODE_RANK; rank 0's private address is the master):

    torchrun --nnodes=2 --nproc-per-node=8 --node-rank=$NODE_RANK --master-addr=10.0.0.5 --master-port=29500 \\
        -m provision.allreduce --sizes 1M,16M,256M --iters 20

Bandwidth is reported the way nccl-tests define it (nccl-tests doc/PERFORMANCE.md): algbw = bytes / time,
busbw = algbw * 2(n-1)/n for all-reduce, n = number of ranks; time is the slowest rank's mean per call.
Each size is checked for correctness once (every rank contributes rank+1) before it is timed. Rank 0 prints
a table and then one JSON line, `{"allreduce": {...}}`, that `parse_allreduce_output` reads back.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from datetime import timedelta

SIZE_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}  # binary units, as nccl-tests' -b/-e take them
ELEMENT_BYTES = 4  # float32
GB = 1e9  # nccl-tests report GB/s in 10^9 bytes
JSON_KEY = "allreduce"


@dataclass(frozen=True)
class Result:
    size: str
    bytes: int
    time_us: float
    algbw_gbps: float
    busbw_gbps: float


def parse_size(text: str) -> int:
    """`4K` -> 4096, `1M` -> 1048576, `512` -> 512; a whole number of float32 elements."""
    value = text.strip().upper().removesuffix("B")
    unit = value[-1] if value and value[-1] in SIZE_UNITS else ""
    number = value[: len(value) - len(unit)]
    if not number.isdigit() or int(number) == 0:
        raise ValueError(f"bad message size {text!r}: use a number with an optional K, M or G suffix, e.g. 16M")
    size = int(number) * SIZE_UNITS[unit]
    if size % ELEMENT_BYTES:
        raise ValueError(f"message size {text!r} is not a multiple of {ELEMENT_BYTES} bytes (float32)")
    return size


def bus_factor(world_size: int) -> float:
    """2(n-1)/n: how much of the data each rank's link carries in a ring all-reduce."""
    return 2 * (world_size - 1) / world_size


def bandwidth(size_bytes: int, seconds: float, world_size: int) -> tuple[float, float]:
    """(algbw, busbw) in GB/s."""
    algbw = size_bytes / seconds / GB
    return algbw, algbw * bus_factor(world_size)


def check_sum(tensor, world_size: int, size: str) -> None:
    """After all ranks contributed rank+1, every element must be n(n+1)/2."""
    want = world_size * (world_size + 1) / 2
    got = (float(tensor[0]), float(tensor[-1]))
    if got != (want, want):
        raise RuntimeError(f"all-reduce of {size} returned {got}, expected {want}: the collective is broken")


def measure(size: str, size_bytes: int, iters: int, warmup: int, device, dist, torch) -> float:
    """Seconds per all-reduce of `size_bytes`, the slowest rank's mean over `iters` calls."""
    rank, world = dist.get_rank(), dist.get_world_size()
    tensor = torch.full((size_bytes // ELEMENT_BYTES,), float(rank + 1), dtype=torch.float32, device=device)
    dist.all_reduce(tensor)
    check_sum(tensor, world, size)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        dist.all_reduce(tensor)
    sync()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(iters):
        dist.all_reduce(tensor)
    sync()
    elapsed = torch.tensor([(time.perf_counter() - start) / iters], dtype=torch.float64, device=device)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return float(elapsed.item())


def format_table(results: list[Result], backend: str, world_size: int, nodes: int) -> str:
    where = f"across {nodes} nodes" if nodes > 1 else "on 1 node"
    lines = [
        f"all-reduce float32 over {backend}: {world_size} ranks {where}, busbw = algbw * 2(n-1)/n",
        f"{'size':>8} {'bytes':>12} {'time(us)':>12} {'algbw(GB/s)':>12} {'busbw(GB/s)':>12}",
    ]
    for r in results:
        lines.append(f"{r.size:>8} {r.bytes:>12} {r.time_us:>12.1f} {r.algbw_gbps:>12.2f} {r.busbw_gbps:>12.2f}")
    return "\n".join(lines)


def parse_allreduce_output(text: str) -> dict:
    """The JSON record rank 0 printed (its `allreduce` object), from a node's captured stdout."""
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith('{"' + JSON_KEY + '"'):
            return json.loads(line)[JSON_KEY]
    raise ValueError("no all-reduce result line in the output (did rank 0 finish?)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m provision.allreduce", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1M,16M,256M", help="comma-separated message sizes (K, M, G suffixes)")
    parser.add_argument("--iters", type=int, default=20, help="timed all-reduces per size")
    parser.add_argument("--warmup", type=int, default=5, help="untimed all-reduces per size first")
    parser.add_argument("--backend", choices=("auto", "nccl", "gloo"), default="auto",
                        help="auto: nccl when CUDA is available, else gloo")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds before a stuck collective fails")
    args = parser.parse_args(argv)
    if args.iters < 1 or args.warmup < 0:
        parser.error(f"--iters must be >= 1 and --warmup >= 0, got {args.iters} and {args.warmup}")
    try:
        args.size_list = [(s.strip(), parse_size(s)) for s in args.sizes.split(",") if s.strip()]
    except ValueError as exc:
        parser.error(str(exc))
    return args


def run(args: argparse.Namespace) -> list[Result]:
    import torch
    import torch.distributed as dist

    for key, default in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"),
                         ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29500")):
        os.environ.setdefault(key, default)  # lets a single process run without torchrun
    backend = args.backend if args.backend != "auto" else ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group(backend, timeout=timedelta(seconds=args.timeout))
    try:
        world = dist.get_world_size()
        results = []
        for size, size_bytes in args.size_list:
            seconds = measure(size, size_bytes, args.iters, args.warmup, device, dist, torch)
            algbw, busbw = bandwidth(size_bytes, seconds, world)
            results.append(Result(size, size_bytes, round(seconds * 1e6, 3), round(algbw, 6), round(busbw, 6)))
        if dist.get_rank() == 0:
            local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
            nodes = max(1, world // max(1, local))
            print(format_table(results, backend, world, nodes))
            record = {"backend": backend, "world_size": world, "nodes": nodes, "dtype": "float32",
                      "iters": args.iters, "results": [asdict(r) for r in results]}
            print(json.dumps({JSON_KEY: record}), flush=True)
        dist.barrier()
        return results
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except Exception as exc:  # noqa: BLE001 - one clear line per rank, then a non-zero exit for torchrun
        print(f"rank {os.environ.get('RANK', '?')}: all-reduce check failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    code = main()
    # Flush and leave without interpreter teardown: torch's atexit handlers sometimes abort the worker
    # ("terminate called without an active exception"), which torchrun reports as a failure.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
