"""A torchrun entry (`torch.distributed.run` or `workloads.agent`) whose exit barrier reads its last key
1.5 s late: `python tests/fakes/slow_barrier.py MODULE [torchrun args]`.

This is the ordering that, under load in CI, let node 0's agent close the rendezvous store before
node 1's agent had read the barrier's last key (torch 2.13's `store_util.barrier`: arrive, then wait on
the last member's key). The wait is the real one, against the real TCPStore; only its start is late.
"""

import runpy
import sys
import time

from torch.distributed.elastic.utils import store as store_util

DELAY_S = 1.5


def late_barrier(store, world_size, key_prefix, barrier_timeout=300, **_):
    with store_util.store_timeout(store, barrier_timeout):
        last = store_util._barrier_nonblocking(store=store, world_size=world_size, key_prefix=key_prefix)
        time.sleep(DELAY_S)
        store.wait([last])


store_util.barrier = late_barrier
module = sys.argv.pop(1)
sys.argv[0] = module
runpy.run_module(module, run_name="__main__", alter_sys=True)
