"""Task files, secrets and shipping rules, checked on this machine without a cluster."""

from __future__ import annotations

import os

import pytest

from workloads.errors import ConfigError
from workloads.secretfile import MASK, Redactor, resolve_secrets, take_secrets
from workloads.ship import collect_workdir
from workloads.env_overrides import parse_env_overrides
from workloads.task import load_task, script_task


def task_file(tmp_path, text, name="task.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


FULL = """
name: finetune
nodes: 2
resources: {cloud: aws, gpu: "A10G:1", spot: true, disk_gb: 200}
workdir: .
setup: pip install -r requirements.txt
run: torchrun --nnodes $NNODES train.py
envs: {EPOCHS: 3, DEBUG: true, NAME: x}
secrets: [HF_TOKEN, {name: DB_PASS, file: ~/db}]
outputs: {path: out, every: 60}
"""


def test_a_full_task_file_loads(tmp_path):
    task, workdir = load_task(task_file(tmp_path, FULL))
    assert (task.name, task.nodes, task.kind, workdir) == ("finetune", 2, "run", tmp_path.resolve())
    assert task.resources.spot and task.resources.gpu == "A10G:1" and task.resources.disk_gb == 200
    assert task.envs == {"EPOCHS": "3", "DEBUG": "true", "NAME": "x"}
    assert [(s.name, s.file) for s in task.secrets] == [("HF_TOKEN", ""), ("DB_PASS", "~/db")]
    assert task.outputs.path == "out" and task.outputs.every == 60


def test_recovery_is_read_and_defaults_to_none(tmp_path):
    assert load_task(task_file(tmp_path, "run: x\nrecovery: 3\n"))[0].recovery == 3
    assert load_task(task_file(tmp_path, "run: x\n", name="other.yaml"))[0].recovery == 0


def test_the_name_defaults_to_the_file_name_and_nodes_to_one(tmp_path):
    task, _ = load_task(task_file(tmp_path, "run: python x.py\n", name="My_Job.yaml"))
    assert task.name == "my-job" and task.nodes == 1 and task.outputs is None


@pytest.mark.parametrize(
    "text, lines",
    [
        ("run: x\ncolour: red\n", ["unknown key 'colour'; valid keys: name, nodes, nproc_per_node, resources, workdir"]),
        ("run: x\nresources: {cloud: aws, flavour: big}\n", ["unknown key 'resources.flavour'; valid keys: cloud, instance_type, gpu"]),
        ("run: x\nnodes: 0\n", ["nodes: Input should be greater than or equal to 1; got 0"]),
        ("run: x\nnodes: two\nresources: {cloud: azure}\n",
         ["nodes: Input should be a valid integer", "resources.cloud: must be one of local, aws, gcp; got 'azure'"]),
        ("run: x\nresources: {spot: maybe}\n", ["resources.spot: Input should be a valid boolean"]),
        ("run: x\nresources: {gpu: 'A100 x8'}\n", ["resources.gpu: must be MODEL or MODEL:COUNT"]),
        ("name: Bad_Name\nrun: x\n", ["name: must be lowercase letters"]),
        ("setup: pip install x\n", ["give exactly one of `run:`"]),
        ("run: x\nscript: train.py\n", ["give exactly one of `run:`"]),
        ("run: x\nargs: [--lr, 1]\n", ["`args:` goes with `script:`"]),
        ("run: x\nenvs: {MASTER_ADDR: 1.2.3.4}\n", ["MASTER_ADDR is set by gpuforge for every process"]),
        ("run: x\nenvs: {A: [1, 2]}\n", ["A must be a string or a number"]),
        ("run: x\nenvs: {A: 1}\nsecrets: [A]\n", ["A is given twice"]),
        ("run: x\nsecrets: [{name: T, env: X, file: y}]\n", ["give `env:` or `file:`, not both"]),
        ("run: x\noutputs: ../elsewhere\n", ["outputs.path: must be a folder inside the run's working directory"]),
        ("run: x\noutputs: {path: out, every: 0}\n", ["outputs.every: Input should be greater than 0"]),
        ("run: x\nworkdir: nope\n", ["workdir nope"]),
        ("run: x\nrecovery: -1\n", ["recovery: give a whole number of recoveries from 0 to 100 (0: off); got -1"]),
        # a regression: `recovery: true` was read as 1 and launched; `x` and 101 named no valid range
        ("run: x\nrecovery: true\n", ["recovery: give a whole number of recoveries from 0 to 100 (0: off); got True"]),
        ("run: x\nrecovery: x\n", ["recovery: give a whole number of recoveries from 0 to 100 (0: off); got 'x'"]),
        ("run: x\nrecovery: 101\n", ["recovery: give a whole number of recoveries from 0 to 100 (0: off); got 101"]),
        ("script: missing.py\n", ["script missing.py is not a file in the workdir"]),
        ("- run: x\n", ["a task file is a YAML mapping"]),
        ("run: [\n", ["not readable YAML"]),
    ],
)
def test_each_bad_field_is_one_clear_line(tmp_path, text, lines):
    with pytest.raises(ConfigError) as info:
        load_task(task_file(tmp_path, text))
    message = str(info.value).splitlines()
    assert len(message) == len(lines), message
    for got, want in zip(message, lines):
        assert want in got and got.startswith(str(tmp_path)), got


def test_a_missing_task_file_and_a_folder_are_named(tmp_path):
    with pytest.raises(ConfigError, match="task file .*nope.yaml does not exist"):
        load_task(tmp_path / "nope.yaml")
    task_file(tmp_path, "run: x\n", "a.yaml")
    with pytest.raises(ConfigError, match=r"is a folder; give a task file \(there: a.yaml\)"):
        load_task(tmp_path)


def test_env_overrides_win_and_a_bare_name_comes_from_here(tmp_path, monkeypatch):
    monkeypatch.setenv("FROM_HERE", "yes")
    task, _ = load_task(task_file(tmp_path, "run: x\nenvs: {EPOCHS: 3}\n"), parse_env_overrides(["EPOCHS=1", "FROM_HERE"]))
    assert task.envs == {"EPOCHS": "1", "FROM_HERE": "yes"}
    for bad, message in (["1X=2", "expected NAME=VALUE"], ["RANK=3", "set by gpuforge"], ["NOT_SET_ANYWHERE", "is not set here"]):
        with pytest.raises(ConfigError, match=message):
            parse_env_overrides([bad])


def test_secrets_come_from_the_environment_or_a_file_and_missing_ones_are_named(tmp_path):
    task, _ = load_task(task_file(tmp_path, "run: x\nsecrets: [A, {name: B, file: b.txt}, {name: C, env: OTHER}]\n"))
    (tmp_path / "b.txt").write_text("  from-a-file\n")
    os.chdir(tmp_path)
    assert resolve_secrets(task.secrets, {"A": "value-a", "OTHER": "value-c"}) == {
        "A": "value-a", "B": "from-a-file", "C": "value-c"}
    with pytest.raises(ConfigError) as info:
        resolve_secrets(task.secrets, {"A": "abc"})
    assert "A (shorter than 4 characters" in str(info.value) and "C ($OTHER is not set here)" in str(info.value)


def test_the_secrets_file_is_deleted_once_read(tmp_path):
    path = tmp_path / "s.json"
    path.write_text('{"T": "v"}')
    assert take_secrets(path) == {"T": "v"} and not path.exists()
    assert take_secrets(path) == {}


def test_the_redactor_masks_values_split_across_chunks():
    r = Redactor(["hunter2-secret", "abcd"])
    data = b"token=hunter2-secret and abcd and hunter2-sec"
    out = b"".join(r.feed(data[i : i + 3]) for i in range(0, len(data), 3)) + r.feed(b"ret!\n") + r.flush()
    assert out == f"token={MASK} and {MASK} and {MASK}!\n".encode()
    assert Redactor([]).feed(b"plain") == b"plain"


# -- shipping -------------------------------------------------------------------------------------


def tree(root, files):
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return root


def shipped(root, **kw):
    return [rel for rel, _ in collect_workdir(root, **kw).files]


def test_gitignore_and_gpuforgeignore_are_honoured_as_git_reads_them(tmp_path):
    root = tree(tmp_path / "proj", {
        "train.py": "x", ".gitignore": "*.log\ndata/\n!keep.log\n", ".gpuforgeignore": "notes.md\n",
        "a.log": "x", "keep.log": "x", "data/big.bin": "x", "notes.md": "x",
        "sub/.gitignore": "local.txt\n", "sub/local.txt": "x", "sub/mod.py": "x", "other/local.txt": "x",
        ".git/config": "x", "__pycache__/m.pyc": "x", "env/pyvenv.cfg": "x", "env/lib/x.py": "x",
    })
    assert shipped(root) == [".gitignore", ".gpuforgeignore", "keep.log", "other/local.txt", "sub/.gitignore",
                             "sub/mod.py", "train.py"]


@pytest.mark.parametrize(
    "files, named",
    [
        ({".ssh/id_ed25519": "k"}, ".ssh/"),
        ({"deploy/.aws/credentials": "k"}, "deploy/.aws/"),
        ({"cfg/.config/gcloud/adc.json": "k"}, "cfg/.config/gcloud/"),
        ({".env": "TOKEN=1"}, ".env"),
        ({"conf/.env.production": "TOKEN=1"}, "conf/.env.production"),
        ({"id_rsa": "k"}, "id_rsa"),
        ({"server.pem": "-----BEGIN RSA PRIVATE KEY-----\n..."}, "server.pem"),
        ({"sa.json": '{"type": "service_account", "private_key": "x"}'}, "sa.json"),
    ],
)
def test_credentials_are_refused_by_name_whatever_the_ignore_files_say(tmp_path, files, named):
    root = tree(tmp_path / "proj", {"train.py": "x", ".gitignore": "!*\n", **files})
    with pytest.raises(ConfigError) as info:
        collect_workdir(root)
    assert "holds credentials that must never leave this machine" in str(info.value) and named in str(info.value)


def test_ignored_credentials_are_fine_and_a_public_certificate_ships(tmp_path):
    root = tree(tmp_path / "proj", {"train.py": "x", ".gpuforgeignore": ".env\n", ".env": "T=1",
                                    "ca.pem": "-----BEGIN CERTIFICATE-----\n"})
    assert shipped(root) == [".gpuforgeignore", "ca.pem", "train.py"]


def test_a_home_directory_is_never_shipped(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home" / "me"))
    (tmp_path / "home" / "me").mkdir(parents=True)
    for root in (tmp_path / "home" / "me", tmp_path / "home", tmp_path):
        with pytest.raises(ConfigError, match="it is \\(or holds\\) a home directory"):
            collect_workdir(root)


def test_a_workdir_of_tilde_is_the_home_directory_and_so_refused(tmp_path, monkeypatch):
    """Found trying it as a new user: `workdir: "~"` was taken as a folder named `~` next to the task file."""
    home = tmp_path / "me"
    (home / "proj").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    _, workdir = load_task(task_file(home / "proj", 'workdir: "~"\nrun: echo hi\n'))
    assert workdir == home
    with pytest.raises(ConfigError, match="it is \\(or holds\\) a home directory"):
        collect_workdir(workdir)


def test_past_the_limit_the_biggest_entries_are_named(tmp_path):
    root = tree(tmp_path / "proj", {"train.py": "x", "data/a.bin": b"0" * 700_000, "data/b.bin": b"0" * 400_000,
                                    "model.bin": b"0" * 300_000})
    with pytest.raises(ConfigError) as info:
        collect_workdir(root, limit_mb=1)
    assert "over the 1 MB limit; biggest: data/ 1.0 MB, model.bin 293.0 KB, train.py 1 B" in str(info.value)
    assert "--max-ship-mb" in str(info.value)
    assert len(collect_workdir(root, limit_mb=2).files) == 4


def test_the_digest_changes_with_the_content_only(tmp_path):
    root = tree(tmp_path / "proj", {"train.py": "x = 1\n"})
    first = collect_workdir(root).digest
    os.utime(root / "train.py", (1, 1))
    assert collect_workdir(root).digest == first
    (root / "train.py").write_text("x = 2\n")
    assert collect_workdir(root).digest != first


def test_script_folder_and_missing_script_are_named(tmp_path):
    (tmp_path / "proj").mkdir()
    (tmp_path / "proj" / "main.py").write_text("")
    with pytest.raises(ConfigError, match=r"is a folder; give the script file in it, e\.g\. .*/proj/train\.py \(there: main\.py\)"):
        script_task(str(tmp_path / "proj"), [], 1, 0, {})
    with pytest.raises(ConfigError, match="no such file"):
        script_task(str(tmp_path / "nope.py"), [], 1, 0, {})
    task, workdir = script_task(str(tmp_path / "proj" / "main.py"), ["--lr", "3"], 2, 0, {"A": "1"})
    assert (task.script, task.args, task.nodes, workdir) == ("main.py", ["--lr", "3"], 2, (tmp_path / "proj").resolve())


def test_outputs_sync_uploads_only_what_is_new_or_changed(tmp_path):
    from workloads.outputs import OutputSync, outputs_key
    from workloads.storage import open_store

    store = open_store((tmp_path / "storage").as_uri()).child("runs", "r1", outputs_key(0))
    out = tree(tmp_path / "out", {"model.pt": "1", "logs/a.txt": "a"})
    sync = OutputSync(out, store)
    assert sync.sync() == 2 and store.list() == ["logs/a.txt", "model.pt"]
    assert sync.sync() == 0
    (out / "model.pt").write_text("22")
    assert sync.sync() == 1 and store.read_bytes("model.pt") == b"22"
    assert outputs_key(1) == "outputs/node-1"
    assert OutputSync(tmp_path / "none", store).sync() == 0
