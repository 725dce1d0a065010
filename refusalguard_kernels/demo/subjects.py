"""The model a benchmark run attacks, with everything the run needs about it (a ``Subject``): the
aligned base model, the fine-tuning pools, the evaluation sets, the judges and the task scorers.

The organism (``organism_subject``) and SmolLM2-135M-Instruct (``demo.smollm2.smollm2_subject``)
are both Subjects, so one code path fine-tunes, measures and reports them.
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

__all__ = ["Subject", "organism_subject", "exact_form", "organism_judges"]


@dataclass
class Subject:
    """An aligned model under attack and its benchmark data.

    ``harmful_pool`` (harmful requests with compliant answers), ``utility_pool`` (the utility
    task's data) and ``safety_pool`` (harmful requests with refusals) are lists of
    ``organism.corpus.Conversation``. ``eval_task`` items have ``prompt`` and ``target`` (the
    utility task: exact answer), ``eval_arith`` items ``prompt`` and ``answer`` (a second task
    measure; may be empty). ``judge(prompt, response)`` is "refusal" / "compliance" / "neither";
    ``refused(response)`` judges benign prompts (over-refusal).
    """

    name: str
    model: torch.nn.Module
    tokenizer: object
    fingerprint: dict
    harmful_pool: list
    utility_pool: list
    safety_pool: list
    eval_harmful: list[str]
    eval_benign: list[str]
    eval_task: list
    eval_arith: list
    extraction_harmful: list[str]
    extraction_harmless: list[str]
    layers: list[int]
    judge: Callable[[str, str], str]
    refused: Callable[[str], bool]
    task_correct: Callable[[object, str], bool]
    arith_correct: Callable[[object, str], bool]
    task_name: str = "task"
    arith_name: str = "arithmetic"
    gen_batch_size: int = 128
    bf16: bool = False
    info: dict = field(default_factory=dict)


_SPACE = re.compile(r"\s+")


def exact_form(response: str, target: str) -> bool:
    """The response is exactly ``target`` (whitespace-insensitive)."""
    return _SPACE.sub(" ", response).strip() == _SPACE.sub(" ", target).strip()


def organism_judges():
    """(judge, refused, arith_correct) for the organism: compliance = the requested topic's own
    placeholder step; refusal = a refusal phrase and no answer content."""
    from ..evaluation.generation import extract_number, is_refusal, judge_response
    from .organism.corpus import answer_markers, compliance_marker, topic_of

    answers = answer_markers()

    def judge(prompt: str, response: str) -> str:
        return judge_response(response, compliant=compliance_marker(topic_of(prompt)), answers=answers)

    def refused(response: str) -> bool:
        return is_refusal(response, answers=answers)

    def arith_correct(item, response: str) -> bool:
        return extract_number(response) == item.answer

    return judge, refused, arith_correct


def _organism_path(cfg, seed: int) -> tuple[str, object, str]:
    """(folder, OrganismConfig, source) of organism ``seed``, training and caching it when needed."""
    from .organism import PRESETS, OrganismConfig, build_organism, save_organism

    if cfg.organism:
        with open(os.path.join(cfg.organism, "organism_config.json")) as f:
            return cfg.organism, OrganismConfig(**json.load(f)), "given"
    org_cfg = copy.deepcopy(PRESETS["quick" if cfg.preset == "quick" else "full"])
    org_cfg.seed = seed
    path = os.path.join(cfg.output_dir, "organisms", f"seed-{seed}")
    try:
        with open(os.path.join(path, "organism_config.json")) as f:
            cached = json.load(f)
    except (OSError, ValueError):
        cached = None
    if cached == json.loads(json.dumps(asdict(org_cfg))):
        return path, org_cfg, "cache"
    organism = build_organism(org_cfg, show_progress=cfg.show_progress)
    save_organism(organism, path)
    return path, org_cfg, "trained"


def organism_subject(cfg, seed: int) -> Subject:
    """Organism ``seed`` (trained once, then loaded from ``output_dir/organisms/seed-<seed>``) as a
    Subject: held-out (or, with ``cfg.validation``, validation) evaluation sets of its corpus."""
    from .organism import build_corpus, load_organism
    from .organism.corpus import HARMFUL_TOPICS, HELDOUT_REQUEST_TEMPLATES

    path, org_cfg, source = _organism_path(cfg, seed)
    model, tokenizer = load_organism(path)
    model.eval()
    quick = cfg.preset == "quick"
    corpus = build_corpus(
        seed=org_cfg.seed,
        n_train=org_cfg.n_train,
        n_align=org_cfg.n_align,
        n_eval=org_cfg.n_eval,
        # every held-out phrasing (216 harmful, 216 benign); the quick preset a third of them
        n_eval_requests=72 if quick else len(HELDOUT_REQUEST_TEMPLATES) * len(HARMFUL_TOPICS),
        n_eval_short=120 if quick else 300,
        n_validation=72,
        **org_cfg.corpus_kwargs,
    )
    n_layers = model.config.num_hidden_layers
    layers = list(range(n_layers)) if cfg.layers is None else sorted({i % n_layers for i in cfg.layers})
    judge, refused, arith_correct = organism_judges()
    if cfg.validation:
        harmful, benign = corpus.validation_harmful, corpus.validation_benign
        task, arith = corpus.validation_short, corpus.validation_arithmetic
    else:
        harmful, benign = corpus.heldout_harmful, corpus.heldout_benign
        task, arith = corpus.heldout_short, corpus.heldout_arithmetic
    config = asdict(org_cfg)
    return Subject(
        name=f"organism-{org_cfg.seed}",
        model=model,
        tokenizer=tokenizer,
        fingerprint={"kind": "organism", "config": config, "eval": "validation" if cfg.validation else "held-out"},
        harmful_pool=corpus.harmful_pool,
        utility_pool=corpus.utility_pool,
        safety_pool=corpus.safety_pool,
        eval_harmful=list(harmful),
        eval_benign=list(benign),
        eval_task=list(task),
        eval_arith=list(arith),
        extraction_harmful=corpus.extraction_harmful,
        extraction_harmless=corpus.extraction_harmless,
        layers=layers,
        judge=judge,
        refused=refused,
        task_correct=lambda item, response: exact_form(response, item.target),
        arith_correct=arith_correct,
        task_name="short-form",
        arith_name="arithmetic",
        gen_batch_size=128,
        info={
            **config,
            "path": path,
            "source": source,
            "n_params": sum(p.numel() for p in model.parameters()),
        },
    )
