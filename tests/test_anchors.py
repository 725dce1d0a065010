"""Cached anchors: the column round trip, the fingerprint checks, the collator's padding,
and the step-0 penalty they give."""

from __future__ import annotations

import datasets
import pytest
import torch
from tiny_models import tiny_model, tiny_tokenizer

from refusalguard_kernels import orthonormalize_basis
from refusalguard_kernels.integration.anchors import (
    ANCHOR_COLUMN,
    AnchorCollator,
    CachedAnchorsError,
    add_cached_anchors,
    anchor_column_names,
    anchors_fingerprint,
    basis_fingerprint,
    check_cached_anchors,
    model_fingerprint,
    token_fingerprint,
)
from refusalguard_kernels.integration.basis import RefusalBasis
from refusalguard_kernels.integration.hooks import RefusalGuard

K = 2
LAYERS = [0, 1]


def random_basis(hidden: int = 32, *, seed: int = 0, layers=LAYERS, k: int = K) -> RefusalBasis:
    gen = torch.Generator().manual_seed(seed)
    bases = {layer: orthonormalize_basis(torch.randn(hidden, k, generator=gen)) for layer in layers}
    return RefusalBasis(bases, {"method": "svd", "positions": "last", "model_name": "tiny"})


def random_rows(n: int, *, seed: int = 0, vocab: int = 200, min_len: int = 4, max_len: int = 14) -> list[dict]:
    """Examples of varied length with a prompt/response split (labels -100 on the prompt)."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=gen))
        ids = torch.randint(7, vocab, (length,), generator=gen).tolist()
        prompt = int(torch.randint(1, length, (1,), generator=gen))
        rows.append(
            {
                "input_ids": ids,
                "attention_mask": [1] * length,
                "labels": [-100] * prompt + ids[prompt:],
                "prompt_lengths": prompt,
            }
        )
    return rows


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_model("llama", tokenizer, seed=0)


@pytest.fixture(scope="module")
def guard(model):
    guard = RefusalGuard(model, random_basis(), positions="response", backend="torch")
    yield guard
    guard.remove()


@pytest.fixture(scope="module")
def dataset():
    return datasets.Dataset.from_list(random_rows(10, seed=1))


@pytest.fixture(scope="module")
def cached(dataset, model, guard):
    return add_cached_anchors(dataset, model, guard, batch_size=4, show_progress=False)


def _padded(rows: list[dict], pad_id: int):
    width = max(len(r["input_ids"]) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
        mask[i, : len(r["input_ids"])] = 1
    return input_ids, mask


# ---------------------------------------------------------------------- the columns


def test_columns_hold_the_frozen_coordinates_of_each_row(cached, dataset, model, guard):
    names = anchor_column_names(LAYERS)
    assert set(names.values()) <= set(cached.column_names)
    assert set(dataset.column_names) <= set(cached.column_names)
    assert cached.features[names[0]] == datasets.Array2D(shape=(None, K), dtype="float32")
    rows = dataset.to_list()
    # The map ran in batches of 4: reproduce the first batch and compare bit for bit.
    input_ids, mask = _padded(rows[:4], model.config.pad_token_id)
    expected = guard.anchors(input_ids=input_ids, attention_mask=mask)
    for i in range(4):
        n = len(rows[i]["input_ids"])
        for layer in LAYERS:
            stored = torch.tensor(cached[i][names[layer]], dtype=torch.float32)
            assert stored.shape == (n, K)
            assert torch.equal(stored, expected[layer][i, :n])
        assert cached[i][names["tokens"]] == token_fingerprint(rows[i]["input_ids"])
        assert cached[i][names["fingerprint"]] == anchors_fingerprint(model, guard)
    # Alone (unpadded) the same row gives the same coordinates up to float32 rounding of the
    # CPU kernels, whose blocking depends on the batch shape.
    alone = guard.anchors(input_ids=torch.tensor([rows[1]["input_ids"]]))
    stored = torch.tensor(cached[1][names[1]])
    assert torch.allclose(stored, alone[1][0], rtol=1e-5, atol=1e-6)


def test_round_trip_through_disk_keeps_values_and_passes_the_check(cached, model, guard, tmp_path):
    cached.save_to_disk(str(tmp_path / "ds"))
    loaded = datasets.load_from_disk(str(tmp_path / "ds"))
    assert check_cached_anchors(loaded, model, guard) == anchors_fingerprint(model, guard)
    name = anchor_column_names(LAYERS)[1]
    for i in (0, 5, 9):
        assert loaded[i][name] == cached[i][name]
    # Rows keep their anchors through shuffle/select.
    shuffled = loaded.shuffle(seed=3).select(range(5))
    for row in shuffled:
        assert row[anchor_column_names(LAYERS)["tokens"]] == token_fingerprint(row["input_ids"])


def test_second_call_reuses_the_columns(cached, model, guard, monkeypatch):
    def boom(**batch):
        raise AssertionError("anchors recomputed although the cache matches")

    monkeypatch.setattr(guard, "anchors", boom)
    assert add_cached_anchors(cached, model, guard, batch_size=4, show_progress=False) is cached


def test_file_backed_dataset_result_is_cached_by_datasets(dataset, model, guard, tmp_path, monkeypatch):
    dataset.save_to_disk(str(tmp_path / "raw"))
    first = add_cached_anchors(
        datasets.load_from_disk(str(tmp_path / "raw")), model, guard, batch_size=4, show_progress=False
    )
    calls = []
    original = guard.anchors
    monkeypatch.setattr(guard, "anchors", lambda **batch: calls.append(1) or original(**batch))
    again = add_cached_anchors(
        datasets.load_from_disk(str(tmp_path / "raw")), model, guard, batch_size=4, show_progress=False
    )
    assert calls == []  # loaded from the datasets cache file, no forward
    assert again.cache_files and again[3] == first[3]


# ---------------------------------------------------------------------- the step-0 penalty


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_step0_penalty_is_exactly_zero_with_collated_cached_anchors(kind, tokenizer):
    model = tiny_model(kind, tokenizer, seed=2)
    rows = random_rows(6, seed=4, vocab=len(tokenizer))
    with RefusalGuard(model, random_basis(seed=5), positions="all", backend="torch") as guard:
        ds = add_cached_anchors(datasets.Dataset.from_list(rows), model, guard, batch_size=3, show_progress=False)
        collator = AnchorCollator(tokenizer)
        # The same rows the map padded together: the training forward is the same computation.
        batch = collator([ds[i] for i in range(3)])
        anchors = batch.pop(ANCHOR_COLUMN)
        guard.arm(anchors, guard.weights(**batch))
        model.train()
        out = model(**{k: v for k, v in batch.items() if k != "prompt_lengths"})
        penalty = guard.penalty()
        assert penalty.item() == 0.0
        penalty.backward()  # and its gradient is zero too: the adapter's first step is the task's alone
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(torch.count_nonzero(g) == 0 for g in grads)
        assert torch.isfinite(out.loss)
        # A batch the map never built (other rows, other width): equal to float32 rounding only,
        # because the CPU kernels' blocking depends on the batch shape (see anchors.py).
        guard.disarm()
        model.zero_grad()
        batch = collator([ds[i] for i in (1, 3, 5)])
        guard.arm(batch.pop(ANCHOR_COLUMN), guard.weights(**batch))
        model(**{k: v for k, v in batch.items() if k != "prompt_lengths"})
        assert 0.0 <= guard.penalty().item() < 1e-10
        guard.disarm()
        model.eval()


# ---------------------------------------------------------------------- collator


def test_collator_pads_anchors_like_the_tokens(cached, tokenizer):
    collator = AnchorCollator(tokenizer)
    features = [cached[i] for i in (0, 1, 2)]
    batch = collator(features)
    lengths = [len(f["input_ids"]) for f in features]
    width = max(lengths)
    assert batch["input_ids"].shape == (3, width)
    assert batch["prompt_lengths"].tolist() == [f["prompt_lengths"] for f in features]
    assert batch["prompt_lengths"].dtype == torch.long
    assert set(batch[ANCHOR_COLUMN]) == set(LAYERS)
    names = anchor_column_names(LAYERS)
    for layer in LAYERS:
        padded = batch[ANCHOR_COLUMN][layer]
        assert padded.shape == (3, width, K) and padded.dtype == torch.float32
        for i, (f, n) in enumerate(zip(features, lengths)):
            assert torch.equal(padded[i, :n], torch.tensor(f[names[layer]], dtype=torch.float32))
            assert torch.count_nonzero(padded[i, n:]) == 0
            assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (width - n)
            assert batch["labels"][i, n:].eq(-100).all()
            assert batch["labels"][i, : f["prompt_lengths"]].eq(-100).all()
    # No anchor column keys leak into the model's inputs.
    assert not any(key.startswith(ANCHOR_COLUMN + ".") for key in batch)


def test_collator_without_cached_anchors_passes_prompt_lengths_only(dataset, tokenizer):
    batch = AnchorCollator(tokenizer)([dataset[i] for i in range(4)])
    assert ANCHOR_COLUMN not in batch
    assert batch["prompt_lengths"].tolist() == [dataset[i]["prompt_lengths"] for i in range(4)]


def test_collator_refuses_left_padding_with_cached_anchors(cached):
    left = tiny_tokenizer()
    left.padding_side = "left"
    features = [cached[i] for i in range(4)]
    assert len({len(f["input_ids"]) for f in features}) > 1
    with pytest.raises(CachedAnchorsError, match="right padding"):
        AnchorCollator(left)(features)


# ---------------------------------------------------------------------- mismatches


def test_changed_tokens_are_an_error(cached, tokenizer):
    def edit(row):
        row["input_ids"] = [row["input_ids"][0] + 1] + row["input_ids"][1:]
        return row

    edited = cached.map(edit)
    with pytest.raises(CachedAnchorsError, match="input_ids do not match"):
        AnchorCollator(tokenizer)([edited[i] for i in range(3)])


def test_another_basis_is_an_error(cached, model):
    other = RefusalGuard(model, random_basis(seed=9), backend="torch")
    try:
        with pytest.raises(CachedAnchorsError, match="different refusal basis"):
            check_cached_anchors(cached, model, other)
        # ... also per row, when the collator is told what to expect.
        collator = AnchorCollator(tiny_tokenizer(), expected_fingerprint=anchors_fingerprint(model, other))
        with pytest.raises(CachedAnchorsError, match="different refusal basis"):
            collator([cached[0], cached[1]])
    finally:
        other.remove()


def test_another_model_is_an_error(cached, tokenizer):
    other_model = tiny_model("llama", tokenizer, seed=1)
    other = RefusalGuard(other_model, random_basis(), backend="torch")
    try:
        with pytest.raises(CachedAnchorsError, match="different model") as info:
            check_cached_anchors(cached, other_model, other)
        assert "basis" not in str(info.value).split("computed with")[1].split(";")[0]
    finally:
        other.remove()


def test_missing_columns_are_an_error(dataset, model, guard):
    with pytest.raises(CachedAnchorsError, match="add_cached_anchors"):
        check_cached_anchors(dataset, model, guard)


def test_anchors_for_other_layers_are_an_error(cached, model):
    only_layer_1 = cached.remove_columns([anchor_column_names([0])[0]])
    with RefusalGuard(model, random_basis(layers=[0]), backend="torch") as guard_on_0:
        with pytest.raises(CachedAnchorsError, match="lacks the columns.*other layers"):
            check_cached_anchors(only_layer_1, model, guard_on_0)


# ---------------------------------------------------------------------- fingerprints


def test_model_fingerprint_ignores_wrapping_and_switches_but_not_weights(tokenizer, tmp_path):
    from peft import LoraConfig, get_peft_model

    model = tiny_model("qwen2", tokenizer, seed=3)
    base = model_fingerprint(model, LAYERS)
    model.config.use_cache = not model.config.use_cache
    assert model_fingerprint(model, LAYERS) == base
    model.save_pretrained(tmp_path / "elsewhere")
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "elsewhere", attn_implementation="eager")
    assert model_fingerprint(reloaded, LAYERS) == base
    # another attention kernel computes other anchor bits: part of the fingerprint
    other_kernel = AutoModelForCausalLM.from_pretrained(tmp_path / "elsewhere", attn_implementation="sdpa")
    assert model_fingerprint(other_kernel, LAYERS) != base
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    assert model_fingerprint(peft_model, LAYERS) == base  # adapter weights do not count
    with torch.no_grad():
        peft_model.get_base_model().model.layers[1].mlp.down_proj.weight.mul_(1.01)
    assert model_fingerprint(peft_model, LAYERS) != base
    assert model_fingerprint(reloaded.to(torch.bfloat16), LAYERS) != base


def test_basis_and_token_fingerprints_tell_apart():
    assert basis_fingerprint(random_basis(seed=1)) == basis_fingerprint(random_basis(seed=1))
    assert basis_fingerprint(random_basis(seed=1)) != basis_fingerprint(random_basis(seed=2))
    assert token_fingerprint([1, 2, 3]) == token_fingerprint(torch.tensor([1, 2, 3]))
    assert token_fingerprint([1, 2, 3]) != token_fingerprint([1, 2, 4])
    assert token_fingerprint([1, 2]) != token_fingerprint([1, 2, 0])


def test_bad_inputs(dataset, model, guard):
    with pytest.raises(ValueError, match="input_ids"):
        add_cached_anchors(dataset.remove_columns(["input_ids"]), model, guard)
    with pytest.raises(ValueError, match="batch_size"):
        add_cached_anchors(dataset, model, guard, batch_size=0)
    with pytest.raises(TypeError, match="datasets.Dataset"):
        add_cached_anchors(dataset.to_list(), model, guard)


# ---------------------------------------------------------------------- issue #10: full fingerprint


@pytest.fixture()
def three_layer(tokenizer):
    """A fresh 3-layer model (editable per test), a guard on layers [1] and its cached dataset."""
    model = tiny_model("llama", tokenizer, seed=4, layers=3)
    guard = RefusalGuard(model, random_basis(layers=[1]), backend="torch")
    data = add_cached_anchors(
        datasets.Dataset.from_list(random_rows(6, seed=2)), model, guard, batch_size=3, show_progress=False
    )
    yield model, guard, data
    guard.remove()


def _edit_one_element(tensor: torch.Tensor, index: int) -> None:
    with torch.no_grad():
        flat = tensor.view(-1)
        flat[index] = flat[index] + 1e-3


def test_unchanged_model_is_accepted(three_layer):
    model, guard, data = three_layer
    assert check_cached_anchors(data, model, guard) == anchors_fingerprint(model, guard)


def test_one_element_below_the_guarded_layer_is_named(three_layer):
    model, guard, data = three_layer
    _edit_one_element(model.model.layers[0].mlp.up_proj.weight, 17)
    with pytest.raises(CachedAnchorsError, match="different model") as info:
        check_cached_anchors(data, model, guard)
    message = str(info.value)
    assert "changed: model.layers.0.mlp.up_proj.weight" in message
    assert "model.layers.1" not in message and "add_cached_anchors" in message


def test_element_the_old_strided_sample_skipped_is_caught(three_layer):
    """The old fingerprint hashed 512 strided elements: in the 200x32 embedding (6400 elements,
    stride 12) element 13 was never read."""
    model, guard, data = three_layer
    embedding = model.model.embed_tokens.weight
    assert embedding.numel() // 512 > 1 and 13 % (embedding.numel() // 512) != 0
    _edit_one_element(embedding, 13)
    with pytest.raises(CachedAnchorsError, match="changed: model.embed_tokens.weight"):
        check_cached_anchors(data, model, guard)


def test_non_layer_modules_before_the_layers_are_covered(three_layer):
    """Floating buffers count too: the rotary frequencies shape every layer's attention."""
    model, guard, data = three_layer
    with torch.no_grad():
        model.model.rotary_emb.inv_freq[1] *= 1.5
    with pytest.raises(CachedAnchorsError, match="rotary_emb.inv_freq"):
        check_cached_anchors(data, model, guard)


