"""Model optimization named by the seed articles (000 §6.3): post-training dynamic int8
quantization and knowledge distillation from a trained teacher."""

from __future__ import annotations

import copy
import io
import json
import logging
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from workloads.config import TrainConfig
from workloads.errors import ConfigError, StorageError
from workloads.storage import Store, open_store

logger = logging.getLogger(__name__)


def quantize_dynamic_int8(model: nn.Module) -> nn.Module:
    """A CPU copy of `model` with every nn.Linear replaced by a dynamic int8 one (weights int8,
    activations quantized on the fly); convolutions stay fp32."""
    cpu = copy.deepcopy(model).to("cpu").eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization announces its move to torchao
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(cpu, {nn.Linear}, dtype=torch.qint8)


def state_dict_bytes(model: nn.Module) -> int:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell()


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                 alpha: float, temperature: float) -> torch.Tensor:
    """Hinton et al. 2015: alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(labels)."""
    t = temperature
    soft = F.kl_div(F.log_softmax(student_logits / t, dim=-1), F.log_softmax(teacher_logits / t, dim=-1),
                    reduction="batchmean", log_target=True)
    return alpha * t * t * soft + (1 - alpha) * F.cross_entropy(student_logits, labels)


def resolve_run_store(ref: str, runs: Store) -> Store:
    """A run given by id (under this storage's runs/) or by URL."""
    return open_store(ref) if "://" in ref else runs.child(ref)


def load_teacher(ref: str, runs: Store, device: torch.device) -> tuple[nn.Module, TrainConfig]:
    """The final model of a finished run, in eval mode, and its config."""
    from workloads.models import build_model

    store = resolve_run_store(ref, runs)
    try:
        cfg = TrainConfig.from_dict(json.loads(store.read_bytes("config.json")))
        state = torch.load(io.BytesIO(store.read_bytes("model.pth")), map_location="cpu", weights_only=True)
    except StorageError as exc:
        raise ConfigError(f"teacher {ref!r}: no finished run at {store.url} (needs config.json and model.pth): {exc}") from exc
    if not cfg.is_classifier:
        raise ConfigError(f"teacher {ref!r} is a {cfg.model} run; distillation needs a classifier")
    model = build_model(cfg)
    model.load_state_dict(state)
    return model.to(device).eval(), cfg
