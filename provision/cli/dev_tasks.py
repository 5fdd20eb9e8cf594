"""The development tasks: working on a node, notebooks, TensorBoard, serving a trained model.

    gpuforge ssh [NODE] [-- CMD]        # a shell on a node (default node 0) in its work dir, venv active
    gpuforge ssh-config                 # ~/.gpuforge/ssh_config for ssh, scp, rsync, VS Code Remote-SSH
    gpuforge forward 8888 [--node 1]    # local port -> the node's loopback port, until Ctrl-C
    gpuforge jupyter [--node 1]         # JupyterLab in the node's env, tunnelled; prints the URL
    gpuforge tensorboard [RUN]          # TensorBoard over a run's events, tunnelled
    gpuforge serve [RUN] [--kind int8]  # an HTTP model server with dynamic batching, tunnelled
    gpuforge serve --stop               # stop it from another terminal (also jupyter/tensorboard --stop)

Every tunnel is the real OpenSSH client with the cluster's own config (pinned host keys, checked).
The servers run on the node bound to its loopback; Ctrl-C stops them, `down` too.
"""

from __future__ import annotations

import os
import secrets
import shlex
from pathlib import Path
from typing import Any

from invoke import task
from invoke.exceptions import Exit

from provision import inventory
from provision.cli import argv as cli
from provision.cli.cluster_tasks import CLUSTER_HELP

NODE_HELP = "node rank or name (default 0)"


def say(text: str) -> None:
    cli.console().print(text, markup=False, soft_wrap=True)


def resolve_node(cluster: Any, node: str) -> Any:
    return cluster.node(node or "0")  # ClusterError lists the nodes there are


def tool_index(cluster: Any) -> str:
    """The package index setup would use (GPUFORGE_PIP_INDEX, then the hosts file's pip_index) for the tools
    installed on first use; a bad setting is one clear line before anything starts."""
    from provision.pip_index import resolve_pip_index, tool_index_args

    return tool_index_args(resolve_pip_index("", str(cluster.extra.get("pip_index") or "")))


def shell_command(node: Any, command: str) -> str:
    """What the node's shell runs: cd to the work dir, activate the venv, then the command or a shell."""
    w = shlex.quote(node.workdir)
    activate = f"[ -f {w}/venv/bin/activate ] && . {w}/venv/bin/activate"
    if command:
        return f"cd {w} 2>/dev/null; {activate}; {command}"
    rc = f"{node.workdir}/.gpuforge/shellrc"  # after the user's own bashrc, so the venv stays first on PATH
    lines = ["[ -f ~/.bashrc ] && . ~/.bashrc", f"cd {w}", activate]
    return (f"mkdir -p {w}/.gpuforge && printf '%s\\n' {' '.join(shlex.quote(x) for x in lines)} > {shlex.quote(rc)}; "
            f"cd {w} 2>/dev/null; exec bash --rcfile {shlex.quote(rc)} -i")


@task(help={"node": NODE_HELP, "cluster": CLUSTER_HELP})
def ssh(c, node="0", cluster=None):
    """A shell on a node in its work dir with its venv active; `ssh NODE -- CMD` runs one command."""
    from provision.services import ssh_base

    home = inventory.home_dir()
    with cli.user_errors():
        chosen = inventory.resolve(home, cluster)
        target = resolve_node(chosen, node)
        base = ssh_base(home, chosen, target)
        command = cli.remainder_command()
        tty = ["-t"] if not command and os.isatty(0) else []
    os.execv(base[0], [*base[:3], *tty, base[3], shell_command(target, command)])


@task(name="ssh-config", help={"cluster": CLUSTER_HELP})
def ssh_config(c, cluster=None):
    """Write the SSH config for the cluster's nodes and print the line that includes it from ~/.ssh/config."""
    from infra.ssh_config import host_alias, include_line, pin_host_keys, write_ssh_config

    home = inventory.home_dir()
    with cli.user_errors():
        chosen = inventory.resolve(home, cluster)
        for name in pin_host_keys(chosen):
            say(f"pinned the host key of {name} (first contact)")
        path = write_ssh_config(home, chosen)
        hosts = [host_alias(chosen, n) for n in chosen.nodes]
        say(f"wrote {path}: {', '.join(hosts)}")
        line = include_line(home)
        user_config = Path("~/.ssh/config").expanduser()
        if user_config.exists() and line in user_config.read_text(errors="replace"):
            say(f"~/.ssh/config already has it: {line}")
        else:
            say("add this line at the top of ~/.ssh/config (once; it covers every gpuforge cluster):")
            print(line)
        say(f"then: ssh {hosts[0]}    scp FILE {hosts[0]}:    VS Code: Remote-SSH: Connect to Host... {hosts[0]}")


