"""Dependency versions known to break one feature, and the error that names them.

pip cannot express "if transformers >= X then peft >= Y", so pyproject.toml's ranges stay wide and the
combinations that break a single feature are listed here.  Code that offers such a feature calls
``require(key)`` before using it; ``refusalguard env`` prints every conflict the installed versions hit.
The tested set (constraints.txt, what CI installs) hits none.  Add an entry when a newest- or
lowest-releases run (``python scripts/deps.py latest`` / ``lowest``) fails for a version reason.

Part of the op layer (the triton backend checks its interpreter here), so it needs nothing beyond the
standard library: versions are compared as release tuples, specifiers are ``>=X`` / ``<X`` lists.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata

__all__ = ["Conflict", "CONFLICTS", "VersionConflictError", "active_conflicts", "require", "installed_versions"]


class VersionConflictError(ImportError):
    """The installed versions of two dependencies cannot support a feature together."""


@dataclass(frozen=True)
class Conflict:
    key: str  # what callers pass to require()
    feature: str  # what the user was doing, in their words
    package: str  # when this package's version ...
    versions: str  # ... is in this range,
    needs: str  # this other package ...
    needs_versions: str  # ... must be in this range.
    fix: str  # what to do instead

    def hit(self, versions: Mapping[str, str | None]) -> bool:
        have, other = versions.get(self.package), versions.get(self.needs)
        if have is None or other is None:
            return False
        return _admits(self.versions, have) and not _admits(self.needs_versions, other)

    def message(self, versions: Mapping[str, str | None]) -> str:
        return (
            f"{self.feature} needs {self.needs}{self.needs_versions} with {self.package}{self.versions}; installed: "
            f"{self.package} {versions.get(self.package)}, {self.needs} {versions.get(self.needs)}. {self.fix}"
        )


def _release(version: str) -> tuple[int, ...]:
    """The release numbers only: ``2.13.0+cpu`` -> (2, 13, 0); ``3.6.0rc1`` -> (3, 6, 0)."""
    match = re.match(r"\s*v?(\d+(?:\.\d+)*)", version)
    if match is None:
        raise ValueError(f"cannot read a release number from version {version!r}")
    numbers = [int(part) for part in match[1].split(".")]
    while len(numbers) > 1 and numbers[-1] == 0:  # 5.24 == 5.24.0
        numbers.pop()
    return tuple(numbers)


def _admits(specifiers: str, version: str) -> bool:
    """Whether ``version`` satisfies every comma-separated ``>=X`` / ``<X`` in ``specifiers``."""
    have = _release(version)
    for spec in filter(None, (part.strip() for part in specifiers.split(","))):
        if spec.startswith(">="):
            ok = have >= _release(spec[2:])
        elif spec.startswith("<"):
            ok = have < _release(spec[1:])
        else:
            raise ValueError(f"unsupported version specifier {spec!r} (use >=X or <X)")
        if not ok:
            return False
    return True


CONFLICTS: tuple[Conflict, ...] = (
    Conflict(
        key="integrated-adapters",
        feature="transformers' integrated adapters (model.add_adapter / load_adapter, or from_pretrained of an "
        "adapter folder)",
        package="transformers",
        versions=">=5.24",
        needs="peft",
        needs_versions=">=0.22",
        fix="Wrap the model with peft instead (get_peft_model / PeftModel.from_pretrained: the guard and the CLI "
        "use that path, which works with any peft), or install transformers<5.24, or peft>=0.22 once it is released.",
    ),
    Conflict(
        key="triton-interpreter",
        feature="Triton's interpreter (TRITON_INTERPRET=1: backend='triton' on CPU tensors, as the tests run it)",
        package="numpy",
        versions=">=2.4",
        needs="triton",
        needs_versions=">=3.7",
        fix="Install triton>=3.7 or numpy<2.4 (checked: 3.6.0 fails; 3.7.1, 3.8.0, 3.9.0 work; GPU runs compile the "
        "kernels and are not affected): triton 3.6's interpreter returns tl.program_id as a 1-element array that "
        "numpy>=2.4 refuses to turn into an int.",
    ),
)


def installed_versions(packages: tuple[str, ...] | None = None) -> dict[str, str | None]:
    names = packages or tuple(sorted({c.package for c in CONFLICTS} | {c.needs for c in CONFLICTS}))
    found: dict[str, str | None] = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def active_conflicts(versions: Mapping[str, str | None] | None = None) -> list[Conflict]:
    """The conflicts the given (default: installed) versions hit."""
    versions = installed_versions() if versions is None else versions
    return [conflict for conflict in CONFLICTS if conflict.hit(versions)]


def require(key: str, versions: Mapping[str, str | None] | None = None) -> None:
    """Raise ``VersionConflictError`` naming the versions if feature ``key`` cannot work with them."""
    known = {conflict.key: conflict for conflict in CONFLICTS}
    if key not in known:
        raise KeyError(f"unknown feature {key!r}; known: {sorted(known)}")
    versions = installed_versions() if versions is None else versions
    if known[key].hit(versions):
        raise VersionConflictError(known[key].message(versions))
