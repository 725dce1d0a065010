import types
import warnings

import pytest
import torch
from tiny_models import (
    char_tokenizer,
    ddp_batch,
    ddp_reference_model,
    perturb_,
    perturbed_step,
    random_basis,
    random_batch,
    tiny_model,
    tiny_tokenizer,
)
from torch import nn

from refusalguard_kernels import available_backends, project
from refusalguard_kernels.integration.basis import RefusalBasis
from refusalguard_kernels.integration.hooks import RefusalGuard, parse_positions
from refusalguard_kernels.integration.model_utils import (
    find_decoder_layers,
    find_decoder_layers_path,
    format_prompts,
    model_hidden_size,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads only contend
    yield
    torch.set_num_threads(threads)


def _triton_device() -> str:
    """Where backend="triton" runs: CUDA tensors on a GPU machine; CPU tensors only under TRITON_INTERPRET=1,
    which tests/conftest.py sets where there is no GPU."""
    if torch.cuda.is_available():
        return "cuda"
    if "triton" in available_backends():
        return "cpu"
    pytest.skip("backend='triton' needs a GPU or TRITON_INTERPRET=1")


def _grads(model):
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def _enable_checkpointing(model, reentrant=False):
    kwargs = {"use_reentrant": reentrant}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _step(model, guard, batch, anchors):
    guard.arm(anchors, guard.weights(**batch))
    out = model(**batch)
    penalty = guard.penalty()
    (out.loss + penalty).backward()
    return out, penalty


# ---------------------------------------------------------------------------- layer finding

ARCH_PATHS = {
    "llama": "model.layers",
    "mistral": "model.layers",
    "qwen2": "model.layers",
    "qwen3": "model.layers",
    "gemma": "model.layers",
    "gemma2": "model.layers",
    "gemma3": "model.layers",
    "gpt2": "transformer.h",
    "gpt_neox": "gpt_neox.layers",
}


@pytest.mark.parametrize("arch", sorted(ARCH_PATHS))
def test_find_decoder_layers(arch):
    model = tiny_model(arch)
    path, layers = find_decoder_layers_path(model)
    assert path == ARCH_PATHS[arch]
    assert isinstance(layers, nn.ModuleList) and len(layers) == 3
    assert model_hidden_size(model) == 32


def test_find_decoder_layers_inside_wrappers():
    from peft import LoraConfig, get_peft_model

    base = tiny_model("llama")
    layers = base.model.layers
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    assert find_decoder_layers(peft_model) is layers
    assert find_decoder_layers(peft_model, layers_path="model.layers") is layers
    assert find_decoder_layers(peft_model, layers_path="base_model.model.model.layers") is layers
    assert model_hidden_size(peft_model) == 32


class _Blocks(nn.Module):
    """A model of no known layout: embedding, `blocks`, head; optionally checkpointed (hooks inside)."""

    def __init__(self, d=16, n=3, vocab=128, layer_attr="blocks", reentrant=None):
        super().__init__()
        self.config = types.SimpleNamespace(hidden_size=d, num_hidden_layers=n)
        self.embed = nn.Embedding(vocab, d)
        setattr(self, layer_attr, nn.ModuleList(nn.Sequential(nn.Linear(d, d), nn.Tanh()) for _ in range(n)))
        self.layer_attr = layer_attr
        self.head = nn.Linear(d, vocab)
        self.reentrant = reentrant

    def forward(self, input_ids, attention_mask=None, labels=None):
        hidden = self.embed(input_ids)
        for block in getattr(self, self.layer_attr):
            if self.reentrant is not None and self.training:
                out = torch.utils.checkpoint.checkpoint(block, hidden, use_reentrant=self.reentrant)
            else:
                out = block(hidden)
            hidden = hidden + out
        logits = self.head(hidden)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
        return types.SimpleNamespace(loss=loss, logits=logits)


class _TupleBlock(nn.Module):
    """Returns (hidden, extra) like older transformers decoder layers."""

    def __init__(self, d):
        super().__init__()
        self.linear = nn.Linear(d, d)

    def forward(self, hidden):
        return hidden + torch.tanh(self.linear(hidden)), None


class _TupleModel(_Blocks):
    def __init__(self):
        super().__init__(layer_attr="layers")
        self.layers = nn.ModuleList(_TupleBlock(16) for _ in range(3))

    def forward(self, input_ids, attention_mask=None, labels=None):
        hidden = self.embed(input_ids)
        for layer in self.layers:
            hidden, _ = layer(hidden)
        return types.SimpleNamespace(loss=None, logits=self.head(hidden))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_tuple_layer_outputs(backend):
    torch.manual_seed(0)
    device = _triton_device() if backend == "triton" else "cpu"
    model = _TupleModel().to(device)
    ids = random_batch()["input_ids"].to(device)
    reference = model(input_ids=ids).logits.detach()
    basis = RefusalBasis({1: torch.linalg.qr(torch.randn(16, 2, generator=torch.Generator().manual_seed(1)))[0]})
    with RefusalGuard(model, basis, backend=backend) as guard:
        anchors = guard.anchors(input_ids=ids)
        guard.arm(anchors, None)
        model(input_ids=ids)
        assert guard.penalty().item() == 0.0
        guard.arm({1: anchors[1] + 0.5}, None)
        logits = model(input_ids=ids).logits
        assert torch.equal(logits.detach(), reference)
        penalty = guard.penalty()
        torch.testing.assert_close(penalty, torch.tensor(0.5, dtype=torch.float32), rtol=1e-5, atol=1e-6)
        (logits.sum() + penalty).backward()
        assert model.layers[0].linear.weight.grad is not None


def test_find_layers_fallback_and_error():
    model = _Blocks(layer_attr="stages")
    assert find_decoder_layers(model) is model.stages  # the one ModuleList as long as num_hidden_layers
    model.config.num_hidden_layers = 5
    with pytest.raises(ValueError, match="layers_path=.*'stages' \\(3\\)"):
        find_decoder_layers(model)
    assert find_decoder_layers(model, layers_path="stages") is model.stages
    with pytest.raises(ValueError, match="layers_path='nope' does not exist"):
        find_decoder_layers(model, layers_path="nope")
    with pytest.raises(ValueError, match="resolves to a Linear"):
        find_decoder_layers(model, layers_path="head")
    basis = RefusalBasis({0: torch.linalg.qr(torch.randn(16, 1))[0]})
    with pytest.raises(ValueError, match="layers_path="):
        RefusalGuard(model, basis)
    RefusalGuard(model, basis, layers_path="stages").remove()


def test_format_prompts():
    chat = char_tokenizer(chat=True)
    assert format_prompts(chat, ["hi"]) == ["<bos><|user|>hi<|end|><|assistant|>"]
    plain = char_tokenizer(chat=False)
    assert format_prompts(plain, ["hi", "yo"]) == ["hi", "yo"]
    with pytest.raises(TypeError, match="list of strings"):
        format_prompts(chat, "hi")


# ---------------------------------------------------------------------------- step 0 and basics


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma", "gpt2", "gpt_neox"])
def test_step0_penalty_is_exactly_zero(arch):
    model = tiny_model(arch).train()
    batch = random_batch(pad_rows={1: 3})
    guard = RefusalGuard(model, random_basis(model, [0, 2], k=3), backend="torch")
    anchors = guard.anchors(**batch)
    assert set(anchors) == {0, 2} and anchors[0].shape == (4, 12, 3) and anchors[0].dtype == torch.float32
    assert model.training  # the frozen pass ran in eval mode and restored the mode
    guard.arm(anchors, guard.weights(**batch))
    model(**batch)
    penalty = guard.penalty()
    assert penalty.item() == 0.0
    assert penalty.requires_grad
    assert guard.layer_losses() == {0: 0.0, 2: 0.0}
    perturb_(model)
    model(**batch)
    penalty = guard.penalty()
    assert penalty.item() > 0
    assert all(value > 0 for value in guard.layer_losses().values())
    guard.remove()


def test_penalty_matches_the_core_op():
    model = tiny_model("llama").train()
    batch = random_batch(pad_rows={0: 4})
    basis = random_basis(model, [1], k=2)
    guard = RefusalGuard(model, basis, drift_coef=0.7, gram_coef=0.3, backend="torch")
    anchors = guard.anchors(**batch)
    perturb_(model)
    weight = guard.weights(**batch)
    guard.arm(anchors, weight)
    captured = []
    handle = model.model.layers[1].register_forward_hook(lambda m, a, out: captured.append(out))
    model(**batch)
    handle.remove()
    from refusalguard_kernels.reference import geometry_loss

    expected = geometry_loss(
        captured[0].double(), basis[1].double(), anchors[1].double(), weight.double(), drift_coef=0.7, gram_coef=0.3
    )
    torch.testing.assert_close(guard.penalty().double(), expected, rtol=1e-5, atol=1e-7)
    guard.remove()


def test_anchors_are_projections_of_the_frozen_model():
    model = tiny_model("llama")
    batch = random_batch()
    basis = random_basis(model, [0, 1], k=2)
    with torch.no_grad():
        hidden_states = model(**batch, output_hidden_states=True).hidden_states
    guard = RefusalGuard(model, basis, backend="torch")
    anchors = guard.anchors(**batch)
    for layer in (0, 1):
        assert torch.equal(anchors[layer], project(hidden_states[layer + 1], basis[layer], backend="torch"))
    guard.remove()


def test_anchors_pass_stops_after_the_last_hooked_layer(monkeypatch):
    import refusalguard_kernels.integration.hooks as hooks_module

    model = tiny_model("llama")
    calls = []
    model.model.layers[2].register_forward_hook(lambda *a: calls.append("layer2"))
    model.lm_head.register_forward_hook(lambda *a: calls.append("head"))
    guard = RefusalGuard(model, random_basis(model, [0, 1]), backend="torch")
    batch = random_batch()
    early = guard.anchors(**batch)
    assert calls == []
    monkeypatch.setattr(hooks_module, "_sharded", lambda model: True)  # FSDP/ZeRO-3: run to the end
    guard._sharded_cache.clear()
    full = guard.anchors(**batch)
    assert calls == ["layer2", "head"]
    assert all(torch.equal(early[layer], full[layer]) for layer in (0, 1))
    guard.remove()


def test_penalty_is_from_the_latest_forward_only():
    model = tiny_model("llama").train()
    batch = random_batch()
    guard = RefusalGuard(model, random_basis(model, [0, 1]), backend="torch")
    anchors = guard.anchors(**batch)
    perturb_(model, seed=1)
    guard.arm(anchors, guard.weights(**batch))
    model(**batch)
    first = guard.penalty().item()
    perturb_(model, seed=2)
    model(**batch)  # still armed: a fresh record
    second = guard.penalty()
    assert second.item() != first
    assert len(guard._losses) == 2
    guard.remove()


def test_disarmed_hooks_are_identity_and_record_nothing():
    model = tiny_model("llama").train()
    batch = random_batch()
    guard = RefusalGuard(model, random_basis(model, [0, 1]), backend="torch")
    with pytest.raises(RuntimeError, match="no penalty recorded"):
        model(**batch)
        guard.penalty()
    anchors = guard.anchors(**batch)
    guard.arm(anchors, None)
    model(**batch)
    kept = guard.penalty()
    guard.disarm()
    perturb_(model)
    model(**batch)
    assert guard.penalty() is not None and torch.equal(guard.penalty(), kept)  # last armed forward's value
    guard.arm(anchors, None)
    with pytest.raises(RuntimeError, match="no penalty recorded"):
        guard.penalty()  # arming starts a fresh record
    guard.remove()


def test_outputs_bit_identical_with_guard_armed():
    device = _triton_device()
    model = tiny_model("llama").to(device).train()
    batch = {key: value.to(device) for key, value in random_batch(pad_rows={2: 5}).items()}
    reference = model(**batch).logits.detach()
    for backend in ("torch", "triton"):
        with RefusalGuard(model, random_basis(model, [0, 1, 2], k=2), backend=backend) as guard:
            anchors = guard.anchors(**batch)
            anchors = {layer: a + torch.randn_like(a) for layer, a in anchors.items()}  # a non-zero penalty
            guard.arm(anchors, guard.weights(**batch))
            logits = model(**batch).logits.detach()
            assert guard.penalty().item() > 0
        assert torch.equal(logits, reference), backend


def test_remove_restores_the_model():
    model = tiny_model("llama").train()
    batch = random_batch()
    reference = model(**batch).logits.detach()
    guard = RefusalGuard(model, random_basis(model, [0, 2]), backend="torch")
    guard.arm(guard.anchors(**batch), None)
    model(**batch)
    guard.remove()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert torch.equal(model(**batch).logits, reference)
    assert "removed" in repr(guard)
    with pytest.raises(RuntimeError, match="removed"):
        guard.anchors(**batch)
    with RefusalGuard(model, random_basis(model, [1]), backend="torch"):
        assert model.model.layers[1]._forward_hooks
    assert not any(m._forward_hooks for m in model.modules())


def test_model_inputs_drops_guard_keys():
    batch = {"input_ids": 1, "prompt_lengths": 2, "refusalguard_anchors": 3, "labels": 4}
    assert RefusalGuard.model_inputs(batch) == {"input_ids": 1, "labels": 4}


def test_anchors_ignore_guard_keys_and_labels():
    model = tiny_model("llama")
    batch = random_batch()
    guard = RefusalGuard(model, random_basis(model, [1]), positions="prompt", backend="torch")
    plain = guard.anchors(**batch)
    extra = guard.anchors(**batch, prompt_lengths=torch.tensor([3, 4, 5, 6]))
    assert torch.equal(plain[1], extra[1])
    guard.remove()


# ---------------------------------------------------------------------------- triton backend


def test_triton_backend_through_the_hook():
    device = _triton_device()
    model = tiny_model("llama").to(device).train()
    batch = {key: value.to(device) for key, value in random_batch(batch=2, seq=8, pad_rows={1: 2}).items()}
    basis = random_basis(model, [1], k=2)
    noise = 0.1 * torch.randn(2, 8, 2, generator=torch.Generator().manual_seed(9)).to(device)
    grads = {}
    for backend in ("triton", "torch"):
        model.zero_grad()
        guard = RefusalGuard(model, basis, drift_coef=1.0, gram_coef=0.5, backend=backend)
        anchors = guard.anchors(**batch)
        guard.arm(anchors, guard.weights(**batch))
        model(**batch)
        assert guard.penalty().item() == 0.0
        guard.arm({1: anchors[1] + noise}, guard.weights(**batch))
        out = model(**batch)
        (out.loss + guard.penalty()).backward()
        grads[backend] = (guard.penalty().detach(), _grads(model))
        guard.remove()
    torch.testing.assert_close(grads["triton"][0], grads["torch"][0], rtol=1e-5, atol=1e-7)
    for name, grad in grads["torch"][1].items():
        torch.testing.assert_close(grads["triton"][1][name], grad, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------- training-engine properties


def _layer_hooks_run_without_autograd(reentrant: bool) -> bool:
    """Whether this transformers' checkpointing runs a decoder layer's forward hooks without autograd (inside a
    reentrant checkpoint: transformers 5.0 does; 5.23 runs them outside, where autograd is on)."""
    model = tiny_model("llama", seed=5)
    _enable_checkpointing(model, reentrant=reentrant)
    model.train()
    seen = []
    handle = model.model.layers[0].register_forward_hook(lambda *_: seen.append(torch.is_grad_enabled()))
    model(**random_batch()).loss.backward()
    handle.remove()
    return not seen[0]


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_same_gradients_counted_once(reentrant):
    batch = random_batch(pad_rows={3: 4})
    if _layer_hooks_run_without_autograd(reentrant):
        # The penalty would get no gradient there: refused with the fix, never silently zero.
        model = tiny_model("llama", seed=5)
        guard = RefusalGuard(model, random_basis(model, [0, 1, 2], k=2), gram_coef=0.5, backend="torch")
        anchors = guard.anchors(**batch)
        _enable_checkpointing(model, reentrant=reentrant)
        model.train()
        with pytest.raises(RuntimeError, match="use_reentrant': False"):
            _step(model, guard, batch, anchors)
        assert reentrant, "non-reentrant checkpointing must keep autograd on in the hooks"
        return
    results = []
    for checkpointing in (False, True):
        model = tiny_model("llama", seed=5)
        guard = RefusalGuard(model, random_basis(model, [0, 1, 2], k=2), gram_coef=0.5, backend="torch")
        anchors = guard.anchors(**batch)
        perturb_(model)
        if checkpointing:
            _enable_checkpointing(model, reentrant=reentrant)
            assert all(layer.gradient_checkpointing for layer in model.model.layers)
        model.train()
        _, penalty = _step(model, guard, batch, anchors)
        assert sorted(guard._losses) == [0, 1, 2]
        results.append((penalty.detach(), _grads(model)))
        guard.remove()
    (p0, g0), (p1, g1) = results
    assert p0.item() > 0
    torch.testing.assert_close(p1, p0, rtol=0, atol=0)
    assert g0.keys() == g1.keys()
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-6, atol=1e-7)


def test_checkpointing_with_hooks_inside_the_checkpoint():
    """Older transformers / custom models run hooks inside the checkpoint: the recomputation
    in backward runs them again but must not record (or count) anything."""
    torch.manual_seed(0)
    batch = random_batch(seq=10)
    results = []
    for reentrant in (None, False):
        torch.manual_seed(0)
        model = _Blocks(reentrant=reentrant)
        basis = RefusalBasis(
            {i: torch.linalg.qr(torch.randn(16, 2, generator=torch.Generator().manual_seed(i)))[0] for i in (0, 2)}
        )
        guard = RefusalGuard(model, basis, backend="torch")
        anchors = guard.anchors(input_ids=batch["input_ids"])
        with torch.no_grad():
            model.blocks[0][0].weight.add_(0.1)
        model.train()
        guard.arm(anchors, None)
        out = model(input_ids=batch["input_ids"], labels=batch["input_ids"])
        recorded = dict(guard._losses)
        (out.loss + guard.penalty()).backward()
        assert guard._losses == recorded and all(guard._losses[i] is recorded[i] for i in recorded)
        results.append((guard.penalty().detach(), _grads(model)))
        guard.remove()
    (p0, g0), (p1, g1) = results
    assert p0.item() > 0 and torch.equal(p0, p1)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-6, atol=1e-7)