@task(positional=["port"], help={"port": "the port on the node's loopback", "node": NODE_HELP,
                                  "local_port": "the port on this machine (default: the same, or a free one)",
                                  "cluster": CLUSTER_HELP})
def forward(c, port, node="0", local_port=-1, cluster=None):
    """Forward a local port to a port on a node's loopback until Ctrl-C."""
    import time

    from provision.services import ServiceError, Tunnel, local_port as free_local

    home = inventory.home_dir()
    with cli.user_errors():
        remote = parse_port(port, "PORT")
        chosen = inventory.resolve(home, cluster)
        target = resolve_node(chosen, node)
        wanted = remote if int(local_port) < 0 else parse_port(local_port, "--local-port", allow_zero=True)
        try:
            local = free_local(wanted)
        except ServiceError:
            if int(local_port) >= 0:
                raise
            local = free_local(0)  # the same number is taken here: any free one
        with Tunnel(home, chosen, target, local, remote) as tunnel:
            tunnel.wait_listening()
            say(f"127.0.0.1:{local} -> {target.name} 127.0.0.1:{remote}; Ctrl-C to stop")
            try:
                while tunnel.alive():
                    time.sleep(0.5)
            except KeyboardInterrupt:
                return
            raise ServiceError(f"the tunnel to {target.name} closed: {tunnel.error() or 'no message'}")


def parse_port(raw: Any, what: str, allow_zero: bool = False) -> int:
    try:
        value = int(raw)
    except (TypeError, ValueError):
        value = -1
    if not (0 if allow_zero else 1) <= value <= 65535:
        valid = "0..65535 (0: a free one)" if allow_zero else "1..65535"
        raise ValueError(f"{what} must be a port number {valid}; got {raw!r}")
    return value


def stop_everywhere(cluster: Any, node: str, prefix: str) -> None:
    """`--stop`: the named servers on one node (--node) or on every node."""
    from infra.ssh import connect
    from provision.services import services_on, stop_service

    nodes = [resolve_node(cluster, node)] if node else list(cluster.nodes)
    stopped = []
    for n in nodes:
        conn = connect(cluster, n)
        try:
            stopped += [f"{name} on {n.name}" for name in services_on(conn, n, prefix) if stop_service(conn, n, name)]
        finally:
            conn.close()
    say(f"stopped {', '.join(stopped)}" if stopped else f"no {prefix} server was running")


def foreground(home: Path, cluster: Any, node: Any, svc: Any, port: int, url, prepare=None) -> None:
    from provision.services import run_in_foreground

    code = run_in_foreground(home, cluster, node, svc, port, url, say, prepare=prepare)
    if code:
        raise Exit(code=code)


@task(help={"node": NODE_HELP, "port": "local port (default: a free one)", "stop": "stop JupyterLab on the node(s)",
            "cluster": CLUSTER_HELP})
def jupyter(c, node="", port=0, stop=False, cluster=None):
    """JupyterLab in a node's env on its loopback, tunnelled here; prints the URL; Ctrl-C stops it."""
    import json

    from provision.services import Service, ensure_tool, service_dir

    home = inventory.home_dir()
    with cli.user_errors():
        port = parse_port(port, "--port", allow_zero=True)  # before anything is looked up or started
        chosen = inventory.resolve(home, cluster)
        if stop:
            return stop_everywhere(chosen, node, "jupyter")
        target = resolve_node(chosen, node)
        index = tool_index(chosen)
        token = secrets.token_hex(24)
        config = {"ServerApp": {"ip": "127.0.0.1", "port_retries": 0, "open_browser": False, "allow_root": True,
                                "root_dir": target.workdir, "allow_remote_access": False},
                  "IdentityProvider": {"token": token}}  # in a 0600 file on the node: never on a command line
        svc = Service("jupyter", ready_path="/api",
                      command=["{python}", "-m", "jupyterlab", "--config={dir}/jupyter_server_config.json",
                               "--ServerApp.port={port}"],
                      files={"jupyter_server_config.json": json.dumps(config).encode()},
                      env={"JUPYTER_RUNTIME_DIR": service_dir(target, "jupyter") + "/runtime"})

        def prepare(conn: Any) -> None:  # once the local port is known to be free: a busy one is the only line
            say(f"starting JupyterLab on {target.name} ...")
            ensure_tool(conn, target, "jupyterlab", say, index)

        foreground(home, chosen, target, svc, port, lambda p: f"JupyterLab: http://127.0.0.1:{p}/lab?token={token}"
                   "\n(Ctrl-C stops it)", prepare=prepare)


