"""`fab doctor`: what works on this machine and cluster, and what to do about what does not.

What is needed depends on the cluster (the selected one, or --cluster): a local cluster needs
sshd and ssh-keygen, a cloud one the pulumi CLI and that cloud's credentials; every cluster needs
its nodes reachable and set up. Checks that the cluster does not need are shown but never fail
the doctor; the last line says whether everything needed is there.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import NamedTuple

from provision import inventory


class Check(NamedTuple):
    name: str
    ok: bool
    detail: str
    needed: bool = True


def check_tools(cloud: str) -> list[Check]:
    from infra.local import SSHD_CANDIDATES

    sshd = shutil.which("sshd") or next((p for p in SSHD_CANDIDATES if os.access(p, os.X_OK)), None)
    pulumi = shutil.which("pulumi")
    keygen = shutil.which("ssh-keygen")
    return [
        Check("sshd (local cluster)", bool(sshd), sshd or "sudo apt-get install -y openssh-server", cloud == "local"),
        Check("ssh-keygen", bool(keygen), keygen or "sudo apt-get install -y openssh-client", cloud in ("local", "aws", "gcp")),
        Check("ssh (ssh, forward, jupyter, serve)", bool(shutil.which("ssh")),
              shutil.which("ssh") or "sudo apt-get install -y openssh-client", False),
        Check("pulumi CLI (cloud clusters)", bool(pulumi), pulumi or "curl -fsSL https://get.pulumi.com | sh",
              cloud in ("aws", "gcp")),
    ]


def check_credentials(cloud: str) -> list[Check]:
    aws = any(os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE")) or \
        Path("~/.aws/credentials").expanduser().exists() or Path("~/.aws/config").expanduser().exists()
    gcp = bool(os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")) or \
        Path("~/.config/gcloud/application_default_credentials.json").expanduser().exists()
    return [
        Check("AWS credentials", aws, "found" if aws else "aws configure (or AWS_PROFILE / AWS_ACCESS_KEY_ID)", cloud == "aws"),
        Check("GCP credentials", gcp, "found" if gcp else "gcloud auth application-default login", cloud == "gcp"),
    ]


def check_cluster(home: Path, ref: str | None) -> tuple[str, str, list[Check]]:
    """(cluster name or "", its cloud (local when none), the checks of its nodes)."""
    from infra.ssh import connect
    from provision.errors import ProvisionError, SshError

    try:
        cluster = inventory.resolve(home, ref)
    except ProvisionError as exc:
        if ref is None and inventory.current_name(home) is None:  # nothing chosen yet: a local cluster is the default
            return "", "local", [Check("cluster", True, f"none selected; `gpuforge up` makes a local one ({exc})", False)]
        return "", "local", [Check("cluster", False, str(exc))]
    checks = [Check("cluster", True, f"{cluster.name} ({cluster.cloud}, {len(cluster.nodes)} nodes)")]
    for node in cluster.nodes:
        try:
            conn = connect(cluster, node)
        except (ProvisionError, SshError) as exc:
            checks.append(Check(f"{node.name} ssh", False, str(exc)))
            continue
        try:
            ready = conn.run(f"test -x {node.workdir}/venv/bin/python", hide=True, warn=True).ok
            checks.append(Check(f"{node.name} ssh", True, node.address))
            checks.append(Check(f"{node.name} set up", ready, "venv present" if ready else "run `gpuforge setup`"))
        finally:
            conn.close()
    return cluster.name, cluster.cloud, checks


def run_checks(home: Path, ref: str | None = None) -> tuple[list[Check], str]:
    """Every check, and the one-line verdict."""
    name, cloud, cluster_checks = check_cluster(home, ref)
    checks = [*check_tools(cloud), *check_credentials(cloud), *cluster_checks]
    return checks, verdict(checks, name, cloud)


def verdict(checks: list[Check], name: str, cloud: str) -> str:
    problems = [c.name for c in checks if c.needed and not c.ok]
    optional = [c.name for c in checks if not c.needed and not c.ok]
    what = f"cluster {name} ({cloud})" if name else "a local cluster"
    if problems:
        return f"doctor: {len(problems)} problem(s) for {what}: {', '.join(problems)} (see above)"
    note = f"; not needed here: {', '.join(optional)}" if optional else ""
    return f"doctor: ready for {what}: {sum(c.needed for c in checks)} needed check(s) pass{note}"
