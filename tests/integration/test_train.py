"""The trainer end to end on this machine: outputs, DDP, resume, distillation, bad input."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import time

import pytest
import torch

from tests.support import TINY_CONVNET, child_env, read_summary, run, torchrun_cmd, train_cmd, ROOT


def state_sha(path) -> str:
    state = torch.load(path, weights_only=True)
    h = hashlib.sha256()
    for key, value in state.items():
        h.update(key.encode())
        h.update(value.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def test_run_writes_summary_models_metrics_and_exports(tmp_path):
    res = run(train_cmd("--job", "convnet-digits", "--storage", str(tmp_path), "--run-id", "r1",
                        *TINY_CONVNET, "max_steps=8", "eval_every=4", "tensorboard=true"))
    assert res.returncode == 0, res.stderr
    assert "test accuracy:" in res.stdout
    run_dir = tmp_path / "runs" / "r1"
    summary = read_summary(tmp_path, "r1")
    assert summary["steps"] == 8 and 0.0 <= summary["test_accuracy"] <= 1.0
    assert summary["samples_per_s"] > 0 and summary["wall_time_s"] > 0
    q = summary["quantization"]
    assert q["state_dict_mb_int8"] < q["state_dict_mb_fp32"] and "test_accuracy_int8" in q
    assert {"model.pth", "model.pt2", "model_int8.ts"} <= set(summary["files"])
    kinds = [json.loads(line)["kind"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert kinds.count("val") == 2 and kinds.count("test") == 1 and "train" in kinds
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    assert (run_dir / "step-8" / "manifest.json").exists()
    assert state_sha(run_dir / "model.pth") == summary["param_sha256_by_rank"][0]


def test_exported_models_load_without_gpuforge(tmp_path):
    res = run(train_cmd("--job", "convnet-digits", "--storage", str(tmp_path), "--run-id", "e", *TINY_CONVNET, "max_steps=2"))
    assert res.returncode == 0, res.stderr
    script = (
        "import sys; sys.modules['workloads'] = None\n"  # any import of our package now fails
        "import torch\n"
        f"m = torch.export.load({str(tmp_path / 'runs/e/model.pt2')!r}).module()\n"
        f"q = torch.jit.load({str(tmp_path / 'runs/e/model_int8.ts')!r})\n"
        "x = torch.randn(3, 1, 64, 64)\n"
        "print(tuple(m(x).shape), tuple(q(x).shape))\n"
    )
    out = subprocess.run([__import__("sys").executable, "-I", "-c", script], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "(3, 10) (3, 10)"


def test_ddp_two_processes_end_with_identical_parameters(tmp_path):
    res = run(torchrun_cmd(2, "--job", "convnet-digits", "--storage", str(tmp_path), "--run-id", "ddp",
                           *TINY_CONVNET, "max_steps=6", "export=none", "quantize=false"), timeout=240)
    assert res.returncode == 0, res.stderr
    summary = read_summary(tmp_path, "ddp")
    assert summary["world_size"] == 2
    sums = summary["param_sha256_by_rank"]
    assert len(sums) == 2 and sums[0] == sums[1]
    assert state_sha(tmp_path / "runs/ddp/model.pth") == sums[0]


def wait_for(path, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_killed_run_resumes_to_the_same_parameters_bitwise(tmp_path):
    args = ["--job", "convnet-digits", "--storage", str(tmp_path), *TINY_CONVNET, "max_steps=40",
            "ckpt_every=5", "export=none", "quantize=false", "augment=true"]
    straight = run(train_cmd(*args, "--run-id", "straight"))
    assert straight.returncode == 0, straight.stderr

    proc = subprocess.Popen(train_cmd(*args, "--run-id", "crash"), cwd=ROOT, env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(tmp_path / "runs/crash/step-10/manifest.json", proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert not (tmp_path / "runs/crash/summary.json").exists(), "the run finished before it was killed"
    done = max(int(p.name.split("-")[1]) for p in (tmp_path / "runs/crash").glob("step-*") if (p / "manifest.json").exists())
    partial = tmp_path / f"runs/crash/step-{done + 1}"  # a crash mid-save leaves a folder without manifest
    partial.mkdir()
    (partial / "model.pt").write_bytes(b"truncated")

    resumed = run(train_cmd(*args, "--run-id", "crash"))
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed run crash from step {done}" in resumed.stdout
    summary = read_summary(tmp_path, "crash")
    assert summary["resumed_from_step"] == done and summary["steps"] == 40
    assert state_sha(tmp_path / "runs/crash/model.pth") == state_sha(tmp_path / "runs/straight/model.pth")
    steps = [json.loads(line)["step"] for line in (tmp_path / "runs/crash/metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == sorted(set(steps)), "metrics after the checkpoint must not appear twice"


def test_student_distills_from_a_teacher_run(tmp_path):
    teacher = run(train_cmd("--job", "convnet-digits", "--storage", str(tmp_path), "--run-id", "teacher",
                            *TINY_CONVNET, "max_steps=4", "export=none", "quantize=false"))
    assert teacher.returncode == 0, teacher.stderr
    student = run(train_cmd("--job", "convnet-digits-student", "--storage", str(tmp_path), "--run-id", "student",
                            *TINY_CONVNET, "width=0.125", "teacher=teacher", "max_steps=4", "export=none", "quantize=false"))
    assert student.returncode == 0, student.stderr
    summary = read_summary(tmp_path, "student")
    assert summary["distilled_from"] == "teacher"
    assert summary["parameters"] < read_summary(tmp_path, "teacher")["parameters"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--job", "nope"], "unknown job 'nope'; valid jobs:"),
        (["--job", "convnet-digits", "lrr=1"], "unknown key 'lrr'"),
        (["--job", "convnet-digits", "lr=fast"], "lr expects a number; got 'fast'"),
        (["--job", "convnet-digits", "max_steps=-5"], "max_steps must be >= 0; got -5"),
        (["--job", "convnet-digits", "--storage", "ftp://host/x"], "ftp://host/x"),
        (["--job", "convnet-digits", "--storage", "/dev/null/storage"], "/dev/null/storage"),
        (["--job", "convnet-digits-student"], "needs teacher=RUN_ID"),
        (["--job", "convnet-digits-student", "--storage", "STORE", "teacher=missing"], "teacher 'missing'"),
    ],
)
def test_bad_input_is_one_clear_line_and_nothing_is_written(tmp_path, args, message):
    args = [str(tmp_path / "s") if a == "STORE" else a for a in args]
    res = run(train_cmd(*args), timeout=60)
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert message in res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not list((tmp_path).glob("s/runs/*"))


def test_torch_compile_trains_the_same_model(tmp_path):
    args = ["--job", "convnet-digits", "--storage", str(tmp_path), *TINY_CONVNET, "max_steps=3", "export=none",
            "quantize=false", "augment=false"]
    eager = run(train_cmd(*args, "--run-id", "eager"))
    compiled = run(train_cmd(*args, "--run-id", "compiled", "compile=true"), timeout=300)
    assert eager.returncode == 0 and compiled.returncode == 0, compiled.stderr
    a, b = read_summary(tmp_path, "eager"), read_summary(tmp_path, "compiled")
    assert abs(a["val_loss"] - b["val_loss"]) < 1e-3
    assert set(torch.load(tmp_path / "runs/compiled/model.pth", weights_only=True)) == set(
        torch.load(tmp_path / "runs/eager/model.pth", weights_only=True)), "state dict keys must not carry _orig_mod"


def test_throughput_and_mfu_in_metrics_tensorboard_and_summary(tmp_path):
    res = run(train_cmd("--job", "gpt-stdlib-tiny", "--storage", str(tmp_path), "--run-id", "lm", "max_steps=6",
                        "log_every=2", "eval_every=6", "eval_batches=1", "text_max_bytes=200000", "tensorboard=true",
                        "export=none", "threads=1"))
    assert res.returncode == 0, res.stderr
    summary = read_summary(tmp_path, "lm")
    assert summary["samples_per_s"] > 0 and summary["tokens_per_s"] == pytest.approx(summary["samples_per_s"] * 128, rel=0.01)
    assert 0 < summary["mfu"] <= 1.5 and 0 < summary["mfu_steady"] <= 1.5
    assert summary["flops_per_step"] == summary["flops_per_sample"] * 32
    assert summary["peak"]["measured"] is True and summary["peak"]["source"].startswith("measured:")
    assert "MFU:" in res.stdout and "measured here" in res.stdout
    train = [json.loads(line) for line in (tmp_path / "runs/lm/metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 4, 6]
    assert all(r["samples_per_s"] > 0 and r["tokens_per_s"] > 0 and r["mfu"] > 0 for r in train)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "runs/lm/tb"))
    events.Reload()
    assert {"train/mfu", "train/samples_per_s", "train/tokens_per_s"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("train/mfu")] == [1, 2, 4, 6]


def test_background_checkpoints_train_the_same_model_as_waiting_ones(tmp_path):
    args = ["--job", "convnet-digits", "--storage", str(tmp_path), *TINY_CONVNET, "max_steps=6", "ckpt_every=2",
            "export=none", "quantize=false"]
    waited = run(train_cmd(*args, "--run-id", "sync", "ckpt_async=false"))
    background = run(train_cmd(*args, "--run-id", "async"))
    assert waited.returncode == 0 and background.returncode == 0, background.stderr
    assert state_sha(tmp_path / "runs/sync/model.pth") == state_sha(tmp_path / "runs/async/model.pth")
    for run_id in ("sync", "async"):
        steps = sorted(int(p.name.split("-")[1]) for p in (tmp_path / "runs" / run_id).glob("step-*"))
        assert steps == [2, 4, 6] and all((tmp_path / f"runs/{run_id}/step-{s}/manifest.json").exists() for s in steps)
