"""Training jobs: functions that return a TrainConfig, each a few fields away from `base()`."""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

from workloads.config import TrainConfig
from workloads.errors import ConfigError

JOBS: dict[str, Callable[[], TrainConfig]] = {}


def job(name: str) -> Callable[[Callable[[], TrainConfig]], Callable[[], TrainConfig]]:
    def register(fn: Callable[[], TrainConfig]) -> Callable[[], TrainConfig]:
        JOBS[name] = fn
        return fn

    return register


def base() -> TrainConfig:
    return TrainConfig(epochs=10)


@job("seed000-cnn")
def seed000_cnn() -> TrainConfig:
    """Seed article 000's CNN (3x24x24) on digits with its settings: SGD lr 0.01, batch 64, 10 epochs."""
    return replace(base(), job="seed000-cnn", model="seed_cnn", optimizer="sgd", lr=0.01, batch_size=64, epochs=10)


@job("seed000-cnn-tf")
def seed000_cnn_tf() -> TrainConfig:
    """Seed article 000's TensorFlow CNN, made correct: Keras, MultiWorkerMirroredStrategy, SGD lr 0.01 (needs TensorFlow)."""
    return replace(base(), job="seed000-cnn-tf", model="seed_cnn_tf", optimizer="sgd", lr=0.01, batch_size=64,
                   epochs=3,  # 0.97 test accuracy on 2 nodes; the PyTorch twin needs more epochs without BatchNorm
                   export="none", log_every=5)


@job("seed001-convnet")
def seed001_convnet() -> TrainConfig:
    """Seed article 001's ConvNet (1x64x64) on digits with its settings: SGD lr 0.001, batch 64, 10 epochs."""
    return replace(base(), job="seed001-convnet", model="seed_convnet", optimizer="sgd", lr=0.001, batch_size=64, epochs=10)


@job("convnet-digits")
def convnet_digits() -> TrainConfig:
    """Seed 001's ConvNet on digits, tuned (momentum, cosine, shifts): >= 0.97 test accuracy in minutes on 2 CPU cores."""
    return replace(
        base(), job="convnet-digits", model="seed_convnet", optimizer="sgd",
        lr=0.03,  # with Nesterov momentum 0.9; plain SGD at the seed's 0.001 barely moves in 10 epochs
        momentum=0.9, nesterov=True, weight_decay=5e-4, schedule="cosine", warmup_steps=30,
        grad_clip=1.0,  # 0.05 without clipping diverged on 2 nodes now and then; clipped 0.03 never did
        batch_size=64, epochs=10, augment=True, quantize=True,
    )


@job("convnet-digits-student")
def convnet_digits_student() -> TrainConfig:
    """A 4x narrower ConvNet distilled from a convnet-digits run: teacher=RUN_ID (required)."""
    return replace(convnet_digits(), job="convnet-digits-student", width=0.25, quantize=False)


@job("gpt-stdlib-tiny")
def gpt_stdlib_tiny() -> TrainConfig:
    """A 0.8M-parameter byte-level GPT on Python's standard library; val loss well under ln 256 in minutes on CPU."""
    return replace(
        base(), job="gpt-stdlib-tiny", model="gpt", dataset="text", n_layer=4, n_head=4, n_embd=128,
        block_size=128, dropout=0.0, optimizer="adamw", lr=3e-3, weight_decay=0.1, beta2=0.99,
        schedule="cosine", warmup_steps=30, grad_clip=1.0, batch_size=32, max_steps=400,
        eval_every=100, eval_batches=8, text_max_bytes=4_000_000, epochs=0,
    )


@job("gpt-124m")
def gpt_124m() -> TrainConfig:
    """GPT-2 124M (12 layers, 12 heads, 768 wide, 1024 context) for GPUs: AdamW, bf16, compile."""
    return replace(
        base(), job="gpt-124m", model="gpt", dataset="text", n_layer=12, n_head=12, n_embd=768,
        block_size=1024, vocab_size=50304,  # GPT-2's 50257 padded to a multiple of 64; byte data uses the first 256
        dropout=0.0, optimizer="adamw", lr=6e-4, weight_decay=0.1, beta2=0.95, schedule="cosine",
        warmup_steps=200, grad_clip=1.0, batch_size=512, grad_accum=8,  # 512 x 1024 = 0.5M tokens a step (GPT-2 paper)
        max_steps=5000, eval_every=250, eval_batches=20, ckpt_every=500, compile=True,
        text_max_bytes=2_000_000_000, epochs=0,
    )


def get_job(name: str) -> TrainConfig:
    if name not in JOBS:
        raise ConfigError(f"unknown job {name!r}; valid jobs: {', '.join(JOBS)}")
    return JOBS[name]()


def describe_jobs() -> list[tuple[str, str]]:
    return [(name, (fn.__doc__ or "").strip().splitlines()[0]) for name, fn in JOBS.items()]
