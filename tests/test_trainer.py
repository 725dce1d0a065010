"""RefusalGuardTrainer on tiny CPU models: the penalty in the loss, its logging and warm-up,
gradient accumulation and checkpointing, cached anchors, saving the basis."""

from __future__ import annotations

import inspect
import math

import datasets
import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny_models import tiny_model, tiny_tokenizer
from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

from refusalguard_kernels import orthonormalize_basis
from refusalguard_kernels.integration.anchors import (
    ANCHOR_COLUMN,
    AnchorCollator,
    CachedAnchorsError,
    add_cached_anchors,
)
from refusalguard_kernels.integration.basis import BASIS_FILENAME, RefusalBasis
from refusalguard_kernels.integration.hooks import RefusalGuard
from refusalguard_kernels.training.data_utils import tokenize_dataset
from refusalguard_kernels.training.trainer import RefusalGuardTrainer, warmup_scale

LAYERS = [0, 1]
PAIRS = [
    ("how do i bake bread ?", "mix flour and water then bake it"),
    ("tell me a story about a dog", "a brave little dog sat on the mat"),
    ("what is the capital of france ?", "the capital of france is paris"),
    ("write a poem about the sea", "the sea and the sky"),
    ("give me tips for the guitar", "play a little every day"),
    ("explain how plants make food", "plants turn sunlight into food"),
    ("why is sleep good ?", "a good night of sleep helps you think clearly"),
    ("when does water boil ?", "water boils at one hundred degrees at sea level"),
]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def pairs(tokenizer):
    raw = datasets.Dataset.from_list([{"prompt": p, "response": r} for p, r in PAIRS])
    return tokenize_dataset(raw, tokenizer, max_length=48, show_progress=False)


@pytest.fixture(scope="module")
def equal_length_texts():
    """Rows of one length: every micro-batch carries the same weight (for the accumulation test)."""
    gen = torch.Generator().manual_seed(11)
    ids = torch.randint(7, 200, (8, 10), generator=gen).tolist()
    return datasets.Dataset.from_list([{"input_ids": row, "attention_mask": [1] * 10, "labels": row} for row in ids])


def random_basis(seed: int = 0, k: int = 2) -> RefusalBasis:
    gen = torch.Generator().manual_seed(seed)
    return RefusalBasis(
        {layer: orthonormalize_basis(torch.randn(32, k, generator=gen)) for layer in LAYERS},
        {"method": "svd", "positions": "last", "model_name": "tiny"},
    )


def lora_model(tokenizer, *, kind: str = "llama", init_lora_weights=True, seed: int = 0):
    model = tiny_model(kind, tokenizer, seed=0)
    torch.manual_seed(seed)
    return get_peft_model(
        model,
        LoraConfig(
            r=4,
            lora_alpha=8,
            lora_dropout=0.0,
            target_modules=["q_proj", "v_proj"],
            init_lora_weights=init_lora_weights,
        ),
    )


def make_args(path, **overrides) -> TrainingArguments:
    fields = inspect.signature(TrainingArguments.__init__).parameters
    options = dict(
        output_dir=str(path),
        max_steps=3,
        per_device_train_batch_size=4,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        learning_rate=5e-2,
        lr_scheduler_type="constant",
        disable_tqdm=True,
        seed=0,
        dataloader_pin_memory=False,
    )
    if "train_sampling_strategy" in fields:
        options["train_sampling_strategy"] = "sequential"  # batches in dataset order: comparable runs
    options.update(overrides)
    return TrainingArguments(**options)


