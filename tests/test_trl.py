"""The guard inside TRL's SFTTrainer through RefusalGuardMixin: a chat "messages" dataset,
assistant-only loss, positions="response" on the assistant tokens, offline on a tiny model."""

from __future__ import annotations

import datasets
import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny_models import tiny_model, tiny_tokenizer

from refusalguard_kernels import RefusalGuardMixin, orthonormalize_basis
from refusalguard_kernels.integration.basis import BASIS_FILENAME, RefusalBasis
from refusalguard_kernels.integration.hooks import RefusalGuard

trl = pytest.importorskip("trl", reason="TRL is the [trl] extra")
from trl import SFTConfig, SFTTrainer  # noqa: E402

LAYERS = [0, 1]
# The tiny tokenizer's template with {% generation %} around the assistant turns: what TRL's
# assistant_only_loss needs to build its assistant_masks.
GENERATION_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}<|user|> {{ message['content'] }} <|end_user|> "
    "{% else %}<|assistant|> {% generation %}{{ message['content'] }} {{ eos_token }}{% endgeneration %} {% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CHATS = [
    [("how do i bake bread ?", "mix flour and water then bake it"), ("and then ?", "sure ! here is a simple recipe")],
    [("tell me a story about a dog", "a brave little dog sat on the mat"), ("more", "the dog looked at the cat")],
    [("what is the capital of france ?", "the capital of france is paris"), ("why ?", "i can not help with that")],
    [("write a poem about the sea", "the sea and the sky"), ("again", "water boils at sea level")],
]


class GuardedSFT(RefusalGuardMixin, SFTTrainer):
    pass


@pytest.fixture(scope="module")
def tokenizer():
    tok = tiny_tokenizer()
    tok.chat_template = GENERATION_TEMPLATE
    return tok


@pytest.fixture(scope="module")
def chats():
    rows = []
    for chat in CHATS * 2:
        messages = []
        for user, assistant in chat:
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        rows.append({"messages": messages})
    return datasets.Dataset.from_list(rows)


def lora_model(tokenizer):
    model = tiny_model("llama", tokenizer, seed=0)
    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    return get_peft_model(model, config)


def random_basis(seed: int = 0, k: int = 2) -> RefusalBasis:
    gen = torch.Generator().manual_seed(seed)
    return RefusalBasis(
        {layer: orthonormalize_basis(torch.randn(32, k, generator=gen)) for layer in LAYERS},
        {"method": "svd", "positions": "last", "model_name": "tiny"},
    )


def sft_args(path, **overrides) -> SFTConfig:
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
        assistant_only_loss=True,
        max_length=64,
    )
    options.update(overrides)
    return SFTConfig(**options)


def lora_params(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def test_guarded_sft_trainer_assistant_only(tokenizer, chats, tmp_path):
    model = lora_model(tokenizer)
    guard = RefusalGuard(model, random_basis(), positions="response", backend="torch")
    seen = []
    weights = guard.weights

    def recording_weights(**batch):
        weight = weights(**batch)
        seen.append((batch["input_ids"].clone(), batch["labels"].clone(), weight.clone()))
        return weight

    guard.weights = recording_weights
    trainer = GuardedSFT(
        model=model,
        args=sft_args(tmp_path / "guarded"),
        train_dataset=chats,
        processing_class=tokenizer,
        guard=guard,
        warmup_steps=2,
        warmup_multiplier=10.0,
    )
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logs] == [1, 2, 3]
    assert [entry["guard_scale"] for entry in logs] == [10.0, 5.5, 1.0]
    # Step 0: LoRA B = 0, the adapted model is the frozen one, the penalty is exactly zero.
    assert logs[0]["guard_penalty"] == 0.0
    assert logs[1]["guard_penalty"] > 0 and logs[2]["guard_penalty"] > 0
    for entry in logs:
        assert entry["loss"] == pytest.approx(
            entry["task_loss"] + entry["guard_scale"] * entry["guard_penalty"], rel=1e-5
        )
        assert sum(entry[f"guard_drift/layer_{layer}"] for layer in LAYERS) == pytest.approx(
            entry["guard_penalty"], rel=1e-5
        )
        assert "mean_token_accuracy" in entry  # TRL's own logging still runs
    assert not guard.armed

    # The guarded tokens are exactly the assistant tokens TRL trains on: both assistant turns,
    # not the user turn between them.
    assistant_id = tokenizer.convert_tokens_to_ids("<|assistant|>")
    user_id = tokenizer.convert_tokens_to_ids("<|user|>")
    assert len(seen) == 3
    for input_ids, labels, weight in seen:
        assert torch.equal(weight > 0, labels != -100)
        for row in range(input_ids.shape[0]):
            guarded = (weight[row] > 0).nonzero().flatten()
            assert guarded.numel() > 0
            second_user = (input_ids[row] == user_id).nonzero().flatten()[1]
            second_assistant = (input_ids[row] == assistant_id).nonzero().flatten()[1]
            assert guarded.min() < second_user < second_assistant < guarded.max()
            assert weight[row, second_user:second_assistant].sum() == 0

    # The basis is saved beside the adapter.
    trainer.save_model(str(tmp_path / "out"))
    assert (tmp_path / "out" / BASIS_FILENAME).exists()
    assert (tmp_path / "out" / "adapter_config.json").exists()

    # The plain SFTTrainer from the same start: the first step is the task's alone (zero penalty,
    # zero gradient), then the guard pulls the adapter elsewhere.
    plain_model = lora_model(tokenizer)
    plain = SFTTrainer(
        model=plain_model, args=sft_args(tmp_path / "plain"), train_dataset=chats, processing_class=tokenizer
    )
    plain.train()
    plain_logs = [entry for entry in plain.state.log_history if "loss" in entry]
    assert logs[0]["task_loss"] == pytest.approx(plain_logs[0]["loss"], rel=1e-5)
    assert logs[1]["task_loss"] == pytest.approx(plain_logs[1]["loss"], rel=1e-5)
    guarded_params, plain_params = lora_params(model), lora_params(plain_model)
    assert any(not torch.allclose(guarded_params[name], plain_params[name]) for name in plain_params)
    guard.remove()


def test_guard_follows_the_mask_columns_over_labels():
    # A batch with TRL's mask columns (a collator of one's own that keeps them): "response" is the mask.
    model = tiny_model("llama")
    guard = RefusalGuard(model, random_basis(), positions="response", backend="torch")
    input_ids = torch.arange(8, 20).reshape(2, 6)
    attention_mask = torch.ones(2, 6, dtype=torch.long)
    assistant_masks = torch.tensor([[0, 1, 1, 0, 1, 0], [0, 0, 1, 1, 1, 1]])
    labels = input_ids.clone()  # loss on every token: the mask, not the labels, says what to guard
    for key in ("assistant_masks", "completion_mask"):
        weight = guard.weights(
            input_ids=input_ids, attention_mask=attention_mask, labels=labels, **{key: assistant_masks}
        )
        assert torch.equal(weight, assistant_masks.float())
    guard.remove()
