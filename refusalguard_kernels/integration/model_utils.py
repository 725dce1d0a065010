"""Model plumbing shared by basis extraction and the guard: finding the decoder layers
(also inside PEFT / DDP wrappers), reading a layer's output, chat formatting.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Iterator

import torch
from torch import Tensor, nn

__all__ = [
    "find_decoder_layers",
    "find_decoder_layers_path",
    "unwrap_model",
    "peft_model_of",
    "model_hidden_size",
    "model_num_layers",
    "model_name",
    "layer_hidden",
    "replace_layer_hidden",
    "has_chat_template",
    "format_prompts",
    "input_device",
    "adapter_layers",
    "frozen_weights",
    "AdapterStateError",
]

# Where the decoder block list lives, relative to the bare transformers model, most common first.
_KNOWN_LAYER_PATHS = (
    "model.layers",  # Llama, Mistral, Qwen2/Qwen3, Gemma/Gemma2/Gemma3 (text), Phi, ...
    "model.language_model.layers",  # Gemma3 / LLaVA-style multimodal wrappers (transformers >= 4.52)
    "language_model.model.layers",  # the same, older transformers
    "model.text_model.layers",
    "transformer.h",  # GPT-2, GPT-J, Falcon, Bloom
    "gpt_neox.layers",  # GPT-NeoX, Pythia
    "model.decoder.layers",  # OPT
    "transformer.blocks",  # MPT
    "layers",  # bare base models (LlamaModel, ...)
    "h",
    "decoder.layers",
)


@contextlib.contextmanager
def _autocast_off():
    """Autocast off on CPU and CUDA: value checks (B^T B = I) must run in float32, not bf16."""
    with contextlib.ExitStack() as stack:
        for device_type in ("cpu", "cuda"):
            if torch.is_autocast_enabled(device_type):
                stack.enter_context(torch.autocast(device_type, enabled=False))
        yield


class _StopForward(Exception):
    """Raised by a capture hook after the last layer it needs: the layers above it and the
    LM head need not run (caught by the caller that started the forward)."""


def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers model inside DDP / torch.compile / PEFT wrappers."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):  # torch.compile
            model = model._orig_mod
        elif _is_peft_model(model):
            model = model.get_base_model()
        else:
            break
    return model


def _is_peft_model(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # peft is optional for everything but LoRA training
        return False
    return isinstance(model, PeftModel)


def peft_model_of(model: nn.Module):
    """The ``peft.PeftModel`` in ``model``'s wrapper chain (DDP, torch.compile), or None."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if _is_peft_model(model):
            return model
        if isinstance(model, nn.parallel.DistributedDataParallel) or _is_engine_wrapper(model):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return None
    return None


def _is_engine_wrapper(model: nn.Module) -> bool:
    # DeepSpeed's engine and FSDP1 keep the model in ``.module``; the adapters are switched off there.
    # (FSDP2 shards in place and keeps the model's own class: nothing to look through.)
    name = type(model).__name__
    return name in ("DeepSpeedEngine", "FullyShardedDataParallel") and isinstance(
        getattr(model, "module", None), nn.Module
    )


class AdapterStateError(RuntimeError):
    """The guarded model's frozen weights cannot be recovered by switching adapters off."""


def _adapter_types() -> tuple[type, ...]:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # no peft: no adapter layers can exist
        return ()
    try:
        from peft.utils.other import AuxiliaryTrainingWrapper  # modules_to_save, trainable tokens
    except ImportError:  # older peft
        return (BaseTunerLayer,)
    return (BaseTunerLayer, AuxiliaryTrainingWrapper)


def adapter_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every PEFT adapter layer (LoRA, DoRA, IA3, ..., modules_to_save
    wrappers) anywhere in ``model``'s module tree, whatever level of a wrapper ``model`` is."""
    types = _adapter_types()
    if not types:
        return []
    return [(name, module) for name, module in model.named_modules() if isinstance(module, types)]


def _prompt_peft_model(model: nn.Module):
    # Prompt learning / adaption prompt add no tuner layers to switch off: only the PeftModel can.
    peft_model = peft_model_of(model)
    if peft_model is None:
        return None
    config = peft_model.peft_config.get(peft_model.active_adapter)
    if getattr(config, "is_prompt_learning", False) or getattr(config, "is_adaption_prompt", False):
        return peft_model
    return None


