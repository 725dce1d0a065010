"""Evaluation: batched generation, the keyword refusal and compliance judges and the refusal /
compliance / over-refusal / task metrics (``generation``), classifier judges in the Llama Guard and
HarmBench style (``judges``), and drift diagnostics of a model's refusal geometry (``diagnostics``).

May import: the public op, ``refusalguard_kernels.integration`` and ``.training``. Never demo or cli.

``refusalguard_kernels.evaluation`` was a single module before 0.2; its names are re-exported here
so ``from refusalguard_kernels.evaluation import is_refusal`` keeps working.
"""

from .generation import *  # noqa: F403
from .generation import __all__ as _generation_all

__all__ = list(_generation_all)
