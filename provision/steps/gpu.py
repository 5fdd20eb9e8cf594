"""The GPU steps, in the order they run on a node (after facts and base, around python_env):

    nvidia-repo, nvidia-driver, fabric-manager, cuda-toolkit, gdrcopy, efa   system software (GPU_SYSTEM_STEPS)
    gpu-verify                                                                needs the node venv's torch

Each one skips itself on nodes without an NVIDIA GPU; fabric-manager only runs on NVSwitch systems, gdrcopy
and efa only where EFA exists (in the EC2 guide's order: driver and CUDA, then GDRCopy, then the EFA installer;
one reboot, the driver's, unless the EFA installer asks for another). `allreduce_command` gives the cross-node check the runner starts afterwards.
"""

from __future__ import annotations

from provision.steps.base import Step
from provision.steps.cuda import CudaToolkitStep
from provision.steps.efa import EfaStep, nccl_env, nccl_env_lines
from provision.steps.gdrcopy import GdrcopyStep
from provision.steps.gpu_verify import GpuVerifyStep, allreduce_command
from provision.steps.nvidia import FabricManagerStep, NvidiaDriverStep, NvidiaRepoStep

GPU_STEPS: list[Step] = [
    NvidiaRepoStep(),
    NvidiaDriverStep(),
    FabricManagerStep(),
    CudaToolkitStep(),
    GdrcopyStep(),
    EfaStep(),
    GpuVerifyStep(),
]
GPU_SYSTEM_STEPS: list[Step] = GPU_STEPS[:-1]
"""Run these before python_env (they install system packages and may reboot)."""
GPU_VERIFY_STEP: Step = GPU_STEPS[-1]
"""Run this after python_env/workload: it imports torch from the node venv."""

__all__ = [
    "GPU_STEPS",
    "GPU_SYSTEM_STEPS",
    "GPU_VERIFY_STEP",
    "CudaToolkitStep",
    "EfaStep",
    "FabricManagerStep",
    "GdrcopyStep",
    "GpuVerifyStep",
    "NvidiaDriverStep",
    "NvidiaRepoStep",
    "allreduce_command",
    "nccl_env",
    "nccl_env_lines",
]
