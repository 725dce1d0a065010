"""The module paths of 0.1 that moved into subpackages in 0.2 keep working until 0.3.

An import finder maps each old name (and its submodules) to the very same module object as the
new one, so classes keep their identity, and warns with a DeprecationWarning naming the new path.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings

_PACKAGE = "refusalguard_kernels"
MOVED = {
    "basis": "integration.basis",
    "hooks": "integration.hooks",
    "anchors": "integration.anchors",
    "model_utils": "integration.model_utils",
    "prompts": "integration.prompts",
    "trainer": "training.trainer",
    "data_utils": "training.data_utils",
    "diagnostics": "evaluation.diagnostics",
    "organism": "demo.organism",
}


def new_name(fullname: str) -> str | None:
    """The 0.2 name of a 0.1 module path, or None when it did not move."""
    prefix = _PACKAGE + "."
    if not fullname.startswith(prefix):
        return None
    head, _, tail = fullname[len(prefix) :].partition(".")
    if head not in MOVED:
        return None
    return prefix + MOVED[head] + ("." + tail if tail else "")


class _MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        new = new_name(fullname)
        if new is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def create_module(self, spec):
        new = new_name(spec.name)
        if spec.name.count(".") == 1:  # warn once, for the top of the old path
            warnings.warn(
                f"{spec.name} moved to {new} in refusalguard_kernels 0.2 and the old path goes away in 0.3: "
                f"import from {new}, or the public names from refusalguard_kernels.",
                DeprecationWarning,
                stacklevel=2,
            )
        return importlib.import_module(new)

    def exec_module(self, module):
        pass  # already executed under its new name


def install() -> None:
    if not any(isinstance(finder, _MovedFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _MovedFinder())  # before the path finder, which would load a copy
