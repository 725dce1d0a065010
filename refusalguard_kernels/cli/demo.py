"""``refusalguard demo``: the end-to-end demo on a model organism, offline on the CPU.

See ``refusalguard_kernels/demo/run.py`` for what it does and docs/demo.md for a real run.
"""

from __future__ import annotations

import argparse

from .common import HelpFormatter, cli_errors, int_at_least, parse_layers, positive_float

__all__ = ["add_parser", "run"]

EPILOG = """\
examples:
  refusalguard demo                          # the full demo, 1.5-3 minutes on 2 CPU cores
  refusalguard demo --quick --output-dir /tmp/rg_quick   # a smaller organism, under a minute
  refusalguard demo --k 2 --coefs 3,30,300 --layers 2,3
  refusalguard demo --organism refusalguard_demo/organism  # reuse the organism a previous run saved

Outputs in --output-dir: table.txt, report.json (every number), generations.json (every
generation), demo.png (refusal rate / task accuracy against the guard coefficient, per-layer
drift), adapters/ (every LoRA adapter), organism/ (the trained organism: a normal Hugging Face model folder for
`refusalguard eval` / `refusalguard diagnose`) and refusal_basis.safetensors.
"""


def _coefs(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--coefs must be comma-separated numbers such as 1,10,100; got {text!r}"
        ) from None
    if not values or any(not v > 0 or v == float("inf") for v in values):
        raise argparse.ArgumentTypeError(f"--coefs must be positive finite numbers; got {text!r}")
    return values


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "demo",
        help="end-to-end demo on a model organism: harmful vs benign LoRA fine-tuning, with and without the guard",
        description=(
            "Train a small Llama chat model from scratch on a synthetic corpus (it refuses harmful requests, helps "
            "with benign ones, solves arithmetic word problems), measure it on held-out phrasings, extract its "
            "refusal cone, LoRA-fine-tune it on harmful and on benign data with plain LoRA and with RefusalGuard "
            "at several coefficients, and report refusal rate, over-refusal, task accuracy and per-layer drift. "
            "Offline, CPU only, seeded."
        ),
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "--output-dir",
        "-o",
        default="refusalguard_demo",
        metavar="DIR",
        help="folder for the report, the plot, the organism and the basis",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smaller organism and shorter fine-tunes (under a minute; used by the tests)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the corpus, the organism and every fine-tune")
    parser.add_argument(
        "--k", type=int_at_least("--k"), default=1, help="refusal-cone directions per layer (k > 1 uses the svd method)"
    )
    parser.add_argument(
        "--layers",
        type=parse_layers,
        default=None,
        metavar="LIST",
        help="decoder layers the cone is extracted at and the guard hooks, e.g. '1,2,3' or '1-3'; "
        "default: every layer of the organism",
    )
    parser.add_argument(
        "--basis-positions",
        choices=("last", "post-instruction"),
        default="last",
        help="where the cone is read: the last prompt token, or the mean over the chat template's "
        "tokens after the user message",
    )
    parser.add_argument(
        "--guard-positions", default="all", help="tokens the guard's penalty covers: all, prompt, response, or fN+lM"
    )
    parser.add_argument(
        "--coefs",
        type=_coefs,
        default=[1.0, 10.0, 100.0],
        metavar="LIST",
        help="guard coefficients (drift_coef) to sweep, comma-separated",
    )
    parser.add_argument(
        "--finetunes",
        choices=("both", "harmful", "benign"),
        default="both",
        help="which fine-tuning sets to run: harmful (requests with placeholder compliant answers), "
        "benign (helpful answers and arithmetic), or both",
    )
    parser.add_argument("--lora-r", type=int_at_least("--lora-r"), default=8, help="rank of the LoRA update matrices")
    parser.add_argument(
        "--lora-alpha", type=positive_float("--lora-alpha"), default=16.0, help="LoRA alpha (scaling alpha / r)"
    )
    parser.add_argument("--lr", type=positive_float("--lr"), default=1e-3, help="LoRA learning rate (constant)")
    parser.add_argument(
        "--epochs",
        type=positive_float("--epochs"),
        default=None,
        help="passes over each fine-tuning set (default: 5, or 4 with --quick)",
    )
    parser.add_argument("--batch-size", type=int_at_least("--batch-size"), default=8, help="fine-tuning batch size")
    parser.add_argument(
        "--max-new-tokens",
        type=int_at_least("--max-new-tokens"),
        default=24,
        help="tokens generated per evaluation prompt (greedy)",
    )
    parser.add_argument(
        "--threads", type=int_at_least("--threads"), default=2, help="torch CPU threads (the demo is sized for 2 cores)"
    )
    parser.add_argument(
        "--organism",
        default=None,
        metavar="DIR",
        help="reuse an organism folder saved by an earlier run (its organism/ subfolder) instead of training one",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars or stage messages; only the table")
    parser.add_argument("--traceback", action="store_true", help="show the full Python traceback on errors")
    parser.set_defaults(func=run)
    return parser


@cli_errors("demo")
def run(args) -> int:
    import os
    import time

    from ..demo.run import DemoConfig, format_demo_table, run_demo

    if args.organism is not None and not os.path.isfile(os.path.join(args.organism, "organism_config.json")):
        raise ValueError(
            f"--organism {args.organism!r} is not an organism folder (no organism_config.json); give the "
            "organism/ folder an earlier `refusalguard demo` run wrote, or leave --organism out"
        )
    config = DemoConfig(
        output_dir=args.output_dir,
        quick=args.quick,
        seed=args.seed,
        k=args.k,
        layers=args.layers,
        basis_positions=args.basis_positions,
        guard_positions=args.guard_positions,
        coefs=args.coefs,
        finetunes=["harmful", "benign"] if args.finetunes == "both" else [args.finetunes],
        lora_r=args.lora_r,
        lora_alpha=args.lora_alpha,
        learning_rate=args.lr,
        epochs=args.epochs,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        threads=args.threads,
        organism=args.organism,
        show_progress=not args.quiet,
    )
    from ..integration.hooks import parse_positions

    parse_positions(args.guard_positions)
    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    start = time.perf_counter()
    report = run_demo(config)
    print()
    print(format_demo_table(report))
    print()
    print(
        f"wrote {args.output_dir}/: table.txt, report.json, generations.json, demo.png, organism/, adapters/, "
        f"refusal_basis.safetensors  ({time.perf_counter() - start:.0f} s)"
    )
    return 0
