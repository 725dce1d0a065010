"""Shared pieces of the real-model tests (SmolLM2-135M-Instruct from `refusalguard models get smollm2`):
short prompt/response pairs written for these tests, loading, tokenizing, and a drift probe.

Kept small on purpose: float32 (on this project's CPUs, without native bf16 instructions, bf16 is 2-3x
slower), a few short examples, few steps; loading the cached folder takes ~0.1-2 s.
"""

from __future__ import annotations

import torch

PAIRS = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("Suggest a name for a pet turtle.", "How about Shelly or Captain Slow?"),
    ("What does a thermometer measure?", "A thermometer measures temperature."),
]

CHATS = [[{"role": "user", "content": p}, {"role": "assistant", "content": r}] for p, r in PAIRS]


def load(path, dtype=torch.float32, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)


def tokenized_pairs(tokenizer, pairs=PAIRS):
    from datasets import Dataset

    from refusalguard_kernels.training.data_utils import tokenize_dataset

    rows = Dataset.from_list([{"prompt": p, "response": r} for p, r in pairs])
    return tokenize_dataset(rows, tokenizer, prompt_field="prompt", response_field="response", show_progress=False)


def batch_of(tokenizer, pairs=PAIRS):
    """A right-padded batch with labels (-100 on the prompt) and prompt_lengths."""
    from refusalguard_kernels.integration.anchors import AnchorCollator

    data = tokenized_pairs(tokenizer, pairs)
    return AnchorCollator(tokenizer)([data[i] for i in range(len(data))])


def model_inputs(batch):
    return {key: value for key, value in batch.items() if key != "prompt_lengths"}


def lora(model, seed=0, **config):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    options = dict(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM")
    options.update(config)
    return get_peft_model(model, LoraConfig(**options))


def nudge_adapter_(model, seed=1, scale=2e-3):
    """Seeded non-zero LoRA B matrices: a stand-in for a few training steps (the adapted model moves)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(scale * torch.randn(param.shape, generator=gen, dtype=torch.float32).to(param.dtype))


def grad_norm(loss, params) -> float:
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return float(torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None)))
