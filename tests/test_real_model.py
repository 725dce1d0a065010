"""The guard on a real pretrained chat model: SmolLM2-135M-Instruct (Llama, hidden 576, 30 layers, ChatML).

Each test covers one finding of issue 17 that the organism and the tiny random models could not show, and
fails on the code before the fix (0.1's behaviour).  They run on the folder `refusalguard models get smollm2` caches (.ci/run
fetches it; absent, they are skipped outside CI and fail under CI=true), in float32 on the CPU, with a few
short examples and steps.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path

import pytest
import torch
from real_model import (
    CHATS,
    batch_of,
    grad_norm,
    load,
    lora,
    model_inputs,
    nudge_adapter_,
    tokenized_pairs,
)

pytestmark = pytest.mark.real_model

README = Path(__file__).resolve().parents[1] / "README.md"
MIDDLE = [15, 16]  # the middle of 30 layers, inside the default band 12..17


@pytest.fixture(scope="session")
def tokenizer(smollm2_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_path)
    tok.padding_side = "right"
    return tok


@pytest.fixture(scope="session")
def basis(smollm2_path, tokenizer):
    """The default extraction (built-in sets, default middle band 12..17, k=1), once per session."""
    from refusalguard_kernels.integration.basis import extract_refusal_basis

    return extract_refusal_basis(
        load(smollm2_path), tokenizer, "builtin:harmful", "builtin:harmless", show_progress=False
    )


@pytest.fixture
def same_extraction_once(monkeypatch, basis, smollm2_path):
    """The README's extract_refusal_basis call is the `basis` fixture's very call (fresh SmolLM2, built-in sets,
    defaults): answer it from that fixture instead of running the frozen model over 160 prompts twice."""
    import refusalguard_kernels.integration.basis as basis_module
    from refusalguard_kernels.integration.model_utils import model_name

    real = basis_module.extract_refusal_basis

    def extract(model, tokenizer, harmful, harmless, **options):
        options.pop("show_progress", None)
        fresh = model_name(model) == str(smollm2_path) and all(p.requires_grad for p in model.parameters())
        if fresh and (harmful, harmless) == ("builtin:harmful", "builtin:harmless") and not options:
            return basis
        return real(model, tokenizer, harmful, harmless, **options)

    monkeypatch.setattr(basis_module, "extract_refusal_basis", extract)


@pytest.fixture
def model(smollm2_path):
    torch.manual_seed(0)
    return load(smollm2_path)


def _training_args(tmp_path, **overrides):
    from transformers import TrainingArguments

    options = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=2,
        max_steps=3,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        data_seed=0,
    )
    options.update(overrides)
    return TrainingArguments(**options)


def _readme_example() -> str:
    text = README.read_text("utf-8")
    marker = text.index("tests/test_real_model.py::test_readme_example_runs_and_protects")
    start = text.index("```python\n", marker) + len("```python\n")
    return text[start : text.index("```", start)]


def _drift(model, basis, batch, positions="response") -> float:
    """Mean squared movement of the guarded tokens' cone coordinates, in pooled SDs, averaged over layers."""
    from refusalguard_kernels.integration.hooks import RefusalGuard

    with RefusalGuard(model, basis, positions=positions, backend="torch") as probe, torch.no_grad():
        probe.arm(probe.anchors(**model_inputs(batch)), probe.weights(**batch))
        return float(probe.penalty_forward(**model_inputs(batch)))


# ---------------------------------------------------------------------- finding 1: the README example


