"""The first command `fab setup` sends to a node: its facts, its step markers and every step's probe, at once.

A re-run that finds everything in place then costs one round trip per node after the SSH handshake, where
it cost one per fact-gathering, one for the markers and one per step check before. Each section of the output
starts on a line of its own with `##gpuforge-look:` and a key; a probe's section holds exactly what the probe
printed on stdout, followed by a section with its exit status:

    <facts (provision/facts.py GATHER_COMMAND)>
    ##gpuforge-look:markers
    {"step": "base", "fingerprint": "...", "time": ...}
    ##gpuforge-look:probe workload
    3f2a...
    ##gpuforge-look:rc 0

Probes are read-only and use no facts (provision/steps/base.py `Step.probe`), so they can run before the
facts are known. Their results stand for `check` only until the runner writes to the node (a marker cleared,
a step applied); after that it asks the node again.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass

from provision.facts import GATHER_COMMAND

LOOK = "##gpuforge-look:"


@dataclass(frozen=True)
class ProbeResult:
    """What a probe returned, shaped as the part of a Fabric Result that `Step.judge` reads."""

    stdout: str
    exited: int

    @property
    def ok(self) -> bool:
        return self.exited == 0


@dataclass(frozen=True)
class FirstLook:
    facts_output: str
    markers: dict[str, str]
    """{step: fingerprint} of every marker on the node."""
    probes: dict[str, ProbeResult]


def section(key: str) -> str:
    """A command printing the line that starts a section (a newline first: a probe's output may end without one)."""
    return f"printf '\\n%s\\n' {shlex.quote(LOOK + key)}"


def first_look_command(marker_dir: str, probes: dict[str, str]) -> str:
    """Facts, then the markers in `marker_dir`, then each probe in a subshell of its own (`{step: command}`)."""
    parts = [GATHER_COMMAND, section("markers"), f"cat {shlex.quote(marker_dir)}/*.json 2>/dev/null"]
    for name, probe in probes.items():
        parts += [section(f"probe {name}"), f"( {probe} ) 2>/dev/null", f"printf '\\n%s%s\\n' {shlex.quote(LOOK + 'rc ')} \"$?\""]
    return "; ".join(parts)


def parse_markers(text: str) -> dict[str, str]:
    """{step: fingerprint} from marker records, one JSON object a line; unreadable lines are no marker."""
    markers = {}
    for line in text.splitlines():
        try:
            record = json.loads(line)
            markers[record["step"]] = record["fingerprint"]
        except (ValueError, KeyError, TypeError):
            continue
    return markers


def parse_first_look(output: str) -> FirstLook:
    chunks = output.split(f"\n{LOOK}")
    facts, markers, probes = chunks[0], {}, {}
    pending = ""
    for chunk in chunks[1:]:
        key, _, body = chunk.partition("\n")
        if key == "markers":
            markers = parse_markers(body)
        elif key.startswith("probe "):
            pending = key.removeprefix("probe ")
            probes[pending] = ProbeResult(body, -1)  # no status line: the command was cut short
        elif key.startswith("rc ") and pending:
            status = key.removeprefix("rc ").strip()
            probes[pending] = ProbeResult(probes[pending].stdout, int(status) if status.isdigit() else -1)
            pending = ""
    return FirstLook(facts, markers, {name: r for name, r in probes.items() if r.exited >= 0})
