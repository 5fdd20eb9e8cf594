"""GPU verify step (every GPU visible to nvidia-smi and usable from the node's torch) and the command
for the cross-node all-reduce check the runner starts once every node passes.
"""

from __future__ import annotations

import shlex
from typing import Any

from provision.steps.base import Cmd, Step, StepContext, fingerprint_of
from provision.steps.gpu_common import expected_gpu_count, gpu_model_of, sh, versions_for
from provision.versions import NCCL_ENV_FILE

DEFAULT_SIZES = "1M,16M,256M"
DEFAULT_ITERS = 20
# Runs under the node venv's python: argv = expected GPU count, expected torch.version.cuda.
TORCH_CHECK = """import math, sys, torch
want_gpus, want_cuda = int(sys.argv[1]), sys.argv[2]
if not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__} (CUDA {torch.version.cuda}) cannot use the GPUs: torch.cuda.is_available() is False")
if torch.version.cuda != want_cuda:
    sys.exit(f"torch {torch.__version__} is built for CUDA {torch.version.cuda}, expected {want_cuda}")
if torch.cuda.device_count() != want_gpus:
    sys.exit(f"torch sees {torch.cuda.device_count()} GPUs, expected {want_gpus}")
for i in range(want_gpus):
    x = torch.randn(2048, 2048, device=f"cuda:{i}")
    norm = (x @ x).norm().item()
    if not math.isfinite(norm):
        sys.exit(f"cuda:{i}: matmul returned {norm}")
    print(f"cuda:{i} {torch.cuda.get_device_name(i)}: matmul ok")
"""


def gpu_count_script(n: int) -> str:
    """nvidia-smi must succeed and list `n` GPU indexes: only lines that are a bare index count (an error line
    such as "Unable to determine the device handle for GPU0000:10:1C.0: Unknown Error" is not a GPU)."""
    return ('gf_out=$(nvidia-smi --query-gpu=index --format=csv,noheader 2>&1) || '
            '{ echo "nvidia-smi failed: $gf_out" >&2; exit 1; }; '
            "n=$(printf '%s\\n' \"$gf_out\" | grep -cxE '[[:space:]]*[0-9]+[[:space:]]*'); "
            f'[ "$n" -eq {n} ] || {{ echo "nvidia-smi sees $n GPUs, expected {n}: $gf_out" >&2; exit 1; }}')


class GpuVerifyStep(Step):
    name = "gpu-verify"
    description = "nvidia-smi sees every GPU; torch.cuda works and multiplies matrices on each"
    gpu = True

    def fingerprint(self, ctx: StepContext) -> str:
        vs = versions_for(ctx)
        return fingerprint_of(self.name, vs.torch, expected_gpu_count(ctx), vs.torch_cuda_version(gpu_model_of(ctx)))

    def check(self, conn: Any, ctx: StepContext) -> bool:
        """Never "already done": a node is ready only when this passes on this run."""
        return False

    def plan(self, ctx: StepContext) -> list[Cmd]:
        vs = versions_for(ctx)
        n = expected_gpu_count(ctx)
        cuda = vs.torch_cuda_version(gpu_model_of(ctx))
        return [
            sh(gpu_count_script(n), desc=f"verify: nvidia-smi lists all {n} GPUs"),
            Cmd(f"{ctx.python} -c {shlex.quote(TORCH_CHECK)} {n} {cuda}", timeout=300.0,
                desc=f"verify: torch {vs.torch} (CUDA {cuda}) sees {n} GPUs and runs a matmul on each"),
        ]


def allreduce_command(
    ctx: StepContext,
    nnodes: int,
    node_rank: int,
    master_addr: str,
    master_port: int,
    nproc: int,
    sizes: str = DEFAULT_SIZES,
    iters: int = DEFAULT_ITERS,
    backend: str = "auto",
    nccl_debug: bool = False,
) -> str:
    """The command one node runs for the cluster all-reduce check (start it on every node, rank 0's
    private address as master): torchrun with static rendezvous running provision.allreduce, after
    sourcing the EFA NCCL environment where the efa step wrote one. Rank 0 prints the table and JSON."""
    run = (
        f"{ctx.python} -m torch.distributed.run --nnodes={nnodes} --nproc-per-node={nproc} "
        f"--node-rank={node_rank} --master-addr={shlex.quote(master_addr)} --master-port={master_port} "
        f"--max-restarts=0 -m provision.allreduce --sizes {shlex.quote(sizes)} --iters {iters} --backend {backend}"
    )
    # NCCL_DEBUG=INFO names the transport NCCL chose (NET/OFI + provider on EFA): the readiness check reads it.
    debug = "export NCCL_DEBUG=INFO NCCL_DEBUG_SUBSYS=INIT,NET; " if nccl_debug else ""
    return "sh -c " + shlex.quote(f"{debug}if [ -r {NCCL_ENV_FILE} ]; then . {NCCL_ENV_FILE}; fi; exec {run}")
