"""The `refusalguard extract` and `refusalguard train` subcommands, run in-process on tiny
models saved to disk (as a user's local checkpoint folder would be)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import datasets
import pytest
import torch
from tiny_models import save_tiny_model, write_pairs_file, write_text_file

from refusalguard_kernels import orthonormalize_basis
from refusalguard_kernels.cli import build_parser, main
from refusalguard_kernels.integration.basis import BASIS_FILENAME, RefusalBasis


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path_factory, monkeypatch):
    # Local files go through datasets.load_dataset; keep its Arrow cache out of the user's home.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "hf_datasets"))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {
        "llama": save_tiny_model(root / "llama", "llama", seed=0),
        "qwen2": save_tiny_model(root / "qwen2", "qwen2", seed=1),
        "gpt2": save_tiny_model(root / "gpt2", "gpt2", seed=2, chat_template=False),
    }


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return {"pairs": write_pairs_file(root / "pairs.jsonl", n=8), "text": write_text_file(root / "text.txt", n=8)}


@pytest.fixture(scope="module")
def llama_basis(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("basis") / "llama_basis.safetensors"
    code = main(["extract", str(models["llama"]), "--layers", "0,1", "--limit", "16", "--output", str(out), "--quiet"])
    assert code == 0
    return out


def run_cli(argv, capsys):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _subparser(name: str):
    parser = build_parser()
    for action in parser._actions:
        if hasattr(action, "choices") and isinstance(action.choices, dict) and name in action.choices:
            return action.choices[name]
    raise AssertionError(f"no subcommand {name}")


# ---------------------------------------------------------------------- help


def test_train_help_explains_every_option_with_defaults():
    command = shutil.which("refusalguard")
    argv = [command] if command else [sys.executable, "-m", "refusalguard_kernels"]
    result = subprocess.run(
        argv + ["train", "--help"], capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "250"}
    )
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    for action in _subparser("train")._actions:
        if not action.option_strings:
            continue
        assert action.help and len(action.help) > 10, action.option_strings
        assert any(option in text for option in action.option_strings), action.option_strings
        if action.default not in (None, False, "==SUPPRESS=="):
            assert f"(default: {action.default})" in text, action.option_strings
    for phrase in ("--anchors", "online", "cached", "--warmup-multiplier", "examples:", "torchrun"):
        assert phrase in text


def test_extract_help_lists_its_options(capsys):
    with pytest.raises(SystemExit) as info:
        main(["extract", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for option in (
        "--harmful",
        "--harmless",
        "--harmful-column",
        "--layers",
        "--k",
        "--method",
        "--positions",
        "--batch-size",
        "--output",
        "--dtype",
        "--device",
    ):
        assert option in out
    assert "(default: builtin:harmful)" in " ".join(out.split())


# ---------------------------------------------------------------------- extract


def test_extract_writes_a_loadable_basis(llama_basis, capsys, tmp_path, models):
    basis = RefusalBasis.load(llama_basis)
    assert basis.layers == [0, 1] and basis.k == 1 and basis.hidden_size == 32
    assert basis.metadata["method"] == "dim" and basis.metadata["n_harmful"] == 16
    assert torch.allclose(basis.bases[0].T @ basis.bases[0], torch.ones(1, 1), atol=1e-5)

    code, out, _ = run_cli(
        ["extract", models["gpt2"], "--layers", "1", "--k", "2", "--limit", "12", "--output", tmp_path, "--quiet"],
        capsys,
    )
    assert code == 0
    assert "separation" in out and str(tmp_path / BASIS_FILENAME) in out
    svd = RefusalBasis.load(tmp_path)
    assert svd.k == 2 and svd.layers == [1] and svd.metadata["method"] == "svd"


def test_extract_reads_prompt_files(models, tmp_path, capsys):
    harmful = tmp_path / "harmful.jsonl"
    harmful.write_text("".join(json.dumps({"q": f"how do i hurt someone badly {i}"}) + "\n" for i in range(6)))
    harmless = tmp_path / "harmless.txt"
    harmless.write_text("\n".join(f"how do i bake bread {i}" for i in range(6)))
    code, _, err = run_cli(
        [
            "extract",
            models["llama"],
            "--harmful",
            harmful,
            "--harmful-column",
            "q",
            "--harmless",
            harmless,
            "--layers",
            "-1",
            "--output",
            tmp_path / "b.safetensors",
            "--quiet",
        ],
        capsys,
    )
    assert code == 0, err
    basis = RefusalBasis.load(tmp_path / "b.safetensors")
    assert basis.layers == [1] and basis.metadata["n_harmful"] == 6 and basis.metadata["n_harmless"] == 6


# ---------------------------------------------------------------------- train


def _train_args(model, data, out, *extra):
    return [
        "train",
        model,
        "--dataset",
        data,
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--logging-steps",
        "1",
        "--lora-r",
        "4",
        "--lora-targets",
        "q_proj,v_proj",
        "--backend",
        "torch",
        "--output-dir",
        out,
        "--quiet",
        *extra,
    ]


def _logged(out: str) -> list[dict]:
    """The Trainer's printed log dicts that carry the guard's values."""
    entries = []
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("{") and "guard_penalty" in line:
            entries.append(eval(line, {}))  # the Trainer prints plain dict reprs
    return entries


def test_train_online_end_to_end(models, data, llama_basis, tmp_path, capsys):
    out_dir = tmp_path / "out"
    code, out, err = run_cli(
        _train_args(
            models["llama"],
            data["pairs"],
            out_dir,
            "--basis",
            llama_basis,
            "--positions",
            "response",
            "--warmup-steps",
            "2",
            "--warmup-multiplier",
            "4",
        ),
        capsys,
    )
    assert code == 0, err
    logs = _logged(out)
    assert len(logs) == 2
    assert float(logs[0]["guard_penalty"]) == 0.0
    assert [float(entry["guard_scale"]) for entry in logs] == [4.0, 2.5]
    for name in ("adapter_model.safetensors", "adapter_config.json", BASIS_FILENAME, "tokenizer.json"):
        assert (out_dir / name).is_file(), name
    saved = RefusalBasis.load(out_dir)
    assert torch.equal(saved.bases[1], RefusalBasis.load(llama_basis).bases[1])
    config = json.loads((out_dir / "adapter_config.json").read_text())
    assert config["r"] == 4 and sorted(config["target_modules"]) == ["q_proj", "v_proj"]


def test_train_cached_end_to_end(models, data, llama_basis, tmp_path, capsys):
    out_dir = tmp_path / "out"
    code, out, err = run_cli(
        _train_args(
            models["qwen2"],
            data["pairs"],
            out_dir,
            "--extract",
            "--layers",
            "1",
            "--anchors",
            "cached",
            "--positions",
            "f2+l1",
            "--gram-coef",
            "0.5",
            "--grad-accum",
            "2",
        ),
        capsys,
    )
    assert code == 0, err
    logs = _logged(out)
    assert len(logs) == 2 and "guard_drift/layer_1" in logs[0]
    # Cached anchors come from batches padded otherwise than the training batches: zero up to
    # float32 rounding of the CPU kernels (see anchors.py).
    assert 0.0 <= float(logs[0]["guard_penalty"]) < 1e-10
    basis = RefusalBasis.load(out_dir)
    assert basis.layers == [1] and basis.metadata["n_harmful"] == 80


def test_train_text_data_with_extract_on_gpt2(models, data, tmp_path, capsys):
    out_dir = tmp_path / "out"
    code, out, err = run_cli(
        _train_args(
            models["gpt2"],
            data["text"],
            out_dir,
            "--extract",
            "--k",
            "2",
            "--anchors",
            "cached",
            "--lora-targets",
            "c_attn",
        ),
        capsys,
    )
    assert code == 0, err
    assert RefusalBasis.load(out_dir).k == 2
    assert (out_dir / "adapter_model.safetensors").is_file()


# ---------------------------------------------------------------------- errors a person can act on


def _assert_clean_error(code, err, *needles):
    assert code == 2
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)


def test_missing_dataset_file_names_the_path(models, llama_basis, tmp_path, capsys):
    missing = tmp_path / "nope.jsonl"
    code, _, err = run_cli(_train_args(models["llama"], missing, tmp_path / "o", "--basis", llama_basis), capsys)
    _assert_clean_error(code, err, str(missing), "does not exist")


def test_missing_fields_list_the_columns(models, data, llama_basis, tmp_path, capsys):
    code, _, err = run_cli(
        _train_args(
            models["llama"],
            data["pairs"],
            tmp_path / "o",
            "--basis",
            llama_basis,
            "--prompt-field",
            "question",
            "--response-field",
            "answer",
        ),
        capsys,
    )
    _assert_clean_error(code, err, "'question'", "['prompt', 'response']")
    code, _, err = run_cli(
        _train_args(models["llama"], data["pairs"], tmp_path / "o", "--basis", llama_basis, "--text-field", "body"),
        capsys,
    )
    _assert_clean_error(code, err, "'body'", "['prompt', 'response']")


def test_missing_model_folder_names_the_path(data, llama_basis, tmp_path, capsys):
    missing = tmp_path / "no_model"
    code, _, err = run_cli(_train_args(missing, data["pairs"], tmp_path / "o", "--basis", llama_basis), capsys)
    _assert_clean_error(code, err, str(missing), "does not exist")
    code, _, err = run_cli(["extract", missing, "--output", tmp_path / "b.safetensors"], capsys)
    _assert_clean_error(code, err, str(missing))


def test_guard_option_mistakes(models, data, llama_basis, tmp_path, capsys):
    base = _train_args(models["llama"], data["pairs"], tmp_path / "o")
    code, _, err = run_cli(base, capsys)
    _assert_clean_error(code, err, "--basis", "--extract")
    code, _, err = run_cli(base + ["--basis", llama_basis, "--layers", "1"], capsys)
    _assert_clean_error(code, err, "--layers")
    code, _, err = run_cli(base + ["--basis", llama_basis, "--positions", "middle"], capsys)
    _assert_clean_error(code, err, "--positions", "fN+lM")
    text = _train_args(models["llama"], data["text"], tmp_path / "o", "--basis", llama_basis, "--positions", "response")
    code, _, err = run_cli(text, capsys)
    _assert_clean_error(code, err, "--prompt-field", "['text']")
    code, _, err = run_cli(base + ["--basis", tmp_path / "missing.safetensors"], capsys)
    _assert_clean_error(code, err, "missing.safetensors")


def test_basis_of_another_model_is_refused(models, data, tmp_path, capsys):
    gen = torch.Generator().manual_seed(0)
    wide = RefusalBasis({0: orthonormalize_basis(torch.randn(64, 1, generator=gen))}, {"model_name": "wide-model"})
    path = wide.save(tmp_path / "wide.safetensors")
    code, _, err = run_cli(_train_args(models["llama"], data["pairs"], tmp_path / "o", "--basis", path), capsys)
    _assert_clean_error(code, err, "hidden size 64", "hidden size 32")


def test_extract_option_mistakes(models, tmp_path, capsys):
    code, _, err = run_cli(["extract", models["llama"], "--method", "dim", "--k", "2"], capsys)
    _assert_clean_error(code, err, "--method svd")
    code, _, err = run_cli(["extract", models["llama"], "--harmful", tmp_path / "gone.txt"], capsys)
    _assert_clean_error(code, err, "gone.txt", "does not exist")
    code, _, err = run_cli(
        [
            "extract",
            models["llama"],
            "--layers",
            "7",
            "--limit",
            "4",
            "--quiet",
            "--output",
            tmp_path / "b.safetensors",
        ],
        capsys,
    )
    _assert_clean_error(code, err, "layer 7", "2 decoder layers")
    with pytest.raises(SystemExit) as info:
        main(["extract", str(models["llama"]), "--layers", "a-b"])
    assert info.value.code == 2
    assert re.search(r"cannot read layers 'a-b'", capsys.readouterr().err)


def test_train_resume_from_the_latest_checkpoint_equals_one_run(models, data, llama_basis, tmp_path, capsys):
    """Issue #10: --resume (no value: the latest checkpoint in --output-dir) after an interruption
    gives the adapter of an uninterrupted run, bit for bit on CPU."""
    from safetensors.torch import load_file

    options = ["--basis", llama_basis, "--positions", "response", "--save-steps", "2", "--warmup-steps", "3"]
    options += ["--lr", "0.02"]

    def train(out_dir, *extra):
        args = _train_args(models["llama"], data["pairs"], out_dir, *options, *extra)
        args[args.index("--steps") + 1] = "4"
        args[args.index("--batch-size") + 1] = "2"
        code, out, err = run_cli(args, capsys)
        assert code == 0, err
        return out

    train(tmp_path / "straight")
    train(tmp_path / "broken")
    # what a run killed during step 3 leaves behind: checkpoint-2 only, no final adapter
    broken = tmp_path / "broken"
    shutil.rmtree(broken / "checkpoint-4")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (broken / name).unlink()
    out = train(broken, "--resume")
    want = load_file(tmp_path / "straight" / "adapter_model.safetensors")
    got = load_file(broken / "adapter_model.safetensors")
    assert want.keys() == got.keys() and want
    for name in want:
        assert torch.equal(want[name], got[name]), name
    # 2 logged steps after the resume, not 4: it did continue from checkpoint-2
    assert len(_logged(out)) == 2


def test_train_resume_errors(models, data, llama_basis, tmp_path, capsys):
    base = _train_args(models["llama"], data["pairs"], tmp_path / "empty", "--basis", llama_basis)
    code, _, err = run_cli(base + ["--resume"], capsys)
    assert code == 2 and "no checkpoint-N folder" in err and "--resume PATH" in err
    code, _, err = run_cli(base + ["--resume", str(tmp_path)], capsys)
    assert code == 2 and "not a Trainer checkpoint folder" in err


# ---------------------------------------------------------------------- issue 17, finding 9: CLI options


def test_no_guard_is_plain_lora_without_hooks(models, data, tmp_path, capsys, monkeypatch):
    from refusalguard_kernels.integration import hooks

    def no_hooks(*args, **kwargs):
        raise AssertionError("--no-guard must not build a RefusalGuard")

    monkeypatch.setattr(hooks.RefusalGuard, "__init__", no_hooks)
    out_dir = tmp_path / "plain"
    code, out, err = run_cli(_train_args(models["llama"], data["pairs"], out_dir, "--no-guard"), capsys)
    assert code == 0, err
    assert "guard_penalty" not in out and "no guard" in out
    assert (out_dir / "adapter_model.safetensors").is_file() and not (out_dir / BASIS_FILENAME).exists()
    code, _, err = run_cli(_train_args(models["llama"], data["pairs"], out_dir, "--no-guard", "--k", "2"), capsys)
    assert code == 2 and "--no-guard trains without the guard; drop --k" in err


def _saved_adapter(model_path, out):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(5)
    model = AutoModelForCausalLM.from_pretrained(model_path)
    adapted = get_peft_model(
        model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False)
    )
    adapted.save_pretrained(out)
    return out


def test_adapter_is_merged_before_extract_and_train(models, data, tmp_path, capsys):
    adapter = _saved_adapter(models["llama"], tmp_path / "aligned")
    plain, merged = tmp_path / "plain.safetensors", tmp_path / "merged.safetensors"
    common = ["--layers", "1", "--limit", "8", "--quiet"]
    assert run_cli(["extract", models["llama"], "-o", plain, *common], capsys)[0] == 0
    assert run_cli(["extract", models["llama"], "--adapter", adapter, "-o", merged, *common], capsys)[0] == 0
    with_adapter = RefusalBasis.load(merged)
    assert not torch.allclose(RefusalBasis.load(plain).bases[1], with_adapter.bases[1], atol=1e-3)
    assert with_adapter.metadata["adapter"] == str(adapter)
    out_dir = tmp_path / "attack"
    code, out, err = run_cli(
        _train_args(models["llama"], data["pairs"], out_dir, "--adapter", adapter, "--basis", merged), capsys
    )
    assert code == 0, err
    assert float(_logged(out)[0]["guard_penalty"]) == 0.0  # anchors: the merged (aligned) model itself
    code, _, err = run_cli(["extract", models["llama"], "--adapter", tmp_path, "-o", plain, *common], capsys)
    assert code == 2 and "not a PEFT adapter folder" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only fallback")
def test_bf16_without_cpu_flag_trains_on_the_cpu(models, data, llama_basis, tmp_path, capsys):
    code, out, err = run_cli(
        _train_args(models["llama"], data["pairs"], tmp_path / "o", "--basis", llama_basis, "--bf16"), capsys
    )
    assert code == 0, err
    assert "use_cpu" not in err


def test_dtype_auto_is_float32_for_training_without_bf16(monkeypatch):
    from refusalguard_kernels.cli.common import resolve_dtype

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("auto", "cuda", bf16=False, training=True) == torch.float32
    assert resolve_dtype("auto", "cuda", bf16=True, training=True) == torch.bfloat16
    assert resolve_dtype("auto", "cuda") == torch.bfloat16  # inference on a bf16 GPU
    parser = _subparser("train")
    assert "auto: bfloat16 with --bf16, else float32" in " ".join(parser.format_help().split())


def test_threads_and_quiet(models, tmp_path, capsys):
    before = torch.get_num_threads()
    try:
        code, _, err = run_cli(
            [
                "extract",
                models["llama"],
                "--layers",
                "1",
                "--limit",
                "4",
                "--threads",
                "1",
                "--quiet",
                "-o",
                tmp_path / "b",
            ],
            capsys,
        )
        assert code == 0, err
        assert torch.get_num_threads() == 1
        assert "Loading weights" not in err and "%|" not in err  # no progress bar at all, weight loading included
    finally:
        torch.set_num_threads(before)
        from huggingface_hub.utils import enable_progress_bars
        from transformers.utils import logging as hf_logging

        hf_logging.enable_progress_bar()
        enable_progress_bars()
    for command in ("train", "extract", "eval", "diagnose"):
        assert "--threads" in _subparser(command).format_help(), command


def test_diagnose_and_extract_read_the_same_positions_by_default():
    parser = build_parser()
    extract = parser.parse_args(["extract", "m"])
    diagnose = parser.parse_args(["diagnose", "m", "--tuned", "t"])
    assert extract.positions == diagnose.positions == "last"


def test_diagnose_plot_labels_stay_readable_at_30_layers(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from refusalguard_kernels.evaluation.diagnostics import plot_report

    rows = [
        {"layer": i, "max_angle_deg": 1.0, "coord_shift": [0.1], "coord_drift_rms": 0.2, "coupling_base": 0.5,
         "coupling_tuned": 0.4}
        for i in range(30)
    ]  # fmt: skip
    figures = []
    original = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (figures.append(self), original(self, *a, **k))[1])
    plot_report({"per_layer": rows}, tmp_path / "p.png")
    (figure,) = figures
    for ax in figure.axes:
        assert 5 <= len(ax.get_xticks()) <= 12
