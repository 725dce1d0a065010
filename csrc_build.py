"""Decide whether and how to build the csrc/ CUDA extension (used by setup.py)."""

from __future__ import annotations


def extension_modules(mode: str):
    """Return (ext_modules, cmdclass). Until csrc/ has kernels there is nothing to build."""
    mode = (mode or "auto").lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"REFUSALGUARD_BUILD_CUDA must be 0, 1 or auto; got {mode!r}")
    if mode == "1":
        raise SystemExit("REFUSALGUARD_BUILD_CUDA=1 but this version ships no CUDA extension yet")
    return [], {}
