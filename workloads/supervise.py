"""The node-side supervisor of one run: started detached by the launcher on every node.

    python -m workloads.supervise --run-dir /opt/gpuforge/runs/<run id>

It reads `run.json`, takes the run's secrets (the 0600 file is deleted once read), starts the
command (torchrun, or the task's `run:` shell command) in its own process group with the run's
environment, and keeps `status.json` current: starting, running, then succeeded / failed /
cancelled / stopped, with the failed rank's own exit code, its error and the log tail. Output goes
to `output.log`, with secret values masked. A task's `outputs:` folder is synced to the run's
storage every few minutes and at the end, before the final state is written. It is the fail-fast half that lives
on the nodes: it publishes its status to the run's storage (`<run>/nodes/<node>.json`) and stops
its own ranks when a peer has failed or gone silent, and it fails the run when no training step
happens within the start timeout (a hung rendezvous). SIGTERM cancels the run on this node.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from workloads.failures import PEER_GRACE_S, explain_failure
from workloads.outputs import OutputSync, outputs_key
from workloads.secretfile import Redactor, take_secrets

POLL_S = 0.5
HEARTBEAT_S = 10.0  # how often a running node re-publishes its status to the run's storage
PEER_SILENCE_S = 120.0  # a running peer silent this long is presumed dead (machine gone)
KILL_GRACE_S = 10.0  # SIGTERM to SIGKILL for the run's process group
TAIL_LINES = 20
TERMINAL = ("succeeded", "failed", "cancelled", "stopped", "preempted")
STOP_REASON = "stop_reason"  # in the run dir: why the controller stopped the node (absent: the user cancelled it)
FAILURE_LOG_BYTES = 65536  # how much of the log's end is read to explain a failure


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def tail(path: Path, lines: int = TAIL_LINES, size: int = 16384) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - size))
            return "\n".join(f.read().decode(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def load_env_file(path: str) -> dict[str, str]:
    """The variables a shell env file (the NCCL/EFA environment the efa step writes) sets or changes.

    Sourced by `sh`, so `export X="...${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"` expands as it would in a login."""
    if not path or not os.path.isfile(path):
        return {}
    script = 'env -0; printf "\\0#gpuforge-sourced\\0"; . "$1" && env -0'
    result = subprocess.run(["sh", "-c", script, "sh", path], capture_output=True, timeout=30)
    if result.returncode != 0:
        raise RuntimeError(f"cannot source {path}: {result.stderr.decode(errors='replace').strip()}")
    before, _, after = result.stdout.decode(errors="replace").partition("\0#gpuforge-sourced\0")

    def parse(blob: str) -> dict[str, str]:
        return dict(item.split("=", 1) for item in blob.split("\0") if "=" in item)

    old, new = parse(before), parse(after)  # what the file changed, not what sh adds by itself
    return {k: v for k, v in new.items() if old.get(k) != v}


class Supervisor:
    def __init__(self, run_dir: Path):
        self.dir = run_dir
        self.spec = json.loads((run_dir / "run.json").read_text())
        self.status: dict = {"node": self.spec["node"], "rank": self.spec["node_rank"], "state": "starting",
                             "supervisor_pid": os.getpid(), "started": time.time(),
                             "attempt": self.spec.get("attempt", 1)}
        self.proc: subprocess.Popen | None = None
        self.peers_store = self._peers_store()
        self.last_publish = 0.0
        self.cancel_requested = False
        self.secrets = take_secrets(self.spec.get("secrets_file"))
        self.pump: threading.Thread | None = None
        self.outputs = self._outputs()
        self.last_outputs_sync = time.time()
        self.watcher = None  # the preemption watcher (workloads/preempt.py), on spot/preemptible nodes

    def _outputs(self) -> OutputSync | None:
        outputs, url = self.spec.get("outputs"), self.spec.get("storage_url")
        if not outputs or not url:
            return None
        from workloads.storage import open_store

        store = open_store(url).child("runs", self.spec["run_id"], outputs_key(self.spec["node_rank"]))
        cwd = Path(self.spec.get("cwd") or self.dir)
        return OutputSync(cwd / outputs["path"], store, log=self.log)

    def sync_outputs(self) -> None:
        if self.outputs is not None:
            sent = self.outputs.sync()
            if sent:
                self.log(f"outputs: synced {sent} file(s)")
        self.last_outputs_sync = time.time()

    def _peers_store(self):
        url = self.spec.get("storage_url")
        if not url or self.spec["nnodes"] < 2:
            return None
        try:
            from workloads.storage import open_store

            return open_store(url).child("runs", self.spec["run_id"], "nodes")
        except Exception as exc:  # noqa: BLE001 - peer watch is a safety net; the run goes on without it
            self.log(f"peer watch disabled: {exc}")
            return None

    def log(self, text: str) -> None:
        with open(self.dir / "supervisor.log", "a") as f:
            f.write(f"{time.strftime('%H:%M:%S')} {text}\n")

    def save(self, publish: bool = True) -> None:
        self.status["updated"] = time.time()
        write_json(self.dir / "status.json", self.status)
        if publish and self.peers_store is not None:
            try:
                self.peers_store.write_bytes(f"{self.spec['node']}.json", json.dumps(self.status).encode())
                self.last_publish = time.time()
            except Exception as exc:  # noqa: BLE001
                self.log(f"cannot publish status: {exc}")

    def environment(self) -> dict[str, str]:
        env = {**os.environ, **load_env_file(self.spec.get("env_file", "")), **self.spec["env"], **self.secrets}
        venv = self.spec.get("venv")
        if venv:  # `python`, `pip`, `torchrun`, `accelerate` are the node venv's
            env["PATH"] = f"{venv}/bin:{env.get('PATH') or '/usr/local/bin:/usr/bin:/bin'}"
            env["VIRTUAL_ENV"] = venv
        return env

    def start(self) -> None:
        out = open(self.dir / "output.log", "ab")
        stdout = subprocess.PIPE if self.secrets else out
        self.proc = subprocess.Popen(self.spec["command"], cwd=self.spec.get("cwd") or str(self.dir), env=self.environment(),
                                     stdout=stdout, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        if self.secrets:  # every byte passes the redactor before it reaches the log
            self.pump = threading.Thread(target=pump_redacted, args=(self.proc.stdout, out, Redactor(self.secrets.values())),
                                         daemon=True)
            self.pump.start()
        else:
            out.close()
        self.status.update(state="running", pid=self.proc.pid, pgid=self.proc.pid)
        self.save()
        self.log(f"started pid {self.proc.pid}: {' '.join(self.spec['command'])}")
        self.watch_preemption()

    def listen_alive(self) -> None:
        """Rank 0's: the port the cluster's other nodes' autostop watchers check (workloads/cluster_marks.py)."""
        port = int(self.spec.get("alive_port") or 0)
        if not port or self.spec["node_rank"] != 0:
            return
        from workloads.cluster_marks import AliveListener

        try:
            AliveListener(self.spec["env"]["MASTER_ADDR"], port).start()
        except OSError as exc:  # the other nodes' marks then expire: they may stop, the run goes on
            self.log(f"no liveness port {port}: {exc}")

    def watch_preemption(self) -> None:
        """On a spot/preemptible node: watch the metadata service, and on notice signal the run's group."""
        watch = self.spec.get("preemption")
        if not watch:
            return
        from workloads.preempt import PreemptionWatcher

        self.watcher = PreemptionWatcher(watch["cloud"], self.on_notice, base=watch.get("url", ""),
                                         poll_s=float(watch.get("poll_s", 5.0)), log=self.log)
        self.watcher.start()

    def on_notice(self, why: str) -> None:
        self.status["notice"] = why
        self.status["notice_time"] = time.time()
        self.save()
        for pid in process_tree(self.proc.pid):  # torchrun starts its workers in sessions of their own
            try:
                os.kill(pid, signal.SIGUSR1)  # the trainer saves a checkpoint now, then exits "preempted"
            except ProcessLookupError:
                pass

    def preemption(self) -> dict | None:
        """What the trainer wrote after its notice checkpoint, or the notice alone (a script that ignored it)."""
        from workloads.preempt import PREEMPTED_MARKER

        try:
            return json.loads((self.dir / PREEMPTED_MARKER).read_text())
        except (OSError, ValueError):
            return {"step": None} if self.status.get("notice") else None

    def kill_group(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def finish(self, state: str, reason: str, code: int | None, **extra) -> None:
        if self.watcher is not None:
            self.watcher.stop()
        self.kill_group()
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # stragglers of the group (worker grandchildren)
            except ProcessLookupError:
                pass
        if self.pump is not None:
            self.pump.join(timeout=10)
        try:
            self.sync_outputs()  # before the final state: whoever sees "succeeded" can fetch the outputs
        except Exception as exc:  # noqa: BLE001
            self.log(f"outputs: final sync failed: {exc}")
        self.status.update(state=state, reason=reason, exit_code=code, ended=time.time(),
                           tail=tail(self.dir / "output.log"), **extra)
        self.save()
        self.log(f"{state}: {reason}")

    def peer_failure(self) -> str | None:
        if self.peers_store is None:
            return None
        try:
            keys = self.peers_store.list()
        except Exception:  # noqa: BLE001 - storage hiccup: try again next round
            return None
        now = time.time()
        for key in keys:
            if key == f"{self.spec['node']}.json":
                continue
            try:
                peer = json.loads(self.peers_store.read_bytes(key))
            except Exception:  # noqa: BLE001
                continue
            if peer.get("attempt", 1) != self.status["attempt"]:
                continue  # an earlier attempt of a resumed run
            if peer.get("state") == "failed" and peer.get("secondary") and now - peer.get("ended", now) < PEER_GRACE_S:
                continue  # it lost a peer (maybe this node's rank, still ending): let this node fail on its own
            if peer.get("state") in ("failed", "stopped", "cancelled", "preempted"):
                return f"{peer.get('node')} {peer['state']}: {peer.get('reason', '')}"
            if peer.get("state") == "running" and now - peer.get("updated", now) > PEER_SILENCE_S:
                return f"{peer.get('node')} went silent {now - peer['updated']:.0f} s ago (machine down?)"
        return None

    def stop_reason(self) -> str:
        try:
            return (Path(self.dir) / STOP_REASON).read_text().strip()
        except OSError:
            return ""

    def run(self) -> int:
        (Path(self.dir) / STOP_REASON).unlink(missing_ok=True)  # an earlier attempt's
        self.save()
        self.listen_alive()
        self.start()
        start_timeout = float(self.spec.get("start_timeout", 0))
        last_peer_check = 0.0
        while True:
            code = self.proc.poll()
            if self.cancel_requested:
                why = self.stop_reason()
                if why:  # the controller stopped it (fail-fast, recovery), not the user
                    self.finish("stopped", f"stopped because {why}", code)
                else:
                    self.finish("cancelled", "cancelled by the user", code)
                return 1
            if code is not None:
                if code == 0:
                    self.finish("succeeded", "exit code 0", 0)
                    return 0
                if self.pump is not None:
                    self.pump.join(timeout=10)
                preempted = self.preemption()
                if preempted is not None:
                    saved = f"checkpoint of step {preempted['step']} saved" if preempted.get("step") is not None \
                        else "no checkpoint (the process did not answer the notice)"
                    self.finish("preempted", f"preempted: {self.status.get('notice') or 'a peer had the notice'}; {saved}",
                                code, checkpoint_step=preempted.get("step"), save_s=preempted.get("save_s"))
                    return 1
                failure = explain_failure(code, tail(self.dir / "output.log", 100000, FAILURE_LOG_BYTES))
                self.finish("failed", failure.reason, failure.exit_code, secondary=failure.secondary,
                            failed_rank=failure.rank, error=failure.error)
                return 1
            if start_timeout and not (self.dir / "progress.json").exists() and time.time() - self.status["started"] > start_timeout:
                self.finish("failed", f"no training step within {start_timeout:.0f} s (rendezvous hung? a peer missing?)", None)
                return 1
            if time.time() - last_peer_check > float(self.spec.get("peer_poll", 2.0)):
                last_peer_check = time.time()
                failure = self.peer_failure()
                if failure:
                    self.finish("stopped", f"stopped because {failure}", None)
                    return 1
                if time.time() - self.last_publish > HEARTBEAT_S:
                    self.save()
            if self.outputs is not None and time.time() - self.last_outputs_sync > float(self.spec["outputs"]["every"]):
                self.sync_outputs()
            time.sleep(POLL_S)


def process_tree(root: int) -> list[int]:
    """`root` and every process below it (Linux /proc), whatever session or group they moved to."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def pump_redacted(source, out, redactor: Redactor) -> None:
    """Copy the run's output to the log with secret values masked, as it comes."""
    try:
        for chunk in iter(lambda: source.read1(65536), b""):
            out.write(redactor.feed(chunk))
            out.flush()
        out.write(redactor.flush())
    finally:
        out.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workloads.supervise", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", required=True, type=Path)
    args = parser.parse_args(argv)
    sup = Supervisor(args.run_dir)

    def cancel(signum, frame):  # noqa: ARG001
        sup.cancel_requested = True

    signal.signal(signal.SIGTERM, cancel)
    signal.signal(signal.SIGINT, cancel)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the SSH session that started us may close
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # inherited: a preemption notice kills no launcher (preempt.py)
    try:
        return sup.run()
    except Exception as exc:  # noqa: BLE001 - the status file must say what happened
        sup.finish("failed", f"supervisor error: {type(exc).__name__}: {exc}", None)
        return 1


if __name__ == "__main__":
    sys.exit(main())
