"""Cached anchors: the frozen model's refusal coordinates, computed once per dataset.

``add_cached_anchors(dataset, model, guard)`` runs one frozen pass over a tokenized
``datasets.Dataset`` (``datasets.map``, batched) and stores, per example and per hooked
layer, the [seq, k] float32 coordinates ``guard.anchors`` gives.  They live in Arrow
columns, so they are memory-mapped, follow the rows through ``shuffle``/``select``/
``save_to_disk``, and the ``map`` result is cached and reused under a fingerprint of the
dataset, the basis, the model and the precision (``autocast_dtype``).

Columns (``column`` defaults to ``"refusalguard_anchors"``):

* ``{column}.{layer}``: ``Array2D((None, k), float32)``, the row's coordinates at that layer;
* ``{column}.tokens``: a hash of the row's ``input_ids`` (checked per row when collated);
* ``{column}.fingerprint``: ``"basis=<hash>;model=<hash>;autocast=<dtype|none>"`` (checked
  when training starts and per row when collated).

A cache that does not match the tokens, the basis or the model is a ``CachedAnchorsError``
(a ValueError) saying which, never silently used.  The model hash covers the config
(minus run-time switches such as ``use_cache``) and, IN FULL (every element, dtype and
shape; ``tensor_digest``), every parameter and floating buffer that can change a guarded
layer's input or output: the embedding, rotary/positional modules, every decoder layer up
to the last guarded one, and (conservatively) the other non-layer modules such as the final
norm.  Not covered: decoder layers above the last guarded one and an untied output head
(they run after the guarded layers), and PEFT adapter weights (anchors come from the frozen
weights, adapters off).  The digest of each named tensor is kept once per dataset in the
fingerprint column's feature ``id``, so a mismatch names the parameters that changed.

``AnchorCollator`` pads ``input_ids``/``attention_mask``/``labels`` (through
``DataCollatorForSeq2Seq`` or the collator you give it) and pads the anchor columns the
same way, returning ``batch["refusalguard_anchors"] = {layer: [batch, seq, k]}`` and
``batch["prompt_lengths"]``.

Exactness: anchors are computed on right-padded batches of the map and stored without
their padding; with causal attention and right padding a real token never sees a pad, so
the training forward reproduces them.  Bit for bit when a training batch holds the same
rows as a map batch (same batch size, sequential sampling): the step-0 penalty is exactly
0.  Otherwise to float32 rounding: CPU and GPU kernels block their reductions by the batch
shape, so a token's activations can move by an ulp or so with its batch-mates' lengths and
the step-0 penalty is ~1e-18..1e-14 instead of 0.  Online anchors are computed on the very
batch and are always exact.  Left padding would shift positions: the collator refuses it.
The frozen pass must run under the training forward's autocast (``autocast_dtype``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor, nn

from .model_utils import datasets_progress

__all__ = [
    "ANCHOR_COLUMN",
    "CachedAnchorsError",
    "AnchorCollator",
    "add_cached_anchors",
    "check_cached_anchors",
    "anchor_column_names",
    "anchors_fingerprint",
    "basis_fingerprint",
    "model_fingerprint",
    "model_fingerprint_parts",
    "tensor_digest",
    "token_fingerprint",
    "trainable_anchor_weights",
]

#: default column prefix, and the batch key the trainer reads (``hooks.GUARD_BATCH_KEYS``).
ANCHOR_COLUMN = "refusalguard_anchors"
IGNORE_INDEX = -100

# Config entries that change with how a model is run, not with what it computes.
_VOLATILE_CONFIG_KEYS = {
    "transformers_version",
    "use_cache",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "torch_dtype",
    "dtype",
    "architectures",
    "name_or_path",
    "gradient_checkpointing",
    "tf_legacy_loss",
    "use_bfloat16",
    "torchscript",
    "pruned_heads",
    "chunk_size_feed_forward",
    "problem_type",
}


class CachedAnchorsError(ValueError):
    """Cached anchors that do not belong to these tokens, this basis or this model."""


# ---------------------------------------------------------------------- fingerprints


def _digest(*parts: bytes) -> str:
    h = hashlib.blake2b(digest_size=8)
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()


def token_fingerprint(input_ids) -> str:
    """Hash of one example's token ids (a list, array or 1-D tensor)."""
    if isinstance(input_ids, Tensor):
        input_ids = input_ids.detach().cpu().numpy()
    return _digest(np.asarray(input_ids, dtype=np.int64).reshape(-1).tobytes())


