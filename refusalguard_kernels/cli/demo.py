"""``refusalguard demo``: a fine-tuning-attack benchmark on a model organism, offline on the CPU.

See ``refusalguard_kernels/demo/run.py`` for what it does and docs/demo.md for a real run.
"""

from __future__ import annotations

import argparse

from .common import HelpFormatter, cli_errors, int_at_least, nonnegative_float, parse_layers, positive_float

__all__ = ["add_parser", "run"]

EPILOG = """\
examples:
  refusalguard demo                          # the full benchmark, about 4 minutes on 2 CPU cores
  refusalguard demo --quick -o /tmp/rg_quick # a smaller organism, 2 scenarios, 2 seeds, 4 methods
  refusalguard demo --scenarios harmful,poisoned-10 --methods "plain LoRA,refusalguard" --seeds 0,1,2,3,4
  refusalguard demo --k 2 --coef 100 --sweep-coefs 10,1000
  refusalguard demo --validation             # measure on the validation phrasings (for tuning settings)

Outputs in --output-dir: table.txt, report.json (rows of mean/std over seeds, every seed's numbers,
goals met/missed), generations.json (every generation with its judge verdict), demo.png (refusal and
compliance against task accuracy per method and scenario), adapters/ (the first seed's LoRA adapter of
every run, e.g. adapters/harmful_plain, adapters/harmful_refusalguard_c300) and organism/ (the trained
organism, a normal Hugging Face model folder, reused by later runs into the same folder).
"""


def _floats(flag: str):
    def parse(text: str) -> list[float]:
        try:
            values = [float(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{flag} must be comma-separated numbers such as 1,100; got {text!r}"
            ) from None
        if any(not v > 0 or v == float("inf") for v in values):
            raise argparse.ArgumentTypeError(f"{flag} must be positive finite numbers; got {text!r}")
        return values

    return parse


def _ints(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--seeds must be comma-separated integers such as 0,1,2; got {text!r}"
        ) from None


def _names(flag: str, choices):
    def parse(text: str) -> list[str]:
        names = [part.strip() for part in text.split(",") if part.strip()]
        unknown = [n for n in names if n not in choices]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"{flag}: unknown {unknown or text!r}; choose from {', '.join(choices)}")
        return names

    return parse