def test_reentrant_checkpoint_around_hooks_is_a_clear_error():
    model = _Blocks(reentrant=True)
    for block in model.blocks:
        block.gradient_checkpointing = True
    basis = RefusalBasis({1: torch.linalg.qr(torch.randn(16, 2))[0]})
    guard = RefusalGuard(model, basis, backend="torch")
    ids = random_batch()["input_ids"]
    anchors = guard.anchors(input_ids=ids)
    model.train()
    guard.arm(anchors, None)
    with pytest.raises(RuntimeError, match="use_reentrant.*False"):
        model(input_ids=ids)
    guard.remove()


def test_gradient_accumulation_equals_one_large_batch():
    full = random_batch(batch=4, seq=10, seed=21)
    halves = [{key: value[i * 2 : (i + 1) * 2] for key, value in full.items()} for i in range(2)]
    model = tiny_model("llama", seed=4)
    guard = RefusalGuard(model, random_basis(model, [0, 2], k=3), backend="torch")
    anchors_full = guard.anchors(**full)
    anchors_halves = [guard.anchors(**half) for half in halves]
    perturb_(model)
    model.train()

    _step(model, guard, full, anchors_full)
    one_batch = _grads(model)
    model.zero_grad()
    # equal token counts per micro-batch: every loss (task and penalty) scaled by 1/2
    for half, anchors in zip(halves, anchors_halves):
        guard.arm(anchors, guard.weights(**half))
        out = model(**half)
        ((out.loss + guard.penalty()) / 2).backward()
    accumulated = _grads(model)
    for name in one_batch:
        torch.testing.assert_close(accumulated[name], one_batch[name], rtol=1e-5, atol=1e-7)
    guard.remove()


