"""Seed article 000's TensorFlow CNN, made correct, trained with Keras across nodes.

    python -m workloads.train --job seed000-cnn-tf                 # one process, this machine
    fab setup --tensorflow && fab train --job seed000-cnn-tf --nodes 2 --follow

The article's loop cannot run: it calls PyTorch's `optimizer.zero_grad()` / `loss.backward()` on a
Keras model, and its `call()` creates new BatchNormalization layers at every call (so they never
train and their statistics are thrown away). Here the layers are built once, in a model Keras can
save and load without our code, and the loop is TensorFlow's own: `tf.GradientTape`,
`optimizer.apply_gradients`, under `tf.distribute.MultiWorkerMirroredStrategy`, which all-reduces
the gradients across workers. The cluster comes from `TF_CONFIG`, which the launcher sets on every
node (`tf_config()` below; worker 0 is the chief, on rank 0). Outputs go where the PyTorch jobs'
go: `<storage>/runs/<run id>/` gets config.json, metrics.jsonl, TensorBoard events (tb/),
summary.json and the model (`model.keras`, loadable with `keras.saving.load_model`).

TensorFlow is imported only inside the functions: the launcher imports `tf_config` on a
controller that has no TensorFlow.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from workloads.config import TrainConfig
from workloads.storage import Store

logger = logging.getLogger(__name__)

INPUT_SHAPE = (24, 24, 3)  # the article's PyTorch twin takes 3x24x24 (fc1 is 128 * 6 * 6); Keras is channels-last
SPLIT_SEED = 20240601  # the same fixed split seed as workloads/data.py (the split itself is drawn with numpy)
MODEL_FILE = "model.keras"
BN_MOMENTUM = 0.9  # moving statistics that settle within an epoch of digits (~20 steps)


def tf_config(addresses: list[str], ports: list[int], index: int) -> str:
    """TF_CONFIG for worker `index` of a cluster of workers at addresses[i]:ports[i] (worker 0 is the chief)."""
    if len(addresses) != len(ports) or not 0 <= index < len(addresses):
        raise ValueError(f"tf_config: {len(addresses)} addresses, {len(ports)} ports, index {index}")
    workers = [f"{a}:{p}" for a, p in zip(addresses, ports)]
    return json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}})


def build_seed_cnn_tf(num_classes: int = 10, head: str = "pool") -> Any:
    """The article's network with each layer created once. `head="gap"` is its literal ending
    (global average pooling straight after the second convolution); the default `pool` ends as
    its PyTorch twin does (max-pool after each convolution, flatten 128 x 6 x 6 into fc1)."""
    import keras
    from keras import layers

    # Keras' default momentum 0.99 averages ~100 steps: as many as a run of a few epochs has. Synchronized:
    # batch statistics over the global batch, so every worker ends with the same moving statistics (without it
    # each worker kept its own shard's, and the replicas' weights differed).
    def norm() -> Any:
        return layers.BatchNormalization(momentum=BN_MOMENTUM, synchronized=True)

    def pool() -> list[Any]:  # a new layer each time: a layer used twice in a Sequential does not survive a save
        return [layers.MaxPooling2D(2)] if head == "pool" else []

    end = [layers.Flatten()] if head == "pool" else [layers.GlobalAveragePooling2D()]
    return keras.Sequential([
        keras.Input(INPUT_SHAPE),
        norm(), layers.Activation("relu"),  # the article normalizes its input first
        layers.Conv2D(64, 3, padding="same"), norm(), layers.Activation("relu"), *pool(),
        layers.Conv2D(128, 3, padding="same"), norm(), layers.Activation("relu"), *pool(),
        *end,
        layers.Dense(1024, activation="relu"),
        layers.Dense(num_classes, activation="softmax"),
    ], name="seed000_cnn_tf")


def load_digits_nhwc(cfg: TrainConfig) -> dict[str, Any]:
    """scikit-learn's digits at 24x24x3 (bilinear), split with a fixed seed, normalized with the
    training split's statistics: {'train': (x, y), 'val': ..., 'test': ...} as numpy arrays."""
    import numpy as np
    import tensorflow as tf
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[..., None]  # pixel values are 0..16
    x = tf.image.resize(images, INPUT_SHAPE[:2], method="bilinear").numpy()
    x = np.repeat(x, INPUT_SHAPE[2], axis=-1)
    y = digits.target.astype(np.int64)
    order = np.random.RandomState(SPLIT_SEED).permutation(len(x))
    n_test, n_val = int(len(x) * cfg.test_fraction), int(len(x) * cfg.val_fraction)
    test, val, train = order[:n_test], order[n_test:n_test + n_val], order[n_test + n_val:]
    mean, std = x[train].mean(), x[train].std()
    x = (x - mean) / std
    return {"train": (x[train], y[train]), "val": (x[val], y[val]), "test": (x[test], y[test])}


