"""``refusalguard demo``: a fine-tuning-attack benchmark with controls, offline on the CPU, on model
organisms or on SmolLM2-135M-Instruct.

See ``refusalguard_kernels/demo/`` for what it does and docs/demo.md for real runs.
"""

from __future__ import annotations

import argparse

from .common import HelpFormatter, cli_errors, int_at_least, nonnegative_float, parse_layers, positive_float

__all__ = ["add_parser", "run"]

EPILOG = """\
examples:
  refusalguard demo                          # organism 0, 3 scenarios, every method and control, 3 seeds (~5 min)
  refusalguard demo --quick -o /tmp/rg_quick # a small organism, 2 scenarios, plain / guard / random subspace (<1 min)
  refusalguard demo --full -o /tmp/rg_full   # 3 organisms, 5 seeds, frontier sweep, attack-budget sweep, sampling
  refusalguard demo --model smollm2 -o /tmp/rg_smol          # the real-model benchmark (aligns SmolLM2 first)
  refusalguard demo --model smollm2 --reduced -o /tmp/rg_smol  # its reduced run (same cache)
  refusalguard demo --methods "plain LoRA,refusalguard,random-subspace" --coef 100 --seeds 0,1,2,3,4
  refusalguard demo --validation             # measure on the validation phrasings (for tuning settings)

Every run's result is cached in --output-dir/runs/ under a hash of everything it depends on, so a rerun
into the same folder only computes what changed (--no-cache recomputes all).

Outputs in --output-dir: table.txt, report.json (rows with mean, std and 95% interval per metric, paired
comparisons, goals met / missed / unresolved, the frontier verdicts), generations.json (the first
generations of every run, judged), demo.png (refusal against task accuracy, every method and strength),
budget.png (refusal against attack budget, with budgets), adapters/ (the first seed's LoRA adapter of
every main run) and organisms/ (the trained organisms, normal Hugging Face model folders).
"""


