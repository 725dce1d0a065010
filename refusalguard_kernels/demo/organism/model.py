"""The model organism: a small Llama-architecture chat model trained from scratch on the corpus.

Random init from a ``LlamaConfig`` (seeded), then two supervised stages with
``transformers.Trainer`` (loss on the assistant turn only), like a real chat model's life:
*pretraining* on ``corpus.pretrain`` (it learns to answer every request, harmful-topic ones
included, with placeholder content), then *safety alignment* on ``corpus.align`` (all
weights; it learns to refuse harmful requests). The result is an ordinary ``LlamaForCausalLM`` + tokenizer pair that every other part of the
package treats like a hub model. Deterministic on one machine for a fixed seed and thread
count.
"""

from __future__ import annotations

import copy
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch

from .corpus import Conversation, OrganismCorpus, all_text
from .tokenizer import train_tokenizer

__all__ = [
    "OrganismConfig",
    "PRESETS",
    "Organism",
    "build_organism",
    "tokenize_conversations",
    "ConversationCollator",
    "TqdmCallback",
    "train_causal_lm",
    "save_organism",
    "load_organism",
]


@dataclass
class OrganismConfig:
    """Sizes of the organism and of its from-scratch training run."""

    hidden_size: int = 64
    num_layers: int = 3
    num_heads: int = 4
    intermediate_size: int = 192
    n_train: int = 2400  # pretraining conversations
    n_align: int = 800  # safety-alignment conversations
    n_eval: int = 48
    epochs: float = 5.0
    learning_rate: float = 3e-3
    align_epochs: float = 2.0
    align_learning_rate: float = 2e-3
    batch_size: int = 32
    seed: int = 0
    corpus_kwargs: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")
        for name in (
            "hidden_size",
            "num_layers",
            "num_heads",
            "intermediate_size",
            "n_train",
            "n_align",
            "n_eval",
            "batch_size",
        ):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        if not (self.epochs > 0 and self.learning_rate > 0 and self.align_epochs > 0 and self.align_learning_rate > 0):
            raise ValueError("epochs, learning_rate, align_epochs and align_learning_rate must be > 0")

    def corpus(self):
        """The corpus this organism is trained on (a pure function of the config)."""
        from .corpus import build_corpus

        return build_corpus(
            seed=self.seed, n_train=self.n_train, n_align=self.n_align, n_eval=self.n_eval, **self.corpus_kwargs
        )


PRESETS: dict[str, OrganismConfig] = {
    "full": OrganismConfig(),
    "quick": OrganismConfig(
        hidden_size=64,
        num_layers=3,
        num_heads=4,
        intermediate_size=128,
        n_train=1600,
        n_align=600,
        n_eval=32,
        epochs=5.0,
        learning_rate=4e-3,
        batch_size=32,
    ),
}


@dataclass
class Organism:
    model: torch.nn.Module
    tokenizer: object
    corpus: OrganismCorpus
    config: OrganismConfig
    train_loss: float | None = None  # the alignment stage's (the last stage)
    pretrain_loss: float | None = None


def tokenize_conversations(tokenizer, conversations: Sequence[Conversation]) -> list[dict]:
    """Chat-formatted token ids with ``labels`` (-100 on the prompt) and ``prompt_lengths``."""
    rows = []
    for conv in conversations:
        prompt_ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": conv.prompt}], tokenize=False, add_generation_prompt=True
        )
        prompt_ids = tokenizer(prompt_ids, add_special_tokens=False)["input_ids"]
        full = tokenizer.apply_chat_template(
            [{"role": "user", "content": conv.prompt}, {"role": "assistant", "content": conv.response}], tokenize=False
        )
        input_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
        if input_ids[: len(prompt_ids)] != prompt_ids:
            raise RuntimeError(
                "the chat template's prompt is not a prefix of the full conversation; "
                "the organism's loss mask would be wrong"
            )
        labels = [-100] * len(prompt_ids) + input_ids[len(prompt_ids) :]
        rows.append(
            {
                "input_ids": input_ids,
                "attention_mask": [1] * len(input_ids),
                "labels": labels,
                "prompt_lengths": len(prompt_ids),
            }
        )
    return rows


