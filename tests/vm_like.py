"""What VM-like local nodes need from the test rig (root only): a login user like a cloud image's `ubuntu`, and
a GPUFORGE_HOME that user can traverse. Everything made here is removed again: the user, its home, its sudoers
drop-in. Used by tests/integration/test_vm_like*.py and bench/first_setup.py.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SUDOERS_DIR = Path("/etc/sudoers.d")
# What a cloud image's sudoers gives its default user (Ubuntu's cloud-init: "ubuntu ALL=(ALL) NOPASSWD:ALL"),
# and the secure_path sudo applies for it: stand-ins a test puts in the node's /usr/local/{s,}bin come first.
SUDOERS_LINES = ("{user} ALL=(ALL) NOPASSWD:ALL",
                 'Defaults:{user} secure_path="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"')
# This machine's registry settings live in root's pip config (find-links to the local CPU torch wheel); a node
# user gets the same as its own pip configuration, as a company's image would carry its mirror's.
ROOT_PIP_CONF = Path("/root/.config/pip/pip.conf")


def vm_like_unavailable() -> str:
    """Why VM-like nodes cannot run here ("" when they can)."""
    if os.geteuid() != 0:
        return "VM-like nodes need root to create their login user (CI runs as root; a laptop keeps the quick mode)"
    for tool in ("sudo", "unshare", "useradd", "runuser"):
        if shutil.which(tool) is None:
            return f"`{tool}` is missing (make sysdeps installs it)"
    return ""


@contextmanager
def vm_user(prefix: str = "gfvm") -> Iterator[str]:
    """A fresh non-root user with passwordless sudo, removed afterwards (user, home, drop-in)."""
    user = f"{prefix}{secrets.token_hex(3)}"
    dropin = SUDOERS_DIR / user
    subprocess.run(["useradd", "-m", "-s", "/bin/bash", user], check=True, capture_output=True)
    try:
        subprocess.run(["usermod", "-p", "*", user], check=True, capture_output=True)  # unlocked, no password
        dropin.write_text("\n".join(line.format(user=user) for line in SUDOERS_LINES) + "\n")
        dropin.chmod(0o440)
        if ROOT_PIP_CONF.exists():
            conf = Path(f"/home/{user}/.config/pip/pip.conf")
            conf.parent.mkdir(parents=True)
            shutil.copy(ROOT_PIP_CONF, conf)
            subprocess.run(["chown", "-R", f"{user}:{user}", f"/home/{user}/.config"], check=True)
        yield user
    finally:
        dropin.unlink(missing_ok=True)
        subprocess.run(["pkill", "-KILL", "-u", user], capture_output=True)  # only this throwaway user's processes
        subprocess.run(["userdel", "-r", "-f", user], capture_output=True)


@contextmanager
def vm_home(prefix: str = "gpuforge-vm-") -> Iterator[Path]:
    """A GPUFORGE_HOME the login user can traverse (0711), removed afterwards."""
    home = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    home.chmod(0o711)
    try:
        yield home
    finally:
        shutil.rmtree(home, ignore_errors=True)
