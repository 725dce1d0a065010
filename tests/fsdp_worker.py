"""The FSDP2 worker for tests/test_fsdp.py (importable by the spawned processes)."""

from __future__ import annotations

import os

import torch
from tiny_models import random_basis, random_batch, tiny_model


def reference():
    """(model, batch, basis) every rank and the single-process run start from: a LoRA model whose
    adapters are non-zero, so the adapted model has drifted from the frozen one (penalty > 0)."""
    from peft import LoraConfig, get_peft_model

    base = tiny_model("llama", seed=11)
    basis = random_basis(base, [0, 2], k=2)
    torch.manual_seed(5)
    config = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    model = get_peft_model(base, config).train()
    return model, random_batch(batch=4, seq=10, seed=12), basis


def single_process():
    """Loss + penalty on the whole batch, online anchors before the weights move; the gradients."""
    from refusalguard_kernels.integration.hooks import RefusalGuard

    model, batch, basis = reference()
    guard = RefusalGuard(model, basis, backend="torch")
    anchors = guard.anchors(model=model, **batch)  # the trainer's online pass: adapters off
    guard.arm(anchors, guard.weights(**batch))
    out = model(**batch)
    (out.loss + guard.penalty()).backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    return {"grads": grads, "penalty": guard.penalty().detach()}


def fsdp_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """One FSDP2 rank: fully_shard per decoder layer and at the root, half the batch, online anchors
    through the sharded model, loss + penalty, backward; saves the full gradients and the penalty."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from refusalguard_kernels.integration.hooks import RefusalGuard

    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        model, batch, basis = reference()
        guard = RefusalGuard(model, basis, backend="torch")  # hooks on the layers, before sharding
        for layer in model.get_base_model().model.layers:
            fully_shard(layer)
        fully_shard(model)
        half = batch["input_ids"].shape[0] // world_size
        local = {key: value[rank * half : (rank + 1) * half] for key, value in batch.items()}
        anchors = guard.anchors(model=model, **local)
        guard.arm(anchors, guard.weights(**local))
        out = model(**local)
        (out.loss + guard.penalty()).backward()
        penalty = guard.penalty().detach().clone()
        dist.all_reduce(penalty)
        grads = {name: p.grad.full_tensor().detach().clone() for name, p in model.named_parameters() if p.requires_grad}
        if rank == 0:
            torch.save({"grads": grads, "penalty": penalty / world_size}, os.path.join(out_dir, "fsdp.pt"))
        guard.remove()
    finally:
        dist.destroy_process_group()
