"""The fine-tuning methods the benchmark compares, each a LoRA fine-tune with the same data, steps,
learning rate (low-lr aside) and seed; see ``config`` for what each method's strength means.

* ``plain LoRA``, ``safety-mix`` (its data differs), ``low-lr``: ``transformers.Trainer``;
* ``procon``, ``refusalguard``, ``random-subspace``: ``RefusalGuardTrainer`` with a
  ``RefusalGuard`` on the k = 1 difference-of-means direction, the k-direction cone, or a random
  orthonormal basis of the same k (``random_basis``; its own ``coord_spread``, measured like the
  cone's, so "drift_coef" means the same penalty per pooled standard deviation of movement);
* ``kl``: ``KLTrainer``, the task loss plus ``kl_coef`` x KL(base || tuned) of the next-token
  distributions, averaged over the non-padding tokens (the base is the same model with its
  adapters switched off).

Guards use coefficients in spread units (``coef_units="spread"``: drift measured in the
extraction prompts' pooled standard deviations, layers averaged) and the guard's default
attention-sink rule (``exclude_first=1``).
"""

from __future__ import annotations

import copy
import shutil
import tempfile
import warnings

import torch
from torch.nn import functional as F
from transformers import Trainer

__all__ = ["finetune", "KLTrainer", "random_basis", "Bases", "GUARD_METHODS"]

GUARD_METHODS = ("procon", "refusalguard", "random-subspace")


class KLTrainer(Trainer):
    """``transformers.Trainer`` whose loss is the task loss plus ``kl_coef`` x KL(base || tuned)
    of the next-token distributions over every non-padding token; the base distribution comes
    from the same PEFT model with its adapters disabled (no gradient). ``task_losses`` keeps
    each step's task loss."""

    def __init__(self, *args, kl_coef: float, **kwargs):
        super().__init__(*args, **kwargs)
        if not kl_coef >= 0:
            raise ValueError(f"kl_coef must be >= 0; got {kl_coef}")
        self.kl_coef = float(kl_coef)
        self.task_losses: list[float] = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        task, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        mask = inputs["attention_mask"].to(torch.float32)
        with torch.no_grad(), model.disable_adapter():
            base_logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        base_logp = F.log_softmax(base_logits.float(), dim=-1)
        tuned_logp = F.log_softmax(outputs.logits.float(), dim=-1)
        kl = (base_logp.exp() * (base_logp - tuned_logp)).sum(-1)
        kl = (kl * mask).sum() / mask.sum().clamp_min(1.0)
        self.task_losses.append(float(task.detach()))
        loss = task + self.kl_coef * kl
        return (loss, outputs) if return_outputs else loss


@torch.no_grad()
def _last_token_activations(model, tokenizer, prompts: list[str], layers: list[int], batch_size: int = 32) -> dict:
    """{layer: (n, d) float64} residual activations at the final token of each chat-formatted prompt
    (the positions ``extract_refusal_basis(positions="last")`` reads)."""
    from ..integration.model_utils import (
        find_decoder_layers,
        format_prompts,
        has_chat_template,
        input_device,
        layer_hidden,
        right_padded_batch,
    )

    modules = find_decoder_layers(model)
    texts = format_prompts(tokenizer, list(prompts))
    special = not has_chat_template(tokenizer)
    pad_id = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
    device = input_device(model)
    rows: dict[int, list] = {i: [] for i in layers}
    state = {}

    def hook_for(layer):
        def hook(module, args, output):
            hidden = layer_hidden(output)
            index = torch.arange(hidden.shape[0], device=hidden.device)
            rows[layer].append(hidden[index, state["lengths"] - 1].to(torch.float64).cpu())

        return hook

    handles = [modules[i].register_forward_hook(hook_for(i)) for i in layers]
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(texts), batch_size):
            ids = [tokenizer(t, add_special_tokens=special)["input_ids"] for t in texts[start : start + batch_size]]
            input_ids, attention_mask = right_padded_batch(ids, pad_id)
            state["lengths"] = torch.as_tensor([len(x) for x in ids], device=device)
            model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {i: torch.cat(rows[i]) for i in layers}


def _pooled_spread(harmful: torch.Tensor, harmless: torch.Tensor, basis: torch.Tensor) -> float:
    """The basis' coord_spread as ``extract_refusal_basis`` defines it: sqrt(mean over columns of the
    pooled within-set variance of the coordinates)."""
    b = basis.to(torch.float64)
    ch, cl = harmful @ b, harmless @ b
    within = ((ch - ch.mean(0)) ** 2).sum(0) + ((cl - cl.mean(0)) ** 2).sum(0)
    dof = max(1, harmful.shape[0] + harmless.shape[0] - 2)
    return float((within.mean() / dof).sqrt())


def random_basis(refusal_basis, harmful_acts: dict, harmless_acts: dict, *, seed: int):
    """A ``RefusalBasis`` with the same layers and (d, k) as ``refusal_basis`` whose columns are a
    random orthonormal basis (QR of a seeded Gaussian matrix, one draw per layer), its
    ``coord_spread`` measured on the given extraction activations like the refusal basis' own."""
    from ..integration.basis import RefusalBasis

    bases, spread = {}, {}
    for layer in refusal_basis.layers:
        d, k = refusal_basis[layer].shape
        generator = torch.Generator().manual_seed(1_000_003 * (seed + 1) + layer)
        q, r = torch.linalg.qr(torch.randn(d, k, generator=generator, dtype=torch.float64))
        q = q * torch.sign(torch.diagonal(r))[None, :]
        bases[layer] = q.to(torch.float32)
        spread[layer] = _pooled_spread(harmful_acts[layer], harmless_acts[layer], q)
    metadata = {
        "model_name": refusal_basis.metadata.get("model_name"),
        "method": "random",
        "positions": refusal_basis.metadata.get("positions"),
        "coord_spread": spread,
        "random_seed": seed,
    }
    return RefusalBasis(bases, metadata)