def _floats(flag: str):
    def parse(text: str) -> list[float]:
        try:
            values = [float(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{flag} must be comma-separated numbers such as 1,3,10; got {text!r}"
            ) from None
        if not values or any(not v > 0 or v == float("inf") for v in values):
            raise argparse.ArgumentTypeError(f"{flag} must be positive finite numbers; got {text!r}")
        return values

    return parse


def _ints(flag: str):
    def parse(text: str) -> list[int]:
        try:
            return [int(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{flag} must be comma-separated integers such as 0,1,2; got {text!r}"
            ) from None

    return parse


def _names(flag: str, choices):
    def parse(text: str) -> list[str]:
        names = [part.strip() for part in text.split(",") if part.strip()]
        unknown = [n for n in names if n not in choices]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"{flag}: unknown {unknown or text!r}; choose from {', '.join(choices)}")
        return names

    return parse


def add_parser(subparsers) -> argparse.ArgumentParser:
    from ..demo.config import METHODS, SCENARIOS

    parser = subparsers.add_parser(
        "demo",
        help="fine-tuning-attack benchmark with controls: plain LoRA, safety data, ProCon, RefusalGuard, "
        "random subspace, KL, lower LR",
        description=(
            "Attack an aligned chat model with LoRA fine-tunes (harmful data; utility data poisoned with 10%% / "
            "30%% harmful examples; benign utility data) under plain LoRA, safety-data mixing, a ProCon-style k=1 "
            "guard, RefusalGuard and three controls (the same guard on a random subspace, a KL regulariser to the "
            "base model, a lower learning rate), over several seeds. Reports refusal, compliance, over-refusal, "
            "utility-task accuracy and drift measures with 95%% intervals, paired comparisons, and the "
            "refusal-vs-utility frontier of every method. The model is a small Llama organism trained here from "
            "scratch (pretraining, then safety alignment), or SmolLM2-135M-Instruct aligned here (--model "
            "smollm2). Offline, CPU only, seeded."
        ),
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "--output-dir", "-o", default="refusalguard_demo", metavar="DIR", help="folder for the report, plots and caches"
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--quick",
        action="store_true",
        help="a small organism, harmful + poisoned-10, plain LoRA / RefusalGuard / random subspace, seeds 0,1",
    )
    size.add_argument(
        "--full",
        action="store_true",
        help="organisms 0,1,2, harmful + poisoned-30 + benign, every method, seeds 0-4, frontier and attack-budget "
        "sweeps, sampled decoding",
    )
    size.add_argument(
        "--reduced",
        action="store_true",
        help="with --model smollm2: the reduced real-model run (fewer methods and prompts; shares the full run's cache)",
    )
    parser.add_argument(
        "--model",
        choices=("organism", "smollm2"),
        default="organism",
        help="the subject: model organisms trained here, or SmolLM2-135M-Instruct aligned here (fetched once with "
        "`refusalguard models get smollm2`)",
    )
    parser.add_argument(
        "--seeds",
        type=_ints("--seeds"),
        default=None,
        metavar="LIST",
        help="fine-tuning seeds (data sample, order, LoRA init, random-subspace draw); default 0,1,2",
    )
    parser.add_argument(
        "--organism-seeds", type=_ints("--organism-seeds"), default=None, metavar="LIST", help="organisms; default 0"
    )
    parser.add_argument(
        "--scenarios", type=_names("--scenarios", SCENARIOS), default=None, metavar="LIST", help="scenarios to run"
    )
    parser.add_argument(
        "--methods", type=_names("--methods", METHODS), default=None, metavar="LIST", help="methods to compare"
    )
    parser.add_argument(
        "--k", type=int_at_least("--k"), default=3, help="directions of the refusal cone (and of the random subspace)"
    )
    parser.add_argument(
        "--coef",
        type=positive_float("--coef"),
        default=None,
        help="drift_coef of RefusalGuard and of the random-subspace control, in spread units (default: the "
        "validated value in refusalguard_kernels.demo.config.DEFAULT_STRENGTHS)",
    )
    parser.add_argument(
        "--gram-ratio",
        type=nonnegative_float("--gram-ratio"),
        default=None,
        help="gram_coef as a multiple of drift_coef (default 0.03)",
    )
    parser.add_argument(
        "--procon-coef", type=positive_float("--procon-coef"), default=None, help="ProCon's drift_coef (spread units)"
    )
    parser.add_argument(
        "--kl-coef", type=positive_float("--kl-coef"), default=None, help="the KL control's coefficient"
    )
    parser.add_argument(
        "--lr-fraction",
        type=positive_float("--lr-fraction"),
        default=None,
        help="the low-lr control's learning rate as a fraction of --lr (at most 1)",
    )
    parser.add_argument(
        "--safety-share",
        type=positive_float("--safety-share"),
        default=None,
        help="safety-mix: refusal examples added, as a share of the data",
    )
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="sweep every method over its strengths on the sweep scenario (poisoned-30): the frontier",
    )
    parser.add_argument(
        "--budgets",
        type=_floats("--budgets"),
        default=None,
        metavar="LIST",
        help="attack budgets (step multipliers) of the harmful scenario, e.g. 1,3,10",
    )
    parser.add_argument(
        "--samples",
        type=int_at_least("--samples", 0),
        default=None,
        help="sampled generations per harmful prompt beside greedy (0: greedy only)",
    )
    parser.add_argument(
        "--temperature", type=positive_float("--temperature"), default=0.7, help="temperature of the samples"
    )
    parser.add_argument(
        "--max-new-tokens",
        type=int_at_least("--max-new-tokens"),
        default=None,
        help="new tokens per generation (default 64; 32 with --quick)",
    )
    parser.add_argument(
        "--warmup",
        type=nonnegative_float("--warmup"),
        default=0.0,
        help="RefusalGuard warm-up, as a share of the fine-tuning steps (penalty x10 decaying to x1)",
    )
    parser.add_argument(
        "--layers",
        type=parse_layers,
        default=None,
        metavar="LIST",
        help="decoder layers the bases are extracted at and the guards hook, e.g. '0-3'; default: every layer "
        "(organism), the library's default middle band (smollm2; it did not protect there, docs/demo.md)",
    )
    parser.add_argument(
        "--guard-positions", default="all", help="tokens the guards' penalty covers: all, prompt, response, or fN+lM"
    )
    parser.add_argument(
        "--lr",
        type=positive_float("--lr"),
        default=None,
        help="LoRA learning rate (constant; default 2e-3, the preset's value)",
    )
    parser.add_argument(
        "--threads",
        type=int_at_least("--threads"),
        default=None,
        help="torch CPU threads (default 1 for the organism, whose matmuls are tiny; 2 for smollm2)",
    )
    parser.add_argument(
        "--organism",
        default=None,
        metavar="DIR",
        help="reuse an organism folder saved by an earlier run (organisms/seed-N) instead of the cache",
    )
    parser.add_argument(
        "--validation",
        action="store_true",
        help="measure on the validation phrasings instead of the held-out ones (use this when tuning settings)",
    )
    parser.add_argument("--no-cache", action="store_true", help="recompute every run, ignoring cached results")
    parser.add_argument("--quiet", action="store_true", help="no progress bar; only the table")
    parser.add_argument("--traceback", action="store_true", help="show the full Python traceback on errors")
    parser.set_defaults(func=run)
    return parser