def test_gradient_accumulation_with_unequal_weights():
    """Per-token weights differ between micro-batches: scale each penalty by W_i / W_total."""
    full = random_batch(batch=4, seq=10, seed=22)
    weight = torch.rand(4, 10, generator=torch.Generator().manual_seed(5)) + 0.1
    weight[:2] *= 3.0  # the first micro-batch carries more weight
    model = tiny_model("llama", seed=4)
    guard = RefusalGuard(model, random_basis(model, [1], k=2), backend="torch")
    anchors_full = guard.anchors(**full)
    perturb_(model)
    model.train()
    inputs = {"input_ids": full["input_ids"]}

    guard.arm(anchors_full, weight)
    model(**inputs)
    guard.penalty().backward()
    one_batch = _grads(model)
    model.zero_grad()
    total = weight.sum()
    for i in range(2):
        rows = slice(i * 2, (i + 1) * 2)
        guard.arm({1: anchors_full[1][rows]}, weight[rows])
        model(input_ids=full["input_ids"][rows])
        (guard.penalty() * (weight[rows].sum() / total)).backward()
    for name, grad in one_batch.items():
        torch.testing.assert_close(_grads(model)[name], grad, rtol=1e-5, atol=1e-7)
    guard.remove()


def test_bf16_autocast():
    model = tiny_model("llama").train()
    batch = random_batch(pad_rows={0: 2})
    guard = RefusalGuard(model, random_basis(model, [0, 2], k=2), gram_coef=0.5, backend="torch")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        anchors = guard.anchors(**batch)
        guard.arm(anchors, guard.weights(**batch), validate=True)  # value checks run in fp32 under autocast
        model(**batch)
        assert guard.penalty().item() == 0.0
        RefusalGuard(model, random_basis(model, [1], k=4), backend="torch").remove()
    assert anchors[0].dtype == torch.float32
    perturb_(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        guard.arm(anchors, guard.weights(**batch))
        out = model(**batch)
        penalty = guard.penalty()
    assert penalty.dtype == torch.float32 and torch.isfinite(penalty) and penalty.item() > 0
    (out.loss + penalty).backward()
    grads = _grads(model)
    assert grads and all(torch.isfinite(g).all() for g in grads.values())
    assert any(g.abs().sum() > 0 for g in grads.values())
    guard.remove()


def test_peft_lora():
    from peft import LoraConfig, get_peft_model

    base = tiny_model("llama")
    batch = random_batch(pad_rows={1: 3})
    basis = random_basis(base, [0, 2], k=2)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    peft_model.train()
    guard = RefusalGuard(peft_model, basis, backend="torch")
    assert guard.layers_path == "model.layers"
    anchors = guard.anchors(**batch)
    assert peft_model.training
    guard.arm(anchors, guard.weights(**batch))
    peft_model(**batch)
    assert guard.penalty().item() == 0.0
    # "train" the adapters: the anchors still come from the adapter-free model
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    again = guard.anchors(**batch)
    assert all(torch.equal(again[layer], anchors[layer]) for layer in anchors)
    assert peft_model.get_model_status().enabled is not False  # adapters are back on
    guard.arm(anchors, guard.weights(**batch))
    out = peft_model(**batch)
    penalty = guard.penalty()
    assert penalty.item() > 0
    (out.loss + penalty).backward()
    lora_grads = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    assert lora_grads and all(name.count("lora_") for name in lora_grads)
    assert all(g is not None and torch.isfinite(g).all() for g in lora_grads.values())
    assert any(g.abs().sum() > 0 for g in lora_grads.values())
    guard.remove()


def test_transformers_integrated_adapter():
    """model.add_adapter(...) (PEFT through transformers): anchors come from the adapter-free model."""
    from peft import LoraConfig

    from refusalguard_kernels.versions import VersionConflictError, require

    try:  # the tested set (constraints.txt) has no conflict; a newest-releases run may (scripts/deps.py)
        require("integrated-adapters")
    except VersionConflictError as exc:
        pytest.skip(str(exc))

    model = tiny_model("llama")
    basis = random_basis(model, [1, 2])
    batch = random_batch()
    with RefusalGuard(model, basis, backend="torch") as guard:
        plain = guard.anchors(**batch)
    model.add_adapter(LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3)
    with RefusalGuard(model, basis, backend="torch") as guard:
        anchors = guard.anchors(**batch)
        assert all(torch.equal(anchors[layer], plain[layer]) for layer in plain)
        guard.arm(anchors, guard.weights(**batch))
        model(**batch)
        assert guard.penalty().item() > 0  # the adapters are active again in the training forward


@pytest.mark.multiprocess
def test_ddp_two_processes_match_one(tmp_path):
    """Each rank takes half the batch (equal token counts, so per-rank normalisation of the task
    loss and of the penalty matches the single-process mean); DDP averages the gradients."""
    from gloo_ranks import run_ranks
    from tiny_models import ddp_worker

    run_ranks(ddp_worker, 2, tmp_path, str(tmp_path))
    result = torch.load(tmp_path / "ddp.pt")

    model = ddp_reference_model()
    batch = ddp_batch()
    guard = RefusalGuard(model, random_basis(model, [0, 2], k=2), backend="torch")
    anchors = guard.anchors(**batch)
    perturbed_step(model)
    _, penalty = _step(model, guard, batch, anchors)
    assert penalty.item() > 0
    # the mean of the two ranks' penalties is the full-batch penalty
    torch.testing.assert_close(result["penalty"], penalty.detach(), rtol=1e-5, atol=1e-7)
    grads = _grads(model)
    assert grads.keys() == result["grads"].keys()
    for name, grad in grads.items():
        torch.testing.assert_close(result["grads"][name], grad, rtol=1e-5, atol=1e-7)
    guard.remove()


# ---------------------------------------------------------------------------- positions / weights


def test_weights_all_and_tensor():
    model = tiny_model("llama")
    batch = random_batch(pad_rows={1: 3}, left=True)
    guard = RefusalGuard(model, random_basis(model, [1]), backend="torch", exclude_first=0)
    assert torch.equal(guard.weights(**batch), batch["attention_mask"].float())
    assert torch.equal(guard.weights(input_ids=batch["input_ids"]), torch.ones(4, 12))
    guard.remove()
    # the default never guards the first non-padding token of a row (the attention sink)
    guard = RefusalGuard(model, random_basis(model, [1]), backend="torch")
    want = batch["attention_mask"].float()
    want[[0, 1, 2, 3], [0, 3, 0, 0]] = 0.0  # row 1 is left-padded by 3
    assert torch.equal(guard.weights(**batch), want)
    guard.remove()
    fixed = torch.rand(4, 12) + 0.5
    guard = RefusalGuard(model, random_basis(model, [1]), positions=fixed, backend="torch")
    assert torch.equal(guard.weights(**batch), fixed)
    with pytest.raises(ValueError, match="shape"):
        guard.weights(**random_batch(batch=2))
    guard.remove()
    with pytest.raises(ValueError, match=">= 0"):
        RefusalGuard(model, random_basis(model, [1]), positions=-fixed)


@pytest.mark.parametrize("exclude_first", [0, 1])
@pytest.mark.parametrize("left", [False, True])
def test_weights_prompt_response_reft(left, exclude_first):
    model = tiny_model("llama")
    seq = 10
    batch = random_batch(batch=3, seq=seq, pad_rows={1: 3, 2: 1}, left=left)
    prompt_lengths = torch.tensor([4, 2, 5])
    lengths = [10, 7, 9]

    def expected(row_fn):
        out = torch.zeros(3, seq)
        for row in range(3):
            start = seq - lengths[row] if left else 0
            for j in row_fn(row):
                if j >= exclude_first:
                    out[row, start + j] = 1.0
        return out

    prompt = expected(lambda r: range(prompt_lengths[r]))
    response = expected(lambda r: range(prompt_lengths[r], lengths[r]))
    reft = expected(lambda r: sorted({0, *range(max(0, prompt_lengths[r] - 2), prompt_lengths[r])}))
    in_prompt = torch.zeros(3, seq, dtype=torch.bool)  # the whole prompt, whatever exclude_first
    for row in range(3):
        start = seq - lengths[row] if left else 0
        in_prompt[row, start : start + prompt_lengths[row]] = True
    for positions, want in (("prompt", prompt), ("response", response), ("f1+l2", reft)):
        guard = RefusalGuard(
            model, random_basis(model, [1]), positions=positions, backend="torch", exclude_first=exclude_first
        )
        assert torch.equal(guard.weights(**batch, prompt_lengths=prompt_lengths), want), positions
        # the same boundary from labels (-100 on prompt and padding)
        labels = batch["input_ids"].clone()
        labels[in_prompt | (batch["attention_mask"] == 0)] = -100
        assert torch.equal(
            guard.weights(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels), want
        ), positions
        guard.remove()


def test_weights_errors():
    model = tiny_model("llama")
    batch = random_batch()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    guard = RefusalGuard(model, random_basis(model, [1]), positions="response", backend="torch")
    with pytest.raises(ValueError, match="prompt_lengths .* labels"):
        guard.weights(**inputs)
    with pytest.raises(ValueError, match="between 0 and"):
        guard.weights(**inputs, prompt_lengths=torch.tensor([1, 2, 3, 13]))
    with pytest.raises(ValueError, match="2 entries for a batch of 4"):
        guard.weights(**inputs, prompt_lengths=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="needs input_ids"):
        guard.weights(labels=batch["labels"])
    guard.remove()


@pytest.mark.parametrize("positions", ["every", "f5l5", "f0+l0", "+l3", ""])
def test_unknown_positions(positions):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="unknown positions"):
        RefusalGuard(model, random_basis(model, [1]), positions=positions)


