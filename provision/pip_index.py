"""Where nodes get their Python packages: the package index setting.

    fab setup --pip-index https://pypi.example.corp/simple    # a mirror or proxy (it must carry the torch build)
    GPUFORGE_PIP_INDEX=node fab setup                         # the node's own pip configuration, no index of ours
    hosts file:  pip_index: https://pypi.example.corp/simple  # per cluster

The `fab setup` option wins over GPUFORGE_PIP_INDEX, which wins over the hosts file. Without any, torch comes
from the PyTorch wheel index of its build (https://download.pytorch.org/whl/cu130 ...) and the locked packages
from the node's default index. An index we name is probed first, so an unreachable one fails in seconds with
what to do, instead of pip retrying it for minutes.
"""

from __future__ import annotations

import os
import re
import shlex

from provision.errors import ProvisionError

ENV_VAR = "GPUFORGE_PIP_INDEX"
NODE = "node"
URL = re.compile(r"^(https?|file)://\S+$")
PROBE_TIMEOUT_S = 10  # an index that has not answered in this is down or filtered: say so, don't let pip retry
PIP_RETRIES, PIP_TIMEOUT_S = 2, 30  # pip's defaults are 5 retries of 15 s with backoff


def check_setting(value: str, where: str) -> str:
    value = value.strip()
    if value != NODE and not URL.match(value):
        raise ProvisionError(f"{where} must be a package index URL (https://..., file://...) or `{NODE}`; got {value!r}")
    return value


def resolve_pip_index(option: str = "", hosts_file_value: str = "") -> str:
    """The setting for this setup: "" (the default indexes), `node`, or a URL; bad values are one clear error."""
    if option:
        return check_setting(option, "--pip-index")
    if os.environ.get(ENV_VAR, "").strip():
        return check_setting(os.environ[ENV_VAR], ENV_VAR)
    if hosts_file_value:
        return check_setting(hosts_file_value, "pip_index (hosts file)")
    return ""


def pip_index_args(setting: str, torch_index: str) -> tuple[str, str]:
    """(the pip arguments for one `pip install` of torch and the lock, the URL to probe first or "")."""
    if setting == NODE:
        return "", ""
    if setting:
        return f"--index-url {shlex.quote(setting)}", setting if not setting.startswith("file:") else ""
    return f"--extra-index-url {shlex.quote(torch_index)}", torch_index


def tool_index_args(setting: str) -> str:
    """The index argument (with its leading space, or "") for what a node installs beside the lock: TensorFlow,
    JupyterLab, LitServe. A mirror we were given is used for them too; else the node's default index."""
    return f" --index-url {shlex.quote(setting)}" if setting and setting != NODE else ""


def probe_script(url: str) -> str:
    """A node-side check that `url` answers (any HTTP status counts: the server is there)."""
    code = ("import sys, urllib.error, urllib.request\n"
            "try:\n"
            f"    urllib.request.urlopen(sys.argv[1], timeout={PROBE_TIMEOUT_S})\n"
            "except urllib.error.HTTPError:\n"
            "    pass\n"
            "except Exception as exc:\n"
            f"    sys.exit(f'the package index {{sys.argv[1]}} did not answer within {PROBE_TIMEOUT_S} s from this node "
            f"({{exc}}); set a mirror with {ENV_VAR}=URL (or gpuforge setup --pip-index URL), or {ENV_VAR}={NODE} "
            "to use the node\\'s own pip configuration')\n")
    return f"python3 -c {shlex.quote(code)} {shlex.quote(url)}"
