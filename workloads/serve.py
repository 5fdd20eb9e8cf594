"""An HTTP inference server for a finished run's model, with dynamic batching (LitServe).

    python -m workloads.serve --run-url file:///srv/storage/runs/digits-1 [--kind int8] [--port 8000]

What `fab serve RUN` starts on a node (bound to the node's loopback, reached through an SSH tunnel):

    GET  /health    200 "ok" once the model is loaded (503 before)
    GET  /info      the model: run, kind, file, input shape, device, test accuracy
    POST /predict   {"inputs": [x, ...]}  (a batch; each x in the model's input shape)
                    -> {"outputs": [[...], ...], "labels": [k, ...]}

Concurrent requests are batched: LitServe collects up to --max-batch requests, waiting at most
--batch-timeout-ms for the batch to fill, and runs them through the model as one batch. A request
is checked before it joins a batch (JSON, `inputs` a non-empty list of numbers in the model's
shape), so a bad one gets its own 4xx and never fails its neighbours.

Why LitServe: TorchServe, which seed article 001 names, has been in "Limited Maintenance" since
early 2025 (no planned updates, fixes or security patches) and needs a Java runtime; LitServe is maintained, pure Python
(FastAPI + uvicorn), and has the dynamic batching, health route and multi-worker serving built in.
"""

import argparse
import json
import logging
import os
import time
import signal
import sys
from pathlib import Path
from typing import Any

import litserve as ls
import numpy as np
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, field_validator

logger = logging.getLogger(__name__)

DEFAULT_PORT = 8000
MAX_BATCH = 32  # requests merged into one forward pass
BATCH_TIMEOUT_MS = 2.0  # the longest a request waits for others to join its batch (what a lone request pays)
MAX_INPUTS = 1024  # examples in one request; more is a 413 (split it client-side)
STATS_EVERY_S = 0.2  # the stats file is rewritten at most this often
CHUNK = 1024  # rows per forward pass; the torch.export program allows batches up to 4096 (workloads/export.py)

EXPECTED_SHAPE: tuple[int, ...] = ()  # set in the API server process before it serves
# (no `from __future__ import annotations` here: LitServe reads decode_request's annotation as a class)


class PredictRequest(BaseModel):
    """The body of POST /predict, validated in the HTTP process (a 422 names what is wrong)."""

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")
    inputs: list

    @field_validator("inputs", mode="after")
    @classmethod
    def check_shape(cls, value: list) -> Any:
        if not value:
            raise ValueError("inputs is empty; send a batch of at least one example")
        if len(value) > MAX_INPUTS:
            raise ValueError(f"inputs has {len(value)} examples; at most {MAX_INPUTS} per request")
        try:
            array = np.asarray(value, dtype=np.float32)
        except (ValueError, TypeError):
            raise ValueError(f"inputs must be a nested list of numbers of shape [N, {', '.join(map(str, EXPECTED_SHAPE))}]"
                             " (ragged, or not numbers)") from None
        if EXPECTED_SHAPE and array.shape[1:] != EXPECTED_SHAPE:
            raise ValueError(f"each input must have shape {list(EXPECTED_SHAPE)}; got a batch of shape {list(array.shape)}")
        if not np.isfinite(array).all():
            raise ValueError("inputs contain NaN or infinity")
        return array


