"""The fine-tuning scenarios: which data a fine-tune gets and for how many optimizer steps.

* ``harmful``: ``n_attack`` harmful requests with compliant answers (the fine-tuning attack of
  Qi et al., 2023);
* ``poisoned-10`` / ``poisoned-30``: ``n_utility`` examples of the utility data with 10% / 30% of
  them replaced by harmful examples (the poisoned-task setting of Vaccine, Lisa, Booster);
* ``benign``: the utility data only.

A seed draws the same examples for every method (paired comparisons); safety-mix adds refusal
examples on top, drawn after the shared ones. Every method of a scenario gets the same number of
optimizer steps, ``ceil(epochs * n / batch_size)`` times the attack budget.
"""

from __future__ import annotations

import math
import random

from .config import SCENARIOS

__all__ = ["POISON_SHARE", "scenario_data", "scenario_steps"]

POISON_SHARE = {"harmful": 1.0, "poisoned-10": 0.1, "poisoned-30": 0.3, "benign": 0.0}


def scenario_data(pools, scenario: str, seed: int, cfg, *, safety_share: float = 0.0) -> list:
    """The fine-tuning conversations of ``scenario`` for ``seed``: a seeded draw from ``pools``
    (anything with ``harmful_pool``, ``utility_pool`` and ``safety_pool``: a Subject or the
    organism's corpus), plus ``safety_share`` x as many refusal examples (safety-mix)."""
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; choose from {list(SCENARIOS)}")
    if not (safety_share >= 0 and math.isfinite(safety_share)):
        raise ValueError(f"safety_share must be >= 0; got {safety_share}")
    rng = random.Random(f"{scenario}/{seed}")
    if scenario == "harmful":
        data = _sample(rng, pools.harmful_pool, cfg.n_attack, "harmful_pool")
    else:
        n_poison = round(POISON_SHARE[scenario] * cfg.n_utility)
        data = _sample(rng, pools.harmful_pool, n_poison, "harmful_pool")
        data += _sample(rng, pools.utility_pool, cfg.n_utility - n_poison, "utility_pool")
    rng.shuffle(data)
    if safety_share > 0:
        extra = _sample(rng, pools.safety_pool, max(1, round(safety_share * len(data))), "safety_pool")
        data = data + extra
        rng.shuffle(data)
    return data


def _sample(rng: random.Random, pool: list, n: int, name: str) -> list:
    if n > len(pool):
        raise ValueError(f"the scenario needs {n} examples from the {name} but it holds {len(pool)}; ask for fewer")
    return rng.sample(pool, n)


def scenario_steps(cfg, scenario: str, budget: float = 1.0) -> int:
    """Optimizer steps of a fine-tune in ``scenario`` at attack budget ``budget`` (a multiplier)."""
    n, epochs = (cfg.n_attack, cfg.epochs_attack) if scenario == "harmful" else (cfg.n_utility, cfg.epochs_utility)
    return max(1, round(budget * math.ceil(epochs * n / cfg.batch_size)))
