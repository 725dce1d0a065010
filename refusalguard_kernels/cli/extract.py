"""``refusalguard extract``: a refusal basis from a model and harmful/harmless prompt sets.

Also home of the helpers the model-side subcommands share: model/tokenizer loading,
``--layers`` parsing, device/dtype choice and the error handler that turns mistakes a
person can fix into one line on stderr and exit code 2 (``--traceback`` shows the rest).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from pathlib import Path

__all__ = [
    "add_parser",
    "run",
    "parse_layers",
    "resolve_device",
    "resolve_dtype",
    "load_model_and_tokenizer",
    "cli_errors",
    "CLIError",
    "HelpFormatter",
    "DTYPES",
]

DTYPES = ("auto", "float32", "bfloat16", "float16")
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


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where there is none to show (None, a flag's False);
    keeps the line breaks of texts written with them (the examples epilog)."""

    def _fill_text(self, text, width, indent):
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


class CLIError(Exception):
    """A mistake in the command line or its inputs; printed without a traceback."""


# ---------------------------------------------------------------------- shared helpers


def parse_layers(text: str) -> list[int]:
    """'10,12,14' / '8-11' / '-1' / '4,8-10' -> sorted unique layer indices (negatives count from the end)."""
    layers: list[int] = []
    for part in str(text).replace(" ", "").split(","):
        if not part:
            continue
        try:
            if "-" in part[1:]:
                cut = part.index("-", 1)
                first, last = int(part[:cut]), int(part[cut + 1:])
                if last < first:
                    raise ValueError
                layers.extend(range(first, last + 1))
            else:
                layers.append(int(part))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"cannot read layers {text!r}: use indices and ranges such as '10,12,14' or '8-11' (negative counts from the end)"
            ) from None
    if not layers:
        raise argparse.ArgumentTypeError("--layers needs at least one layer index")
    return sorted(set(layers))


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: no CUDA device is available here; use --device cpu")
    return name


def resolve_dtype(name: str, device: str, *, bf16: bool = False):
    """A torch dtype; "auto" = bfloat16 when training in bf16 or on a CUDA device that supports it, else float32."""
    import torch

    if name == "auto":
        if bf16:
            return torch.bfloat16
        if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _looks_local(name: str) -> bool:
    return name.startswith(("./", "../", "/", "~", ".\\")) or os.path.isabs(name) or os.sep in name and Path(name).exists()


