"""The guard under FSDP2 (torch.distributed.fsdp.fully_shard): 2 CPU processes with gloo, online
anchors through the sharded model, give the single-process penalty and gradients."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_fsdp2_two_processes_match_one(tmp_path):
    from fsdp_worker import fsdp_worker, single_process

    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available in this torch build")
    mp.spawn(fsdp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    sharded = torch.load(tmp_path / "fsdp.pt")
    single = single_process()
    # Non-zero LoRA adapters: the anchors (adapters off, through the sharded model) differ from the
    # trained coordinates, so a no-op guard, or anchors taken with the adapters on, gives a zero penalty.
    assert single["penalty"] > 1e-6
    torch.testing.assert_close(sharded["penalty"], single["penalty"], rtol=1e-5, atol=1e-7)
    for name, grad in single["grads"].items():
        torch.testing.assert_close(sharded["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)
