"""Throughput and model FLOPs utilisation (MFU): FLOPs counted once, a device peak, rates per window.

    flops = count_flops_per_sample(model, cfg, device)   # torch.utils.flop_counter, forward + backward
    peak = find_peak(device, use_bf16)                    # the GPU's catalog figure, or a measured CPU peak
    meter = Throughput(flops, peak, tokens_per_sample=cfg.block_size)
    meter.rates(samples=640, seconds=2.0, world=2)        # {"samples_per_s", "tokens_per_s", "mfu"}

MFU is the model's FLOPs per second on one device (forward and backward of the trained model, as the
FLOP counter sees them; no optimizer, no teacher, no activation recomputation) over that device's peak.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
import torch.nn.functional as F

if TYPE_CHECKING:
    from workloads.config import TrainConfig

logger = logging.getLogger(__name__)

# CPU peak: the best of repeated fp32 n x n matrix products. 1024 is large enough for oneDNN/MKL to
# reach its steady rate on a few cores and small enough (2.1 GFLOP) to repeat within the budget.
CPU_PEAK_N = 1024
CPU_PEAK_BUDGET_S = 0.25  # at start-up, once per process
# Unknown GPUs: 8192^2 matmuls in the training dtype (1.1 TFLOP each): long enough to saturate any board.
GPU_PEAK_N = 8192
GPU_PEAK_BUDGET_S = 1.0
MIN_REPEATS = 3


@dataclass(frozen=True)
class Peak:
    flops_per_s: float  # one device
    dtype: str  # "bf16" | "fp16" | "tf32" | "fp32"
    device_name: str  # "NVIDIA H100 80GB HBM3", or the CPU with its thread count
    measured: bool  # True: timed here with a matrix product; False: the catalog's datasheet figure
    source: str

    def to_dict(self) -> dict[str, Any]:
        return {"tflops": round(self.flops_per_s / 1e12, 4), "dtype": self.dtype, "device": self.device_name,
                "measured": self.measured, "source": self.source}


def count_flops_per_sample(model: nn.Module, cfg: TrainConfig, device: torch.device) -> int:
    """Forward + backward FLOPs of one training sample, counted by torch.utils.flop_counter.

    The count runs on one sample (every op the models use costs FLOPs in proportion to the batch)
    in eval mode, so no dropout draws a random number and no BatchNorm statistic moves; attention is
    forced onto the math kernel, whose matrix products the counter sees on every device (it has no
    formula for the fused CPU kernel). Gradients are cleared afterwards.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from workloads.models import input_shape

    if cfg.is_classifier:
        x = torch.zeros(1, *input_shape(cfg), device=device)
        y = torch.zeros(1, dtype=torch.long, device=device)
    else:
        x = torch.zeros(1, cfg.block_size, dtype=torch.long, device=device)
        y = x
    was_training = model.training
    model.eval()
    try:
        with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
            logits = model(x)
            F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1)).backward()
    finally:
        model.train(was_training)
        for p in model.parameters():
            p.grad = None
    return int(counter.get_total_flops())


def training_dtype(device: torch.device, use_bf16: bool) -> str:
    if use_bf16:
        return "bf16"
    if device.type == "cuda" and torch.get_float32_matmul_precision() != "highest":  # TF32 matmuls allowed
        return "tf32"
    return "fp32"


def find_peak(device: torch.device, use_bf16: bool) -> Peak:
    """The peak this run's MFU is measured against: for a GPU, its datasheet figure from
    infra/catalog/gpus.csv in the training dtype; for a CPU (or a GPU not in the file), measured."""
    dtype = training_dtype(device, use_bf16)
    if device.type == "cuda":
        from infra.gpus import peak_for_device

        name = torch.cuda.get_device_name(device)
        row = peak_for_device(name)
        tflops = row.tflops(dtype) if row is not None else None
        if tflops:
            return Peak(tflops * 1e12, dtype, name, False, f"infra/catalog/gpus.csv: {row.gpu_model} {row.variant}: {row.source}")
        logger.warning("no %s peak for GPU %r in infra/catalog/gpus.csv: measuring one", dtype, name)
        torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype, torch.float32)
        rate = measure_matmul_peak(device, torch_dtype, GPU_PEAK_N, GPU_PEAK_BUDGET_S)
        return Peak(rate, dtype, name, True, f"measured: best {GPU_PEAK_N}x{GPU_PEAK_N} {dtype} matmul at start-up")
    threads = torch.get_num_threads()
    rate = measure_matmul_peak(device, torch.float32, CPU_PEAK_N, CPU_PEAK_BUDGET_S)
    return Peak(rate, "fp32", f"cpu ({threads} threads)", True,
                f"measured: best {CPU_PEAK_N}x{CPU_PEAK_N} fp32 matmul on {threads} thread(s) at start-up")


def measure_matmul_peak(device: torch.device, dtype: torch.dtype, n: int, budget_s: float) -> float:
    """FLOP/s of the fastest of repeated n x n matrix products within about budget_s."""
    a = torch.randn(n, n, device=device, dtype=dtype, generator=torch.Generator(device).manual_seed(0))
    b = torch.randn(n, n, device=device, dtype=dtype, generator=torch.Generator(device).manual_seed(1))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.mm(a, b)  # warm-up: kernel choice, caches
    sync()
    best, started, repeats = float("inf"), time.perf_counter(), 0
    while repeats < MIN_REPEATS or time.perf_counter() - started < budget_s:
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync()
        best = min(best, time.perf_counter() - t0)
        repeats += 1
    return 2 * n**3 / best


@dataclass
class Throughput:
    flops_per_sample: int
    peak: Peak
    tokens_per_sample: int | None = None  # language models: tokens per sequence

    def rates(self, samples: int, seconds: float, world: int) -> dict[str, float]:
        """samples/s (and tokens/s) over all processes, and MFU per device, for `samples` done
        by all processes together in `seconds`."""
        seconds = max(seconds, 1e-9)
        per_s = samples / seconds
        out = {"samples_per_s": round(per_s, 2)}
        if self.tokens_per_sample:
            out["tokens_per_s"] = round(per_s * self.tokens_per_sample, 1)
        out["mfu"] = round(self.flops_per_sample * per_s / world / self.peak.flops_per_s, 6)
        return out
