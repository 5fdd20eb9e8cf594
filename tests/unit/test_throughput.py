"""FLOPs per sample from torch.utils.flop_counter, device peaks, and the rates the trainer logs."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from workloads import throughput as T
from workloads.jobs import get_job
from workloads.models import build_model, count_params, input_shape

JOBS = ["seed000-cnn", "convnet-digits", "gpt-stdlib-tiny"]


def small(job: str):
    cfg = get_job(job)
    return replace(cfg, block_size=64) if cfg.model == "gpt" else cfg


def counted_batch(model, cfg, n: int) -> int:
    """A plain FlopCounterMode count over a real batch of n random samples (what one sample times n must equal)."""
    g = torch.Generator().manual_seed(0)
    if cfg.is_classifier:
        x, y = torch.randn(n, *input_shape(cfg), generator=g), torch.randint(0, 10, (n,), generator=g)
    else:
        x = torch.randint(0, cfg.vocab_size, (n, cfg.block_size), generator=g)
        y = x
    with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        logits = model(x)
        F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1)).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


@pytest.mark.parametrize("job", JOBS)
def test_flops_per_sample_times_batch_is_the_batch_count(job):
    cfg = small(job)
    model = build_model(cfg)
    one = T.count_flops_per_sample(model, cfg, torch.device("cpu"))
    assert one > 0 and one * 4 == counted_batch(model, cfg, 4)


def test_gpt_count_includes_attention_and_is_about_6n_per_token():
    cfg = small("gpt-stdlib-tiny")
    model = build_model(cfg)
    flops = T.count_flops_per_sample(model, cfg, torch.device("cpu"))
    params_only = 6 * count_params(model) * cfg.block_size
    # attention: QK^T and AV, forward and backward = 3 x 2 x (2 T^2 d) per layer
    attention = 3 * 2 * 2 * cfg.block_size**2 * cfg.n_embd * cfg.n_layer
    assert 0.8 * params_only < flops - attention < 1.2 * params_only
    with FlopCounterMode(display=False) as fused:  # the fused CPU attention kernel is invisible to the counter
        logits = model(torch.zeros(1, cfg.block_size, dtype=torch.long))
        logits.sum().backward()
    assert fused.get_total_flops() < flops - attention / 2


def test_counting_changes_nothing_in_the_model_or_the_rng():
    cfg = get_job("convnet-digits")
    model = build_model(cfg)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    T.count_flops_per_sample(model, cfg, torch.device("cpu"))
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state())


def test_cpu_peak_is_measured_and_says_so():
    peak = T.find_peak(torch.device("cpu"), use_bf16=False)
    assert peak.measured and peak.dtype == "fp32" and peak.flops_per_s > 1e9
    assert peak.source.startswith("measured:") and "threads" in peak.device_name
    assert peak.to_dict()["measured"] is True


@pytest.mark.parametrize("name, bf16, dtype, tflops", [
    ("NVIDIA H100 80GB HBM3", True, "bf16", 989.4),
    ("NVIDIA H200", True, "bf16", 989.4),
    ("NVIDIA A100-SXM4-40GB", False, "fp32", 19.5),
    ("NVIDIA L4", True, "bf16", 121),
])
def test_gpu_peak_comes_from_the_catalog_by_device_name(monkeypatch, name, bf16, dtype, tflops):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "highest")
    monkeypatch.setattr(T, "measure_matmul_peak", lambda *a: pytest.fail("a catalog GPU is not measured"))
    peak = T.find_peak(torch.device("cuda", 0), use_bf16=bf16)
    assert (peak.dtype, peak.flops_per_s, peak.measured) == (dtype, tflops * 1e12, False)
    assert "infra/catalog/gpus.csv" in peak.source and "datasheet" in peak.source


def test_gpu_fp32_with_tf32_allowed_uses_the_tf32_peak(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")
    peak = T.find_peak(torch.device("cuda", 0), use_bf16=False)
    assert (peak.dtype, peak.flops_per_s) == ("tf32", 156e12)


def test_unknown_gpu_is_measured_in_the_training_dtype(monkeypatch):
    seen = []
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA B300")
    monkeypatch.setattr(T, "measure_matmul_peak", lambda device, dtype, n, budget: seen.append(dtype) or 1.5e15)
    peak = T.find_peak(torch.device("cuda", 0), use_bf16=True)
    assert seen == [torch.bfloat16] and peak.measured and peak.flops_per_s == 1.5e15


def test_rates_are_per_window_and_mfu_per_device():
    peak = T.Peak(1e12, "bf16", "x", False, "test")
    meter = T.Throughput(flops_per_sample=1e9, peak=peak, tokens_per_sample=1024)
    rates = meter.rates(samples=2000, seconds=2.0, world=2)  # 1000 samples/s over 2 devices
    assert rates == {"samples_per_s": 1000.0, "tokens_per_s": 1024000.0, "mfu": 0.5}
    assert "tokens_per_s" not in T.Throughput(1e9, peak).rates(10, 1.0, 1)
