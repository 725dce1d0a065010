"""Chat data: ``tokenize_chats`` (assistant turns only, with the tokenizer's chat template) and
``refusalguard train --messages-field``, guarding the assistant tokens, on a tiny saved model."""

from __future__ import annotations

import json

import datasets
import pytest
import torch
from tiny_models import random_basis, save_tiny_model, tiny_model, tiny_tokenizer

from refusalguard_kernels.cli import main
from refusalguard_kernels.integration.hooks import RefusalGuard
from refusalguard_kernels.training.data_utils import ChatTemplateError, tokenize_chats

CHATS = [
    [("how do i bake bread ?", "mix flour and water then bake it"), ("and then ?", "sure ! here is a simple recipe")],
    [("tell me a story about a dog", "a brave little dog sat on the mat"), ("more", "the dog looked at the cat")],
    [("what is the capital of france ?", "the capital of france is paris"), ("why ?", "i can not help with that")],
    [("write a poem about the sea", "the sea and the sky"), ("again", "water boils at sea level")],
]


def conversations(n: int = 8) -> list[dict]:
    rows = []
    for i in range(n):
        messages = []
        for user, assistant in CHATS[i % len(CHATS)]:
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        rows.append({"messages": messages})
    return rows


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "hf_datasets"))


def test_tokenize_chats_trains_on_every_assistant_turn_only():
    tokenizer = tiny_tokenizer()
    data = tokenize_chats(datasets.Dataset.from_list(conversations(4)), tokenizer, show_progress=False)
    assert data.column_names == ["input_ids", "attention_mask", "labels"]
    for row, chat in zip(data, CHATS):
        rendered = tokenizer.apply_chat_template(
            [{"role": r, "content": c} for u, a in chat for r, c in (("user", u), ("assistant", a))], tokenize=False
        )
        assert tokenizer.decode(row["input_ids"]) == tokenizer.decode(
            tokenizer(rendered, add_special_tokens=False)["input_ids"]
        )
        trained = [label for label in row["labels"] if label != -100]
        # Both assistant turns with their end-of-turn token, and nothing of the user turns.
        want = tokenizer(f"{chat[0][1]} <eos> {chat[1][1]} <eos>", add_special_tokens=False)["input_ids"]
        assert trained == want
        labelled = [i for i, label in enumerate(row["labels"]) if label != -100]
        second_user = [i for i, t in enumerate(row["input_ids"]) if t == tokenizer.convert_tokens_to_ids("<|user|>")][1]
        assert labelled[0] < second_user < labelled[-1] and row["labels"][second_user] == -100


def test_tokenize_chats_errors():
    raw = datasets.Dataset.from_list(conversations(2))
    with pytest.raises(ChatTemplateError, match="no(ne)? .*chat template|has none"):
        tokenize_chats(raw, tiny_tokenizer(chat_template=False), show_progress=False)
    with pytest.raises(ValueError, match="no messages field 'chat'"):
        tokenize_chats(raw, tiny_tokenizer(), messages_field="chat", show_progress=False)
    bad = datasets.Dataset.from_list([{"messages": [{"role": "user", "text": "hi"}]}])
    with pytest.raises(ValueError, match="'role' and a string 'content'"):
        tokenize_chats(bad, tiny_tokenizer(), show_progress=False)
    # A template that rewrites earlier turns (here: drops the earlier assistant turns) cannot be split.
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' or loop.last %}<|{{ m['role'] }}|> {{ m['content'] }} "
        "{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    with pytest.raises(ChatTemplateError, match="concatenation of its turns"):
        tokenize_chats(raw, tokenizer, show_progress=False)


def _write_chats(path) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in conversations(8)))
    return str(path)


def _basis_dir(tmp_path):
    model = tiny_model("llama", tiny_tokenizer())
    out = tmp_path / "basis"
    out.mkdir()
    random_basis(model, [0, 1], k=2).save(str(out))
    return out


def _train(model_dir, chats, basis, out, *extra):
    argv = ["train", model_dir, "--dataset", chats, "--messages-field", "messages", "--basis", basis]
    argv += ["--steps", "3", "--batch-size", "4", "--logging-steps", "1", "--lora-r", "4"]
    argv += ["--lora-targets", "q_proj,v_proj", "--backend", "torch", "--lr", "0.05", "--output-dir", out, "--quiet"]
    return main([str(a) for a in (*argv, *extra)])


def test_train_cli_on_chat_data_guards_the_assistant_turns(tmp_path, capsys, monkeypatch):
    model_dir = save_tiny_model(tmp_path / "llama", "llama", seed=0)
    seen = []
    weights = RefusalGuard.weights

    def recording(self, **batch):
        weight = weights(self, **batch)
        seen.append((batch["labels"].clone(), weight.clone()))
        return weight

    monkeypatch.setattr(RefusalGuard, "weights", recording)
    code = _train(model_dir, _write_chats(tmp_path / "chat.jsonl"), _basis_dir(tmp_path), tmp_path / "out")
    captured = capsys.readouterr()
    assert code == 0, captured.err
    logs = [
        eval(line.strip(), {})
        for line in captured.out.splitlines()
        if line.strip().startswith("{") and "guard_penalty" in line
    ]
    assert len(logs) == 3
    assert float(logs[0]["guard_penalty"]) == 0.0
    assert float(logs[2]["guard_penalty"]) > 0.0
    # The guard weighs exactly the tokens trained on: the assistant turns.
    assert len(seen) == 3
    for labels, weight in seen:
        assert torch.equal(weight > 0, labels != -100)
        assert (labels == -100).any() and (labels != -100).any()
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_train_cli_chat_data_without_a_template_is_a_clear_error(tmp_path, capsys):
    model_dir = save_tiny_model(tmp_path / "plain", "llama", seed=0, chat_template=False)
    chats, basis = _write_chats(tmp_path / "chat.jsonl"), _basis_dir(tmp_path)
    code = _train(model_dir, chats, basis, tmp_path / "out")
    err = capsys.readouterr().err
    assert code != 0
    assert "--messages-field" in err and "chat template" in err
    code = _train(model_dir, chats, basis, tmp_path / "o", "--no-chat-template")
    assert code != 0 and "--no-chat-template" in capsys.readouterr().err
