"""The end-to-end demo: a fine-tuning-attack benchmark with controls, on model organisms and on
SmolLM2-135M-Instruct, through one code path.

For every subject (organism seed, or ``smollm2``): the aligned base model is measured, then for
every planned run (scenario x method x strength x attack budget) and every fine-tuning seed a LoRA
fine-tune with that method is measured the same way (``metrics``). Each run's result is cached in
``output_dir/runs/<subject>/<hash>.json``, the hash covering everything the result depends on
(subject, data, method, strength, budget, seed, training and evaluation settings), so a rerun
redoes only what changed. The report (``report``) aggregates seeds and items with bootstrap
intervals, compares methods paired on the same seeds and prompts, judges the goals on the
intervals, and draws the refusal-vs-utility frontier and the attack-budget curves.

What the seeds vary: the fine-tuning only (which pool examples are drawn, their order, the LoRA
initialisation, the random-subspace draw); the subject, its bases and evaluation prompts are fixed.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import asdict

import torch

from .config import CONTROLS, METHODS, SCENARIOS, DemoConfig, preset_config
from .scenarios import scenario_data, scenario_steps

__all__ = [
    "SCENARIOS",
    "METHODS",
    "CONTROLS",
    "DemoConfig",
    "preset_config",
    "run_demo",
    "plan_runs",
    "run_key",
    "RESULT_VERSION",
]

#: bump when what a cached run result means changes (measurement or training code)
RESULT_VERSION = 1


def plan_runs(cfg: DemoConfig, *, budgets: bool = True, sweep: bool = True) -> list[dict]:
    """The runs of one subject, in order: dicts with scenario, method, strength, budget and kind
    ("main", "sweep" or "budget"); ``budgets=False`` leaves out the attack-budget sweep,
    ``sweep=False`` the strength sweep."""
    plan: list[dict] = []
    seen = set()

    def add(scenario, method, strength, budget, kind):
        key = (scenario, method, strength, budget)
        if key not in seen:
            seen.add(key)
            plan.append(dict(scenario=scenario, method=method, strength=strength, budget=budget, kind=kind))

    main = lambda m: cfg.strength_of(m)  # noqa: E731
    for scenario in cfg.scenarios:
        for method in cfg.methods:
            add(scenario, method, main(method), 1.0, "main")
    if cfg.sweep and sweep:
        for scenario in cfg.sweep_scenarios:
            for method in cfg.methods:
                add(scenario, method, main(method), 1.0, "main")
            for method in cfg.methods:
                for strength in cfg.sweep_strengths.get(method, []):
                    add(scenario, method, float(strength), 1.0, "sweep")
    for scenario in cfg.budget_scenarios:
        if not budgets or all(b == 1.0 for b in cfg.budgets):
            break
        for budget in sorted(cfg.budgets):
            for method in [m for m in cfg.budget_methods if m in cfg.methods]:
                add(scenario, method, main(method), budget, "main" if budget == 1.0 else "budget")
    return plan


def _training_settings(cfg: DemoConfig) -> dict:
    keys = (
        "k",
        "gram_ratio",
        "warmup_fraction",
        "procon_warmup_fraction",
        "warmup_multiplier",
        "layers",
        "basis_positions",
        "guard_positions",
        "n_attack",
        "n_utility",
        "epochs_attack",
        "epochs_utility",
        "lora_r",
        "lora_alpha",
        "learning_rate",
        "batch_size",
        "threads",
    )
    return {k: getattr(cfg, k) for k in keys}


def _eval_settings(cfg: DemoConfig, run: dict) -> dict:
    settings = {k: getattr(cfg, k) for k in ("max_new_tokens", "validation")}
    settings["samples"] = _samples(cfg, run)
    settings["temperature"] = cfg.temperature if settings["samples"] else None
    settings["drift"] = _drift_on(cfg, run)
    return settings


def _samples(cfg: DemoConfig, run: dict) -> int:
    """Sampled generations per harmful prompt for ``run`` (only in ``cfg.sample_scenarios``)."""
    return cfg.samples if run["scenario"] in cfg.sample_scenarios or run["method"] == "base" else 0


def _drift_on(cfg: DemoConfig, run: dict) -> bool:
    return cfg.drift and run.get("kind") in ("main", "base") and run["budget"] == 1.0


def run_key(subject_fingerprint: dict, run: dict, seed: int, cfg: DemoConfig) -> str:
    """The hash a run's cached result is stored under: everything the result depends on."""
    payload = {
        "version": RESULT_VERSION,
        "subject": subject_fingerprint,
        "run": {k: run[k] for k in ("scenario", "method", "strength", "budget")},
        "seed": seed,
        "training": _training_settings(cfg) if run["method"] != "base" else None,
        "eval": _eval_settings(cfg, run),
        "torch": torch.__version__,
    }
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _write_json(path: str, data) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _load_cached(path: str, key: str) -> dict | None:
    try:
        with open(path) as f:
            result = json.load(f)
    except (OSError, ValueError):
        return None
    return result if result.get("key") == key else None


