"""Datasets and per-rank batching.

- `digits`: the handwritten digits that scikit-learn ships (1,797 8x8 images, no download), or an
  .npz at any storage URL, resized to the model's input and split deterministically.
- `text`: byte-level language-model data from files at any URL; by default this Python's own
  standard-library sources (real text that is always present).

Under DDP each rank reads a disjoint shard. Batch order is a pure function of (seed, epoch, rank),
so a resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from workloads.errors import ConfigError

logger = logging.getLogger(__name__)

SPLIT_SEED = 20240601  # fixed: the train/val/test split must not move when the training seed does
MAX_SHIFT = 2  # digits augmentation: pixels of random translation at the model's resolution


@dataclass
class Split:
    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.x)

    def to(self, device: torch.device) -> Split:
        return Split(self.x.to(device), self.y.to(device))


@dataclass
class ImageData:
    train: Split
    val: Split
    test: Split
    source: str


def load_digits_arrays(data_url: str) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Images in [0, 1] as (N, 8, 8) float and labels as (N,) long."""
    if data_url:
        import numpy as np

        from workloads.storage import read_url

        blob = np.load(io.BytesIO(read_url(data_url)))
        if "images" not in blob or "labels" not in blob:
            raise ConfigError(f"{data_url}: an .npz with arrays 'images' and 'labels' is needed; found {list(blob)}")
        images = torch.as_tensor(blob["images"], dtype=torch.float32)
        images = images / images.max().clamp(min=1e-8)
        return images, torch.as_tensor(blob["labels"], dtype=torch.long), data_url
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32) / 16.0  # pixel values are 0..16
    return images, torch.as_tensor(digits.target, dtype=torch.long), "sklearn.datasets.load_digits"


def load_image_data(shape: tuple[int, int, int], val_fraction: float, test_fraction: float, data_url: str = "") -> ImageData:
    """Digits resized to `shape` (C, H, W), normalized with the training split's statistics."""
    images, labels, source = load_digits_arrays(data_url)
    channels, height, width = shape
    x = F.interpolate(images.unsqueeze(1), size=(height, width), mode="bilinear", align_corners=False)
    x = x.repeat(1, channels, 1, 1)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_test, n_val = int(len(x) * test_fraction), int(len(x) * val_fraction)
    test_idx, val_idx, train_idx = order[:n_test], order[n_test:n_test + n_val], order[n_test + n_val:]
    mean, std = x[train_idx].mean(), x[train_idx].std()
    x = (x - mean) / std
    return ImageData(Split(x[train_idx], labels[train_idx]), Split(x[val_idx], labels[val_idx]),
                     Split(x[test_idx], labels[test_idx]), source)


class ShardedBatches:
    """DistributedSampler semantics over an in-memory split: every epoch a seeded permutation,
    padded to a multiple of the world size, rank r takes positions r, r+W, ...; then batches.

    State is (epoch, batch): `state_dict()` after k batches and `load_state_dict()` resume at batch k.
    """

    def __init__(self, split: Split, batch_size: int, rank: int, world: int, seed: int, augment: bool = False):
        self.split, self.batch_size, self.rank, self.world = split, batch_size, rank, world
        self.seed, self.augment = seed, augment
        self.per_rank = math.ceil(len(split) / world)
        self.batches_per_epoch = math.ceil(self.per_rank / batch_size)
        self.epoch, self.batch = 0, 0
        self._indices: torch.Tensor | None = None

    def _epoch_indices(self) -> torch.Tensor:
        if self._indices is None:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(len(self.split), generator=g)
            padded = torch.cat([order, order[: self.per_rank * self.world - len(order)]])
            self._indices = padded[self.rank :: self.world].to(self.split.x.device)
        return self._indices

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.batch >= self.batches_per_epoch:
            self.epoch, self.batch, self._indices = self.epoch + 1, 0, None
        idx = self._epoch_indices()[self.batch * self.batch_size : (self.batch + 1) * self.batch_size]
        x, y = self.split.x[idx], self.split.y[idx]
        if self.augment:
            x = shift_images(x, self.seed * 1_000_003 + self.epoch * 10_007 + self.batch * 101 + self.rank)
        self.batch += 1
        return x, y

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batch, self._indices = int(state["epoch"]), int(state["batch"]), None