def train_logs(trainer) -> list[dict]:
    trainer.train()
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def lora_params(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------------- warm-up


def test_warmup_scale_linear_and_cosine():
    linear = [warmup_scale(s, warmup_steps=4, multiplier=10.0, schedule="linear") for s in range(6)]
    assert linear == [10.0, 7.75, 5.5, 3.25, 1.0, 1.0]
    cosine = [warmup_scale(s, warmup_steps=4, multiplier=10.0, schedule="cosine") for s in range(5)]
    assert cosine[0] == 10.0 and cosine[4] == 1.0
    assert cosine[1] == pytest.approx(1 + 9 * (1 + math.cos(math.pi / 4)) / 2)
    assert cosine[2] == pytest.approx(5.5)
    assert warmup_scale(0, warmup_steps=0, multiplier=10.0) == 1.0
    assert warmup_scale(3, warmup_steps=10, multiplier=1.0) == 1.0
    with pytest.raises(ValueError, match="linear"):
        warmup_scale(0, warmup_steps=2, multiplier=2.0, schedule="exp")


# ---------------------------------------------------------------------- training


def test_penalty_starts_at_zero_is_logged_and_follows_the_warmup(tokenizer, pairs, tmp_path):
    model = lora_model(tokenizer)
    guard = RefusalGuard(model, random_basis(), positions="response", backend="torch")
    trainer = RefusalGuardTrainer(
        model=model,
        args=make_args(tmp_path / "guard"),
        train_dataset=pairs,
        processing_class=tokenizer,
        guard=guard,
        warmup_steps=2,
        warmup_multiplier=10.0,
    )
    logs = train_logs(trainer)
    assert [entry["step"] for entry in logs] == [1, 2, 3]
    assert [entry["guard_scale"] for entry in logs] == [10.0, 5.5, 1.0]
    first = logs[0]
    assert first["guard_penalty"] == 0.0
    assert all(first[f"guard_drift/layer_{layer}"] == 0.0 for layer in LAYERS)
    assert logs[1]["guard_penalty"] > 0 and logs[2]["guard_penalty"] > 0
    for entry in logs:
        assert entry["loss"] == pytest.approx(
            entry["task_loss"] + entry["guard_scale"] * entry["guard_penalty"], rel=1e-6
        )
        assert sum(entry[f"guard_drift/layer_{layer}"] for layer in LAYERS) == pytest.approx(
            entry["guard_penalty"], rel=1e-6
        )
    assert not guard.armed  # disarmed after each step

    # The same run without the guard: at step 0 the penalty and its gradient are zero, so the
    # first update is the task's alone and the next task loss is the plain run's.
    plain_model = lora_model(tokenizer)
    plain = Trainer(
        model=plain_model,
        args=make_args(tmp_path / "plain"),
        train_dataset=pairs,
        processing_class=tokenizer,
        data_collator=DataCollatorForSeq2Seq(tokenizer),
    )
    plain_logs = train_logs(plain)
    assert logs[0]["task_loss"] == pytest.approx(plain_logs[0]["loss"], rel=1e-6)
    assert logs[1]["task_loss"] == pytest.approx(plain_logs[1]["loss"], rel=1e-6)
    guard.remove()


def test_gradient_accumulation_matches_one_large_batch(tokenizer, equal_length_texts, tmp_path):
    def one_step(batch_size, accumulation, drift_coef, name):
        model = lora_model(tokenizer, init_lora_weights=False)  # adapters on at step 0: a non-zero penalty
        before = lora_params(model)
        guard = RefusalGuard(model, random_basis(), backend="torch", drift_coef=drift_coef)
        args = make_args(
            tmp_path / name,
            max_steps=1,
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            optim="sgd",
            learning_rate=0.1,
            max_grad_norm=0.0,
        )
        trainer = RefusalGuardTrainer(
            model=model, args=args, train_dataset=equal_length_texts, processing_class=tokenizer, guard=guard
        )
        logs = train_logs(trainer)
        guard.remove()
        after = lora_params(model)
        return torch.cat([(after[n] - before[n]).flatten() for n in sorted(before)]), logs[0]

    big, big_log = one_step(4, 1, 10.0, "big")
    accumulated, acc_log = one_step(2, 2, 10.0, "acc")
    no_penalty, _ = one_step(4, 1, 0.0, "none")
    assert big_log["guard_penalty"] > 0
    assert acc_log["guard_penalty"] == pytest.approx(big_log["guard_penalty"], rel=1e-5)
    assert acc_log["loss"] == pytest.approx(big_log["loss"], rel=1e-5)
    # The two runs differ only in float32 summation order. Measured on the update vector: norm-wise 5.8e-7,
    # element-wise max|diff| / max|update| 1.2e-6. An element-wise rtol (the old check: rtol 1e-4, atol 1e-9)
    # is ill-posed here: an update element of ~1e-5 carries the rounding of sums of ~1e-2 terms (~1e-8), so
    # it failed or passed with the CPU's vector width. Both bounds below are this project's standard ones.
    assert (accumulated - big).norm() <= 1e-5 * big.norm()
    assert (accumulated - big).abs().max() <= 1e-5 * big.abs().max()
    # The penalty moves the update far more than accumulation's rounding does.
    assert (big - no_penalty).norm() > 1e3 * (big - accumulated).norm()


def test_gradient_checkpointing_gives_the_same_run(tokenizer, pairs, tmp_path):
    fields = inspect.signature(TrainingArguments.__init__).parameters
    name = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"

    def run(checkpointing: bool, tag: str):
        model = lora_model(tokenizer, init_lora_weights=False)
        guard = RefusalGuard(model, random_basis(), positions="response", backend="torch", gram_coef=0.5)
        extra = {name: True, f"{name}_kwargs": {"use_reentrant": False}} if checkpointing else {}
        trainer = RefusalGuardTrainer(
            model=model,
            args=make_args(tmp_path / tag, **extra),
            train_dataset=pairs,
            processing_class=tokenizer,
            guard=guard,
        )
        logs = train_logs(trainer)
        guard.remove()
        return logs

    plain, checkpointed = run(False, "plain"), run(True, "ckpt")
    assert plain[0]["guard_penalty"] > 0
    for a, b in zip(plain, checkpointed):
        for key in ("loss", "task_loss", "guard_penalty"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), key


def test_reentrant_checkpointing_is_refused(tokenizer, pairs, tmp_path):
    fields = inspect.signature(TrainingArguments.__init__).parameters
    name = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    model = lora_model(tokenizer)
    with RefusalGuard(model, random_basis(), backend="torch") as guard:
        args = make_args(tmp_path, **{name: True, f"{name}_kwargs": {"use_reentrant": True}})
        with pytest.raises(ValueError, match="use_reentrant"):
            RefusalGuardTrainer(model=model, args=args, train_dataset=pairs, processing_class=tokenizer, guard=guard)


def test_cached_anchors_start_at_exactly_zero_and_match_online(tokenizer, pairs, tmp_path):
    def run(mode: str):
        model = lora_model(tokenizer)
        guard = RefusalGuard(model, random_basis(), positions="response", backend="torch")
        data = pairs
        if mode == "cached":
            # Batches of the map = the (sequential) training batches: the same computations.
            data = add_cached_anchors(pairs, model, guard, batch_size=4, show_progress=False)
        trainer = RefusalGuardTrainer(
            model=model,
            args=make_args(tmp_path / mode),
            train_dataset=data,
            processing_class=tokenizer,
            guard=guard,
            anchors=mode,
        )
        batch = next(iter(trainer.get_train_dataloader()))
        logs = train_logs(trainer)
        guard.remove()
        return batch, logs

    online_batch, online = run("online")
    cached_batch, cached = run("cached")
    assert "prompt_lengths" in online_batch and ANCHOR_COLUMN not in online_batch
    assert "prompt_lengths" in cached_batch and set(cached_batch[ANCHOR_COLUMN]) == set(LAYERS)
    assert cached[0]["guard_penalty"] == 0.0
    for a, b in zip(online, cached):
        assert b["guard_penalty"] == pytest.approx(a["guard_penalty"], rel=1e-5, abs=1e-12)
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)


