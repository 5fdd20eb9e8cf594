"""torchrun for our runs, without its exit-barrier race: `python -m workloads.agent [torchrun args]`.

With static rendezvous the TCPStore lives in node 0's agent, and that agent leaves as soon as the exit
barrier is complete, which can close the store while another node's agent is still reading the barrier's
last key. That agent then logs "Error waiting on exit barrier" with a traceback although every rank
succeeded (torch 2.13; seen under load in CI). Here each agent keeps its store after torchrun's own
`main` returns: the other nodes' agents add one to a key, and node 0's agent, after a success, keeps
the store up until all of them have (at most LINGER_S). Arguments and exit status are torchrun's.
"""

from __future__ import annotations

import sys
import time
from typing import Any

LINGER_S = 30.0  # node 0 waits this long at most for the other agents to leave the barrier
DONE_KEY = "gpuforge/agents-done"


def keep_rendezvous() -> list[Any]:
    """Remember the static rendezvous handler torchrun creates, so its store outlives the agent."""
    from torch.distributed.elastic.rendezvous import static_tcp_rendezvous as static

    kept: list[Any] = []
    original = static.StaticTCPRendezvous.next_rendezvous

    def next_rendezvous(self):
        info = original(self)
        kept.append(self)
        return info

    static.StaticTCPRendezvous.next_rendezvous = next_rendezvous
    return kept


def leave(kept: list[Any], succeeded: bool) -> None:
    """Node 0 waits for the others (after a success); the others say they are done."""
    handler = kept[-1] if kept else None
    store = getattr(handler, "_store", None)
    if store is None or handler.world_size < 2:
        return  # one node, or another rendezvous: nothing to hold open
    key = f"{handler.run_id}/{DONE_KEY}"
    try:
        if handler.rank != 0:
            store.add(key, 1)
            return
        deadline = time.monotonic() + LINGER_S
        while succeeded and store.add(key, 0) < handler.world_size - 1 and time.monotonic() < deadline:
            time.sleep(0.05)
    except Exception:  # noqa: BLE001 - the run's outcome is decided; leaving must never change it
        pass


def main(argv: list[str] | None = None) -> None:
    kept = keep_rendezvous()
    from torch.distributed.run import main as torchrun_main

    succeeded = False
    try:
        torchrun_main(argv)
        succeeded = True
    finally:
        leave(kept, succeeded)


if __name__ == "__main__":
    main(sys.argv[1:])
