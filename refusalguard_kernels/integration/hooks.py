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
* Layers: ``penalty()`` is the SUM of the hooked layers' losses by default, so the
  effective coefficient grows with the number of guarded layers (a basis on 8 layers
  pulls 8x as hard as one on 1).  ``layer_reduction="mean"`` divides by the number of
  layers, making ``drift_coef``/``gram_coef`` independent of how many layers are guarded.
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
    find_decoder_layers_path,
    frozen_weights,
    layer_hidden,
    replace_layer_hidden,
    unwrap_model,
)

__all__ = ["RefusalGuard", "GUARD_BATCH_KEYS", "LAYER_REDUCTIONS", "parse_positions"]

#: batch keys the guard/trainer read that the model does not take; ``model_inputs`` drops them.
GUARD_BATCH_KEYS = ("prompt_lengths", "refusalguard_anchors", "completion_mask", "assistant_masks")
#: per-token response masks (TRL's completion-only / assistant-only loss), read by positions="response".
RESPONSE_MASK_KEYS = ("completion_mask", "assistant_masks")
IGNORE_INDEX = -100
LAYER_REDUCTIONS = ("sum", "mean")

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
        drift_coef, gram_coef: coefficients of the drift and Gram terms (see ``reference.py``).
        backend: core backend ("auto", "torch", "triton", "cuda").
        layer_reduction: how ``penalty()`` combines the hooked layers: "sum" (default; the
            effective coefficient grows with the number of layers) or "mean" (sum / n_layers).
        layers_path: dotted path to the decoder layer list, when it cannot be found.

    Raises ValueError for a basis of another hidden size, layers beyond the model, an
    unknown ``positions``, and a model whose layers cannot be found.
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
        layer_reduction: str = "sum",
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
        if layer_reduction not in LAYER_REDUCTIONS:
            raise ValueError(
                f"unknown layer_reduction {layer_reduction!r}; choose 'sum' (penalty summed over the guarded layers) "
                "or 'mean' (divided by their number)"
            )
        self.layer_reduction = layer_reduction
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
            f"gram_coef={self.gram_coef}, backend={self.backend!r}, layer_reduction={self.layer_reduction!r}, {state})"
        )

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
        tokens.  A tensor ``positions`` is returned as is (its shape must match the batch).
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
        if self.positions == "all":
            return mask
        start, prompt_len = self._prompt_bounds(batch, mask)
        offsets = torch.arange(shape[1], device=device)[None, :]
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
        return chosen.to(torch.float32) * mask

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

    def _prompt_bounds(self, batch: dict, mask: Tensor) -> tuple[Tensor, Tensor]:
        """(first non-padding index, number of prompt tokens) per row, LongTensors [batch]."""
        present = mask > 0
        lengths = present.sum(1)
        start = torch.where(present.any(1), present.to(torch.int8).argmax(1), torch.zeros_like(lengths))
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
        inputs = self.model_inputs(batch)
        inputs.pop("labels", None)
        target = self._frozen_target(model)
        try:
            parameters = inspect.signature(unwrap_model(target).forward).parameters
        except (TypeError, ValueError):
            parameters = {}
        if "logits_to_keep" in parameters and "logits_to_keep" not in inputs:
            inputs["logits_to_keep"] = 1
        if "use_cache" in parameters and "use_cache" not in inputs:
            inputs["use_cache"] = False
        if id(target) not in self._sharded_cache:
            self._sharded_cache[id(target)] = _sharded(target)
        modes = {module: module.training for module in target.modules()}
        previous = self._mode
        self._mode, self._captured = "capture", {}
        self._stop_early = not self._sharded_cache[id(target)]
        try:
            with torch.no_grad(), self._adapters_disabled(target):
                target.eval()
                try:
                    target(**inputs)
                except _StopForward:
                    pass
        finally:
            self._mode, self._stop_early = previous, False
            for module, training in modes.items():
                module.training = training
        captured, self._captured = self._captured, {}
        missing = [layer for layer in self.layers if layer not in captured]
        if missing:
            raise RuntimeError(
                f"the frozen forward did not reach layers {missing}; check layers_path={self.layers_path!r}"
            )
        bad = torch.stack([~torch.isfinite(captured[layer]).all() for layer in self.layers])
        if bad.any():
            layers = [layer for layer, flag in zip(self.layers, bad.tolist()) if flag]
            raise ValueError(
                f"the frozen model produced NaN/Inf activations at layers {layers}; check the model and inputs"
            )
        return captured

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
        self._anchors = {layer: anchors[layer].detach() for layer in self.layers}
        self._weight = None if weight is None else weight.detach()
        self._losses = {}
        self._mode = "armed"

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
        device -- ``layer_loss_values`` is the form that does not)."""
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
            with autocast_off:
                hidden_out, loss = guard_op(
                    hidden,
                    basis,
                    anchors.to(hidden.device),
                    weight,
                    drift_coef=self.drift_coef,
                    gram_coef=self.gram_coef,
                    backend=self.backend,
                    validate=False,
                )
            if not recomputing:
                if layer == self._first_layer:
                    self._losses = {}
                self._losses[layer] = loss
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