def basis_fingerprint(basis) -> str:
    """Hash of a ``RefusalBasis``'s layers and float32 tensors."""
    parts = []
    for layer in basis.layers:
        tensor = basis.bases[layer].detach().to("cpu", torch.float32).contiguous()
        parts += [str(layer).encode(), str(tuple(tensor.shape)).encode(), tensor.numpy().tobytes()]
    return _digest(*parts)


# Private config entries that change what the frozen forward computes (to float rounding), unlike the
# other "_"-prefixed bookkeeping keys: the attention kernel (eager / sdpa / flash) changes the anchors' bits.
_COMPUTE_PRIVATE_KEYS = ("_attn_implementation",)


def _config_identity(config) -> dict:
    if config is None:
        return {}
    raw = config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))
    raw = dict(raw)
    for key in _COMPUTE_PRIVATE_KEYS:
        value = getattr(config, key, None)
        if value is not None:
            raw[key.lstrip("_")] = value

    def clean(value):
        if isinstance(value, Mapping):
            return {
                str(k): clean(v)
                for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))
                if not str(k).startswith("_") and k not in _VOLATILE_CONFIG_KEYS
            }
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        if isinstance(value, (str, int, float, bool)) or value is None:
            return value
        return repr(value)

    return clean(raw)


_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_DIGEST_CHUNK = 1 << 24  # elements per chunk: bounds the int64 temporaries to 128 MiB per sum


def tensor_digest(tensor: Tensor, *, name: str | None = None) -> str:
    """Digest of a whole tensor's bits, computed on its own device.

    The bits are reinterpreted as integers and summed plain and position-weighted in int64
    (wrapping).  Integer sums do not depend on reduction order, so CPU and GPU agree, and
    changing any single element changes the plain sum (the difference is below 2**64); the
    weighted sum also catches moved elements.  One host sync per tensor, at cache build or
    check time only.
    """
    tensor = tensor.detach()
    shape = tuple(getattr(tensor, "ds_shape", tensor.shape))
    head = f"{tensor.dtype}{shape}"
    if tensor.device.type == "meta" or (tensor.numel() == 0 and math.prod(shape) > 0):
        # A ZeRO-3 partitioned placeholder or an offloaded (meta) weight: its values are not here, and a
        # digest of the shape alone would accept a stale cache.
        raise CachedAnchorsError(
            f"cannot fingerprint {name or 'a weight'} {head}: its values are not on this process (a meta tensor, "
            "e.g. offloaded by device_map, or a DeepSpeed ZeRO-3 partition), so cached anchors cannot be checked "
            "against the model. Compute and check them on the full model: build the cache before sharding / "
            "offloading (add_cached_anchors on a model with its weights in memory), gather the parameters "
            "(deepspeed.zero.GatheredParameters), or train with anchors='online'"
        )
    flat = tensor.contiguous().reshape(-1)
    if flat.is_complex():
        flat = torch.view_as_real(flat).reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    bits = flat.view(_INT_VIEW[flat.element_size()])
    plain = torch.zeros((), dtype=torch.int64, device=bits.device)
    weighted = torch.zeros((), dtype=torch.int64, device=bits.device)
    for start in range(0, bits.numel(), _DIGEST_CHUNK):
        chunk = bits[start : start + _DIGEST_CHUNK].to(torch.int64)
        positions = torch.arange(start + 1, start + 1 + chunk.numel(), dtype=torch.int64, device=bits.device)
        plain += chunk.sum()
        weighted += (chunk * positions).sum()
    values = torch.stack([plain, weighted]).cpu().tolist()
    return _digest(head.encode(), str(values).encode())


def _normalise(name: str) -> str:
    # PEFT moves a wrapped weight under ``base_layer`` / ``original_module``: same weight, same name.
    return name.replace(".base_layer.", ".").replace(".original_module.", ".")


