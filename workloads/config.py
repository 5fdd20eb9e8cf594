"""TrainConfig: every knob of a training run, validated where it is declared.

Jobs (workloads/jobs.py) return a TrainConfig; `key=value` overrides on the command line change
its fields. A bad value fails here, naming the key and the valid choices, before anything starts.
"""

from __future__ import annotations

import difflib
import typing
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from workloads.errors import ConfigError

MODELS = ("seed_cnn", "seed_convnet", "gpt", "seed_cnn_tf")
TF_MODELS = ("seed_cnn_tf",)  # trained by workloads/tf_trainer.py (TensorFlow), not the PyTorch trainer
DATASETS = ("digits", "text")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("constant", "cosine")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")
EXPORTS = ("torch.export", "torchscript", "none")


@dataclass(kw_only=True)
class TrainConfig:
    job: str = ""
    """The job this config came from."""

    # -- model --
    model: str = "seed_convnet"
    """seed_cnn | seed_convnet | gpt (PyTorch) | seed_cnn_tf (TensorFlow)."""
    width: float = 1.0
    """seed_convnet channel/width multiplier; 1.0 is the seed article's network."""
    num_classes: int = 10
    vocab_size: int = 256
    """gpt: 256 for byte-level text."""
    block_size: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    """0 for pretraining; try 0.1+ when fine-tuning."""
    bias: bool = True

    # -- data --
    dataset: str = "digits"
    """digits (scikit-learn's handwritten digits) | text (byte-level language modelling)."""
    data_url: str = ""
    """digits: an .npz with `images` and `labels` (default: scikit-learn's copy);
    text: a file, directory or URL prefix (default: this Python's standard-library sources)."""
    text_max_bytes: int = 8_000_000
    """Cap on the text corpus read (the stdlib alone is ~40 MB)."""
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    augment: bool = False
    """digits: random shifts of up to 2 pixels at 64x64 (a 12% translation) in training batches."""

    # -- optimization --
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    schedule: str = "constant"
    """constant | cosine (decays to min_lr_ratio * lr at the last step)."""
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    batch_size: int = 64
    """Global samples (or sequences) per optimizer step, split across processes and micro-steps."""
    grad_accum: int = 1
    """Micro-steps per optimizer step."""
    grad_clip: float = 0.0
    """Clip the global gradient norm to this; 0 turns clipping off."""
    epochs: float = 0.0
    """Training length in passes over the training set (ignored when max_steps > 0)."""
    max_steps: int = 0

    # -- runtime --
    device: str = "auto"
    """auto picks cuda when available, else cpu."""
    precision: str = "auto"
    """auto: bf16 autocast on CUDA GPUs that support it, fp32 elsewhere."""
    compile: bool = False
    seed: int = 1337
    deterministic: bool = False
    """Deterministic kernels (bitwise-reproducible runs and resumes); slower on GPU."""
    threads: int = 0
    """torch intra-op threads; 0 keeps torch's default (or OMP_NUM_THREADS)."""

    # -- evaluation, logging, checkpoints --
    eval_every: int = 0
    """Validate every this many steps; 0 means once per epoch (or only at the end for max_steps runs)."""
    eval_batches: int = 20
    """text: validation batches per evaluation (classifiers always use the whole split)."""
    log_every: int = 10
    ckpt_every: int = 0
    """Checkpoint every this many steps; 0 means only at the end."""
    keep_last: int = 3
    """Older checkpoints beyond this many are deleted."""
    ckpt_async: bool = True
    """Save in the background (torch.distributed.checkpoint.async_save): the loop waits only while the
    state is copied to host memory. false: wait until every checkpoint is written (the last one always is)."""
    tensorboard: bool = True

    # -- outputs and model optimization --
    export: str = "torch.export"
    """torch.export | torchscript | none: a model file that loads without our code."""
    quantize: bool = False
    """Post-training dynamic int8 quantization of Linear layers, accuracy before/after in the summary."""
    teacher: str = ""
    """Distill from this run (a run id under the same storage, or a run URL); empty: no distillation."""
    distill_alpha: float = 0.7
    """Weight of the teacher's soft targets in the loss (1 - alpha on the true labels)."""
    distill_temperature: float = 4.0

    def __post_init__(self) -> None:
        choices = {
            "model": MODELS, "dataset": DATASETS, "optimizer": OPTIMIZERS, "schedule": SCHEDULES,
            "device": DEVICES, "precision": PRECISIONS, "export": EXPORTS,
        }
        for key, valid in choices.items():
            if getattr(self, key) not in valid:
                raise ConfigError(f"{key} must be one of {', '.join(valid)}; got {getattr(self, key)!r}")
        positive = ("batch_size", "grad_accum", "log_every", "keep_last", "num_classes", "vocab_size",
                    "block_size", "n_layer", "n_head", "n_embd", "eval_batches")
        for key in positive:
            if getattr(self, key) <= 0:
                raise ConfigError(f"{key} must be > 0; got {getattr(self, key)}")
        non_negative = ("max_steps", "epochs", "warmup_steps", "eval_every", "ckpt_every", "grad_clip",
                        "weight_decay", "momentum", "threads", "text_max_bytes")
        for key in non_negative:
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} must be >= 0; got {getattr(self, key)}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0; got {self.lr}")
        if self.width <= 0:
            raise ConfigError(f"width must be > 0; got {self.width}")
        if self.max_steps == 0 and self.epochs == 0:
            raise ConfigError("set the training length: max_steps=N or epochs=N")
        if self.dataset == "text" and self.max_steps == 0:
            raise ConfigError("text runs have no epochs; set max_steps=N")
        if (self.model == "gpt") != (self.dataset == "text"):
            raise ConfigError(f"model {self.model} cannot train on dataset {self.dataset}: gpt goes with text, the CNNs with digits")
        for key in ("val_fraction", "test_fraction", "dropout", "min_lr_ratio", "distill_alpha"):
            if not 0.0 <= getattr(self, key) < 1.0 and not (key in ("min_lr_ratio", "distill_alpha") and getattr(self, key) == 1.0):
                raise ConfigError(f"{key} must be in [0, 1); got {getattr(self, key)}")
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ConfigError("val_fraction + test_fraction must leave at least 10% for training")
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        if self.distill_temperature <= 0:
            raise ConfigError(f"distill_temperature must be > 0; got {self.distill_temperature}")
        if self.model in TF_MODELS and (self.teacher or self.quantize or self.compile or self.grad_accum != 1):
            raise ConfigError(f"{self.model} (TensorFlow) trains without teacher, quantize, compile and grad_accum")
        if self.teacher and self.dataset != "digits":
            raise ConfigError("distillation (teacher=...) is supported for the digits classifiers")

    @property
    def framework(self) -> str:
        """torch, or tensorflow for the TensorFlow models (which need TensorFlow on the nodes)."""
        return "tensorflow" if self.model in TF_MODELS else "torch"

    @property
    def is_classifier(self) -> bool:
        return self.model != "gpt"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def field_types() -> dict[str, type]:
    hints = typing.get_type_hints(TrainConfig)
    return {f.name: hints[f.name] for f in fields(TrainConfig)}


def parse_value(key: str, raw: str, kind: type) -> Any:
    """Turn the text of one `key=value` override into the field's type, or say why not."""
    if kind is bool:
        lowered = raw.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key} expects true or false; got {raw!r}")
    if kind is int:
        try:
            return int(raw.replace("_", ""))
        except ValueError:
            raise ConfigError(f"{key} expects an integer; got {raw!r}") from None
    if kind is float:
        try:
            return float(raw)
        except ValueError:
            raise ConfigError(f"{key} expects a number; got {raw!r}") from None
    return raw


def apply_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """Apply `key=value` strings to a config; unknown keys and bad values raise ConfigError."""
    types = field_types()
    changes: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip().lstrip("-").replace("-", "_")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not key=value")
        if key not in types or key == "job":
            close = difflib.get_close_matches(key, types, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            valid = ", ".join(k for k in types if k != "job")
            raise ConfigError(f"unknown key {key!r}{hint}; valid keys: {valid}")
        changes[key] = parse_value(key, raw, types[key])
    try:
        return replace(cfg, **changes)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc)) from exc
