"""Run a function on N CPU processes with gloo, and end them so that no rank can crash at exit.

Every multi-process test (DDP, FSDP2 by hand, FSDP2 through the Trainer) goes through ``run_ranks``.

The root cause of the flaky SIGABRT (issue 16: 4 of 7 loaded pytest runs; "terminate called without
an active exception" on rank 1, after the worker had returned):

1. ``destroy_process_group()`` does not free a gloo backend that something else still references,
   and torch (2.13) keeps such references: importing ``torch._dynamo`` after ``init_process_group``
   (DDP's constructor, FSDP2 and the Trainer all do) leaks one, and DTensor's sharding-propagation
   cache keeps FSDP2's DeviceMesh, which holds the group.  Checked directly from /proc/self/task:
   the ``pt_gloo_runloop`` / ``gloo_tcp_loop`` threads are alive after ``destroy_process_group()``
   in all three tests, and gone after it in a plain all-reduce run.
2. A ``mp.spawn`` child ends with ``sys.exit``: full interpreter finalization, with those threads
   still running and possibly still releasing the last collective's work.  A gloo thread that drops
   a tensor whose Python object it owns takes the GIL; during finalization CPython 3.11 answers with
   ``pthread_exit``, whose forced unwind through a ``noexcept`` C++ frame is ``std::terminate``.
   It needs the main thread to reach finalization before the gloo thread is done, hence only under
   CPU load, and on the rank that finishes first (rank 1 saves nothing).

So each rank here ends with a barrier (no rank leaves while another is in a collective),
``destroy_process_group()``, flushed output, and ``os._exit(0)``: the process ends without
finalizing the interpreter, so no thread can be unwound at exit, whatever torch still references.
Results reach the parent through files written (and closed) before that.  A rank that raises takes
the normal path: ``mp.spawn`` records its traceback first, and the test fails with it.

The process group comes from a ``FileStore`` in the test's own directory instead of a TCP port picked
in advance (bind to port 0, close, hand the number to the children): no other process can take the
port in between, and no store client can connect to itself on a port in the ephemeral range.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.multiprocessing as mp


def _rank_main(rank: int, world_size: int, store: str, worker: Callable, args: tuple) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    # What torchrun sets; accelerate (inside the Trainer) reads these to see a distributed run. The
    # process group itself is already initialised from the FileStore below, and accelerate uses it.
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT="0",
    )
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    worker(rank, world_size, *args)
    dist.barrier()  # no rank tears down while another still runs a collective
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # no interpreter finalization with gloo threads alive (see the module docstring)


def run_ranks(worker: Callable, world_size: int, workdir: str | os.PathLike, *args) -> None:
    """Run ``worker(rank, world_size, *args)`` in ``world_size`` spawned processes with a gloo process
    group; raises if any rank fails, with that rank's traceback."""
    if not torch.distributed.is_available():
        import pytest

        pytest.skip("torch.distributed is not available in this torch build")
    store = Path(workdir) / "gloo.filestore"
    if store.exists():
        raise FileExistsError(f"{store} exists: every run needs a fresh FileStore")
    mp.spawn(_rank_main, args=(world_size, str(store), worker, args), nprocs=world_size, join=True)
