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


def fsdp_worker(rank: int, world_size: int, out_dir: str) -> None:
    """One FSDP2 rank (run through ``gloo_ranks.run_ranks``): fully_shard per decoder layer and at the
    root, half the batch, online anchors through the sharded model, loss + penalty, backward; saves the
    full gradients and the penalty."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from refusalguard_kernels.integration.hooks import RefusalGuard

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


# ---------------------------------------------------------------------- through the Trainer

TRAINER_LAYERS = [0, 1]
TRAINER_STEPS = 3
GLOBAL_BATCH = 8


def trainer_setup():
    """(model, guard, dataset, tokenizer) every run starts from: a tiny LoRA llama whose adapters are
    non-zero (so the penalty is > 0 from step 0: the frozen anchors differ from the adapted coordinates),
    a guard on layers 0 and 1, and rows of one length (every rank's loss and penalty carry equal weight)."""
    import datasets
    from peft import LoraConfig, get_peft_model
    from tiny_models import tiny_model, tiny_tokenizer

    from refusalguard_kernels import orthonormalize_basis
    from refusalguard_kernels.integration.basis import RefusalBasis
    from refusalguard_kernels.integration.hooks import RefusalGuard

    tokenizer = tiny_tokenizer()
    base = tiny_model("llama", tokenizer, seed=0)
    torch.manual_seed(3)
    config = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    model = get_peft_model(base, config)
    gen = torch.Generator().manual_seed(21)
    basis = RefusalBasis(
        {layer: orthonormalize_basis(torch.randn(32, 2, generator=gen)) for layer in TRAINER_LAYERS},
        {"method": "svd", "positions": "last", "model_name": "tiny"},
    )
    guard = RefusalGuard(model, basis, backend="torch")
    ids = torch.randint(7, len(tokenizer), (2 * GLOBAL_BATCH, 10), generator=gen).tolist()
    rows = [{"input_ids": row, "attention_mask": [1] * 10, "labels": row} for row in ids]
    return model, guard, datasets.Dataset.from_list(rows), tokenizer


def trainer_args(out_dir: str, world_size: int, **overrides):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=out_dir,
        max_steps=TRAINER_STEPS,
        per_device_train_batch_size=GLOBAL_BATCH // world_size,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        learning_rate=5e-2,
        optim="sgd",  # not AdamW: see test_fsdp2_through_the_trainer_matches_one_process
        lr_scheduler_type="constant",
        disable_tqdm=True,
        seed=0,
        dataloader_pin_memory=False,
        **overrides,
    )


def cpu_fsdp_trainer_class():
    """RefusalGuardTrainer with accelerate's FSDP switched on for a CPU (gloo) run.

    accelerate 1.15 turns a run into ``DistributedType.FSDP`` only from an accelerator device type
    (``accelerate/state.py``: the ``elif self.distributed_type in [DistributedType.MULTI_GPU, ...,
    MULTI_NEURON]`` branch, lines 986-1016, which has no ``MULTI_CPU``): with ``use_cpu=True`` the
    ``fsdp_plugin`` is silently dropped and the Trainer wraps the model in DDP instead.  Everything after
    that classification (``Accelerator.prepare`` -> ``fsdp2_prepare_model`` -> ``fully_shard``, the
    optimizer, the Trainer's loop, gradient clipping) runs on CPU, so only the classification is set here,
    exactly as accelerate sets it on GPUs: the distributed type and the plugin built from the Trainer's own
    ``fsdp_plugin_args``, and the Trainer's ``is_fsdp_enabled`` flag it derives from them.
    """
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    from refusalguard_kernels.training.trainer import RefusalGuardTrainer

    class CpuFsdpTrainer(RefusalGuardTrainer):
        def create_accelerator_and_postprocess(self):
            super().create_accelerator_and_postprocess()
            state = self.accelerator.state
            assert state.distributed_type == DistributedType.MULTI_CPU, state.distributed_type
            state.distributed_type = DistributedType.FSDP
            state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
            self.is_fsdp_enabled = True

    return CpuFsdpTrainer


def _spy_on_anchor_model(guard) -> list:
    """Record the model each online anchor pass runs through (the mixin passes ``model=``)."""
    seen = []
    anchors = guard.anchors

    def recording(*, model=None, **batch):
        seen.append(model)
        return anchors(model=model, **batch)

    guard.anchors = recording
    return seen


def _result(trainer, params: dict) -> dict:
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    keys = ("loss", "task_loss", "guard_penalty", *(f"guard_drift/layer_{layer}" for layer in TRAINER_LAYERS))
    return {"logs": [{key: entry[key] for key in keys} for entry in logs], "params": params}


def trainer_single_process(out_dir: str) -> dict:
    """The reference: RefusalGuardTrainer, online anchors, one process, no sharding, the global batch."""
    from refusalguard_kernels.training.trainer import RefusalGuardTrainer

    model, guard, dataset, tokenizer = trainer_setup()
    trainer = RefusalGuardTrainer(
        model=model,
        args=trainer_args(out_dir, 1),
        train_dataset=dataset,
        processing_class=tokenizer,
        guard=guard,
        anchors="online",
    )
    trainer.train()
    params = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    guard.remove()
    return _result(trainer, params)


def fsdp_trainer_worker(rank: int, world_size: int, out_dir: str) -> None:
    """One rank of RefusalGuardTrainer under FSDP2 (``fsdp_config={"version": 2}``, accelerate's
    ``fully_shard`` per LlamaDecoderLayer and at the root), online anchors, half the global batch; rank 0
    saves the logs, the full adapter weights and what the anchor passes ran through."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    model, guard, dataset, tokenizer = trainer_setup()
    seen = _spy_on_anchor_model(guard)
    args = trainer_args(
        os.path.join(out_dir, f"rank{rank}"),
        world_size,
        ddp_backend="gloo",
        fsdp=True,
        fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]},
    )
    trainer = cpu_fsdp_trainer_class()(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer, guard=guard, anchors="online"
    )
    trainer.train()
    trained = {name: p for name, p in trainer.model.named_parameters() if p.requires_grad}
    # Gathered on every rank (a collective), saved by rank 0.
    params = {name: p.full_tensor().detach().clone() for name, p in trained.items() if isinstance(p, DTensor)}
    result = _result(trainer, params)
    result["sharded_params"] = len(params) == len(trained) > 0
    result["anchor_models"] = len(seen)
    result["anchors_through_wrapped"] = all(m is trainer.model_wrapped and isinstance(m, FSDPModule) for m in seen)
    guard.remove()
    if rank == 0:
        torch.save(result, os.path.join(out_dir, "fsdp_trainer.pt"))
