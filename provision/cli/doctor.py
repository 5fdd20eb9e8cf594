"""`fab doctor`: what works on this machine and cluster, and what to do about what does not."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from provision import inventory

Check = tuple[str, bool, str]


def check_tools() -> list[Check]:
    from infra.local import SSHD_CANDIDATES

    sshd = shutil.which("sshd") or next((p for p in SSHD_CANDIDATES if os.access(p, os.X_OK)), None)
    pulumi = shutil.which("pulumi")
    return [
        ("sshd (local cluster)", bool(sshd), sshd or "sudo apt-get install -y openssh-server"),
        ("ssh-keygen", bool(shutil.which("ssh-keygen")), shutil.which("ssh-keygen") or "sudo apt-get install -y openssh-client"),
        ("ssh (ssh, forward, jupyter, serve)", bool(shutil.which("ssh")), shutil.which("ssh") or "sudo apt-get install -y openssh-client"),
        ("pulumi CLI (cloud clusters)", bool(pulumi), pulumi or "curl -fsSL https://get.pulumi.com | sh"),
    ]


def check_credentials() -> list[Check]:
    aws = any(os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE")) or \
        Path("~/.aws/credentials").expanduser().exists() or Path("~/.aws/config").expanduser().exists()
    gcp = bool(os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")) or \
        Path("~/.config/gcloud/application_default_credentials.json").expanduser().exists()
    return [
        ("AWS credentials", aws, "found" if aws else "aws configure (or AWS_PROFILE / AWS_ACCESS_KEY_ID)"),
        ("GCP credentials", gcp, "found" if gcp else "gcloud auth application-default login"),
    ]


def check_cluster(home: Path, ref: str | None) -> list[Check]:
    from provision.errors import ProvisionError, SshError
    from infra.ssh import connect

    try:
        cluster = inventory.resolve(home, ref)
    except ProvisionError as exc:
        return [("cluster", False, str(exc))]
    checks: list[Check] = [("cluster", True, f"{cluster.name} ({cluster.cloud}, {len(cluster.nodes)} nodes)")]
    for node in cluster.nodes:
        try:
            conn = connect(cluster, node)
        except (ProvisionError, SshError) as exc:
            checks.append((f"{node.name} ssh", False, str(exc)))
            continue
        try:
            ready = conn.run(f"test -x {node.workdir}/venv/bin/python", hide=True, warn=True).ok
            checks.append((f"{node.name} ssh", True, node.address))
            checks.append((f"{node.name} set up", ready, "venv present" if ready else "run `fab setup`"))
        finally:
            conn.close()
    return checks


def run_checks(home: Path, ref: str | None = None) -> list[Check]:
    return [*check_tools(), *check_credentials(), *check_cluster(home, ref)]