def test_readme_example_runs_and_protects(smollm2_path, tokenizer, tmp_path, same_extraction_once):
    """The first screen's example, executed as printed (name/args/data substituted): it trains, the penalty is 0 at
    step 0 and positive after, and it holds the refusal coordinates closer than the same LoRA run without it."""
    data = tokenized_pairs(tokenizer)
    args = _training_args(tmp_path, learning_rate=5e-3)
    namespace = {"name": str(smollm2_path), "args": args, "data": data}
    torch.manual_seed(0)
    exec(compile(_readme_example(), str(README), "exec"), namespace)
    trainer, guard, basis = namespace["trainer"], namespace["guard"], namespace["basis"]
    penalties = [log["guard_penalty"] for log in trainer.state.log_history if "guard_penalty" in log]
    assert len(penalties) == 3 and penalties[0] == 0.0 and all(p > 0 for p in penalties[1:]), penalties
    assert guard.coef_units == "spread" and guard.exclude_first == 1
    guard.remove()
    batch = batch_of(tokenizer)
    guarded = _drift(trainer.model, basis, batch)

    from transformers import Trainer

    from refusalguard_kernels.integration.anchors import AnchorCollator

    plain = lora(load(smollm2_path), seed=0, r=16, lora_alpha=32)  # the README's LoRA config
    columns = data.remove_columns("prompt_lengths")
    Trainer(
        model=plain,
        args=_training_args(tmp_path / "plain", learning_rate=5e-3),
        train_dataset=columns,
        data_collator=AnchorCollator(tokenizer),
    ).train()
    unguarded = _drift(plain, basis, batch)
    assert 0 < guarded < 0.6 * unguarded, (guarded, unguarded)  # measured: 0.058 against 0.153


def test_a_guard_that_cannot_differ_from_the_trained_model_is_refused(model, tokenizer, basis, tmp_path):
    """No adapter, online anchors, every weight trainable: 0.1 trained with guard_penalty 0.0 at every step."""
    from refusalguard_kernels import RefusalGuard, RefusalGuardTrainer

    guard = RefusalGuard(model, basis, positions="response")
    with pytest.raises(ValueError, match=r"(?s)not adapter weights.*get_peft_model.*anchors='cached'"):
        RefusalGuardTrainer(
            model=model,
            guard=guard,
            args=_training_args(tmp_path),
            train_dataset=tokenized_pairs(tokenizer),
            processing_class=tokenizer,
        )
    guard.remove()


# ---------------------------------------------------------------------- finding 2: attention sinks


def test_attention_sink_is_excluded_and_the_penalty_gradient_stays_in_scale(model, tokenizer, basis):
    """0.1 guarded the first token (<|im_start|>, hidden norm ~25,000 against a median ~180): with positions='all'
    the penalty's gradient was hundreds of times the task's. Now it is excluded by default, and with the
    default coefficient the two gradients are of the same order."""
    from refusalguard_kernels.integration.hooks import RefusalGuard

    batch = batch_of(tokenizer)
    peft = lora(model)
    nudge_adapter_(peft, scale=2e-2)
    params = [p for p in peft.parameters() if p.requires_grad]
    task = grad_norm(peft(**model_inputs(batch)).loss, params)
    ratios = {}
    for positions in ("all", "prompt", "f5+l5", "response"):
        guard = RefusalGuard(peft, basis, positions=positions, backend="torch")
        weight = guard.weights(**batch)
        assert not weight[:, 0].any()  # right padding: column 0 is every row's first token
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no outlier left among the guarded tokens
            guard.arm(guard.anchors(**model_inputs(batch)), weight)
        ratios[positions] = grad_norm(guard.penalty_forward(**model_inputs(batch)), params) / task
        guard.remove()
    # 0.1 (first token guarded, raw units): 'all' 16x and 'f5+l5' 91x the 'response' ratio, up to 1,355x the task's
    assert all(r < 10 for r in ratios.values()), ratios
    assert max(ratios.values()) < 5 * min(ratios.values()), ratios


def test_an_unexcluded_sink_is_reported(model, tokenizer, basis):
    from refusalguard_kernels.integration.hooks import RefusalGuard

    batch = batch_of(tokenizer)
    guard = RefusalGuard(model, basis, positions="all", exclude_first=0, backend="torch")
    with pytest.warns(UserWarning, match=r"row \d, position 0\).*massive activations.*exclude_first"):
        guard.arm(guard.anchors(**model_inputs(batch)), guard.weights(**batch))
    guard.remove()


# ---------------------------------------------------------------------- finding 3: model-independent coefficient