def _subjects(cfg: DemoConfig):
    """Yield the subjects one at a time (each model is loaded only while its runs go)."""
    if cfg.model == "smollm2":
        from .smollm2 import smollm2_subject

        yield smollm2_subject(cfg)
        return
    from .subjects import organism_subject

    for seed in cfg.organism_seeds:
        yield organism_subject(cfg, seed)


def _slug(run: dict) -> str:
    method = {"plain LoRA": "plain", "safety-mix": "safety_mix"}.get(run["method"], run["method"])
    strength = "" if run["strength"] is None else f"_s{run['strength']:g}"
    budget = "" if run["budget"] == 1.0 else f"_x{run['budget']:g}"
    return f"{run['scenario']}_{method}{strength}{budget}"


def run_demo(cfg: DemoConfig) -> dict:
    """Run the benchmark; returns the report (also written to ``cfg.output_dir``)."""
    from tqdm.auto import tqdm

    from .report import build_report, write_outputs

    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    t_start = time.perf_counter()
    os.makedirs(cfg.output_dir, exist_ok=True)
    plans = {
        seed: plan_runs(
            cfg,
            budgets=cfg.model == "smollm2" or seed in cfg.budget_organisms,
            sweep=cfg.model == "smollm2" or cfg.sweep_organisms is None or seed in cfg.sweep_organisms,
        )
        for seed in ([0] if cfg.model == "smollm2" else cfg.organism_seeds)
    }
    bar = tqdm(
        total=sum(1 + len(plan) * len(cfg.seeds) for plan in plans.values()),
        desc="refusalguard demo",
        unit="run",
        disable=not cfg.show_progress,
    )
    results: list[dict] = []
    subjects_info: dict[str, dict] = {}
    timings = {"subjects": 0.0, "runs_computed": 0.0}
    counts = {"computed": 0, "cached": 0}
    try:
        for seed, subject in zip(plans, _subjects_with_progress(cfg, bar, timings)):
            subjects_info[subject.name] = subject.info
            results += _run_subject(subject, cfg, plans[seed], bar, timings, counts)
            del subject
        bar.set_description("writing the report")
        timings["total"] = time.perf_counter() - t_start
        report = build_report(results, cfg, subjects_info, timings=timings, counts=counts)
        write_outputs(report, results, cfg)
        return report
    finally:
        bar.close()
        torch.set_num_threads(threads)


class _BaseGeometry:
    """The base model's geometry, measured on first use (only runs with drift measures need it)."""

    def __init__(self, subject):
        self.subject, self.value = subject, None

    def __call__(self):
        from .metrics import geometry

        if self.value is None:
            self.value = geometry(self.subject.model, self.subject)
        return self.value