def test_cached_anchors_of_another_basis_are_refused(tokenizer, pairs, tmp_path):
    model = lora_model(tokenizer)
    with RefusalGuard(model, random_basis(seed=0), backend="torch") as first:
        data = add_cached_anchors(pairs, model, first, show_progress=False)
    with RefusalGuard(model, random_basis(seed=1), backend="torch") as second:
        with pytest.raises(CachedAnchorsError, match="different refusal basis"):
            RefusalGuardTrainer(
                model=model,
                args=make_args(tmp_path),
                train_dataset=data,
                processing_class=tokenizer,
                guard=second,
                anchors="cached",
            )
        with pytest.raises(CachedAnchorsError, match="add_cached_anchors"):
            RefusalGuardTrainer(
                model=model,
                args=make_args(tmp_path),
                train_dataset=pairs,
                processing_class=tokenizer,
                guard=second,
                anchors="cached",
            )


def test_basis_is_saved_beside_the_adapter_and_in_checkpoints(tokenizer, pairs, tmp_path):
    model = lora_model(tokenizer)
    basis = random_basis(seed=4)
    with RefusalGuard(model, basis, backend="torch") as guard:
        args = make_args(tmp_path / "run", max_steps=2, save_strategy="steps", save_steps=2)
        trainer = RefusalGuardTrainer(
            model=model, args=args, train_dataset=pairs, processing_class=tokenizer, guard=guard
        )
        trainer.train()
        trainer.save_model(str(tmp_path / "final"))
    for folder in (tmp_path / "run" / "checkpoint-2", tmp_path / "final"):
        assert (folder / "adapter_model.safetensors").is_file()
        assert (folder / "adapter_config.json").is_file()
        saved = RefusalBasis.load(folder / BASIS_FILENAME)
        assert saved.layers == basis.layers
        for layer in LAYERS:
            assert torch.equal(saved.bases[layer], basis.bases[layer])


