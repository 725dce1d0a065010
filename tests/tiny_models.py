"""Tiny random causal LMs and two tiny tokenizers, built offline, for every model-side test.

Nothing here downloads anything. ``char_tokenizer`` has one token per printable ASCII character
(vocab < 128); ``tiny_tokenizer`` is a word-level ``tokenizers`` model trained on a few sentences
(plus the words of the built-in prompt sets). Models are built from configs with random weights
(hidden 32, dropout 0, eager attention). Also holds the DDP worker, which must be importable by
the spawned processes (``gloo_ranks.run_ranks`` runs it).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

VOCAB = 128
SPECIAL = ["<pad>", "<unk>", "<bos>", "<eos>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAR_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def char_tokenizer(chat: bool = True, padding_side: str = "right"):
    """A PreTrainedTokenizerFast with one token per printable ASCII character (vocab < 128)."""
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {tok: i for i, tok in enumerate(SPECIAL + chars)}
    assert len(vocab) <= VOCAB
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("(?m)."), behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<bos>",
        eos_token="<eos>",
        padding_side=padding_side,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>", "<|end|>"]})
    if chat:
        tokenizer.chat_template = CHAR_CHAT_TEMPLATE
    return tokenizer


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

WORD_CHAT_TEMPLATE = (
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
        from refusalguard_kernels.integration.prompts import builtin_prompts

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
        tokenizer.chat_template = WORD_CHAT_TEMPLATE
    return tokenizer


MODEL_KINDS = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gpt2", "gpt_neox")


def tiny_config(kind: str = "llama", tokenizer=None, *, hidden: int = 32, layers: int = 3, **overrides):
    """A config for a ``kind`` model sized for CPU tests; vocabulary and special ids from ``tokenizer``
    (default: the char tokenizer's). ``overrides`` set config attributes afterwards."""
    import transformers as tf

    if tokenizer is None:
        ids = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    else:
        ids = dict(
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    common = dict(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        attention_dropout=0.0,
        **ids,
    )
    head_dim = hidden // 4
    if kind == "llama":
        cfg = tf.LlamaConfig(**common, tie_word_embeddings=False)
    elif kind == "mistral":
        cfg = tf.MistralConfig(**common)
    elif kind == "qwen2":
        cfg = tf.Qwen2Config(**common, tie_word_embeddings=False)
    elif kind == "qwen3":
        cfg = tf.Qwen3Config(**common, head_dim=head_dim)
    elif kind == "gemma":
        cfg = tf.GemmaConfig(**common, head_dim=head_dim)
    elif kind == "gemma2":
        cfg = tf.Gemma2Config(**common, head_dim=head_dim, sliding_window=16)
    elif kind == "gemma3":
        cfg = tf.Gemma3TextConfig(**common, head_dim=head_dim, sliding_window=16)
    elif kind == "gpt2":
        cfg = tf.GPT2Config(
            n_embd=hidden,
            n_layer=layers,
            n_head=4,
            n_positions=256,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **ids,
        )
    elif kind == "gpt_neox":
        cfg = tf.GPTNeoXConfig(
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            max_position_embeddings=256,
            attention_dropout=0.0,
            hidden_dropout=0.0,
            **ids,
        )
    else:
        raise ValueError(f"unknown tiny model kind {kind!r}; choose one of {MODEL_KINDS}")
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def tiny_model(
    kind: str = "llama", tokenizer=None, *, seed: int = 0, hidden: int = 32, layers: int | None = None, **overrides
):
    """A random ``kind`` causal LM in float32 and eval mode, weights drawn with ``seed``. Without a
    tokenizer it has the char tokenizer's vocabulary and 3 layers; with one, its vocabulary and 2 layers
    (the sizes each group of tests was written for)."""
    if layers is None:
        layers = 3 if tokenizer is None else 2
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = tiny_config(kind, tokenizer, hidden=hidden, layers=layers, **overrides)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
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


def random_batch(batch: int = 4, seq: int = 12, seed: int = 1, *, pad_rows: dict | None = None, left: bool = False):
    """input_ids/attention_mask/labels; ``pad_rows={row: n_pad}`` pads those rows (right, or left)."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(len(SPECIAL), VOCAB, (batch, seq), generator=gen)
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    for row, n_pad in (pad_rows or {}).items():
        if left:
            input_ids[row, :n_pad] = 0
            attention_mask[row, :n_pad] = 0
        else:
            input_ids[row, seq - n_pad :] = 0
            attention_mask[row, seq - n_pad :] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def random_basis(model, layers, k: int = 2, seed: int = 3):
    from refusalguard_kernels import orthonormalize_basis
    from refusalguard_kernels.integration.basis import RefusalBasis
    from refusalguard_kernels.integration.model_utils import model_hidden_size

    gen = torch.Generator().manual_seed(seed)
    d = model_hidden_size(model)
    bases = {layer: orthonormalize_basis(torch.randn(d, k, generator=gen, dtype=torch.float64)) for layer in layers}
    return RefusalBasis(bases, {"model_name": "tiny", "method": "random"})


def perturb_(model, seed: int = 7, scale: float = 0.05) -> None:
    """Nudge every weight matrix in place (a stand-in for some training steps)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.add_(scale * torch.randn(param.shape, generator=gen, dtype=param.dtype))


# ---------------------------------------------------------------------------- DDP


def ddp_worker(rank: int, world_size: int, out_dir: str) -> None:
    """One DDP rank (run through ``gloo_ranks.run_ranks``, which owns the process group): half the
    batch, task loss + penalty, backward; rank 0 saves the averaged gradients."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from refusalguard_kernels.integration.hooks import RefusalGuard

    model = ddp_reference_model()
    batch = ddp_batch()
    half = batch["input_ids"].shape[0] // world_size
    local = {key: value[rank * half : (rank + 1) * half] for key, value in batch.items()}
    basis = random_basis(model, [0, 2], k=2)
    guard = RefusalGuard(model, basis, backend="torch")
    anchors = guard.anchors(**local)
    perturbed_step(model)
    ddp_model = DDP(model)
    guard.arm(anchors, guard.weights(**local))
    out = ddp_model(**local)
    loss = out.loss + guard.penalty()
    loss.backward()
    mean_penalty = guard.penalty().detach().clone()
    dist.all_reduce(mean_penalty)
    mean_penalty /= world_size
    if rank == 0:
        grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
        torch.save({"grads": grads, "penalty": mean_penalty}, os.path.join(out_dir, "ddp.pt"))
    guard.remove()


def ddp_reference_model():
    return tiny_model("llama", seed=11).train()


def ddp_batch():
    return random_batch(batch=4, seq=10, seed=12)


def perturbed_step(model) -> None:
    perturb_(model, seed=13, scale=0.05)
