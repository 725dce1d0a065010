import math
import os

import pytest
import torch
from tiny_models import char_tokenizer, random_basis, tiny_model

from refusalguard_kernels import ORTHONORMAL_ATOL
from refusalguard_kernels.integration.basis import BASIS_FILENAME, RefusalBasis, default_layers, extract_refusal_basis
from refusalguard_kernels.integration.prompts import builtin_prompts

HARMFUL = builtin_prompts("harmful")[:12]
HARMLESS = builtin_prompts("harmless")[:10]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads only contend
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", seed=0)


def _reference_acts(model, tokenizer, prompts, layer, n_last, chat=True):
    """Layer output, one prompt at a time (no padding), mean of the last n_last tokens, float64."""
    captured = []
    handle = model.model.layers[layer].register_forward_hook(lambda m, a, out: captured.append(out))
    rows = []
    try:
        for prompt in prompts:
            if chat:
                text = tokenizer.apply_chat_template(
                    [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
                )
                ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
            else:
                ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
            captured.clear()
            with torch.no_grad():
                model(input_ids=ids)
            rows.append(captured[0][0, -n_last:].double().mean(0))
    finally:
        handle.remove()
    return torch.stack(rows)


def _assert_orthonormal(basis):
    eye = torch.eye(basis.shape[1], dtype=torch.float64)
    assert (basis.double().T @ basis.double() - eye).abs().max() < ORTHONORMAL_ATOL


def test_default_layers():
    assert default_layers(32) == list(range(12, 20))
    assert default_layers(4) == [1, 2]
    assert default_layers(3) == [1]
    assert default_layers(1) == [0]
    assert default_layers(80) == list(range(32, 48))


def test_dim_matches_unbatched_reference(model, tokenizer):
    basis = extract_refusal_basis(model, tokenizer, HARMFUL, HARMLESS, layers=[0, 2], batch_size=5, show_progress=False)
    assert basis.layers == [0, 2] and basis.k == 1 and basis.hidden_size == 32
    for layer in (0, 2):
        h = _reference_acts(model, tokenizer, HARMFUL, layer, 1)
        l = _reference_acts(model, tokenizer, HARMLESS, layer, 1)
        direction = h.mean(0) - l.mean(0)
        direction = direction / direction.norm()
        got = basis[layer][:, 0].double()
        _assert_orthonormal(basis[layer])
        torch.testing.assert_close(got, direction, atol=2e-5, rtol=0)
        # explained share of the harmful-minus-harmless-mean offsets, and separation in pooled std
        offsets = h - l.mean(0)
        share = float((offsets @ direction).pow(2).sum() / offsets.pow(2).sum())
        assert basis.metadata["explained_share"][layer] == pytest.approx(share, abs=1e-5)
        ph, pl = h @ direction, l @ direction
        scatter = ((ph - ph.mean()) ** 2).sum() + ((pl - pl.mean()) ** 2).sum()
        pooled = math.sqrt(scatter.item() / (len(ph) + len(pl) - 2))
        assert basis.metadata["separation"][layer] == pytest.approx(float(ph.mean() - pl.mean()) / pooled, rel=1e-4)
        assert basis.metadata["separation"][layer] > 0


def test_last_layer_has_no_final_norm(model, tokenizer):
    # the last decoder layer's output, not hidden_states[-1] (which carries the final norm)
    basis = extract_refusal_basis(model, tokenizer, HARMFUL, HARMLESS, layers=[-1], show_progress=False)
    assert basis.layers == [2]
    h = _reference_acts(model, tokenizer, HARMFUL, 2, 1)
    l = _reference_acts(model, tokenizer, HARMLESS, 2, 1)
    direction = (h.mean(0) - l.mean(0)) / (h.mean(0) - l.mean(0)).norm()
    torch.testing.assert_close(basis[2][:, 0].double(), direction, atol=2e-5, rtol=0)


def test_matches_output_hidden_states(model, tokenizer):
    basis = extract_refusal_basis(model, tokenizer, HARMFUL, HARMLESS, layers=[1], show_progress=False)
    rows = {}
    for name, prompts in (("h", HARMFUL), ("l", HARMLESS)):
        acts = []
        for prompt in prompts:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
            ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
            with torch.no_grad():
                out = model(input_ids=ids, output_hidden_states=True)
            acts.append(out.hidden_states[2][0, -1].double())  # hidden_states[i + 1] is layer i's output
        rows[name] = torch.stack(acts)
    direction = rows["h"].mean(0) - rows["l"].mean(0)
    torch.testing.assert_close(basis[1][:, 0].double(), direction / direction.norm(), atol=2e-5, rtol=0)


def test_batching_and_padding_side_do_not_matter(model):
    one = extract_refusal_basis(
        model, char_tokenizer(padding_side="left"), HARMFUL, HARMLESS, layers=[1], batch_size=1, show_progress=False
    )
    many = extract_refusal_basis(
        model, char_tokenizer(padding_side="right"), HARMFUL, HARMLESS, layers=[1], batch_size=7, show_progress=False
    )
    torch.testing.assert_close(one[1], many[1], atol=2e-5, rtol=0)


def test_post_instruction_averages_template_suffix(model, tokenizer):
    basis = extract_refusal_basis(
        model, tokenizer, HARMFUL, HARMLESS, layers=[1], positions="post-instruction", show_progress=False
    )
    # the test template puts "<|end|><|assistant|>" after the user message: 2 tokens
    h = _reference_acts(model, tokenizer, HARMFUL, 1, 2)
    l = _reference_acts(model, tokenizer, HARMLESS, 1, 2)
    direction = (h.mean(0) - l.mean(0)) / (h.mean(0) - l.mean(0)).norm()
    torch.testing.assert_close(basis[1][:, 0].double(), direction, atol=2e-5, rtol=0)
    assert basis.metadata["positions"] == "post-instruction"
    last = extract_refusal_basis(model, tokenizer, HARMFUL, HARMLESS, layers=[1], show_progress=False)
    assert (last[1] - basis[1]).abs().max() > 1e-3


def test_svd_basis(model, tokenizer):
    dim = extract_refusal_basis(model, tokenizer, HARMFUL, HARMLESS, layers=[1], show_progress=False)
    svd = extract_refusal_basis(model, tokenizer, HARMFUL, HARMLESS, layers=[1], k=4, method="svd", show_progress=False)
    assert svd[1].shape == (32, 4) and svd[1].dtype == torch.float32
    _assert_orthonormal(svd[1])
    torch.testing.assert_close(svd[1][:, 0], dim[1][:, 0], atol=1e-6, rtol=0)
    # the extra directions are the top singular directions of the centred harmful activations, dim removed
    h = _reference_acts(model, tokenizer, HARMFUL, 1, 1)
    r = dim[1][:, 0].double()
    centred = h - h.mean(0)
    centred = centred - (centred @ r)[:, None] * r[None, :]
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    for j in range(3):
        assert abs(float(svd[1][:, j + 1].double() @ vh[j])) == pytest.approx(1.0, abs=1e-4)
    assert svd.metadata["explained_share"][1] > dim.metadata["explained_share"][1]
    assert 0 < svd.metadata["explained_share"][1] <= 1
    assert svd.metadata["separation"][1] == pytest.approx(dim.metadata["separation"][1], rel=1e-5)
    assert svd.metadata["method"] == "svd" and svd.metadata["k"] == 4


def test_metadata(model, tokenizer):
    basis = extract_refusal_basis(model, tokenizer, "builtin:harmful", HARMLESS, layers=[0], show_progress=False)
    meta = basis.metadata
    assert meta["n_harmful"] == len(builtin_prompts("harmful")) and meta["n_harmless"] == len(HARMLESS)
    assert meta["hidden_size"] == 32 and meta["layers"] == [0] and meta["method"] == "dim"
    assert meta["positions"] == "last" and meta["layers_path"] == "model.layers" and meta["chat_template"] is True
    assert meta["model_name"]


def test_default_layers_used(model, tokenizer):
    basis = extract_refusal_basis(model, tokenizer, HARMFUL, HARMLESS, show_progress=False)
    assert basis.layers == default_layers(3)


def test_model_mode_restored_and_untouched(tokenizer):
    model = tiny_model("llama", seed=0).train()
    before = {n: p.clone() for n, p in model.named_parameters()}
    extract_refusal_basis(model, tokenizer, HARMFUL[:3], HARMLESS[:3], layers=[1], show_progress=False)
    assert all(m.training for m in model.modules())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert not any(m._forward_hooks for m in model.modules())


def test_without_chat_template_gpt2():
    tokenizer = char_tokenizer(chat=False)
    model = tiny_model("gpt2", seed=0)
    basis = extract_refusal_basis(model, tokenizer, HARMFUL, HARMLESS, layers=[1], show_progress=False)
    captured = []
    handle = model.transformer.h[1].register_forward_hook(lambda m, a, out: captured.append(out))
    acts = {}
    for name, prompts in (("h", HARMFUL), ("l", HARMLESS)):
        rows = []
        for prompt in prompts:
            captured.clear()
            with torch.no_grad():
                model(**tokenizer(prompt, return_tensors="pt"))
            out = captured[0][0] if isinstance(captured[0], tuple) else captured[0]
            rows.append(out[0, -1].double())
        acts[name] = torch.stack(rows)
    handle.remove()
    direction = acts["h"].mean(0) - acts["l"].mean(0)
    torch.testing.assert_close(basis[1][:, 0].double(), direction / direction.norm(), atol=2e-5, rtol=0)
    assert basis.metadata["chat_template"] is False
    with pytest.raises(ValueError, match="post-instruction.*chat template"):
        extract_refusal_basis(model, tokenizer, HARMFUL, HARMLESS, positions="post-instruction", show_progress=False)


def test_peft_model(tokenizer):
    from peft import LoraConfig, get_peft_model

    base = tiny_model("llama", seed=0)
    plain = extract_refusal_basis(base, tokenizer, HARMFUL, HARMLESS, layers=[1], show_progress=False)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    wrapped = extract_refusal_basis(peft_model, tokenizer, HARMFUL, HARMLESS, layers=[1], show_progress=False)
    torch.testing.assert_close(wrapped[1], plain[1], atol=1e-6, rtol=0)  # fresh LoRA adds exactly zero


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(method="pca"), "unknown method"),
        (dict(positions="first"), "unknown positions"),
        (dict(k=0, method="svd"), "k must be"),
        (dict(k=65, method="svd"), "k must be"),
        (dict(k=2), "method='svd'"),
        (dict(k=13, method="svd"), "at least 13 harmful prompts"),
        (dict(layers=[3]), "out of range"),
        (dict(layers=[-4]), "out of range"),
        (dict(layers=[]), "empty"),
        (dict(layers=[1, 1]), "duplicates"),
        (dict(layers=["1"]), "must be ints"),
        (dict(batch_size=0), "batch_size"),
    ],
)
def test_bad_arguments(model, tokenizer, kwargs, match):
    with pytest.raises(ValueError, match=match):
        extract_refusal_basis(model, tokenizer, HARMFUL, HARMLESS, show_progress=False, **kwargs)