def evaluate(model: Any, split: tuple[Any, Any]) -> dict[str, float]:
    import numpy as np

    x, y = split
    # A plain call, not model.predict: predict would distribute over the workers' collectives, and
    # only the chief evaluates (the others keep training, or have finished).
    probs = np.concatenate([model(x[i : i + 512], training=False).numpy() for i in range(0, len(x), 512)])
    loss = float(-np.log(np.clip(probs[np.arange(len(y)), y], 1e-7, 1.0)).mean())
    return {"loss": loss, "accuracy": float((probs.argmax(axis=1) == y).mean())}


class Progress:
    """metrics.jsonl and TensorBoard events on the chief; progress.json on every worker (what the
    node's supervisor and `fab status` read)."""

    def __init__(self, run: Store, chief: bool, total_steps: int):
        import tensorflow as tf

        self.run, self.chief, self.total = run, chief, total_steps
        local = run.local_path() if chief else None
        self.dir = local if local is not None else Path(tempfile.mkdtemp(prefix="gpuforge-tf-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.writer = tf.summary.create_file_writer(str(self.dir / "tb")) if chief else None
        self.node_dir = os.environ.get("GPUFORGE_RUN_DIR")

    def log(self, step: int, values: dict[str, float], kind: str = "train") -> None:
        import tensorflow as tf

        if self.node_dir and kind == "train":
            from workloads.metrics import write_progress

            write_progress(Path(self.node_dir), {"step": step, "total_steps": self.total, **values})
        if not self.chief:
            return
        with open(self.dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "kind": kind, "time": round(time.time(), 3), **values}) + "\n")
        with self.writer.as_default(step=step):
            for key, value in values.items():
                tf.summary.scalar(f"{kind}/{key}", value)
        print(f"step {step}/{self.total} " + " ".join(f"{kind}_{k} {v:.4g}" if kind != "train" else f"{k} {v:.4g}"
                                                        for k, v in values.items()), flush=True)

    def close(self) -> None:
        if self.writer is None:
            return
        self.writer.flush()
        if self.run.local_path() is None:  # an object store: upload what was written locally
            for path in sorted(self.dir.rglob("*")):
                if path.is_file():
                    self.run.upload_file(path.relative_to(self.dir).as_posix(), path)


def build_optimizer(cfg: TrainConfig) -> Any:
    import keras

    if cfg.optimizer == "adamw":
        return keras.optimizers.AdamW(learning_rate=cfg.lr, weight_decay=cfg.weight_decay, beta_1=cfg.beta1,
                                      beta_2=cfg.beta2)
    return keras.optimizers.SGD(learning_rate=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)


def weights_sha256(model: Any) -> str:
    """Checksum of every weight (trainable or not), in the model's order: equal on every worker
    when the strategy kept the replicas in sync."""
    import hashlib

    h = hashlib.sha256()
    for weight in model.weights:
        h.update(weight.path.encode())
        h.update(weight.numpy().tobytes())
    return h.hexdigest()


