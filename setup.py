"""Builds the optional CUDA C++ extension (csrc/) only where it can.

pyproject.toml holds the metadata; this file only decides on ext_modules:
  REFUSALGUARD_BUILD_CUDA=0     never build the extension
  REFUSALGUARD_BUILD_CUDA=1     build it, and fail loudly if that is impossible
  unset / "auto"                build it when torch with CUDA and a CUDA toolkit are importable
A CPU-only machine (or an isolated build without torch) installs the pure-Python
package; the extension can then be built just in time on first use of backend="cuda".
"""

import os
import sys

from setuptools import setup

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from csrc_build import extension_modules  # noqa: E402

ext_modules, cmdclass = extension_modules(os.environ.get("REFUSALGUARD_BUILD_CUDA", "auto"))
setup(ext_modules=ext_modules, cmdclass=cmdclass)
