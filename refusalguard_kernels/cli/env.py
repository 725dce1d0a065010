"""``refusalguard env``: what a bug report needs (versions, CUDA, GPUs, backends, the CUDA extension)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from importlib import metadata

from .common import HelpFormatter

__all__ = ["add_parser", "run", "collect_env", "format_env"]

#: distributions whose versions matter for a report, in the order printed.
PACKAGES = (
    "refusalguard_kernels",
    "torch",
    "triton",
    "transformers",
    "peft",
    "trl",
    "datasets",
    "accelerate",
    "safetensors",
    "tokenizers",
    "deepspeed",
    "numpy",
)


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "env",
        help="print the environment for a bug report (versions, CUDA, GPUs, backends)",
        description=(
            "Print what a bug report needs: Python and package versions, the CUDA / ROCm version torch was built "
            "with, the GPUs it sees, the penalty backends available here, whether the CUDA C++ extension is built "
            "(and why not), and TRITON_INTERPRET. Paste the output into the issue."
        ),
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.set_defaults(func=run)
    return parser


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def collect_env() -> dict:
    """The environment as a dict (what ``refusalguard env --json`` prints)."""
    env: dict = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": {name: _version(name) for name in PACKAGES},
        # An editable install runs another checkout's code than the one you may be looking at.
        "refusalguard_kernels_path": os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"),
        "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }
    try:
        import torch
    except Exception as exc:  # a broken torch is exactly what a report must show
        env["torch_error"] = f"{type(exc).__name__}: {exc}"
        return env
    from ..versions import active_conflicts, installed_versions

    versions = installed_versions()
    env["version_conflicts"] = [conflict.message(versions) for conflict in active_conflicts(versions)]
    env["torch_cuda"] = torch.version.cuda
    env["torch_hip"] = getattr(torch.version, "hip", None)
    env["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    gpus = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            gpus.append(
                {
                    "name": props.name,
                    "capability": f"{props.major}.{props.minor}",
                    "memory_gib": round(props.total_memory / 2**30, 1),
                }
            )
    env["gpus"] = gpus
    from .. import backends

    env["available_backends"] = backends.available_backends()
    why = backends._cuda_extension_error()
    env["cuda_extension"] = "built" if why is None else f"not built: {why}"
    return env


def format_env(env: dict) -> str:
    """The dict from ``collect_env`` as aligned ``name: value`` lines."""
    lines = [f"python: {env['python']}", f"platform: {env['platform']}"]
    for name, version in env["packages"].items():
        lines.append(f"{name}: {version or 'not installed'}")
    lines.append(f"refusalguard_kernels at: {env['refusalguard_kernels_path']}")
    if "torch_error" in env:
        lines.append(f"torch import failed: {env['torch_error']}")
    else:
        lines.append(f"torch CUDA: {env['torch_cuda'] or 'none (CPU build)'}")
        if env.get("torch_hip"):
            lines.append(f"torch ROCm/HIP: {env['torch_hip']}")
        lines.append(f"cuDNN: {env['cudnn'] or 'none'}")
        if env["gpus"]:
            for index, gpu in enumerate(env["gpus"]):
                lines.append(f"GPU {index}: {gpu['name']} (sm {gpu['capability']}, {gpu['memory_gib']} GiB)")
        else:
            lines.append("GPUs: none visible to torch")
        lines.append(f"available backends: {', '.join(env['available_backends'])}")
        lines.append(f"CUDA extension: {env['cuda_extension']}")
    for conflict in env.get("version_conflicts", []):
        lines.append(f"version conflict: {conflict}")
    lines.append(f"TRITON_INTERPRET: {env['TRITON_INTERPRET'] if env['TRITON_INTERPRET'] is not None else 'unset'}")
    lines.append(
        f"CUDA_VISIBLE_DEVICES: {env['CUDA_VISIBLE_DEVICES'] if env['CUDA_VISIBLE_DEVICES'] is not None else 'unset'}"
    )
    width = max(line.index(":") for line in lines)
    return "\n".join(f"{line[: line.index(':')]:<{width}}{line[line.index(':') :]}" for line in lines)


def run(args: argparse.Namespace) -> int:
    env = collect_env()
    print(json.dumps(env, indent=2) if args.json else format_env(env))
    return 0
