"""Intervals for benchmark numbers: a two-level bootstrap over fine-tuning seeds and evaluation items,
paired comparisons between methods, and goals judged on the interval.

A measurement is a ``seeds x items`` table of per-item scores (1/0 for "refused", a share for
sampled decoding, a loss with one "item"): every seed evaluates the same items (the same prompts),
so two methods run with the same seeds are compared *paired*, on the same resampled seeds and items.

    mean, (lo, hi) = bootstrap_ci(scores)                  # scores: [n_seeds][n_items]
    diff, (lo, hi) = paired_diff_ci(guard, plain)          # same seeds, same items
    verdict(value, (lo, hi), ">=", 0.85)                   # "met" / "missed" / "unresolved"

The bootstrap resamples seeds and items independently (with replacement) and takes the grand mean
of the resampled table: both the variation between fine-tuning runs and the finite prompt set
count. With one seed only the items are resampled (the interval then says nothing about another
fine-tuning draw); with one item only the seeds. Percentile intervals, ``n_boot`` draws from a
seeded generator, so one input gives one interval.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["bootstrap_ci", "paired_diff_ci", "verdict", "VERDICTS", "DEFAULT_BOOT"]

DEFAULT_BOOT = 2000
VERDICTS = ("met", "missed", "unresolved")


def _table(scores, name: str = "scores") -> np.ndarray:
    table = np.asarray(scores, dtype=np.float64)
    if table.ndim == 1:
        table = table[None, :]
    if table.ndim != 2 or table.shape[0] < 1 or table.shape[1] < 1:
        raise ValueError(f"{name} must be a non-empty [n_seeds][n_items] table; got shape {table.shape}")
    if not np.isfinite(table).all():
        raise ValueError(f"{name} has non-finite values; drop missing items before bootstrapping")
    return table


def _resampled_means(table: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Grand means of ``n_boot`` tables resampled over seeds (rows) and items (columns)."""
    n_seeds, n_items = table.shape
    out = np.empty(n_boot)
    # In chunks: n_boot x n_seeds x n_items would be large for big tables.
    chunk = max(1, 2_000_000 // max(1, n_seeds * n_items))
    for start in range(0, n_boot, chunk):
        size = min(chunk, n_boot - start)
        rows = rng.integers(0, n_seeds, size=(size, n_seeds)) if n_seeds > 1 else np.zeros((size, 1), dtype=int)
        cols = rng.integers(0, n_items, size=(size, n_items)) if n_items > 1 else np.zeros((size, 1), dtype=int)
        picked = table[rows[:, :, None], cols[:, None, :]]
        out[start : start + size] = picked.mean(axis=(1, 2))
    return out


def _interval(draws: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(draws, [tail, 1.0 - tail])
    return float(lo), float(hi)


def _check(n_boot: int, level: float) -> None:
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise ValueError(f"n_boot must be an int >= 1; got {n_boot!r}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1); got {level}")


def bootstrap_ci(
    scores: Sequence, *, n_boot: int = DEFAULT_BOOT, level: float = 0.95, seed: int = 0
) -> tuple[float, tuple[float, float]]:
    """(grand mean, (lo, hi)) of a ``[n_seeds][n_items]`` score table (a 1-D list is one seed)."""
    _check(n_boot, level)
    table = _table(scores)
    mean = float(table.mean())
    if table.size == 1:
        return mean, (mean, mean)
    draws = _resampled_means(table, n_boot, np.random.default_rng(seed))
    return mean, _interval(draws, level)


def paired_diff_ci(
    a: Sequence, b: Sequence, *, n_boot: int = DEFAULT_BOOT, level: float = 0.95, seed: int = 0
) -> tuple[float, tuple[float, float]]:
    """(mean(a) - mean(b), (lo, hi)) with ``a`` and ``b`` resampled on the same seeds and items
    (both ``[n_seeds][n_items]``, row i of each from the same fine-tuning seed, column j from the
    same prompt)."""
    _check(n_boot, level)
    ta, tb = _table(a, "a"), _table(b, "b")
    if ta.shape != tb.shape:
        raise ValueError(
            f"paired tables need the same seeds and items; got shapes {ta.shape} and {tb.shape} "
            "(compare methods run with the same seeds on the same prompts)"
        )
    diff = ta - tb
    mean = float(diff.mean())
    if diff.size == 1:
        return mean, (mean, mean)
    draws = _resampled_means(diff, n_boot, np.random.default_rng(seed))
    return mean, _interval(draws, level)


def verdict(interval: Sequence[float], op: str, threshold: float) -> str:
    """A goal judged on its interval: "met" when all of it satisfies ``op threshold`` (">=" or
    "<="), "missed" when none of it does, "unresolved" when it straddles the threshold."""
    lo, hi = (float(x) for x in interval)
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
        raise ValueError(f"interval must be finite (lo, hi) with lo <= hi; got {interval}")
    if op == ">=":
        return "met" if lo >= threshold else "missed" if hi < threshold else "unresolved"
    if op == "<=":
        return "met" if hi <= threshold else "missed" if lo > threshold else "unresolved"
    raise ValueError(f"op must be '>=' or '<='; got {op!r}")
