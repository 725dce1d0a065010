"""Dependency versions known to break one feature, and the error that names them.

pip cannot express "if transformers >= X then peft >= Y", so pyproject.toml's ranges stay wide and the
combinations that break a single feature are listed here.  Code that offers such a feature calls
``require(key)`` before using it; ``refusalguard env`` prints every conflict the installed versions hit.
The tested set (constraints.txt, what CI installs) hits none.  Add an entry when a newest-releases run
(``python scripts/deps.py latest``) fails for a version reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata

from packaging.specifiers import SpecifierSet
from packaging.version import Version

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
        return _release(have) in SpecifierSet(self.versions) and _release(other) not in SpecifierSet(
            self.needs_versions
        )

    def message(self, versions: Mapping[str, str | None]) -> str:
        return (
            f"{self.feature} needs {self.needs}{self.needs_versions} with {self.package}{self.versions}; installed: "
            f"{self.package} {versions.get(self.package)}, {self.needs} {versions.get(self.needs)}. {self.fix}"
        )


def _release(version: str) -> Version:
    """The release part only (``2.13.0+cpu`` -> 2.13.0; pre-releases compare as their release)."""
    return Version(Version(version).base_version)


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
