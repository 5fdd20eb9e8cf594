"""Serving cost: the model server (workloads/serve.py, LitServe with dynamic batching) against the same
model called in-process, at 1, 8 and 32 concurrent clients, for the fp32, int8 and distilled models.

    .venv/bin/python bench/serve_latency.py [--requests 400] [--runs DIR]

It trains a convnet-digits run (fp32 and int8) and a distilled student from it into DIR (default: a
temporary folder; an existing DIR with finished runs `teacher` and `student` is reused), then for each model:
in-process, `concurrency` threads call RunModel.predict on one example each (the calls serialize on the
model, as one process must); over HTTP, as many client threads POST one example each to the server on
127.0.0.1 (kept-alive connections). Every request is timed from send to answer. It prints requests/s, p50 and
p99 per level, the models' test accuracy, and ends with `ratio: X.XX` (server p50 / in-process p50 at one
client: what a request pays for HTTP, JSON and the queue).
"""

from __future__ import annotations

import argparse
import http.client
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from workloads.serve_model import load_run_model  # noqa: E402

LEVELS = (1, 8, 32)
TRAIN = {  # full-length jobs: the accuracies are the ones the README's training table reports
    "teacher": ["--job", "convnet-digits"],
    "student": ["--job", "convnet-digits-student", "teacher=teacher"],
}
READY_TIMEOUT_S = 120.0


def train_runs(storage: Path) -> None:
    for run_id, args in TRAIN.items():
        if (storage / "runs" / run_id / "summary.json").exists():
            continue
        print(f"training {run_id} ...", flush=True)
        subprocess.run([sys.executable, "-m", "workloads.train", *args, "--storage", str(storage), "--run-id", run_id,
                        "tensorboard=false"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def drive(clients: int, requests: int, call) -> dict[str, float]:
    """`clients` threads share `requests` calls; returns requests/s, p50 and p99 in ms."""
    latencies: list[float] = []
    lock = threading.Lock()
    left = [requests]

    def worker() -> None:
        state = {}
        while True:
            with lock:
                if left[0] == 0:
                    return
                left[0] -= 1
            started = time.perf_counter()
            call(state)
            elapsed = time.perf_counter() - started
            with lock:
                latencies.append(elapsed)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    return {"rps": len(latencies) / wall, "p50": percentile(latencies, 0.5) * 1e3, "p99": percentile(latencies, 0.99) * 1e3}


def start_server(run_url: str, kind: str) -> tuple[subprocess.Popen, int]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "workloads.serve", "--run-url", run_url, "--kind", kind,
                             "--port", str(port), "--device", "cpu"], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return proc, port
        except OSError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"the server for {run_url} exited with {proc.returncode}")
        time.sleep(0.3)
    proc.kill()
    raise SystemExit(f"the server for {run_url} was not ready in {READY_TIMEOUT_S:.0f} s")


def stop_server(proc: subprocess.Popen) -> None:
    import os
    import signal

    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGKILL)


def measure(run_url: str, kind: str, example: list, requests: int) -> dict[str, dict[int, dict[str, float]]]:
    import numpy as np

    model = load_run_model(run_url, kind=kind, device="cpu")
    x = np.asarray([example], dtype=np.float32)
    inproc = {c: drive(c, requests, lambda state: model.predict(x)) for c in LEVELS}
    body = json.dumps({"inputs": [example]})
    proc, port = start_server(run_url, kind)

    def post(state: dict) -> None:
        conn = state.get("conn") or http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        state["conn"] = conn
        conn.request("POST", "/predict", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        data = response.read()
        if response.status != 200:
            raise SystemExit(f"server answered {response.status}: {data[:200]!r}")

    try:
        drive(4, 40, post)  # warm-up: connections, the worker's first batches
        served = {c: drive(c, requests, post) for c in LEVELS}
    finally:
        stop_server(proc)
    return {"in-process": inproc, "server": served}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=400, help="requests per concurrency level")
    parser.add_argument("--runs", type=Path, help="storage folder with (or for) the runs `teacher` and `student`")
    args = parser.parse_args()
    storage = args.runs or Path(tempfile.mkdtemp(prefix="gpuforge-bench-serve-"))
    train_runs(storage)
    from workloads.data import load_image_data

    example = load_image_data((1, 64, 64), 0.15, 0.15).test.x[0].tolist()
    rows = []
    ratio = None
    for label, run_id, kind in (("fp32", "teacher", "fp32"), ("int8", "teacher", "int8"), ("distilled", "student", "fp32")):
        url = (storage / "runs" / run_id).as_uri()
        summary = json.loads((storage / "runs" / run_id / "summary.json").read_text())
        accuracy = summary["quantization"]["test_accuracy_int8"] if kind == "int8" else summary["test_accuracy"]
        result = measure(url, kind, example, args.requests)
        for where in ("in-process", "server"):
            for c in LEVELS:
                r = result[where][c]
                rows.append(f"| {label} | {accuracy:.3f} | {where} | {c} | {r['rps']:.0f} | {r['p50']:.2f} | {r['p99']:.2f} |")
        if label == "fp32":
            ratio = result["server"][1]["p50"] / result["in-process"][1]["p50"]
            batched = result["server"][32]["rps"] / result["in-process"][32]["rps"]
    print("| model | test accuracy | called | clients | requests/s | p50 ms | p99 ms |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"fp32 at 32 clients: server {batched:.2f}x the in-process requests/s (dynamic batching)")
    print(f"ratio: {ratio:.2f}")


if __name__ == "__main__":
    main()