def _adapter_tensor_ids(bare: nn.Module) -> set[int]:
    """ids of the adapter-owned tensors (LoRA A/B, DoRA magnitudes, IA3 vectors, modules_to_save
    copies, ...): everything inside an adapter layer except the base layer it wraps."""
    from .model_utils import adapter_layers

    ids: set[int] = set()
    for _, layer in adapter_layers(bare):
        if hasattr(layer, "get_base_layer"):
            base = layer.get_base_layer()
        else:
            base = getattr(layer, "original_module", None)
        kept = set() if base is None else {id(t) for t in (*base.parameters(), *base.buffers())}
        ids.update(id(t) for t in (*layer.parameters(), *layer.buffers()) if id(t) not in kept)
    return ids


def _anchor_tensors(model: nn.Module, layers: list[int] | None, layers_path: str | None) -> list[tuple[str, Tensor]]:
    """(plain name, tensor) of every parameter and floating buffer that can change the guarded layers'
    inputs or outputs, adapter weights excluded (see ``model_fingerprint_parts``)."""
    from .model_utils import find_decoder_layers_path, unwrap_model

    bare = unwrap_model(model)
    skip = _adapter_tensor_ids(bare)
    if layers:
        _, layer_modules = find_decoder_layers_path(model, layers_path)
        last = max(layers)
        for index, module in enumerate(layer_modules):
            if index > last:
                skip.update(id(t) for t in (*module.parameters(), *module.buffers()))
    output = bare.get_output_embeddings() if hasattr(bare, "get_output_embeddings") else None
    if output is not None:
        embeddings = bare.get_input_embeddings() if hasattr(bare, "get_input_embeddings") else None
        tied = set() if embeddings is None else {id(t) for t in embeddings.parameters()}
        skip.update(id(t) for t in output.parameters() if id(t) not in tied)
    named = [(name, t) for name, t in bare.named_parameters()]
    named += [(name, t) for name, t in bare.named_buffers() if t.is_floating_point() or t.is_complex()]
    return [(_normalise(name), tensor) for name, tensor in named if id(tensor) not in skip]


def trainable_anchor_weights(model: nn.Module, layers: list[int], *, layers_path: str | None = None) -> list[str]:
    """Names of the trainable (``requires_grad``) weights that the frozen anchor pass runs through:
    not adapter weights, at or below the last of ``layers``.  Online anchors move with them, so a
    guard over them compares the model with itself (the penalty stays 0)."""
    return [name for name, tensor in _anchor_tensors(model, layers, layers_path) if tensor.requires_grad]


def model_fingerprint_parts(
    model: nn.Module, layers: list[int] | None = None, *, layers_path: str | None = None
) -> dict[str, str]:
    """{part: digest} of everything that can change the guarded layers' inputs or outputs.

    Parts: ``config`` (minus run-time switches) and, by name relative to the transformers
    model, every parameter and floating buffer IN FULL (``tensor_digest``) except the decoder
    layers above the last of ``layers`` (they run after it) and the output head (unless tied
    to the input embedding).  Covered, conservatively: the embedding, rotary/positional
    modules, every decoder layer up to the last guarded one, and sibling modules such as the
    final norm.  PEFT adapter weights are left out (anchors come from the frozen weights)
    and wrapped weights keep their plain names, so wrapping does not change it.
    """
    from .model_utils import unwrap_model

    bare = unwrap_model(model)
    parts = {"config": _digest(json.dumps(_config_identity(getattr(bare, "config", None)), sort_keys=True).encode())}
    for name, tensor in _anchor_tensors(model, layers, layers_path):
        parts[name] = tensor_digest(tensor, name=name)
    return dict(sorted(parts.items()))


def _combine(parts: dict[str, str]) -> str:
    return _digest(*(f"{name}={value}".encode() for name, value in sorted(parts.items())))


def model_fingerprint(model: nn.Module, layers: list[int] | None = None, *, layers_path: str | None = None) -> str:
    """Hash of what a frozen forward of ``model`` computes up to the last of ``layers`` (all
    layers when None): the combination of ``model_fingerprint_parts``.

    Stable across PEFT wrapping (at any level), adapter training, ``use_cache``/gradient-
    checkpointing switches and the model's path on disk; changes with any element of any
    covered weight, the dtype or the architecture.
    """
    return _combine(model_fingerprint_parts(model, layers, layers_path=layers_path))


