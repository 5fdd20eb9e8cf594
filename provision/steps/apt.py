"""apt on a fresh VM: wait for cloud-init, wait for the locks other apt runs hold, retry transient failures.

A new cloud VM runs cloud-init and apt-daily/unattended-upgrades during its first minutes. `DPkg::Lock::Timeout`
makes apt wait for the dpkg locks, but not for `/var/lib/apt/lists/lock`, which `apt-get update` takes (apt
answers "E: Could not get lock /var/lib/apt/lists/lock. It is held by process 1234 (apt-get)" at once). So every
apt-get runs inside a loop that waits while another apt holds a lock (up to LOCK_WAIT_S) and retries a failed
download a bounded number of times; any other failure stops at once with apt's own output.
"""

from __future__ import annotations

import shlex

from provision.steps.base import Cmd

APT_ENV = (("DEBIAN_FRONTEND", "noninteractive"),)
LOCK_WAIT_S = 600  # unattended-upgrades on a fresh image can hold apt for several minutes
LOCK_POLL_S = 3
TRANSIENT_ATTEMPTS = 3  # a mirror hiccup ("Failed to fetch", "Temporary failure resolving") gets this many tries
TRANSIENT_DELAY_S = 5
APT_TIMEOUT = 1800.0  # apt-get install may download GBs (driver + toolkit ~4 GB); bound a stuck mirror
# What apt prints when another apt/dpkg holds one of its locks (apt-pkg/contrib/fileutl.cc GetLock, apt-get update).
LOCK_MESSAGES = ("Could not get lock", "Unable to acquire the dpkg frontend lock", "Unable to lock directory",
                 "is another process using it")
TRANSIENT_MESSAGES = ("Temporary failure resolving", "Failed to fetch", "Hash Sum mismatch", "Connection timed out",
                      "Could not connect to", "Some index files failed to download")
CLOUD_INIT_WAIT = "if command -v cloud-init >/dev/null 2>&1; then cloud-init status --wait >/dev/null 2>&1 || true; fi"


def apt_script(args: str) -> str:
    """The shell that runs `apt-get <args>` with the lock wait and the bounded retries."""
    locks, transient = ("|".join(f'*"{m}"*' for m in messages) for messages in (LOCK_MESSAGES, TRANSIENT_MESSAGES))
    return (
        f"gf_start=$(date +%s); gf_try=0; "
        f"while :; do gf_out=$(apt-get -o DPkg::Lock::Timeout={LOCK_WAIT_S} {args} 2>&1); gf_rc=$?; "
        'printf "%s\\n" "$gf_out"; [ $gf_rc -eq 0 ] && exit 0; '
        f'case "$gf_out" in {locks}) '
        f'[ $(( $(date +%s) - gf_start )) -lt {LOCK_WAIT_S} ] || exit $gf_rc; '
        f'echo "gpuforge: another apt holds a lock; waiting" >&2; sleep {LOCK_POLL_S};; '
        f"{transient}) gf_try=$((gf_try + 1)); [ $gf_try -lt {TRANSIENT_ATTEMPTS} ] || exit $gf_rc; "
        f'echo "gpuforge: transient apt failure, retry $gf_try" >&2; sleep $((gf_try * {TRANSIENT_DELAY_S}));; '
        "*) exit $gf_rc;; esac; done"
    )


def apt_get(args: str, desc: str, timeout: float = APT_TIMEOUT) -> Cmd:
    """`apt-get <args>` as root, non-interactive, with the lock wait and retries."""
    return Cmd(apt_script(args), sudo=True, desc=desc, timeout=timeout, env=APT_ENV)


def apt_install(*specs: str, desc: str, raw: tuple[str, ...] = ()) -> Cmd:
    """`apt-get install` of `specs` (quoted) and `raw` words (left for the shell, e.g. `$(uname -r)`).

    --allow-change-held-packages: our own holds from an earlier matrix must not block the new pin;
    --allow-downgrades: the pin may be older than what an image brought along on the same branch."""
    words = [shlex.quote(s) for s in specs] + list(raw)
    return apt_get(f"install -y --allow-change-held-packages --allow-downgrades {' '.join(words)}", desc=desc)


def apt_update(desc: str = "read the package lists") -> Cmd:
    return apt_get("update", desc=desc, timeout=600.0)


def wait_for_cloud_init() -> Cmd:
    """A fresh VM's cloud-init may still be configuring it (and running apt): wait until it is done."""
    return Cmd(CLOUD_INIT_WAIT, sudo=True, desc="wait for cloud-init to finish its first boot", timeout=900.0)