def load_tokenizer(name: str, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    _check_model_source(name)
    try:
        return AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise CLIError(f"cannot load the tokenizer of {name!r}: {exc}") from exc


def _check_model_source(name: str) -> None:
    path = Path(name).expanduser()
    if _looks_local(name) and not path.exists():
        raise CLIError(f"model folder {name!r} does not exist (looked at {str(path.absolute())!r})")
    if path.is_file():
        raise CLIError(f"{name!r} is a file; give the model folder (with config.json) or a Hugging Face Hub name")
    if path.is_dir() and not (path / "config.json").is_file():
        raise CLIError(f"{name!r} has no config.json: it is not a transformers model folder")


def load_model_and_tokenizer(name: str, *, dtype, device: str | None = None, trust_remote_code: bool = False):
    """(model in eval mode on ``device``, tokenizer) from a local folder or a Hub name."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(name, trust_remote_code=trust_remote_code)
    import transformers

    # transformers < 4.56 calls the argument torch_dtype.
    dtype_key = "dtype" if _version(transformers.__version__) >= (4, 56) else "torch_dtype"
    try:
        model = AutoModelForCausalLM.from_pretrained(name, trust_remote_code=trust_remote_code, **{dtype_key: dtype})
    except (OSError, ValueError) as exc:
        raise CLIError(f"cannot load model {name!r}: {exc}") from exc
    if device is not None:
        model.to(device)
    return model.eval(), tokenizer


def _version(text: str) -> tuple[int, int]:
    parts = []
    for piece in text.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def cli_errors(command: str):
    """Decorator for ``run(args)``: actionable errors -> one line on stderr, exit code 2."""

    def wrap(run):
        @functools.wraps(run)
        def inner(args) -> int:
            try:
                return run(args)
            except (CLIError, ValueError, OSError, ImportError, RuntimeError) as exc:
                if getattr(args, "traceback", False):
                    raise
                message = str(exc) or type(exc).__name__
                if not isinstance(exc, (CLIError, ValueError, FileNotFoundError)):
                    message = f"{type(exc).__name__}: {message}"
                print(f"refusalguard {command}: error: {message}", file=sys.stderr)
                print("(run again with --traceback for the full traceback)", file=sys.stderr)
                return 2

        return inner

    return wrap


def add_common_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow model/tokenizer code from the Hub repository to run (only for repositories you trust)")
    parser.add_argument("--layers-path", default=None, metavar="PATH",
                        help="dotted path to the model's decoder layer list (e.g. model.layers) when it is not found "
                             "automatically")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--traceback", action="store_true", help="show the full Python traceback on errors")


# ---------------------------------------------------------------------- extract


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
    parser.add_argument("--harmful", default="builtin:harmful", metavar="SOURCE",
                        help="prompts the model should refuse: builtin:harmful, a .txt/.json/.jsonl/.csv file, or a "
                             "dataset name")
    parser.add_argument("--harmless", default="builtin:harmless", metavar="SOURCE",
                        help="prompts the model should answer: builtin:harmless, a file, or a dataset name")
    parser.add_argument("--harmful-column", default=None, metavar="NAME",
                        help="field holding the prompt in --harmful objects/CSV/dataset rows")
    parser.add_argument("--harmless-column", default=None, metavar="NAME",
                        help="field holding the prompt in --harmless objects/CSV/dataset rows")
    parser.add_argument("--split", default="train", help="dataset split to read prompts from (dataset sources)")
    parser.add_argument("--limit", type=int, default=None, metavar="N",
                        help="use only the first N prompts of each set (default: all)")
    parser.add_argument("--layers", type=parse_layers, default=None, metavar="LIST",
                        help="decoder layers, e.g. '10,12,14' or '8-11' (negative counts from the end); default: the "
                             "middle band, floor(0.4 L) .. ceil(0.6 L) - 1 of L layers")
    parser.add_argument("--k", type=int, default=1, help="directions per layer (the cone's dimension)")
    parser.add_argument("--method", choices=("dim", "svd"), default=None,
                        help="dim: difference of means (k = 1); svd: difference of means plus the top singular "
                             "directions of the harmful activations; default: dim for --k 1, svd otherwise")
    parser.add_argument("--positions", choices=("last", "post-instruction"), default="last",
                        help="where to read activations: the last prompt token, or the mean over the chat template's "
                             "tokens after the user message (needs a chat template)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per forward pass")
    parser.add_argument("--output", "-o", default="refusal_basis.safetensors", metavar="PATH",
                        help="where to write the basis (.safetensors file, or a folder to hold "
                             "refusal_basis.safetensors)")
    parser.add_argument("--dtype", choices=DTYPES, default="auto",
                        help="model weights dtype; auto: bfloat16 on a CUDA device that supports it, else float32")
    parser.add_argument("--device", default="auto",
                        help="where to run the model: auto (cuda if available, else cpu), cpu, cuda, cuda:1, mps")
    add_common_model_options(parser)
    parser.set_defaults(func=run)
    return parser


def _positive(name: str, value, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or value < 1:
        raise CLIError(f"{name} must be a positive integer; got {value}")


@cli_errors("extract")
def run(args) -> int:
    _positive("--k", args.k)
    _positive("--batch-size", args.batch_size)
    _positive("--limit", args.limit, allow_none=True)
    method = args.method or ("dim" if args.k == 1 else "svd")
    if method == "dim" and args.k != 1:
        raise CLIError(f"--method dim gives one direction per layer; for --k {args.k} use --method svd")

    from ..basis import extract_refusal_basis
    from ..prompts import load_prompts

    harmful = load_prompts(args.harmful, column=args.harmful_column, split=args.split, limit=args.limit)
    harmless = load_prompts(args.harmless, column=args.harmless_column, split=args.split, limit=args.limit)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    model, tokenizer = load_model_and_tokenizer(args.model, dtype=dtype, device=device,
                                                trust_remote_code=args.trust_remote_code)
    basis = extract_refusal_basis(
        model, tokenizer, harmful, harmless, layers=args.layers, k=args.k, method=method,
        positions=args.positions, batch_size=args.batch_size, show_progress=not args.quiet,
        layers_path=args.layers_path,
    )
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
