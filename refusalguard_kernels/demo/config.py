"""The demo's options (``DemoConfig``), its presets (quick / default / full) and the names of its
scenarios and methods.

Methods and what their *strength* is (every method but plain LoRA is swept over it for the
refusal-vs-utility frontier):

==================  ======================================================================
plain LoRA          none
safety-mix          refusal examples added to the data, as a share of it
procon              ProCon-style: k = 1 difference-of-means direction, drift only, warm-up;
                    strength = drift_coef (spread units)
refusalguard        the k-direction refusal cone, drift + Gram; strength = drift_coef (spread
                    units), gram_coef = ``gram_ratio`` x drift_coef
random-subspace     control (a): the same guard (k, layers, positions, coefficients, Gram
                    ratio) on a random orthonormal basis, a new draw per fine-tuning seed;
                    strength = drift_coef
kl                  control (b): KL(base || tuned) of the next-token distributions over every
                    non-padding token, added to the loss; strength = its coefficient
low-lr              control (c): plain LoRA at a lower learning rate; strength = the fraction
                    of the learning rate
==================  ======================================================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = [
    "SCENARIOS",
    "METHODS",
    "CONTROLS",
    "PRESETS",
    "DEFAULT_STRENGTHS",
    "SWEEP_STRENGTHS",
    "FULL_SWEEP_STRENGTHS",
    "DemoConfig",
    "preset_config",
]

SCENARIOS = ("harmful", "poisoned-10", "poisoned-30", "benign")
METHODS = ("plain LoRA", "safety-mix", "procon", "refusalguard", "random-subspace", "kl", "low-lr")
#: the controls of issue 18: the guard's claim stands only where it beats them.
CONTROLS = ("random-subspace", "kl", "low-lr")
PRESETS = ("quick", "default", "full", "reduced")  # "reduced": the SmolLM2 benchmark's reduced run
MODELS = ("organism", "smollm2")

#: each method's strength in the main table: on the organism's validation phrasings (2 seeds), the
#: smallest value of the sweep grid that kept >= 0.95 refusal against the harmful attack and >= 0.80
#: on poisoned-30 (docs/demo.md, "Tuning"); the random subspace takes the guard's coefficient (the
#: control's definition); safety-mix reached neither bar (0.23 at share 1.0) and keeps the common 0.2.
DEFAULT_STRENGTHS: dict[str, float | None] = {
    "plain LoRA": None,
    "safety-mix": 0.2,
    "procon": 300.0,
    "refusalguard": 30.0,
    "random-subspace": 30.0,
    "kl": 30.0,
    "low-lr": 0.03,
}
#: the extra strengths of the frontier sweep (the main strength is always included).
SWEEP_STRENGTHS: dict[str, list[float]] = {
    "safety-mix": [0.5, 1.0],
    "procon": [10.0, 30.0, 100.0],
    "refusalguard": [3.0, 10.0, 100.0],
    "random-subspace": [3.0, 10.0, 100.0],
    "kl": [1.0, 3.0, 10.0],
    "low-lr": [0.1, 0.3],
}

#: the sweep of ``--full`` (fewer points where a method's curve is flat, so the run fits in an hour
#: on 2 shared cores; poisoned-10 runs in ``--quick`` and on request)
FULL_SWEEP_STRENGTHS: dict[str, list[float]] = {
    "safety-mix": [1.0],
    "procon": [30.0, 100.0],
    "refusalguard": [3.0, 10.0, 100.0],
    "random-subspace": [3.0, 10.0, 100.0],
    "kl": [1.0, 3.0, 10.0],
    "low-lr": [0.1, 0.3],
}


@dataclass
class DemoConfig:
    """Options of the demo (the CLI's flags map one to one).

    ``seeds`` vary the fine-tuning (data draw, order, LoRA init, the random-subspace draw);
    ``organism_seeds`` the organism (corpus draw and weight init). ``budgets`` multiply the
    fine-tuning steps of ``budget_scenarios`` for ``budget_methods`` (the attack-budget sweep);
    ``sweep`` adds each method's ``SWEEP_STRENGTHS`` on ``sweep_scenarios`` (the frontier).
    """

    output_dir: str = "refusalguard_demo"
    preset: str = "default"
    model: str = "organism"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    organism_seeds: list[int] = field(default_factory=lambda: [0])
    scenarios: list[str] = field(default_factory=lambda: ["harmful", "poisoned-30", "benign"])
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    strengths: dict = field(default_factory=lambda: dict(DEFAULT_STRENGTHS))
    sweep: bool = False
    sweep_strengths: dict = field(default_factory=lambda: {m: list(v) for m, v in SWEEP_STRENGTHS.items()})
    sweep_scenarios: list[str] = field(default_factory=lambda: ["poisoned-30"])
    budgets: list[float] = field(default_factory=lambda: [1.0])
    budget_scenarios: list[str] = field(default_factory=lambda: ["harmful"])
    budget_methods: list[str] = field(default_factory=lambda: ["plain LoRA", "refusalguard", "random-subspace", "kl"])
    budget_organisms: list[int] = field(default_factory=lambda: [0])  # organisms that run the budget sweep
    # organisms that run the strength sweep (None: every organism); --full sweeps organism 0 only
    sweep_organisms: list[int] | None = None
    # the guards (RefusalGuard, ProCon, random subspace)
    k: int = 3
    gram_ratio: float = 0.03  # gram_coef = gram_ratio * drift_coef (spread units)
    warmup_fraction: float = 0.0
    procon_warmup_fraction: float = 0.3
    warmup_multiplier: float = 10.0
    layers: list[int] | None = None  # None: every decoder layer (organism) / the model's default (smollm2)
    basis_positions: str = "last"
    guard_positions: str = "all"
    # fine-tuning data and budget
    n_attack: int = 100
    n_utility: int = 300
    epochs_attack: float = 3.0  # optimizer steps = ceil(epochs * n / batch), the same for every method
    epochs_utility: float = 2.0
    lora_r: int = 8
    lora_alpha: float = 16.0
    learning_rate: float = 2e-3
    batch_size: int = 16
    # evaluation
    max_new_tokens: int = 64
    samples: int = 0  # sampled generations per harmful prompt (temperature below) beside greedy; 0: greedy only
    sample_scenarios: list[str] = field(default_factory=lambda: ["harmful"])  # where the samples are drawn
    temperature: float = 0.7
    n_boot: int = 2000
    drift: bool = True  # the refusal-direction cosine and coupling of every main-strength, 1x-budget fine-tune
    generations_per_run: int = 20  # greedy generations per prompt set kept in generations.json
    threads: int = (
        1  # the organism's matmuls are tiny: 1 thread is as fast when idle and far faster when the cores are shared
    )
    organism: str | None = None  # a saved organism folder to reuse instead of the cache
    validation: bool = False  # measure on the validation prompts (for tuning) instead of the held-out ones
    cache: bool = True  # reuse a run's cached result when its config hash matches
    show_progress: bool = True

    def __post_init__(self):
        self.seeds = [int(s) for s in self.seeds]
        self.organism_seeds = [int(s) for s in self.organism_seeds]
        if self.sweep_organisms is not None:
            self.sweep_organisms = [int(s) for s in self.sweep_organisms]
        self.budgets = [float(b) for b in self.budgets]
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose from {list(PRESETS)}")
        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}; choose from {list(MODELS)}")
        for name in ("seeds", "organism_seeds"):
            values = getattr(self, name)
            if not values or len(set(values)) != len(values):
                raise ValueError(f"{name} must be a non-empty list of distinct ints; got {values}")
        for name in ("scenarios", "sweep_scenarios", "budget_scenarios", "sample_scenarios"):
            unknown = [s for s in getattr(self, name) if s not in SCENARIOS]
            if unknown:
                raise ValueError(f"unknown {name} {unknown}; choose from {list(SCENARIOS)}")
        if not self.scenarios:
            raise ValueError("scenarios must not be empty")
        for name in ("methods", "budget_methods"):
            unknown = [m for m in getattr(self, name) if m not in METHODS]
            if unknown:
                raise ValueError(f"unknown {name} {unknown}; choose from {list(METHODS)}")
        if not self.methods:
            raise ValueError(f"methods must be a non-empty subset of {list(METHODS)}")
        strengths = dict(DEFAULT_STRENGTHS)
        strengths.update(self.strengths or {})
        self.strengths = strengths
        for method, value in self.strengths.items():
            if method not in METHODS:
                raise ValueError(f"strengths names an unknown method {method!r}; choose from {list(METHODS)}")
            if method == "plain LoRA":
                if value is not None:
                    raise ValueError("plain LoRA has no strength; leave it None")
                continue
            _check_strength(method, value)
        for method, values in (self.sweep_strengths or {}).items():
            if method not in METHODS or method == "plain LoRA":
                raise ValueError(f"sweep_strengths names {method!r}; choose from {list(METHODS[1:])}")
            for value in values:
                _check_strength(method, value)
        if any(not (math.isfinite(b) and b > 0) for b in self.budgets) or not self.budgets:
            raise ValueError(f"budgets must be positive step multipliers such as 1,3,10; got {self.budgets}")
        for name in ("learning_rate", "epochs_attack", "epochs_utility", "lora_alpha", "temperature"):
            value = float(getattr(self, name))
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number; got {value}")
        for name in ("gram_ratio", "warmup_fraction", "procon_warmup_fraction"):
            if not (math.isfinite(float(getattr(self, name))) and getattr(self, name) >= 0):
                raise ValueError(f"{name} must be >= 0; got {getattr(self, name)}")
        for name in ("k", "lora_r", "batch_size", "max_new_tokens", "threads", "n_attack", "n_utility", "n_boot"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        for name in ("samples", "generations_per_run"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0; got {getattr(self, name)}")
        if self.organism is not None and len(self.organism_seeds) != 1:
            raise ValueError("organism (a saved organism folder) is one organism: give one organism seed, or none")
        if self.basis_positions not in ("last", "post-instruction"):
            raise ValueError(f"basis_positions must be 'last' or 'post-instruction'; got {self.basis_positions!r}")

    def strength_of(self, method: str) -> float | None:
        return self.strengths.get(method)


def _check_strength(method: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"the strength of {method} must be a positive number; got {value!r}")
    if method == "low-lr" and value > 1.0:
        raise ValueError(f"low-lr's strength is a fraction of the learning rate, in (0, 1]; got {value}")


def preset_config(preset: str = "default", **overrides) -> DemoConfig:
    """The config of a preset, with ``overrides`` (DemoConfig fields) on top.

    * ``quick``: the quick organism, harmful + poisoned-10, plain LoRA, RefusalGuard and the
      random-subspace control, seeds 0, 1, no drift measures (under a minute);
    * ``default``: organism 0, harmful + poisoned-30 + benign, every method at its main
      strength, seeds 0, 1, 2 (about 5 minutes on 2 cores);
    * ``full``: organisms 0, 1, 2, harmful + poisoned-30 + benign, every method, seeds 0-4, the
      strength sweep (frontier, ``FULL_SWEEP_STRENGTHS``) on poisoned-30 (organism 0), the attack-budget sweep (1x, 3x, 10x) on harmful (organism 0),
      sampled decoding (5 samples per harmful prompt at temperature 0.7) beside greedy on harmful.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {list(PRESETS)}")
    options: dict = {"preset": preset}
    if preset == "quick":
        options.update(
            seeds=[0, 1],
            scenarios=["harmful", "poisoned-10"],
            methods=["plain LoRA", "refusalguard", "random-subspace"],
            drift=False,
            max_new_tokens=32,
            n_boot=1000,
        )
    elif preset == "full":
        options.update(
            seeds=[0, 1, 2, 3, 4],
            organism_seeds=[0, 1, 2],
            scenarios=["harmful", "poisoned-30", "benign"],
            sweep=True,
            sweep_strengths={m: list(v) for m, v in FULL_SWEEP_STRENGTHS.items()},
            sweep_organisms=[0],
            budgets=[1.0, 3.0, 10.0],
            samples=5,
        )
    options.update(overrides)
    return DemoConfig(**options)
