"""The node's first command (facts, markers, every step's probe) and how the runner uses its probe results:
for `check`, until the run writes to the node, and never after."""

from __future__ import annotations

from invoke import Result

from infra.cluster import ClusterInfo, NodeInfo
from provision.first_look import LOOK, ProbeResult, parse_first_look
from provision.runner import CHANGED, UNCHANGED, NodeReport, Runner
from provision.steps.base import Cmd, Step, StepContext

FACTS = "##gpuforge:os\nID=ubuntu\nVERSION_ID=\"22.04\"\n##gpuforge:end\n"


def look(*sections: tuple[str, str]) -> str:
    return FACTS + "".join(f"\n{LOOK}{key}\n{body}" for key, body in sections) + "\n"


def test_probe_output_is_kept_exactly_with_its_exit_status():
    out = look(("markers", '{"step": "base", "fingerprint": "aa", "time": 1}\nnot json\n{"step": "x"}\n'),
               ("probe base", ""), ("rc 0", ""),
               ("probe workload", "c41f14db"), ("rc 0", ""),  # printed without a newline
               ("probe python_env", "two\nlines\n"), ("rc 1", ""))
    first = parse_first_look(out)
    assert first.facts_output.startswith(FACTS.rstrip("\n"))
    assert first.markers == {"base": "aa"}
    assert first.probes == {"base": ProbeResult("", 0), "workload": ProbeResult("c41f14db", 0),
                            "python_env": ProbeResult("two\nlines\n", 1)}
    assert not first.probes["python_env"].ok


def test_a_probe_cut_short_has_no_result():
    first = parse_first_look(look(("markers", ""), ("probe base", "partial")))
    assert first.probes == {}


class Recorder:
    """A connection that answers every command with `answers[command]` (default: success) and records it."""

    user = "root"

    def __init__(self, answers: dict[str, Result]):
        self.answers, self.calls = answers, []

    def run(self, command: str, **kwargs) -> Result:
        self.calls.append(command)
        return self.answers.get(command, Result("", exited=0))


class Probed(Step):
    def __init__(self, name: str):
        self.name, self.description = name, name

    def plan(self, ctx: StepContext) -> list[Cmd]:
        return [Cmd(f"apply {self.name}")]

    def probe(self, ctx: StepContext) -> str:
        return f"probe {self.name}"


def context() -> StepContext:
    node = NodeInfo(name="n0", rank=0, public_address="192.0.2.1", private_address="10.0.0.1")
    return StepContext(ClusterInfo(name="c", cloud="aws", nodes=(node,)), node)


def test_probe_results_stand_for_checks_until_the_run_writes_to_the_node(tmp_path):
    ctx, steps = context(), [Probed("a"), Probed("b"), Probed("c")]
    markers = {s.name: s.fingerprint(ctx) for s in steps}
    probed = {"a": ProbeResult("", 1), "b": ProbeResult("", 0), "c": ProbeResult("", 0)}  # a: its work is gone
    conn = Recorder({"probe b": Result("", exited=1)})  # b, asked again after a was applied: gone as well now
    runner, report = Runner(ctx.cluster, steps=steps, log_dir=tmp_path), NodeReport("n0", "192.0.2.1")
    statuses = [runner.run_step(conn, ctx, s, markers, False, report, probed).status for s in steps]
    assert statuses == [CHANGED, CHANGED, UNCHANGED]
    assert "probe a" not in conn.calls  # from the first look: no second round trip
    assert conn.calls.index("probe b") > conn.calls.index("apply a")  # after a write, the node is asked again
    assert "probe c" in conn.calls


def test_an_unchanged_run_asks_the_node_nothing_more(tmp_path):
    ctx, steps = context(), [Probed("a"), Probed("b")]
    markers = {s.name: s.fingerprint(ctx) for s in steps}
    conn = Recorder({})
    runner, report = Runner(ctx.cluster, steps=steps, log_dir=tmp_path), NodeReport("n0", "192.0.2.1")
    probed = {s.name: ProbeResult("", 0) for s in steps}
    assert [runner.run_step(conn, ctx, s, markers, False, report, probed).status for s in steps] == [UNCHANGED] * 2
    assert conn.calls == []
