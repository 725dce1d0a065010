"""The guard under FSDP2 (torch.distributed.fsdp.fully_shard), 2 CPU processes with gloo: applied by hand
with the guard driven directly (the single-process penalty and gradients), and through RefusalGuardTrainer
with accelerate's FSDP2 (the single-process logged penalties and adapter weights); online anchors through
the sharded model in both."""

from __future__ import annotations

import pytest
import torch
from gloo_ranks import run_ranks

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


def test_fsdp2_two_processes_match_one(tmp_path):
    from fsdp_worker import fsdp_worker, single_process

    run_ranks(fsdp_worker, 2, tmp_path, str(tmp_path))
    sharded = torch.load(tmp_path / "fsdp.pt")
    single = single_process()
    # Non-zero LoRA adapters: the anchors (adapters off, through the sharded model) differ from the
    # trained coordinates, so a no-op guard, or anchors taken with the adapters on, gives a zero penalty.
    assert single["penalty"] > 1e-6
    torch.testing.assert_close(sharded["penalty"], single["penalty"], rtol=1e-5, atol=1e-7)
    for name, grad in single["grads"].items():
        torch.testing.assert_close(sharded["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_fsdp2_through_the_trainer_matches_one_process(tmp_path):
    """RefusalGuardTrainer (online anchors, guard on 2 layers) under accelerate's FSDP2 in 2 gloo
    processes: the same logged penalties per step and the same adapter weights after 3 steps as one
    process without sharding.

    fp32 throughout, the same global batch of 8 rows of one length: the runs differ only in how the sums
    are split and reduced (2 x 4 rows then an all-reduce vs 8 rows), so values agree to float32 rounding
    (measured <= 3e-8 on the weights) and rtol 1e-5 leaves room for that and nothing else.  Plain SGD,
    not the Trainer's default AdamW: AdamW divides each element's step by its own gradient history, so
    an element whose gradients nearly cancel turns that rounding into weight differences above rtol
    (measured: 1.1e-6 on a weight of ~0.01 after 3 steps, with transformers 5.24), which would test
    AdamW's conditioning, not the guard.  With SGD a sharded run whose penalty carries no gradient moves
    the weights by up to 1.1e-3 and the step-2 penalty by 4e-3 relative (checked by mutation).  It fails if the anchor pass took
    the adapted weights (every penalty would be exactly 0, asserted > 0 below: the LoRA init is non-zero so
    the adapted and frozen models differ from step 0), if it ran through anything but the FSDP module the
    Trainer trains (asserted; the bare inner model's forward does not gather the root's sharded embedding
    and head), or if the guard's effect differed between the sharded and the single-process step (the
    penalty is in the loss, so step 2's and 3's penalties and the final weights would drift apart).
    accelerate only enables FSDP from a GPU-like device type, so the worker sets that one classification
    (see ``fsdp_worker.cpu_fsdp_trainer_class``); everything after it is accelerate's and the Trainer's own.
    """
    from fsdp_worker import TRAINER_STEPS, fsdp_trainer_worker, trainer_single_process

    run_ranks(fsdp_trainer_worker, 2, tmp_path, str(tmp_path))
    sharded = torch.load(tmp_path / "fsdp_trainer.pt", weights_only=False)
    single = trainer_single_process(str(tmp_path / "single"))

    assert sharded["sharded_params"], "the adapter weights were not DTensors: FSDP2 did not shard the model"
    assert sharded["anchor_models"] == TRAINER_STEPS
    assert sharded["anchors_through_wrapped"], "an anchor pass did not run through the Trainer's FSDP module"
    assert len(single["logs"]) == len(sharded["logs"]) == TRAINER_STEPS
    for step, (mine, ref) in enumerate(zip(sharded["logs"], single["logs"])):
        assert ref["guard_penalty"] > 1e-4, f"step {step}: the penalty is zero, the anchors are the adapted weights"
        for key, value in ref.items():
            assert mine[key] == pytest.approx(value, rel=1e-5), f"step {step}: {key}"
    assert single["params"].keys() == sharded["params"].keys()
    for name, value in single["params"].items():
        torch.testing.assert_close(sharded["params"][name], value, rtol=1e-5, atol=1e-7, msg=name)