def test_evaluation_reports_the_task_loss_only(tokenizer, pairs, tmp_path):
    model = lora_model(tokenizer, init_lora_weights=False)
    with RefusalGuard(model, random_basis(), backend="torch") as guard:
        trainer = RefusalGuardTrainer(
            model=model, args=make_args(tmp_path / "g"), eval_dataset=pairs, processing_class=tokenizer, guard=guard
        )
        guarded = trainer.evaluate()["eval_loss"]
        assert not guard.armed
    plain = Trainer(
        model=model,
        args=make_args(tmp_path / "p"),
        eval_dataset=pairs,
        processing_class=tokenizer,
        data_collator=DataCollatorForSeq2Seq(tokenizer),
    ).evaluate()["eval_loss"]
    assert guarded == pytest.approx(plain, rel=1e-6)


def test_bad_arguments(tokenizer, pairs, tmp_path):
    model = lora_model(tokenizer)
    args = make_args(tmp_path)
    with RefusalGuard(model, random_basis(), backend="torch") as guard:
        common = dict(model=model, args=args, train_dataset=pairs, processing_class=tokenizer)
        with pytest.raises(ValueError, match="online"):
            RefusalGuardTrainer(**common, guard=guard, anchors="sometimes")
        with pytest.raises(ValueError, match="warmup_steps"):
            RefusalGuardTrainer(**common, guard=guard, warmup_steps=-1)
        with pytest.raises(ValueError, match="warmup_multiplier"):
            RefusalGuardTrainer(**common, guard=guard, warmup_multiplier=float("nan"))
        with pytest.raises(ValueError, match="warmup_schedule"):
            RefusalGuardTrainer(**common, guard=guard, warmup_schedule="exp")
        with pytest.raises(TypeError, match="RefusalGuard"):
            RefusalGuardTrainer(**common, guard=object())
        with pytest.raises(ValueError, match="processing_class"):
            RefusalGuardTrainer(model=model, args=args, train_dataset=pairs, guard=guard)
        # A collator of one's own is wrapped so prompt lengths and anchors are still padded.
        trainer = RefusalGuardTrainer(**common, guard=guard, data_collator=DataCollatorForSeq2Seq(tokenizer))
        assert isinstance(trainer.data_collator, AnchorCollator)
        assert isinstance(trainer.data_collator.base_collator, DataCollatorForSeq2Seq)