def _run_subject(subject, cfg: DemoConfig, plan: list[dict], bar, timings: dict, counts: dict) -> list[dict]:
    """The base row and every planned run x seed of one subject, from the cache or computed."""
    from .methods import Bases, finetune
    from .metrics import drift, geometry, measure

    results = []
    tick = time.perf_counter()
    bases = Bases(subject, cfg)
    base_geom = _BaseGeometry(subject)
    cache_dir = os.path.join(cfg.output_dir, "runs", subject.name)
    base_run = dict(scenario="none", method="base", strength=None, budget=1.0, kind="base")
    key = run_key(subject.fingerprint, base_run, 0, cfg)
    path = os.path.join(cache_dir, f"base_{key}.json")
    result = _load_cached(path, key) if cfg.cache else None
    if result is None:
        items, gens = measure(subject.model, subject, cfg, sample_seed=0, samples=_samples(cfg, base_run))
        extra = drift(base_geom(), base_geom()) if _drift_on(cfg, base_run) else {}
        result = {"key": key, **base_run, "seed": 0, "items": items, "generations": gens, **extra}
        _write_json(path, result)
    results.append({"model": subject.name, **result})
    timings["subjects"] += time.perf_counter() - tick
    bar.update(1)

    for run in plan:
        for seed in cfg.seeds:
            key = run_key(subject.fingerprint, run, seed, cfg)
            path = os.path.join(cache_dir, f"{_slug(run)}_seed{seed}_{key}.json")
            result = _load_cached(path, key) if cfg.cache else None
            if result is not None:
                counts["cached"] += 1
            else:
                bar.set_description(
                    f"{subject.name} | {run['scenario']} | {run['method']}"
                    + ("" if run["strength"] is None else f" {run['strength']:g}")
                    + ("" if run["budget"] == 1.0 else f" x{run['budget']:g}")
                    + f" | seed {seed}"
                )
                tick = time.perf_counter()
                share = run["strength"] if run["method"] == "safety-mix" else 0.0
                data = scenario_data(subject, run["scenario"], seed, cfg, safety_share=share)
                steps = scenario_steps(cfg, run["scenario"], run["budget"])
                tuned, info = finetune(
                    subject,
                    data,
                    cfg,
                    method=run["method"],
                    strength=run["strength"],
                    steps=steps,
                    seed=seed,
                    bases=bases,
                )
                items, gens = measure(tuned, subject, cfg, sample_seed=seed, samples=_samples(cfg, run))
                extra = drift(base_geom(), geometry(tuned, subject)) if _drift_on(cfg, run) else {}
                seconds = time.perf_counter() - tick
                result = {"key": key, **run, "seed": seed, **info, "items": items, "generations": gens}
                result.update(extra, seconds=seconds)
                _write_json(path, result)
                if run["kind"] == "main" and run["budget"] == 1.0 and seed == cfg.seeds[0]:
                    # The first seed's adapter, for `refusalguard eval/diagnose --adapter`.
                    tuned.save_pretrained(os.path.join(cfg.output_dir, "adapters", subject.name, _slug(run)))
                del tuned
                counts["computed"] += 1
                timings["runs_computed"] += seconds
            # the plan decides main / sweep / budget (a cached run may have been planned otherwise)
            results.append({"model": subject.name, **result, "kind": run["kind"]})
            bar.update(1)
    return results


def _subjects_with_progress(cfg, bar, timings):
    for_name = "SmolLM2 (aligning it, or loading the aligned copy)" if cfg.model == "smollm2" else "the organism"
    bar.set_description(for_name)
    iterator = _subjects(cfg)
    while True:
        tick = time.perf_counter()
        try:
            subject = next(iterator)
        except StopIteration:
            return
        timings["subjects"] += time.perf_counter() - tick
        yield subject
        bar.set_description(for_name)


def config_dict(cfg: DemoConfig) -> dict:
    return asdict(cfg)