def _autocast_name(dtype) -> str:
    if dtype is None:
        return "none"
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"autocast_dtype must be None, torch.bfloat16 or torch.float16; got {dtype!r}")
    return str(dtype).replace("torch.", "")


def _fingerprint_and_parts(model: nn.Module, guard, autocast_dtype) -> tuple[str, dict[str, str]]:
    layers_path = getattr(guard, "layers_path", None)
    parts = model_fingerprint_parts(model, guard.layers, layers_path=layers_path)
    value = f"basis={basis_fingerprint(guard.basis)};model={_combine(parts)};autocast={_autocast_name(autocast_dtype)}"
    return value, parts


def anchors_fingerprint(model: nn.Module, guard, *, autocast_dtype: torch.dtype | None = None) -> str:
    """The ``{column}.fingerprint`` value for anchors of ``guard`` on ``model`` computed under
    ``autocast_dtype`` (None: no autocast)."""
    return _fingerprint_and_parts(model, guard, autocast_dtype)[0]


def _stored_parts(dataset, name: str) -> dict[str, str] | None:
    # The per-part digests live once per dataset, in the fingerprint column's feature id
    # (kept by map/select/shuffle/save_to_disk), not in every row.
    feature = getattr(dataset, "features", {}).get(name) if hasattr(dataset, "features") else None
    try:
        parts = json.loads(getattr(feature, "id", None) or "{}").get("model_parts")
    except (TypeError, ValueError, AttributeError):
        return None
    return parts if isinstance(parts, dict) else None


def _changed_parts(stored: dict[str, str] | None, current: dict[str, str] | None) -> str:
    if not stored or not current:
        return ""
    changed = sorted(name for name in stored.keys() & current.keys() if stored[name] != current[name])
    gone = sorted(stored.keys() - current.keys())
    new = sorted(current.keys() - stored.keys())
    pieces = []
    for label, names in (("changed", changed), ("no longer in the model", gone), ("new in the model", new)):
        if names:
            pieces.append(
                f"{label}: " + ", ".join(names[:5]) + (f" (+{len(names) - 5} more)" if len(names) > 5 else "")
            )
    return " [" + "; ".join(pieces) + "]" if pieces else ""


def anchor_column_names(layers, column: str = ANCHOR_COLUMN) -> dict:
    """{layer: column name} plus ``"tokens"`` and ``"fingerprint"`` entries."""
    names = {int(layer): f"{column}.{int(layer)}" for layer in layers}
    names["tokens"] = f"{column}.tokens"
    names["fingerprint"] = f"{column}.fingerprint"
    return names


def _parse_fingerprint(value: str) -> dict:
    out = {}
    for part in str(value).split(";"):
        key, _, val = part.partition("=")
        out[key] = val
    return out


def _mismatch(found: str, expected: str, column: str, detail: str = "") -> CachedAnchorsError:
    got, want = _parse_fingerprint(found), _parse_fingerprint(expected)
    names = ("basis", "model", "autocast")
    what = [name for name in names if got.get(name) != want.get(name)] or list(names)
    reasons = {
        "basis": f"a different refusal basis (cache {got.get('basis')}, this guard's basis {want.get('basis')})",
        "model": (
            f"a different model (cache {got.get('model')}, this model {want.get('model')}: other weights, "
            f"dtype or architecture){detail}"
        ),
        "autocast": (
            f"autocast {got.get('autocast')} while training runs with autocast {want.get('autocast')} "
            "(pass autocast_dtype= to add_cached_anchors to match the bf16/fp16 setting)"
        ),
    }
    return CachedAnchorsError(
        f"the cached anchors in column {column!r} were computed with "
        + " and ".join(reasons[w] for w in what)
        + "; recompute them with add_cached_anchors(dataset, model, guard) for this model, basis and precision, "
        "or train with anchors='online'"
    )


# ---------------------------------------------------------------------- building the cache


def _model_device(model: nn.Module) -> torch.device:
    from .model_utils import input_device

    return input_device(model)


