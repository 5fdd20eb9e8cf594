"""The one way to run something as root (issue 8): the whole line, env inside, sudo only when the login is not root."""

from __future__ import annotations

import shlex
import subprocess

from invoke import MockContext, Result

from provision.steps.base import Cmd, command_line, root_command


def test_the_whole_line_goes_under_sudo_with_its_environment_inside():
    line = root_command("apt-get update && apt-get install -y x > /tmp/log", {"DEBIAN_FRONTEND": "noninteractive"})
    words = shlex.split(line)
    assert words[:4] == ["sudo", "-n", "sh", "-c"] and len(words) == 5
    assert words[4] == "export DEBIAN_FRONTEND=noninteractive; apt-get update && apt-get install -y x > /tmp/log"


def test_a_root_login_runs_it_plainly():
    assert root_command("reboot", login_root=True) == "sh -c reboot"
    root, user = MockContext(), MockContext()
    root._set("user", "root")
    user._set("user", "ubuntu")
    assert command_line(root, Cmd("reboot", sudo=True)) == "sh -c reboot"
    assert command_line(user, Cmd("reboot", sudo=True)) == "sudo -n sh -c reboot"


def test_the_script_survives_quotes_and_spaces(tmp_path):
    script = f"echo \"it's  'here'\" > '{tmp_path}/a b' && printf '%s|' \"$GF_V\" >> '{tmp_path}/a b'"
    line = root_command(script, (("GF_V", "x 'y' \"z\""),), login_root=True)
    assert subprocess.run(line, shell=True).returncode == 0
    assert (tmp_path / "a b").read_text() == "it's  'here'\nx 'y' \"z\"|"


def test_the_reboot_hook_sends_the_root_line(tmp_path):
    """Regression (issue 8): the hook sent `sudo reboot` even where the login is root without sudo."""
    from infra.cluster import ClusterInfo, NodeInfo
    from provision.runner import Runner
    from provision.steps.base import StepContext

    node = NodeInfo(name="n", rank=0, public_address="127.0.0.2", private_address="127.0.0.2", user="root")
    cluster = ClusterInfo(name="c", cloud="hosts", nodes=(node,))
    conn = MockContext(run={"sh -c reboot": Result(exited=0)})
    conn._set("user", "root")
    try:
        Runner(cluster, steps=[], log_dir=tmp_path).reboot_hook(conn, StepContext(cluster, node), Cmd("reboot", sudo=True, reboot=True))
    except Exception:  # noqa: BLE001 - the mock cannot go down and come back; what was sent is the point
        pass
    assert conn.run.call_args_list[0].args[0] == "sh -c reboot"