class RunModelAPI(ls.LitAPI):
    """The run's model behind LitServe: setup loads it in the inference worker; batch/unbatch
    merge the requests of a batch (each a batch of its own) into one forward pass and split it back."""

    def __init__(self, run_url: str, kind: str, device: str, max_batch: int, batch_timeout_ms: float,
                 stats_file: str = ""):
        super().__init__(max_batch_size=max_batch, batch_timeout=batch_timeout_ms / 1000.0)
        self.run_url, self.kind, self.device_choice, self.stats_file = run_url, kind, device, stats_file
        self.stats = {"requests": 0, "inputs": 0, "batches": 0, "largest_batch": 0}
        self.stats_written = 0.0

    def setup(self, device: str) -> None:
        from workloads.serve_model import load_run_model

        self.model = load_run_model(self.run_url, kind=self.kind, device=self.device_choice)
        logger.info("loaded %s", self.model.describe())

    def decode_request(self, request: PredictRequest) -> Any:
        return request.inputs

    def batch(self, inputs: list) -> Any:
        return np.concatenate(inputs), [len(x) for x in inputs]

    def predict(self, batched: Any) -> Any:
        x, sizes = batched
        outputs = np.concatenate([self.model.predict(x[i : i + CHUNK]) for i in range(0, len(x), CHUNK)])
        self.count(sizes)
        return outputs, sizes

    def count(self, sizes: list[int]) -> None:
        """How many requests each forward pass merged (what dynamic batching did), in --stats-file."""
        st = self.stats
        st.update(requests=st["requests"] + len(sizes), inputs=st["inputs"] + int(sum(sizes)),
                  batches=st["batches"] + 1, largest_batch=max(st["largest_batch"], len(sizes)))
        if self.stats_file and time.monotonic() - self.stats_written > STATS_EVERY_S:
            self.stats_written = time.monotonic()
            tmp = Path(self.stats_file + ".tmp")
            tmp.write_text(json.dumps(st))
            tmp.replace(self.stats_file)

    def unbatch(self, output: Any) -> list:
        outputs, sizes = output
        return np.split(outputs, np.cumsum(sizes)[:-1])

    def encode_response(self, output: Any) -> dict:
        response = {"outputs": output.tolist()}
        if output.ndim == 2:  # a classifier: the predicted class of every input
            response["labels"] = output.argmax(axis=1).tolist()
        return response


async def validation_error(request: Any, exc: RequestValidationError) -> JSONResponse:
    """422 with what is wrong, one line per problem, without echoing the (possibly large) body back."""
    problems = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error.get("loc", ())[1:]) or "body"
        problems.append(f"{where}: {str(error.get('msg', '')).removeprefix('Value error, ')}")
    return JSONResponse(status_code=422, content={"error": "; ".join(problems)})


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m workloads.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--run-url", required=True, help="the run's storage URL (<storage>/runs/<run id>)")
    p.add_argument("--kind", default="auto", help="auto | fp32 | int8 (the run's quantized model)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--max-batch", type=int, default=MAX_BATCH, help="requests merged into one batch")
    p.add_argument("--batch-timeout-ms", type=float, default=BATCH_TIMEOUT_MS, help="wait for a batch to fill")
    p.add_argument("--stats-file", default="", help="keep request/batch counts in this JSON file")
    return p


def main(argv: list[str] | None = None) -> int:
    global EXPECTED_SHAPE
    args = build_parser().parse_args(argv)
    # The model's OpenMP threads sleep between batches instead of spinning (GNU OpenMP spins after each
    # forward by default): on a small node the spin starves the HTTP process that feeds the next batch.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from workloads.errors import WorkloadError
    from workloads.serve_model import KINDS, load_run_model

    if args.kind not in KINDS or not 0 < args.port < 65536 or args.max_batch < 1 or args.batch_timeout_ms < 0:
        print(f"error: --kind must be one of {', '.join(KINDS)}, --port 1..65535, --max-batch >= 1, "
              "--batch-timeout-ms >= 0", file=sys.stderr)
        return 2
    try:  # load once here: a missing or broken model is one clear line before any port is opened
        probe = load_run_model(args.run_url, kind=args.kind, device=args.device)
    except WorkloadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    EXPECTED_SHAPE = probe.input_shape
    described = probe.describe()
    print(f"serving {described}", flush=True)
    del probe

    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `serve --stop`: LitServe's own graceful shutdown
    api = RunModelAPI(args.run_url, args.kind, args.device, args.max_batch, args.batch_timeout_ms, args.stats_file)
    accelerator = "cpu" if args.device == "cpu" or args.kind == "int8" else "auto"
    server = ls.LitServer(api, accelerator=accelerator, devices=1, timeout=30, model_metadata=described,
                          fast_queue=True)  # ZeroMQ between the HTTP and model processes: ~4 ms less per request than
                                            # the default multiprocessing-manager queues (measured here)
    server.app.add_exception_handler(RequestValidationError, validation_error)
    try:
        server.run(host=args.host, port=args.port, generate_client_file=False, log_level="warning")
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
