"""`make demo`: the main job end to end on the embedded local cluster.

    up a 2-node local cluster -> fab setup -> fab train --job convnet-digits --nodes 2 --follow
    -> fetch the result -> print the test accuracy and where the model is -> fab down

Teardown runs whatever happens, Ctrl-C and SIGTERM included, so no sshd, job or port is left.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

from rich.console import Console

from infra.local import create_local_cluster, destroy_local_cluster, state_dir_for
from provision import inventory
from provision.cli import report
from provision.setup import raise_for_failures, setup_cluster
from workloads.launch import RunSpec, fetch_run, follow_run, start_run

CLUSTER = "demo"
JOB = "convnet-digits"


def interrupt(signum, frame):  # noqa: ARG001 - SIGTERM gets the same clean teardown as Ctrl-C
    raise KeyboardInterrupt


def main() -> int:
    console = Console(highlight=False)
    home = inventory.home_dir()
    signal.signal(signal.SIGTERM, interrupt)
    state = state_dir_for(home, CLUSTER)
    if state.exists():
        console.print(f"removing the demo cluster an earlier run left: {destroy_local_cluster(state)}")
    started = time.monotonic()
    try:
        console.rule("gpuforge up --name demo --nodes 2")
        cluster = create_local_cluster(CLUSTER, 2, home)
        report.print_cluster(cluster)
        console.rule("gpuforge setup")
        with report.SetupProgress(cluster) as progress:
            reports = setup_cluster(cluster, home, on_event=progress.event)
        report.print_setup(cluster, reports, False, time.monotonic() - started)
        raise_for_failures(reports)
        console.rule(f"gpuforge train --job {JOB} --nodes 2 --follow")
        spec = RunSpec(job=JOB, nodes=2, storage_url=cluster.storage_url)
        start_run(cluster, spec, home)
        status = follow_run(cluster, home, spec.run_id, out=lambda text: print(text, flush=True))
        report.print_run_end(cluster, status)
        if status.state != "succeeded":
            return 1
        console.rule("gpuforge fetch")
        files = fetch_run(cluster, home, spec.run_id, Path("runs"))
        summary = json.loads(next(f for f in files if f.name == "summary.json").read_text())
        model = next(f for f in files if f.name == "model.pth")
        console.print(f"test accuracy: {summary['test_accuracy']:.3f}")
        console.print(f"model: {model.resolve()} (exported: {model.with_name('model.pt2').resolve()})")
        console.print(f"trained on {summary['world_size']} nodes in {summary['wall_time_s']:.0f} s; "
                      f"demo total {time.monotonic() - started:.0f} s")
        return 0
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: tearing the demo cluster down[/]")
        return 130
    except Exception as exc:  # noqa: BLE001 - one line, then the teardown below
        console.print(f"[bold red]demo failed:[/] {exc}")
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the teardown short
        console.rule("gpuforge down")
        console.print(destroy_local_cluster(state))
        console.print("(the demo is self-contained: its results are in ./runs, and its storage folder goes with it; "
                      "`gpuforge down` of your own clusters keeps theirs)")


if __name__ == "__main__":
    sys.exit(main())
