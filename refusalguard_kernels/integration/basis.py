"""Refusal-cone bases: extraction from a model, and the file format.

``extract_refusal_basis`` runs the frozen model over harmful and harmless prompts and
returns a ``RefusalBasis``: for each chosen decoder layer a d x k float32 orthonormal
basis of the directions that separate the two sets in that layer's residual stream.

Math, per layer, with H (n_harmful x d) and L (n_harmless x d) the activations at the
chosen positions, mu_H and mu_L their means (all in float64):

* ``method="dim"`` (k = 1): r = (mu_H - mu_L) / ||mu_H - mu_L||.
* ``method="svd"``: r first, then the top k - 1 right singular vectors of the centred
  per-prompt differences D - mean(D), D_i = H_i - mu_L (which equals H - mu_H), with r
  projected out first so the k columns are independent; the columns are then
  orthonormalised by QR (``orthonormalize_basis``).

Per-layer metadata:

* ``explained_share``: ||D B||_F^2 / ||D||_F^2, the fraction of the (uncentred)
  harmful-minus-harmless-mean variance the basis captures (the mean difference counts).
* ``separation``: (mean(H r) - mean(L r)) / pooled std of the projections on r, i.e. how
  many pooled standard deviations apart the two sets are along the first direction.
* ``coord_spread``: the typical size of one cone coordinate at this layer,
  sqrt(mean_j s_j^2) with s_j^2 the pooled within-set variance of the projections on column j
  (harmful and harmless prompts each centred on their own mean, n_H + n_L - 2 degrees of
  freedom).  ``RefusalGuard`` measures drift in these units (``coef_units="spread"``): the
  drift term is divided by spread^2 and the Gram term by spread^4, so a coefficient means the
  same on a model whose residual stream is 100x larger.  Read at the extraction positions
  (the last prompt token or the post-instruction tokens), never at the first token, whose
  attention-sink activations can be ~100x larger than the rest.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ..validation import check_values, orthonormalize_basis
from .model_utils import (
    _autocast_off,
    _render_chat,
    _StopForward,
    find_decoder_layers_path,
    frozen_weights,
    has_chat_template,
    input_device,
    layer_hidden,
    model_hidden_size,
    model_name,
    right_padded_batch,
)
from .prompts import load_prompts

__all__ = [
    "RefusalBasis",
    "extract_refusal_basis",
    "default_layers",
    "BASIS_FILENAME",
    "METHODS",
    "POSITIONS",
    "ADAPTER_MODES",
]

#: file name used when ``save``/``load`` get a folder (e.g. an adapter's output dir).
BASIS_FILENAME = "refusal_basis.safetensors"
METHODS = ("dim", "svd")
POSITIONS = ("last", "post-instruction")
ADAPTER_MODES = ("off", "on")
MAX_K = 64

_FORMAT = "refusalguard-basis"
_FORMAT_VERSION = "1"
_PER_LAYER_KEYS = ("explained_share", "separation", "coord_spread")


def _layer_key(layer: int) -> str:
    return f"layer.{layer}"


@dataclass
class RefusalBasis:
    """Per-layer refusal-cone bases and how they were made.

    Attributes:
        bases: decoder layer index -> (d, k) float32 tensor with orthonormal columns
            (the first column is the difference-of-means direction).
        metadata: ``model_name``, ``hidden_size``, ``method``, ``positions``, ``k``,
            ``layers``, ``n_harmful``, ``n_harmless``, and per layer (dicts keyed by layer
            index) ``explained_share``, ``separation`` and ``coord_spread`` (bases saved before
            0.2 have no ``coord_spread``); free-form keys are kept.

    Construction checks the bases (same d x k everywhere, finite, orthonormal within
    ``ORTHONORMAL_ATOL``) and converts them to float32.  ``save``/``load`` use one
    safetensors file (tensor ``layer.{i}`` per layer, metadata as JSON inside it).
    """

    bases: dict[int, Tensor]
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.bases, dict) or not self.bases:
            raise ValueError(
                "RefusalBasis needs at least one layer: bases must be a non-empty {layer: (d, k) tensor} dict"
            )
        shape = None
        clean = {}
        for layer in sorted(self.bases, key=lambda i: (not isinstance(i, int), i)):
            basis = self.bases[layer]
            if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
                raise ValueError(f"basis layer keys must be decoder layer indices (ints >= 0); got {layer!r}")
            if not isinstance(basis, Tensor) or basis.dim() != 2 or not basis.is_floating_point():
                raise ValueError(f"the basis for layer {layer} must be a 2-D floating-point (d, k) tensor")
            if shape is None:
                shape = tuple(basis.shape)
            elif tuple(basis.shape) != shape:
                raise ValueError(
                    f"all layers need the same (d, k); layer {layer} has {tuple(basis.shape)}, others {shape}"
                )
            d, k = shape
            if not 1 <= k <= MAX_K or k > d:
                raise ValueError(f"k (columns) must be between 1 and min({MAX_K}, d={d}); got {k}")
            basis = basis.detach().to(torch.float32).contiguous()
            try:
                with _autocast_off():
                    check_values(basis)
            except ValueError as exc:
                raise ValueError(f"layer {layer}: {exc}") from None
            clean[layer] = basis
        self.bases = clean
        if not isinstance(self.metadata, dict):
            raise TypeError(f"metadata must be a dict; got {type(self.metadata).__name__}")
        meta = dict(self.metadata)
        for key, value in (("hidden_size", shape[0]), ("k", shape[1])):
            if meta.get(key, value) != value:
                raise ValueError(f"metadata says {key}={meta[key]} but the bases have {key}={value}")
            meta[key] = value
        meta["layers"] = self.layers
        for key in _PER_LAYER_KEYS:
            if isinstance(meta.get(key), dict):
                meta[key] = {int(i): v for i, v in meta[key].items()}
        self.metadata = meta

    @property
    def layers(self) -> list[int]:
        """Decoder layer indices, ascending."""
        return sorted(self.bases)

    @property
    def hidden_size(self) -> int:
        return next(iter(self.bases.values())).shape[0]

    @property
    def k(self) -> int:
        return next(iter(self.bases.values())).shape[1]

    def coord_spread(self, layer: int) -> float | None:
        """The pooled within-set standard deviation of the extraction prompts' cone coordinates at
        ``layer`` (see the module docstring), or None for a basis made without it (by 0.1, or
        built by hand)."""
        spread = self.metadata.get("coord_spread")
        value = spread.get(layer) if isinstance(spread, dict) else None
        if isinstance(value, (int, float)) and math.isfinite(value) and value > 0:
            return float(value)
        return None

    def __getitem__(self, layer: int) -> Tensor:
        return self.bases[layer]

    def __repr__(self) -> str:
        keys = [key for key in ("method", "positions", "model_name") if key in self.metadata]
        extra = "".join(f", {key}={self.metadata[key]!r}" for key in keys)
        return f"RefusalBasis(layers={self.layers}, hidden_size={self.hidden_size}, k={self.k}{extra})"

    def to(self, device: torch.device | str) -> RefusalBasis:
        """A copy with every basis on ``device`` (still float32)."""
        return RefusalBasis({i: b.to(device) for i, b in self.bases.items()}, dict(self.metadata))

    def check_model(self, model: nn.Module, *, layers_path: str | None = None) -> None:
        """Raise ValueError if ``model`` has another hidden size or fewer layers than the basis names."""
        hidden_size = model_hidden_size(model)
        if hidden_size != self.hidden_size:
            raise ValueError(
                f"this basis has hidden size {self.hidden_size} "
                f"(from {self.metadata.get('model_name', 'another model')}) "
                f"but the model has hidden size {hidden_size}; extract a basis from this model "
                "(extract_refusal_basis / `refusalguard extract`)"
            )
        _, layers = find_decoder_layers_path(model, layers_path)
        beyond = [i for i in self.layers if i >= len(layers)]
        if beyond:
            raise ValueError(
                f"the basis names layers {beyond} but the model has {len(layers)} decoder layers "
                f"(0..{len(layers) - 1}); use a basis extracted from this model"
            )

    # ------------------------------------------------------------------ files

    def save(self, path: str | os.PathLike) -> Path:
        """Write to ``path`` (a ``.safetensors`` file; any other path is a folder, created if
        needed, holding ``refusal_basis.safetensors``) atomically (temp file in the same folder,
        then rename).  Returns the file path."""
        from safetensors.torch import save_file

        path = Path(path)
        if path.is_dir() or path.suffix != ".safetensors":
            path = path / BASIS_FILENAME
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {_layer_key(i): b.detach().cpu().contiguous() for i, b in self.bases.items()}
        header = {
            "format": "pt",
            "refusalguard_format": _FORMAT,
            "refusalguard_format_version": _FORMAT_VERSION,
            "metadata": json.dumps(self.metadata, sort_keys=True),
        }
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=header)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return path

    @classmethod
    def load(
        cls, path: str | os.PathLike, *, hidden_size: int | None = None, device: torch.device | str = "cpu"
    ) -> RefusalBasis:
        """Read a basis written by ``save`` (a file, or a folder holding ``refusal_basis.safetensors``).

        ``hidden_size``: when given, a basis of another hidden size is a ValueError.
        """
        from safetensors import safe_open

        path = Path(path)
        if path.is_dir():
            path = path / BASIS_FILENAME
        if not path.is_file():
            raise FileNotFoundError(
                f"no refusal basis at {str(path)!r}; create one with extract_refusal_basis(...).save(path)"
            )
        fix = (
            "re-create it (extract_refusal_basis(...).save(path) or `refusalguard extract`), or copy it again "
            "from the training output dir / checkpoint it came from"
        )
        try:
            size = path.stat().st_size
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                header = f.metadata() or {}
                if header.get("refusalguard_format") != _FORMAT:
                    raise ValueError(
                        f"{str(path)!r} is a safetensors file but not a RefusalBasis (no refusalguard header)"
                    )
                bases = {}
                for key in f.keys():
                    if not key.startswith("layer.") or not key[len("layer.") :].isdigit():
                        raise ValueError(f"{str(path)!r} holds an unexpected tensor {key!r}; expected 'layer.<index>'")
                    bases[int(key[len("layer.") :])] = f.get_tensor(key).clone()
            # safetensors maps the data lazily: a file cut short can still open; its header says how long it must be.
            with open(path, "rb") as raw:
                header_len = int.from_bytes(raw.read(8), "little")
            needed = 8 + header_len + sum(t.numel() * t.element_size() for t in bases.values())
            if size < needed:
                raise ValueError(f"it is truncated ({size} bytes, the header describes {needed})")
            metadata = json.loads(header.get("metadata", "{}"))
            basis = cls(bases, metadata)
        except Exception as exc:
            if isinstance(exc, ValueError) and "not a RefusalBasis" in str(exc):
                raise
            raise ValueError(
                f"cannot read refusal basis {str(path)!r} (corrupted or truncated?): {exc}; {fix}"
            ) from exc
        if hidden_size is not None and hidden_size != basis.hidden_size:
            raise ValueError(
                f"the basis in {str(path)!r} has hidden size {basis.hidden_size} "
                f"(from {basis.metadata.get('model_name', 'another model')}) but hidden size {hidden_size} "
                "was expected; extract a basis from this model"
            )
        return basis


# ---------------------------------------------------------------------- extraction


def default_layers(num_layers: int) -> list[int]:
    """The middle band of depth, ``range(floor(0.4 L), ceil(0.6 L))`` (at least one layer),
    where refusal directions are usually clearest: e.g. L=32 -> 12..19, L=4 -> 1..2."""
    start = int(math.floor(0.4 * num_layers))
    stop = max(start + 1, int(math.ceil(0.6 * num_layers)))
    return list(range(start, min(stop, num_layers)))


def _check_layers(layers, num_layers: int) -> list[int]:
    if layers is None:
        return default_layers(num_layers)
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    out = []
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise ValueError(f"layers must be ints (decoder layer indices); got {layer!r}")
        if not -num_layers <= layer < num_layers:
            raise ValueError(
                f"layer {layer} is out of range: the model has {num_layers} decoder layers (0..{num_layers - 1})"
            )
        out.append(layer % num_layers)
    if not out:
        raise ValueError("layers is empty; name at least one decoder layer (or None for the default middle band)")
    if len(set(out)) != len(out):
        raise ValueError(f"layers has duplicates: {list(layers)}")
    return sorted(out)


def _as_prompts(prompts, name: str) -> list[str]:
    if isinstance(prompts, str) and not (prompts.startswith("builtin:") or os.path.isfile(prompts)):
        raise ValueError(
            f"{name} is a string but neither a file nor 'builtin:{name}'; pass a list of prompts or use load_prompts()"
        )
    try:
        return load_prompts(prompts)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _encode(tokenizer, prompt: str, positions: str) -> tuple[list[int], int]:
    """(token ids, number of tokens to average: 1 for "last", the post-instruction count otherwise)."""
    if has_chat_template(tokenizer):
        text = _render_chat(tokenizer, prompt)
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    else:
        text = None
        ids = list(tokenizer(prompt)["input_ids"])
    if not ids:
        raise ValueError(f"the tokenizer produced no tokens for prompt {prompt[:60]!r}")
    if positions == "last":
        return ids, 1
    cut = text.rfind(prompt)
    if cut < 0:
        raise ValueError(
            f"cannot find the user message inside the chat-templated prompt {text[:80]!r}; use positions='last'"
        )
    head = list(tokenizer(text[: cut + len(prompt)], add_special_tokens=False)["input_ids"])
    n_post = len(ids) - _common_prefix(ids, head)
    if n_post < 1:
        raise ValueError("the chat template adds no tokens after the user message; use positions='last'")
    return ids, n_post


@torch.no_grad()
def _collect(model, layer_modules, layers, encoded, batch_size, pad_id, device, progress) -> dict[int, Tensor]:
    """Per layer an (n_prompts, d) float32 tensor of residual activations at the chosen positions."""
    rows: dict[int, list[Tensor]] = {i: [] for i in layers}
    state = {}

    def make_hook(layer: int):
        def hook(module, args, output):
            hidden = layer_hidden(output).float()
            lengths, counts = state["lengths"], state["counts"]
            # Right padding: a prompt's tokens are 0..len-1; take its last `count` of them.
            offsets = torch.arange(hidden.shape[1], device=hidden.device)
            mask = (offsets[None, :] < lengths[:, None]) & (offsets[None, :] >= (lengths - counts)[:, None])
            summed = (hidden * mask[..., None]).sum(dim=1)
            rows[layer].append((summed / counts[:, None]).cpu())
            if layer == layers[-1]:
                raise _StopForward

        return hook

    handles = [layer_modules[i].register_forward_hook(make_hook(i)) for i in layers]
    try:
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start : start + batch_size]
            input_ids, attention_mask = right_padded_batch([ids for ids, _ in chunk], pad_id)
            state["lengths"] = torch.tensor([len(ids) for ids, _ in chunk], device=device)
            state["counts"] = torch.tensor([n for _, n in chunk], device=device, dtype=torch.float32)
            try:
                model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False)
            except _StopForward:
                pass
            progress.update(len(chunk))
    finally:
        for handle in handles:
            handle.remove()
    return {i: torch.cat(rows[i]) for i in layers}


def _layer_basis(
    harmful: Tensor, harmless: Tensor, k: int, method: str, layer: int
) -> tuple[Tensor, float, float, float]:
    h = harmful.to(torch.float64)
    l = harmless.to(torch.float64)
    mean_h, mean_l = h.mean(0), l.mean(0)
    diff = mean_h - mean_l
    norm = diff.norm()
    if not torch.isfinite(norm) or norm == 0:
        raise ValueError(
            f"layer {layer}: harmful and harmless activations have the same mean (or are not finite); "
            "check the prompts and the model"
        )
    direction = diff / norm
    columns = [direction]
    if method == "svd" and k > 1:
        centred = h - mean_h
        centred = centred - (centred @ direction)[:, None] * direction[None, :]
        _, singular, vh = torch.linalg.svd(centred, full_matrices=False)
        rank = int((singular > singular[0] * 1e-6).sum()) if singular.numel() and singular[0] > 0 else 0
        if rank < k - 1:
            raise ValueError(
                f"layer {layer}: the harmful prompts span only {rank} direction(s) beyond the mean difference, "
                f"so k={k} is too large; lower k to at most {rank + 1} or add more (distinct) harmful prompts"
            )
        for v in vh[: k - 1]:
            columns.append(v * torch.sign(v[v.abs().argmax()]))  # a fixed sign: reproducible bases
    basis = orthonormalize_basis(torch.stack(columns, dim=1), dtype=torch.float64)
    offsets = h - mean_l
    explained = float((offsets @ basis).pow(2).sum() / offsets.pow(2).sum())
    proj_h, proj_l = h @ basis[:, 0], l @ basis[:, 0]
    dof = len(proj_h) + len(proj_l) - 2
    if dof > 0:
        pooled = math.sqrt(
            (float(((proj_h - proj_h.mean()) ** 2).sum()) + float(((proj_l - proj_l.mean()) ** 2).sum())) / dof
        )
        gap = float(proj_h.mean() - proj_l.mean())
        separation = gap / pooled if pooled > 0 else math.inf
        coords_h, coords_l = h @ basis, l @ basis
        within = ((coords_h - coords_h.mean(0)) ** 2).sum(0) + ((coords_l - coords_l.mean(0)) ** 2).sum(0)
        spread = math.sqrt(float(within.mean()) / dof)
    else:
        separation = spread = math.nan
    return basis.to(torch.float32), explained, separation, spread


def extract_refusal_basis(
    model: nn.Module,
    tokenizer,
    harmful,
    harmless,
    *,
    layers: list[int] | int | None = None,
    k: int = 1,
    method: str = "dim",
    positions: str = "last",
    batch_size: int = 8,
    show_progress: bool = True,
    layers_path: str | None = None,
    adapters: str = "off",
) -> RefusalBasis:
    """Extract the refusal-cone basis of ``model`` from harmful vs harmless prompts.

    Args:
        model: a transformers causal LM (also inside a PEFT / DDP wrapper).  It runs
            frozen: eval mode (restored afterwards), no gradients.
        tokenizer: its tokenizer.  With a chat template each prompt becomes a user turn
            with the generation prompt appended; without one the raw prompt is used.
        harmful, harmless: lists of prompts (or anything ``load_prompts`` reads, e.g.
            ``"builtin:harmful"`` or a file path).
        layers: decoder layer indices (negative counts from the end); None = the middle
            band ``default_layers(L)`` = ``range(floor(0.4 L), ceil(0.6 L))``.
        k: directions per layer, 1..64; ``method="dim"`` needs k=1; for "svd" at most the
            number of harmful prompts and the hidden size.
        method: "dim" (difference of means) or "svd" (dim direction + top singular
            directions of the centred harmful differences); see the module docstring.
        positions: "last" (the final prompt token, i.e. the last token of the generation
            prompt) or "post-instruction" (the mean over the template tokens after the user
            message, e.g. ``<|im_end|>\\n<|im_start|>assistant\\n``; needs a chat template).
        batch_size: prompts per forward; batches are right-padded with an attention mask,
            so a prompt's activations do not depend on its batch-mates (up to float
            rounding), whatever the tokenizer's padding side.
        show_progress: a tqdm bar over the prompts.
        layers_path: dotted path to the decoder layer list when it cannot be found.
        adapters: "off" (default): the basis of the frozen weights, as the guard anchors to;
            every PEFT adapter layer anywhere in ``model``'s tree is switched off for the
            extraction (whatever wrapper level ``model`` is) and its state restored after.
            "on": the model as it runs with its adapters (e.g. to measure a tuned model).

    Returns a ``RefusalBasis`` with bases on the CPU.
    """
    from tqdm.auto import tqdm

    harmful = _as_prompts(harmful, "harmful")
    harmless = _as_prompts(harmless, "harmless")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose 'dim' (k=1) or 'svd' (k >= 1)")
    if positions not in POSITIONS:
        raise ValueError(f"unknown positions {positions!r}; choose 'last' or 'post-instruction'")
    if adapters not in ADAPTER_MODES:
        raise ValueError(
            f"unknown adapters {adapters!r}; choose 'off' (the frozen weights, as the guard uses) or 'on' "
            "(the adapted model)"
        )
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise ValueError(f"k must be an int between 1 and {MAX_K}; got {k!r}")
    if method == "dim" and k != 1:
        raise ValueError(f"method='dim' gives one direction (k=1); for k={k} use method='svd'")
    if k > len(harmful):
        raise ValueError(f"k={k} needs at least {k} harmful prompts (got {len(harmful)}); lower k or add prompts")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int; got {batch_size!r}")
    if positions == "post-instruction" and not has_chat_template(tokenizer):
        raise ValueError(
            "positions='post-instruction' needs a tokenizer with a chat template (the tokens after the user message); "
            "this tokenizer has none: use positions='last'"
        )
    hidden_size = model_hidden_size(model)
    if k > hidden_size:
        raise ValueError(f"k={k} exceeds the hidden size {hidden_size}")
    found_path, layer_modules = find_decoder_layers_path(model, layers_path)
    layers = _check_layers(layers, len(layer_modules))

    encoded_h = [_encode(tokenizer, p, positions) for p in harmful]
    encoded_l = [_encode(tokenizer, p, positions) for p in harmless]
    pad_id = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
    device = input_device(model)

    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with (
            frozen_weights(model) if adapters == "off" else contextlib.nullcontext(),
            tqdm(
                total=len(harmful) + len(harmless),
                desc="extracting refusal basis",
                unit="prompt",
                disable=not show_progress,
            ) as progress,
        ):
            acts_h = _collect(model, layer_modules, layers, encoded_h, batch_size, pad_id, device, progress)
            acts_l = _collect(model, layer_modules, layers, encoded_l, batch_size, pad_id, device, progress)
    finally:
        for module, training in modes.items():
            module.training = training

    bases, explained, separation, spread = {}, {}, {}, {}
    for layer in layers:
        bases[layer], explained[layer], separation[layer], spread[layer] = _layer_basis(
            acts_h[layer], acts_l[layer], k, method, layer
        )
    metadata = {
        "model_name": model_name(model),
        "hidden_size": hidden_size,
        "method": method,
        "positions": positions,
        "k": k,
        "layers": layers,
        "n_harmful": len(harmful),
        "n_harmless": len(harmless),
        "explained_share": explained,
        "separation": separation,
        "coord_spread": spread,
        "layers_path": found_path,
        "chat_template": has_chat_template(tokenizer),
    }
    return RefusalBasis(bases, metadata)
