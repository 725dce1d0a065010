"""refusalguard_kernels: a fused, exact refusal-subspace penalty for LoRA fine-tuning.

The op (needs torch, plus triton for the fused kernels; see ``reference.py`` for the contract):

    coords = project(hidden, basis)                         # Z = H B, float32
    loss = geometry_loss(hidden, basis, anchors, weight)    # drift + gram penalty
    hidden_out, loss = guard(hidden, basis, anchors, weight)  # for forward hooks

The layers, each importing only those before it:

* the op: ``reference``, ``validation``, ``backends`` (the one dispatch point), ``functional``
  and ``ops/`` (Triton and CUDA kernels behind ``torch.library`` ops);
* ``integration/``: the guard on Hugging Face models (basis extraction, hooks, cached anchors);
* ``training/``: the guard inside ``transformers.Trainer``, dataset loading;
* ``evaluation/``: generation, judges, drift diagnostics;
* ``demo/``: the model organism and the end-to-end demo;
* ``cli/``: the ``refusalguard`` command.

The model-side names below need the ``[train]`` extra (transformers, peft, datasets, ...) and
are imported on first use, so ``import refusalguard_kernels`` works with torch alone.
"""

from . import _moved
from .backends import available_backends
from .functional import geometry_loss, guard, project
from .validation import ORTHONORMAL_ATOL, orthonormalize_basis

__version__ = "0.2.0"

_LAZY = {
    "RefusalBasis": "refusalguard_kernels.integration.basis",
    "extract_refusal_basis": "refusalguard_kernels.integration.basis",
    "load_prompts": "refusalguard_kernels.integration.prompts",
    "RefusalGuard": "refusalguard_kernels.integration.hooks",
    "add_cached_anchors": "refusalguard_kernels.integration.anchors",
    "RefusalGuardTrainer": "refusalguard_kernels.training.trainer",
    "RefusalGuardMixin": "refusalguard_kernels.training.trainer",
}
# What the model side needs (the [train] extra); checked before the first model-side import so a
# missing package is reported with the install line, not as an error deep inside a hook.
_TRAIN_EXTRA = ("transformers", "peft", "datasets", "safetensors", "tqdm")

_moved.install()


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        import importlib.util

        missing = [pkg for pkg in _TRAIN_EXTRA if importlib.util.find_spec(pkg) is None]
        if missing:
            raise ImportError(
                f"refusalguard_kernels.{name} needs {', '.join(missing)} (the [train] extra): "
                "pip install 'refusalguard_kernels[train]'. The op itself (project, geometry_loss, guard) "
                "needs only torch and triton."
            )
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'refusalguard_kernels' has no attribute {name!r}")


__all__ = [
    "project",
    "geometry_loss",
    "guard",
    "available_backends",
    "orthonormalize_basis",
    "ORTHONORMAL_ATOL",
    "__version__",
    *_LAZY,
]
