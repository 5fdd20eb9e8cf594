"""Training with s3:// (moto server) and gs:// (GCS emulator) storage: checkpoints, metrics,
models and resume all go through the object store."""

from __future__ import annotations

import json

import pytest

from tests.fakes.gcs import gcs_bucket, gcs_emulator, gcs_env  # noqa: F401
from tests.fakes.s3 import moto_server, s3_bucket, s3_env  # noqa: F401
from tests.support import TINY_CONVNET, run, train_cmd

ARGS = [*TINY_CONVNET, "tensorboard=true", "export=torch.export", "quantize=false", "ckpt_every=3"]


def check_run_in_bucket(keys: set[str], read, prefix: str) -> None:
    for key in ("summary.json", "model.pth", "model.pt2", "metrics.jsonl", "config.json", "step-6/manifest.json"):
        assert f"{prefix}/{key}" in keys, f"{key} missing from {sorted(keys)}"
    assert any(k.startswith(f"{prefix}/tb/events.out.tfevents") for k in keys)
    assert json.loads(read(f"{prefix}/summary.json"))["steps"] == 6


@pytest.mark.parametrize("steps", [(4, 6)])
def test_s3_storage_holds_the_run_and_resumes_from_it(s3_bucket, steps):
    env = s3_env(s3_bucket.endpoint)
    url = f"s3://{s3_bucket.name}/team"
    first = run(train_cmd("--job", "convnet-digits", "--storage", url, "--run-id", "s3run", *ARGS, f"max_steps={steps[0]}"), **env)
    assert first.returncode == 0, first.stderr
    second = run(train_cmd("--job", "convnet-digits", "--storage", url, "--run-id", "s3run", *ARGS, f"max_steps={steps[1]}"), **env)
    assert second.returncode == 0, second.stderr
    assert "resumed run s3run from step 4" in second.stdout
    listed = s3_bucket.client.list_objects_v2(Bucket=s3_bucket.name, Prefix="team/runs/s3run/")
    keys = {o["Key"] for o in listed["Contents"]}
    read = lambda k: s3_bucket.client.get_object(Bucket=s3_bucket.name, Key=k)["Body"].read()  # noqa: E731
    check_run_in_bucket(keys, read, "team/runs/s3run")
    assert "team/runs/s3run/step-3/manifest.json" in keys  # the first run's checkpoints are kept (keep_last=3)


def test_gcs_storage_holds_the_run_and_resumes_from_it(gcs_bucket):
    env = gcs_env(gcs_bucket.host)
    url = f"gs://{gcs_bucket.name}"
    first = run(train_cmd("--job", "convnet-digits", "--storage", url, "--run-id", "gsrun", *ARGS, "max_steps=4"), **env)
    assert first.returncode == 0, first.stderr
    second = run(train_cmd("--job", "convnet-digits", "--storage", url, "--run-id", "gsrun", *ARGS, "max_steps=6"), **env)
    assert second.returncode == 0, second.stderr
    assert "resumed run gsrun from step 4" in second.stdout
    bucket = gcs_bucket.client.bucket(gcs_bucket.name)
    keys = {b.name for b in gcs_bucket.client.list_blobs(gcs_bucket.name, prefix="runs/gsrun/")}
    check_run_in_bucket(keys, lambda k: bucket.blob(k).download_as_bytes(), "runs/gsrun")


def test_missing_bucket_is_a_clear_error_before_training(s3_bucket):
    res = run(train_cmd("--job", "convnet-digits", "--storage", "s3://no-such-bucket-here/x", *ARGS, "max_steps=2"),
              timeout=60, **s3_env(s3_bucket.endpoint))
    assert res.returncode == 2
    assert "s3://no-such-bucket-here" in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