def test_layers_above_the_last_guarded_one_and_the_head_are_not_covered(three_layer):
    """They run after the guarded layer, so they cannot change its anchors: the cache stays valid."""
    model, guard, data = three_layer
    _edit_one_element(model.model.layers[2].self_attn.q_proj.weight, 3)
    _edit_one_element(model.lm_head.weight, 5)
    assert check_cached_anchors(data, model, guard) == anchors_fingerprint(model, guard)


def test_guard_on_inner_model_caches_frozen_anchors_and_ignores_adapter_weights(tokenizer):
    """Issue #10: with the guard on get_base_model(), the cached anchors came from the adapted
    weights (and the LoRA weights were part of the fingerprint)."""
    from peft import LoraConfig, get_peft_model

    rows = datasets.Dataset.from_list(random_rows(6, seed=3))
    plain_model = tiny_model("llama", tokenizer, seed=0)
    with RefusalGuard(plain_model, random_basis(), backend="torch") as plain_guard:
        plain = add_cached_anchors(rows, plain_model, plain_guard, batch_size=3, show_progress=False)
    peft_model = get_peft_model(
        tiny_model("llama", tokenizer, seed=0), LoraConfig(r=2, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    )
    gen = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.5 * torch.randn(param.shape, generator=gen))
    inner = peft_model.get_base_model()
    with RefusalGuard(inner, random_basis(), backend="torch") as guard:
        cached = add_cached_anchors(rows, inner, guard, batch_size=3, show_progress=False)
        for name in anchor_column_names(LAYERS).values():
            assert cached[name] == plain[name]
        # training moves the adapter: the cache stays valid, at every wrapper level
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_A" in name:
                    param.mul_(1.5)
        assert check_cached_anchors(cached, inner, guard) == check_cached_anchors(cached, peft_model, guard)