class Bases:
    """The bases a subject's guarded methods need, extracted on first use: the k-direction cone
    (svd), the k = 1 direction (difference of means) and the random draws."""

    def __init__(self, subject, cfg):
        self.subject, self.cfg = subject, cfg
        self._cone = self._direction = None
        self._acts = None
        self._random: dict[int, object] = {}

    def _extract(self, k: int, method: str):
        from ..integration.basis import extract_refusal_basis

        s = self.subject
        return extract_refusal_basis(
            s.model,
            s.tokenizer,
            s.extraction_harmful,
            s.extraction_harmless,
            k=k,
            method=method,
            layers=s.layers,
            positions=self.cfg.basis_positions,
            show_progress=False,
        )

    @property
    def direction(self):
        if self._direction is None:
            self._direction = self._extract(1, "dim")
        return self._direction

    @property
    def cone(self):
        if self._cone is None:
            self._cone = self.direction if self.cfg.k == 1 else self._extract(self.cfg.k, "svd")
        return self._cone

    def random(self, seed: int):
        if seed not in self._random:
            if self.cfg.basis_positions != "last":
                raise ValueError(
                    "the random-subspace control measures its spread at the last token; use basis_positions='last'"
                )
            if self._acts is None:
                s = self.subject
                self._acts = (
                    _last_token_activations(s.model, s.tokenizer, s.extraction_harmful, s.layers),
                    _last_token_activations(s.model, s.tokenizer, s.extraction_harmless, s.layers),
                )
            self._random[seed] = random_basis(self.cone, *self._acts, seed=seed)
        return self._random[seed]

    def for_method(self, method: str, seed: int):
        return {"procon": lambda: self.direction, "refusalguard": lambda: self.cone}.get(
            method, lambda: self.random(seed)
        )()


def finetune(subject, conversations, cfg, *, method: str, strength, steps: int, seed: int, bases: Bases):
    """LoRA-fine-tune a copy of ``subject.model`` on ``conversations`` for ``steps`` optimizer steps
    with ``method`` at ``strength``; returns (tuned model in eval mode, info)."""
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model

    from ..integration.hooks import RefusalGuard
    from ..training.data_utils import tokenize_dataset
    from ..training.trainer import RefusalGuardTrainer
    from .organism.model import ConversationCollator, TqdmCallback, cpu_training_args

    tokenizer = subject.tokenizer
    torch.manual_seed(seed)  # the LoRA initialisation
    with warnings.catch_warnings():
        # peft 0.21 reads a transformers attribute deprecated in 5.x; nothing the demo user can act on.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = get_peft_model(
            copy.deepcopy(subject.model),
            LoraConfig(
                r=cfg.lora_r,
                lora_alpha=cfg.lora_alpha,
                lora_dropout=0.0,
                target_modules="all-linear",
                task_type="CAUSAL_LM",
            ),
        )
    rows = Dataset.from_list([{"prompt": c.prompt, "response": c.response} for c in conversations])
    dataset = tokenize_dataset(rows, tokenizer, prompt_field="prompt", response_field="response", show_progress=False)
    learning_rate = cfg.learning_rate * (strength if method == "low-lr" else 1.0)
    scratch = tempfile.mkdtemp(prefix="refusalguard_demo_ft_")
    progress = TqdmCallback("fine-tuning", enabled=False)
    collator = ConversationCollator(tokenizer.pad_token_id)
    guard = None
    try:
        args = cpu_training_args(
            scratch,
            max_steps=steps,
            batch_size=cfg.batch_size,
            learning_rate=learning_rate,
            seed=seed,
            bf16=subject.bf16,
        )
        common = dict(model=model, args=args, train_dataset=dataset, data_collator=collator)
        if method in GUARD_METHODS:
            guard = RefusalGuard(
                model,
                bases.for_method(method, seed),
                positions=cfg.guard_positions,
                drift_coef=strength,
                gram_coef=0.0 if method == "procon" else cfg.gram_ratio * strength,
                coef_units="spread",
            )
            warmup = cfg.procon_warmup_fraction if method == "procon" else cfg.warmup_fraction
            trainer = RefusalGuardTrainer(
                **common,
                processing_class=tokenizer,
                guard=guard,
                warmup_steps=round(warmup * steps),
                warmup_multiplier=cfg.warmup_multiplier,
                save_basis=False,
            )
        elif method == "kl":
            trainer = KLTrainer(**common, kl_coef=strength)
        else:
            trainer = Trainer(**common)
        progress.install(trainer)
        trainer.train()
    finally:
        if guard is not None:
            guard.remove()
        shutil.rmtree(scratch, ignore_errors=True)
    model.eval()
    if method == "kl":
        losses = trainer.task_losses
    else:
        key = "task_loss" if method in GUARD_METHODS else "loss"
        losses = [e[key] for e in progress.logs if key in e]
    # The task loss over the last quarter of the steps: how well the fine-tuning data was fitted in the end.
    tail = losses[-max(1, len(losses) // 4) :]
    info = {
        "steps": steps,
        "examples": len(dataset),
        "learning_rate": learning_rate,
        "final_loss": sum(tail) / len(tail) if tail else None,
    }
    return model, info
