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

__all__ = [
    "project",
    "geometry_loss",
    "guard",
    "available_backends",
    "orthonormalize_basis",
    "ORTHONORMAL_ATOL",
    "__version__",
]
