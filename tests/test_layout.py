"""The package's folders are its architecture: imports run one way, down the layers.

    op (reference, validation, backends, functional, ops/)  <  integration/  <  training/
       <  evaluation/  <  demo/  <  cli/

A module may import its own layer and the layers below it. Above the op, only the public op
modules are allowed (never ``ops/``, the kernel internals). The op never imports the training
extras. These tests walk every module's imports (top-level and function-level) with ``ast``.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

import refusalguard_kernels

PACKAGE = "refusalguard_kernels"
ROOT = Path(refusalguard_kernels.__file__).parent

# Layer of each top-level name in the package; modules not listed are the op (layer 0).
LAYERS = {"integration": 1, "training": 2, "evaluation": 3, "demo": 4, "cli": 5}
ENTRY_POINTS = {"__main__": 5}  # `python -m refusalguard_kernels` runs the CLI
OP_MODULES = {"reference", "validation", "backends", "functional", "versions", "ops", "_moved", "__init__", "__main__"}
PUBLIC_OP = {"", "reference", "validation", "backends", "functional", "versions"}  # what layers above may import
TRAIN_EXTRAS = {
    "transformers",
    "peft",
    "datasets",
    "trl",
    "safetensors",
    "tokenizers",
    "accelerate",
    "tqdm",
    "matplotlib",
}


def _modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out.append((".".join([PACKAGE, *parts]), path))
    return out


def _imports(module: str, path: Path) -> list[tuple[str, int]]:
    """Absolute names of everything the module imports, with line numbers."""
    tree = ast.parse(path.read_text("utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            names.append((target, node.lineno))
            # `from . import x` / `from ..integration import hooks`: x may be a module
            names += [(f"{target}.{alias.name}", node.lineno) for alias in node.names]
    return names


def _layer(name: str) -> int:
    head = name.split(".")[1] if name.count(".") else ""
    return {**LAYERS, **ENTRY_POINTS}.get(head, 0)


def _top(name: str) -> str:
    return name.split(".")[1] if name.count(".") else ""


def _real_module(name: str) -> bool:
    rel = name[len(PACKAGE) + 1 :].replace(".", "/")
    return name == PACKAGE or (ROOT / f"{rel}.py").exists() or (ROOT / rel / "__init__.py").exists()


def _violations() -> list[str]:
    problems = []
    for module, path in _modules():
        own = _layer(module)
        where = f"{path.relative_to(ROOT.parent)}"
        for target, line in _imports(module, path):
            third_party = target.split(".")[0]
            if own == 0 and third_party in TRAIN_EXTRAS:
                problems.append(f"{where}:{line}: the op imports {target} (a [train] extra)")
            if not target.startswith(PACKAGE) or not _real_module(target):
                continue
            theirs = _layer(target)
            if theirs > own:
                problems.append(f"{where}:{line}: upward import of {target}")
            elif theirs == own and own > 0 and _top(target) != _top(module) and _top(module) not in ENTRY_POINTS:
                problems.append(f"{where}:{line}: sideways import of {target}")
            elif own > 0 and theirs == 0 and _top(target) not in PUBLIC_OP:
                problems.append(f"{where}:{line}: {target} is a kernel internal; use the public op")
    return problems


def test_every_subpackage_is_a_known_layer():
    tops = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert tops == set(LAYERS) | {"ops"}, f"new subpackage {tops - set(LAYERS) - {'ops'}}: give it a layer here"
    for name in tops:
        doc = ast.get_docstring(ast.parse((ROOT / name / "__init__.py").read_text("utf-8")))
        assert doc and len(doc) > 80, f"{name}/__init__.py needs a docstring saying what it holds and may import"


def test_imports_run_down_the_layers():
    assert _violations() == []


def test_the_checker_catches_violations(tmp_path, monkeypatch):
    # Proves the walk sees function-level, relative and sideways imports (it would pass vacuously otherwise).
    fake = tmp_path / PACKAGE
    for sub in ("integration", "training", "evaluation", "ops"):
        (fake / sub).mkdir(parents=True)
        (fake / sub / "__init__.py").write_text('"""x"""\n')
    (fake / "__init__.py").write_text("")
    (fake / "functional.py").write_text("def f():\n    import transformers\n")
    (fake / "ops" / "k.py").write_text("")
    (fake / "integration" / "hooks.py").write_text("def f():\n    from ..training import trainer\n")
    (fake / "training" / "trainer.py").write_text("from ..ops import k\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", fake)
    found = "\n".join(_violations())
    assert "functional.py:2: the op imports transformers" in found
    assert "integration/hooks.py:2: upward import of refusalguard_kernels.training" in found
    assert "training/trainer.py:1: refusalguard_kernels.ops.k is a kernel internal" in found


def test_no_cycle_between_dispatch_and_cuda_backend():
    for module, path in _modules():
        if module.endswith("ops.cuda_penalty") or module.endswith("ops.triton_penalty"):
            targets = {t for t, _ in _imports(module, path)}
            assert not any(t.startswith(f"{PACKAGE}.backends") or t == f"{PACKAGE}.backends" for t in targets), module


def _run_python(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, timeout=300
    )


def test_op_imports_without_the_training_extras():
    # Block the [train] extras as if they were not installed; the op must import and run.
    result = _run_python(
        f"""
        import sys
        for name in {sorted(TRAIN_EXTRAS)!r}:
            sys.modules[name] = None
        import torch
        import refusalguard_kernels as rg
        h = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
        b = rg.orthonormalize_basis(torch.randn(8, 2, generator=torch.Generator().manual_seed(1)))
        print(float(rg.geometry_loss(h, b, rg.project(h, b) + 1, torch.ones(4), backend="torch")))
        try:
            rg.RefusalGuard
        except ImportError as exc:
            print("ERROR:", exc)
        loaded = sorted(m for m in sys.modules if m.startswith("refusalguard_kernels."))
        print("LOADED:", loaded)
        """
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert float(lines[0]) == pytest.approx(2.0, rel=1e-6)  # drift of +1 in each of k=2 coords
    assert lines[1].startswith("ERROR:") and "[train]" in lines[1] and "transformers" in lines[1], lines[1]
    assert "integration" not in lines[2] and "training" not in lines[2], lines[2]


def test_old_module_paths_still_work_with_a_deprecation_warning():
    import refusalguard_kernels.integration.hooks as new_hooks
    from refusalguard_kernels._moved import MOVED

    for name in MOVED:
        sys.modules.pop(f"{PACKAGE}.{name}", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from refusalguard_kernels.hooks import RefusalGuard
        from refusalguard_kernels.organism.corpus import build_corpus
    assert RefusalGuard is new_hooks.RefusalGuard
    from refusalguard_kernels.demo.organism.corpus import build_corpus as new_build_corpus

    assert build_corpus is new_build_corpus
    messages = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]
    assert any("refusalguard_kernels.hooks moved to refusalguard_kernels.integration.hooks" in m for m in messages)
    assert any("refusalguard_kernels.organism moved to refusalguard_kernels.demo.organism" in m for m in messages)
    for name in MOVED:  # the old name aliases the new module object itself
        sys.modules.pop(f"{PACKAGE}.{name}", None)
