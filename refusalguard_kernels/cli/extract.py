"""``refusalguard extract``: a refusal basis from a model and harmful/harmless prompt sets."""

from __future__ import annotations

import argparse

from .common import (
    CLIError,
    HelpFormatter,
    add_common_model_options,
    add_device_options,
    add_prompt_set_options,
    add_threads_option,
    apply_threads,
    cli_errors,
    int_at_least,
    load_model_and_tokenizer,
    merge_adapter,
    parse_layers,
    quiet_transformers,
    resolve_device,
    resolve_dtype,
)

__all__ = ["add_parser", "run", "describe_basis"]

EPILOG_EXTRACT = """\
examples:
  refusalguard extract meta-llama/Llama-3.2-1B-Instruct --layers 6-9 --output llama1b_basis.safetensors
  refusalguard extract ./my-model --harmful harmful.txt --harmless harmless.jsonl --harmless-column text \\
      --k 4 --method svd --positions post-instruction --dtype bfloat16

Prompt sources (--harmful/--harmless): builtin:harmful / builtin:harmless (small sets shipped
with the package), a .txt file (one prompt a line), .json/.jsonl (strings, or objects with
--harmful-column/--harmless-column), .csv (needs the column), or a Hugging Face dataset name
(needs the column).
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "extract",
        help="extract a refusal basis (per-layer refusal directions) from a model",
        description=(
            "Run the frozen model over harmful and harmless prompts and save, for each chosen decoder layer, an "
            "orthonormal basis of the directions that separate them (the refusal cone). The file is what "
            "`refusalguard train --basis` and RefusalBasis.load read."
        ),
        epilog=EPILOG_EXTRACT,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("model", help="model folder or Hugging Face Hub name (loaded with AutoModelForCausalLM)")
    parser.add_argument(
        "--harmful",
        default="builtin:harmful",
        metavar="SOURCE",
        help="prompts the model should refuse: builtin:harmful, a .txt/.json/.jsonl/.csv file, or a dataset name",
    )
    parser.add_argument(
        "--harmless",
        default="builtin:harmless",
        metavar="SOURCE",
        help="prompts the model should answer: builtin:harmless, a file, or a dataset name",
    )
    add_prompt_set_options(parser, "harmful", "harmless", split=True)
    parser.add_argument(
        "--layers",
        type=parse_layers,
        default=None,
        metavar="LIST",
        help="decoder layers, e.g. '10,12,14' or '8-11' (negative counts from the end); default: the "
        "middle band, floor(0.4 L) .. ceil(0.6 L) - 1 of L layers",
    )
    parser.add_argument("--k", type=int_at_least("--k"), default=1, help="directions per layer (the cone's dimension)")
    parser.add_argument(
        "--method",
        choices=("dim", "svd"),
        default=None,
        help="dim: difference of means (k = 1); svd: difference of means plus the top singular "
        "directions of the harmful activations; default: dim for --k 1, svd otherwise",
    )
    parser.add_argument(
        "--positions",
        choices=("last", "post-instruction"),
        default="last",
        help="where to read activations: the last prompt token, or the mean over the chat template's "
        "tokens after the user message (needs a chat template)",
    )
    parser.add_argument("--batch-size", type=int_at_least("--batch-size"), default=8, help="prompts per forward pass")
    parser.add_argument(
        "--output",
        "-o",
        default="refusal_basis.safetensors",
        metavar="PATH",
        help="where to write the basis (.safetensors file, or a folder to hold refusal_basis.safetensors)",
    )
    parser.add_argument(
        "--adapter",
        default=None,
        metavar="PATH",
        help="a PEFT (LoRA) adapter merged into the model first: the basis of the adapted model (e.g. an "
        "aligned model to attack next with `train --adapter`)",
    )
    add_device_options(parser)
    add_threads_option(parser)
    add_common_model_options(parser)
    parser.set_defaults(func=run)
    return parser


@cli_errors("extract")
def run(args) -> int:
    method = args.method or ("dim" if args.k == 1 else "svd")
    if method == "dim" and args.k != 1:
        raise CLIError(f"--method dim gives one direction per layer; for --k {args.k} use --method svd")

    from ..integration.basis import extract_refusal_basis
    from ..integration.prompts import load_prompts

    apply_threads(args)
    quiet_transformers(args.quiet)
    harmful = load_prompts(args.harmful, column=args.harmful_column, split=args.split, limit=args.limit)
    harmless = load_prompts(args.harmless, column=args.harmless_column, split=args.split, limit=args.limit)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    model, tokenizer = load_model_and_tokenizer(
        args.model, dtype=dtype, device=device, trust_remote_code=args.trust_remote_code
    )
    if args.adapter is not None:
        model = merge_adapter(model, args.adapter).eval()
    basis = extract_refusal_basis(
        model,
        tokenizer,
        harmful,
        harmless,
        layers=args.layers,
        k=args.k,
        method=method,
        positions=args.positions,
        batch_size=args.batch_size,
        show_progress=not args.quiet,
        layers_path=args.layers_path,
    )
    if args.adapter is not None:
        basis.metadata["adapter"] = args.adapter
    path = basis.save(args.output)
    print(describe_basis(basis))
    print(f"wrote {path}")
    return 0


def describe_basis(basis) -> str:
    """A small table: layer, explained share, separation."""
    meta = basis.metadata
    explained, separation = meta.get("explained_share", {}), meta.get("separation", {})
    lines = [
        f"refusal basis: {len(basis.layers)} layer(s), k={basis.k}, method={meta.get('method')}, "
        f"positions={meta.get('positions')}, {meta.get('n_harmful')} harmful / {meta.get('n_harmless')} harmless prompts",
        f"{'layer':>6}  {'explained':>9}  {'separation':>10}",
    ]
    for layer in basis.layers:
        share, sep = explained.get(layer), separation.get(layer)
        share_text = f"{share:9.3f}" if isinstance(share, (int, float)) else f"{'-':>9}"
        sep_text = f"{sep:10.2f}" if isinstance(sep, (int, float)) else f"{'-':>10}"
        lines.append(f"{layer:>6}  {share_text}  {sep_text}")
    return "\n".join(lines)