def test_parse_positions():
    assert parse_positions("f5+l5") == (5, 5)
    assert parse_positions("l1") == (0, 1)
    assert parse_positions("f3") == (3, 0)
    with pytest.raises(TypeError):
        parse_positions(3)


# ---------------------------------------------------------------------------- bad input


def test_basis_hidden_size_mismatch():
    model = tiny_model("llama")
    wide = tiny_model("llama", hidden_size=64, intermediate_size=128)
    with pytest.raises(ValueError, match="hidden size 64 .* model has hidden size 32"):
        RefusalGuard(model, random_basis(wide, [1]))


def test_basis_layer_beyond_model():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"layers \[5\] .* 3 decoder layers"):
        RefusalGuard(model, random_basis(model, [1, 5]))


def test_bad_constructor_arguments():
    model = tiny_model("llama")
    basis = random_basis(model, [1])
    with pytest.raises(TypeError, match="RefusalBasis"):
        RefusalGuard(model, basis[1])
    with pytest.raises(ValueError, match="unknown backend"):
        RefusalGuard(model, basis, backend="cuda_fast")
    with pytest.raises(ValueError, match="drift_coef"):
        RefusalGuard(model, basis, drift_coef=-1.0)
    with pytest.raises(ValueError, match="gram_coef"):
        RefusalGuard(model, basis, gram_coef=float("nan"))
    assert not any(m._forward_hooks for m in model.modules())


