"""`refusalguard env`: the environment a bug report needs."""

from __future__ import annotations

import json

import torch
import transformers

from refusalguard_kernels import backends
from refusalguard_kernels.cli import main


def run_env(capsys, *argv):
    code = main(["env", *argv])
    out = capsys.readouterr().out
    assert code == 0
    return out


def test_env_text_report(capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    out = run_env(capsys)
    fields = {}
    for line in out.splitlines():
        name, _, value = line.partition(":")
        fields[name.strip()] = value.strip()
    assert fields["torch"] == torch.__version__
    assert fields["transformers"] == transformers.__version__
    for name in ("python", "triton", "peft", "trl", "datasets", "torch CUDA", "available backends", "CUDA extension"):
        assert name in fields, name
    assert fields["TRITON_INTERPRET"] == "1"
    assert fields["available backends"] == ", ".join(backends.available_backends())
    why = backends._cuda_extension_error()
    if why is None:
        assert fields["CUDA extension"] == "built"
    else:  # the reason, not just "no"
        assert fields["CUDA extension"].startswith("not built: ") and len(fields["CUDA extension"]) > 20
    if not torch.cuda.is_available():
        assert fields["GPUs"] == "none visible to torch"


def test_env_json_and_extension_states(capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(backends, "_cuda_extension_error", lambda: None)
    env = json.loads(run_env(capsys, "--json"))
    assert env["cuda_extension"] == "built"
    assert env["TRITON_INTERPRET"] is None
    assert env["packages"]["torch"] == torch.__version__
    assert env["packages"]["deepspeed"] is None or isinstance(env["packages"]["deepspeed"], str)
    assert env["torch_cuda"] == torch.version.cuda
    assert isinstance(env["gpus"], list)
    monkeypatch.setattr(backends, "_cuda_extension_error", lambda: "no nvcc")
    env = json.loads(run_env(capsys, "--json"))
    assert env["cuda_extension"] == "not built: no nvcc"
