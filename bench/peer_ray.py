"""gpuforge against the Ray cluster launcher on the same two machines, side by side (`make bench-peer`).

    make bench-peer                                   # installs Ray into .venv-ray first, then runs this
    .venv/bin/python bench/peer_ray.py --rounds 4 [--ray-venv .venv-ray] [--profile]

Two "existing machines" (bench/_peer_nodes.py: sshd on 127.0.13.2 and .3, each in its own PID and mount
namespace, a non-root user with sudo, Python 3 and Ray installed) are registered with each tool as
existing machines: a hosts file for `gpuforge up --hosts`, a cluster YAML with `provider: local` for
`ray up`. Each round runs both tools' lifecycles, one after the other (which one first alternates):

    bring-up       gpuforge up --hosts + exec -- true    | ray up, then a Ray task on every node
    setup re-run   gpuforge setup (all in place)          | ray up --no-restart (and ray up, restarting)
    one command    gpuforge exec -- hostname (all nodes)  | ray exec hostname (the head only)
    2-node DDP     gpuforge train --script --follow       | ray submit: Ray Train TorchTrainer, 2 workers
    idle           what runs on the nodes, PSS            | the same
    teardown       gpuforge down                          | ray down (and what it leaves behind)

Every figure is the median over rounds; each line prints ours, Ray's and the ratio (ours / Ray's). The
DDP job (bench/peer/ddp_job.py) is the same model, data and steps for both, and writes when it started,
joined the group, finished its first step and its last. --profile adds where our setup re-run and launch
spend their time. The last line is `ratio: X.XX`: our setup re-run over `ray up --no-restart`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _peer_nodes import ADDRESSES, USER, processes_on, start_nodes, stop_nodes  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "bench" / "peer" / "ddp_job.py"
STATE = Path("/var/tmp/gpuforge-peer")  # outside /tmp: each node mounts its own /tmp
NODE_HOME = f"/home/{USER}"
STEPS = 60
IMAGE = Path("/var/tmp/gpuforge-peer-image")  # kept between runs: the node venv, made once (~2 min)
# The machines come with their software, as an image would: Ray (on PATH) and, where gpuforge keeps its venv,
# torch at the matrix's version with the node packages, so that neither tool installs anything here. (Our first
# setup would install torch from the PyTorch index, which this machine cannot reach.)
NODE_VENV_PACKAGES = "torch==2.13.0 numpy scikit-learn tensorboard boto3 google-cloud-storage pydantic rich pyyaml"
IDLE_SETTLE_S = 3.0
# Ray's local-provider start commands (ray/autoscaler/local/defaults.yaml), plus the node's own address and
# distinct ports for the worker: both "machines" share one network stack here, as they would not on real ones.
HEAD_START = [
    "ray stop",
    f"ulimit -c unlimited; ray start --head --port=6379 --node-ip-address={ADDRESSES[0]} "
    f"--dashboard-host={ADDRESSES[0]} --autoscaling-config=~/ray_bootstrap_config.yaml",
]
WORKER_START = [
    "ray stop",
    f"ray start --address=$RAY_HEAD_IP:6379 --node-ip-address={ADDRESSES[1]} --dashboard-agent-listen-port=52366 "
    "--min-worker-port=20002 --max-worker-port=29999",
]
RAY_ALL_NODES = (
    "import ray, socket, time\n"
    "ray.init(address='auto', logging_level='ERROR')\n"
    "while sum(n['Alive'] for n in ray.nodes()) < 2: time.sleep(0.1)\n"
    "ids = [n['NodeID'] for n in ray.nodes() if n['Alive']]\n"
    "on = lambda i: ray.remote(lambda: socket.gethostname()).options(scheduling_strategy="
    "ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(i, soft=False)).remote()\n"
    "print(ray.get([on(i) for i in ids]))\n"
)


class Failed(RuntimeError):
    pass


def timed(cmd: list[str], env: dict[str, str], timeout: float = 600) -> tuple[float, str]:
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=STATE,
                          stdin=subprocess.DEVNULL)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise Failed(f"{' '.join(cmd[:4])} ... exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-2000:]}")
    return elapsed, proc.stdout


def read_markers(folder: Path, t0: float) -> dict[str, float]:
    return {p.name: float(p.read_text()) - t0 for p in folder.iterdir() if p.is_file() and not p.suffix}


def footprint(nodes) -> dict[str, object]:
    procs = [(n.address, pid, cmd, pss) for n in nodes for pid, cmd, pss in processes_on(n)
             if not cmd.startswith("sshd:")]  # SSH sessions (Ray keeps its control connections 10 s) are not counted
    return {"processes": len(procs), "pss_mib": sum(p[3] for p in procs) / 1024,
            "names": sorted({Path(p[2].split()[0]).name for p in procs})}


def clear_nodes(nodes) -> None:
    """Kill whatever a tool left on the nodes (after it was measured), so the next lifecycle starts clean."""
    for node in nodes:
        for pid, _, _ in processes_on(node):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


class Ours:
    name = "gpuforge"

    def __init__(self, keys: Path, shared: Path):
        self.env = {**os.environ, "GPUFORGE_HOME": str(STATE / "home-ours"), "NO_COLOR": "1"}
        self.cli = [str(ROOT / ".venv" / "bin" / "gpuforge")]
        self.hosts = STATE / "hosts.yaml"
        self.hosts.write_text(yaml.safe_dump({
            "name": "peer", "user": USER, "key": str(keys / "id_ed25519"), "workdir": NODE_HOME,  # the login user's home: see the note on BaseStep in the report
            "storage": (shared / "storage").as_uri(), "hosts": [{"address": a} for a in ADDRESSES]}))
        self.run = 0

    def gf(self, *args: str, timeout: float = 600) -> tuple[float, str]:
        return timed([*self.cli, *args], self.env, timeout)

    def bring_up(self) -> float:
        up, _ = self.gf("up", "--hosts", str(self.hosts))
        run, _ = self.gf("exec", "--cluster", "peer", "--", "true")
        return up + run

    def setup(self) -> float:
        return self.gf("setup", "--cluster", "peer", timeout=1800)[0]

    def one_command(self) -> float:
        return self.gf("exec", "--cluster", "peer", "--", "hostname")[0]

    def job(self, markers: Path) -> tuple[float, dict[str, float]]:
        self.run += 1
        t0 = time.time()
        elapsed, _ = self.gf("train", "--cluster", "peer", "--script", str(JOB), "--run-id", f"peer-{self.run}",
                             "--follow", "--", "--steps", str(STEPS), "--markers", str(markers))
        return elapsed, read_markers(markers, t0)

    def teardown(self) -> float:
        return self.gf("down", "--cluster", "peer", "--yes")[0]


class Ray:
    name = "ray"

    def __init__(self, keys: Path, venv: Path):
        tmp = STATE / "ray-controller-tmp"  # the ray CLI's own state (cluster state, config cache, SSH sockets)
        tmp.mkdir(exist_ok=True)
        self.env = {**os.environ, "RAY_UP_enable_autoscaler_v2": "0", "TMPDIR": str(tmp), "RAY_TMPDIR": str(tmp),
                    "PATH": f"{venv / 'bin'}:{os.environ['PATH']}"}
        self.ray = str(venv / "bin" / "ray")
        self.config = STATE / "ray-cluster.yaml"
        self.config.write_text(yaml.safe_dump({
            "cluster_name": "gpuforge-peer",
            "provider": {"type": "local", "head_ip": ADDRESSES[0], "worker_ips": [ADDRESSES[1]]},
            "auth": {"ssh_user": USER, "ssh_private_key": str(keys / "id_ed25519")},
            "min_workers": 1, "max_workers": 1, "upscaling_speed": 1.0, "idle_timeout_minutes": 5,
            "head_start_ray_commands": HEAD_START, "worker_start_ray_commands": WORKER_START,
        }, sort_keys=False))

    def r(self, *args: str, timeout: float = 600) -> tuple[float, str]:
        return timed([self.ray, *args], self.env, timeout)

    def bring_up(self) -> float:
        up, _ = self.r("up", "-y", "--no-config-cache", str(self.config))
        ready, out = self.r("exec", str(self.config), f"python -c {shlex_quote(RAY_ALL_NODES)}", timeout=300)
        return up + ready

    def rerun(self) -> float:
        return self.r("up", "-y", "--no-restart", str(self.config))[0]

    def restart(self) -> float:
        elapsed = self.r("up", "-y", str(self.config))[0]
        self.r("exec", str(self.config), f"python -c {shlex_quote(RAY_ALL_NODES)}", timeout=300)  # both back before going on
        return elapsed

    def one_command(self) -> float:
        return self.r("exec", str(self.config), "hostname")[0]

    def job(self, markers: Path) -> tuple[float, dict[str, float]]:
        t0 = time.time()
        elapsed, _ = self.r("submit", str(self.config), str(JOB), "--", "--ray", "--steps", str(STEPS),
                            "--markers", str(markers), timeout=900)
        return elapsed, read_markers(markers, t0)

    def teardown(self) -> float:
        return self.r("down", "-y", str(self.config))[0]


def shlex_quote(text: str) -> str:
    import shlex

    return shlex.quote(text)


def lifecycle(tool, nodes, shared: Path, i: int, results: dict[str, list]) -> None:
    def put(key: str, value) -> None:
        results.setdefault(f"{tool.name}:{key}", []).append(value)

    put("bring_up", tool.bring_up())
    if isinstance(tool, Ours):
        put("rerun", tool.setup())
    else:
        put("rerun", tool.rerun())
        put("restart", tool.restart())
    put("one_command", tool.one_command())
    markers = shared / f"markers-{tool.name}-{i}"
    markers.mkdir(mode=0o777)
    markers.chmod(0o777)
    end, marks = tool.job(markers)
    put("job_end", end)
    put("job_first_step", marks["first_step"])
    put("job_marks", marks)
    time.sleep(IDLE_SETTLE_S)
    put("idle", footprint(nodes))
    put("teardown", tool.teardown())
    time.sleep(IDLE_SETTLE_S)
    put("after_teardown", footprint(nodes))
    clear_nodes(nodes)


def install_node_venv(nodes, keys: Path) -> None:
    """~/venv on every node, made once inside node 0 as the login user and copied (same path on every node)."""
    cached = IMAGE / "venv"
    if not (cached / "bin" / "python").exists():
        known = keys / "known_hosts"  # the nodes' host key, which this bench made: pinned, never unchecked
        known.write_text(f"{nodes[0].address} {' '.join((keys / 'host_ed25519.pub').read_text().split()[:2])}\n")
        ssh = ["ssh", "-i", str(keys / "id_ed25519"), "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={known}",
               "-o", "GlobalKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", f"{USER}@{nodes[0].address}"]
        subprocess.run([*ssh, f"python3 -m venv ~/venv && ~/venv/bin/pip install --quiet {NODE_VENV_PACKAGES}"],
                       check=True, timeout=1800)
        IMAGE.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(cached, ignore_errors=True)
        shutil.copytree(nodes[0].dir / "home" / "venv", cached, symlinks=True)
    for node in nodes:
        target = node.dir / "home" / "venv"
        if not target.exists():
            subprocess.run(["cp", "-al", str(cached), str(target)], check=True)  # hard links: instant, and pip replaces files rather than writing into them
        subprocess.run(["chown", "-R", f"{USER}:{USER}", str(target)], check=True)


def median(values: list[float]) -> float:
    return statistics.median(values)


def report(results: dict[str, list], rounds: int, first_setup: float) -> None:
    print(f"\n2 nodes (sshd on {', '.join(ADDRESSES)}, own PID/mount namespaces, user {USER} with sudo), "
          f"{rounds} rounds alternating which tool goes first, medians; {time.strftime('%Y-%m-%d')}")
    print(f"{'':34}{'gpuforge':>10}{'Ray':>10}{'ratio':>8}")
    rows = [("bring-up, until every node ran a command", "bring_up", "bring_up"),
            ("setup re-run (ours) / ray up --no-restart", "rerun", "rerun"),
            ("setup re-run (ours) / ray up (restart)", "rerun", "restart"),
            ("one command (ours: all nodes; Ray: head)", "one_command", "one_command"),
            ("2-node DDP job: to its first step", "job_first_step", "job_first_step"),
            ("2-node DDP job: to its end", "job_end", "job_end"),
            ("teardown", "teardown", "teardown")]
    for label, ours, theirs in rows:
        a, b = median(results[f"gpuforge:{ours}"]), median(results[f"ray:{theirs}"])
        print(f"{label:42.42}{a:8.2f} s{b:8.2f} s{a / b:8.2f}   rounds: "
              + " ".join(f"{x:.2f}/{y:.2f}" for x, y in zip(results[f"gpuforge:{ours}"], results[f"ray:{theirs}"])))
    for when in ("idle", "after_teardown"):
        for tool in ("gpuforge", "ray"):
            fp = results[f"{tool}:{when}"][-1]
            what = ", ".join(fp["names"]) or "nothing"
            print(f"on the nodes {when.replace('_', ' ')}, {tool}: {fp['processes']} processes, "
                  f"{fp['pss_mib']:.0f} MiB PSS ({what})")
    for tool in ("gpuforge", "ray"):
        marks = results[f"{tool}:job_marks"]
        keys = ("start", "imported", "joined", "first_step", "end")
        print(f"DDP job milestones, {tool} (s after the command started): " +
              ", ".join(f"{k} {median([m[k] for m in marks if k in m]):.2f}" for k in keys if any(k in m for m in marks)))
    print(f"first gpuforge setup on the machines (torch preinstalled, as Ray is: our code and checks): {first_setup:.1f} s")
    print(f"ratio: {median(results['gpuforge:rerun']) / median(results['ray:rerun']):.2f}")


def profile_ours(ours: Ours) -> None:
    """Where our setup re-run and launch spend their time: cProfile of the CLI process, summed up."""
    import pstats

    for label, args in (("setup re-run", ["setup", "--cluster", "peer"]),
                        ("train --follow", ["train", "--cluster", "peer", "--script", str(JOB), "--run-id", "peer-profile",
                                            "--follow", "--", "--steps", str(STEPS), "--markers", str(STATE / "shared")])):
        out = STATE / f"profile-{args[0]}.prof"
        wall, _ = timed([str(ROOT / ".venv" / "bin" / "python"), "-m", "cProfile", "-o", str(out), "-m", "provision.cli.main",
                         *args], ours.env)
        stats = pstats.Stats(str(out)).stats  # (file, line, function) -> (calls, primitive calls, own s, cumulative s, callers)
        imports = max((v[3] for k, v in stats.items() if k[2] == "_find_and_load"), default=0.0)
        ours_only = sorted(((v[3], f"{Path(k[0]).parent.name}/{Path(k[0]).name}:{k[2]}") for k, v in stats.items()
                            if re.search(r"/(provision|workloads|infra)/", k[0]) and k[2] != "<module>"), reverse=True)
        print(f"\nprofile of `gpuforge {label}` ({wall:.2f} s under cProfile): imports {imports:.2f} s; "
              "our functions by cumulative time: " + ", ".join(f"{name} {ct:.2f} s" for ct, name in ours_only[:8]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--ray-venv", type=Path, default=ROOT / ".venv-ray")
    parser.add_argument("--profile", action="store_true", help="also profile our setup re-run and launch")
    args = parser.parse_args()
    if not (args.ray_venv / "bin" / "ray").exists():
        raise SystemExit(f"no Ray at {args.ray_venv}: `make bench-peer` installs it there")
    for tool in ("rsync", "sudo", "unshare", "ssh"):
        if shutil.which(tool) is None:
            raise SystemExit(f"bench-peer needs {tool} (Ray's cluster launcher uses rsync; the nodes need sudo)")
    shutil.rmtree(STATE, ignore_errors=True)
    keys, shared = STATE / "keys", STATE / "shared"
    keys.mkdir(parents=True)
    shared.mkdir(mode=0o777)
    shared.chmod(0o1777)
    (shared / "storage").mkdir(mode=0o777)
    (shared / "storage").chmod(0o1777)
    for name in ("id_ed25519", "host_ed25519"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"gpuforge-peer-{name}", "-f", str(keys / name)],
                       check=True)
    # The machines come with Ray installed (as an image would): on the login user's PATH, for Ray's `bash -i`.
    bashrc = f"\n# Ray, installed on this machine\nexport PATH={args.ray_venv.resolve() / 'bin'}:$PATH\n"
    nodes = start_nodes(STATE, keys / "host_ed25519", (keys / "id_ed25519.pub").read_text().strip(), bashrc)
    results: dict[str, list] = {}
    try:
        install_node_venv(nodes, keys)
        ours, ray = Ours(keys, shared), Ray(keys, args.ray_venv.resolve())
        ours.bring_up()
        first_setup = ours.setup()  # once: the nodes keep their venv, as machines would
        ours.teardown()
        for i in range(args.rounds):
            order = [ours, ray] if i % 2 == 0 else [ray, ours]
            for tool in order:
                print(f"round {i + 1}/{args.rounds}: {tool.name}", flush=True)
                lifecycle(tool, nodes, shared, i, results)
        if args.profile:
            ours.bring_up()
            profile_ours(ours)
            ours.teardown()
    finally:
        stop_nodes(nodes)
    report(results, args.rounds, first_setup)
    remove_state()


def remove_state() -> None:
    """Our state folder, and the SSH control sockets Ray keeps in /tmp whatever TMPDIR says (command_runner.py)."""
    import getpass
    import hashlib

    shutil.rmtree(STATE, ignore_errors=True)
    user_dir = Path("/tmp") / f"ray_ssh_{hashlib.sha256(getpass.getuser().encode()).hexdigest()[:10]}"
    shutil.rmtree(user_dir / hashlib.sha256(b"gpuforge-peer").hexdigest()[:10], ignore_errors=True)
    with contextlib.suppress(OSError):
        user_dir.rmdir()  # only when no other Ray cluster of this user has sockets there


if __name__ == "__main__":
    main()