def test_coefficient_does_not_depend_on_the_activation_scale(smollm2_path, tokenizer):
    """Scale SmolLM2's residual stream by 10 (embeddings and every residual write; RMSNorm makes the function the
    same): 0.1's penalty grew 100x for the same relative movement; in spread units it stays the same."""
    from refusalguard_kernels.integration.basis import extract_refusal_basis
    from refusalguard_kernels.integration.hooks import RefusalGuard
    from refusalguard_kernels.integration.prompts import builtin_prompts

    harmful, harmless = builtin_prompts("harmful")[:8], builtin_prompts("harmless")[:8]
    batch = batch_of(tokenizer)
    penalties = []
    for scale in (1.0, 10.0):
        model = load(smollm2_path)
        with torch.no_grad():
            model.model.embed_tokens.weight.mul_(scale)
            for layer in model.model.layers[:13]:
                layer.self_attn.o_proj.weight.mul_(scale)
                layer.mlp.down_proj.weight.mul_(scale)
        basis = extract_refusal_basis(model, tokenizer, harmful, harmless, layers=[12], show_progress=False)
        peft = lora(model)
        nudge_adapter_(peft, scale=1e-2)  # the same relative movement: o_proj, after the LoRA'd v_proj, is scaled
        guard = RefusalGuard(peft, basis, positions="all", backend="torch")
        with torch.no_grad():
            guard.arm(guard.anchors(**model_inputs(batch)), guard.weights(**batch))
            peft(**model_inputs(batch))
        penalties.append(float(guard.penalty()))
        guard.remove()
    assert penalties[0] > 0
    assert penalties[1] == pytest.approx(penalties[0], rel=0.05), penalties


# ---------------------------------------------------------------------- findings 4 and 5: positions that cannot be honoured


