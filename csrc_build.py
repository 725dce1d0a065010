"""Decide whether and how to build the csrc/ CUDA extension (used by setup.py).

``extension_modules(mode)`` returns ``(ext_modules, cmdclass)`` for setuptools:

* ``"0"``: never build; the package installs pure-Python.
* ``"1"``: build ``refusalguard_kernels._cuda`` or stop the install (SystemExit) with
  the reason: torch missing from the build environment, a CPU-only torch, no CUDA
  toolkit, or an nvcc whose major version differs from torch's CUDA.
* ``"auto"`` (default): build when all of that is in place, otherwise skip with a
  note on stderr; a compile failure is reported and skipped too, so an install never
  breaks because of the optional extension.  Under pip's build isolation torch is
  not importable, so "auto" skips: use ``pip install --no-build-isolation`` to build.

GPU architectures: sm_80 and sm_90 (plus compute_90 PTX for newer GPUs) unless
``TORCH_CUDA_ARCH_LIST`` is set, which torch's build then uses as given.
Without the compiled extension, ``refusalguard_kernels.ops.cuda_penalty.build_jit()``
builds the same sources just in time.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

EXTENSION_NAME = "refusalguard_kernels._cuda"
CSRC_DIR = "csrc"
SOURCES = ("refusalguard_penalty.cu", "bindings.cpp")
DEFAULT_ARCH_FLAGS = (
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90,code=sm_90",
    "-gencode=arch=compute_90,code=compute_90",
)
HOW_TO_BUILD = (
    "REFUSALGUARD_BUILD_CUDA=1 pip install --no-build-isolation -e . "
    "(needs a CUDA build of torch and a CUDA toolkit with nvcc of the same major version)"
)


def _note(message: str) -> None:
    print(f"refusalguard_kernels: {message}", file=sys.stderr)


def _skip_or_exit(mode: str, reason: str):
    if mode == "1":
        raise SystemExit(f"REFUSALGUARD_BUILD_CUDA=1 but the CUDA extension cannot be built: {reason}")
    _note(
        f"skipping the optional CUDA extension ({reason}); backend='cuda' will be unavailable. "
        f"To build it: {HOW_TO_BUILD}"
    )
    return [], {}


def _nvcc_release(nvcc: str) -> str | None:
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+)\.(\d+)", out)
    return f"{match.group(1)}.{match.group(2)}" if match else None


def nvcc_flags() -> list[str]:
    """nvcc flags for the extension: -O3, and the default arch list unless TORCH_CUDA_ARCH_LIST is set."""
    flags = ["-O3", "--threads=0"]
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        flags += list(DEFAULT_ARCH_FLAGS)  # torch adds no arch flags of its own once one is given
    return flags


def extension_modules(mode: str | None):
    """Return (ext_modules, cmdclass) for setup(); see the module docstring."""
    mode = (mode or "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"REFUSALGUARD_BUILD_CUDA must be 0, 1 or auto; got {mode!r}")
    if mode == "0":
        return [], {}

    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as exc:  # ImportError, or a broken torch
        return _skip_or_exit(
            mode,
            f"torch is not importable in the build environment ({exc}); pip isolates builds by default, "
            "so install torch first and pass --no-build-isolation",
        )
    if not torch.version.cuda:
        return _skip_or_exit(mode, f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None)")
    cuda_home = cpp_extension.CUDA_HOME
    nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else shutil.which("nvcc")
    if not nvcc or not os.path.exists(nvcc):
        return _skip_or_exit(mode, "no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)")
    release = _nvcc_release(nvcc)
    if release is None:
        return _skip_or_exit(mode, f"could not read the CUDA release from {nvcc} --version")
    if release.split(".")[0] != torch.version.cuda.split(".")[0]:
        return _skip_or_exit(
            mode, f"nvcc is CUDA {release} but torch was built with CUDA {torch.version.cuda}; the majors must match"
        )

    root = os.path.dirname(os.path.abspath(__file__))
    sources = [os.path.join(CSRC_DIR, name) for name in SOURCES]  # relative: setuptools wants them so
    missing = [s for s in sources if not os.path.exists(os.path.join(root, s))]
    if missing:
        return _skip_or_exit(mode, f"csrc sources missing: {', '.join(missing)}")

    extension = cpp_extension.CUDAExtension(
        name=EXTENSION_NAME,
        sources=sources,
        include_dirs=[os.path.join(root, CSRC_DIR)],
        extra_compile_args={"cxx": ["-O3"], "nvcc": nvcc_flags()},
    )
    build_ext = cpp_extension.BuildExtension
    if mode == "auto":
        build_ext = _optional_build(build_ext)
    return [extension], {"build_ext": build_ext}


def _optional_build(base):
    """build_ext that reports a failed extension build and carries on (mode "auto")."""

    class OptionalBuildExtension(base):
        def build_extensions(self):
            try:
                super().build_extensions()
            except Exception as exc:  # compiler errors surface as RuntimeError, CompileError, ...
                self.extensions = []  # nothing to copy or package afterwards
                _note(
                    f"building the CUDA extension failed ({type(exc).__name__}: {exc}); installing without it. "
                    f"backend='cuda' will be unavailable. Rebuild with {HOW_TO_BUILD} to see the full error."
                )

    return OptionalBuildExtension
