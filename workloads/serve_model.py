"""A finished run's exported model, loaded for inference without the trainer.

    model = load_run_model("file:///.../runs/digits-1", kind="fp32")
    model.input_shape            # (1, 64, 64): one example, without the batch dimension
    model.predict(batch)         # numpy float32 (N, *input_shape) -> numpy float32 (N, classes)

The kinds are the files a run leaves (workloads/export.py, workloads/trainer.py): `fp32` is the
`torch.export` program (`model.pt2`, or TorchScript `model.ts`), `int8` the dynamically quantized
TorchScript (`model_int8.ts`, CPU only), and a TensorFlow run's `model.keras`. A distilled student
is its own run and serves with its own id. The server (workloads/serve.py) and the benchmark
(bench/serve_latency.py) call the same object, so the benchmark's ratio is the server's cost alone.

    python -m workloads.serve_model --run-url URL [--kind K]   # which file would serve (JSON), or why none

That check needs neither the server library nor a framework: `fab serve` runs it on the node before it
installs LitServe there, so a bad run is one line and nothing is installed or started.
"""

from __future__ import annotations

import json
import logging
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from workloads.errors import ConfigError, StorageError

logger = logging.getLogger(__name__)

KINDS = ("auto", "fp32", "int8")
# Which file serves which kind, in order of preference (the first the run has wins).
TORCH_FILES = {"fp32": ("model.pt2", "model.ts"), "int8": ("model_int8.ts",)}
TF_FILE = "model.keras"


@dataclass
class RunModel:
    """A loaded model: `predict` maps a float32 batch to float32 outputs (thread-safe)."""

    run_id: str
    kind: str
    file: str
    framework: str
    input_shape: tuple[int, ...]
    job: str = ""
    device: str = "cpu"
    test_accuracy: float | None = None
    _fn: Callable[[Any], Any] | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def predict(self, batch: Any) -> Any:
        with self._lock:  # one forward at a time: the model's threads already use every core
            return self._fn(batch)

    def describe(self) -> dict[str, Any]:
        return {"run": self.run_id, "job": self.job, "kind": self.kind, "file": self.file, "framework": self.framework,
                "input_shape": list(self.input_shape), "device": self.device, "test_accuracy": self.test_accuracy}


def read_run_json(store: Any, key: str) -> dict[str, Any]:
    try:
        return json.loads(store.read_bytes(key))
    except StorageError as exc:
        raise ConfigError(f"{store.url} has no {key}: is it a finished run? ({exc})") from exc


def choose_file(kind: str, framework: str, present: set[str], url: str) -> tuple[str, str]:
    """(kind, file) for a request; `auto` is fp32. The error names the kinds the run has."""
    if kind not in KINDS:
        raise ConfigError(f"model kind {kind!r} is not one of {', '.join(KINDS)}")
    if framework == "tensorflow":
        if kind == "int8":
            raise ConfigError(f"run at {url} is a TensorFlow run; it serves as fp32 only")
        if TF_FILE not in present:
            raise ConfigError(f"run at {url} has no {TF_FILE}")
        return "fp32", TF_FILE
    kind = "fp32" if kind == "auto" else kind
    for name in TORCH_FILES[kind]:
        if name in present:
            return kind, name
    have = [k for k, names in TORCH_FILES.items() if any(n in present for n in names)]
    hint = f"; it has: {', '.join(have)}" if have else "; it exported no model (export=none?)"
    raise ConfigError(f"run at {url} has no {kind} model ({' or '.join(TORCH_FILES[kind])}){hint}")


def local_copy(store: Any, key: str, folder: Path) -> Path:
    """The file on this machine: in place for file:// storage, else downloaded once into `folder`."""
    local = store.local_path()
    if local is not None:
        return local / key
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / key
    store.download_file(key, target)
    return target