def test_trl_response_positions_without_a_response_mask_are_an_error(model, tokenizer, basis, tmp_path):
    """SmolLM2's template has no {% generation %} markers, so TRL's assistant_only_loss is unavailable; without it
    before this fix the mixin silently guarded every token (the system prompt included) under positions='response'."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from refusalguard_kernels import RefusalGuardMixin
    from refusalguard_kernels.integration.hooks import RefusalGuard

    class GuardedSFT(RefusalGuardMixin, SFTTrainer):
        pass

    peft = lora(model)
    guard = RefusalGuard(peft, basis, positions="response")
    args = SFTConfig(
        output_dir=str(tmp_path),
        max_steps=1,
        per_device_train_batch_size=2,
        report_to=[],
        use_cpu=True,  # SFTConfig turns bf16 on by default and refuses to start on a CPU-only machine without it
        bf16=False,
        max_length=64,
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = GuardedSFT(
        model=peft, args=args, train_dataset=Dataset.from_list([{"messages": c} for c in CHATS]),
        processing_class=tokenizer, guard=guard,
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"(?s)positions='response' needs the prompt/response boundary.*generation"):
        trainer.train()
    guard.remove()


@pytest.mark.parametrize("positions", ["prompt", "f5+l5", "response"])
def test_positions_with_unmasked_labels_are_an_error(model, tokenizer, basis, tmp_path, positions):
    """labels = input_ids: 0.1 gave every token weight 0 under 'prompt'/'fN+lM' (loss and gradient exactly 0,
    guard_penalty 0.0 logged) and every token weight 1 under 'response'. Python API and trainer."""
    from datasets import Dataset

    from refusalguard_kernels import RefusalGuard, RefusalGuardTrainer

    texts = [tokenizer.apply_chat_template(chat, tokenize=False) for chat in CHATS]
    encoded = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    rows = [{"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids)} for ids in encoded]
    peft = lora(model)
    guard = RefusalGuard(peft, basis, positions=positions)
    with pytest.raises(ValueError, match="no row of this batch has a prompt token.*labels train on every token"):
        guard.weights(input_ids=torch.tensor([rows[0]["input_ids"]]), labels=torch.tensor([rows[0]["labels"]]))
    trainer = RefusalGuardTrainer(
        model=peft,
        guard=guard,
        args=_training_args(tmp_path, max_steps=1),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    with pytest.raises(ValueError, match="needs the prompt/response boundary"):
        trainer.train()
    guard.remove()


# ---------------------------------------------------------------------- finding 6: dropout


def test_dropout_noise_stays_out_of_the_penalty(smollm2_path, tokenizer, basis, tmp_path):
    """With attention dropout 0.1 the training forward is noisy while the anchors are eval-mode: 0.1's step-0
    penalty was not 0 and the drift term measured dropout noise. Now the penalty has its own eval-mode forward."""
    from refusalguard_kernels import RefusalGuard, RefusalGuardTrainer

    model = load(smollm2_path, attention_dropout=0.1, attn_implementation="eager")
    peft = lora(model, lora_dropout=0.1)
    guard = RefusalGuard(peft, basis, positions="all")
    trainer = RefusalGuardTrainer(
        model=peft,
        guard=guard,
        args=_training_args(tmp_path, max_steps=1),
        train_dataset=tokenized_pairs(tokenizer),
        processing_class=tokenizer,
    )
    trainer.train()
    penalties = [log["guard_penalty"] for log in trainer.state.log_history if "guard_penalty" in log]
    assert penalties == [0.0]
    # after the step: the same batch twice under different dropout draws gives the same penalty
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(2)]))
    peft.train()
    values = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        trainer.compute_loss(peft, dict(batch))
        values.append(float(guard.penalty()))
        guard.disarm()
    assert values[0] > 0 and values[0] == values[1]
    guard.remove()


# ---------------------------------------------------------------------- finding 7: what the cache fingerprint covers


def test_cached_anchors_refuse_what_cannot_be_verified(smollm2_path, tokenizer, basis):
    from refusalguard_kernels.integration.anchors import (
        CachedAnchorsError,
        add_cached_anchors,
        check_cached_anchors,
        model_fingerprint,
    )
    from refusalguard_kernels.integration.basis import RefusalBasis
    from refusalguard_kernels.integration.hooks import RefusalGuard

    # a one-layer basis low in the model: the fingerprint covers the weights up to layer 4 (fast to hash)
    basis = RefusalBasis({4: basis[12]}, {"coord_spread": {4: 5.0}})
    eager = lora(load(smollm2_path, attn_implementation="eager"))
    guard = RefusalGuard(eager, basis)
    data = add_cached_anchors(tokenized_pairs(tokenizer).select(range(2)), eager, guard, show_progress=False)
    guard.remove()
    sdpa = lora(load(smollm2_path, attn_implementation="sdpa"))
    assert model_fingerprint(sdpa, basis.layers) != model_fingerprint(eager, basis.layers)
    guard = RefusalGuard(sdpa, basis)
    with pytest.raises(CachedAnchorsError, match="a different model"):
        check_cached_anchors(data, sdpa, guard)
    # a weight whose values are not here (offloaded to meta, a ZeRO-3 partition) cannot be verified
    sdpa.get_base_model().model.layers[3].mlp.up_proj.weight = torch.nn.Parameter(
        torch.empty(1536, 576, device="meta"), requires_grad=False
    )
    with pytest.raises(CachedAnchorsError, match=r"cannot fingerprint model\.layers\.3\.mlp\.up_proj\.weight.*meta"):
        check_cached_anchors(data, sdpa, guard)
    guard.remove()


# ---------------------------------------------------------------------- finding 8: extraction quality, held out


def _auc(positive: torch.Tensor, negative: torch.Tensor) -> float:
    """P(score of a positive > score of a negative), ties counted half."""
    diff = positive[:, None] - negative[None, :]
    return float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())


def test_extracted_direction_separates_held_out_prompts(smollm2_path, tokenizer, basis):
    """On the held-out evaluation sets (no prompt in common with the extraction sets) the middle layers' direction
    tells harmful from harmless with AUC >= 0.95; a random direction and the prompt's length stay far below."""
    from tqdm.auto import tqdm

    from refusalguard_kernels.integration.basis import _collect, _encode
    from refusalguard_kernels.integration.model_utils import find_decoder_layers
    from refusalguard_kernels.integration.prompts import builtin_prompts

    model = load(smollm2_path).eval()
    layers = find_decoder_layers(model)
    acts, lengths = {}, {}
    for name in ("harmful_eval", "harmless_eval"):
        encoded = [_encode(tokenizer, prompt, "last") for prompt in builtin_prompts(name)]
        lengths[name] = torch.tensor([len(ids) for ids, _ in encoded], dtype=torch.float64)
        with tqdm(disable=True) as bar:  # the last prompt token, as the basis was extracted
            acts[name] = _collect(model, layers, MIDDLE, encoded, 25, tokenizer.pad_token_id, "cpu", bar)
    random_direction = torch.nn.functional.normalize(
        torch.randn(576, generator=torch.Generator().manual_seed(0)), dim=0
    )
    for i in MIDDLE:
        harmful, harmless = acts["harmful_eval"][i], acts["harmless_eval"][i]
        auc = _auc(harmful @ basis[i][:, 0], harmless @ basis[i][:, 0])
        random_auc = _auc(harmful @ random_direction, harmless @ random_direction)
        assert auc >= 0.95, (i, auc)
        assert max(random_auc, 1 - random_auc) < 0.8, (i, random_auc)
    length_auc = _auc(lengths["harmful_eval"], lengths["harmless_eval"])
    assert max(length_auc, 1 - length_auc) < 0.8, length_auc