def test_basis_corrupted_after_creation_is_caught():
    model = tiny_model("llama")
    basis = random_basis(model, [1])
    basis.bases[1].mul_(2.0)
    with pytest.raises(ValueError, match="layer 1: .*orthonormal"):
        RefusalGuard(model, basis)


def test_bad_anchors():
    model = tiny_model("llama")
    batch = random_batch()
    guard = RefusalGuard(model, random_basis(model, [0, 2], k=2), backend="torch")
    anchors = guard.anchors(**batch)
    with pytest.raises(ValueError, match=r"no entry for layers \[2\]"):
        guard.arm({0: anchors[0]}, None)
    with pytest.raises(ValueError, match="k=2"):
        guard.arm({0: anchors[0][..., :1], 2: anchors[2][..., :1]}, None)
    with pytest.raises(ValueError, match="other layers"):
        guard.arm({0: anchors[0], 2: anchors[2][:2]}, None)
    with pytest.raises(ValueError, match="weight has shape"):
        guard.arm(anchors, torch.ones(4, 11))
    with pytest.raises(TypeError, match="dict"):
        guard.arm(list(anchors.values()), None)
    bad = {0: anchors[0].clone(), 2: anchors[2]}
    bad[0][0, 0, 0] = float("nan")
    guard.arm(bad, None)  # values are checked where anchors are made, or with validate=True
    with pytest.raises(ValueError, match="NaN or Inf"):
        guard.arm(bad, None, validate=True)
    # anchors for another batch shape: a clear error in the forward
    guard.arm(anchors, None)
    with pytest.raises(ValueError, match="arm with guard.anchors"):
        model(**random_batch(batch=2))
    guard.remove()


