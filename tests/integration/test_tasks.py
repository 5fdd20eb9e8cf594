"""Task files end to end, as a user runs them: `gpuforge` from a folder outside the repo, a 2-node local
cluster of real sshd nodes, real pip, and unchanged code of popular frameworks (Lightning, accelerate).

Each run must succeed, its outputs come back with `gpuforge fetch`, and its secret reach the script
while appearing in no log, record, status or process listing (the whole state dir, node dirs and
storage included, are searched for it).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from infra.local import destroy_local_cluster, our_processes

GPUFORGE = str(Path(sys.executable).parent / "gpuforge")
SECRET = "hf_sEcReT-7f3a9c21d4"  # never printed by the tests themselves
LIGHTNING = "lightning==2.6.6"
ACCELERATE = "accelerate==1.15.0"


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpuforge-home")
    yield path
    for record in path.glob("clusters/*/cluster.json"):
        destroy_local_cluster(record.parent)
        assert not our_processes(record.parent)


def gpuforge(home, cwd, *args, timeout=300, **env):
    full = {k: v for k, v in os.environ.items() if not k.startswith("GPUFORGE_")}
    full.update(GPUFORGE_HOME=str(home), **env)
    return subprocess.run([GPUFORGE, *args], cwd=cwd, env=full, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def cluster(home, tmp_path_factory):
    """A 2-node local cluster made and set up by a first `gpuforge launch` (no cluster selected yet)."""
    project = tmp_path_factory.mktemp("first")
    (project / "task.yaml").write_text("name: tk\nnodes: 2\nrun: echo ready on $NODE_RANK\n")
    res = gpuforge(home, project, "launch", "task.yaml")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "creating local cluster tk (2 node(s))" in res.stdout and "ready on 0" in res.stdout
    from infra.cluster import ClusterInfo

    return ClusterInfo.load(home / "clusters" / "tk" / "cluster.json")


def assert_secret_nowhere(home, *more):
    """grep -r for the secret through the state dir (records, logs, node dirs, storage) and `more`."""
    for root in (home, *more):
        for path in Path(root).rglob("*"):
            if path.is_file() and not path.is_symlink() and "site-packages" not in path.parts:
                assert SECRET.encode() not in path.read_bytes(), f"the secret is in {path}"


def secret_sha() -> str:
    return hashlib.sha256(SECRET.encode()).hexdigest()


LIGHTNING_SCRIPT = '''
import hashlib, os
import torch
from torch.utils.data import DataLoader, TensorDataset
import lightning as L


class Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(8, 1)

    def training_step(self, batch, _):
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


if __name__ == "__main__":
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(64, 8), torch.randn(64, 1))
    trainer = L.Trainer(accelerator="cpu", devices=1, num_nodes=int(os.environ["NNODES"]), strategy="ddp",
                        max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(Tiny(), DataLoader(data, batch_size=8))
    if trainer.global_rank == 0:
        os.makedirs("out", exist_ok=True)
        torch.save(trainer.model.state_dict(), "out/model.pt")
        token = hashlib.sha256(os.environ["HF_TOKEN"].encode()).hexdigest()
        open("out/result.json", "w").write(f'{{"world": {trainer.world_size}, "token": "{token}", '
                                           f'"lightning": "{L.__file__}"}}')
'''


def test_a_lightning_ddp_script_whose_setup_installs_lightning(cluster, home, tmp_path):
    project = tmp_path / "lightning-proj"
    project.mkdir()
    (project / "train.py").write_text(LIGHTNING_SCRIPT)
    (project / "requirements.txt").write_text(LIGHTNING + "\n")
    (project / "task.yaml").write_text(
        "name: lit\nnodes: 2\nsetup: pip install --quiet -r requirements.txt\nrun: python train.py\n"
        "secrets: [HF_TOKEN]\noutputs: out\n")
    res = gpuforge(home, project, "launch", "task.yaml", "--cluster", "tk", timeout=600, HF_TOKEN=SECRET)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr
    assert "node-0: setup ran in" in res.stdout and "node-1: setup ran in" in res.stdout
    assert "Initializing distributed: GLOBAL_RANK: 0, MEMBER: 1/2" in res.stdout
    fetched = gpuforge(home, tmp_path, "fetch", "--dest", "fetched")
    assert fetched.returncode == 0, fetched.stderr
    (result,) = (tmp_path / "fetched").glob("lit-*/outputs/result.json")
    data = json.loads(result.read_text())
    assert data["world"] == 2 and data["token"] == secret_sha()
    # lightning came from the node's own venv (the controller does not have it)
    assert data["lightning"].startswith(str(cluster.node(0).workdir) + "/venv/")
    assert (result.parent / "model.pt").stat().st_size > 0
    assert SECRET not in res.stdout + res.stderr
    assert_secret_nowhere(home, tmp_path / "fetched")


ACCELERATE_SCRIPT = '''
import hashlib, os
import torch
from accelerate import Accelerator

accelerator = Accelerator(cpu=True)
torch.manual_seed(0)
model = torch.nn.Linear(8, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(64, 8), torch.randn(64, 1)), batch_size=8)
model, opt, data = accelerator.prepare(model, opt, data)
for step, (x, y) in enumerate(data):
    loss = torch.nn.functional.mse_loss(model(x), y)
    accelerator.backward(loss)
    opt.step()
    opt.zero_grad()
    if step == 3:
        break
accelerator.wait_for_everyone()
if accelerator.is_main_process:
    os.makedirs(os.environ["OUT"], exist_ok=True)
    accelerator.save(accelerator.unwrap_model(model).state_dict(), os.environ["OUT"] + "/model.pt")
    token = hashlib.sha256(os.environ["HF_TOKEN"].encode()).hexdigest()
    open(os.environ["OUT"] + "/result.json", "w").write(f'{{"processes": {accelerator.num_processes}, "token": "{token}"}}')
accelerator.end_training()
'''
# The multi-node launch of accelerate's docs ("accelerate launch --multi_gpu --num_machines ... --machine_rank ...")
ACCELERATE_TASK = """name: acc
nodes: 2
setup: pip install --quiet {pin}
run: |
  accelerate launch --multi_gpu --num_machines $NNODES --num_processes $(( NNODES * NPROC_PER_NODE )) \\
    --machine_rank $NODE_RANK --main_process_ip $MASTER_ADDR --main_process_port $MASTER_PORT train.py