def add_cached_anchors(
    dataset,
    model: nn.Module,
    guard,
    *,
    batch_size: int = 8,
    column: str = ANCHOR_COLUMN,
    autocast_dtype: torch.dtype | None = None,
    show_progress: bool = True,
):
    """``dataset`` with the frozen model's anchors stored as columns (see the module docstring).

    Args:
        dataset: a tokenized ``datasets.Dataset`` with ``input_ids`` (and optionally
            ``attention_mask``; other columns are kept and ignored).
        model: the model being trained (plain or PEFT-wrapped); its weights and config are
            fingerprinted.  ``guard`` must be attached to it.
        guard: the ``RefusalGuard`` whose basis/layers the anchors are for.
        batch_size: examples per frozen forward (right-padded, then stored unpadded).
        column: column prefix; the trainer's ``anchor_column`` must match.
        autocast_dtype: run the frozen pass under ``torch.autocast(dtype=...)``, as the
            training forward will (``torch.bfloat16`` for ``bf16=True``, ``torch.float16``
            for ``fp16=True``; None for full precision).  Recorded in the fingerprint: the
            trainer refuses a cache made under another precision.
        show_progress: the ``datasets.map`` progress bar.

    Columns from an earlier call with the same basis and model are kept as they are; stale
    ones are recomputed.  With a file-backed dataset the result is cached by ``datasets``
    and loaded again on the next run.  Under multi-process training run it inside
    ``training_args.main_process_first()`` so one process computes and the others load.
    """
    import datasets
    from datasets import Array2D, Value

    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(
            f"add_cached_anchors needs a datasets.Dataset (map-style, tokenized); got {type(dataset).__name__}. "
            "For streaming datasets use anchors='online'"
        )
    if "input_ids" not in dataset.column_names:
        raise ValueError(
            f"the dataset has no input_ids column (columns: {dataset.column_names}); tokenize it first "
            "(refusalguard_kernels.training.data_utils.tokenize_dataset)"
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int; got {batch_size!r}")
    if not isinstance(column, str) or not column or "." in column:
        raise ValueError(f"column must be a non-empty name without dots; got {column!r}")
    if getattr(guard, "model", model) is not model and _bare(guard.model) is not _bare(model):
        raise ValueError("the guard is attached to another model; build the RefusalGuard on the model you pass here")

    layers = list(guard.layers)
    names = anchor_column_names(layers, column)
    expected, parts = _fingerprint_and_parts(model, guard, autocast_dtype)
    ours = [c for c in dataset.column_names if c.startswith(column + ".")]
    if ours:
        if set(ours) == set(names.values()) and dataset.unique(names["fingerprint"]) == [expected]:
            return dataset  # already computed for this basis and model
        dataset = dataset.remove_columns(ours)

    pad_id = _pad_id(model)
    device = _model_device(model)
    k = int(guard.k)

    def compute(batch):
        rows = [list(ids) for ids in batch["input_ids"]]
        lengths = [len(ids) for ids in rows]
        if min(lengths) == 0:
            raise ValueError("an example has no tokens; drop empty rows before caching anchors")
        width = max(lengths)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, ids in enumerate(rows):
            input_ids[i, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
            attention_mask[i, : len(ids)] = 1
        if "attention_mask" in batch:
            for i, mask in enumerate(batch["attention_mask"]):
                if len(mask) != lengths[i] or min(mask) != 1:
                    raise ValueError(
                        "cached anchors need unpadded examples (attention_mask all ones); tokenize without padding "
                        "and let the collator pad"
                    )
        precision = (
            torch.autocast(device.type, dtype=autocast_dtype)
            if autocast_dtype is not None
            else contextlib.nullcontext()
        )
        with precision:
            coords = guard.anchors(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device))
        out = {}
        for layer in layers:
            values = coords[layer].detach().to("cpu", torch.float32).numpy()
            out[names[layer]] = [values[i, : lengths[i]] for i in range(len(rows))]
        out[names["tokens"]] = [token_fingerprint(ids) for ids in rows]
        out[names["fingerprint"]] = [expected] * len(rows)
        return out

    features = dataset.features.copy()
    for layer in layers:
        features[names[layer]] = Array2D(shape=(None, k), dtype="float32")
    features[names["tokens"]] = Value("string")
    features[names["fingerprint"]] = Value("string", id=json.dumps({"model_parts": parts}, sort_keys=True))
    new_fingerprint = hashlib.sha256(
        f"{dataset._fingerprint}|{expected}|{column}|{batch_size}|{getattr(guard, 'backend', '')}".encode()
    ).hexdigest()[:32]

    with datasets_progress(show_progress):
        return dataset.map(
            compute,
            batched=True,
            batch_size=batch_size,
            features=features,
            new_fingerprint=new_fingerprint,
            desc="refusalguard: caching anchors",
        )


def _bare(model):
    from .model_utils import unwrap_model

    return unwrap_model(model)


def _pad_id(model: nn.Module) -> int:
    config = getattr(_bare(model), "config", None)
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(config, name, None)
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if isinstance(value, int):
            return value
    return 0  # masked out anyway: with right padding no real token attends to it


def check_cached_anchors(
    dataset, model: nn.Module, guard, *, column: str = ANCHOR_COLUMN, autocast_dtype: torch.dtype | None = None
) -> str:
    """Raise ``CachedAnchorsError`` unless ``dataset`` holds anchors for ``guard``'s layers
    made with this basis and model under ``autocast_dtype``.  Returns the expected fingerprint.

    Token ids are checked per row by ``AnchorCollator`` (cheaply, as batches are built).
    """
    columns = list(getattr(dataset, "column_names", None) or [])
    names = anchor_column_names(guard.layers, column)
    missing = [name for key, name in names.items() if name not in columns]
    if missing:
        present = [c for c in columns if c.startswith(column + ".")]
        raise CachedAnchorsError(
            f"anchors='cached' but the training dataset lacks the columns {missing}"
            + (f" (it has {present}: anchors for other layers)" if present else "")
            + "; run add_cached_anchors(dataset, model, guard) with this guard first, or use anchors='online'"
        )
    expected, parts = _fingerprint_and_parts(model, guard, autocast_dtype)
    if hasattr(dataset, "unique"):
        found = dataset.unique(names["fingerprint"])
        for value in found:
            if value != expected:
                detail = _changed_parts(_stored_parts(dataset, names["fingerprint"]), parts)
                raise _mismatch(value, expected, column, detail)
    return expected


# ---------------------------------------------------------------------- collating


def _as_2d(value, k: int | None) -> Tensor:
    tensor = torch.as_tensor(np.asarray(value, dtype=np.float32))
    if tensor.dim() == 1 and k is not None and tensor.numel() == 0:
        tensor = tensor.reshape(0, k)
    if tensor.dim() != 2:
        raise CachedAnchorsError(f"a cached anchor value has shape {tuple(tensor.shape)}; expected [seq, k]")
    return tensor


class AnchorCollator:
    """Pads a batch for training with the guard: tokens, labels, prompt lengths and cached anchors.

    Args:
        tokenizer: the tokenizer (for its pad token and padding side); may be None when
            ``base_collator`` is given.
        base_collator: pads the token columns; default
            ``DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)`` (pads
            ``input_ids``/``attention_mask`` with the tokenizer and ``labels`` with -100).
        anchor_column: the cached-anchor column prefix (see ``add_cached_anchors``).
        expected_fingerprint: when set, every row's ``{column}.fingerprint`` must equal it.
        pad_to_multiple_of: passed to the default base collator.

    Returns the base collator's batch plus ``prompt_lengths`` (LongTensor [batch]) when
    the rows have it, and ``refusalguard_anchors`` ({layer: float32 [batch, seq, k]},
    zero at padding) when they carry cached anchors.  A row whose tokens do not match its
    cached anchors, or a left-padded batch with cached anchors, is a ``CachedAnchorsError``.
    """

    def __init__(
        self,
        tokenizer=None,
        *,
        base_collator=None,
        anchor_column: str = ANCHOR_COLUMN,
        expected_fingerprint: str | None = None,
        pad_to_multiple_of: int | None = None,
    ) -> None:
        if base_collator is None:
            if tokenizer is None:
                raise ValueError("AnchorCollator needs a tokenizer (to pad) or a base_collator")
            from transformers import DataCollatorForSeq2Seq

            base_collator = DataCollatorForSeq2Seq(
                tokenizer,
                padding=True,
                label_pad_token_id=IGNORE_INDEX,
                pad_to_multiple_of=pad_to_multiple_of,
                return_tensors="pt",
            )
        self.tokenizer = tokenizer
        self.base_collator = base_collator
        self.anchor_column = anchor_column
        self.expected_fingerprint = expected_fingerprint

    def __call__(self, features: list[dict]) -> dict:
        if not features:
            raise ValueError("AnchorCollator got an empty list of examples")
        prefix = self.anchor_column + "."
        tokens_key, fingerprint_key = prefix + "tokens", prefix + "fingerprint"
        stripped, anchor_rows, prompt_lengths = [], [], []
        for feature in features:
            feature = dict(feature)
            anchors = {key: feature.pop(key) for key in list(feature) if key.startswith(prefix)}
            if "prompt_lengths" in feature:
                prompt_lengths.append(int(feature.pop("prompt_lengths")))
            stripped.append(feature)
            anchor_rows.append(anchors)
        if prompt_lengths and len(prompt_lengths) != len(features):
            raise ValueError("some examples have prompt_lengths and others do not; tokenize the dataset the same way")
        batch = dict(self.base_collator(stripped))
        if prompt_lengths:
            batch["prompt_lengths"] = torch.tensor(prompt_lengths, dtype=torch.long)
        if any(anchor_rows):
            batch[ANCHOR_COLUMN] = self._pad_anchors(stripped, anchor_rows, batch, tokens_key, fingerprint_key)
        return batch

    def _pad_anchors(self, features, anchor_rows, batch, tokens_key, fingerprint_key) -> dict[int, Tensor]:
        prefix = self.anchor_column + "."
        layer_keys = sorted(
            (key for key in anchor_rows[0] if key[len(prefix) :].isdigit()), key=lambda key: int(key[len(prefix) :])
        )
        if not layer_keys:
            raise CachedAnchorsError(f"the examples carry {list(anchor_rows[0])} but no per-layer anchor columns")
        input_ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        n_rows, width = input_ids.shape
        out = {int(key[len(prefix) :]): None for key in layer_keys}
        for i, (feature, anchors) in enumerate(zip(features, anchor_rows)):
            if set(anchors) != set(anchor_rows[0]):
                raise CachedAnchorsError("examples in one batch carry different cached-anchor columns")
            ids = feature["input_ids"]
            n_tokens = len(ids)
            if tokens_key not in anchors or anchors[tokens_key] != token_fingerprint(ids):
                raise CachedAnchorsError(
                    f"an example's input_ids do not match the tokens its cached anchors were computed on "
                    f"(column {tokens_key!r}); the dataset was re-tokenized or edited after add_cached_anchors: "
                    "recompute the anchors, or train with anchors='online'"
                )
            if self.expected_fingerprint is not None and anchors.get(fingerprint_key) != self.expected_fingerprint:
                raise _mismatch(anchors.get(fingerprint_key, ""), self.expected_fingerprint, self.anchor_column)
            # Where the row's real tokens sit in the padded batch.
            if mask is not None and n_tokens < width:
                start = int(torch.nonzero(mask[i]).min()) if bool(mask[i].any()) else 0
            else:
                start = 0
            if start != 0:
                raise CachedAnchorsError(
                    "cached anchors need right padding (tokenizer.padding_side='right'): they were computed with the "
                    "real tokens first, and left padding shifts their positions; set padding_side='right' for training"
                )
            for key in layer_keys:
                layer = int(key[len(prefix) :])
                values = _as_2d(anchors[key], None)
                if values.shape[0] != n_tokens:
                    raise CachedAnchorsError(
                        f"the cached anchors of an example have {values.shape[0]} positions but it has {n_tokens} tokens; "
                        "recompute them with add_cached_anchors"
                    )
                if out[layer] is None:
                    out[layer] = torch.zeros((n_rows, width, values.shape[1]), dtype=torch.float32)
                out[layer][i, :n_tokens] = values
        return out
