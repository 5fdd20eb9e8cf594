"""Why a node's run failed, read from what it left: torchrun's root-cause block, a worker's error
file, the last traceback of the log, or our trainer's `error:` line.

    failure = explain_failure(exit_code=1, log_text)
    failure.reason     # "rank 1 (local rank 0) exited with code 3: ValueError: lr must be > 0"
    failure.exit_code  # 3: the worker's own code, not torchrun's 1
"""

from __future__ import annotations

import json
import re
import signal
from dataclasses import dataclass
from pathlib import Path

# A rank that failed because a peer vanished says so in its error (gloo, NCCL); such a node is not the culprit.
PEER_LOSS = ("Connection closed by peer", "Connection reset by peer", "ncclRemoteError",
             "NCCL communicator was aborted", "Socket Timeout", "Broken pipe")
# torchrun agents that failed on their own store or rendezvous: a peer (the store's host) went away.
AGENT_ERRORS = ("RendezvousConnectionError", "DistNetworkError", "DistStoreError", "RendezvousClosedError")
ROOT_CAUSE = "Root Cause (first observed failure):"
FIELD = re.compile(r"^\s*(rank|exitcode|error_file|host)\s*:\s*(.*)$")
RANK = re.compile(r"(-?\d+)(?:\s*\(local_rank:\s*(\d+)\))?")
# Tracebacks printed by the launchers around the user's code, not the user's own error.
LAUNCHER_ERRORS = ("ChildFailedError", "CalledProcessError", "torch.distributed.elastic", "SignalException")
MAX_ERROR_CHARS = 300
# What prefixes a worker's lines: torchrun --tee's `[default0]:`, and the `[rank1]: ` torch's distributed workers
# print before their uncaught exception's traceback.
WORKER_PREFIX = re.compile(r"^\[(?:default|rank)?\d+\]: ?")
# A node that failed only because a peer went away gives the other nodes this long to fail on their own, so the
# rank that broke is named with its own exit code and error (a rank whose exception takes seconds to end its
# process would otherwise be stopped first, and its victim reported). After it, the others are stopped.
PEER_GRACE_S = 30.0


@dataclass
class Failure:
    exit_code: int | None
    """The failing process's own exit code (a worker's, when torchrun reports one); negative: a signal."""
    rank: int | None = None
    local_rank: int | None = None
    error: str = ""
    secondary: bool = False
    """The node failed only because a peer went away; another node is the culprit."""

    @property
    def reason(self) -> str:
        who = f"rank {self.rank}" + (f" (local rank {self.local_rank})" if self.local_rank is not None else "") \
            if self.rank is not None else "the process"
        code = self.exit_code
        if code is None:
            what = f"{who} failed"
        elif code < 0:
            sig = -code
            name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
            what = f"{who} was killed by signal {sig} ({name})"
        else:
            what = f"{who} exited with code {code}"
        return f"{what}: {self.error}" if self.error else what

    @property
    def shell_code(self) -> int:
        """What a shell would report for it: the code, or 128 + the signal."""
        if self.exit_code is None:
            return 1
        return 128 - self.exit_code if self.exit_code < 0 else (self.exit_code or 1)


def root_cause(log: str) -> dict[str, str]:
    """The fields of torchrun's "Root Cause" block (the last one in the log), or {}."""
    at = log.rfind(ROOT_CAUSE)
    if at < 0:
        return {}
    fields: dict[str, str] = {}
    for line in log[at:].splitlines()[1:12]:
        match = FIELD.match(line)
        if match and match.group(1) not in fields:
            fields[match.group(1)] = match.group(2).strip()
        if line.startswith("=" * 10) and fields:
            break
    return fields


def error_file_message(path: str) -> str:
    """A worker's error file (torch.distributed.elastic's `@record`), one line."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return ""
    message = data.get("message", "")
    if isinstance(message, dict):
        message = message.get("message", "")
    return one_line(str(message))


def last_traceback_error(log: str) -> str:
    """The exception line of the last traceback that is the user's, not a launcher's."""
    lines = [WORKER_PREFIX.sub("", line) for line in log.splitlines()]
    found = ""
    for i, line in enumerate(lines):
        if not line.lstrip().startswith("Traceback (most recent call last):"):
            continue
        for follow in lines[i + 1 : i + 400]:
            text = follow
            if text and not text.startswith((" ", "\t")) and not text.startswith("Traceback"):
                if not any(marker in text for marker in LAUNCHER_ERRORS) and not text.startswith(("During handling", "The above")):
                    found = one_line(text)
                break
    return found


def one_line(text: str) -> str:
    text = " ".join(text.split())
    return text[:MAX_ERROR_CHARS] + ("..." if len(text) > MAX_ERROR_CHARS else "")


def explain_failure(exit_code: int, log: str) -> Failure:
    """The failure of a node's process that exited with `exit_code`, from its log."""
    cause = root_cause(log)
    failure = Failure(exit_code=exit_code)
    if cause:
        rank = RANK.match(cause.get("rank", ""))
        if rank:
            failure.rank = int(rank.group(1))
            failure.local_rank = int(rank.group(2)) if rank.group(2) else None
        code = re.match(r"(-?\d+)", cause.get("exitcode", ""))
        if code:
            failure.exit_code = int(code.group(1))
        if cause.get("error_file", "<N/A>") not in ("", "<N/A>"):
            failure.error = error_file_message(cause["error_file"])
    if not failure.error:
        ours = [line for line in log.splitlines() if line.startswith("error: ")]
        failure.error = one_line(ours[-1].removeprefix("error: ")) if ours else last_traceback_error(log)
    if failure.exit_code is not None and failure.exit_code < 0:
        failure.error = ""  # a signal says it all; the log's last traceback is a peer's complaint
    # The error says whether a peer's loss is the cause; a log may name one in passing (an agent's store
    # connection closing after this rank failed on its own).
    failure.secondary = any(marker in (failure.error or log) for marker in PEER_LOSS) or (
        not cause and any(marker in log for marker in AGENT_ERRORS))
    return failure


def awaits_culprit(peers: list[tuple[str, bool, float | None]], now: float) -> bool:
    """(state, secondary, ended) of every node: only victims of a lost peer have failed yet, recently, and others
    still run; wait for them to end on their own before stopping them (PEER_GRACE_S)."""
    failed = [(secondary, ended) for state, secondary, ended in peers if state in ("failed", "stopped")]
    running = any(state in ("running", "starting") for state, _, _ in peers)
    return (running and bool(failed) and all(secondary for secondary, _ in failed)
            and now - min(ended or now for _, ended in failed) < PEER_GRACE_S)
