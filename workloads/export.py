"""Final model files: the state dict (as the seed's `convnet.pth`) and a form that loads without
our code (`torch.export` program or TorchScript)."""

from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from workloads.storage import Store

logger = logging.getLogger(__name__)

EXPORT_FILES = {"torch.export": "model.pt2", "torchscript": "model.ts"}


def save_state_dict(model: nn.Module, store: Store, key: str = "model.pth") -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.pth"
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, path)
        store.upload_file(key, path)


def export_model(model: nn.Module, example: torch.Tensor, store: Store, kind: str) -> str | None:
    """Write the exported model; returns its key, or None for kind 'none'.

    Load it without gpuforge: `torch.export.load("model.pt2").module()(x)` or
    `torch.jit.load("model.ts")(x)`.
    """
    if kind == "none":
        return None
    model = model.to("cpu").eval()
    example = example.to("cpu")
    key = EXPORT_FILES[kind]
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = Path(tmp) / key
        if kind == "torch.export":
            batch = torch.export.Dim("batch", min=1, max=4096)
            program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
            torch.export.save(program, str(path))
        else:
            torch.jit.trace(model, example).save(str(path))
        store.upload_file(key, path)
    return key