envs: {{OUT: results}}
secrets: [{{name: HF_TOKEN, file: {secret_file}}}]
outputs: {{path: results, every: 30}}
"""


def test_an_accelerate_script_launched_as_its_docs_launch_multi_node_jobs(cluster, home, tmp_path):
    project = tmp_path / "acc-proj"
    project.mkdir()
    secret_file = tmp_path / "hf_token"  # outside the workdir: secrets come from a file too
    secret_file.write_text(SECRET + "\n")
    (project / "train.py").write_text(ACCELERATE_SCRIPT)
    (project / "task.yaml").write_text(ACCELERATE_TASK.format(pin=ACCELERATE, secret_file=secret_file))
    res = gpuforge(home, project, "launch", "task.yaml", "--cluster", "tk", "--run-id", "acc-1", timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr
    fetched = gpuforge(home, tmp_path, "fetch", "acc-1", "--dest", "fetched")
    assert fetched.returncode == 0, fetched.stderr
    data = json.loads((tmp_path / "fetched" / "acc-1" / "outputs" / "result.json").read_text())
    assert data == {"processes": 2, "token": secret_sha()}
    assert_secret_nowhere(home, tmp_path / "fetched")


PLAIN_SCRIPT = '''
import hashlib, json, os, pathlib
token = os.environ["API_TOKEN"]
print("the script prints its token by mistake:", token, flush=True)
mine = [p for p in pathlib.Path("/proc").iterdir() if p.name.isdigit()]
in_cmdlines = []
for p in mine:
    try:
        if token.encode() in (p / "cmdline").read_bytes():
            in_cmdlines.append(p.name)
    except OSError:
        pass
out = pathlib.Path("out")
out.mkdir(exist_ok=True)
(out / "result.json").write_text(json.dumps({"token": hashlib.sha256(token.encode()).hexdigest(),
                                              "in_cmdlines": in_cmdlines, "greeting": os.environ["GREETING"],
                                              "rank_vars": [k for k in ("RANK", "WORLD_SIZE") if k in os.environ]}))
'''


def test_a_plain_single_process_script_with_a_secret_and_env_overrides(cluster, home, tmp_path):
    project = tmp_path / "plain"
    project.mkdir()
    (project / "report.py").write_text(PLAIN_SCRIPT)
    (project / "requirements.txt").write_text("# nothing yet\n")
    (project / "task.yaml").write_text("name: plain\nsetup: echo installing\nrun: python report.py\n"
                                       "envs: {GREETING: hello}\nsecrets: [API_TOKEN]\noutputs: out\n")
    res = gpuforge(home, project, "launch", "task.yaml", "--cluster", "tk", "--run-id", "plain-1",
                   "--env", "GREETING=hi", API_TOKEN=SECRET)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "shipping 3 file(s)" in res.stdout and "node-0: setup ran in" in res.stdout
    assert "the script prints its token by mistake: *****" in res.stdout, res.stdout
    logs = gpuforge(home, project, "logs", "plain-1")
    status = gpuforge(home, project, "status", "plain-1")
    assert "*****" in logs.stdout and SECRET not in logs.stdout + status.stdout + res.stdout + res.stderr
    fetched = gpuforge(home, project, "fetch", "plain-1")  # into ./runs of the folder the task ships
    data = json.loads((project / "runs" / "plain-1" / "outputs" / "result.json").read_text())
    assert data == {"token": secret_sha(), "in_cmdlines": [], "greeting": "hi", "rank_vars": []}, fetched.stdout
    assert_secret_nowhere(home, project / "runs")

    # the same task again: setup and code unchanged (fetched results are not code), nothing re-run or re-shipped
    codes = set((Path(cluster.node(0).workdir) / "code").iterdir())
    again = gpuforge(home, project, "launch", "task.yaml", "--cluster", "tk", API_TOKEN=SECRET)
    assert again.returncode == 0 and "node-0: setup unchanged" in again.stdout, again.stdout + again.stderr
    assert set((Path(cluster.node(0).workdir) / "code").iterdir()) == codes
    # a changed requirement file runs the setup again
    (project / "requirements.txt").write_text("# still nothing\n")
    third = gpuforge(home, project, "launch", "task.yaml", "--cluster", "tk", API_TOKEN=SECRET)
    assert third.returncode == 0 and "node-0: setup ran in" in third.stdout, third.stdout + third.stderr
    # a missing secret is refused before anything starts
    missing = gpuforge(home, project, "launch", "task.yaml", "--cluster", "tk")
    assert missing.returncode == 2 and "secret(s) not available: API_TOKEN ($API_TOKEN is not set here)" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_the_secrets_file_is_0600_from_its_creation(cluster, tmp_path):
    from infra.ssh import connect
    from workloads.secretfile import put_secret_file

    node = cluster.node(1)
    path = f"{node.workdir}/probe/secrets.json"
    conn = connect(cluster, node)
    try:
        put_secret_file(conn, path, {"A": "value"})
        assert oct(os.stat(path).st_mode & 0o777) == "0o600"
        assert json.loads(Path(path).read_text()) == {"A": "value"}
    finally:
        conn.close()
        Path(path).unlink(missing_ok=True)


# Rank 1 breaks and takes a few seconds to end its process (as a rank does whose exception unwinds through
# teardown); rank 0 fails first, only because its peer went away. Named must be rank 1, its code and its error.
CRASH = '''
import sys, time, traceback
import torch.distributed as dist
dist.init_process_group("gloo")
if dist.get_rank() == 1:
    dist.destroy_process_group()
    try:
        raise ValueError("lr must be > 0, got -1")
    except ValueError:
        traceback.print_exc()
    time.sleep(4)
    sys.exit(3)
dist.barrier()
'''


def test_a_failed_script_reports_its_own_exit_code_rank_node_and_error(cluster, home, tmp_path):
    """Regression (issue 10, defect 3): a script that exits 3 was reported as "exit code 1" on the wrong node
    (the node whose rank lost its peer first)."""
    (tmp_path / "crash.py").write_text(CRASH)
    res = gpuforge(home, tmp_path, "train", "--cluster", "tk", "--script", "crash.py", "--run-id", "crash-1", "--follow")
    assert res.returncode == 3, res.stdout + res.stderr
    said = "rank 1 (local rank 0) exited with code 3: ValueError: lr must be > 0, got -1"
    assert f"run crash-1 failed on node-1 ({cluster.node(1).address}): {said}" in res.stdout, res.stdout[-3000:]
    status = gpuforge(home, tmp_path, "status", "crash-1", "--cluster", "tk")
    assert f"run crash-1 failed on node-1 ({cluster.node(1).address}): {said}" in status.stdout, status.stdout


def test_a_succeeded_script_leaves_no_traceback_in_its_logs(cluster, home, tmp_path):
    (tmp_path / "hello.py").write_text("import os\nprint('hello from rank', os.environ['RANK'])\n")
    res = gpuforge(home, tmp_path, "train", "--cluster", "tk", "--script", "hello.py", "--run-id", "hello-1", "--follow")
    assert res.returncode == 0 and "shipping 1 file(s)" in res.stdout, res.stdout + res.stderr
    for node in cluster.nodes:
        log = (Path(node.workdir) / "runs" / "hello-1" / "output.log").read_text()
        assert f"hello from rank {node.rank}" in log and "Traceback" not in log and "exit barrier" not in log


def wait_for(predicate, timeout=120.0, what=""):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


TINY = ["width=0.25", "batch_size=32", "tensorboard=false", "threads=1", "export=none", "quantize=false", "log_every=1"]


def test_resume_continues_a_cancelled_run_from_its_last_checkpoint_and_busy_nodes_say_so(cluster, home, tmp_path):
    nothing = gpuforge(home, tmp_path, "cancel", "--cluster", "tk")
    assert nothing.stdout.strip() == "nothing is running on cluster tk", nothing.stdout
    start = gpuforge(home, tmp_path, "train", "--cluster", "tk", "--job", "convnet-digits", "--run-id", "res",
                     *TINY, "max_steps=120", "ckpt_every=5")
    assert start.returncode == 0, start.stderr
    storage = Path(cluster.storage_url.removeprefix("file://")) / "runs" / "res"
    wait_for(lambda: (storage / "step-10" / "manifest.json").exists(), what="a checkpoint")
    busy = gpuforge(home, tmp_path, "train", "--cluster", "tk", "--job", "convnet-digits", *TINY)
    assert busy.returncode == 2 and "the nodes are busy: run res on node-0, node-1 is running" in busy.stderr
    cancelled = gpuforge(home, tmp_path, "cancel", "--cluster", "tk")
    assert "run res on node-0: cancelled" in cancelled.stdout and "run res on node-1: cancelled" in cancelled.stdout
    again = gpuforge(home, tmp_path, "cancel", "res", "--cluster", "tk")
    assert again.stdout.strip() == "run res already ended (cancelled); nothing to cancel"
    taken = gpuforge(home, tmp_path, "train", "--cluster", "tk", "--job", "convnet-digits", "--run-id", "res", *TINY)
    assert taken.returncode == 2 and "add --resume to continue it" in taken.stderr
    resumed = gpuforge(home, tmp_path, "train", "--cluster", "tk", "--resume", "--run-id", "res", "--follow")
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr
    assert "resumed run res" in resumed.stdout and "resumed run res from step" in resumed.stdout
    summary = json.loads((storage / "summary.json").read_text())
    assert 10 <= summary["resumed_from_step"] < 120 and summary["steps"] == 120, summary
    assert (Path(cluster.node(0).workdir) / "runs" / "res" / "output.1.log").exists(), "the first attempt's log is kept"


def test_a_hosts_file_without_key_uses_the_default_keys_and_the_agent(cluster, home, tmp_path):
    key = Path(cluster.node(0).key_path)
    hosts = tmp_path / "lab.yaml"
    hosts.write_text("user: " + cluster.node(0).user + "\nstorage: " + cluster.storage_url + "\nhosts:\n" + "".join(
        f"  - {{address: {n.public_address}, port: {n.ssh_port}, workdir: {n.workdir}}}\n" for n in cluster.nodes))
    fake_home = tmp_path / "me"
    (fake_home / ".ssh").mkdir(parents=True)
    (fake_home / ".ssh" / "id_ed25519").write_bytes(key.read_bytes())
    (fake_home / ".ssh" / "id_ed25519").chmod(0o600)
    res = gpuforge(home, tmp_path, "exec", "--cluster", str(hosts), "--", "echo", "up", HOME=str(fake_home))
    assert res.returncode == 0 and res.stdout.splitlines() == ["[node-0] up", "[node-1] up"], res.stdout + res.stderr
    doctor = gpuforge(home, tmp_path, "doctor", "--cluster", str(hosts), HOME=str(fake_home))
    assert doctor.returncode == 0 and "doctor: ready for cluster lab (hosts)" in doctor.stdout, doctor.stdout

    empty = tmp_path / "nobody"
    empty.mkdir()
    sock = tmp_path / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL)
    try:
        wait_for(sock.exists, timeout=10, what="ssh-agent")
        subprocess.run(["ssh-add", str(key)], env={**os.environ, "SSH_AUTH_SOCK": str(sock)}, check=True,
                       capture_output=True)
        res = gpuforge(home, tmp_path, "exec", "--cluster", str(hosts), "--", "echo", "agent", HOME=str(empty),
                       SSH_AUTH_SOCK=str(sock))
        assert res.returncode == 0 and "[node-1] agent" in res.stdout, res.stdout + res.stderr
    finally:
        agent.terminate()
        agent.wait(timeout=10)
    listed = gpuforge(home, tmp_path, "clusters")
    assert "lab" not in listed.stdout, "--cluster FILE must not register the cluster for good"


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--script", "x.py", "lr=0.1"], "words after --script go to your script only after `--`"),
        (["train", "--script", "."], "is a folder; give the script file in it"),
        (["logs", "--tail", "abc"], "error: --tail expects a whole number; got 'abc'"),
        (["logs", "--tail", "-5", "--cluster", "tk"], "error: --tail must be >= 0; got -5"),
        (["up", "--cloud", "aws", "--disk-gb", "abc"], "error: --disk-gb expects a whole number; got 'abc'"),
        (["up", "--cloud", "aws"], "error: --instance-type is required with --cloud aws; e.g. g4dn.xlarge"),
        (["train", "--nproc-per-node", "abc", "--job", "convnet-digits"], "--nproc-per-node expects a whole number"),
        (["launch", "nope.yaml", "--cluster", "tk"], "error: task file nope.yaml does not exist"),
    ],
)
def test_bad_input_is_one_line_from_any_folder(cluster, home, tmp_path, args, message):
    (tmp_path / "x.py").write_text("")
    res = gpuforge(home, tmp_path, *args)
    assert res.returncode == 2, res.stdout + res.stderr
    assert message in res.stderr and len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr


def test_train_list_lists_the_jobs_and_chained_tasks_work(cluster, home, tmp_path):
    listed = gpuforge(home, tmp_path, "train", "--list")
    assert listed.stdout.split()[0] == "seed000-cnn" and "convnet-digits" in listed.stdout
    chained = gpuforge(home, tmp_path, "use", "tk", "exec", "--", "echo", "chained")
    assert chained.returncode == 0 and "[node-0] chained" in chained.stdout, chained.stdout + chained.stderr
    # Regression (issue 10, defect 8): doctor exited 1 on a healthy local cluster for want of cloud credentials.
    doctor = gpuforge(home, tmp_path, "doctor", "--cluster", "tk", AWS_SHARED_CREDENTIALS_FILE="/nonexistent",
                      CLOUDSDK_CONFIG="/nonexistent")
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert doctor.stdout.strip().splitlines()[-1].startswith("doctor: ready for cluster tk (local)"), doctor.stdout


def test_launch_down_tears_the_cluster_down_when_the_run_fails_or_is_interrupted(home, tmp_path):
    (tmp_path / "fail.yaml").write_text("name: failing\nrun: echo about to fail; exit 5\n")
    res = gpuforge(home, tmp_path, "launch", "fail.yaml", "--cluster", "downa", "--down")
    assert res.returncode == 5, res.stdout + res.stderr
    assert "creating local cluster downa" in res.stdout and "the process exited with code 5" in res.stdout
    assert "tearing down cluster downa" in res.stdout and not (home / "clusters" / "downa").exists()

    (tmp_path / "long.yaml").write_text("name: long\nrun: sleep 120\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUFORGE_")}
    proc = subprocess.Popen([GPUFORGE, "launch", "long.yaml", "--cluster", "downb", "--down"], cwd=tmp_path,
                            env={**env, "GPUFORGE_HOME": str(home)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("started run"):
            break
    state = home / "clusters" / "downb"
    assert state.exists(), "".join(lines)
    proc.send_signal(__import__("signal").SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, "".join(lines) + out
    assert not state.exists() and not our_processes(state)