# ---------------------------------------------------------------------------- frozen anchors at any level


def _adapted(config_kind: str, seed: int = 11):
    """A tiny llama with a PEFT adapter whose weights have moved away from their no-op init."""
    from peft import IA3Config, LoraConfig, get_peft_model

    base = tiny_model("llama")
    if config_kind == "ia3":
        config = IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    else:
        config = LoraConfig(
            r=4, target_modules=["q_proj", "v_proj", "o_proj"], lora_dropout=0.0, use_dora=config_kind == "dora"
        )
    peft_model = get_peft_model(base, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in peft_model.parameters():
            if param.requires_grad:
                param.add_(0.3 * torch.randn(param.shape, generator=gen))
    return peft_model


_LEVELS = {
    "peft_model": lambda pm: pm,
    "base_model": lambda pm: pm.base_model,  # the LoraModel / IA3Model
    "get_base_model": lambda pm: pm.get_base_model(),  # the transformers causal LM
    "decoder": lambda pm: pm.get_base_model().model,  # the bare LlamaModel (model.model)
}


@pytest.mark.parametrize("adapter", ["lora", "dora", "ia3"])
@pytest.mark.parametrize("level", ["base_model", "get_base_model", "decoder"])
def test_guard_on_inner_model_anchors_to_frozen_weights(adapter, level):
    """Issue #10: a guard on the model inside a PeftModel took its anchors with the adapters on,
    so once they moved the penalty was exactly 0 at every step."""
    peft_model = _adapted(adapter)
    batch = random_batch(pad_rows={2: 4})
    basis = random_basis(peft_model, [0, 2], k=2)
    with RefusalGuard(peft_model, basis, backend="torch") as outer:
        want_anchors = outer.anchors(**batch)
        outer.arm(want_anchors, outer.weights(**batch))
        peft_model(**batch)
        want = outer.penalty().detach()
    assert want.item() > 1e-6  # the moved adapter really drifts the coordinates
    with RefusalGuard(_LEVELS[level](peft_model), basis, backend="torch") as inner:
        anchors = inner.anchors(**batch)
        assert all(torch.equal(anchors[layer], want_anchors[layer]) for layer in want_anchors)
        inner.arm(anchors, inner.weights(**batch))
        peft_model(**batch)
        assert torch.equal(inner.penalty().detach(), want)


def test_frozen_anchor_pass_restores_adapter_state_exactly():
    """The adapter on/off flags and requires_grad come back as they were, also after an error
    in the anchor pass; a partly frozen adapter stays partly frozen."""
    from refusalguard_kernels.integration.model_utils import adapter_layers

    peft_model = _adapted("lora")
    frozen_name = next(name for name, p in peft_model.named_parameters() if "lora_A" in name)
    dict(peft_model.named_parameters())[frozen_name].requires_grad_(False)
    layers = adapter_layers(peft_model)
    layers[0][1]._disable_adapters = True  # one layer switched off by the user
    flags = [module._disable_adapters for _, module in layers]
    grads = {name: p.requires_grad for name, p in peft_model.named_parameters()}
    batch = random_batch()
    basis = random_basis(peft_model, [1], k=1)
    with RefusalGuard(peft_model.get_base_model(), basis, backend="torch") as guard:
        guard.anchors(**batch)
        assert [module._disable_adapters for _, module in layers] == flags
        assert {name: p.requires_grad for name, p in peft_model.named_parameters()} == grads

        def boom(module, args, output):
            assert all(m._disable_adapters for _, m in layers)  # off during the pass
            raise RuntimeError("boom")

        handle = find_decoder_layers(peft_model)[0].register_forward_hook(boom)
        with pytest.raises(RuntimeError, match="boom"):
            guard.anchors(**batch)
        handle.remove()
        assert [module._disable_adapters for _, module in layers] == flags
        assert {name: p.requires_grad for name, p in peft_model.named_parameters()} == grads


def test_merged_adapter_is_a_clear_error():
    from refusalguard_kernels.integration.model_utils import AdapterStateError

    peft_model = _adapted("lora")
    peft_model.merge_adapter()
    basis = random_basis(peft_model, [1], k=1)
    with RefusalGuard(peft_model.get_base_model(), basis, backend="torch") as guard:
        with pytest.raises(AdapterStateError, match="unmerge_adapter"):
            guard.anchors(**random_batch())


# ---------------------------------------------------------------------------- layer reduction


def test_layer_reduction_mean_is_sum_over_number_of_layers():
    model = tiny_model("llama")
    batch = random_batch(pad_rows={0: 2})
    basis = random_basis(model, [0, 1, 2], k=2)
    with RefusalGuard(model, basis, backend="torch") as guard:
        anchors = guard.anchors(**batch)
    perturb_(model, scale=0.05)
    results = {}
    for reduction in ("sum", "mean"):
        with RefusalGuard(model, basis, backend="torch", layer_reduction=reduction) as guard:
            guard.arm(anchors, guard.weights(**batch))
            model(**batch)
            results[reduction] = guard.penalty().detach()
            layer_sum = sum(guard.layer_losses().values())
    assert results["sum"].item() > 1e-6
    assert results["sum"].item() == pytest.approx(layer_sum, rel=1e-6)
    assert torch.equal(results["mean"], results["sum"] / 3)
    with pytest.raises(ValueError, match="layer_reduction"):
        RefusalGuard(model, basis, layer_reduction="max")


# ---------------------------------------------------------------------------- issue 17: units, sinks, boundaries


def _with_spread(basis, spreads):
    return RefusalBasis(basis.bases, {**basis.metadata, "coord_spread": dict(spreads)})


def test_spread_units_divide_each_layer_and_average():
    from refusalguard_kernels.reference import geometry_loss

    model = tiny_model("llama")
    batch = random_batch()
    raw_basis = random_basis(model, [0, 2], k=2)
    basis = _with_spread(raw_basis, {0: 0.5, 2: 4.0})
    guard = RefusalGuard(model, basis, drift_coef=3.0, gram_coef=2.0, backend="torch")
    assert (guard.coef_units, guard.layer_reduction) == ("spread", "mean")
    assert guard.kernel_coefs(0) == (12.0, 32.0) and guard.kernel_coefs(2) == (3.0 / 16, 2.0 / 256)
    anchors = guard.anchors(**batch)
    perturb_(model, seed=3, scale=0.05)
    captured = {}
    handles = [
        find_decoder_layers(model)[i].register_forward_hook(
            lambda m, a, o, i=i: captured.__setitem__(i, (o[0] if isinstance(o, tuple) else o).detach())
        )
        for i in (0, 2)
    ]
    weight = guard.weights(**batch)
    guard.arm(anchors, weight)
    model(**batch)
    for handle in handles:
        handle.remove()
    expected = sum(
        geometry_loss(
            captured[i].double(), basis[i].double(), anchors[i].double(), weight.double(),
            drift_coef=3.0 / s**2, gram_coef=2.0 / s**4,
        )
        for i, s in ((0, 0.5), (2, 4.0))
    ) / 2  # fmt: skip
    torch.testing.assert_close(guard.penalty().double(), expected, rtol=1e-5, atol=1e-9)
    guard.remove()
    # the same basis without spreads: raw units, summed, with a warning; explicit 'spread' is an error
    with pytest.warns(UserWarning, match="records no coord_spread for layers \\[0, 2\\]"):
        raw = RefusalGuard(model, raw_basis, backend="torch")
    assert (raw.coef_units, raw.layer_reduction, raw.kernel_coefs(0)) == ("raw", "sum", (1.0, 0.0))
    raw.remove()
    with pytest.raises(ValueError, match="coef_units='spread' but the basis records no coord_spread"):
        RefusalGuard(model, raw_basis, coef_units="spread")
    with pytest.raises(ValueError, match="unknown coef_units"):
        RefusalGuard(model, basis, coef_units="sd")
    with pytest.raises(ValueError, match="exclude_first must be an int >= 0"):
        RefusalGuard(model, basis, exclude_first=-1)


def test_extracted_bases_carry_their_spread():
    from refusalguard_kernels.integration.basis import extract_refusal_basis

    tokenizer = tiny_tokenizer()
    model = tiny_model("llama", tokenizer)
    basis = extract_refusal_basis(model, tokenizer, "builtin:harmful", "builtin:harmless", k=2, method="svd",
                                  layers=[0, 1], show_progress=False)  # fmt: skip
    for layer in basis.layers:
        assert basis.coord_spread(layer) > 0
    guard = RefusalGuard(model, basis, backend="torch")
    assert guard.coef_units == "spread"
    guard.remove()


def test_first_arm_warns_about_an_outlier_token():
    model = tiny_model("llama")
    batch = random_batch()
    guard = RefusalGuard(model, random_basis(model, [1], k=2), backend="torch", coef_units="raw")
    anchors = guard.anchors(**batch)
    anchors[1] = anchors[1].clone()
    anchors[1][2, 5] *= 1000.0  # a massive-activation token
    with pytest.warns(UserWarning, match=r"row 2, position 5\).*massive activations"):
        guard.arm(anchors, guard.weights(**batch))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        guard.arm(anchors, guard.weights(**batch))  # once per guard: the check costs a host sync
    guard.remove()


def test_a_boundary_that_cannot_be_honoured_is_an_error_now_or_at_the_next_check():
    model = tiny_model("llama")
    batch = random_batch()
    good = {**batch, "labels": batch["labels"].clone()}
    good["labels"][:, :4] = -100
    for positions in ("prompt", "response", "f2+l1"):
        guard = RefusalGuard(model, random_basis(model, [1]), positions=positions, backend="torch")
        with pytest.raises(ValueError, match="no row of this batch has a prompt token.*labels train on every token"):
            guard.weights(**batch)  # labels = input_ids: the first batch is checked at once
        guard.remove()
        guard = RefusalGuard(model, random_basis(model, [1]), positions=positions, backend="torch")
        guard.weights(**good)
        guard.weights(**batch)  # later batches: flagged on the device, no host sync
        with pytest.raises(ValueError, match="no row of this batch has a prompt token"):
            guard.check_pending()
        guard.check_pending()  # reported once
        guard.remove()
    guard = RefusalGuard(model, random_basis(model, [1]), positions="prompt", backend="torch")
    with pytest.raises(ValueError, match="its prompt_lengths are all 0"):
        guard.weights(**batch, prompt_lengths=torch.zeros(4, dtype=torch.long))
    guard.remove()


def test_penalty_forward_runs_eval_mode_with_gradients():
    model = tiny_model("gpt2", resid_pdrop=0.5, embd_pdrop=0.5, attn_pdrop=0.5).train()
    batch = random_batch()
    guard = RefusalGuard(model, random_basis(model, [0, 1], k=2), backend="torch", coef_units="raw")
    anchors = guard.anchors(**batch)
    guard.arm(anchors, guard.weights(**batch))
    assert guard.penalty_forward(**batch).item() == 0.0 and model.training  # eval inside, mode restored after
    perturb_(model, seed=5, scale=0.05)
    penalty = guard.penalty_forward(**batch)
    assert penalty.item() > 0 and penalty.requires_grad
    penalty.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    guard.disarm()
    with pytest.raises(RuntimeError, match="needs an armed guard"):
        guard.penalty_forward(**batch)
    guard.remove()