def test_cached_anchors_under_bf16_autocast(tokenizer, pairs, tmp_path):
    model = lora_model(tokenizer)
    guard = RefusalGuard(model, random_basis(), positions="response", backend="torch")
    args = make_args(tmp_path / "bf16", bf16=True, max_steps=2)
    full_precision = add_cached_anchors(pairs, model, guard, batch_size=4, show_progress=False)
    with pytest.raises(CachedAnchorsError, match="autocast none while training runs with autocast bfloat16"):
        RefusalGuardTrainer(
            model=model,
            args=args,
            train_dataset=full_precision,
            processing_class=tokenizer,
            guard=guard,
            anchors="cached",
        )
    data = add_cached_anchors(pairs, model, guard, batch_size=4, autocast_dtype=torch.bfloat16, show_progress=False)
    name = f"{ANCHOR_COLUMN}.1"
    # bf16 activations really differ from float32 ones: the precision matters for the anchors.
    assert data[0][name] != full_precision[0][name]
    trainer = RefusalGuardTrainer(
        model=model, args=args, train_dataset=data, processing_class=tokenizer, guard=guard, anchors="cached"
    )
    logs = train_logs(trainer)
    assert logs[0]["guard_penalty"] == 0.0
    assert logs[1]["guard_penalty"] > 0
    guard.remove()


# ---------------------------------------------------------------------- issue #10: resume


class _Crash(Exception):
    pass


def _resume_run(tokenizer, data, path, *, anchors, crash_at=None, resume=None):
    from transformers import TrainerCallback

    class CrashAfter(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if crash_at is not None and state.global_step == crash_at:
                raise _Crash(f"killed before step {crash_at + 1}")

    model = lora_model(tokenizer, seed=1)
    with RefusalGuard(model, random_basis(seed=6), positions="response", backend="torch") as guard:
        if anchors == "cached":
            data = add_cached_anchors(data, model, guard, batch_size=2, show_progress=False)
        args = make_args(
            path,
            max_steps=6,
            per_device_train_batch_size=2,
            save_strategy="steps",
            save_steps=2,
            lr_scheduler_type="linear",
            learning_rate=2e-2,
        )
        if "train_sampling_strategy" in inspect.signature(TrainingArguments.__init__).parameters:
            args.train_sampling_strategy = "random"  # shuffled batches: the data order must be restored too
        trainer = RefusalGuardTrainer(
            model=model,
            args=args,
            train_dataset=data,
            processing_class=tokenizer,
            guard=guard,
            anchors=anchors,
            warmup_steps=4,
            warmup_multiplier=5.0,
            callbacks=[CrashAfter()],
        )
        trainer.train(resume_from_checkpoint=resume)
        return lora_params(model), [e for e in trainer.state.log_history if "loss" in e]


@pytest.mark.parametrize("anchors", ["cached"])  # online anchors are the same frozen forward, per step
def test_resumed_run_ends_with_the_same_adapter_bit_for_bit(tokenizer, pairs, tmp_path, anchors):
    """Killed after checkpoint-2 (during step 3), resumed from it: same adapter as one run."""
    straight, straight_logs = _resume_run(tokenizer, pairs, tmp_path / "straight", anchors=anchors)
    with pytest.raises(_Crash):
        _resume_run(tokenizer, pairs, tmp_path / "broken", anchors=anchors, crash_at=3)
    assert (tmp_path / "broken" / "checkpoint-2").is_dir() and not (tmp_path / "broken" / "checkpoint-4").exists()
    resumed, resumed_logs = _resume_run(
        tokenizer, pairs, tmp_path / "broken", anchors=anchors, resume=str(tmp_path / "broken" / "checkpoint-2")
    )
    assert straight.keys() == resumed.keys() and straight
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    # the penalty really acted: the logged guard terms after the resume match the straight run's
    by_step = {e["step"]: e for e in straight_logs}
    assert [e["step"] for e in resumed_logs] == [1, 2, 3, 4, 5, 6]  # 1-2 restored from checkpoint-2
    for entry in resumed_logs:
        assert entry["guard_penalty"] == by_step[entry["step"]]["guard_penalty"]
        assert entry["guard_scale"] == by_step[entry["step"]]["guard_scale"]
    assert any(e["guard_penalty"] > 0 for e in resumed_logs)


# ---------------------------------------------------------------------- issue 17: dropout, online anchors


def _gpt2_with_dropout(tokenizer, p: float = 0.1):
    from peft import LoraConfig, get_peft_model

    model = tiny_model("gpt2", tokenizer, seed=0, resid_pdrop=p, embd_pdrop=p, attn_pdrop=p)
    torch.manual_seed(0)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["c_attn"]))


