"""The preemption watcher: read the cloud's metadata service on a spot/preemptible node, and on notice
ask the run to checkpoint now.

    watcher = PreemptionWatcher("aws", on_notice=lambda why: ...)   # or "gcp"; a thread of the run's supervisor
    watcher.start(); ...; watcher.stop()

What the services answer (their documented rules, which the stand-ins in tests/fakes/metadata.py follow):
- AWS (https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/spot-instance-termination-notices.html):
  `GET /latest/meta-data/spot/instance-action` is 404 until EC2 marks the instance for interruption, then
  200 with `{"action": "terminate"|"stop"|"hibernate", "time": "...Z"}`, two minutes before it happens; AWS
  advises checking every 5 s. With IMDSv2 (required on our instances) each GET carries a session token
  from `PUT /latest/api/token` (header `X-aws-ec2-metadata-token-ttl-seconds`); a GET without one is 401.
- GCP (https://cloud.google.com/compute/docs/instances/create-use-preemptible, "detect if a VM was
  preempted"): `GET /computeMetadata/v1/instance/preempted` with `Metadata-Flavor: Google` (403 without it)
  is `FALSE`, and `TRUE` once the VM is being preempted, 30 s before it stops; `?wait_for_change=true`
  holds the request until the value changes, so the notice arrives at once without polling.

The signal: the supervisor starts the run's processes with SIGUSR1 ignored (so torchrun and a plain
script are not killed by it) and, on notice, sends SIGUSR1 to every process of the run (torchrun's workers are in sessions of their own); our trainer
installs a handler (workloads/trainer.py) that saves a complete checkpoint at the next step and exits
with PREEMPTED_EXIT, after writing PREEMPTED_MARKER in the node's run folder: the node's state is then
"preempted", not "failed".
"""

from __future__ import annotations

import json
import logging
import threading
import urllib.error
import urllib.request
from typing import Callable

logger = logging.getLogger(__name__)

AWS_METADATA = "http://169.254.169.254"
GCP_METADATA = "http://metadata.google.internal"
AWS_ACTION_PATH = "/latest/meta-data/spot/instance-action"
AWS_TOKEN_PATH = "/latest/api/token"
GCP_PREEMPTED_PATH = "/computeMetadata/v1/instance/preempted"
AWS_TOKEN_TTL_S = 21600  # IMDSv2's maximum (6 h); the watcher renews it when a GET says 401
AWS_POLL_S = 5.0  # AWS: "we recommend that you check for these interruption notices every 5 seconds"
GCP_RETRY_S = 5.0  # after a failed long poll (the metadata server restarting), before the next one
GCP_WAIT_TIMEOUT_S = 300  # a long poll is re-issued at least this often (`timeout_sec` of the request)
REQUEST_TIMEOUT_S = 2.0  # one metadata request on a healthy node answers in milliseconds
PREEMPTED_EXIT = 75  # EX_TEMPFAIL: "try again later"; what our trainer exits with after its notice checkpoint
PREEMPTED_MARKER = "preempted.json"  # written by the trainer in GPUFORGE_RUN_DIR: step, seconds to save
NOTICE_SIGNAL = "SIGUSR1"
CLOUDS = ("aws", "gcp")


def default_base(cloud: str) -> str:
    return AWS_METADATA if cloud == "aws" else GCP_METADATA


def aws_token(base: str) -> str:
    req = urllib.request.Request(base + AWS_TOKEN_PATH, method="PUT",
                                 headers={"X-aws-ec2-metadata-token-ttl-seconds": str(AWS_TOKEN_TTL_S)})
    with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT_S) as resp:
        return resp.read().decode().strip()


def aws_notice(base: str, token: str) -> str | None:
    """The pending interruption ("terminate at 2026-...Z"), or None (404: not marked)."""
    req = urllib.request.Request(base + AWS_ACTION_PATH, headers={"X-aws-ec2-metadata-token": token})
    try:
        with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT_S) as resp:
            body = json.loads(resp.read().decode() or "{}")
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise
    return f"AWS spot interruption: {body.get('action', '?')} at {body.get('time', '?')}"


def gcp_preempted(base: str, wait: bool) -> bool:
    """`TRUE` or `FALSE`; with `wait`, the answer comes when the value changes (or at the wait's timeout)."""
    query = f"?wait_for_change=true&timeout_sec={GCP_WAIT_TIMEOUT_S}" if wait else ""
    req = urllib.request.Request(base + GCP_PREEMPTED_PATH + query, headers={"Metadata-Flavor": "Google"})
    timeout = GCP_WAIT_TIMEOUT_S + 10 if wait else REQUEST_TIMEOUT_S
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return resp.read().decode().strip().upper() == "TRUE"


class PreemptionWatcher:
    """A daemon thread that calls `on_notice(why)` once, when the node's metadata says it is going."""

    def __init__(self, cloud: str, on_notice: Callable[[str], None], base: str = "", poll_s: float = AWS_POLL_S,
                 log: Callable[[str], None] = logger.info):
        if cloud not in CLOUDS:
            raise ValueError(f"preemption watch: cloud must be one of {', '.join(CLOUDS)}; got {cloud!r}")
        self.cloud, self.on_notice, self.poll_s, self.log = cloud, on_notice, poll_s, log
        self.base = (base or default_base(cloud)).rstrip("/")
        self.stopped = threading.Event()
        self.noticed: str | None = None
        self.thread = threading.Thread(target=self._run, name="gpuforge-preemption", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopped.set()

    def _notify(self, why: str) -> None:
        self.noticed = why
        self.log(f"preemption notice: {why}")
        self.on_notice(why)

    def _run(self) -> None:
        try:
            (self._watch_aws if self.cloud == "aws" else self._watch_gcp)()
        except Exception as exc:  # noqa: BLE001 - the watch is a safety net; the run goes on without it
            self.log(f"preemption watch ended: {type(exc).__name__}: {exc}")

    def _watch_aws(self) -> None:
        token = ""
        while not self.stopped.is_set():
            try:
                token = token or aws_token(self.base)
                why = aws_notice(self.base, token)
                if why:
                    self._notify(why)
                    return
            except urllib.error.HTTPError as exc:
                if exc.code == 401:  # the token expired: take a new one at once
                    token = ""
                    continue
                self.log(f"metadata: {exc}")
            except OSError as exc:
                self.log(f"metadata unreachable: {exc}")
            self.stopped.wait(self.poll_s)

    def _watch_gcp(self) -> None:
        wait = False  # the first read answers now (a VM already being preempted); then long polls
        while not self.stopped.is_set():
            try:
                if gcp_preempted(self.base, wait):
                    self._notify("GCP preemption: instance/preempted is TRUE")
                    return
                wait = True
            except OSError as exc:
                self.log(f"metadata unreachable: {exc}")
                self.stopped.wait(GCP_RETRY_S)
