"""TensorBoard over one run's event files, on a node: what `fab tensorboard RUN` starts there.

    python -m workloads.board --run-url s3://bucket/runs/digits-1 --port 6006

Events live in `<run>/tb/` (workloads/metrics.py, workloads/tf_trainer.py). With file:// storage TensorBoard
reads them in place, live; from s3:// or gs:// they are copied to a local folder and copied again every
SYNC_S seconds, so a running job's curves keep growing. Bound to 127.0.0.1 only: the controller reaches it
through an SSH tunnel.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

SYNC_S = 30.0  # object-store runs: how often new event data is fetched (the trainer uploads at every eval)


def refresh_events(store, target: Path) -> None:
    """Event files only grow: re-download every one (they are small) into place, atomically per file."""
    for key in store.list("tb"):
        path = target / key
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".part")
        store.download_file(key, tmp)
        tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m workloads.board", description=__doc__.split("\n\n")[0])
    p.add_argument("--run-url", required=True, help="the run's storage URL (<storage>/runs/<run id>)")
    p.add_argument("--port", type=int, default=6006)
    args = p.parse_args(argv)
    from workloads.errors import WorkloadError
    from workloads.storage import open_store

    try:
        store = open_store(args.run_url)
        if not store.list("tb"):
            print(f"error: {store.url} has no TensorBoard events (tb/); was the run started with tensorboard=false?",
                  file=sys.stderr)
            return 2
    except WorkloadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    local = store.local_path()
    if local is not None:
        logdir = local / "tb"
    else:
        logdir = Path(tempfile.mkdtemp(prefix="gpuforge-tb-")) / "tb"
        refresh_events(store, logdir.parent)

        def keep_syncing() -> None:
            while True:
                time.sleep(SYNC_S)
                try:
                    refresh_events(store, logdir.parent)
                except Exception as exc:  # noqa: BLE001 - a storage hiccup: the next round tries again
                    print(f"event sync failed: {exc}", file=sys.stderr, flush=True)

        threading.Thread(target=keep_syncing, daemon=True).start()
    from tensorboard import program

    board = program.TensorBoard()
    board.configure(argv=[None, "--logdir", str(logdir), "--host", "127.0.0.1", "--port", str(args.port),
                          "--reload_interval", "5"])
    print(f"TensorBoard {board.launch()} over {store.url}/tb", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    sys.exit(main())
