#!/usr/bin/env bash
# The GPU check: run it from the project root on a machine with an NVIDIA GPU:
#   bash bench/gpu-check.sh  (the project's copy of shared/gpu-check.sh, plus the checkpoint cost of gpt-124m)
# It records real tool output (for test fixtures) and trains gpt-124m for a few hundred steps with the trainer's
# GPU path (bf16, fused AdamW, torch.compile), printing throughput and MFU. Everything lands in $OUT (or ./gpu-out).
# Bounded: about 8 minutes at most. It installs nothing; the machine's own PyTorch is used.
set -u
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
log() { echo "== $*"; }
log "tools"
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1; cat "$OUT/nvidia-smi.txt"
nvidia-smi -q >"$OUT/nvidia-smi-q.txt" 2>&1
nvidia-smi --query-gpu=index,name,uuid,driver_version,memory.total,pci.bus_id,compute_cap --format=csv,noheader \
  >"$OUT/nvidia-smi-query.csv" 2>&1
nvidia-smi topo -m >"$OUT/nvidia-smi-topo.txt" 2>&1
(lspci -nn 2>/dev/null || echo "no lspci") >"$OUT/lspci-nn.txt"
python3 - <<'PY' 2>&1 | tee "$OUT/torch.txt"
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, "sm", f"{p.major}.{p.minor}", "memory_gib", round(p.total_memory / 2**30, 1),
          "bf16", torch.cuda.is_bf16_supported(), "nccl", torch.cuda.nccl.version())
PY
log "single-GPU NCCL all-reduce through torchrun"
timeout 120 python3 -m torch.distributed.run --standalone --nproc-per-node 1 -m provision.allreduce --help >/dev/null 2>&1 \
  && timeout 180 python3 -m torch.distributed.run --standalone --nproc-per-node 1 -m provision.allreduce 2>&1 | tail -n 20 | tee "$OUT/allreduce.txt" \
  || echo "provision.allreduce did not run here (see its --help); skipped" | tee "$OUT/allreduce.txt"
log "gpt-124m, 150 steps (0.5M tokens each)"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
TB=""; python3 -c "import tensorboard" 2>/dev/null || TB="tensorboard=false"   # the machine's own packages
timeout 420 python3 -m workloads.train --job gpt-124m --storage "file://$PWD/$OUT/storage" --run-id gpu-check \
  max_steps=150 warmup_steps=20 eval_every=1000 ckpt_every=1000 $TB 2>&1 | tee "$OUT/gpt-124m.log" | grep -vE '^step [0-9]+/' | tail -n 30
grep -E '^step [0-9]+/' "$OUT/gpt-124m.log" | tail -n 5
cp "$OUT/storage/runs/gpu-check/summary.json" "$OUT/gpt-124m-summary.json" 2>/dev/null
rm -rf "$OUT/storage"/runs/*/step-* 2>/dev/null
log "checkpoint cost, gpt-124m (eager: no compile wait)"
timeout 240 python3 bench/checkpoint_cost.py --job gpt-124m --steps 3 --rounds 3 compile=false $TB 2>&1 \
  | grep -v Warning | tee "$OUT/checkpoint-cost.txt" | tail -n 5
log "done; files in $OUT"