def test_empty_prompt_lists(model, tokenizer):
    with pytest.raises(ValueError, match="harmful: no prompts"):
        extract_refusal_basis(model, tokenizer, [], HARMLESS, show_progress=False)
    with pytest.raises(ValueError, match="harmless: no prompts"):
        extract_refusal_basis(model, tokenizer, HARMFUL, [], show_progress=False)
    with pytest.raises(ValueError, match="neither a file"):
        extract_refusal_basis(model, tokenizer, "how do I", HARMLESS, show_progress=False)


def test_svd_rank_too_small(model, tokenizer):
    # three copies of two prompts: the centred harmful activations span one direction beyond the mean
    with pytest.raises(ValueError, match="lower k"):
        extract_refusal_basis(
            model, tokenizer, HARMFUL[:2] * 3, HARMLESS, layers=[1], k=4, method="svd", show_progress=False
        )


# ------------------------------------------------------------------------- RefusalBasis


def test_save_load_roundtrip(model, tokenizer, tmp_path):
    basis = extract_refusal_basis(
        model, tokenizer, HARMFUL, HARMLESS, layers=[0, 2], k=2, method="svd", show_progress=False
    )
    path = basis.save(tmp_path / "basis.safetensors")
    loaded = RefusalBasis.load(path)
    assert loaded.layers == [0, 2]
    for layer in (0, 2):
        assert torch.equal(loaded[layer], basis[layer])
    assert loaded.metadata == basis.metadata
    assert set(loaded.metadata["explained_share"]) == {0, 2}
    assert sorted(os.listdir(tmp_path)) == ["basis.safetensors"]  # no temp file left
    # a folder gets the standard file name
    folder = tmp_path / "adapter"
    folder.mkdir()
    assert basis.save(folder) == folder / BASIS_FILENAME
    assert RefusalBasis.load(folder).metadata == basis.metadata
    assert RefusalBasis.load(path, hidden_size=32).k == 2


