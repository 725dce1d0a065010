"""Harmful / harmless prompt sets: loading them from wherever a user keeps them.

``load_prompts`` accepts a list of strings, a file (``.txt`` one prompt a line,
``.json`` a list of strings or of objects, ``.jsonl`` one string or object a line,
``.csv`` with a header), ``"builtin:harmful"`` / ``"builtin:harmless"`` (the small
sets this package ships for demos and tests), or a Hugging Face dataset name with
the column that holds the prompts.

The built-in sets (``refusalguard_kernels/integration/data/prompts``) were written for this
project: 80 short, generic requests a safety-aligned assistant should refuse (no
actionable details), and 80 everyday requests of similar length and shape
(``harmful`` / ``harmless``: what ``extract`` builds bases from).  ``harmful_eval`` /
``harmless_eval`` are 50 + 50 more, held out for evaluation (``refusalguard eval``'s
defaults): other topics and phrasings, no prompt shared with the extraction sets and none
close to one (word-set Jaccard similarity below 0.5 to every extraction prompt; tested).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

__all__ = ["load_prompts", "builtin_prompts", "BUILTIN_SETS"]

#: names accepted by ``builtin_prompts`` and as ``"builtin:<name>"`` by ``load_prompts``.
BUILTIN_SETS = ("harmful", "harmless", "harmful_eval", "harmless_eval")

_BUILTIN_PREFIX = "builtin:"
_FILE_SUFFIXES = (".txt", ".json", ".jsonl", ".csv")


def builtin_prompts(name: str) -> list[str]:
    """The built-in prompt set ``name`` ("harmful", "harmless", or the held-out evaluation sets
    "harmful_eval", "harmless_eval") as a new list."""
    if name not in BUILTIN_SETS:
        raise ValueError(f"unknown built-in prompt set {name!r}; choose one of {', '.join(BUILTIN_SETS)}")
    text = (
        resources.files("refusalguard_kernels.integration")
        .joinpath("data", "prompts", f"{name}.json")
        .read_text("utf-8")
    )
    return _clean(json.loads(text), f"builtin:{name}")


def load_prompts(
    source: str | os.PathLike | Sequence[str],
    *,
    column: str | None = None,
    split: str = "train",
    limit: int | None = None,
) -> list[str]:
    """Prompts from ``source`` as a list of non-empty, stripped strings.

    Args:
        source: a list of strings; a path to a ``.txt`` (one prompt a line, blank lines
            skipped), ``.json`` (a list of strings, or a list of objects with ``column``),
            ``.jsonl`` (one string or object a line) or ``.csv`` (needs ``column``) file;
            ``"builtin:harmful"`` / ``"builtin:harmless"``; or a Hugging Face dataset name
            or local dataset folder (needs ``column``), loaded with ``datasets.load_dataset``.
        column: the field holding the prompt text (objects in JSON/JSONL, CSV, datasets).
        split: the dataset split to read (datasets only).
        limit: keep only the first ``limit`` prompts.

    Raises ValueError (with what to change) for an empty result, a non-string entry, a
    missing column, or a bad ``limit``; FileNotFoundError for a file path that does not exist.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int or None; got {limit!r}")
    if isinstance(source, (str, os.PathLike)):
        prompts = _load_source(os.fspath(source), column=column, split=split)
        where = os.fspath(source)
    elif isinstance(source, Sequence):
        prompts = list(source)
        where = "the prompt list"
    else:
        raise TypeError(
            f"source must be a list of strings, a file path, 'builtin:harmful'/'builtin:harmless' or a dataset name; "
            f"got {type(source).__name__}"
        )
    prompts = _clean(prompts, where)
    return prompts if limit is None else prompts[:limit]


def _clean(prompts: list, where: str) -> list[str]:
    out = []
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise ValueError(f"prompt {i} from {where} is a {type(prompt).__name__}, not a string")
        prompt = prompt.strip()
        if not prompt:
            raise ValueError(f"prompt {i} from {where} is empty; remove empty entries")
        out.append(prompt)
    if not out:
        raise ValueError(f"no prompts found in {where}; give at least one prompt")
    return out


def _load_source(source: str, *, column: str | None, split: str) -> list:
    if source.startswith(_BUILTIN_PREFIX):
        return builtin_prompts(source[len(_BUILTIN_PREFIX) :])
    path = Path(source)
    if path.is_file():
        return _load_file(path, column)
    if path.suffix.lower() in _FILE_SUFFIXES:
        raise FileNotFoundError(f"prompt file {source!r} does not exist")
    return _load_dataset(source, column=column, split=split)


def _pick(record, column: str | None, where: str):
    if isinstance(record, str):
        return record
    if isinstance(record, dict):
        if column is None:
            raise ValueError(
                f"{where} holds objects with keys {sorted(record)}; pass column= to say which one holds the prompt"
            )
        if column not in record:
            raise ValueError(f"{where}: an entry has no field {column!r} (it has {sorted(record)}); check column=")
        return record[column]
    raise ValueError(f"{where}: entries must be strings or objects; got {type(record).__name__}")


def _load_file(path: Path, column: str | None) -> list:
    suffix = path.suffix.lower()
    where = str(path)
    if suffix == ".json":
        data = json.loads(path.read_text("utf-8"))
        if isinstance(data, dict) and column is not None and isinstance(data.get(column), list):
            data = data[column]
        if not isinstance(data, list):
            raise ValueError(f"{where} must hold a JSON list of prompts (strings or objects with column=)")
        return [_pick(record, column, where) for record in data]
    if suffix == ".jsonl":
        records = []
        for lineno, line in enumerate(path.read_text("utf-8").splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{where} line {lineno} is not valid JSON: {exc}") from None
        return [_pick(record, column, where) for record in records]
    if suffix == ".csv":
        if column is None:
            raise ValueError(f"{where} is a CSV file; pass column= with the header of the prompt column")
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or column not in reader.fieldnames:
                raise ValueError(f"{where} has no column {column!r} (columns: {reader.fieldnames}); check column=")
            return [row[column] for row in reader]
    # .txt and anything else: one prompt a line.
    return [line for line in path.read_text("utf-8").splitlines() if line.strip()]


def _load_dataset(name: str, *, column: str | None, split: str) -> list:
    if column is None:
        raise ValueError(
            f"{name!r} is not a file or 'builtin:harmful'/'builtin:harmless'; if it is a Hugging Face dataset, "
            "pass column= with the field that holds the prompts"
        )
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - datasets is in the train extra
        raise ImportError(
            "loading prompts from a dataset needs `datasets`: pip install 'refusalguard_kernels[train]'"
        ) from exc
    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as exc:
        raise ValueError(f"could not load dataset {name!r} (split {split!r}): {exc}") from exc
    if column not in dataset.column_names:
        raise ValueError(f"dataset {name!r} has no column {column!r}; its columns are {dataset.column_names}")
    return list(dataset[column])
