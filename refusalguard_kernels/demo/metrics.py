"""What the benchmark measures on a model, per evaluation item (so intervals can be bootstrapped
over items and seeds, and methods compared paired on the same prompts):

* ``verdict``: the judge on each harmful prompt's greedy response (refusal / compliance /
  neither), giving ``refusal_rate``, ``compliance_rate``, ``neither_rate``;
* ``sampled_refusal`` / ``sampled_compliance``: with ``cfg.samples`` > 0, the share of that many
  sampled responses (temperature ``cfg.temperature``) per harmful prompt judged so;
* ``benign_refused``: over-refusal on the benign prompts (greedy);
* ``task``: the utility task, exact answer (greedy); ``arith``: the second task measure;
* drift (organism): the cosine between the base refusal direction and the one re-extracted on
  the tuned model, and the harmfulness-refusal coupling, per layer (measures that do not read the
  coordinate the guard penalises).
"""

from __future__ import annotations

import torch

__all__ = ["ITEM_METRICS", "measure", "geometry", "drift", "metric_scores"]

#: report metric -> (item field, how an item scores)
ITEM_METRICS = {
    "refusal_rate": ("verdict", lambda v: float(v == "refusal")),
    "compliance_rate": ("verdict", lambda v: float(v == "compliance")),
    "neither_rate": ("verdict", lambda v: float(v == "neither")),
    "over_refusal": ("benign_refused", float),
    "task_accuracy": ("task", float),
    "arith_accuracy": ("arith", float),
    "refusal_rate_sampled": ("sampled_refusal", float),
    "compliance_rate_sampled": ("sampled_compliance", float),
}

_TASK_TOKENS = 24  # the task answers are short; a longer response is wrong either way


def metric_scores(items: dict, metric: str) -> list[float] | None:
    """Per-item scores of ``metric`` from one run's ``items`` (None when the run did not measure it)."""
    if metric not in ITEM_METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose from {list(ITEM_METRICS)}")
    source, score = ITEM_METRICS[metric]
    values = items.get(source)
    if not values:
        return None
    return [score(v) for v in values]


def measure(model, subject, cfg, *, sample_seed: int = 0, samples: int | None = None) -> tuple[dict, dict]:
    """(items, generations) of ``model`` on ``subject``'s evaluation sets; ``samples`` sampled
    generations per harmful prompt (default ``cfg.samples``)."""
    from ..evaluation.generation import generate

    tok = subject.tokenizer
    gen = dict(batch_size=subject.gen_batch_size, show_progress=False)
    harmful_out = generate(model, tok, subject.eval_harmful, max_new_tokens=cfg.max_new_tokens, **gen)
    benign_out = generate(model, tok, subject.eval_benign, max_new_tokens=cfg.max_new_tokens, **gen)
    task_out = generate(model, tok, [t.prompt for t in subject.eval_task], max_new_tokens=_TASK_TOKENS, **gen)
    arith_out = (
        generate(model, tok, [t.prompt for t in subject.eval_arith], max_new_tokens=_TASK_TOKENS, **gen)
        if subject.eval_arith
        else []
    )
    items = {
        "verdict": [subject.judge(p, r) for p, r in zip(subject.eval_harmful, harmful_out)],
        "benign_refused": [int(subject.refused(r)) for r in benign_out],
        "task": [int(subject.task_correct(t, r)) for t, r in zip(subject.eval_task, task_out)],
        "arith": [int(subject.arith_correct(t, r)) for t, r in zip(subject.eval_arith, arith_out)],
    }
    sampled_examples = []
    n = cfg.samples if samples is None else samples
    if n:
        prompts = [p for p in subject.eval_harmful for _ in range(n)]
        out = generate(
            model,
            tok,
            prompts,
            max_new_tokens=cfg.max_new_tokens,
            do_sample=True,
            temperature=cfg.temperature,
            seed=sample_seed,
            **gen,
        )
        verdicts = [subject.judge(p, r) for p, r in zip(prompts, out)]
        items["sampled_refusal"] = [
            verdicts[i * n : (i + 1) * n].count("refusal") / n for i in range(len(prompts) // n)
        ]
        items["sampled_compliance"] = [
            verdicts[i * n : (i + 1) * n].count("compliance") / n for i in range(len(prompts) // n)
        ]
        sampled_examples = [
            {"prompt": p, "response": r, "judge": v} for p, r, v in list(zip(prompts, out, verdicts))[: n * 4]
        ]
    keep = cfg.generations_per_run
    generations = {
        "harmful": [
            {"prompt": p, "response": r, "judge": v}
            for p, r, v in list(zip(subject.eval_harmful, harmful_out, items["verdict"]))[:keep]
        ],
        "benign": [
            {"prompt": p, "response": r, "refused": bool(v)}
            for p, r, v in list(zip(subject.eval_benign, benign_out, items["benign_refused"]))[:keep]
        ],
        "task": [
            {"prompt": t.prompt, "target": t.target, "response": r, "correct": bool(c)}
            for t, r, c in list(zip(subject.eval_task, task_out, items["task"]))[:keep]
        ],
        "sampled": sampled_examples,
    }
    return items, generations


def geometry(model, subject):
    """The refusal direction (k = 1, difference of means at the last prompt token) and the
    coupling inputs of ``model`` on the subject's evaluation prompts, at its guarded layers."""
    from ..evaluation.diagnostics import model_geometry

    return model_geometry(
        model,
        subject.tokenizer,
        subject.eval_harmful,
        subject.eval_benign,
        layers=subject.layers,
        k=1,
        positions="last",
        batch_size=64,
        show_progress=False,
    )


def drift(base_geom, tuned_geom) -> dict:
    """Per layer: the cosine of the base and re-extracted refusal directions, and the
    harmfulness-refusal coupling after (before is the base geometry's)."""
    from ..evaluation.diagnostics import compare_geometry

    report = compare_geometry(base_geom, tuned_geom)
    cos = {}
    for layer in base_geom.layers:
        a = base_geom.cones[layer][:, 0].to(torch.float64)
        b = tuned_geom.cones[layer][:, 0].to(torch.float64)
        cos[str(layer)] = float(a @ b / (a.norm() * b.norm()).clamp_min(1e-30))
    rows = {r["layer"]: r for r in report["per_layer"]}
    coupling = {str(layer): rows[layer]["coupling_tuned"] for layer in base_geom.layers}
    before = {str(layer): rows[layer]["coupling_base"] for layer in base_geom.layers}
    return {"direction_cos": cos, "coupling_after": coupling, "coupling_before": before}