@contextlib.contextmanager
def frozen_weights(model: nn.Module) -> Iterator[None]:
    """Run ``model`` (any level: PeftModel, its base_model, the bare transformers model, a
    submodule) on its frozen weights: every adapter layer in its tree is switched off, and
    exactly its previous on/off flag is put back afterwards, also on exceptions.

    The flag is flipped directly rather than through peft's ``enable_adapters``/
    ``disable_adapter()``, which also rewrite ``requires_grad`` of adapter weights and so
    would not restore a partly frozen adapter.  An adapter merged into the base weights
    cannot be switched off without changing those weights: ``AdapterStateError``.
    """
    layers = adapter_layers(model)
    merged = [name for name, module in layers if getattr(module, "merged", False)]
    if merged:
        shown = ", ".join(repr(name) for name in merged[:3]) + (" ..." if len(merged) > 3 else "")
        raise AdapterStateError(
            f"{len(merged)} adapter layer(s) of this model are merged into the base weights ({shown}), so the "
            "frozen weights the guard anchors to are gone; call unmerge_adapter() (PeftModel) before computing "
            "anchors or extracting a basis, or load the base model without merging"
        )
    missing = [name for name, module in layers if not hasattr(module, "_disable_adapters")]
    if missing:
        raise AdapterStateError(
            f"cannot switch off the adapter layer {missing[0]!r} (a {type(dict(layers)[missing[0]]).__name__} "
            "without peft's _disable_adapters flag); compute anchors on the model without the adapter, or upgrade peft"
        )
    previous = [(module, module._disable_adapters) for _, module in layers]
    prompt_model = _prompt_peft_model(model)
    try:
        for module, _ in previous:
            module._disable_adapters = True
        with prompt_model.disable_adapter() if prompt_model is not None else contextlib.nullcontext():
            yield
    finally:
        for module, flag in previous:
            module._disable_adapters = flag


def _wrapper_chain(model: nn.Module) -> Iterator[nn.Module]:
    """model, then each module inside its wrappers, ending at the bare model."""
    yield model
    seen = {id(model)}
    current = model
    while True:
        if isinstance(current, nn.parallel.DistributedDataParallel):
            current = current.module
        elif hasattr(current, "_orig_mod") and isinstance(current._orig_mod, nn.Module):
            current = current._orig_mod
        elif _is_peft_model(current):
            # base_model (the LoraModel) first, so user paths written against either level resolve.
            for inner in (current.base_model, current.get_base_model()):
                if id(inner) not in seen:
                    seen.add(id(inner))
                    yield inner
            current = current.get_base_model()
            continue
        else:
            return
        if id(current) in seen:
            return
        seen.add(id(current))
        yield current


def _text_config(model: nn.Module):
    config = getattr(model, "config", None)
    if config is None:
        return None
    get_text_config = getattr(config, "get_text_config", None)
    if callable(get_text_config):
        try:
            return get_text_config()
        except Exception:  # some remote-code configs break here; the plain config still helps
            return config
    return config


