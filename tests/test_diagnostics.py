"""Drift diagnostics (refusalguard_kernels/diagnostics.py) and `refusalguard diagnose`."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from refusalguard_kernels.cli import main
from refusalguard_kernels.demo.organism import build_corpus, train_tokenizer
from refusalguard_kernels.demo.organism.corpus import all_text
from refusalguard_kernels.evaluation.diagnostics import (
    ModelGeometry,
    compare_geometry,
    diagnose,
    format_table,
    model_geometry,
    plot_report,
    principal_angles,
    save_report,
)


def _orthonormal(d, k, generator):
    return torch.linalg.qr(torch.randn(d, k, generator=generator, dtype=torch.float64))[0]


# ---------------------------------------------------------------------- principal angles


@pytest.mark.parametrize("theta", [0.0, 10.0, 45.0, 90.0])
def test_principal_angle_of_a_known_rotation(theta):
    g = torch.Generator().manual_seed(0)
    q = _orthonormal(12, 3, g)
    e1, e2, e3 = q.T
    t = math.radians(theta)
    a = torch.stack([e1, e3], 1)
    b = torch.stack([math.cos(t) * e1 + math.sin(t) * e2, -e3], 1)  # sign flip: same subspace direction
    angles = principal_angles(a.float(), b.float())
    assert angles.tolist() == pytest.approx([0.0, theta], abs=2e-3)


def test_principal_angles_ignore_basis_choice_and_reject_bad_shapes():
    g = torch.Generator().manual_seed(1)
    a = _orthonormal(20, 4, g)
    rotation = _orthonormal(4, 4, g)
    assert principal_angles(a, a @ rotation).abs().max() < 1e-4
    b = _orthonormal(20, 2, g)
    assert principal_angles(a, b).shape == (2,)
    with pytest.raises(ValueError, match="same d"):
        principal_angles(a, torch.randn(21, 2))


# ---------------------------------------------------------------------- metrics on hand-made activations


def _geometry(harmful, harmless, user_harmful, user_harmless, cone, positions="post-instruction"):
    pair = {0: {"harmful": harmful, "harmless": harmless}}
    return ModelGeometry(
        layers=[0],
        positions=positions,
        k=cone.shape[1],
        post=pair,
        last=pair,
        user_last={0: {"harmful": user_harmful, "harmless": user_harmless}},
        cones={0: cone.float()},
        model_name="hand-made",
    )


def test_shift_separation_and_coupling_match_hand_computation():
    g = torch.Generator().manual_seed(2)
    d = 8
    cone = _orthonormal(d, 2, g).float().double()  # cones are stored in float32
    harmful = torch.randn(30, d, generator=g, dtype=torch.float64) + 3 * cone[:, 0]
    harmless = torch.randn(25, d, generator=g, dtype=torch.float64)
    user_h = torch.randn(30, d, generator=g, dtype=torch.float64) + 2.0
    user_l = torch.randn(25, d, generator=g, dtype=torch.float64)
    base = _geometry(harmful, harmless, user_h, user_l, cone)
    moved = harmful - 1.5 * cone[:, 0] + 0.5 * cone[:, 1] + 0.3 * torch.randn(30, d, generator=g, dtype=torch.float64)
    tuned = _geometry(moved, harmless, user_h, user_l, cone)
    row = compare_geometry(base, tuned)["per_layer"][0]

    z_h, z_l, z_t = harmful @ cone, harmless @ cone, moved @ cone
    pooled = (((z_h - z_h.mean(0)) ** 2).sum(0) + ((z_l - z_l.mean(0)) ** 2).sum(0)) / (30 + 25 - 2)
    std = pooled.sqrt()
    expected_shift = (z_t - z_h).mean(0) / std
    assert row["coord_shift"] == pytest.approx(expected_shift.tolist(), rel=1e-9)
    assert row["coord_shift_norm"] == pytest.approx(float(expected_shift.norm()), rel=1e-9)
    assert row["coord_drift_rms"] == pytest.approx(float((((z_t - z_h) / std) ** 2).sum(1).mean().sqrt()), rel=1e-9)
    assert row["separation_base"] == pytest.approx(float((z_h[:, 0].mean() - z_l[:, 0].mean()) / std[0]), rel=1e-9)
    assert row["separation_tuned"] == pytest.approx(float((z_t[:, 0].mean() - z_l[:, 0].mean()) / std[0]), rel=1e-9)
    assert row["coord_shift"][0] < -1.0  # moved toward the harmless side
    harm_dir = user_h.mean(0) - user_l.mean(0)
    refusal_dir = harmful.mean(0) - harmless.mean(0)
    expected = float(harm_dir @ refusal_dir / (harm_dir.norm() * refusal_dir.norm()))
    assert row["coupling_base"] == pytest.approx(expected, rel=1e-9)
    refusal_dir_t = moved.mean(0) - harmless.mean(0)
    assert row["coupling_tuned"] == pytest.approx(
        float(harm_dir @ refusal_dir_t / (harm_dir.norm() * refusal_dir_t.norm())), rel=1e-9
    )
    assert row["max_angle_deg"] == pytest.approx(0.0, abs=1e-3)


def test_compare_geometry_rejects_mismatched_measurements():
    g = torch.Generator().manual_seed(3)
    cone = _orthonormal(6, 1, g)
    acts = torch.randn(5, 6, generator=g, dtype=torch.float64)
    a = _geometry(acts, acts + 1, acts, acts, cone)
    b = _geometry(acts, acts + 1, acts, acts, cone, positions="last")
    with pytest.raises(ValueError, match="different layers, positions or k"):
        compare_geometry(a, b)
    c = _geometry(acts[:3], acts + 1, acts, acts, cone)
    with pytest.raises(ValueError, match="different prompt sets"):
        compare_geometry(a, c)


# ---------------------------------------------------------------------- real (tiny) models


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(all_text())


@pytest.fixture(scope="module")
def prompts():
    corpus = build_corpus(seed=0, n_train=30, n_eval=12)
    return corpus.heldout_harmful, corpus.heldout_benign


def _tiny_llama(tokenizer, seed):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config).eval()


def test_identical_models_have_no_drift(tokenizer, prompts):
    model = _tiny_llama(tokenizer, 0)
    report = diagnose(model, copy.deepcopy(model), tokenizer, *prompts, k=2, show_progress=False)
    assert report["layers"] == [0, 1, 2] and report["k"] == 2 and report["positions"] == "post-instruction"
    for row in report["per_layer"]:
        assert row["max_angle_deg"] == pytest.approx(0.0, abs=0.05)
        assert row["coord_shift"] == [0.0, 0.0] and row["coord_drift_rms"] == 0.0
        assert row["coupling_base"] == row["coupling_tuned"] and -1.0 <= row["coupling_base"] <= 1.0
        assert row["separation_base"] == row["separation_tuned"]


def test_perturbed_model_drifts_and_report_files_are_written(tokenizer, prompts, tmp_path):
    base = _tiny_llama(tokenizer, 0)
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        for p in tuned.model.layers.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    report = diagnose(base, tuned, tokenizer, *prompts, layers=[1, 2], k=1, positions="last", show_progress=False)
    assert [r["layer"] for r in report["per_layer"]] == [1, 2]
    assert all(r["max_angle_deg"] > 1.0 and r["coord_drift_rms"] > 0.01 for r in report["per_layer"])
    table = format_table(report)
    assert "max angle" in table and table.count("\n") == 4
    save_report(report, tmp_path / "d.json")
    assert json.loads((tmp_path / "d.json").read_text()) == json.loads(json.dumps(report))
    plot_report(report, tmp_path / "d.png")
    assert (tmp_path / "d.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (tmp_path / "d.png").stat().st_size > 5000


def test_model_geometry_errors(tokenizer, prompts):
    model = _tiny_llama(tokenizer, 0)
    with pytest.raises(ValueError, match="at least 2"):
        model_geometry(model, tokenizer, prompts[0][:1], prompts[1], show_progress=False)
    with pytest.raises(ValueError, match="out of range"):
        model_geometry(model, tokenizer, *prompts, layers=[3], show_progress=False)
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    with pytest.raises(ValueError, match="chat template"):
        model_geometry(model, plain, *prompts, show_progress=False)


def test_without_a_chat_template_coupling_is_not_reported(tokenizer, prompts):
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    model = _tiny_llama(tokenizer, 0)
    report = diagnose(model, model, plain, *prompts, positions="last", show_progress=False)
    assert all(r["coupling_base"] is None and r["coupling_tuned"] is None for r in report["per_layer"])
    assert "n/a" in format_table(report)


# ---------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def saved(tokenizer, tmp_path_factory):
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("diag_cli")
    base = _tiny_llama(tokenizer, 0)
    base.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        tuned.model.layers[1].mlp.down_proj.weight.mul_(3.0)
    tuned.save_pretrained(root / "tuned")
    tokenizer.save_pretrained(root / "tuned")
    for name, init in (("zero_adapter", True), ("adapter", False)):
        torch.manual_seed(1)
        peft_model = get_peft_model(
            LlamaForCausalLM.from_pretrained(root / "base"),
            LoraConfig(r=4, target_modules=["o_proj", "down_proj"], init_lora_weights=init),
        )
        peft_model.save_pretrained(root / name)
    return root


def _run(argv, capsys):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    assert code == 0, out.err
    return out.out


def test_diagnose_cli_with_a_zero_adapter_reports_no_drift(saved, tmp_path, capsys):
    out = _run(
        [
            "diagnose",
            saved / "base",
            "--adapter",
            saved / "zero_adapter",
            "--harmful",
            "organism:harmful",
            "--harmless",
            "organism:benign",
            "--limit",
            "10",
            "--k",
            "2",
            "-o",
            tmp_path,
            "--quiet",
        ],
        capsys,
    )
    report = json.loads((tmp_path / "diagnose.json").read_text())
    # LoRA starts with B = 0: the adapted model is the base model.
    for row in report["per_layer"]:
        assert row["coord_shift"] == [0.0, 0.0] and row["max_angle_deg"] == pytest.approx(0.0, abs=0.05)
    assert report["n_harmful"] == 10 and "adapter" in report["tuned_model"]
    assert (tmp_path / "diagnose.png").stat().st_size > 5000 and "max angle" in out


def test_diagnose_cli_tuned_model_and_adapter_drift(saved, tmp_path, capsys):
    _run(
        [
            "diagnose",
            saved / "base",
            "--tuned",
            saved / "tuned",
            "--harmful",
            "organism:harmful",
            "--harmless",
            "organism:benign",
            "--limit",
            "10",
            "--layers",
            "1,2",
            "-o",
            tmp_path / "a",
            "--quiet",
        ],
        capsys,
    )
    report = json.loads((tmp_path / "a" / "diagnose.json").read_text())
    assert [r["layer"] for r in report["per_layer"]] == [1, 2]
    assert all(r["coord_drift_rms"] > 0 for r in report["per_layer"])
    _run(
        [
            "diagnose",
            saved / "base",
            "--adapter",
            saved / "adapter",
            "--harmful",
            "organism:harmful",
            "--harmless",
            "organism:benign",
            "--limit",
            "10",
            "-o",
            tmp_path / "b",
            "--quiet",
        ],
        capsys,
    )
    report = json.loads((tmp_path / "b" / "diagnose.json").read_text())
    assert any(r["coord_drift_rms"] > 0 for r in report["per_layer"])


def test_diagnose_cli_needs_a_tuned_model(saved, capsys):
    with pytest.raises(SystemExit):
        main(["diagnose", str(saved / "base")])
    assert "--tuned" in capsys.readouterr().err
