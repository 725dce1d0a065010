"""refusalguard_kernels: a fused, exact refusal-subspace penalty for LoRA fine-tuning.

Core ops (see ``reference.py`` for the contract):

    coords = project(hidden, basis)                         # Z = H B, float32
    loss = geometry_loss(hidden, basis, anchors, weight)    # drift + gram penalty
    hidden_out, loss = guard(hidden, basis, anchors, weight)  # for forward hooks
"""

from .backends import available_backends
from .functional import geometry_loss, guard, project
from .validation import ORTHONORMAL_ATOL, orthonormalize_basis

__version__ = "0.1.0"

# The model-side API needs transformers/peft/datasets (the "train" extra); import it lazily
# so the kernels work with torch alone.
_LAZY = {
    "RefusalBasis": "refusalguard_kernels.basis",
    "extract_refusal_basis": "refusalguard_kernels.basis",
    "load_prompts": "refusalguard_kernels.prompts",
    "RefusalGuard": "refusalguard_kernels.hooks",
    "RefusalGuardTrainer": "refusalguard_kernels.trainer",
    "add_cached_anchors": "refusalguard_kernels.anchors",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

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