@pytest.mark.parametrize("penalty_forward", ["auto", "shared"])
def test_dropout_stays_out_of_the_penalty(tokenizer, pairs, tmp_path, penalty_forward):
    """GPT-2 style dropout 0.1: the anchors are eval-mode, the training forward is not. With the separate
    eval-mode penalty forward ("auto" picks it here) the step-0 penalty is exactly 0 and two dropout draws give the
    same penalty; the shared forward (the only way before this fix) shows what goes wrong."""
    model = _gpt2_with_dropout(tokenizer)
    guard = RefusalGuard(model, random_basis(), backend="torch")
    assert guard.dropout_active(model.train())
    trainer = RefusalGuardTrainer(
        model=model,
        args=make_args(tmp_path, max_steps=2, learning_rate=1e-2),
        train_dataset=pairs,
        processing_class=tokenizer,
        guard=guard,
        penalty_forward=penalty_forward,
    )
    penalties = [entry["guard_penalty"] for entry in train_logs(trainer)]
    batch = trainer._prepare_inputs(trainer.data_collator([pairs[i] for i in range(4)]))
    model.train()
    values = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        trainer.compute_loss(model, dict(batch))
        values.append(float(guard.penalty()))
        guard.disarm()
    if penalty_forward == "auto":
        assert penalties[0] == 0.0 and penalties[1] > 0
        assert values[0] > 0 and values[0] == values[1]
    else:
        assert penalties[0] > 0 and values[0] != values[1]  # dropout noise inside the drift term
    guard.remove()


def test_lora_dropout_alone_keeps_the_shared_forward(tokenizer):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        tiny_model("llama", tokenizer, seed=0),
        LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, target_modules=["q_proj", "v_proj"]),
    ).train()
    guard = RefusalGuard(model, random_basis(), backend="torch")
    assert not guard.dropout_active(model)  # LoRA dropout: the adapter adds exactly 0 at step 0
    model.base_model.model.model.layers[0].self_attn.attention_dropout = 0.1
    assert guard.dropout_active(model)
    model.base_model.model.model.layers[0].self_attn.attention_dropout = 0.0
    model.eval()
    model.base_model.model.model.layers[0].self_attn.attention_dropout = 0.1
    assert not guard.dropout_active(model)  # eval mode: no dropout at all
    guard.remove()


def test_online_anchors_over_trainable_base_weights_are_refused(tokenizer, pairs, tmp_path):
    model = tiny_model("llama", tokenizer, seed=0)  # no adapter: every weight trains
    guard = RefusalGuard(model, random_basis(), backend="torch")
    with pytest.raises(ValueError, match=r"(?s)anchors='online'.*not adapter weights \(model\.embed_tokens\.weight"):
        RefusalGuardTrainer(
            model=model, args=make_args(tmp_path), train_dataset=pairs, processing_class=tokenizer, guard=guard
        )
    # an adapter with one base weight unfrozen below the guarded layers moves the anchors too
    peft_model = lora_model(tokenizer)
    peft_model.get_base_model().model.layers[0].input_layernorm.weight.requires_grad_(True)
    guard = RefusalGuard(peft_model, random_basis(), backend="torch")
    with pytest.raises(ValueError, match=r"1 trainable weights .* \(model\.layers\.0\.input_layernorm\.weight\)"):
        RefusalGuardTrainer(
            model=peft_model, args=make_args(tmp_path), train_dataset=pairs, processing_class=tokenizer, guard=guard
        )
    # above the last guarded layer it cannot move them: fine
    peft_model.get_base_model().model.layers[0].input_layernorm.weight.requires_grad_(False)
    peft_model.get_base_model().lm_head.weight.requires_grad_(True)
    RefusalGuardTrainer(
        model=peft_model, args=make_args(tmp_path), train_dataset=pairs, processing_class=tokenizer, guard=guard
    )
    # full fine-tuning with cached anchors (fixed before training) is allowed
    guard.remove()
    guard = RefusalGuard(model, random_basis(), backend="torch")
    cached = add_cached_anchors(pairs, model, guard, show_progress=False)
    RefusalGuardTrainer(
        model=model, args=make_args(tmp_path), train_dataset=cached, processing_class=tokenizer, guard=guard,
        anchors="cached",
    )  # fmt: skip
    guard.remove()
