#!/usr/bin/env python
"""The tested dependency set (constraints.txt): check it, and try the newest releases against it.

CI and the README's commands install exactly the versions in ``constraints.txt``
(``pip install -c constraints.txt ...``), so an upstream release cannot break a landing overnight.
Upgrading is a deliberate step, this script:

    python scripts/deps.py latest            # fresh venv, the newest release of every dependency,
                                             # the whole suite; prints what changed and the result
    python scripts/deps.py latest --write    # ... and, only if the suite passed, makes that set
                                             # the new constraints.txt (then commit it + CHANGELOG)
    python scripts/deps.py lowest            # the oldest releases pyproject.toml's ranges admit, the suite
    python scripts/deps.py check             # does this environment match constraints.txt?
    python scripts/deps.py freeze            # this environment, in constraints.txt's format

torch is the exception to "newest": it stays at the pinned CPU build unless ``--torch VERSION`` says
otherwise, because newer torch releases on PyPI are multi-GB CUDA builds and the GPU machines bring
their own torch.  When the newest set fails, keep the pin, fix the code or record the conflict in
``refusalguard_kernels/integration/versions.py`` (a clear error where the feature is used) and, for a
combination that breaks the package as a whole, exclude it in pyproject.toml's ranges.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONSTRAINTS = ROOT / "constraints.txt"
PROJECT = "refusalguard_kernels"
# The project itself is not pinned; pip, setuptools and wheel are (CI builds the package with
# --no-build-isolation from these, so a new setuptools cannot break the build either).
NOT_PINNED = {"refusalguard-kernels"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_constraints(path: Path = CONSTRAINTS) -> dict[str, str]:
    """``{canonical name: version}`` from a constraints file of ``name==version`` lines."""
    pins = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", line)
        if match is None:
            raise ValueError(f"{path}:{number}: expected 'name==version', got {raw!r}")
        pins[canonical(match[1])] = match[2]
    return pins


def installed(python: str | None = None) -> dict[str, str]:
    """``{canonical name: version}`` of the distributions an interpreter (default: this one) sees.

    Asked of a fresh interpreter (``-I``: no PYTHONPATH, no cwd), not of this process: once something
    imports setuptools, its vendored packages join sys.path and would look installed."""
    import json

    code = (
        "import json; from importlib import metadata; "
        "print(json.dumps({d.metadata['Name']: d.version for d in metadata.distributions()}))"
    )
    out = subprocess.run([python or sys.executable, "-I", "-c", code], check=True, capture_output=True, text=True)
    dists = {canonical(name): version for name, version in json.loads(out.stdout).items()}
    return {name: version for name, version in dists.items() if name not in NOT_PINNED}


def strip_local(version: str) -> str:
    """``2.13.0+cpu`` -> ``2.13.0``: the pin names the release; the local CPU wheel satisfies it."""
    return version.split("+", 1)[0]


def render(pins: dict[str, str], note: str) -> str:
    header = [
        "# The tested dependency set: CI and the README's commands install exactly these versions",
        "# (pip install -c constraints.txt ...). Written by `python scripts/deps.py latest --write` after the",
        "# whole test suite passed on them; edit by hand only to hold one package back (say why here).",
        f"# {note}",
    ]
    lines = [f"{name}=={strip_local(version)}" for name, version in sorted(pins.items())]
    return "\n".join(header + lines) + "\n"


def write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


def diff(pinned: dict[str, str], found: dict[str, str]) -> list[tuple[str, str, str]]:
    """(name, pinned, found) for every package whose version differs, is new, or is gone."""
    rows = []
    for name in sorted(set(pinned) | set(found)):
        old, new = pinned.get(name, "-"), strip_local(found.get(name, "-"))
        if old != new:
            rows.append((name, old, new))
    return rows


def print_table(rows: list[tuple[str, str, str]], left: str, right: str) -> None:
    if not rows:
        print("  (no differences)")
        return
    width = max(len(row[0]) for row in rows)
    print(f"  {'package':<{width}}  {left:>14}  {right:>14}")
    for name, old, new in rows:
        print(f"  {name:<{width}}  {old:>14}  {new:>14}")


def cmd_check(args: argparse.Namespace) -> int:
    rows = diff(read_constraints(), installed())
    print(f"this environment against {CONSTRAINTS.name}:")
    print_table(rows, "pinned", "installed")
    return 1 if rows else 0


def cmd_freeze(args: argparse.Namespace) -> int:
    sys.stdout.write(render(installed(), f"Frozen from {sys.executable}."))
    return 0


def _conflict_objects(found: dict[str, str]) -> list:
    # versions.py needs only the standard library: load the file itself, not the package (which imports torch).
    import importlib.util

    spec = importlib.util.spec_from_file_location("_rg_versions", ROOT / PROJECT / "versions.py")
    versions = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = versions  # dataclasses look the module up while building the class
    spec.loader.exec_module(versions)
    return versions.active_conflicts(found)


def known_conflicts(found: dict[str, str]) -> list[str]:
    """Messages of the feature-level conflicts (refusalguard_kernels/versions.py) a set hits."""
    return [conflict.message(found) for conflict in _conflict_objects(found)]


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, **kwargs)


def _fresh_venv(env_dir: Path, torch_version: str) -> tuple[str, dict]:
    """A new venv with current pip/setuptools/wheel and the given torch; (python, environment for pip)."""
    if env_dir.exists():
        import shutil

        shutil.rmtree(env_dir)
    venv.create(env_dir, with_pip=True)
    python = str(env_dir / "bin" / "python")
    env = {key: value for key, value in os.environ.items() if key not in ("PIP_CONSTRAINT", "PIP_REQUIRE_VIRTUALENV")}
    run([python, "-m", "pip", "install", "-q", "--upgrade", "pip", "setuptools", "wheel"], check=True, env=env)
    run([python, "-m", "pip", "install", "-q", f"torch=={torch_version}"], check=True, env=env)
    return python, env


def _suite(python: str, env: dict, pytest_args: list[str], label: str) -> int:
    test = run([python, "-m", "pytest", "tests", "-q", *pytest_args], cwd=ROOT, env={**env, "CI": "true"})
    verdict = "PASSED" if test.returncode == 0 else f"FAILED (pytest exit {test.returncode})"
    print(f"\nthe suite on {label}: {verdict}")
    return test.returncode


def lower_bounds() -> dict[str, str]:
    """``{name: version}``: the ``>=`` floor of every direct dependency in pyproject.toml (extras included)."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    texts = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        texts += [text for text in extra if not text.startswith(PROJECT)]
    floors = {}
    for text in texts:
        match = re.match(r"\s*([A-Za-z0-9._-]+)\s*(?:\[[^]]*\])?\s*([^;]*)", text)
        name, spec = canonical(match[1]), match[2]
        floor = re.search(r">=\s*([0-9][^,\s]*)", spec)
        exact = re.search(r"==\s*([0-9][^,\s]*)", spec)
        if exact or floor:
            floors[name] = (exact or floor)[1]
    return floors