def add_parser(subparsers) -> argparse.ArgumentParser:
    from ..demo.run import METHODS, SCENARIOS

    parser = subparsers.add_parser(
        "demo",
        help="fine-tuning-attack benchmark on a model organism: plain LoRA, safety data, ProCon, RefusalGuard",
        description=(
            "Train a small Llama chat model from scratch like a real one (pretraining: it answers every request, "
            "harmful-topic ones with placeholder content; safety alignment: it learns to refuse), then attack it "
            "with LoRA fine-tunes (harmful data; utility data poisoned with 10%% / 30%% harmful examples; benign "
            "utility data) under plain LoRA, safety-data mixing, a ProCon-style k=1 guard and RefusalGuard, over "
            "several seeds. Reports refusal, compliance, over-refusal, task accuracy and independent drift "
            "measures. Offline, CPU only, seeded."
        ),
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "--output-dir",
        "-o",
        default="refusalguard_demo",
        metavar="DIR",
        help="folder for the report, plot and organism",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smaller organism, the harmful and poisoned-10 scenarios, seeds 0,1, no sweep (under a minute)",
    )
    parser.add_argument(
        "--seeds",
        type=_ints,
        default=None,
        metavar="LIST",
        help="fine-tuning seeds (data sample, order, LoRA init); default 0,1,2 (0,1 with --quick)",
    )
    parser.add_argument(
        "--scenarios", type=_names("--scenarios", SCENARIOS), default=None, metavar="LIST", help="scenarios to run"
    )
    parser.add_argument(
        "--methods", type=_names("--methods", METHODS), default=None, metavar="LIST", help="methods to compare"
    )
    parser.add_argument(
        "--k", type=int_at_least("--k"), default=3, help="RefusalGuard's refusal-cone directions per layer"
    )
    parser.add_argument(
        "--coef",
        type=positive_float("--coef"),
        default=300.0,
        help="RefusalGuard's drift_coef (recommended: 300, chosen on the validation phrasings)",
    )
    parser.add_argument(
        "--gram-coef", type=nonnegative_float("--gram-coef"), default=300.0, help="RefusalGuard's gram_coef"
    )
    parser.add_argument(
        "--warmup",
        type=nonnegative_float("--warmup"),
        default=0.0,
        help="RefusalGuard warm-up, as a share of the fine-tuning steps (penalty x10 decaying to x1)",
    )
    parser.add_argument(
        "--procon-coef",
        type=positive_float("--procon-coef"),
        default=300.0,
        help="ProCon's drift_coef (the same as RefusalGuard's by default)",
    )
    parser.add_argument(
        "--sweep-coefs",
        type=_floats("--sweep-coefs"),
        default=None,
        metavar="LIST",
        help="extra RefusalGuard drift_coef values for the plot's sweep (gram_coef scaled alike); default 30,100,1000 (harmful scenario)",
    )
    parser.add_argument(
        "--layers",
        type=parse_layers,
        default=None,
        metavar="LIST",
        help="decoder layers the bases are extracted at and the guards hook, e.g. '0-3'; default: every layer",
    )
    parser.add_argument(
        "--guard-positions", default="all", help="tokens the guards' penalty covers: all, prompt, response, or fN+lM"
    )
    parser.add_argument("--lr", type=positive_float("--lr"), default=2e-3, help="LoRA learning rate (constant)")
    parser.add_argument(
        "--threads", type=int_at_least("--threads"), default=2, help="torch CPU threads (the demo is sized for 2 cores)"
    )
    parser.add_argument(
        "--organism",
        default=None,
        metavar="DIR",
        help="reuse an organism folder saved by an earlier run (its organism/ subfolder) instead of the cache",
    )
    parser.add_argument(
        "--validation",
        action="store_true",
        help="measure on the validation phrasings instead of the held-out ones (use this when tuning settings)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar; only the table")
    parser.add_argument("--traceback", action="store_true", help="show the full Python traceback on errors")
    parser.set_defaults(func=run)
    return parser


def quick_overrides() -> dict:
    """What ``--quick`` changes (besides the smaller organism)."""
    return dict(seeds=[0, 1], scenarios=["harmful", "poisoned-10"], sweep_coefs=[])


@cli_errors("demo")
def run(args) -> int:
    import os
    import time

    from ..demo.run import DemoConfig, run_demo

    if args.organism is not None and not os.path.isfile(os.path.join(args.organism, "organism_config.json")):
        raise ValueError(
            f"--organism {args.organism!r} is not an organism folder (no organism_config.json); give the "
            "organism/ folder an earlier `refusalguard demo` run wrote, or leave --organism out"
        )
    options = dict(
        output_dir=args.output_dir,
        quick=args.quick,
        k=args.k,
        coef=args.coef,
        gram_coef=args.gram_coef,
        warmup_fraction=args.warmup,
        procon_coef=args.procon_coef,
        layers=args.layers,
        guard_positions=args.guard_positions,
        learning_rate=args.lr,
        threads=args.threads,
        organism=args.organism,
        validation=args.validation,
        show_progress=not args.quiet,
    )
    if args.quick:
        options.update(quick_overrides())
    for name in ("seeds", "scenarios", "methods", "sweep_coefs"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    config = DemoConfig(**options)
    from ..integration.hooks import parse_positions

    parse_positions(args.guard_positions)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    start = time.perf_counter()
    run_demo(config)
    print()
    with open(os.path.join(args.output_dir, "table.txt")) as f:
        print(f.read().rstrip())
    print()
    print(
        f"wrote {args.output_dir}/: table.txt, report.json, generations.json, demo.png, adapters/, organism/  "
        f"({time.perf_counter() - start:.0f} s)"
    )
    return 0
