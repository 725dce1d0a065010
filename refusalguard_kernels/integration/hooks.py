"""RefusalGuard: forward hooks that add the refusal-subspace penalty to any HF model.

    guard = RefusalGuard(model, basis)                 # hooks on the layers the basis names
    anchors = guard.anchors(**batch)                   # frozen coordinates (no_grad, adapters off)
    guard.arm(anchors, guard.weights(**batch))
    out = model(**batch)                               # each hooked layer runs guard() from the core
    loss = out.loss + guard.penalty()                  # summed over layers (layer_reduction), in the graph

How it behaves:

* Hooks are plain ``nn.Module`` forward hooks on the decoder layers, so they work under
  DDP, FSDP, DeepSpeed and ``transformers.Trainer`` alike.  The hooked layer's output
  goes through ``refusalguard_kernels.guard`` and the hook hands back its ``hidden_out``
  (equal in value to the input), so the model's outputs are bitwise unchanged.
* Disarmed (the state after construction and after ``disarm()``), the hooks return
  None and record nothing.  Armed, the guard stays armed across forwards; each forward
  starts a fresh record (at the first hooked layer), so ``penalty()`` is always the
  latest forward's sum.  Arm with the anchors and weights of the batch you run next.
* The basis is validated once at construction and kept float32 on each layer's device;
  anchors are validated once when ``anchors()`` makes them; the hot path calls the core
  with ``validate=False`` (no host syncs).
* The penalty is computed with autocast turned off (float32 coordinates whatever the
  surrounding autocast), so anchors and penalty agree bitwise under bf16 autocast.
* Gradient checkpointing: the penalty is counted once.  With transformers >= 5 the
  checkpoint wraps ``forward`` and the hooks run outside it; where the hooks run inside a
  checkpoint (older transformers, custom models), the recomputation in backward runs the
  same computation but records nothing.  Reentrant checkpointing that runs hooks under
  no_grad is an error telling you to pass
  ``gradient_checkpointing_kwargs={"use_reentrant": False}``.
* Units (``coef_units``): with a basis that records each layer's ``coord_spread`` (every
  basis ``extract_refusal_basis`` makes), the drift term is measured in that layer's pooled
  standard deviations (divided by spread^2; the Gram term by spread^4) and the layers are
  averaged (``layer_reduction="mean"``): ``drift_coef=1`` means a penalty of 1 for guarded
  tokens that moved one standard deviation on average, whatever the model's activation
  scale or depth.  ``coef_units="raw"`` (and bases without a spread: hand-built, or saved by
  0.1, with a warning) keeps 0.1's meaning: raw coordinates, summed over layers.
* Layers: with ``layer_reduction="sum"`` the effective coefficient grows with the number of
  guarded layers (a basis on 8 layers pulls 8x as hard as one on 1); ``"mean"`` divides by
  the number of layers, making ``drift_coef``/``gram_coef`` independent of it.
* Attention sinks: ``exclude_first=1`` (default) never guards the first non-padding token of
  a row under the named ``positions``.  In pre-norm LLMs that token carries massive
  activations (SmolLM2-135M, layer 16: hidden norm 25,040 against a median of 187, cone
  coordinate 688 against 4.6) and would otherwise make up most of the penalty's gradient.
  The first ``arm`` warns when a guarded token's frozen coordinates are still over
  ``OUTLIER_RATIO`` times the median (another sink).
* Dropout: anchors come from an eval-mode forward.  When the frozen model's own dropout is
  active up to the last guarded layer (dropout modules with p > 0 in train mode, attention
  dropout; not LoRA dropout, see ``dropout_active``), ``penalty_forward`` computes the penalty
  on a separate eval-mode forward (adapters on, stopped after the last guarded layer), so it
  sees no dropout noise and is exactly 0 at step 0; the trainer does this by itself.
* Anchors are always the frozen weights': every PEFT adapter layer (LoRA, DoRA, IA3, ...)
  anywhere in the guarded model's tree is switched off for the anchor pass, whatever
  level the guard is attached to (PeftModel, ``peft_model.base_model``,
  ``get_base_model()``); a merged adapter is an error (``AdapterStateError``).
* Normalisation: each forward's penalty is normalised by that forward's total weight W
  (per layer).  Under DDP it is per rank, like the task loss, so equal token counts per
  rank reproduce the single-process gradient.  For gradient accumulation, the drift term
  of k micro-batches each scaled by W_i / W_total sums to the large-batch drift (scale by
  1/k when the micro-batches carry equal weight, as with equal token counts).  The Gram
  term is a per-forward batch statistic (like batch norm) and does not decompose.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import re
import warnings

import torch
from torch import Tensor, nn

from ..backends import BACKENDS
from ..functional import guard as guard_op
from ..functional import project
from ..validation import check_values
from .basis import RefusalBasis
from .model_utils import (
    _autocast_off,
    _StopForward,
    adapter_layers,
    find_decoder_layers_path,
    frozen_weights,
    layer_hidden,
    replace_layer_hidden,
    unwrap_model,
)

__all__ = ["RefusalGuard", "GUARD_BATCH_KEYS", "LAYER_REDUCTIONS", "COEF_UNITS", "OUTLIER_RATIO", "parse_positions"]

#: batch keys the guard/trainer read that the model does not take; ``model_inputs`` drops them.
GUARD_BATCH_KEYS = ("prompt_lengths", "refusalguard_anchors", "completion_mask", "assistant_masks")
#: per-token response masks (TRL's completion-only / assistant-only loss), read by positions="response".
RESPONSE_MASK_KEYS = ("completion_mask", "assistant_masks")
IGNORE_INDEX = -100
LAYER_REDUCTIONS = ("sum", "mean")
#: how drift_coef / gram_coef are read: "spread" (per layer, in the basis' coord_spread units,
#: layers averaged), "raw" (0.1: raw coordinates, layers summed), "auto" (spread when the basis has it).
COEF_UNITS = ("auto", "spread", "raw")
#: the first arm() warns when a guarded token's frozen coordinates exceed this multiple of the median.
OUTLIER_RATIO = 25.0

_NAMED_POSITIONS = ("all", "prompt", "response")
_REFT_RE = re.compile(r"^(?:f(\d+)\+l(\d+)|f(\d+)|l(\d+))$")


def parse_positions(positions) -> str | tuple[int, int] | Tensor:
    """Check a ``positions`` argument: "all", "prompt", "response", "fN+lM" (also "fN", "lM"),
    or a per-token weight tensor [batch, seq].  Returns the name, (N, M), or the float32 tensor."""
    if isinstance(positions, Tensor):
        if positions.dim() != 2 or positions.is_complex():
            raise ValueError(
                f"a positions tensor must be per-token weights of shape [batch, seq]; got {tuple(positions.shape)}"
            )
        weight = positions.detach().to(torch.float32)
        if not torch.isfinite(weight).all() or (weight < 0).any():
            raise ValueError("a positions tensor must hold finite weights >= 0 (0 excludes a token)")
        return weight
    if not isinstance(positions, str):
        raise TypeError(f"positions must be a string or a [batch, seq] weight tensor; got {type(positions).__name__}")
    if positions in _NAMED_POSITIONS:
        return positions
    match = _REFT_RE.match(positions)
    if match:
        both_first, both_last, only_first, only_last = match.groups()
        first = int(both_first or only_first or 0)
        last = int(both_last or only_last or 0)
        if first + last > 0:
            return first, last
    raise ValueError(
        f"unknown positions {positions!r}; choose 'all', 'prompt', 'response', a ReFT-style 'fN+lM' "
        "(first N and last M prompt tokens, e.g. 'f5+l5', 'l1'), or a [batch, seq] weight tensor"
    )


def _check_coef(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number; got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0; got {value}")
    return value


def _coef_scales(basis: RefusalBasis, coef_units: str) -> tuple[str, dict[int, tuple[float, float]]]:
    """(resolved units, {layer: (drift scale, gram scale)}) for ``coef_units``."""
    if coef_units not in COEF_UNITS:
        raise ValueError(
            f"unknown coef_units {coef_units!r}; choose 'auto', 'spread' (coefficients per squared pooled standard "
            "deviation of the cone coordinates) or 'raw' (raw coordinates, 0.1's meaning)"
        )
    spreads = {layer: basis.coord_spread(layer) for layer in basis.layers}
    missing = [layer for layer, spread in spreads.items() if spread is None]
    if coef_units == "spread" and missing:
        raise ValueError(
            f"coef_units='spread' but the basis records no coord_spread for layers {missing} (saved by 0.1 or "
            "built by hand): re-extract it (extract_refusal_basis / `refusalguard extract`), or pass coef_units='raw' "
            "to use the coefficients on raw coordinates (their effect then depends on the model's activation scale)"
        )
    if coef_units == "auto":
        if missing:
            warnings.warn(
                f"this refusal basis records no coord_spread for layers {missing} (saved by 0.1 or built by hand), "
                "so drift_coef/gram_coef act on raw coordinates, summed over layers (0.1's meaning, whose scale "
                "depends on the model); re-extract the basis for model-independent coefficients, or pass "
                "coef_units='raw' to silence this",
                UserWarning,
                stacklevel=3,
            )
            coef_units = "raw"
        else:
            coef_units = "spread"
    if coef_units == "raw":
        return "raw", {layer: (1.0, 1.0) for layer in basis.layers}
    return "spread", {layer: (spread**-2, spread**-4) for layer, spread in spreads.items()}


def _in_backward() -> bool:
    # Non-reentrant checkpointing recomputes inside the backward pass (a graph task is running);
    # whatever the hooks compute then must not be recorded a second time.
    current = getattr(torch._C, "_current_graph_task_id", None)
    return current is not None and current() != -1


def _checkpointing_on(model: nn.Module) -> bool:
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):  # transformers >= 5, then older
        if hasattr(type(model), name):
            return bool(getattr(model, name))
    return bool(getattr(model, "gradient_checkpointing", False))


def _sharded(model: nn.Module) -> bool:
    """True under FSDP (1 or 2) or DeepSpeed ZeRO-3, whose forward must run to the end."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # older torch
        FSDPModule = ()
    for module in model.modules():
        if isinstance(module, FSDPModule) or "FullyShardedDataParallel" in type(module).__name__:
            return True
    return any(hasattr(param, "ds_id") for param in model.parameters())