def config_from_args(args):
    """The ``DemoConfig`` the flags describe."""
    import os

    from ..demo.config import preset_config
    from ..integration.hooks import parse_positions

    if args.organism is not None and not os.path.isfile(os.path.join(args.organism, "organism_config.json")):
        raise ValueError(
            f"--organism {args.organism!r} is not an organism folder (no organism_config.json); give an organisms/seed-N "
            "folder an earlier `refusalguard demo` run wrote, or leave --organism out"
        )
    if args.reduced and args.model != "smollm2":
        raise ValueError("--reduced is the reduced real-model run: use it with --model smollm2")
    if args.model == "smollm2" and (args.organism or args.organism_seeds):
        raise ValueError("--organism and --organism-seeds choose organisms; leave them out with --model smollm2")
    parse_positions(args.guard_positions)
    if args.lr_fraction is not None and args.lr_fraction > 1:
        raise ValueError(f"--lr-fraction is a fraction of --lr, at most 1; got {args.lr_fraction}")
    preset = "quick" if args.quick else "full" if args.full else "reduced" if args.reduced else "default"
    if args.model == "smollm2":
        from ..demo.smollm2 import smollm2_preset

        options = smollm2_preset(preset)
    else:
        options = {}
        if preset != "default":
            options["preset"] = preset
    options.update(
        output_dir=args.output_dir,
        model=args.model,
        k=args.k,
        warmup_fraction=args.warmup,
        guard_positions=args.guard_positions,
        organism=args.organism,
        validation=args.validation,
        cache=not args.no_cache,
        show_progress=not args.quiet,
        temperature=args.temperature,
    )
    if args.layers is not None:
        options["layers"] = args.layers
    if args.threads is not None:
        options["threads"] = args.threads
    if args.lr is not None:
        options["learning_rate"] = args.lr
    strengths = {}
    for flag, methods in (
        ("coef", ("refusalguard", "random-subspace")),
        ("procon_coef", ("procon",)),
        ("kl_coef", ("kl",)),
        ("lr_fraction", ("low-lr",)),
        ("safety_share", ("safety-mix",)),
    ):
        value = getattr(args, flag)
        if value is not None:
            strengths.update({m: value for m in methods})
    for name, flag in (
        ("seeds", "seeds"),
        ("organism_seeds", "organism_seeds"),
        ("scenarios", "scenarios"),
        ("methods", "methods"),
        ("budgets", "budgets"),
        ("samples", "samples"),
        ("max_new_tokens", "max_new_tokens"),
        ("gram_ratio", "gram_ratio"),
    ):
        if getattr(args, flag) is not None:
            options[name] = getattr(args, flag)
    if args.sweep:
        options["sweep"] = True
    base = preset_config(options.pop("preset", "default"), **options)
    if strengths:
        base.strengths.update(strengths)
        base.__post_init__()
    return base


@cli_errors("demo")
def run(args) -> int:
    import os
    import time

    from ..demo.run import run_demo

    config = config_from_args(args)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    start = time.perf_counter()
    report = run_demo(config)
    print()
    with open(os.path.join(args.output_dir, "table.txt")) as f:
        print(f.read().rstrip())
    print()
    runs = report["runs"]
    print(
        f"wrote {args.output_dir}/: table.txt, report.json, generations.json, demo.png"
        + (", budget.png" if any(r["budget"] != 1.0 for r in report["rows"]) else "")
        + f", adapters/  ({time.perf_counter() - start:.0f} s; {runs['computed']} runs computed, "
        f"{runs['cached']} from the cache)"
    )
    return 0
