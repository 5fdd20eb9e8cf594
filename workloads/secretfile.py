"""Secrets of a task: read on the controller, delivered in a 0600 file, taken (read, then deleted) on the node.

A secret's value is never on a command line (process listings), in `run.json`, a run record, a
status, or a log: the node-side reader deletes the file as soon as it has the values, the
process that needs them gets them in its environment, and everything the run prints is
redacted (`Redactor`) before it is written to `output.log`.
"""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path
from typing import Any, Iterable

from workloads.errors import ConfigError

MASK = "*****"
MIN_REDACTED_LEN = 4  # shorter values would mask ordinary text; such a secret is refused instead


def resolve_secrets(secrets: Iterable[Any], environ: dict[str, str] | None = None) -> dict[str, str]:
    """Each secret's value from the controller's environment or its file; one error naming every missing one."""
    environ = os.environ if environ is None else environ
    values, missing = {}, []
    for s in secrets:
        if s.file:
            path = Path(s.file).expanduser()
            try:
                value = path.read_text().strip()
            except OSError as exc:
                missing.append(f"{s.name} (file {path}: {exc.strerror or exc})")
                continue
        else:
            var = s.env or s.name
            if var not in environ:
                missing.append(f"{s.name} (${var} is not set here)")
                continue
            value = environ[var]
        if len(value) < MIN_REDACTED_LEN:
            missing.append(f"{s.name} (shorter than {MIN_REDACTED_LEN} characters: too short to keep out of logs)")
            continue
        values[s.name] = value
    if missing:
        raise ConfigError(f"secret(s) not available: {'; '.join(missing)}")
    return values


def put_secret_file(conn: Any, path: str, values: dict[str, str]) -> None:
    """Write `values` to `path` on a node, mode 0600 from its creation (never readable by others)."""
    q = shlex.quote(path)
    folder = shlex.quote(str(Path(path).parent))
    conn.run(f"umask 077 && mkdir -p {folder} && rm -f {q} && : > {q} && chmod 600 {q}", hide=True)
    with conn.sftp().open(path, "w") as f:  # an existing file keeps its mode
        f.write(json.dumps(values).encode())
    mode = conn.run(f"stat -c %a {q}", hide=True).stdout.strip()
    if mode != "600":
        conn.run(f"rm -f {q}", hide=True, warn=True)
        raise ConfigError(f"the secrets file on the node came out mode {mode}, not 600; removed it")


def take_secrets(path: str | Path | None) -> dict[str, str]:
    """Node side: the values in the secrets file, which is deleted right away."""
    if not path:
        return {}
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    finally:
        path.unlink(missing_ok=True)
    return {str(k): str(v) for k, v in data.items()}


class Redactor:
    """Replaces secret values in a byte stream with a mask, also when a value is split across chunks."""

    def __init__(self, values: Iterable[str]):
        self.values = sorted({v.encode() for v in values if v}, key=len, reverse=True)
        self.keep = max((len(v) for v in self.values), default=1) - 1
        self.pending = b""

    def redact(self, data: bytes) -> bytes:
        for v in self.values:
            data = data.replace(v, MASK.encode())
        return data

    def feed(self, chunk: bytes) -> bytes:
        """What can be written now; the last len(longest)-1 bytes wait for the next chunk."""
        data = self.redact(self.pending + chunk)
        if not self.values or len(data) <= self.keep:
            self.pending, out = (data, b"") if self.values else (b"", data)
            return out
        cut = len(data) - self.keep
        self.pending = data[cut:]
        return data[:cut]

    def flush(self) -> bytes:
        data, self.pending = self.redact(self.pending), b""
        return data

    def text(self, text: str) -> str:
        return self.redact(text.encode()).decode(errors="replace")