def shift_images(x: torch.Tensor, seed: int) -> torch.Tensor:
    """Translate each image by up to MAX_SHIFT pixels (zero fill), deterministically from `seed`."""
    g = torch.Generator().manual_seed(seed)
    shifts = torch.randint(-MAX_SHIFT, MAX_SHIFT + 1, (len(x), 2), generator=g)
    padded = F.pad(x, (MAX_SHIFT,) * 4, value=float(x.min()))
    h, w = x.shape[-2:]
    out = torch.empty_like(x)
    for i, (dy, dx) in enumerate(shifts.tolist()):
        out[i] = padded[i, :, MAX_SHIFT + dy : MAX_SHIFT + dy + h, MAX_SHIFT + dx : MAX_SHIFT + dx + w]
    return out


def shard_for_eval(split: Split, rank: int, world: int) -> Split:
    """Disjoint evaluation shard; sums are all-reduced, so nothing is counted twice."""
    return Split(split.x[rank::world], split.y[rank::world])


# -- text --------------------------------------------------------------------------------------


def stdlib_sources() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "dist-packages" not in p.parts)


def load_corpus(data_url: str, max_bytes: int) -> tuple[bytes, str]:
    """The text corpus as bytes (capped at max_bytes) and a description of where it came from."""
    chunks, total = [], 0
    if data_url:
        from workloads.storage import list_url, read_url

        urls = list_url(data_url)
        if not urls:
            raise ConfigError(f"data_url {data_url} holds no files")
        sources = ((u, lambda u=u: read_url(u)) for u in urls)
    else:
        sources = ((str(p), p.read_bytes) for p in stdlib_sources())
    count = 0
    for _, read in sources:
        blob = read()
        chunks.append(blob[: max_bytes - total])
        total += len(chunks[-1])
        count += 1
        if total >= max_bytes:
            break
    corpus = b"".join(chunks)
    if len(corpus) < 1024:
        raise ConfigError(f"text corpus {data_url or 'stdlib'} has only {len(corpus)} bytes; need at least 1024")
    digest = hashlib.sha256(corpus).hexdigest()[:12]
    return corpus, f"{data_url or 'python stdlib ' + sysconfig.get_paths()['stdlib']} ({count} files, {len(corpus)} bytes, sha256 {digest})"


@dataclass
class TextData:
    train: torch.Tensor
    val: torch.Tensor
    source: str


def load_text_data(data_url: str, max_bytes: int, val_fraction: float) -> TextData:
    corpus, source = load_corpus(data_url, max_bytes)
    tokens = torch.frombuffer(bytearray(corpus), dtype=torch.uint8)
    n_val = max(int(len(tokens) * val_fraction), 1)
    return TextData(tokens[:-n_val], tokens[-n_val:], source)


class LMBatches:
    """Random windows from this rank's contiguous shard of the token stream (disjoint per rank).

    The sampling generator's state is the data position: saved in checkpoints, restored on resume.
    """

    def __init__(self, tokens: torch.Tensor, batch_size: int, block_size: int, rank: int, world: int, seed: int, device: torch.device):
        shard = len(tokens) // world
        self.tokens = tokens[rank * shard : (rank + 1) * shard]
        if len(self.tokens) <= block_size + 1:
            raise ConfigError(f"text shard of {len(self.tokens)} bytes is too small for block_size {block_size}")
        self.batch_size, self.block_size, self.device = batch_size, block_size, device
        self.generator = torch.Generator().manual_seed(seed * 7919 + rank)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(len(self.tokens) - self.block_size - 1, (self.batch_size,), generator=self.generator)
        return windows(self.tokens, starts, self.block_size, self.device)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def windows(tokens: torch.Tensor, starts: torch.Tensor, block: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    idx = starts.unsqueeze(1) + torch.arange(block + 1).unsqueeze(0)
    seq = tokens[idx].long()
    return seq[:, :-1].to(device), seq[:, 1:].to(device)


def eval_windows(tokens: torch.Tensor, batches: int, batch_size: int, block: int, rank: int, world: int) -> list[torch.Tensor]:
    """A fixed set of validation window starts (same every evaluation), split across ranks."""
    g = torch.Generator().manual_seed(SPLIT_SEED)
    starts = torch.randint(len(tokens) - block - 1, (batches * batch_size,), generator=g)
    mine = starts[rank::world]
    return [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