def run_url(home: Path, cluster: Any, run: str | None) -> tuple[str, str]:
    """(run id, storage URL of the run) for a run of this cluster, or a run URL given as is."""
    if run and "://" in run:
        return run.rstrip("/").rsplit("/", 1)[-1], run.rstrip("/")
    from workloads.runs import load_record

    spec = load_record(home, cluster, run)["spec"]
    return spec["run_id"], f"{spec['storage_url'].rstrip('/')}/runs/{spec['run_id']}"


@task(help={"run": "run id (default: the newest) or a run's storage URL", "node": NODE_HELP,
            "port": "local port (default: a free one)", "stop": "stop TensorBoard on the node(s)", "cluster": CLUSTER_HELP})
def tensorboard(c, run=None, node="", port=0, stop=False, cluster=None):
    """TensorBoard over a run's event files on a node, tunnelled here; Ctrl-C stops it."""
    from provision.services import Service, ensure_tool

    home = inventory.home_dir()
    with cli.user_errors():
        port = parse_port(port, "--port", allow_zero=True)  # before anything is looked up or started
        chosen = inventory.resolve(home, cluster)
        if stop:
            return stop_everywhere(chosen, node, "tensorboard")
        run_id, url = run_url(home, chosen, run)
        target = resolve_node(chosen, node)
        index = tool_index(chosen)
        svc = Service("tensorboard", ready_path="/", what=run_id,
                      command=["{python}", "-m", "workloads.board", "--run-url", url, "--port", "{port}"])
        foreground(home, chosen, target, svc, port, lambda p: f"TensorBoard for {run_id}: http://127.0.0.1:{p}/\n(Ctrl-C stops it)",
                   prepare=lambda conn: ensure_tool(conn, target, "tensorboard", say, index))


@task(help={"run": "run id (default: the newest) or a run's storage URL", "node": NODE_HELP,
            "port": "local port (default: a free one)", "kind": "auto | fp32 | int8 (the run's quantized model)",
            "max_batch": "requests merged into one forward pass", "stop": "stop the model server(s)",
            "cluster": CLUSTER_HELP})
def serve(c, run=None, node="", port=0, kind="auto", max_batch=32, stop=False, cluster=None):
    """Serve a finished run's model over HTTP (GET /health, POST /predict) on a node, tunnelled here."""
    from provision.services import Service, ServiceError, ensure_tool, node_python

    home = inventory.home_dir()
    with cli.user_errors():
        port = parse_port(port, "--port", allow_zero=True)  # before anything is looked up or started
        chosen = inventory.resolve(home, cluster)
        if stop:
            return stop_everywhere(chosen, node, "serve")
        if kind not in ("auto", "fp32", "int8"):
            raise ValueError(f"--kind must be one of auto, fp32, int8; got {kind!r}")
        if int(max_batch) < 1:
            raise ValueError(f"--max-batch must be >= 1; got {max_batch}")
        run_id, url = run_url(home, chosen, run)
        target = resolve_node(chosen, node)
        index = tool_index(chosen)
        picked: dict[str, Any] = {}

        def prepare(conn: Any) -> None:
            import json

            # the run first, without LitServe (a fresh node has none yet): a bad run installs nothing
            check = conn.run(f"{shlex.quote(node_python(target))} -m workloads.serve_model --run-url "
                             f"{shlex.quote(url)} --kind {kind}", hide=True, warn=True)
            if not check.ok:
                raise ServiceError(check.stderr.strip().removeprefix("error: ") or check.stdout.strip())
            picked.update(json.loads(check.stdout.strip().splitlines()[-1]))
            ensure_tool(conn, target, "litserve", say, index)

        svc = Service("serve", ready_path="/health", what=run_id,
                      command=["{python}", "-m", "workloads.serve", "--run-url", url, "--kind", kind, "--port", "{port}",
                               "--max-batch", str(int(max_batch)), "--stats-file", "{dir}/stats.json"])

        def banner(p: int) -> str:
            accuracy = picked.get("test_accuracy")
            about = f"{run_id} ({picked.get('kind')}: {picked.get('file')}" + (
                f", test accuracy {accuracy:.4f})" if isinstance(accuracy, float) else ")")
            return (f"serving {about} at http://127.0.0.1:{p}\n"
                    f"  curl http://127.0.0.1:{p}/health\n"
                    f"  curl -X POST http://127.0.0.1:{p}/predict -H 'Content-Type: application/json' "
                    "-d '{\"inputs\": [...]}'\n(Ctrl-C or `gpuforge serve --stop` stops it)")

        foreground(home, chosen, target, svc, port, banner, prepare=prepare)