def cmd_latest(args: argparse.Namespace) -> int:
    pinned = read_constraints()
    torch_version = args.torch or pinned["torch"]
    python, env = _fresh_venv(
        Path(args.venv or Path(tempfile.gettempdir()) / "refusalguard-latest-venv"), torch_version
    )
    # No constraints: the newest release of everything pyproject.toml's ranges admit (torch aside).
    run(
        [python, "-m", "pip", "install", "-q", "--upgrade", "--upgrade-strategy", "eager", "--no-build-isolation"]
        + ["-e", f"{ROOT}[dev]", f"torch=={torch_version}"],
        check=True,
        env=env,
    )
    found = installed(python)
    print(f"\nnewest releases against {CONSTRAINTS.name}:")
    print_table(diff(pinned, found), "pinned", "newest")
    returncode = _suite(python, env, args.pytest_args, "the newest releases")
    conflicts = known_conflicts(found)
    for message in conflicts:
        print(f"known conflict in the newest set (a feature is skipped or fails): {message}")
    if args.write:
        if returncode != 0:
            print(f"{CONSTRAINTS.name} left as it is: the suite did not pass on the newest set.")
        elif conflicts:
            print(
                f"{CONSTRAINTS.name} left as it is: the newest set hits a known conflict; hold a package back by hand."
            )
        else:
            stamp = datetime.date.today().isoformat()
            note = (
                f"{stamp}: Python {platform.python_version()}, {platform.system()} {platform.machine()}, "
                f"torch {found['torch']}; `python -m pytest tests -q` passed on this set."
            )
            write_atomic(CONSTRAINTS, render(found, note))
            print(f"wrote {CONSTRAINTS}: commit it with a CHANGELOG line naming what moved.")
    return returncode


