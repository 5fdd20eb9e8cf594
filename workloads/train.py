"""Run a training job on this machine, alone or as one process of a torchrun group.

    python -m workloads.train --list
    python -m workloads.train --job convnet-digits
    python -m workloads.train --job gpt-stdlib-tiny --storage s3://my-bucket --run-id tiny-1 max_steps=200

Two nodes (what `fab train` starts on each node; NODE_RANK 0 and 1):

    torchrun --nnodes 2 --nproc-per-node 1 --node-rank $NODE_RANK --master-addr 10.0.0.5 \
        --master-port 29500 -m workloads.train --job convnet-digits --run-id digits-1

Outputs go to <storage>/runs/<run id>/. Starting again with the same run id resumes from the
newest complete checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

DEFAULT_STORAGE = "./storage"


def default_storage() -> str:
    """$GPUFORGE_STORAGE is the run's own URL (<storage>/runs/<run id>) under the launcher; the
    storage root is what --storage takes."""
    url, run_id = os.environ.get("GPUFORGE_STORAGE", ""), os.environ.get("GPUFORGE_RUN_ID", "")
    if url and run_id and url.rstrip("/").endswith(f"/runs/{run_id}"):
        return url.rstrip("/")[: -len(f"/runs/{run_id}")]
    return url or DEFAULT_STORAGE


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m workloads.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Overrides are key=value pairs of TrainConfig fields (workloads/config.py), e.g. lr=0.01 max_steps=100.")
    p.add_argument("--job", help="job name (see --list)")
    p.add_argument("--list", action="store_true", help="list the jobs, one line each")
    p.add_argument("--storage", default=default_storage(),
                   help="file://, s3:// or gs:// URL (or a path); default $GPUFORGE_STORAGE or ./storage")
    p.add_argument("--run-id", default=os.environ.get("GPUFORGE_RUN_ID"), help="default: $GPUFORGE_RUN_ID or <job>-<time>")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    return p


def storage_url(raw: str) -> str:
    return raw if "://" in raw else Path(raw).expanduser().resolve().as_uri()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)  # key=value may come before or after options
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="%(message)s")
    logging.getLogger("workloads").setLevel(logging.DEBUG if args.debug else logging.INFO)
    from workloads.errors import WorkloadError

    if args.list:
        from workloads.jobs import describe_jobs

        for name, doc in describe_jobs():
            print(f"{name:24} {doc}")
        return 0
    if not args.job:
        print("error: --job is required (see --list)", file=sys.stderr)
        return 2
    try:
        cfg, runs = prepare(args)
    except WorkloadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return run(args, cfg, runs)


def prepare(args: argparse.Namespace):
    """Everything that can fail on bad input, before a process group or a byte of training."""
    from workloads.config import apply_overrides
    from workloads.jobs import get_job
    from workloads.storage import open_store

    cfg = apply_overrides(get_job(args.job), args.overrides)
    if cfg.job == "convnet-digits-student" and not cfg.teacher:
        from workloads.errors import ConfigError

        raise ConfigError("convnet-digits-student needs teacher=RUN_ID (a finished convnet-digits run)")
    runs = open_store(storage_url(args.storage)).child("runs")
    runs.check_access(write=True)  # every rank: a missing folder is created, not a race between ranks
    return cfg, runs


def run(args: argparse.Namespace, cfg, runs) -> int:
    if cfg.framework == "tensorflow":
        return run_tensorflow(args, cfg, runs)
    from workloads.errors import Preempted, WorkloadError
    from workloads.preempt import PREEMPTED_EXIT
    from workloads.runtime import finish, init_runtime
    from workloads.trainer import Trainer

    code = 1
    try:
        rt = init_runtime(cfg.device)
        run_id = rt.broadcast_object(args.run_id or f"{cfg.job}-{time.strftime('%Y%m%d-%H%M%S')}")
        trainer = Trainer(cfg, rt, runs.child(run_id), runs, run_id)
        summary = trainer.train()
        if rt.is_main:
            print_summary(summary, runs.child(run_id).url)
        code = 0
    except Preempted as exc:
        print(str(exc), flush=True)
        code = PREEMPTED_EXIT  # the supervisor reports the node "preempted" (workloads/preempt.py)
    except WorkloadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 2
    except Exception as exc:  # noqa: BLE001 - one clear line, traceback under --debug
        if args.debug:
            raise
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
    finish(code)
    return code


def run_tensorflow(args: argparse.Namespace, cfg, runs) -> int:
    """A TensorFlow job (workloads/tf_trainer.py): no torch import, one worker per node (TF_CONFIG)."""
    from workloads.errors import WorkloadError

    code = 1
    try:
        try:
            import tensorflow  # noqa: F401
        except ImportError:
            raise WorkloadError(f"job {cfg.job} needs TensorFlow, which this environment lacks; "
                                "`gpuforge setup --tensorflow` installs it on the nodes") from None
        from workloads.tf_trainer import train_tf

        run_id = args.run_id or f"{cfg.job}-{time.strftime('%Y%m%d-%H%M%S')}"
        summary = train_tf(cfg, runs.child(run_id), run_id)
        if "test_accuracy" in summary:
            print_summary(summary, runs.child(run_id).url, model="model.keras")
        code = 0
    except WorkloadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 2
    except Exception as exc:  # noqa: BLE001 - one clear line, traceback under --debug
        if args.debug:
            raise
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # TensorFlow's gRPC threads can hold a worker at interpreter exit


def print_summary(summary: dict, url: str, model: str = "model.pth") -> None:
    if "test_accuracy" in summary:
        print(f"test accuracy: {summary['test_accuracy']:.4f}")
    print(f"val loss: {summary['val_loss']:.4f}")
    if "quantization" in summary:
        q = summary["quantization"]
        print(f"int8 (dynamic) test accuracy: {q['test_accuracy_int8']:.4f} (fp32 {q['test_accuracy_fp32']:.4f}), "
              f"{q['state_dict_mb_int8']} MB vs {q['state_dict_mb_fp32']} MB")
    tokens = f", {summary['tokens_per_s']:.0f} tokens/s" if "tokens_per_s" in summary else ""
    print(f"steps: {summary['steps']}, {summary['samples_per_s']} samples/s{tokens}, {summary['wall_time_s']} s")
    if "peak" in summary:  # our PyTorch trainer; the TensorFlow job counts no FLOPs
        peak = summary["peak"]
        print(f"MFU: {summary['mfu_steady']:.1%} of {peak['tflops']:g} TFLOPS {peak['dtype']} "
              f"({'measured here' if peak['measured'] else 'datasheet'}: {peak['device']})")
    print(f"model: {url}/{model}")


if __name__ == "__main__":
    sys.exit(main())
