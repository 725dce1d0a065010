"""What the subcommands share: argument types and option groups, model/tokenizer loading,
device/dtype choice and the error handler that turns mistakes a person can fix into one line on
stderr and exit code 2 (``--traceback`` shows the rest)."""

from __future__ import annotations

import argparse
import functools
import os
import sys
from pathlib import Path

__all__ = [
    "DTYPES",
    "HelpFormatter",
    "CLIError",
    "cli_errors",
    "parse_layers",
    "int_at_least",
    "positive_float",
    "nonnegative_float",
    "resolve_device",
    "resolve_dtype",
    "load_tokenizer",
    "load_model_and_tokenizer",
    "add_common_model_options",
    "add_device_options",
    "add_prompt_set_options",
    "add_threads_option",
    "apply_threads",
    "quiet_transformers",
    "load_adapter",
    "merge_adapter",
    "cpu_has_native_bf16",
]

DTYPES = ("auto", "float32", "bfloat16", "float16")


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


def parse_layers(text: str) -> list[int]:
    """'10,12,14' / '8-11' / '-1' / '4,8-10' -> sorted unique layer indices (negatives count from the end)."""
    layers: list[int] = []
    for part in str(text).replace(" ", "").split(","):
        if not part:
            continue
        try:
            if "-" in part[1:]:
                cut = part.index("-", 1)
                first, last = int(part[:cut]), int(part[cut + 1 :])
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


def resolve_dtype(name: str, device: str, *, bf16: bool = False, training: bool = False):
    """A torch dtype.  "auto": for training (``training=True``) bfloat16 exactly when training in bf16
    (``--bf16``), else float32; for inference bfloat16 on a CUDA device that supports it, else float32."""
    import torch

    if name == "auto":
        if bf16:
            return torch.bfloat16
        if training:
            return torch.float32
        if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _looks_local(name: str) -> bool:
    return (
        name.startswith(("./", "../", "/", "~", ".\\")) or os.path.isabs(name) or os.sep in name and Path(name).exists()
    )


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


def add_threads_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threads",
        type=int_at_least("--threads", 1),
        default=None,
        metavar="N",
        help="CPU threads for PyTorch (default: PyTorch's choice, usually one per core). On a shared machine, "
        "fewer threads than cores keeps step times steady",
    )


def apply_threads(args) -> None:
    """``torch.set_num_threads(--threads)`` when given."""
    threads = getattr(args, "threads", None)
    if threads:
        import torch

        torch.set_num_threads(threads)


def cpu_has_native_bf16() -> bool | None:
    """True when the CPU advertises native bf16 arithmetic (``avx512_bf16`` or ``amx_bf16`` in /proc/cpuinfo),
    False when it does not, None where that cannot be read (not Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), None)
    except OSError:
        return None
    if flags is None:
        return None
    return "avx512_bf16" in flags or "amx_bf16" in flags


def quiet_transformers(quiet: bool) -> None:
    """With --quiet, also silence the weight-loading progress bars of transformers and the Hub."""
    if quiet:
        from huggingface_hub.utils import disable_progress_bars
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        disable_progress_bars()


def merge_adapter(model, adapter: str):
    """``model`` with the PEFT adapter ``adapter`` merged into its weights (a plain transformers model again):
    the model an align-then-attack run starts from."""
    return load_adapter(model, adapter).merge_and_unload()


def load_adapter(model, adapter: str):
    """``model`` wrapped with the PEFT adapter folder ``adapter`` (a ``PeftModel`` in eval mode); a CLIError
    naming the folder when it is not one or cannot be loaded."""
    import warnings

    from peft import PeftModel

    if os.path.isdir(adapter) and not os.path.isfile(os.path.join(adapter, "adapter_config.json")):
        raise CLIError(f"--adapter {adapter!r} has no adapter_config.json: it is not a PEFT adapter folder")
    try:
        with warnings.catch_warnings():
            # peft 0.21 reads a transformers attribute deprecated in 5.x; nothing a user can act on.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            return PeftModel.from_pretrained(model, adapter).eval()
    except (OSError, ValueError) as exc:
        raise CLIError(f"cannot load the adapter {adapter!r}: {exc}") from exc


def add_common_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow model/tokenizer code from the Hub repository to run (only for repositories you trust)",
    )
    parser.add_argument(
        "--layers-path",
        default=None,
        metavar="PATH",
        help="dotted path to the model's decoder layer list (e.g. model.layers) when it is not found automatically",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars (weight loading included)")
    parser.add_argument("--traceback", action="store_true", help="show the full Python traceback on errors")


def add_device_options(parser: argparse.ArgumentParser, what: str = "the model") -> None:
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help=f"{what} weights dtype; auto: bfloat16 on a CUDA device that supports it, else float32",
    )
    parser.add_argument(
        "--device",
        default="auto",
        help=f"where to run {what}: auto (cuda if available, else cpu), cpu, cuda, cuda:1, mps",
    )


def add_prompt_set_options(parser, *sets: str, split: bool = False) -> None:
    """``--<set>-column`` for each prompt-set option (``--harmful``, ``--harmless``, ...), ``--limit``,
    and with ``split`` one ``--split`` for all sets."""
    for name in sets:
        parser.add_argument(
            f"--{name}-column",
            default=None,
            metavar="NAME",
            help=f"field holding the prompt in --{name} objects / CSV / dataset rows",
        )
    if split:
        parser.add_argument("--split", default="train", help="dataset split to read prompts from (dataset sources)")
    parser.add_argument(
        "--limit",
        type=int_at_least("--limit"),
        default=None,
        metavar="N",
        help="use only the first N prompts of each set (default: all)",
    )


def _number(name: str, kind, text: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{name} must be {'an integer' if kind is int else 'a number'}; got {text!r}"
        ) from None


def int_at_least(name: str, minimum: int = 1):
    """argparse type: an integer >= minimum, with an error naming the option."""

    def parse(text: str) -> int:
        value = _number(name, int, text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{name} must be >= {minimum}; got {value}")
        return value

    return parse


def positive_float(name: str):
    """argparse type: a finite number > 0."""

    def parse(text: str) -> float:
        value = _number(name, float, text)
        if not 0 < value < float("inf"):
            raise argparse.ArgumentTypeError(f"{name} must be a positive finite number; got {text!r}")
        return value

    return parse


def nonnegative_float(name: str):
    """argparse type: a finite number >= 0."""

    def parse(text: str) -> float:
        value = _number(name, float, text)
        if not 0 <= value < float("inf"):
            raise argparse.ArgumentTypeError(f"{name} must be a finite number >= 0; got {text!r}")
        return value

    return parse
