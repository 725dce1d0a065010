"""Tiny random causal LMs and a tiny tokenizer, built offline, for the trainer/CLI tests.

Nothing here downloads anything: the tokenizer is a word-level ``tokenizers`` model trained
on a few sentences (plus the words of the built-in prompt sets) and the models are built
from configs with random weights (hidden 32, 2 layers, dropout 0).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    GemmaConfig,
    GPT2Config,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

__all__ = [
    "SENTENCES",
    "CHAT_TEMPLATE",
    "MODEL_KINDS",
    "tiny_tokenizer",
    "tiny_config",
    "tiny_model",
    "save_tiny_model",
    "write_pairs_file",
    "write_text_file",
]

SENTENCES = [
    "the cat sat on the mat and looked at the dog",
    "how do i bake bread at home with flour and water",
    "tell me a short story about a brave little dog",
    "what is the capital of france ? the capital of france is paris",
    "please write a poem about the sea and the sky",
    "sure ! here is a simple recipe for bread",
    "i can not help with that request",
    "explain how plants turn sunlight into food",
    "give me three tips for learning to play the guitar",
    "the weather today is sunny with a light wind",
    "a good night of sleep helps you think clearly",
    "water boils at one hundred degrees at sea level",
]

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}<|user|> {{ message['content'] }} <|end_user|> "
    "{% else %}<|assistant|> {{ message['content'] }} {{ eos_token }} {% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

_SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>", "<|user|>", "<|end_user|>", "<|assistant|>"]
MODEL_KINDS = ("llama", "qwen2", "gemma", "gpt2")


def _corpus() -> list[str]:
    texts = list(SENTENCES)
    try:
        from refusalguard_kernels.prompts import builtin_prompts

        texts += builtin_prompts("harmful") + builtin_prompts("harmless")
    except Exception:  # the prompt sets are another module's; the tokenizer works without them
        pass
    return texts


def tiny_tokenizer(*, chat_template: bool = True, vocab_size: int = 256) -> PreTrainedTokenizerFast:
    """A lower-casing word-level tokenizer with pad/bos/eos/unk and (optionally) a chat template."""
    backend = Tokenizer(models.WordLevel(unk_token="<unk>"))
    backend.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=_SPECIALS, show_progress=False)
    backend.train_from_iterator(_corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<bos>",
        eos_token="<eos>",
        additional_special_tokens=["<|user|>", "<|end_user|>", "<|assistant|>"],
        padding_side="right",
        model_max_length=128,
    )
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_config(kind: str, tokenizer, *, hidden: int = 32, layers: int = 2):
    """A config for a ``kind`` model ("llama", "qwen2", "gemma", "gpt2") sized for CPU tests."""
    ids = dict(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    if kind == "llama":
        return LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                           attention_dropout=0.0, tie_word_embeddings=False, **ids)
    if kind == "qwen2":
        return Qwen2Config(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                           attention_dropout=0.0, tie_word_embeddings=False, **ids)
    if kind == "gemma":
        return GemmaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4,
                           max_position_embeddings=128, attention_dropout=0.0, **ids)
    if kind == "gpt2":
        return GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, n_positions=128, resid_pdrop=0.0,
                          embd_pdrop=0.0, attn_pdrop=0.0, **ids)
    raise ValueError(f"unknown tiny model kind {kind!r}; choose one of {MODEL_KINDS}")


def tiny_model(kind: str = "llama", tokenizer=None, *, seed: int = 0, hidden: int = 32, layers: int = 2):
    """A random ``kind`` causal LM in float32, eval mode, weights drawn with ``seed``."""
    tokenizer = tokenizer if tokenizer is not None else tiny_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(kind, tokenizer, hidden=hidden, layers=layers),
                                             dtype=torch.float32)
    return model.eval()


def save_tiny_model(path, kind: str = "llama", *, seed: int = 0, chat_template: bool = True) -> Path:
    """Save a tiny model and its tokenizer into ``path`` (as a hub checkpoint folder) and return it."""
    path = Path(path)
    tokenizer = tiny_tokenizer(chat_template=chat_template)
    model = tiny_model(kind, tokenizer, seed=seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


_PAIRS = [
    ("how do i bake bread ?", "mix flour and water then bake it"),
    ("tell me a story about a dog", "a brave little dog sat on the mat"),
    ("what is the capital of france ?", "the capital of france is paris"),
    ("write a poem about the sea", "the sea and the sky are blue"),
    ("give me tips for the guitar", "play a little every day"),
    ("explain how plants make food", "plants turn sunlight into food"),
    ("why is sleep good ?", "a good night of sleep helps you think clearly"),
    ("when does water boil ?", "water boils at one hundred degrees at sea level"),
]


def write_pairs_file(path, *, prompt_field: str = "prompt", response_field: str = "response", n: int = 8) -> Path:
    """A .jsonl file of ``n`` prompt/response rows."""
    path = Path(path)
    rows = [_PAIRS[i % len(_PAIRS)] for i in range(n)]
    path.write_text("".join(json.dumps({prompt_field: p, response_field: r}) + "\n" for p, r in rows))
    return path


def write_text_file(path, *, n: int = 8) -> Path:
    """A .txt file with ``n`` lines of text (one example a line)."""
    path = Path(path)
    path.write_text("\n".join(SENTENCES[i % len(SENTENCES)] for i in range(n)) + "\n")
    return path
