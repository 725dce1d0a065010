"""The tested dependency set (constraints.txt), the known version conflicts, and the version number."""

from __future__ import annotations

import os
import re
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement

import refusalguard_kernels
from refusalguard_kernels import versions
from refusalguard_kernels.cli import main

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import deps  # noqa: E402


def _requirements() -> list[Requirement]:
    """Every direct requirement of the installed package, with or without an extra, for this platform."""
    extras = metadata.metadata("refusalguard_kernels").get_all("Provides-Extra") or []
    reqs = []
    for text in metadata.requires("refusalguard_kernels") or []:
        req = Requirement(text)
        if req.name.replace("-", "_") == "refusalguard_kernels":
            continue
        if req.marker is None or any(req.marker.evaluate({"extra": extra}) for extra in ["", *extras]):
            reqs.append(req)
    return reqs


def test_constraints_pin_every_direct_dependency_inside_its_range():
    pins = deps.read_constraints()
    for req in _requirements():
        name = deps.canonical(req.name)
        assert name in pins, f"{req.name} is a dependency but constraints.txt does not pin it"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"constraints.txt pins {name}=={pins[name]}, outside pyproject.toml's {req}"
        )


def test_tested_set_hits_no_known_conflict():
    pins = deps.read_constraints()
    assert versions.active_conflicts({name: pins.get(name) for name in ("transformers", "peft")}) == []


@pytest.mark.skipif(
    os.environ.get("REFUSALGUARD_PINNED") != "1", reason="set REFUSALGUARD_PINNED=1 (.ci/run does) to check the venv"
)
def test_installed_set_is_the_tested_set():
    """.ci/run installs with -c constraints.txt: what runs the suite is exactly the tested set."""
    assert deps.diff(deps.read_constraints(), deps.installed()) == []


def test_constraints_round_trip_and_local_versions(tmp_path):
    text = deps.render({"torch": "2.13.0+cpu", "peft": "0.21.2"}, "a note")
    path = tmp_path / "c.txt"
    deps.write_atomic(path, text)
    assert deps.read_constraints(path) == {"peft": "0.21.2", "torch": "2.13.0"}
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind
    assert deps.diff({"torch": "2.13.0"}, {"torch": "2.13.0+cpu", "gguf": "0.19.0"}) == [("gguf", "-", "0.19.0")]
    (tmp_path / "bad.txt").write_text("torch>=2\n")
    with pytest.raises(ValueError, match="bad.txt:1: expected 'name==version'"):
        deps.read_constraints(tmp_path / "bad.txt")


def test_deps_script_names_known_conflicts():
    assert deps.known_conflicts({"transformers": "5.23.0", "peft": "0.21.2"}) == []
    (message,) = deps.known_conflicts({"transformers": "5.24.0", "peft": "0.21.2"})
    assert "transformers 5.24.0" in message


@pytest.mark.parametrize(
    ("transformers", "peft", "hit"),
    [("5.24.0", "0.21.2", True), ("5.23.0", "0.21.2", False), ("5.24.0", "0.22.0", False), ("5.24.1", None, False)],
)
def test_integrated_adapter_conflict(transformers, peft, hit):
    found = {"transformers": transformers, "peft": peft}
    assert [c.key for c in versions.active_conflicts(found)] == (["integrated-adapters"] if hit else [])
    if hit:
        with pytest.raises(versions.VersionConflictError) as info:
            versions.require("integrated-adapters", found)
        message = str(info.value)
        assert f"transformers {transformers}" in message and f"peft {peft}" in message
        assert "peft>=0.22" in message and "get_peft_model" in message
    else:
        versions.require("integrated-adapters", found)
    with pytest.raises(KeyError, match="unknown feature"):
        versions.require("no-such-feature", found)


def test_env_reports_conflicts(capsys, monkeypatch):
    monkeypatch.setattr(versions, "installed_versions", lambda: {"transformers": "5.24.0", "peft": "0.21.2"})
    assert main(["env"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("version conflict")]
    assert len(lines) == 1 and "transformers 5.24.0" in lines[0] and "peft 0.21.2" in lines[0]


def test_one_version_everywhere():
    version = refusalguard_kernels.__version__
    assert version == "0.2.0"
    assert metadata.version("refusalguard_kernels") == version, "reinstall: pip install -e ."
    changelog = (ROOT / "CHANGELOG.md").read_text()
    first = re.search(r"^## \[?(\d+\.\d+\.\d+)", changelog, re.M)
    assert first is not None and first.group(1) == version, "CHANGELOG.md's newest entry must be this version"


@pytest.mark.parametrize(
    ("numpy", "triton", "hit"),
    [("2.4.6", "3.6.0", True), ("2.3.5", "3.6.0", False), ("2.4.6", "3.7.1", False), ("2.4.6", "3.9.0", False)],
)
def test_triton_interpreter_conflict(numpy, triton, hit):
    found = {"numpy": numpy, "triton": triton}
    assert [c.key for c in versions.active_conflicts(found)] == (["triton-interpreter"] if hit else [])


def test_backend_resolution_raises_the_interpreter_conflict(monkeypatch):
    from refusalguard_kernels import backends

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(versions, "installed_versions", lambda: {"numpy": "2.4.6", "triton": "3.6.0"})
    backends._RESOLVED.clear()
    try:
        with pytest.raises(versions.VersionConflictError, match="numpy 2.4.6, triton 3.6.0"):
            backends.resolve_backend("triton", torch.device("cpu"))
    finally:
        backends._RESOLVED.clear()


def test_release_numbers():
    assert versions._release("5.24") == versions._release("5.24.0") == (5, 24)
    assert versions._release("2.13.0+cpu") == (2, 13)
    assert versions._admits(">=5.24", "5.24.0") and not versions._admits(">=5.24", "5.23.9")
    assert versions._admits(">=3.7,<4", "3.9.0") and not versions._admits("<4", "4.0")
    with pytest.raises(ValueError, match="unsupported version specifier"):
        versions._admits("~=1.0", "1.0")