def _module_device(module: nn.Module) -> torch.device | None:
    for tensor in module.parameters():
        return tensor.device
    return None


class RefusalGuard:
    """Forward hooks that keep a fine-tuned model's refusal geometry where the frozen model had it.

    Args:
        model: a transformers model (plain, PEFT-wrapped, or DDP-wrapped).
        basis: the ``RefusalBasis`` (its layers are the layers hooked).
        positions: which tokens ``weights(**batch)`` counts: "all" (non-padding),
            "prompt" / "response" (split by ``batch["prompt_lengths"]``, else by
            ``labels == -100``), "fN+lM" (first N and last M prompt tokens), or a fixed
            [batch, seq] weight tensor.
        drift_coef, gram_coef: coefficients of the drift and Gram terms (see ``reference.py``),
            in ``coef_units``.
        backend: core backend ("auto", "torch", "triton", "cuda").
        coef_units: "auto" (default): "spread" when every layer of the basis records its
            ``coord_spread`` (bases from ``extract_refusal_basis``), else "raw" with a warning.
            "spread": layer i's kernel coefficients are ``drift_coef / spread_i**2`` and
            ``gram_coef / spread_i**4``, so the drift term is the mean squared movement in the
            extraction prompts' pooled standard deviations.  "raw": the coefficients as given
            (0.1's meaning; the scale then depends on the model's activations).
        layer_reduction: how ``penalty()`` combines the hooked layers: "sum" (the effective
            coefficient grows with the number of layers) or "mean" (sum / n_layers); default
            "mean" in spread units, "sum" in raw units (0.1's behaviour).
        exclude_first: the first N non-padding tokens of each row are never guarded under the
            named positions (attention sinks; see the module docstring); default 1, 0 guards
            them.  A weight-tensor ``positions`` is used as given.
        layers_path: dotted path to the decoder layer list, when it cannot be found.

    Raises ValueError for a basis of another hidden size, layers beyond the model, an
    unknown ``positions``, ``coef_units="spread"`` with a basis that has no spread, and a
    model whose layers cannot be found.
    """

    def __init__(
        self,
        model: nn.Module,
        basis: RefusalBasis,
        *,
        positions: str | Tensor = "all",
        drift_coef: float = 1.0,
        gram_coef: float = 0.0,
        backend: str = "auto",
        coef_units: str = "auto",
        layer_reduction: str | None = None,
        exclude_first: int = 1,
        layers_path: str | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
        if not isinstance(basis, RefusalBasis):
            raise TypeError(
                f"basis must be a RefusalBasis (extract_refusal_basis or RefusalBasis.load); got {type(basis).__name__}"
            )
        if backend not in BACKENDS + ("auto",):
            raise ValueError(f"unknown backend {backend!r}; choose one of 'auto', 'torch', 'triton', 'cuda'")
        if layer_reduction is not None and layer_reduction not in LAYER_REDUCTIONS:
            raise ValueError(
                f"unknown layer_reduction {layer_reduction!r}; choose 'sum' (penalty summed over the guarded layers) "
                "or 'mean' (divided by their number)"
            )
        if isinstance(exclude_first, bool) or not isinstance(exclude_first, int) or exclude_first < 0:
            raise ValueError(f"exclude_first must be an int >= 0 (leading tokens never guarded); got {exclude_first!r}")
        self.exclude_first = exclude_first
        self.coef_units, self._coef_scales = _coef_scales(basis, coef_units)
        if layer_reduction is None:
            layer_reduction = "mean" if self.coef_units == "spread" else "sum"
        self.layer_reduction = layer_reduction
        self._outliers_checked = False
        # Value checks that need a host sync run synchronously the first time (a misconfiguration shows at once)
        # and are deferred afterwards: flags stay on the device until check_pending() (the trainer's log step).
        self._checked_once: set[str] = set()
        self._pending: dict[str, tuple[Tensor, str]] = {}
        self.model = model
        self.basis = basis
        self.positions = parse_positions(positions)
        self.drift_coef = _check_coef("drift_coef", drift_coef)
        self.gram_coef = _check_coef("gram_coef", gram_coef)
        self.backend = backend
        basis.check_model(model, layers_path=layers_path)
        self.layers_path, layer_modules = find_decoder_layers_path(model, layers_path)
        for layer, layer_basis in basis.bases.items():
            try:
                with _autocast_off():
                    check_values(layer_basis)
            except ValueError as exc:
                raise ValueError(f"basis layer {layer}: {exc}") from None
        self._bare = unwrap_model(model)
        self._modules = {layer: layer_modules[layer] for layer in basis.layers}
        self._bases: dict[int, Tensor] = {}
        for layer, module in self._modules.items():
            device = _module_device(module) or basis.bases[layer].device
            self._bases[layer] = basis.bases[layer].to(device=device, dtype=torch.float32).contiguous()
        self._first_layer, self._last_layer = basis.layers[0], basis.layers[-1]
        self._stop_early = False
        self._sharded_cache: dict[int, bool] = {}
        self._mode: str | None = None  # None (disarmed), "armed", "capture"
        self._anchors: dict[int, Tensor] = {}
        self._weight: Tensor | None = None
        self._losses: dict[int, Tensor] = {}
        self._captured: dict[int, Tensor] = {}
        self._handles = [
            module.register_forward_hook(self._make_hook(layer)) for layer, module in self._modules.items()
        ]

    # ------------------------------------------------------------------ info

    @property
    def layers(self) -> list[int]:
        """The hooked decoder layer indices, ascending."""
        return list(self.basis.layers)

    @property
    def k(self) -> int:
        return self.basis.k

    @property
    def armed(self) -> bool:
        return self._mode == "armed"

    def __repr__(self) -> str:
        state = "removed" if not self._handles else (self._mode or "disarmed")
        positions = self.positions if not isinstance(self.positions, Tensor) else "tensor"
        return (
            f"RefusalGuard(layers={self.layers}, k={self.k}, positions={positions!r}, drift_coef={self.drift_coef}, "
            f"gram_coef={self.gram_coef}, coef_units={self.coef_units!r}, layer_reduction={self.layer_reduction!r}, "
            f"exclude_first={self.exclude_first}, backend={self.backend!r}, {state})"
        )

    def kernel_coefs(self, layer: int) -> tuple[float, float]:
        """(drift_coef, gram_coef) as the penalty op gets them at ``layer``: the coefficients
        divided by ``coord_spread**2`` / ``**4`` in spread units, as given in raw units."""
        drift_scale, gram_scale = self._coef_scales[layer]
        return self.drift_coef * drift_scale, self.gram_coef * gram_scale

    # ------------------------------------------------------------------ batch helpers

    @staticmethod
    def model_inputs(batch: dict) -> dict:
        """``batch`` without the keys the guard reads but the model does not take."""
        return {key: value for key, value in batch.items() if key not in GUARD_BATCH_KEYS}

    def weights(self, **batch) -> Tensor:
        """Per-token weights [batch, seq] float32 for ``batch`` under this guard's ``positions``.

        "all": the attention mask (ones without one).  "prompt"/"response": split at the
        boundary from ``prompt_lengths`` (LongTensor [batch], prompt tokens counted from the
        first non-padding token; works with left or right padding) or, failing that, by a
        per-token response mask: TRL's ``completion_mask`` / ``assistant_masks`` when the
        batch has them, else ``labels != -100``.  With a mask, "response" is exactly the
        masked tokens (every assistant turn of a multi-turn chat, not the turns between) and
        "prompt" the tokens before the first of them.  "fN+lM": the first N and last M prompt
        tokens.  Under every named choice the first ``exclude_first`` non-padding tokens of a row
        get weight 0 (attention sinks).  A tensor ``positions`` is returned as is (its shape must
        match the batch).

        A boundary that cannot be honoured is an error, never a silent all-or-nothing weight: when
        no row of the batch has a prompt token by its ``prompt_lengths`` / masks / labels (e.g.
        ``labels = input_ids``, or TRL without a completion or assistant mask), "prompt",
        "response" and "fN+lM" raise ValueError naming the fixes.
        """
        shape, device = self._batch_shape(batch)
        if isinstance(self.positions, Tensor):
            if tuple(self.positions.shape) != shape:
                raise ValueError(
                    f"the positions weight tensor has shape {tuple(self.positions.shape)} but the batch is {shape}; "
                    "give a [batch, seq] weight for this batch"
                )
            return self.positions.to(device)
        mask = batch.get("attention_mask")
        mask = torch.ones(shape, device=device) if mask is None else mask.to(device=device, dtype=torch.float32)
        if tuple(mask.shape) != shape:
            raise ValueError(f"attention_mask has shape {tuple(mask.shape)} but input_ids has {shape}")
        offsets = torch.arange(shape[1], device=device)[None, :]
        if self.positions == "all":
            if not self.exclude_first:
                return mask
            start, _ = self._row_starts(mask)
            return mask * (offsets >= (start + self.exclude_first)[:, None]).to(torch.float32)
        start, prompt_len = self._prompt_bounds(batch, mask)
        self._check("boundary", ~(prompt_len > 0).any(), self._no_boundary_message(batch))
        kept = offsets >= (start + self.exclude_first)[:, None]
        start, end = start[:, None], (start + prompt_len)[:, None]
        in_prompt = (offsets >= start) & (offsets < end)
        if self.positions == "prompt":
            chosen = in_prompt
        elif self.positions == "response":
            response = None if batch.get("prompt_lengths") is not None else self._response_mask(batch, mask)
            chosen = offsets >= end if response is None else response
        else:
            first, last = self.positions
            chosen = in_prompt & ((offsets < start + first) | (offsets >= end - last))
        return (chosen & kept).to(torch.float32) * mask

    def _no_boundary_message(self, batch: dict) -> str:
        if batch.get("prompt_lengths") is not None:
            source = "its prompt_lengths are all 0"
        elif any(batch.get(key) is not None for key in RESPONSE_MASK_KEYS):
            source = "its completion/assistant mask covers every token"
        else:
            source = "its labels train on every token (no -100 outside padding, e.g. labels = input_ids)"
        return (
            f"positions={self.positions!r} needs the prompt/response boundary, but no row of this batch has a prompt "
            f"token: {source}, so the guard would weigh "
            + ("every token, the system prompt included" if self.positions == "response" else "no token at all")
            + ". Fix: tokenize prompt/response pairs so the prompt is masked (tokenize_dataset with prompt and "
            "response fields, or `refusalguard train --prompt-field/--response-field`); with TRL, a prompt/completion "
            "dataset (completion_only_loss) or a chat template with {% generation %} markers and "
            "assistant_only_loss=True; or put prompt_lengths in the batch; or use positions='all'"
        )

    @staticmethod
    def _batch_shape(batch: dict) -> tuple[tuple[int, int], torch.device]:
        for key in ("input_ids", "attention_mask"):
            value = batch.get(key)
            if isinstance(value, Tensor):
                if value.dim() != 2:
                    raise ValueError(f"{key} must be [batch, seq]; got shape {tuple(value.shape)}")
                return tuple(value.shape), value.device
        embeds = batch.get("inputs_embeds")
        if isinstance(embeds, Tensor) and embeds.dim() == 3:
            return tuple(embeds.shape[:2]), embeds.device
        raise ValueError("the batch needs input_ids (or attention_mask / inputs_embeds) to tell its [batch, seq] shape")

    @staticmethod
    def _response_mask(batch: dict, mask: Tensor) -> Tensor | None:
        """The tokens the task loss trains on, [batch, seq] bool, or None when the batch does not say."""
        for key in RESPONSE_MASK_KEYS:
            value = batch.get(key)
            if value is not None:
                value = torch.as_tensor(value, device=mask.device)
                if tuple(value.shape) != tuple(mask.shape):
                    raise ValueError(f"{key} has shape {tuple(value.shape)} but input_ids has {tuple(mask.shape)}")
                return (value != 0) & (mask > 0)
        labels = batch.get("labels")
        if labels is None:
            return None
        if tuple(labels.shape) != tuple(mask.shape):
            raise ValueError(f"labels has shape {tuple(labels.shape)} but input_ids has {tuple(mask.shape)}")
        return (labels.to(mask.device) != IGNORE_INDEX) & (mask > 0)

    @staticmethod
    def _row_starts(mask: Tensor) -> tuple[Tensor, Tensor]:
        """(first non-padding index, number of non-padding tokens) per row, LongTensors [batch]."""
        present = mask > 0
        lengths = present.sum(1)
        return torch.where(present.any(1), present.to(torch.int8).argmax(1), torch.zeros_like(lengths)), lengths

    def _prompt_bounds(self, batch: dict, mask: Tensor) -> tuple[Tensor, Tensor]:
        """(first non-padding index, number of prompt tokens) per row, LongTensors [batch]."""
        start, lengths = self._row_starts(mask)
        prompt_lengths = batch.get("prompt_lengths")
        if prompt_lengths is not None:
            prompt_lengths = torch.as_tensor(prompt_lengths, device=mask.device).long().reshape(-1)
            if prompt_lengths.shape[0] != mask.shape[0]:
                raise ValueError(f"prompt_lengths has {prompt_lengths.shape[0]} entries for a batch of {mask.shape[0]}")
            if ((prompt_lengths < 0) | (prompt_lengths > lengths)).any():
                raise ValueError(
                    "prompt_lengths must be between 0 and each row's number of non-padding tokens; "
                    f"got {prompt_lengths.tolist()} for lengths {lengths.tolist()}"
                )
            return start, prompt_lengths
        response = self._response_mask(batch, mask)
        if response is not None:
            first_response = torch.where(response.any(1), response.to(torch.int8).argmax(1), start + lengths)
            return start, first_response - start
        raise ValueError(
            f"positions={self.positions!r} needs the prompt/response boundary: put prompt_lengths (prompt tokens per "
            "row) in the batch, a completion_mask / assistant_masks (as TRL builds), or labels with -100 on the "
            "prompt tokens"
        )

    # ------------------------------------------------------------------ anchors

    def _adapters_disabled(self, model: nn.Module | None = None):
        # Every adapter layer in the guarded tree (or in the model the trainer runs, which may be
        # a sharding wrapper around it), not just a PeftModel's: a guard on peft_model.base_model or
        # get_base_model() would otherwise anchor to the adapted weights, and once the adapter
        # moves the penalty would be 0 at every step.
        return frozen_weights(self.model if model is None else model)

    def _frozen_target(self, model: nn.Module | None = None) -> nn.Module:
        # DDP's own forward would sync buffers; the replicated inner module computes the same thing.
        # FSDP / DeepSpeed wrappers stay: their forward gathers the sharded parameters.
        model = self.model if model is None else model
        while isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        return model

    def anchors(self, *, model: nn.Module | None = None, **batch) -> dict[int, Tensor]:
        """The frozen model's coordinates for ``batch``: {layer: [batch, seq, k] float32}.

        ``model``: the module to run, default the one the guard was built on.  A trainer passes
        the model it trains, as its engine wrapped it (FSDP, DeepSpeed, PEFT added by the
        trainer): a sharded model's forward gathers its parameters; an unwrapped copy could not.

        One forward under no_grad, in eval mode (dropout off; each module's mode is
        restored), with PEFT adapters disabled and LM loss skipped (labels dropped).  The
        forward stops after the last hooked layer (not under FSDP / DeepSpeed ZeRO-3,
        whose forward must run to the end; there only the last position's logits are
        computed where the model supports ``logits_to_keep``).
        The coordinates come from ``project`` on the same backend as the penalty, so on an
        unchanged model the step-0 penalty is exactly zero.  Run it under the same autocast
        as the training forward.
        """
        if not self._handles:
            raise RuntimeError("this RefusalGuard was removed; create a new one")
        previous = self._mode
        self._mode, self._captured = "capture", {}
        try:
            with self._partial_eval_forward(batch, model) as (target, inputs):
                with torch.no_grad(), self._adapters_disabled(target):
                    target(**inputs)
        finally:
            self._mode = previous
        captured, self._captured = self._captured, {}
        missing = [layer for layer in self.layers if layer not in captured]
        if missing:
            raise RuntimeError(
                f"the frozen forward did not reach layers {missing}; check layers_path={self.layers_path!r}"
            )
        bad = [~torch.isfinite(captured[layer]).all() for layer in self.layers]
        device = bad[0].device
        self._check(
            "anchors",
            torch.stack([flag.to(device) for flag in bad]).any(),
            f"the frozen model produced NaN/Inf activations at one of the guarded layers {self.layers}; check the "
            "model and inputs",
        )
        return captured

    def _check(self, key: str, bad: Tensor, message: str) -> None:
        """Raise ValueError(message) when the 0-dim bool ``bad`` is True: at once the first time for ``key`` (one
        host sync), afterwards at the next ``check_pending()`` (flags accumulate on the device, no sync)."""
        if key not in self._checked_once:
            self._checked_once.add(key)
            if bool(bad):
                raise ValueError(message)
            return
        pending = self._pending.get(key)
        self._pending[key] = (bad if pending is None else pending[0] | bad.to(pending[0].device), message)

    def check_pending(self) -> None:
        """Raise the deferred value checks that failed since the last call (one host sync for all of them):
        NaN/Inf anchors, a batch with no prompt token under positions 'prompt'/'response'/'fN+lM'.  The first
        batch is always checked at once; ``RefusalGuardTrainer`` calls this at each log step, ``layer_losses()``
        too.  Call it in your own loop where you read values back anyway."""
        if not self._pending:
            return
        pending, self._pending = self._pending, {}
        device = next(iter(pending.values()))[0].device
        flags = torch.stack([bad.to(device) for bad, _ in pending.values()]).tolist()
        for (_, message), flag in zip(pending.values(), flags):
            if flag:
                raise ValueError(message)

    # ------------------------------------------------------------------ arming

    def arm(self, anchors: dict[int, Tensor], weight: Tensor | None = None, *, validate: bool = False) -> None:
        """Turn the penalty on for the next forwards with these anchors and per-token weights.

        ``anchors``: {layer: [batch, seq, k]} for every hooked layer (``anchors()`` or a
        cached column).  ``weight``: [batch, seq] (``weights(**batch)``); None weighs every
        token 1, padding included.  ``validate=True`` also checks values (finite anchors,
        finite non-negative weights), at the cost of a host sync.
        """
        if not self._handles:
            raise RuntimeError("this RefusalGuard was removed; create a new one")
        if not isinstance(anchors, dict):
            raise TypeError(
                f"anchors must be a dict {{layer: tensor}} from guard.anchors(**batch); got {type(anchors).__name__}"
            )
        missing = [layer for layer in self.layers if layer not in anchors]
        if missing:
            raise ValueError(
                f"anchors have no entry for layers {missing} (the guard hooks {self.layers}); "
                "make them with guard.anchors(**batch) using the same basis"
            )
        lead = None
        for layer in self.layers:
            tensor = anchors[layer]
            if not isinstance(tensor, Tensor) or not tensor.is_floating_point() or tensor.dim() < 2:
                raise ValueError(f"anchors[{layer}] must be a floating-point [batch, seq, k] tensor")
            if tensor.shape[-1] != self.k:
                raise ValueError(
                    f"anchors[{layer}] has {tensor.shape[-1]} coordinates per token but the basis has k={self.k}"
                )
            if lead is None:
                lead = tuple(tensor.shape[:-1])
            elif tuple(tensor.shape[:-1]) != lead:
                raise ValueError(
                    f"anchors[{layer}] has shape {tuple(tensor.shape)}; the other layers have {lead + (self.k,)}"
                )
        if weight is not None:
            if not isinstance(weight, Tensor):
                raise TypeError(f"weight must be a tensor or None; got {type(weight).__name__}")
            if tuple(weight.shape) != lead:
                raise ValueError(f"weight has shape {tuple(weight.shape)} but the anchors are for {lead}")
        if validate:
            with _autocast_off():
                for layer in self.layers:
                    check_values(self._bases[layer], anchors[layer], weight)
        if not self._outliers_checked:
            self._outliers_checked = True  # once per guard: it costs a host sync
            self._warn_outliers(anchors, weight)
        self._anchors = {layer: anchors[layer].detach() for layer in self.layers}
        self._weight = None if weight is None else weight.detach()
        self._losses = {}
        self._mode = "armed"

    def _warn_outliers(self, anchors: dict[int, Tensor], weight: Tensor | None) -> None:
        """Warn when a guarded token's frozen coordinates dwarf the others' (an attention sink the
        position rule did not exclude): such a token would make up most of the penalty.  One host
        read-back for all layers (more only to word a warning)."""
        stats = []
        for layer in self.layers:
            with _autocast_off():
                norms = anchors[layer].detach().float().norm(dim=-1)
            guarded = torch.ones_like(norms, dtype=torch.bool) if weight is None else weight.to(norms.device) > 0
            values = norms[guarded]
            if values.numel() < 4:
                continue
            median, worst = values.median(), values.max()
            ratio = torch.where(median > 0, worst / median.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
            stats.append((layer, norms, guarded, median, worst, ratio))
        if not stats:
            return
        device = stats[0][5].device
        ratios = torch.stack([entry[5].to(device) for entry in stats]).tolist()
        for (layer, norms, guarded, median, worst, _), ratio in zip(stats, ratios):
            if ratio > OUTLIER_RATIO:
                index = int((norms * guarded).reshape(-1).argmax())
                row, position = divmod(index, norms.shape[-1])
                warnings.warn(
                    f"layer {layer}: a guarded token (row {row}, position {position}) has frozen cone coordinates of "
                    f"norm {float(worst):.3g}, {ratio:.0f}x the median guarded token's ({float(median):.3g}); a "
                    "token with massive activations (an attention sink) would dominate the penalty and its "
                    "gradient. Exclude it: RefusalGuard(..., exclude_first=N) for leading tokens, or a [batch, seq] "
                    "positions weight tensor",
                    UserWarning,
                    stacklevel=3,
                )
                return

    def dropout_active(self, model: nn.Module | None = None) -> bool:
        """True when a training forward of ``model`` (default: the guarded one) applies the frozen
        model's own dropout at or below the last guarded layer: a dropout module with p > 0 in train
        mode (embedding, residual, attention dropout modules) or an attention module with
        ``attention_dropout > 0`` in train mode.  Then the guarded hidden states carry dropout noise
        that the eval-mode anchors do not (the step-0 penalty is not 0), and the penalty belongs on a
        separate eval-mode forward (``penalty_forward``).  Dropout inside adapter layers (LoRA
        dropout) does not count: the adapter adds exactly 0 at step 0."""
        target = self._frozen_target(model)
        _, layer_modules = find_decoder_layers_path(target, self.layers_path)
        skip = {id(m) for index, layer in enumerate(layer_modules) if index > self._last_layer for m in layer.modules()}
        # LoRA dropout is left to the shared forward: the adapter is 0 at step 0 (exact zero penalty anyway), and its
        # noise is the kind the task loss sees too, not worth a second forward (measured in docs/guard_scale.md).
        for _, adapter in adapter_layers(target):
            base = adapter.get_base_layer() if hasattr(adapter, "get_base_layer") else None
            kept = set() if base is None else {id(m) for m in base.modules()}
            skip.update(id(m) for m in adapter.modules() if id(m) not in kept)
        for module in target.modules():
            if id(module) in skip or not module.training:
                continue
            if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
                return True
            rate = getattr(module, "attention_dropout", None)  # Llama-style attention: functional dropout
            if isinstance(rate, float) and rate > 0:
                return True
        return False

    def penalty_forward(self, *, model: nn.Module | None = None, **batch) -> Tensor:
        """The armed penalty from a forward of ``model`` (default: the guarded one) in eval mode:
        dropout off, adapters as they are, autograd on, stopped after the last guarded layer
        (not under FSDP / ZeRO-3).  Each module's mode is restored afterwards.

        Use it when ``dropout_active()``: run this, ``disarm()``, then the task forward as usual,
        and add both losses.  The penalty then measures how the trained model's deterministic
        function moved, not dropout noise, and is exactly 0 at step 0.  Costs one partial
        forward and its backward.
        """
        if self._mode != "armed":
            raise RuntimeError("penalty_forward needs an armed guard: call guard.arm(anchors, weight) first")
        with self._partial_eval_forward(batch, model) as (target, inputs):
            target(**inputs)
        return self.penalty()

    @contextlib.contextmanager
    def _partial_eval_forward(self, batch: dict, model: nn.Module | None):
        """(target, inputs) for one eval-mode forward of ``model`` (default: the guarded one) that stops after
        the last guarded layer (runs to the end when sharded: FSDP / ZeRO-3): labels dropped, cache and logits
        trimmed, each module's mode restored afterwards.  The anchor pass and ``penalty_forward`` share it."""
        inputs = self.model_inputs(batch)
        inputs.pop("labels", None)
        target = self._frozen_target(model)
        self._add_forward_options(target, inputs)
        if id(target) not in self._sharded_cache:
            self._sharded_cache[id(target)] = _sharded(target)
        modes = {module: module.training for module in target.modules()}
        self._stop_early = not self._sharded_cache[id(target)]
        try:
            target.eval()
            yield target, inputs
        except _StopForward:
            pass
        finally:
            self._stop_early = False
            for module, training in modes.items():
                module.training = training

    @staticmethod
    def _add_forward_options(target: nn.Module, inputs: dict) -> None:
        try:
            parameters = inspect.signature(unwrap_model(target).forward).parameters
        except (TypeError, ValueError):
            parameters = {}
        if "logits_to_keep" in parameters and "logits_to_keep" not in inputs:
            inputs["logits_to_keep"] = 1
        if "use_cache" in parameters and "use_cache" not in inputs:
            inputs["use_cache"] = False

    def disarm(self) -> None:
        """Hooks back to identity; ``penalty()`` still returns the last armed forward's value."""
        self._mode = None
        self._anchors, self._weight = {}, None

    # ------------------------------------------------------------------ results

    def penalty(self) -> Tensor:
        """The latest armed forward's losses combined over the hooked layers (0-dim float32, in the
        graph): their sum, or with ``layer_reduction="mean"`` the sum divided by the number of layers."""
        if not self._losses:
            raise RuntimeError(
                "no penalty recorded: call guard.arm(anchors, weight), then run model(**batch), then guard.penalty()"
            )
        missing = [layer for layer in self.layers if layer not in self._losses]
        if missing:
            raise RuntimeError(f"the last forward did not reach layers {missing}; the penalty would be incomplete")
        losses = [self._losses[layer] for layer in self.layers]
        total = losses[0]
        for loss in losses[1:]:
            total = total + loss.to(total.device)
        if self.layer_reduction == "mean":
            total = total / len(losses)
        return total

    def layer_losses(self) -> dict[int, float]:
        """{layer: loss} of the latest armed forward as Python floats (for logging; syncs with the
        device -- ``layer_loss_values`` is the form that does not -- and raises any failed deferred
        check, see ``check_pending``)."""
        self.check_pending()
        layers, values = self.layer_loss_values()
        return dict(zip(layers, values.tolist()))

    def layer_loss_values(self) -> tuple[list[int], Tensor]:
        """(layers, losses) of the latest armed forward: the per-layer losses, detached, as one float32
        tensor on the first layer's device in ``layers`` order.  No device -> host copy, so a trainer
        can accumulate it every micro-batch and read it back only when it logs."""
        layers = sorted(self._losses)
        if not layers:
            return [], torch.zeros(0)
        device = self._losses[layers[0]].device
        return layers, torch.stack([self._losses[layer].detach().to(device, torch.float32) for layer in layers])

    # ------------------------------------------------------------------ hooks

    def _basis_on(self, layer: int, device: torch.device) -> Tensor:
        basis = self._bases[layer]
        if basis.device != device:  # the model moved after the guard was made
            basis = self._bases[layer] = basis.to(device)
        return basis

    def _make_hook(self, layer: int):
        def hook(module: nn.Module, args, output):
            mode = self._mode
            if mode is None:
                return None
            hidden = layer_hidden(output)
            basis = self._basis_on(layer, hidden.device)
            recomputing = _in_backward()
            autocast_off = (
                torch.autocast(hidden.device.type, enabled=False)
                if torch.is_autocast_enabled(hidden.device.type)
                else contextlib.nullcontext()
            )
            if mode == "capture":
                if not recomputing:
                    with autocast_off:
                        self._captured[layer] = project(hidden, basis, backend=self.backend, validate=False).detach()
                    if self._stop_early and layer == self._last_layer:
                        raise _StopForward  # nothing above this layer is needed
                return None
            if (
                not torch.is_grad_enabled()
                and module.training
                and (getattr(module, "gradient_checkpointing", False) or _checkpointing_on(self._bare))
            ):
                raise RuntimeError(
                    "RefusalGuard is armed in a training forward that runs without autograd, as reentrant gradient "
                    "checkpointing does inside its checkpoints: the penalty would get no gradient. "
                    "Enable checkpointing "
                    "with gradient_checkpointing_kwargs={'use_reentrant': False} (TrainingArguments: "
                    "gradient_checkpointing_kwargs={'use_reentrant': False}), or disarm() for no_grad forwards."
                )
            anchors = self._anchors[layer]
            expected = tuple(hidden.shape[:-1]) + (self.k,)
            if tuple(anchors.shape) != expected:
                raise ValueError(
                    f"layer {layer}: the armed anchors have shape {tuple(anchors.shape)} but this forward needs "
                    f"{expected}; arm with guard.anchors(**batch) for the batch you run "
                    "(and disarm() before generate())"
                )
            weight = self._weight
            if weight is not None:
                weight = weight.to(hidden.device)
            drift_coef, gram_coef = self.kernel_coefs(layer)
            with autocast_off:
                hidden_out, loss = guard_op(
                    hidden,
                    basis,
                    anchors.to(hidden.device),
                    weight,
                    drift_coef=drift_coef,
                    gram_coef=gram_coef,
                    backend=self.backend,
                    validate=False,
                )
            if not recomputing:
                if layer == self._first_layer:
                    self._losses = {}
                self._losses[layer] = loss
                if self._stop_early and layer == self._last_layer:
                    raise _StopForward  # penalty_forward: nothing above this layer is needed
            if hidden_out is hidden:
                return None
            return replace_layer_hidden(output, hidden_out)

        return hook

    # ------------------------------------------------------------------ teardown

    def remove(self) -> None:
        """Detach every hook and drop all state; the model is as it was before the guard."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._mode = None
        self._anchors, self._weight, self._losses, self._captured = {}, None, {}, {}

    def __enter__(self) -> RefusalGuard:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