def inspect_run(run_url: str, kind: str = "auto") -> tuple[Any, dict[str, Any], dict[str, Any], str, str, str]:
    """(store, config, summary, framework, kind, file) of a finished run, without loading a framework."""
    from workloads.storage import open_store

    store = open_store(run_url)
    cfg = read_run_json(store, "config.json")
    summary = read_run_json(store, "summary.json")
    framework = "tensorflow" if str(cfg.get("model", "")).endswith("_tf") else "torch"
    kind, name = choose_file(kind, framework, set(store.list()), store.url)
    return store, cfg, summary, framework, kind, name


def load_run_model(run_url: str, kind: str = "auto", device: str = "auto", cache: Path | None = None) -> RunModel:
    """Load the run's model of `kind` on `device` (auto: the GPU when there is one, except int8)."""
    store, cfg, summary, framework, kind, name = inspect_run(run_url, kind)
    path = local_copy(store, name, cache or Path(tempfile.mkdtemp(prefix="gpuforge-serve-")))
    shape = tuple(summary.get("input_shape") or input_shape_of(cfg))
    model = RunModel(run_id=summary.get("run_id", ""), kind=kind, file=name, framework=framework, input_shape=shape,
                     job=cfg.get("job", ""), test_accuracy=accuracy_of(summary, kind))
    if framework == "tensorflow":
        model._fn, model.device = load_keras(path)
    else:
        model._fn, model.device = load_torch(path, kind, device)
    model.predict(zeros((1, *shape)))  # warm-up: the first call pays for lazy initialization
    return model


def check_run(run_url: str, kind: str = "auto") -> dict[str, Any]:
    """What would serve: kind, file, framework, job and the accuracy the run measured for it."""
    _, cfg, summary, framework, kind, name = inspect_run(run_url, kind)
    return {"kind": kind, "file": name, "framework": framework, "job": cfg.get("job", ""),
            "test_accuracy": accuracy_of(summary, kind)}


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    from workloads.errors import WorkloadError

    p = argparse.ArgumentParser(prog="python -m workloads.serve_model", description="which file of a run would serve")
    p.add_argument("--run-url", required=True)
    p.add_argument("--kind", default="auto", choices=KINDS)
    args = p.parse_args(argv)
    try:
        print(json.dumps(check_run(args.run_url, args.kind)))
    except WorkloadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def accuracy_of(summary: dict[str, Any], kind: str) -> float | None:
    """The accuracy the run measured for this kind (the int8 model's own, from the quantization report)."""
    if kind == "int8":
        return (summary.get("quantization") or {}).get("test_accuracy_int8")
    return summary.get("test_accuracy")


def input_shape_of(cfg: dict[str, Any]) -> tuple[int, ...]:
    from workloads.config import TrainConfig
    from workloads.models import input_shape

    return tuple(input_shape(TrainConfig.from_dict(cfg)))


def zeros(shape: tuple[int, ...]) -> Any:
    import numpy as np

    return np.zeros(shape, dtype=np.float32)


def load_torch(path: Path, kind: str, device: str) -> tuple[Callable[[Any], Any], str]:
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() and kind != "int8" else "cpu"
    if kind == "int8" and device != "cpu":
        raise ConfigError("the int8 model (dynamic quantization) runs on the CPU only; use device=cpu")
    if path.suffix == ".pt2":
        module = torch.export.load(str(path)).module().to(device)
    else:
        module = torch.jit.load(str(path), map_location=device).eval()
    target = torch.device(device)

    def run(batch: Any) -> Any:
        with torch.inference_mode():
            return module(torch.as_tensor(batch, device=target)).float().cpu().numpy()

    return run, device


def load_keras(path: Path) -> tuple[Callable[[Any], Any], str]:
    import keras
    import tensorflow as tf

    model = keras.saving.load_model(str(path), compile=False)
    device = "gpu" if tf.config.list_physical_devices("GPU") else "cpu"

    def run(batch: Any) -> Any:
        return model(batch, training=False).numpy()

    return run, device


if __name__ == "__main__":
    raise SystemExit(main())