def train_tf(cfg: TrainConfig, run: Store, run_id: str) -> dict[str, Any]:
    """Train on every worker of TF_CONFIG's cluster (or alone without it); the chief writes the outputs."""
    import keras
    import tensorflow as tf

    if cfg.threads:
        tf.config.threading.set_intra_op_parallelism_threads(cfg.threads)
    task = json.loads(os.environ.get("TF_CONFIG") or "{}").get("task", {})
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    workers = len(json.loads(os.environ.get("TF_CONFIG") or "{}").get("cluster", {}).get("worker", [])) or 1
    chief = task.get("index", 0) == 0
    keras.utils.set_random_seed(cfg.seed)  # identical initial weights and shuffles on every worker
    data = load_digits_nhwc(cfg)
    x_train, y_train = data["train"]
    steps_per_epoch = len(x_train) // cfg.batch_size
    total = cfg.max_steps or max(1, round(cfg.epochs * steps_per_epoch))
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    dataset = (tf.data.Dataset.from_tensor_slices((x_train, y_train)).shuffle(len(x_train), seed=cfg.seed)
               .repeat().batch(cfg.batch_size, drop_remainder=True).with_options(options))
    batches = iter(strategy.experimental_distribute_dataset(dataset))
    with strategy.scope():
        model = build_seed_cnn_tf(cfg.num_classes)
        optimizer = build_optimizer(cfg)
    per_example = keras.losses.SparseCategoricalCrossentropy(reduction="none")

    def replica_step(x: Any, y: Any) -> Any:
        with tf.GradientTape() as tape:
            loss = tf.nn.compute_average_loss(per_example(y, model(x, training=True)), global_batch_size=cfg.batch_size)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    @tf.function
    def train_step(iterator: Any) -> Any:
        return strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(replica_step, args=next(iterator)), axis=None)

    if chief:
        run.write_bytes("config.json", json.dumps(cfg.to_dict(), indent=2).encode())
        logger.info("run %s: %s, %d parameters, %d steps on %d worker(s)", run_id, cfg.model, model.count_params(),
                    total, workers)
    progress = Progress(run, chief, total)
    started = time.monotonic()
    for step in range(1, total + 1):
        loss = float(train_step(batches))
        if not math.isfinite(loss):
            from workloads.errors import WorkloadError

            raise WorkloadError(f"loss is {loss} at step {step}: training diverged; try a lower lr (now {cfg.lr})")
        if step % cfg.log_every == 0 or step in (1, total):
            rate = step * cfg.batch_size / max(time.monotonic() - started, 1e-9)
            progress.log(step, {"loss": loss, "lr": cfg.lr, "samples_per_s": round(rate, 1)})
        if chief and step % steps_per_epoch == 0 and step < total:
            progress.log(step, evaluate(model, data["val"]), kind="val")
    wall = time.monotonic() - started
    summary: dict[str, Any] = {"run_id": run_id, "framework": "tensorflow", "tensorflow": tf.__version__}
    run.write_bytes(f"replicas/worker-{task.get('index', 0)}.sha256", weights_sha256(model).encode())
    if chief:
        summary.update(finish_chief(cfg, model, data, run, progress, total, wall, workers))
    progress.close()
    return summary


def finish_chief(cfg: TrainConfig, model: Any, data: dict[str, Any], run: Store, progress: Progress, steps: int,
                 wall: float, workers: int) -> dict[str, Any]:
    """Evaluate, save the model and write summary.json (the chief only: no collectives are left)."""
    import keras

    val, test = evaluate(model, data["val"]), evaluate(model, data["test"])
    progress.log(steps, val, kind="val")
    progress.log(steps, test, kind="test")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / MODEL_FILE
        keras.saving.save_model(model, path)
        run.upload_file(MODEL_FILE, path)
    summary = {
        "job": cfg.job, "model": cfg.model, "parameters": int(model.count_params()),
        "dataset": "sklearn.datasets.load_digits", "world_size": workers, "device": "tf",
        "input_shape": list(INPUT_SHAPE), "steps": steps, "samples": steps * cfg.batch_size,
        "samples_per_s": round(steps * cfg.batch_size / wall, 1) if wall > 0 else 0.0, "wall_time_s": round(wall, 2),
        "val_loss": val["loss"], "val_accuracy": val["accuracy"], "test_loss": test["loss"],
        "test_accuracy": test["accuracy"], "files": [MODEL_FILE], "weights_sha256": weights_sha256(model),
    }
    full = {"run_id": run.url.rstrip("/").rsplit("/", 1)[-1], "framework": "tensorflow", **summary}
    run.write_bytes("summary.json", json.dumps(full, indent=2).encode())
    return summary
