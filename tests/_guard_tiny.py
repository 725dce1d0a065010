"""Tiny random models and a character-level tokenizer for the guard tests (no downloads).

Also holds the DDP worker, which must be importable by the spawned processes.
"""

from __future__ import annotations

import os
import warnings

import torch

VOCAB = 128
SPECIAL = ["<pad>", "<unk>", "<bos>", "<eos>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def char_tokenizer(chat: bool = True, padding_side: str = "right"):
    """A PreTrainedTokenizerFast with one token per printable ASCII character (vocab < 128)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {tok: i for i, tok in enumerate(SPECIAL + chars)}
    assert len(vocab) <= VOCAB
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("(?m)."), behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>", eos_token="<eos>",
        padding_side=padding_side,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>", "<|end|>"]})
    if chat:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_config(arch: str = "llama", **overrides):
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    if arch == "llama":
        cfg = tf.LlamaConfig(**common, attention_dropout=0.0)
    elif arch == "mistral":
        cfg = tf.MistralConfig(**common, attention_dropout=0.0)
    elif arch == "qwen2":
        cfg = tf.Qwen2Config(**common, attention_dropout=0.0)
    elif arch == "qwen3":
        cfg = tf.Qwen3Config(**common, head_dim=8, attention_dropout=0.0)
    elif arch == "gemma":
        cfg = tf.GemmaConfig(**common, head_dim=8, attention_dropout=0.0)
    elif arch == "gemma2":
        cfg = tf.Gemma2Config(**common, head_dim=8, attention_dropout=0.0, sliding_window=16)
    elif arch == "gemma3":
        cfg = tf.Gemma3TextConfig(**common, head_dim=8, attention_dropout=0.0, sliding_window=16)
    elif arch == "gpt2":
        cfg = tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=256,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=2, eos_token_id=3)
    elif arch == "gpt_neox":
        cfg = tf.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                               num_attention_heads=4, max_position_embeddings=256, attention_dropout=0.0,
                               hidden_dropout=0.0, bos_token_id=2, eos_token_id=3)
    else:
        raise ValueError(arch)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def tiny_model(arch: str = "llama", seed: int = 0, **overrides):
    """A random causal LM in eval mode (dropout 0 throughout)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides), attn_implementation="eager")
    return model.eval()


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
            input_ids[row, seq - n_pad:] = 0
            attention_mask[row, seq - n_pad:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def random_basis(model, layers, k: int = 2, seed: int = 3):
    from refusalguard_kernels import orthonormalize_basis
    from refusalguard_kernels.basis import RefusalBasis
    from refusalguard_kernels.model_utils import model_hidden_size

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


def ddp_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """One DDP rank: half the batch, task loss + penalty, backward; saves the averaged gradients."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from refusalguard_kernels.hooks import RefusalGuard

    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        model = ddp_reference_model()
        batch = ddp_batch()
        half = batch["input_ids"].shape[0] // world_size
        local = {key: value[rank * half:(rank + 1) * half] for key, value in batch.items()}
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
    finally:
        dist.destroy_process_group()


def ddp_reference_model():
    return tiny_model("llama", seed=11).train()


def ddp_batch():
    return random_batch(batch=4, seq=10, seed=12)


def perturbed_step(model) -> None:
    perturb_(model, seed=13, scale=0.05)