#: The dependencies whose floors `lowest` installs exactly: the ones whose APIs the package uses in depth.
#: The rest (tokenizers, safetensors, tqdm, ...) are resolved by pip inside pyproject.toml's ranges; torch stays
#: at the pinned CPU build (older torch releases on PyPI are multi-GB CUDA builds).
FLOORS_TESTED = ("transformers", "peft", "accelerate", "datasets", "trl", "triton")


def cmd_lowest(args: argparse.Namespace) -> int:
    """The oldest releases pyproject.toml admits for FLOORS_TESTED, the rest resolved by pip; the whole suite."""
    pinned = read_constraints()
    torch_version = args.torch or pinned["torch"]
    floors = {name: version for name, version in lower_bounds().items() if name in FLOORS_TESTED}
    python, env = _fresh_venv(
        Path(args.venv or Path(tempfile.gettempdir()) / "refusalguard-lowest-venv"), torch_version
    )
    run(
        [python, "-m", "pip", "install", "-q", "--no-build-isolation", "-e", f"{ROOT}[dev]", f"torch=={torch_version}"]
        + [f"{name}=={version}" for name, version in sorted(floors.items())],
        check=True,
        env=env,
    )
    found = installed(python)
    # A known feature-level conflict in the lowest set is already explained (versions.py): hold its first package
    # below the conflicting range, so the suite tests the floors rather than the conflict, and say so.
    holds = [f"{c.package}<{c.versions[2:]}" for c in _conflict_objects(found) if c.versions.startswith(">=")]
    if holds:
        print(f"holding back, to avoid known conflicts: {', '.join(holds)}")
        run([python, "-m", "pip", "install", "-q", *holds], check=True, env=env)
        found = installed(python)
    print(f"\nlowest admitted releases against {CONSTRAINTS.name}:")
    print_table(diff(pinned, found), "pinned", "lowest")
    return _suite(python, env, args.pytest_args, "the lowest admitted releases")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("check", help="compare this environment with constraints.txt (exit 1 on a difference)")
    sub.add_parser("freeze", help="print this environment in constraints.txt's format")
    latest = sub.add_parser("latest", help="run the suite against the newest releases in a fresh venv")
    latest.add_argument("--venv", help="where to build the venv (default: a fixed folder under the temp dir)")
    latest.add_argument("--torch", help="torch version to install (default: the pinned one)")
    latest.add_argument(
        "--write", action="store_true", help="on a pass with no known conflict, write the new set to constraints.txt"
    )
    latest.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    lowest = sub.add_parser("lowest", help="run the suite against pyproject.toml's lower bounds in a fresh venv")
    lowest.add_argument("--venv", help="where to build the venv (default: a fixed folder under the temp dir)")
    lowest.add_argument("--torch", help="torch version to install (default: the pinned one)")
    lowest.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = parser.parse_args(argv)
    commands = {"check": cmd_check, "freeze": cmd_freeze, "latest": cmd_latest, "lowest": cmd_lowest}
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