def test_eval_command_defaults_to_held_out_prompts(smollm2_path, tmp_path, capsys):
    from refusalguard_kernels.cli import main

    out = tmp_path / "eval.json"
    code = main(
        [
            "eval",
            str(smollm2_path),
            "--limit",
            "1",
            "--max-new-tokens",
            "3",
            "--quiet",
            "-o",
            str(out),
        ]
    )
    assert code == 0
    result = json.loads(out.read_text())
    assert (result["harmful_source"], result["benign_source"]) == ("builtin:harmful_eval", "builtin:harmless_eval")
    from refusalguard_kernels.integration.prompts import builtin_prompts

    assert [s["prompt"] for s in result["samples"]["harmful"]] == builtin_prompts("harmful_eval")[:1]
    assert "Loading weights" not in capsys.readouterr().err  # --quiet silences the weight-loading bar too


# ---------------------------------------------------------------------- finding 9: one model, one separation


def test_extract_and_diagnose_report_the_same_separation(smollm2_path, tmp_path, capsys):
    from refusalguard_kernels.cli import main

    common = ["--layers", "16", "--limit", "4", "--quiet"]
    assert main(["extract", str(smollm2_path), "-o", str(tmp_path / "b.safetensors"), *common]) == 0
    extracted = float(re.search(r"^\s+16\s+\S+\s+(\S+)$", capsys.readouterr().out, re.M).group(1))
    assert main(["diagnose", str(smollm2_path), "--tuned", str(smollm2_path), "-o", str(tmp_path / "d"), *common]) == 0
    report = json.loads((tmp_path / "d" / "diagnose.json").read_text())
    (row,) = report["per_layer"]
    assert row["separation_base"] == pytest.approx(extracted, abs=0.01)
    assert math.isfinite(extracted) and extracted > 1


# ---------------------------------------------------------------------- finding 10: bf16 on the CPU, where users meet it


def test_bf16_on_cpu_is_documented_where_users_meet_it(smollm2_path, tokenizer, tmp_path, capsys, monkeypatch):
    """bf16 on a CPU is faster only with native bf16 instructions: the help and the README say so, and a CPU run
    with --bf16 on a CPU without them says so too (this project's CI CPUs: 2x slower than float32)."""
    from refusalguard_kernels.cli import common, main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "native bf16 instructions (avx512_bf16 or amx_bf16 in /proc/cpuinfo" in help_text
    readme = " ".join(README.read_text("utf-8").split())
    assert "bf16 on the CPU" in readme and "use_cpu=True" in readme and "SFTConfig" in readme
    monkeypatch.setattr(common, "cpu_has_native_bf16", lambda: False)
    # the note comes before anything is loaded: a missing dataset ends the run right after it
    code = main(["train", str(smollm2_path), "--dataset", str(tmp_path / "none.jsonl"), "--no-guard", "--bf16"])
    assert code == 2
    assert "--bf16 on this CPU, which has no native bf16 instructions" in capsys.readouterr().err
