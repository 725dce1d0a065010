"""The RefusalGuard penalty inside any ``transformers.Trainer``: ``RefusalGuardMixin``, and
``RefusalGuardTrainer`` (the mixin on the plain ``Trainer``).

    guard = RefusalGuard(model, basis, positions="response")
    trainer = RefusalGuardTrainer(model=model, args=args, guard=guard, train_dataset=tokenized,
                                  processing_class=tokenizer, warmup_steps=100, warmup_multiplier=10.0)
    trainer.train()

Any other Trainer subclass (TRL's ``SFTTrainer``, a trainer of your own) gets the same by
putting the mixin first:

    class GuardedSFT(RefusalGuardMixin, SFTTrainer):
        pass

    trainer = GuardedSFT(model=model, args=SFTConfig(..., assistant_only_loss=True),
                         train_dataset=chats, processing_class=tokenizer, guard=guard)

Each training micro-batch (``compute_loss``): ``guard.weights(**batch)`` picks the tokens, the anchors come
from a frozen forward (``anchors="online"``) or from the batch (``anchors="cached"``, see
``add_cached_anchors``), the guard is armed, the model runs once, and the loss is

    task_loss + warmup_scale(step) * guard.penalty()

Everything else (DDP/FSDP/DeepSpeed, mixed precision, gradient accumulation, gradient
checkpointing, checkpoints, logging) is the Trainer's own.  Logged with the Trainer's
``loss`` at each logging step: ``task_loss``, ``guard_penalty`` (unscaled),
``guard_scale`` and ``guard_drift/layer_{i}`` (each layer's penalty term), averaged over
the steps since the last log and across processes.  ``save_model`` (and so every
checkpoint) writes the basis beside the adapter as ``refusal_basis.safetensors``.

Warm-up (ProCon-style: hold the geometry hardest while the adapter moves fastest): the
penalty is scaled by ``warmup_multiplier`` at step 0, decaying to 1 at ``warmup_steps``
("linear": straight line; "cosine": half cosine, flat at both ends) and 1 afterwards.
Only the scale of the penalty changes, never ``drift_coef``/``gram_coef``.
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor
from transformers import Trainer

from ..integration.anchors import (
    ANCHOR_COLUMN,
    AnchorCollator,
    anchor_column_names,
    check_cached_anchors,
    trainable_anchor_weights,
)
from ..integration.hooks import RESPONSE_MASK_KEYS

__all__ = [
    "RefusalGuardMixin",
    "RefusalGuardTrainer",
    "warmup_scale",
    "training_autocast_dtype",
    "ANCHOR_MODES",
    "WARMUP_SCHEDULES",
    "PENALTY_FORWARDS",
]

ANCHOR_MODES = ("online", "cached")
WARMUP_SCHEDULES = ("linear", "cosine")
PENALTY_FORWARDS = ("auto", "separate", "shared")


def warmup_scale(step: int, *, warmup_steps: int, multiplier: float, schedule: str = "linear") -> float:
    """The penalty's scale at optimizer step ``step`` (0-based).

    ``multiplier`` at step 0, decaying to 1.0 at ``warmup_steps`` ("linear": 1 + (m - 1)(1 - t);
    "cosine": 1 + (m - 1)(1 + cos(pi t)) / 2; t = step / warmup_steps), then 1.0.
    ``warmup_steps=0`` turns the warm-up off.
    """
    if schedule not in WARMUP_SCHEDULES:
        raise ValueError(f"unknown warm-up schedule {schedule!r}; choose 'linear' or 'cosine'")
    if warmup_steps <= 0 or step >= warmup_steps:
        return 1.0
    t = max(step, 0) / warmup_steps
    decay = 1.0 - t if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * t))
    return 1.0 + (multiplier - 1.0) * decay


def training_autocast_dtype(args) -> torch.dtype | None:
    """The autocast dtype the Trainer's forward runs under for ``args`` (bf16/fp16 mixed
    precision), i.e. what ``add_cached_anchors(autocast_dtype=...)`` must use."""
    if args is None:
        return None
    if getattr(args, "bf16", False):
        return torch.bfloat16
    if getattr(args, "fp16", False):
        return torch.float16
    return None


def _checkpointing(args) -> tuple[bool, dict | None, str]:
    """(enabled, kwargs, name of the kwargs field) across the transformers 4 / 5 argument names."""
    if hasattr(args, "activation_checkpointing"):
        return (
            bool(args.activation_checkpointing),
            args.activation_checkpointing_kwargs,
            "activation_checkpointing_kwargs",
        )
    return (
        bool(getattr(args, "gradient_checkpointing", False)),
        getattr(args, "gradient_checkpointing_kwargs", None),
        "gradient_checkpointing_kwargs",
    )


def _is_trainer_default_collator(collator) -> bool:
    """True for the generic collators ``transformers.Trainer`` picks when given none (they pad
    neither labels nor prompt lengths); a subclass's own collator (TRL's) is kept and wrapped."""
    from transformers import DataCollatorWithPadding, default_data_collator

    return collator is default_data_collator or type(collator) is DataCollatorWithPadding


class RefusalGuardMixin:
    """Adds the RefusalGuard penalty to the task loss of any ``transformers.Trainer`` subclass.

    Put it first among the bases: ``class GuardedSFT(RefusalGuardMixin, SFTTrainer): pass``.
    Takes the base trainer's arguments, plus (keyword-only):

    Args:
        guard: a ``RefusalGuard`` attached to ``model`` (hooks on the basis' layers).
        anchors: "online" (a frozen forward each micro-batch, through the model as the
            Trainer wrapped it, adapters off; no preparation) or "cached" (``train_dataset``
            carries columns from ``add_cached_anchors``; checked here against this basis and
            model, and per row against the tokens as batches are built).
        warmup_steps: optimizer steps over which the penalty scale decays from
            ``warmup_multiplier`` to 1 (0: no warm-up).
        warmup_multiplier: the penalty scale at step 0 (e.g. 10.0: ten times stronger).
        warmup_schedule: "linear" or "cosine" (see ``warmup_scale``).
        anchor_column: column prefix of the cached anchors.
        save_basis: write the basis beside the model/adapter in ``save_model`` and checkpoints.
        penalty_forward: "auto" (default): "separate" when the frozen model's own dropout is active
            at or below the last guarded layer (``guard.dropout_active``: dropout modules, attention
            dropout; LoRA dropout alone does not count), else "shared".  "shared": the penalty comes from the training forward.
            "separate": from its own eval-mode forward (``guard.penalty_forward``: no dropout
            noise in the drift term, exactly 0 at step 0; one partial forward and backward more),
            and the task loss from the usual train-mode forward.

    Online anchors come from this very model with its adapters off, so the trainable weights must
    be adapter weights: a base weight that trains at or below the last guarded layer (no PEFT
    wrapping, full fine-tuning, unfrozen norms) would move the anchors with it and keep the
    penalty at 0; that is a ValueError naming the weights and the fixes (wrap LoRA, or cached
    anchors computed before training).

    Collator: with none given, the plain Trainer's generic default is replaced by
    ``AnchorCollator(processing_class)`` (pads labels with -100, prompt lengths, cached
    anchors); a collator you give, or the one the base trainer builds (TRL's), is wrapped by
    ``AnchorCollator`` so prompt lengths and cached anchors are still padded.  Columns the
    guard needs (``prompt_lengths``, the anchor columns, ``completion_mask`` /
    ``assistant_masks``) survive ``remove_unused_columns``.  ``positions="response"`` follows
    the tokens the loss trains on (TRL's completion / assistant masks, via the labels).
    Gradient checkpointing must be non-reentrant (the default from transformers 5; set here
    for older versions when you did not choose).  Evaluation runs the task loss only.
    """

    def __init__(
        self,
        model=None,
        args=None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        *,
        guard,
        anchors: str = "online",
        warmup_steps: int = 0,
        warmup_multiplier: float = 10.0,
        warmup_schedule: str = "linear",
        anchor_column: str = ANCHOR_COLUMN,
        save_basis: bool = True,
        penalty_forward: str = "auto",
        **kwargs,
    ) -> None:
        trainer_name = type(self).__name__
        for name in ("weights", "anchors", "arm", "disarm", "penalty", "layer_losses", "basis", "layers"):
            if not hasattr(guard, name):
                raise TypeError(
                    f"guard must be a RefusalGuard (it has no {name!r}); build one with RefusalGuard(model, basis)"
                )
        if anchors not in ANCHOR_MODES:
            raise ValueError(f"unknown anchors mode {anchors!r}; choose 'online' or 'cached'")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an int >= 0; got {warmup_steps!r}")
        warmup_multiplier = float(warmup_multiplier)
        if not math.isfinite(warmup_multiplier) or warmup_multiplier < 0:
            raise ValueError(f"warmup_multiplier must be a finite number >= 0; got {warmup_multiplier}")
        if warmup_schedule not in WARMUP_SCHEDULES:
            raise ValueError(f"unknown warmup_schedule {warmup_schedule!r}; choose 'linear' or 'cosine'")
        if penalty_forward not in PENALTY_FORWARDS:
            raise ValueError(
                f"unknown penalty_forward {penalty_forward!r}; choose 'auto', 'separate' (an eval-mode forward for "
                "the penalty, no dropout noise) or 'shared' (the training forward)"
            )
        if not isinstance(model, torch.nn.Module):
            raise ValueError(
                f"{trainer_name} needs the model the guard is attached to, as a loaded torch module "
                f"(got {type(model).__name__}; model names and model_init are not supported): load the model, "
                "build RefusalGuard(model, basis), then pass model=model"
            )

        if anchors == "online":
            _check_anchors_can_differ(model, guard, trainer_name)
        self.guard = guard
        self.anchors_mode = anchors
        self.penalty_forward = penalty_forward
        self.warmup_steps = warmup_steps
        self.warmup_multiplier = warmup_multiplier
        self.warmup_schedule = warmup_schedule
        self.anchor_column = anchor_column
        self.save_basis = save_basis

        tokenizer = processing_class if hasattr(processing_class, "pad") else None
        if data_collator is not None and not isinstance(data_collator, AnchorCollator):
            data_collator = AnchorCollator(tokenizer, base_collator=data_collator, anchor_column=anchor_column)

        if args is not None:
            enabled, ckpt_kwargs, field = _checkpointing(args)
            if enabled:
                if ckpt_kwargs is None:
                    # transformers 4 defaults to reentrant checkpointing, under which the penalty gets no gradient.
                    setattr(args, field, {"use_reentrant": False})
                elif ckpt_kwargs.get("use_reentrant", False):
                    raise ValueError(
                        "RefusalGuard needs non-reentrant gradient checkpointing: set "
                        f"{field}={{'use_reentrant': False}} in TrainingArguments"
                    )

        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            **kwargs,
        )
        # With no collator given, the plain Trainer's generic default (it pads neither labels nor
        # prompt lengths) is replaced; a base trainer's own (TRL's SFTTrainer builds one) is wrapped.
        if not isinstance(self.data_collator, AnchorCollator):
            if _is_trainer_default_collator(self.data_collator):
                if tokenizer is None:
                    raise ValueError(
                        f"{trainer_name} needs processing_class=tokenizer (to pad batches) or a data_collator"
                    )
                self.data_collator = AnchorCollator(tokenizer, anchor_column=anchor_column)
            else:
                self.data_collator = AnchorCollator(
                    tokenizer, base_collator=self.data_collator, anchor_column=anchor_column
                )
        if anchors == "cached":
            # Checked on the dataset as the base trainer prepared it (TRL tokenizes in __init__).
            if self.train_dataset is None:
                raise ValueError("anchors='cached' needs a train_dataset prepared with add_cached_anchors")
            self.data_collator.expected_fingerprint = check_cached_anchors(
                self.train_dataset,
                self.model,
                guard,
                column=anchor_column,
                autocast_dtype=training_autocast_dtype(self.args),
            )
        self._guard_sums: Tensor | None = None
        self._guard_layer_sums: dict[int, Tensor] = {}
        self._guard_steps = 0.0  # optimizer steps recorded since the last log (resuming-safe)
        self._guard_scale_now = self.coef_scale(0)

    # ------------------------------------------------------------------ schedule

    def coef_scale(self, step: int | None = None) -> float:
        """The penalty scale at optimizer step ``step`` (default: the current global step)."""
        if step is None:
            step = self.state.global_step
        return warmup_scale(
            step, warmup_steps=self.warmup_steps, multiplier=self.warmup_multiplier, schedule=self.warmup_schedule
        )

    # ------------------------------------------------------------------ data

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        extra = ["prompt_lengths", *anchor_column_names(self.guard.layers, self.anchor_column).values()]
        self._signature_columns += [name for name in extra if name not in self._signature_columns]

    def _prepare_inputs(self, inputs):
        # Anchors bypass the Trainer's device move: under DeepSpeed it casts floating inputs to
        # the model dtype, and bf16 anchors would make the step-0 penalty non-zero.
        cached = inputs.pop(ANCHOR_COLUMN, None) if isinstance(inputs, dict) else None
        inputs = super()._prepare_inputs(inputs)
        if cached is not None:
            inputs[ANCHOR_COLUMN] = {
                int(layer): tensor.to(self.args.device, dtype=torch.float32, non_blocking=True)
                for layer, tensor in cached.items()
            }
        return inputs

    # ------------------------------------------------------------------ loss

    def _task_loss_scaled_for_ga(self, num_items_in_batch) -> bool:
        flag = getattr(self, "loss_is_scaled_for_ga", None)
        if flag is not None:
            return bool(flag)
        return bool(
            (getattr(self, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None)
            or getattr(self, "compute_loss_func", None) is not None
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        # transformers < 4.46 has no num_items_in_batch.
        loss_kwargs = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
        # Keys the guard reads and the model does not take.
        guard_only = {key: inputs.pop(key) for key in ("prompt_lengths", *RESPONSE_MASK_KEYS) if key in inputs}
        cached = inputs.pop(ANCHOR_COLUMN, None)
        if not model.training:
            # Evaluation / prediction: the task loss as the Trainer reports it.
            return super().compute_loss(model, inputs, return_outputs=return_outputs, **loss_kwargs)

        guard_batch = {**inputs, **{key: value for key, value in guard_only.items() if value is not None}}
        weight = self.guard.weights(**guard_batch)
        if self.anchors_mode == "cached":
            if cached is None:
                raise ValueError(
                    "anchors='cached' but this batch has no cached anchors: prepare the dataset with "
                    "add_cached_anchors and keep the default AnchorCollator"
                )
            anchors = {int(layer): tensor for layer, tensor in cached.items()}
        else:
            # Through the model the Trainer runs (FSDP / DeepSpeed wrapped, PEFT added by the trainer),
            # adapters off: a sharded model's forward gathers its parameters.
            frozen_inputs = {key: value for key, value in inputs.items() if key != "labels"}
            anchors = self.guard.anchors(model=model, **frozen_inputs)
        self.guard.arm(anchors, weight)
        separate = self._separate_penalty_forward(model)
        if separate:
            # Dropout would put noise into the guarded hidden states that the eval-mode anchors do not have:
            # the penalty comes from an eval-mode forward of its own, the task loss from the usual one.
            frozen_inputs = {key: value for key, value in inputs.items() if key != "labels"}
            penalty = self.guard.penalty_forward(model=model, **frozen_inputs)
            self.guard.disarm()
        # The base trainer's own loss (TRL's fused LM head, label smoothing, ...).  Ask for the outputs
        # only when our caller does: some trainers run an extra forward for them.
        result = super().compute_loss(model, inputs, return_outputs=return_outputs, **loss_kwargs)
        task_loss, outputs = result if return_outputs else (result, None)
        if not separate:
            penalty = self.guard.penalty()
        scale = self.coef_scale()
        accumulation = (
            getattr(self, "current_gradient_accumulation_steps", None) or self.args.gradient_accumulation_steps
        )
        # The Trainer divides the returned loss by the accumulation steps unless the task loss is
        # already normalised over the whole accumulated batch; the penalty is a per-micro-batch mean.
        scaled = self._task_loss_scaled_for_ga(num_items_in_batch)
        per_step = 1.0 / accumulation if scaled else 1.0
        loss = task_loss + (scale * per_step) * penalty.to(task_loss.device)
        self._record(task_loss, penalty, scale, scaled, accumulation)
        return (loss, outputs) if return_outputs else loss

    def _separate_penalty_forward(self, model) -> bool:
        if self.penalty_forward != "auto":
            return self.penalty_forward == "separate"
        cache = self.__dict__.setdefault("_dropout_cache", {})
        if id(model) not in cache:  # the module tree does not change during training
            cache[id(model)] = self.guard.dropout_active(model)
        return cache[id(model)]

    def training_step(self, model, inputs, *args, **kwargs):
        # The guard stays armed through backward: non-reentrant checkpointing re-runs the hooked
        # layers there.  Disarm afterwards so evaluation and generation see the plain model.
        try:
            return super().training_step(model, inputs, *args, **kwargs)
        finally:
            self.guard.disarm()

    # ------------------------------------------------------------------ logging

    def _record(self, task_loss: Tensor, penalty: Tensor, scale: float, scaled: bool, accumulation: int) -> None:
        # Same convention as the Trainer's ``loss``: per micro-batch the value it contributes to
        # the optimizer step, summed, divided by the number of steps when logged.
        task = task_loss.detach().float() / (1 if scaled else accumulation)
        values = torch.stack([task, penalty.detach().float().to(task.device) / accumulation])
        self._guard_sums = values if self._guard_sums is None else self._guard_sums + values
        # Device tensors only: a read-back here would stall the host every micro-batch; log() reads them.
        layers, layer_values = self.guard.layer_loss_values()
        for layer, value in zip(layers, (layer_values.to(task.device) / accumulation).unbind()):
            previous = self._guard_layer_sums.get(layer)
            self._guard_layer_sums[layer] = value if previous is None else previous + value
        self._guard_steps += 1.0 / accumulation
        self._guard_scale_now = scale

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        self.guard.check_pending()  # deferred value checks: raised here, where the log reads values back anyway
        steps = round(self._guard_steps)
        if "loss" in logs and self._guard_sums is not None and steps > 0:
            layers = sorted(self._guard_layer_sums)
            values = torch.cat(
                [
                    self._guard_sums,
                    torch.stack([self._guard_layer_sums[layer].to(self._guard_sums.device) for layer in layers])
                    if layers
                    else self._guard_sums.new_zeros(0),
                ]
            )
            if self.args.world_size > 1:
                values = self.accelerator.reduce(values, reduction="mean")
            values = (values / steps).tolist()
            logs["task_loss"] = values[0]
            logs["guard_penalty"] = values[1]
            logs["guard_scale"] = self._guard_scale_now
            for layer, value in zip(layers, values[2:]):
                logs[f"guard_drift/layer_{layer}"] = value
            self._guard_sums, self._guard_layer_sums, self._guard_steps = None, {}, 0.0
        super().log(logs, *args, **kwargs)

    # ------------------------------------------------------------------ saving

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The Trainer's save, then the basis beside it (``refusal_basis.safetensors``)."""
        super().save_model(output_dir, _internal_call=_internal_call)
        if self.save_basis and self.args.should_save:
            output_dir = output_dir if output_dir is not None else self.args.output_dir
            os.makedirs(output_dir, exist_ok=True)
            self.guard.basis.save(output_dir)


def _check_anchors_can_differ(model, guard, trainer_name: str) -> None:
    """Online anchors run this model with its adapters off: every trainable weight they pass through
    must be an adapter's, or the anchors move with training and the penalty is 0 at every step."""
    trainable = trainable_anchor_weights(model, guard.layers, layers_path=getattr(guard, "layers_path", None))
    if not trainable:
        return
    shown = ", ".join(trainable[:3]) + (f" (+{len(trainable) - 3} more)" if len(trainable) > 3 else "")
    raise ValueError(
        f"{trainer_name} with anchors='online' takes the anchors from this model with its adapters switched off, but "
        f"{len(trainable)} trainable weights up to the last guarded layer are not adapter weights ({shown}): the "
        "anchors would move with them and the guard would compare the model with itself (penalty 0 at every step). "
        "Fix: train an adapter and leave the base weights frozen (model = peft.get_peft_model(model, "
        "LoraConfig(task_type='CAUSAL_LM')) before RefusalGuard(model, basis)), or, to fine-tune those weights, "
        "precompute fixed anchors before training (dataset = add_cached_anchors(dataset, model, guard)) and pass "
        "anchors='cached'"
    )


class RefusalGuardTrainer(RefusalGuardMixin, Trainer):
    """A ``transformers.Trainer`` that adds the RefusalGuard penalty to the task loss.

    ``RefusalGuardMixin`` on the plain ``Trainer``: every ``Trainer`` argument, plus ``guard``,
    ``anchors``, ``warmup_steps``, ``warmup_multiplier``, ``warmup_schedule``, ``anchor_column``
    and ``save_basis`` (see ``RefusalGuardMixin``).  ``data_collator`` defaults to
    ``AnchorCollator(processing_class)``.
    """
