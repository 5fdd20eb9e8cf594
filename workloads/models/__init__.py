"""Model registry: build any job's model from its TrainConfig."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch.nn as nn

from workloads.models.gpt import GPT, GPTConfig
from workloads.models.seed_cnn import INPUT_SHAPE as SEED_CNN_INPUT
from workloads.models.seed_cnn import SeedCNN
from workloads.models.seed_convnet import INPUT_SHAPE as SEED_CONVNET_INPUT
from workloads.models.seed_convnet import SeedConvNet

if TYPE_CHECKING:
    from workloads.config import TrainConfig

INPUT_SHAPES = {"seed_cnn": SEED_CNN_INPUT, "seed_convnet": SEED_CONVNET_INPUT}


def gpt_config(cfg: TrainConfig) -> GPTConfig:
    return GPTConfig(vocab_size=cfg.vocab_size, block_size=cfg.block_size, n_layer=cfg.n_layer,
                     n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.dropout, bias=cfg.bias)


def build_model(cfg: TrainConfig) -> nn.Module:
    if cfg.model == "seed_cnn":
        return SeedCNN(cfg.num_classes)
    if cfg.model == "seed_convnet":
        return SeedConvNet(cfg.num_classes, width=cfg.width)
    if cfg.model == "gpt":
        return GPT(gpt_config(cfg))
    raise ValueError(f"unknown model {cfg.model!r}; valid: seed_cnn, seed_convnet, gpt")


def input_shape(cfg: TrainConfig) -> tuple[int, ...]:
    """Shape of one example, without the batch dimension."""
    if cfg.model == "gpt":
        return (cfg.block_size,)
    return INPUT_SHAPES[cfg.model]


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