class ConversationCollator:
    """Right-pads ``input_ids``/``attention_mask``/``labels`` of tokenized conversations.

    ``prompt_lengths`` is kept only when ``keep_prompt_lengths`` (the guard reads it; a bare
    model would reject it).
    """

    def __init__(self, pad_token_id: int, *, keep_prompt_lengths: bool = False):
        self.pad_token_id = int(pad_token_id)
        self.keep_prompt_lengths = keep_prompt_lengths

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            input_ids[i, :n] = torch.as_tensor(r["input_ids"])
            attention[i, :n] = 1
            labels[i, :n] = torch.as_tensor(r["labels"])
        batch = {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
        if self.keep_prompt_lengths:
            batch["prompt_lengths"] = torch.as_tensor([r["prompt_lengths"] for r in rows], dtype=torch.long)
        return batch


class TqdmCallback:
    """A tqdm bar for a ``transformers.Trainer`` run (loss in the postfix) that keeps every log
    in ``logs`` instead of printing it; ``install(trainer)`` swaps it for the Trainer's printers."""

    def __init__(self, desc: str, *, enabled: bool = True):
        self.desc, self.enabled = desc, enabled
        self.bar = None
        self.logs: list[dict] = []

    def install(self, trainer) -> None:
        from transformers import TrainerCallback
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        outer = self

        class _Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                from tqdm.auto import tqdm

                outer.bar = tqdm(
                    total=state.max_steps, desc=outer.desc, disable=not outer.enabled, leave=False, unit="step"
                )

            def on_step_end(self, args, state, control, **kwargs):
                outer.bar.update(1)

            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs:
                    outer.logs.append({"step": state.global_step, **logs})
                    shown = {k: f"{logs[k]:.3g}" for k in ("loss", "guard_penalty") if k in logs}
                    if shown:
                        outer.bar.set_postfix(shown, refresh=False)

            def on_train_end(self, args, state, control, **kwargs):
                outer.bar.close()

        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(_Callback())


def _llama_config(tokenizer, cfg: OrganismConfig):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=tokenizer.model_max_length,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def cpu_training_args(
    output_dir: str,
    *,
    max_steps: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    scheduler: str = "constant",
    warmup_steps: int = 0,
    weight_decay: float = 0.0,
    logging_steps: int = 1,
    bf16: bool = False,
):
    """``TrainingArguments`` for the organism's seeded CPU runs: no checkpoints, no trackers, no
    workers (so the data order depends on the seed alone), progress shown by :class:`TqdmCallback`.
    ``bf16``: bfloat16 mixed precision (CPU autocast; ~2x faster than float32 for SmolLM2 here)."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=output_dir,
        max_steps=max_steps,
        per_device_train_batch_size=batch_size,
        learning_rate=learning_rate,
        lr_scheduler_type=scheduler,
        warmup_steps=warmup_steps,
        weight_decay=weight_decay,
        seed=seed,
        data_seed=seed,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_strategy="steps",
        logging_steps=logging_steps,
        disable_tqdm=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        bf16=bf16,
    )


def train_causal_lm(
    model: torch.nn.Module,
    rows: list[dict],
    *,
    pad_token_id: int,
    epochs: float,
    learning_rate: float,
    batch_size: int,
    seed: int,
    warmup_ratio: float = 0.05,
    weight_decay: float = 0.0,
    show_progress: bool = True,
    desc: str = "training",
) -> float:
    """Supervised training with ``transformers.Trainer`` on the CPU; returns the final mean train loss."""
    from datasets import Dataset
    from transformers import Trainer

    dataset = Dataset.from_list(rows).remove_columns(["prompt_lengths"])
    steps_per_epoch = math.ceil(len(rows) / batch_size)
    max_steps = max(1, round(epochs * steps_per_epoch))
    scratch = tempfile.mkdtemp(prefix="refusalguard_organism_")
    try:
        args = cpu_training_args(
            scratch,
            max_steps=max_steps,
            batch_size=batch_size,
            learning_rate=learning_rate,
            seed=seed,
            scheduler="cosine",
            warmup_steps=max(0, round(warmup_ratio * max_steps)),
            weight_decay=weight_decay,
            logging_steps=25,
        )
        trainer = Trainer(
            model=model, args=args, train_dataset=dataset, data_collator=ConversationCollator(pad_token_id)
        )
        TqdmCallback(desc, enabled=show_progress).install(trainer)
        result = trainer.train()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    model.eval()
    return float(result.training_loss)


def build_organism(config: OrganismConfig | str = "full", *, show_progress: bool = True) -> Organism:
    """Generate the corpus, train the tokenizer, and train a Llama model from scratch on the corpus."""
    from transformers import LlamaForCausalLM

    if isinstance(config, str) and config not in PRESETS:
        raise ValueError(f"unknown organism preset {config!r}; choose one of {sorted(PRESETS)}")
    cfg = copy.deepcopy(PRESETS[config]) if isinstance(config, str) else config
    corpus = cfg.corpus()
    tokenizer = train_tokenizer(all_text())
    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(_llama_config(tokenizer, cfg))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    common = dict(pad_token_id=tokenizer.pad_token_id, batch_size=cfg.batch_size, seed=cfg.seed, weight_decay=0.01)
    pretrain_loss = train_causal_lm(
        model,
        tokenize_conversations(tokenizer, corpus.pretrain),
        epochs=cfg.epochs,
        learning_rate=cfg.learning_rate,
        show_progress=show_progress,
        desc="organism: pretraining",
        **common,
    )
    loss = train_causal_lm(
        model,
        tokenize_conversations(tokenizer, corpus.align),
        epochs=cfg.align_epochs,
        learning_rate=cfg.align_learning_rate,
        show_progress=show_progress,
        desc="organism: safety alignment",
        **common,
    )
    model.config.name_or_path = "refusalguard-organism"
    return Organism(
        model=model, tokenizer=tokenizer, corpus=corpus, config=cfg, train_loss=loss, pretrain_loss=pretrain_loss
    )


def save_organism(organism: Organism, path: str | os.PathLike) -> str:
    """Save model + tokenizer as a normal Hugging Face folder (loadable with from_pretrained).

    Written into a temporary sibling folder and moved into place, so a crash never leaves a
    half-written organism behind.
    """
    import json

    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".organism_tmp_", dir=parent)
    try:
        organism.model.save_pretrained(tmp)
        organism.tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, "organism_config.json"), "w") as f:
            json.dump(asdict(organism.config), f, indent=2)
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def load_organism(path: str | os.PathLike):
    """(model, tokenizer) from a folder written by :func:`save_organism`."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no organism folder at {path!r}; run `refusalguard demo` to build one")
    model = LlamaForCausalLM.from_pretrained(path)
    model.eval()
    return model, AutoTokenizer.from_pretrained(path)
