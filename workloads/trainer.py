"""One training loop for every job: DDP, accumulation, clipping, bf16 autocast on CUDA, eval,
checkpoints (saved in the background) with resume, metrics with throughput and MFU, export,
quantization and distillation.

The models and data are plug-ins chosen by TrainConfig; this file never names a job.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from workloads import data as D
from workloads.environment import node_environment
from workloads.checkpoint import CheckpointManager
from workloads.config import TrainConfig
from workloads.errors import ConfigError, Preempted, WorkloadError
from workloads.export import export_model, save_state_dict
from workloads.metrics import MetricsLogger, write_progress
from workloads.notice import Notice
from workloads.models import INPUT_SHAPES, build_model, count_params, input_shape
from workloads.optimize import distill_loss, load_teacher, quantize_dynamic_int8, state_dict_bytes
from workloads.runtime import Runtime
from workloads.storage import Store
from workloads.throughput import Throughput, count_flops_per_sample, find_peak

logger = logging.getLogger(__name__)

EVAL_BATCH = 512  # classifier evaluation batch; the whole digits split fits in a few


class Trainer:
    def __init__(self, cfg: TrainConfig, rt: Runtime, run: Store, runs: Store, run_id: str):
        self.cfg, self.rt, self.run, self.runs, self.run_id = cfg, rt, run, runs, run_id
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.use_deterministic_algorithms(cfg.deterministic, warn_only=rt.device.type == "cuda")
        micro = cfg.batch_size // (rt.world * cfg.grad_accum)
        if micro * rt.world * cfg.grad_accum != cfg.batch_size:
            raise ConfigError(f"batch_size {cfg.batch_size} must be a multiple of processes ({rt.world}) x grad_accum ({cfg.grad_accum})")
        self.micro = micro
        self.data_source = self._load_data()
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.model = build_model(cfg).to(rt.device)
        self.use_bf16 = rt.device.type == "cuda" and (cfg.precision == "bf16" or (cfg.precision == "auto" and torch.cuda.is_bf16_supported()))
        # FLOPs counted once, on the bare model before DDP or compile wrap it; the peak they are held against
        self.throughput = Throughput(count_flops_per_sample(self.model, cfg, rt.device), find_peak(rt.device, self.use_bf16),
                                     None if cfg.is_classifier else cfg.block_size)
        self.net: nn.Module = DDP(self.model, device_ids=[rt.local_rank] if rt.device.type == "cuda" else None) if rt.distributed else self.model
        if cfg.compile:
            self.net = torch.compile(self.net)
        self.optimizer = self._build_optimizer()
        self.total_steps = self._total_steps()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.teacher = self._load_teacher() if cfg.teacher else None
        self.ckpt = CheckpointManager(run, cfg.keep_last, pin_memory=rt.device.type == "cuda")
        self.metrics = MetricsLogger(run, cfg.tensorboard, self.total_steps) if rt.is_main else None
        torch.manual_seed(cfg.seed + 1 + rt.rank)  # dropout differs per rank, reproducibly
        self.step, self.resumed_from, self.samples, self.saved_step = 0, None, 0, None
        self.window_mfu: list[float] = []  # MFU of each logged window after the first (which holds the warm-up)

    # -- set-up ----------------------------------------------------------------------------

    def _load_data(self) -> str:
        cfg, rt = self.cfg, self.rt
        if cfg.is_classifier:
            self.images = D.load_image_data(INPUT_SHAPES[cfg.model], cfg.val_fraction, cfg.test_fraction, cfg.data_url)
            train = self.images.train.to(rt.device)
            self.batches = D.ShardedBatches(train, self.micro, rt.rank, rt.world, cfg.seed, cfg.augment)
            return self.images.source
        self.text = D.load_text_data(cfg.data_url, cfg.text_max_bytes, cfg.val_fraction)
        self.batches = D.LMBatches(self.text.train, self.micro, cfg.block_size, rt.rank, rt.world, cfg.seed, rt.device)
        return self.text.source

    def _build_optimizer(self) -> torch.optim.Optimizer:
        cfg = self.cfg
        decay = [p for p in self.model.parameters() if p.dim() >= 2]  # no weight decay on biases and norms
        other = [p for p in self.model.parameters() if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": other, "weight_decay": 0.0}]
        if cfg.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
        fused = self.rt.device.type == "cuda"  # fused AdamW: one kernel for all parameters
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)

    def _total_steps(self) -> int:
        if self.cfg.max_steps:
            return self.cfg.max_steps
        per_epoch = math.ceil(self.batches.batches_per_epoch / self.cfg.grad_accum)
        return max(1, round(self.cfg.epochs * per_epoch))

    def _lr_factor(self, step: int) -> float:
        cfg = self.cfg
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        span = max(1, self.total_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def _load_teacher(self) -> nn.Module:
        teacher, tcfg = load_teacher(self.cfg.teacher, self.runs, self.rt.device)
        if input_shape(tcfg) != input_shape(self.cfg):
            raise ConfigError(f"teacher {self.cfg.teacher} takes inputs {input_shape(tcfg)}, this model {input_shape(self.cfg)}")
        return teacher

    @property
    def eval_every(self) -> int:
        if self.cfg.eval_every:
            return self.cfg.eval_every
        if self.cfg.is_classifier and not self.cfg.max_steps:
            return max(1, math.ceil(self.batches.batches_per_epoch / self.cfg.grad_accum))
        return self.total_steps

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.use_bf16:
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # -- the loop ----------------------------------------------------------------------------

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = self.net(x)
        if not self.cfg.is_classifier:
            return F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
        if self.teacher is None:
            return F.cross_entropy(logits, y)
        with torch.no_grad():
            teacher_logits = self.teacher(x)
        return distill_loss(logits, teacher_logits, y, self.cfg.distill_alpha, self.cfg.distill_temperature)

    def train_step(self) -> torch.Tensor:
        """One optimizer step over grad_accum micro-batches; returns the mean loss (no host sync)."""
        accum = self.cfg.grad_accum
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.rt.device)
        for micro in range(accum):
            x, y = self.batches.next()
            last = micro == accum - 1
            sync = contextlib.nullcontext() if last or not self.rt.distributed else self.net.no_sync()
            with sync:
                with self.autocast():
                    loss = self.loss(x, y) / accum
                loss.backward()
            total += loss.detach()
            self.samples += len(x)
        if self.cfg.grad_clip:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return total

    def train(self) -> dict[str, Any]:
        cfg, rt = self.cfg, self.rt
        self.resume()
        if rt.is_main:
            self.run.write_bytes("config.json", json.dumps(cfg.to_dict(), indent=2).encode())
            logger.info("run %s: %s, %d parameters, %d steps on %d process(es), %s", self.run_id, cfg.model,
                        count_params(self.model), self.total_steps, rt.world, rt.device)
        started, start_step, start_samples = time.monotonic(), self.step, self.samples
        self.window = (started, self.samples)  # the logged rates are over the steps since the previous log
        self.net.train()
        notice = Notice(rt)  # a preemption notice (SIGUSR1 from the node's supervisor, workloads/preempt.py)
        try:
            while self.step < self.total_steps:
                if notice.agreed():
                    self.save_on_notice(notice)
                loss = self.train_step()
                if self.step % cfg.log_every == 0 or self.step in (self.total_steps, start_step + 1):
                    self.log_train(loss, first=self.step == start_step + 1)  # the first step tells the launcher training began
                if self.step % self.eval_every == 0 and self.step < self.total_steps:
                    self.log_eval(self.evaluate("val"))
                if cfg.ckpt_every and self.step % cfg.ckpt_every == 0 and self.step < self.total_steps:
                    self.save_checkpoint(wait=not cfg.ckpt_async)
            notice.close()
            wall = time.monotonic() - started
            if self.step != self.resumed_from:  # a run resumed from its last checkpoint has nothing new to save
                self.save_checkpoint(wait=True)
            self.ckpt.close()
        except BaseException:
            with contextlib.suppress(Exception):  # a save in flight still completes; the first error is the one to tell
                self.ckpt.close()
            raise
        samples = (self.samples - start_samples) * rt.world
        return self.finalize(wall, samples if self.step > start_step else 0)

    def log_train(self, loss: torch.Tensor, first: bool = False) -> None:
        loss = (self.rt.all_reduce_sum(loss.detach().float().clone()) / self.rt.world).item()  # waits for the device
        now = time.monotonic()
        if not math.isfinite(loss):
            raise WorkloadError(f"loss is {loss} at step {self.step}: training diverged; "
                                f"try a lower lr (now {self.cfg.lr}) or grad_clip=1.0")
        since, samples_then = self.window
        rates = self.throughput.rates((self.samples - samples_then) * self.rt.world, now - since, self.rt.world)
        self.window = (now, self.samples)
        if not first:
            self.window_mfu.append(rates["mfu"])
        values = {"loss": loss, "lr": self.scheduler.get_last_lr()[0], **rates}
        if self.metrics is not None:
            self.metrics.log(self.step, values)
            self.metrics.print(self.step, values)
        elif self.rt.local_rank == 0 and os.environ.get("GPUFORGE_RUN_DIR"):
            write_progress(Path(os.environ["GPUFORGE_RUN_DIR"]), {"step": self.step, "total_steps": self.total_steps, **values})

    def log_eval(self, values: dict[str, float], kind: str = "val") -> None:
        if self.metrics is not None:
            self.metrics.log(self.step, values, kind=kind)
            self.metrics.print(self.step, {f"{kind}_{k}": v for k, v in values.items()})
            self.metrics.flush()

    # -- evaluation --------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, split: str, model: nn.Module | None = None) -> dict[str, float]:
        """Loss (and accuracy for classifiers) over a split, sharded across ranks and summed."""
        model = model or self.model
        was_training = model.training
        model.eval()
        sums = torch.zeros(3, dtype=torch.float64, device=self.rt.device)  # loss sum, correct, count
        for x, y in self._eval_batches(split):
            with self.autocast():
                logits = model(x)
            if self.cfg.is_classifier:
                sums[0] += F.cross_entropy(logits.float(), y, reduction="sum")
                sums[1] += (logits.argmax(-1) == y).sum()
                sums[2] += len(y)
            else:
                sums[0] += F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum")
                sums[2] += y.numel()
        self.rt.all_reduce_sum(sums)
        model.train(was_training)
        count = max(sums[2].item(), 1.0)
        out = {"loss": sums[0].item() / count}
        if self.cfg.is_classifier:
            out["accuracy"] = sums[1].item() / count
        return out

    def _eval_batches(self, split: str):
        rt = self.rt
        if self.cfg.is_classifier:
            shard = D.shard_for_eval(getattr(self.images, split), rt.rank, rt.world).to(rt.device)
            for i in range(0, len(shard), EVAL_BATCH):
                yield shard.x[i : i + EVAL_BATCH], shard.y[i : i + EVAL_BATCH]
            return
        for starts in D.eval_windows(self.text.val, self.cfg.eval_batches, self.micro, self.cfg.block_size, rt.rank, rt.world):
            yield D.windows(self.text.val, starts, self.cfg.block_size, rt.device)

    # -- checkpoints -------------------------------------------------------------------------

    def rng_state(self) -> dict[str, Any]:
        state = {"cpu": torch.get_rng_state(), "data": self.batches.state_dict()}
        if self.rt.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.rt.device)
        return state

    def save_checkpoint(self, wait: bool = False) -> None:
        """Rank 0 saves the (replicated) state; the loop goes on once DCP has copied it to host
        memory, unless `wait`: then every rank returns when the checkpoint is complete."""
        per_rank = self.rt.all_gather_object(self.rng_state())
        self.saved_step = self.step  # on every rank: a notice at this step then only waits for this save
        if self.rt.is_main:
            parts = {"model": self.model.state_dict(), "train_state": {
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "step": self.step, "samples": self.samples, "ranks": per_rank}}
            meta = {"step": self.step, "run_id": self.run_id, "world": self.rt.world, "config": self.cfg.to_dict(), "time": time.time()}
            self.ckpt.save_async(self.step, parts, meta)
            if self.metrics is not None:
                self.metrics.flush()
            if wait:
                self.ckpt.wait()
        if wait:
            self.rt.barrier()

    def save_on_notice(self, notice: Notice) -> None:
        """A complete checkpoint now (after the one in flight, if any), then stop the run as preempted."""
        if self.saved_step == self.step:
            self.ckpt.wait()  # this step's save is already under way: only wait for it
            self.rt.barrier()
        else:
            self.save_checkpoint(wait=True)
        raise Preempted(self.step, notice.record(self.step))

    def resume(self) -> None:
        """Continue from the newest complete checkpoint of this run id, if there is one."""
        step = self.rt.broadcast_object(self.ckpt.latest() if self.rt.is_main else None)
        if step is None:
            return
        parts, meta = self.ckpt.load(step, map_location=self.rt.device)
        self.model.load_state_dict(parts["model"])
        state = parts["train_state"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.samples, self.resumed_from = state["step"], state["samples"], step
        ranks = state["ranks"]
        mine = ranks[self.rt.rank] if len(ranks) == self.rt.world else ranks[0]
        if len(ranks) != self.rt.world:
            logger.warning("checkpoint was written by %d processes, resuming on %d: data order changes", len(ranks), self.rt.world)
        torch.set_rng_state(mine["cpu"].cpu())
        if "cuda" in mine and self.rt.device.type == "cuda":
            torch.cuda.set_rng_state(mine["cuda"].cpu(), self.rt.device)
        self.batches.load_state_dict(mine["data"])
        if self.metrics is not None:
            self.metrics.truncate_after(step)
        if self.rt.is_main:
            print(f"resumed run {self.run_id} from step {step} of {self.total_steps}", flush=True)

    # -- the end -----------------------------------------------------------------------------

    def finalize(self, wall: float, samples: int) -> dict[str, Any]:
        cfg, rt = self.cfg, self.rt
        rates = self.throughput.rates(samples, wall, rt.world) if samples else {"samples_per_s": 0.0, "mfu": 0.0}
        val = self.evaluate("val")
        self.log_eval(val)
        test = self.evaluate("test") if cfg.is_classifier else None
        summary: dict[str, Any] = {
            "run_id": self.run_id, "job": cfg.job, "model": cfg.model, "parameters": count_params(self.model),
            "dataset": self.data_source, "world_size": rt.world, "device": str(rt.device),
            "steps": self.step, "samples": self.samples * rt.world, **rates,
            "mfu_steady": round(statistics.median(self.window_mfu), 6) if self.window_mfu else rates["mfu"],
            "flops_per_sample": self.throughput.flops_per_sample,
            "flops_per_step": self.throughput.flops_per_sample * cfg.batch_size,
            "peak": self.throughput.peak.to_dict(),
            "wall_time_s": round(wall, 2), "resumed_from_step": self.resumed_from,
            "val_loss": val["loss"],
        }
        if cfg.teacher:
            summary["distilled_from"] = cfg.teacher
        if test is not None:
            summary.update(val_accuracy=val["accuracy"], test_loss=test["loss"], test_accuracy=test["accuracy"])
            self.log_eval(test, kind="test")
        summary["param_sha256_by_rank"] = self.check_replicas()
        summary["environment"] = node_environment()  # torch/CUDA/NCCL/driver and the node lock it ran with
        if rt.is_main:
            summary["files"] = self.write_model_files(summary)
            self.run.write_bytes("summary.json", json.dumps(summary, indent=2).encode())
            self.metrics.close()
        rt.barrier()
        return summary

    def check_replicas(self) -> list[str]:
        """Every rank's parameter checksum; DDP replicas that drifted apart are an error, not a result."""
        sums = self.rt.all_gather_object(param_sha256(self.model))
        if len(set(sums)) > 1:
            raise WorkloadError(f"model replicas diverged across ranks: {sums}")
        return sums

    def write_model_files(self, summary: dict[str, Any]) -> list[str]:
        cfg = self.cfg
        save_state_dict(self.model, self.run)
        files = ["model.pth"]
        example = next(self._eval_batches("val"))[0][:2]
        exported = export_model(self.model, example, self.run, cfg.export)
        files += [exported] if exported else []
        if cfg.quantize and cfg.is_classifier:
            summary["quantization"] = self.quantize_report()
            files.append("model_int8.ts")
        return files

    def quantize_report(self) -> dict[str, Any]:
        """Dynamic int8 on CPU; accuracy before/after on the whole test split (this rank alone)."""
        fp32 = build_model(self.cfg)
        fp32.load_state_dict({k: v.cpu() for k, v in self.model.state_dict().items()})
        fp32.eval()
        int8 = quantize_dynamic_int8(fp32)
        x, y = self.images.test.x.cpu(), self.images.test.y
        with torch.no_grad():
            acc_fp32 = (fp32(x).argmax(-1) == y).float().mean().item()
            acc_int8 = (int8(x).argmax(-1) == y).float().mean().item()
        with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
            path = Path(tmp) / "model_int8.ts"
            torch.jit.trace(int8, x[:2]).save(str(path))
            self.run.upload_file("model_int8.ts", path)
        return {"test_accuracy_fp32": acc_fp32, "test_accuracy_int8": acc_int8,
                "state_dict_mb_fp32": round(state_dict_bytes(fp32) / 2**20, 2),
                "state_dict_mb_int8": round(state_dict_bytes(int8) / 2**20, 2), "scheme": "dynamic int8, nn.Linear"}



def param_sha256(model: nn.Module) -> str:
    """Checksum of every parameter and buffer, in state-dict order."""
    import hashlib

    h = hashlib.sha256()
    for key, value in model.state_dict().items():
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