def test_save_is_atomic(tmp_path, monkeypatch):
    import safetensors.torch

    old = random_basis(tiny_model("llama"), [1], k=1, seed=1)
    path = old.save(tmp_path / "b.safetensors")
    new = random_basis(tiny_model("llama"), [1], k=1, seed=2)

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        new.save(path)
    assert sorted(os.listdir(tmp_path)) == ["b.safetensors"]
    assert torch.equal(RefusalBasis.load(path)[1], old[1])


def test_load_errors(tmp_path):
    basis = random_basis(tiny_model("llama"), [1], k=2)
    path = basis.save(tmp_path / "b.safetensors")
    with pytest.raises(ValueError, match="hidden size 32 .* 64 was expected"):
        RefusalBasis.load(path, hidden_size=64)
    with pytest.raises(FileNotFoundError, match="no refusal basis"):
        RefusalBasis.load(tmp_path / "missing.safetensors")
    import safetensors.torch

    other = tmp_path / "weights.safetensors"
    safetensors.torch.save_file({"w": torch.randn(3, 3)}, str(other))
    with pytest.raises(ValueError, match="not a RefusalBasis"):
        RefusalBasis.load(other)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="cannot read"):
        RefusalBasis.load(junk)


def test_check_model_hidden_size_and_layers():
    basis = random_basis(tiny_model("llama"), [1, 2], k=2)
    basis.check_model(tiny_model("llama"))
    with pytest.raises(ValueError, match="hidden size 32 .* model has hidden size 64"):
        basis.check_model(tiny_model("llama", hidden_size=64, intermediate_size=128))
    with pytest.raises(ValueError, match=r"layers \[2\] .* 2 decoder layers"):
        basis.check_model(tiny_model("llama", num_hidden_layers=2))


