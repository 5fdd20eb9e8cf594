"""`fab` argv conveniences: bare key=value words and the words after `--` reach our tasks."""

import sys
from types import SimpleNamespace

import pytest

from provision.cli import argv as cli


@pytest.fixture
def program(monkeypatch):
    core = SimpleNamespace(unparsed=[], remainder="")
    monkeypatch.setitem(sys.modules, "fabric.main", SimpleNamespace(program=SimpleNamespace(core=core)))
    monkeypatch.setattr(cli, "REMAINDER", [])
    monkeypatch.setattr(cli, "OVERRIDES", [])
    return core


def adopt(monkeypatch, program, argv, unparsed, remainder=""):
    monkeypatch.setattr(sys, "argv", ["fab", *argv])
    program.unparsed[:] = unparsed
    program.remainder = remainder
    cli.adopt_fab_argv()


def test_bare_overrides_after_train_become_its_overrides(monkeypatch, program):
    words = ["train", "--job", "convnet-digits", "lr=0.1", "--nodes", "2", "max_steps=5", "--set", "seed=3"]
    adopt(monkeypatch, program, words, list(words))
    assert cli.OVERRIDES == ["lr=0.1", "max_steps=5"]
    assert program.unparsed == ["train", "--job", "convnet-digits", "--nodes", "2", "--set", "seed=3"]


def test_words_after_double_dash_go_to_exec_with_their_spaces(monkeypatch, program):
    adopt(monkeypatch, program, ["exec", "--", "echo", "a b", "|", "wc"], ["exec"], remainder="echo a b | wc")
    assert cli.REMAINDER == ["echo", "a b", "|", "wc"] and program.remainder == ""
    assert cli.remainder_command() == "echo a b | wc"


def test_fabrics_own_host_remainder_is_left_alone(monkeypatch, program):
    adopt(monkeypatch, program, ["-H", "box", "--", "uptime"], [], remainder="uptime")
    assert program.remainder == "uptime" and cli.REMAINDER == []


@pytest.mark.parametrize(
    "words, expected",
    [
        (["fetch", "r1"], ["fetch", "--run", "r1"]),
        (["fetch", "--dest", "out", "r1"], ["fetch", "--dest", "out", "--run", "r1"]),
        (["logs", "--node", "1", "r2"], ["logs", "--node", "1", "--run", "r2"]),
        (["status", "--run", "r3"], ["status", "--run", "r3"]),
        (["status", "clusters"], ["status", "clusters"]),  # a task name stays a task
    ],
)
def test_a_bare_run_id_after_fetch_status_logs_cancel(monkeypatch, program, words, expected):
    adopt(monkeypatch, program, words, list(words))
    assert program.unparsed == expected


def collection():
    from provision.cli.main import namespace

    return namespace()


def adopt_with(monkeypatch, program, words, remainder=""):
    monkeypatch.setattr(sys, "argv", ["gpuforge", *words])
    program.unparsed[:] = [w for w in words[: words.index("--")] ] if "--" in words else list(words)
    program.remainder = remainder
    cli.adopt_argv(program, words, collection())


def test_train_chained_after_another_task_still_takes_its_overrides(monkeypatch, program):
    adopt_with(monkeypatch, program, ["setup", "--dry-run", "train", "--job", "convnet-digits", "epochs=1"])
    assert cli.OVERRIDES == ["epochs=1"]
    assert program.unparsed == ["setup", "--dry-run", "train", "--job", "convnet-digits"]


def test_exec_chained_after_another_task_takes_the_remainder(monkeypatch, program):
    adopt_with(monkeypatch, program, ["setup", "exec", "--", "hostname"], remainder="hostname")
    assert cli.REMAINDER == ["hostname"] and program.remainder == ""


def test_a_task_name_given_as_a_flag_value_is_not_a_task(monkeypatch, program):
    adopt_with(monkeypatch, program, ["train", "--job", "setup", "lr=1"])
    assert cli.OVERRIDES == ["lr=1"] and program.unparsed == ["train", "--job", "setup"]


@pytest.mark.parametrize(
    "words, message",
    [
        (["logs", "--tail", "abc"], "error: --tail expects a whole number; got 'abc'"),
        (["logs", "-t", "abc"], "error: -t expects a whole number; got 'abc'"),
        (["up", "--disk-gb=abc"], "error: --disk-gb expects a whole number; got 'abc'"),
        (["status", "train", "--nproc-per-node", "x"], "error: --nproc-per-node expects a whole number; got 'x'"),
        (["train", "--start-timeout", "soon"], "error: --start-timeout expects a number; got 'soon'"),
        (["train", "--recover", "two"], "error: --recover expects a whole number of recoveries from 0 to 100; got 'two'"),
        (["train", "-o", "two"], "error: -o expects a whole number of recoveries from 0 to 100; got 'two'"),
    ],
)
def test_number_flags_given_words_are_one_line(monkeypatch, program, words, message):
    from invoke.exceptions import Exit

    with pytest.raises(Exit) as info:
        adopt_with(monkeypatch, program, words)
    assert info.value.message == message and info.value.code == 2


@pytest.mark.parametrize("words", [["up", "--help"], ["--help", "up"], ["train", "--nodes", "1", "--help"],
                                   ["sweep", "--help"], ["bake", "-h"]])
def test_task_help_shows_every_options_text(words):
    """`gpuforge TASK --help` lists each option with its help (the number check once consumed the texts)."""
    import subprocess

    out = subprocess.run([sys.executable, "-m", "provision.cli.main", *words], capture_output=True, text=True)
    task = next(w for w in words if not w.startswith("-") and not w.isdigit())
    expected = {"up": "number of nodes", "train": "processes per node", "sweep": "--purge", "bake": "--ssh-cidr"}[task]
    assert out.returncode == 0 and expected in out.stdout, out.stdout + out.stderr