def test_interrupted_cache_build_leaves_nothing_reusable(tmp_path, tokenizer, monkeypatch):
    """A build that dies midway leaves no cache file a later run could pick up, and the next
    build computes every row."""
    datasets.Dataset.from_list(random_rows(9, seed=5)).save_to_disk(tmp_path / "data")
    data = datasets.load_from_disk(tmp_path / "data")
    before = sorted(p.name for p in (tmp_path / "data").iterdir())
    model = tiny_model("llama", tokenizer, seed=0)
    with RefusalGuard(model, random_basis(), backend="torch") as guard:
        real, calls = guard.anchors, []

        def dies_on_the_second_batch(**batch):
            calls.append(1)
            if len(calls) == 2:
                raise KeyboardInterrupt("interrupted")
            return real(**batch)

        monkeypatch.setattr(guard, "anchors", dies_on_the_second_batch)
        with pytest.raises(KeyboardInterrupt):
            add_cached_anchors(data, model, guard, batch_size=3, show_progress=False)
        assert sorted(p.name for p in (tmp_path / "data").iterdir()) == before
        monkeypatch.setattr(guard, "anchors", real)
        calls.clear()
        counted = []
        monkeypatch.setattr(guard, "anchors", lambda **batch: counted.append(1) or real(**batch))
        cached = add_cached_anchors(data, model, guard, batch_size=3, show_progress=False)
        assert len(counted) == 3  # all three batches computed again, nothing reused
        check_cached_anchors(cached, model, guard)
        names = anchor_column_names(LAYERS)
        assert all(len(row[names[0]]) == len(row["input_ids"]) for row in cached)