def test_basis_validation():
    good = torch.linalg.qr(torch.randn(16, 2, dtype=torch.float64))[0]
    basis = RefusalBasis({3: good})
    assert basis.k == 2 and basis.hidden_size == 16 and basis[3].dtype == torch.float32
    assert basis.metadata["layers"] == [3] and "k=2" in repr(basis)
    with pytest.raises(ValueError, match="not orthonormal"):
        RefusalBasis({0: torch.randn(16, 2)})
    with pytest.raises(ValueError, match="NaN or Inf"):
        RefusalBasis({0: torch.full((16, 1), float("nan"))})
    with pytest.raises(ValueError, match="same"):
        RefusalBasis({0: good, 1: good[:, :1]})
    with pytest.raises(ValueError, match="non-empty"):
        RefusalBasis({})
    with pytest.raises(ValueError, match="ints >= 0"):
        RefusalBasis({-1: good})
    with pytest.raises(ValueError, match="metadata says hidden_size=8"):
        RefusalBasis({0: good}, {"hidden_size": 8})
    moved = basis.to("cpu")
    assert torch.equal(moved[3], basis[3]) and moved is not basis


# ---------------------------------------------------------------------------- issue #10


def test_corrupted_or_truncated_basis_file_is_a_clear_error(tmp_path):
    """A cut-short or bit-flipped refusal_basis.safetensors names the file and the fix."""
    basis = random_basis(tiny_model("llama"), [0, 2], k=2)
    path = basis.save(tmp_path / "refusal_basis.safetensors")
    data = path.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    cases = {
        "truncated.safetensors": data[: len(data) - 40],  # a copy cut off inside the tensor data
        "header_cut.safetensors": data[: 8 + header_len // 2],
    }
    flipped = bytearray(data)
    flipped[8 + header_len + 3] ^= 0x40  # an exponent bit of the first stored value: not orthonormal
    cases["flipped.safetensors"] = bytes(flipped)
    for name, content in cases.items():
        bad = tmp_path / name
        bad.write_bytes(content)
        with pytest.raises(ValueError, match="corrupted or truncated") as info:
            RefusalBasis.load(bad)
        assert str(bad) in str(info.value) and "extract_refusal_basis" in str(info.value), name
    assert torch.equal(RefusalBasis.load(path)[2], basis[2])  # the intact file still loads


def test_extraction_on_an_adapted_model_uses_the_frozen_weights(tokenizer):
    """Whatever level of a PeftModel is given, a moved adapter does not change the basis (adapters
    are switched off for the pass and switched back on after); adapters='on' measures the tuned model."""
    from peft import LoraConfig, get_peft_model

    from refusalguard_kernels.integration.model_utils import adapter_layers

    plain = extract_refusal_basis(
        tiny_model("llama", seed=0), tokenizer, HARMFUL, HARMLESS, layers=[1, 2], show_progress=False
    )
    peft_model = get_peft_model(
        tiny_model("llama", seed=0), LoraConfig(r=4, target_modules=["q_proj", "v_proj", "o_proj"], lora_dropout=0.0)
    )
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.5 * torch.randn(param.shape, generator=gen))
    for model in (peft_model, peft_model.base_model, peft_model.get_base_model()):
        frozen = extract_refusal_basis(model, tokenizer, HARMFUL, HARMLESS, layers=[1, 2], show_progress=False)
        for layer in (1, 2):
            torch.testing.assert_close(frozen[layer], plain[layer], atol=1e-6, rtol=0)
        assert not any(module._disable_adapters for _, module in adapter_layers(peft_model))
    tuned = extract_refusal_basis(
        peft_model.get_base_model(), tokenizer, HARMFUL, HARMLESS, layers=[2], adapters="on", show_progress=False
    )
    assert (tuned[2] - plain[2]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="unknown adapters"):
        extract_refusal_basis(peft_model, tokenizer, HARMFUL, HARMLESS, adapters="maybe", show_progress=False)
