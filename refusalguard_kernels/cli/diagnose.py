"""``refusalguard diagnose``: how a fine-tune moved the refusal geometry, layer by layer (base model vs a
tuned model or an adapter). See ``refusalguard_kernels/evaluation/diagnostics.py`` for the metrics."""

from __future__ import annotations

import argparse

from .common import (
    CLIError,
    HelpFormatter,
    add_common_model_options,
    add_device_options,
    add_prompt_set_options,
    cli_errors,
    int_at_least,
    parse_layers,
)

__all__ = ["add_parser", "run"]

EPILOG = """\
examples:
  refusalguard diagnose meta-llama/Llama-3.2-1B-Instruct --adapter out/ --layers 6-9 --k 2
  refusalguard diagnose ./base-model --tuned ./fine-tuned-model --harmful harmful.txt --harmless harmless.txt
  refusalguard diagnose refusalguard_demo/organism --adapter refusalguard_demo/adapters/harmful_plain \\
      --harmful organism:harmful --harmless organism:benign

Per layer (table, diagnose.json, diagnose.png in --output-dir):
  max angle   largest principal angle between the base and tuned refusal cones (0 = same subspace)
  shift[0]    mean shift of the harmful prompts' coordinate on the base refusal direction, tuned
              minus base, in the base model's pooled std (negative = toward the harmless side)
  |shift|     norm of that mean shift over the k cone directions; drift rms: per-prompt RMS change
  sep         harmful-minus-harmless separation along the base direction, base and tuned model
  coupl       cosine between the harmfulness direction (last user-message token) and the refusal
              direction (post-instruction tokens), base and tuned model (needs a chat template)
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "diagnose",
        help="per-layer drift of the refusal geometry: base model vs a tuned model or adapter",
        description=(
            "Measure a base model and a tuned model (another folder, or the base with a PEFT adapter) on harmful "
            "and harmless prompts and report, per decoder layer, the principal angles between their refusal cones, "
            "the shift of the harmful prompts' cone coordinates in base pooled standard deviations, and the "
            "harmfulness-refusal coupling of each model."
        ),
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("model", help="the base model: folder or Hugging Face Hub name")
    tuned = parser.add_mutually_exclusive_group(required=True)
    tuned.add_argument(
        "--tuned",
        default=None,
        metavar="MODEL",
        help="the fine-tuned model (folder or Hub name), same architecture and tokenizer",
    )
    tuned.add_argument(
        "--adapter",
        default=None,
        metavar="PATH",
        help="a PEFT (LoRA) adapter: the tuned model is the base model with it",
    )
    parser.add_argument(
        "--harmful",
        default="builtin:harmful",
        metavar="SOURCE",
        help="harmful prompts: builtin:harmful, organism:harmful, a file, or a dataset name",
    )
    parser.add_argument(
        "--harmless",
        default="builtin:harmless",
        metavar="SOURCE",
        help="harmless prompts: builtin:harmless, organism:benign, a file, or a dataset name",
    )
    add_prompt_set_options(parser, "harmful", "harmless", split=True)
    parser.add_argument(
        "--layers",
        type=parse_layers,
        default=None,
        metavar="LIST",
        help="decoder layers, e.g. '10,12,14' or '8-11' (negative counts from the end); default: all",
    )
    parser.add_argument(
        "--k",
        type=int_at_least("--k"),
        default=1,
        help="refusal-cone directions per layer (k > 1 extracts with the svd method)",
    )
    parser.add_argument(
        "--positions",
        choices=("last", "post-instruction"),
        default="last",
        help="where the cones and coordinates are read: the last prompt token (the default of `extract`, so "
        "both report the same separation) or the mean over the chat template's post-instruction tokens",
    )
    parser.add_argument("--batch-size", type=int_at_least("--batch-size"), default=8, help="prompts per forward pass")
    parser.add_argument(
        "--output-dir",
        "-o",
        default="diagnose_out",
        metavar="DIR",
        help="folder for diagnose.json, diagnose.png and table.txt",
    )
    add_device_options(parser, "the models")
    from .common import add_threads_option

    add_threads_option(parser)
    add_common_model_options(parser)
    parser.set_defaults(func=run)
    return parser


@cli_errors("diagnose")
def run(args) -> int:
    import gc
    import os

    from ..evaluation.diagnostics import compare_geometry, format_table, model_geometry, plot_report, save_report
    from ..integration.model_utils import has_chat_template
    from .common import apply_threads, load_model_and_tokenizer, quiet_transformers, resolve_device, resolve_dtype
    from .eval import resolve_prompts, wrap_adapter

    if args.k < 1 or args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        raise CLIError("--k, --batch-size and --limit must be >= 1")
    apply_threads(args)
    quiet_transformers(args.quiet)
    harmful = resolve_prompts(args.harmful, column=args.harmful_column, split=args.split, limit=args.limit)
    harmless = resolve_prompts(args.harmless, column=args.harmless_column, split=args.split, limit=args.limit)
    if len(harmful) < 2 or len(harmless) < 2:
        raise CLIError("diagnose needs at least 2 harmful and 2 harmless prompts")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    model, tokenizer = load_model_and_tokenizer(
        args.model, dtype=dtype, device=device, trust_remote_code=args.trust_remote_code
    )
    positions = args.positions
    if positions == "post-instruction" and not has_chat_template(tokenizer):
        raise CLIError("--positions post-instruction needs a tokenizer with a chat template; use --positions last")
    kw = dict(
        layers=args.layers,
        k=args.k,
        positions=positions,
        batch_size=args.batch_size,
        layers_path=args.layers_path,
        show_progress=not args.quiet,
    )
    base = model_geometry(model, tokenizer, harmful, harmless, desc="base model", **kw)
    if args.adapter is not None:
        # The adapter wraps the same weights: no second copy of the model in memory.
        tuned_model, tuned_tokenizer = wrap_adapter(model, args.adapter), tokenizer
    else:
        del model
        gc.collect()
        tuned_model, tuned_tokenizer = load_model_and_tokenizer(
            args.tuned, dtype=dtype, device=device, trust_remote_code=args.trust_remote_code
        )
    tuned = model_geometry(tuned_model, tuned_tokenizer, harmful, harmless, desc="tuned model", **kw)
    report = compare_geometry(base, tuned)
    report["base_model"] = args.model
    report["tuned_model"] = args.tuned if args.tuned is not None else f"{args.model} + adapter {args.adapter}"
    os.makedirs(args.output_dir, exist_ok=True)
    table = format_table(report)
    save_report(report, os.path.join(args.output_dir, "diagnose.json"))
    plot_report(report, os.path.join(args.output_dir, "diagnose.png"))
    with open(os.path.join(args.output_dir, "table.txt"), "w") as f:
        f.write(table + "\n")
    print(f"base: {report['base_model']}\ntuned: {report['tuned_model']}")
    print(table)
    print(f"wrote {args.output_dir}/diagnose.json, diagnose.png, table.txt")
    return 0