def model_num_layers(model: nn.Module) -> int | None:
    """Number of decoder layers the config declares (None when it does not say)."""
    config = _text_config(unwrap_model(model))
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def model_hidden_size(model: nn.Module) -> int:
    """The residual-stream width d of ``model``."""
    bare = unwrap_model(model)
    config = _text_config(bare)
    for name in ("hidden_size", "n_embd", "d_model"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    embeddings = bare.get_input_embeddings() if hasattr(bare, "get_input_embeddings") else None
    if embeddings is not None and getattr(embeddings, "weight", None) is not None:
        return int(embeddings.weight.shape[-1])
    raise ValueError(f"cannot tell the hidden size of {type(bare).__name__}: its config has no hidden_size")


def model_name(model: nn.Module) -> str:
    """The model's hub id or local path when known, else its class name."""
    bare = unwrap_model(model)
    name = getattr(getattr(bare, "config", None), "_name_or_path", None) or getattr(bare, "name_or_path", None)
    return str(name) if name else type(bare).__name__


def _resolve(model: nn.Module, path: str):
    try:
        return operator.attrgetter(path)(model)
    except AttributeError:
        return None


def _homogeneous(modules: nn.ModuleList) -> bool:
    return len(modules) > 0 and len({type(m) for m in modules}) == 1


def find_decoder_layers_path(model: nn.Module, layers_path: str | None = None) -> tuple[str, nn.ModuleList]:
    """(dotted path relative to the bare model or the wrapper it resolved on, the layer list).

    See ``find_decoder_layers``.
    """
    chain = list(_wrapper_chain(model))
    if layers_path is not None:
        if not isinstance(layers_path, str) or not layers_path:
            raise ValueError(f"layers_path must be a dotted attribute path such as 'model.layers'; got {layers_path!r}")
        for candidate in chain:
            layers = _resolve(candidate, layers_path)
            if layers is None:
                continue
            if not isinstance(layers, (nn.ModuleList, nn.Sequential)) or len(layers) == 0:
                raise ValueError(
                    f"layers_path={layers_path!r} resolves to a {type(layers).__name__} on "
                    f"{type(candidate).__name__}; it must name the nn.ModuleList of decoder layers"
                )
            return layers_path, layers
        raise ValueError(
            f"layers_path={layers_path!r} does not exist on {type(model).__name__} "
            f"(nor on the model inside its wrappers); {_candidates_hint(chain[-1])}"
        )

    bare = chain[-1]
    for path in _KNOWN_LAYER_PATHS:
        layers = _resolve(bare, path)
        if isinstance(layers, nn.ModuleList) and _homogeneous(layers):
            return path, layers

    # Unknown architecture: the one homogeneous ModuleList as long as the config's layer count.
    num_layers = model_num_layers(bare)
    if num_layers:
        matches = [
            (name, mod)
            for name, mod in bare.named_modules()
            if isinstance(mod, nn.ModuleList) and len(mod) == num_layers and _homogeneous(mod)
        ]
        if len(matches) == 1:
            return matches[0]
    raise ValueError(
        f"could not find the decoder layers of {type(bare).__name__}; pass layers_path= with the dotted path "
        f"to its nn.ModuleList of decoder blocks (e.g. layers_path='model.layers'). {_candidates_hint(bare)}"
    )


def _candidates_hint(bare: nn.Module) -> str:
    names = [f"{name!r} ({len(mod)})" for name, mod in bare.named_modules() if isinstance(mod, nn.ModuleList) and name]
    if not names:
        return "The model has no nn.ModuleList at all."
    return "ModuleLists in this model: " + ", ".join(names[:8]) + (" ..." if len(names) > 8 else "")


def find_decoder_layers(model: nn.Module, layers_path: str | None = None) -> nn.ModuleList:
    """The decoder blocks of ``model`` in order: ``layers[i]``'s output is layer i's residual stream.

    Knows Llama, Mistral, Qwen2/Qwen3, Gemma/Gemma2/Gemma3, GPT-NeoX and GPT-2 style models
    (and others laid out the same way), also inside PEFT, DDP and torch.compile wrappers;
    otherwise takes the single homogeneous ``nn.ModuleList`` whose length is the config's
    layer count.  ``layers_path`` (e.g. ``"model.layers"``, resolved on the model, then on
    each model inside its wrappers) overrides the search.  Raises ValueError naming
    ``layers_path=`` when the layers cannot be found.
    """
    return find_decoder_layers_path(model, layers_path)[1]


def layer_hidden(output) -> Tensor:
    """The hidden states in a decoder layer's output (a tensor, or a tuple/list led by it)."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(
        f"a decoder layer returned {type(output).__name__}; expected a tensor or a tuple whose first element is "
        "the hidden states. Pass layers_path= naming the decoder block list if the wrong modules were hooked."
    )


def replace_layer_hidden(output, hidden: Tensor):
    """``output`` with its hidden states replaced by ``hidden`` (same container type)."""
    if isinstance(output, Tensor):
        return hidden
    if isinstance(output, tuple):
        return (hidden,) + tuple(output[1:])
    return [hidden] + list(output[1:])


def has_chat_template(tokenizer) -> bool:
    """True when ``tokenizer`` carries a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def _render_chat(tokenizer, prompt: str) -> str:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    if not isinstance(text, str):
        raise TypeError(f"tokenizer.apply_chat_template(tokenize=False) returned {type(text).__name__}, not a string")
    return text


def format_prompts(tokenizer, prompts: list[str]) -> list[str]:
    """Each prompt as the model sees a user turn awaiting its answer.

    With a chat template: ``apply_chat_template([{"role": "user", "content": p}],
    add_generation_prompt=True)``; the result already holds the special tokens (BOS, role
    markers), so tokenize it with ``add_special_tokens=False``.  Without one the prompts
    come back unchanged (tokenize them with the tokenizer's usual special tokens).
    """
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not one string")
    if not has_chat_template(tokenizer):
        return list(prompts)
    return [_render_chat(tokenizer, prompt) for prompt in prompts]


def _module_device(module: nn.Module) -> torch.device:
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


def input_device(model: nn.Module) -> torch.device:
    """Where the model's inputs go: the input embedding's device (first parameter's otherwise)."""
    bare = unwrap_model(model)
    embeddings = bare.get_input_embeddings() if hasattr(bare, "get_input_embeddings") else None
    if embeddings is not None:
        return _module_device(embeddings)
    return _module_device(bare)


def right_padded_batch(sequences, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) for token-id lists, right-padded to the longest.

    Right padding keeps every real token at the position it has when run alone, which
    is what the activation readers (last token, post-instruction tokens) index by."""
    width = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    return input_ids, attention_mask


@contextlib.contextmanager
def datasets_progress(show: bool) -> Iterator[None]:
    """``datasets``' own progress bars on or off for a block (``Dataset.map`` has no per-call
    switch); the previous global setting is put back afterwards, also on exceptions."""
    import datasets

    was_enabled = datasets.utils.is_progress_bar_enabled()
    if not show and was_enabled:
        datasets.utils.disable_progress_bars()
    try:
        yield
    finally:
        if not show and was_enabled:
            datasets.utils.enable_progress_bars()
