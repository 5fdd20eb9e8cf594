"""Autostop: how long a cluster may sit idle before its nodes stop themselves, and what "stop" means on each cloud.

    >>> parse_autostop("90"), parse_autostop("90s"), parse_autostop("2h"), parse_autostop("off")
    (5400, 90, 7200, 0)

`fab up --autostop VALUE` takes minutes (`90`), a number with a unit (`90s`, `30m`, `2h`, `1d`) or `off`; a cloud
cluster gets DEFAULT_S unless told otherwise, a local one none (it bills nothing). `--autodown` terminates instead of
stopping. The node side is provision/data/autostop_watch.py, installed by provision/steps/autostop.py.

What a node's own shutdown does (the program sets it):
- AWS: the instance's `instance_initiated_shutdown_behavior`, `stop` (disks kept, compute not billed) or, with
  autodown or on spot (a one-time spot instance cannot be stopped, EC2 refuses `stop` for it), `terminate`;
- GCP: a guest shutdown leaves the VM TERMINATED, GCE's word for stopped (disks kept); nothing to set. No instance
  setting turns it into a delete, so with autodown the node deletes its own VM through the Compute API before it
  powers off: the program grants the nodes' service account Compute Instance Admin (v1) on the cluster's own
  instances (instance IAM members, nothing project-wide) and the Compute scope (infra/gcp.py); a node that cannot
  (refused, no network) only powers off.
Either cloud: the stack's state lives on the controller, so the rest (network, policies, a VM left stopped) goes
when the controller next looks (`clusters`, `status`, `up`: provision/autostop.py finish_autodown), as `down` does,
its data kept.
"""

from __future__ import annotations

import re

DEFAULT_S = 3600  # one hour idle: long enough for a coffee between runs, short of a night's bill
MAX_S = 30 * 86400  # a guard against typos (`--autostop 9000h`)
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
OFF = ("off", "none", "never")  # not "0": it reads as "stop at once" as well as "never"
DURATION = re.compile(r"^(\d+)([smhd]?)$")
FORMS = "minutes (90), a number with a unit (90s, 30m, 2h, 1d) or off"


def parse_autostop(value: str | int) -> int:
    """Seconds of idle time before a stop (0: never); a bare number is minutes. ValueError names the bad value."""
    if isinstance(value, bool):
        raise ValueError(f"--autostop {value!r} is not a duration; give {FORMS}")
    if isinstance(value, int):
        seconds = value  # already seconds (a stack config or record value)
    else:
        text = str(value).strip().lower()
        if text in OFF:
            return 0
        match = DURATION.match(text)
        if not match:
            raise ValueError(f"--autostop {value!r} is not a duration; give {FORMS}")
        seconds = int(match.group(1)) * UNITS[match.group(2) or "m"]
        if seconds == 0:  # "stop at once" or "never"? Both are read into it; say which forms mean what
            raise ValueError(f"--autostop {value!r} is not a duration above zero; give {FORMS} (off turns it off)")
    if not 0 <= seconds <= MAX_S:
        raise ValueError(f"--autostop {value!r} is out of range: at most {MAX_S // 86400} days; give {FORMS}")
    return seconds


def format_duration(seconds: float) -> str:
    """`1h 30m`, `45s`, `off`: what `status` and `up` print."""
    if seconds <= 0:
        return "off"
    seconds = int(round(seconds))
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size:
            parts.append(f"{seconds // size}{unit}")
            seconds %= size
    return " ".join(parts[:2])


def stack_value(seconds: int) -> str:
    """How the stack config records it (`gpuforge:autostop`): seconds with their unit, or off."""
    return f"{seconds}s" if seconds else "off"


def aws_shutdown_behavior(autodown: bool, spot: bool) -> str:
    """EC2's instance_initiated_shutdown_behavior: what the node's own `poweroff` does."""
    return "terminate" if autodown or spot else "stop"


def gcp_self_delete(autodown: bool, seconds: int) -> bool:
    """GCP: whether the nodes get the right to delete their own VMs (autodown with autostop on; infra/gcp.py)."""
    return bool(autodown and seconds)


def describe(seconds: int, autodown: bool) -> str:
    if not seconds:
        return "autostop off"
    return f"{'autodown' if autodown else 'autostop'} after {format_duration(seconds)} idle"
