"""Training data: loading a dataset and tokenizing it for causal-LM fine-tuning.

``load_training_dataset`` reads a Hugging Face dataset name, a ``save_to_disk`` folder,
or a local ``.json`` / ``.jsonl`` / ``.csv`` / ``.txt`` / ``.parquet`` file (through
``datasets.load_dataset``, so the result is Arrow-backed, memory-mapped and cached).

``tokenize_dataset`` turns it into ``input_ids`` / ``attention_mask`` / ``labels`` rows:

* text mode (``text_field``): the whole text is trained on (``labels == input_ids``);
* prompt/response mode (``prompt_field`` + ``response_field``): the prompt is formatted
  as a user turn with the tokenizer's chat template when it has one (else used as is),
  the response follows; ``labels`` are -100 on the prompt tokens and ``prompt_lengths``
  holds the number of prompt tokens, the boundary the guard's ``positions="prompt"`` /
  ``"response"`` / ``"fN+lM"`` rules need.

``tokenize_chats`` handles chat data (a column of ``[{"role", "content"}, ...]`` lists): each
conversation is rendered with the tokenizer's chat template and only the assistant turns are
trained on (``labels`` -100 elsewhere), which is also what ``positions="response"`` guards.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from ..integration.model_utils import datasets_progress

__all__ = [
    "DATA_FILE_SUFFIXES",
    "FIELD_PAIRS",
    "load_training_dataset",
    "resolve_fields",
    "tokenize_dataset",
    "tokenize_chats",
    "ChatTemplateError",
]

IGNORE_INDEX = -100
#: local file types and the ``datasets`` builder that reads each.
DATA_FILE_SUFFIXES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".txt": "text", ".parquet": "parquet"}
#: (prompt, response) column names recognised when no field is given, in order.
FIELD_PAIRS = (
    ("prompt", "response"),
    ("prompt", "completion"),
    ("instruction", "output"),
    ("question", "answer"),
    ("input", "output"),
)


def _looks_like_path(source: str) -> bool:
    return (
        Path(source).suffix.lower() in DATA_FILE_SUFFIXES
        or source.startswith(("./", "../", "/", "~", ".\\"))
        or os.path.isabs(source)
    )


def load_training_dataset(source, *, split: str = "train", config_name: str | None = None):
    """A ``datasets.Dataset`` from ``source``.

    Args:
        source: a ``datasets.Dataset`` (returned as is); a local file (``.json`` /
            ``.jsonl``: one object per row, ``.csv`` with a header, ``.txt``: one example
            a line in a ``text`` column, ``.parquet``); a folder written by
            ``Dataset.save_to_disk``; a folder of data files; or a Hugging Face Hub dataset
            name (``"org/name"``).
        split: the split to read (Hub datasets and data folders; a single file is "train").
        config_name: the dataset configuration (subset) of a Hub dataset.

    Raises FileNotFoundError naming the path for a missing local file, ValueError for a
    dataset that cannot be loaded (with the loader's reason).
    """
    import datasets

    if isinstance(source, datasets.Dataset):
        return source
    if isinstance(source, datasets.DatasetDict):
        if split not in source:
            raise ValueError(f"the DatasetDict has no split {split!r}; its splits are {list(source)}")
        return source[split]
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            f"dataset source must be a path, a dataset name or a datasets.Dataset; got {type(source).__name__}"
        )
    source = os.fspath(source)
    path = Path(source).expanduser()
    try:
        if path.is_file():
            builder = DATA_FILE_SUFFIXES.get(path.suffix.lower())
            if builder is None:
                raise ValueError(
                    f"cannot read {source!r}: unknown file type {path.suffix!r}; use one of "
                    f"{', '.join(sorted(DATA_FILE_SUFFIXES))} or a Hugging Face dataset name"
                )
            return datasets.load_dataset(builder, data_files=str(path), split="train")
        if path.is_dir():
            if (path / "dataset_info.json").is_file() or (path / "state.json").is_file():
                loaded = datasets.load_from_disk(str(path))
                return load_training_dataset(loaded, split=split)
            return datasets.load_dataset(str(path), config_name, split=split)
        if _looks_like_path(source):
            raise FileNotFoundError(f"dataset file {source!r} does not exist (looked at {str(path.absolute())!r})")
        return datasets.load_dataset(source, config_name, split=split)
    except (FileNotFoundError, ValueError, TypeError) as exc:
        if isinstance(exc, FileNotFoundError) and _looks_like_path(source):
            raise
        if isinstance(exc, ValueError) and str(exc).startswith("cannot read"):
            raise
        raise ValueError(_load_error(source, split, exc)) from exc
    except Exception as exc:  # network errors, hub errors, malformed files: all need the same message
        raise ValueError(_load_error(source, split, exc)) from exc


def _load_error(source: str, split: str, exc: Exception) -> str:
    return (
        f"could not load dataset {source!r} (split {split!r}): {type(exc).__name__}: {exc}. "
        f"Give a local {'/'.join(sorted(DATA_FILE_SUFFIXES))} file, a save_to_disk folder, "
        "or a Hugging Face dataset name that is reachable from here"
    )


def resolve_fields(
    columns: list[str],
    *,
    text_field: str | None = None,
    prompt_field: str | None = None,
    response_field: str | None = None,
) -> tuple[str | None, str | None, str | None]:
    """(text_field, prompt_field, response_field) with exactly one mode set.

    With no field given: the first of ``FIELD_PAIRS`` present in ``columns``, else ``"text"``.
    A field that is not a column is a ValueError listing the columns.
    """
    columns = list(columns)
    if text_field is not None and (prompt_field is not None or response_field is not None):
        raise ValueError("give either a text field or prompt and response fields, not both")
    if (prompt_field is None) != (response_field is None):
        missing = "response" if response_field is None else "prompt"
        raise ValueError(f"prompt/response mode needs both fields; the {missing} field is missing")
    if text_field is None and prompt_field is None:
        for prompt, response in FIELD_PAIRS:
            if prompt in columns and response in columns:
                prompt_field, response_field = prompt, response
                break
        else:
            if "text" not in columns:
                raise ValueError(
                    f"cannot tell which fields to train on: the dataset's columns are {columns}; name a text field "
                    "or a prompt field and a response field"
                )
            text_field = "text"
    for role, name in (("text", text_field), ("prompt", prompt_field), ("response", response_field)):
        if name is not None and name not in columns:
            raise ValueError(f"the dataset has no {role} field {name!r}; its columns are {columns}")
    return text_field, prompt_field, response_field


def _chat_split(tokenizer, prompt: str, response: str) -> tuple[str, str, bool]:
    """(prompt text, response text, whether the response text already ends the turn)."""
    user = [{"role": "user", "content": prompt}]
    prompt_text = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": response}], tokenize=False)
    if isinstance(full_text, str) and full_text.startswith(prompt_text):
        return prompt_text, full_text[len(prompt_text) :], True
    # Templates whose full conversation does not extend the generation prompt: keep the
    # generation prompt and append the raw response (the EOS is added by the caller).
    return prompt_text, response, False


def tokenize_dataset(
    dataset,
    tokenizer,
    *,
    text_field: str | None = None,
    prompt_field: str | None = None,
    response_field: str | None = None,
    max_length: int = 512,
    chat_template: bool | None = None,
    add_eos: bool = True,
    batch_size: int = 1000,
    show_progress: bool = True,
):
    """Tokenize ``dataset`` for causal-LM training.

    Returns a dataset with only ``input_ids``, ``attention_mask``, ``labels`` and, in
    prompt/response mode, ``prompt_lengths`` (prompt tokens counted from the first token).

    Args:
        text_field / prompt_field + response_field: which columns to use (see
            ``resolve_fields``; with none given, common names are recognised).
        max_length: longer examples are cut on the right; an example whose prompt alone
            fills ``max_length`` has nothing left to learn and is dropped (with a warning).
        chat_template: format prompt/response pairs with the tokenizer's chat template;
            None = when the tokenizer has one.  Text mode never uses it.
        add_eos: end each example with the EOS token (when the chat template did not).
        batch_size: rows per tokenizer call inside ``datasets.map``.
        show_progress: the ``datasets.map`` progress bar.
    """
    from ..integration.model_utils import has_chat_template

    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an int >= 2; got {max_length!r}")
    text_field, prompt_field, response_field = resolve_fields(
        dataset.column_names, text_field=text_field, prompt_field=prompt_field, response_field=response_field
    )
    use_template = has_chat_template(tokenizer) if chat_template is None else bool(chat_template)
    if use_template and not has_chat_template(tokenizer):
        raise ValueError("chat_template=True but the tokenizer has no chat template; pass chat_template=None or False")
    eos = tokenizer.eos_token_id if add_eos else None

    def encode_text(batch):
        out = {"input_ids": [], "attention_mask": [], "labels": []}
        texts = [t if isinstance(t, str) else "" for t in batch[text_field]]
        for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]:
            ids = list(ids)
            if not ids:
                continue
            if eos is not None and ids[-1] != eos:
                ids.append(eos)
            ids = ids[:max_length]
            if len(ids) < 2:  # one token gives no next-token target
                continue
            out["input_ids"].append(ids)
            out["attention_mask"].append([1] * len(ids))
            out["labels"].append(list(ids))
        return out

    def encode_pairs(batch):
        out = {"input_ids": [], "attention_mask": [], "labels": [], "prompt_lengths": []}
        prompts, responses, ends = [], [], []
        for prompt, response in zip(batch[prompt_field], batch[response_field]):
            if not isinstance(prompt, str) or not isinstance(response, str) or not response.strip():
                prompts.append(None)
                responses.append(None)
                ends.append(True)
                continue
            if use_template:
                prompt_text, response_text, ended = _chat_split(tokenizer, prompt, response)
            else:
                prompt_text, response_text, ended = prompt, response, False
            prompts.append(prompt_text)
            responses.append(response_text)
            ends.append(ended)
        keep = [i for i, p in enumerate(prompts) if p is not None]
        if not keep:
            return out
        # A chat-templated prompt already carries BOS and the role markers.
        prompt_ids = tokenizer([prompts[i] for i in keep], add_special_tokens=not use_template)["input_ids"]
        response_ids = tokenizer([responses[i] for i in keep], add_special_tokens=False)["input_ids"]
        for i, p_ids, r_ids in zip(keep, prompt_ids, response_ids):
            p_ids, r_ids = list(p_ids), list(r_ids)
            if eos is not None and not ends[i] and (not r_ids or r_ids[-1] != eos):
                r_ids.append(eos)
            ids = (p_ids + r_ids)[:max_length]
            n_prompt = min(len(p_ids), max_length)
            if n_prompt >= len(ids) or not p_ids:
                continue
            out["input_ids"].append(ids)
            out["attention_mask"].append([1] * len(ids))
            out["labels"].append([IGNORE_INDEX] * n_prompt + ids[n_prompt:])
            out["prompt_lengths"].append(n_prompt)
        return out

    with datasets_progress(show_progress):
        tokenized = dataset.map(
            encode_text if text_field is not None else encode_pairs,
            batched=True,
            batch_size=batch_size,
            remove_columns=dataset.column_names,
            desc="tokenizing",
        )
    dropped = len(dataset) - len(tokenized)
    what = f"field {text_field!r}" if text_field is not None else f"fields {prompt_field!r}/{response_field!r}"
    if len(tokenized) == 0:
        raise ValueError(
            f"no trainable examples: all {len(dataset)} rows are empty in {what} or their prompt fills "
            f"max_length={max_length}; check the fields or raise max_length"
        )
    if dropped:
        warnings.warn(
            f"dropped {dropped} of {len(dataset)} examples: empty {what}, or a prompt that fills "
            f"max_length={max_length} (nothing left to train on)",
            stacklevel=2,
        )
    return tokenized


class ChatTemplateError(ValueError):
    """The tokenizer's chat template cannot tell the assistant turns apart (or there is none)."""


def _check_messages(messages, row: int, field: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise ValueError(
            f"row {row}: {field!r} must be a non-empty list of {{'role': ..., 'content': ...}} messages; "
            f"got {type(messages).__name__}"
        )
    for message in messages:
        if not isinstance(message, dict) or "role" not in message or not isinstance(message.get("content"), str):
            raise ValueError(
                f"row {row}: every message in {field!r} needs a 'role' and a string 'content'; got {message!r}"
            )
    return [{"role": message["role"], "content": message["content"]} for message in messages]


def _assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """(the rendered conversation, [(start, end) character spans of each assistant turn])."""

    def render(turns, generation_prompt):
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)

    full = render(messages, False)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        # The assistant turn is what the template adds after the generation prompt: rendering
        # the conversation up to this turn must extend the rendering up to the one before.
        before = render(messages[:index], True) if index else ""
        through = render(messages[: index + 1], False)
        if (
            not (through.startswith(before) and full.startswith(through))
            or message["content"].strip() not in through[len(before) :]
        ):
            raise ChatTemplateError(
                "the tokenizer's chat template does not render a conversation as the concatenation of its turns "
                f"(turn {index} changes what came before it, as templates that drop earlier reasoning do), so the "
                "assistant tokens cannot be told apart; give prompt/response fields instead of a messages field"
            )
        spans.append((len(before), len(through)))
    return full, spans


def tokenize_chats(
    dataset,
    tokenizer,
    *,
    messages_field: str = "messages",
    max_length: int = 512,
    batch_size: int = 100,
    show_progress: bool = True,
):
    """Tokenize chat data for assistant-only training with the tokenizer's chat template.

    Each row's ``messages_field`` is a list of ``{"role", "content"}`` messages.  Returns
    ``input_ids`` / ``attention_mask`` / ``labels`` rows whose labels are the tokens of every
    assistant turn (as the template renders it, end-of-turn tokens included) and -100 on the
    rest (system and user turns, role headers).  Longer conversations are cut to
    ``max_length``; a row left with no assistant token is dropped (with a warning).

    Raises ``ChatTemplateError`` when the tokenizer has no chat template or its template does
    not render a conversation as the concatenation of its turns.
    """
    from ..integration.model_utils import has_chat_template

    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an int >= 2; got {max_length!r}")
    if messages_field not in dataset.column_names:
        raise ValueError(
            f"the dataset has no messages field {messages_field!r}; its columns are {dataset.column_names}"
        )
    if not has_chat_template(tokenizer):
        raise ChatTemplateError(
            "chat data needs the tokenizer's chat template to format the conversations, and this tokenizer has none: "
            "use the chat/instruct version of the model (or set tokenizer.chat_template), or give prompt/response "
            "fields instead"
        )

    def encode(batch, indices):
        out = {"input_ids": [], "attention_mask": [], "labels": []}
        for row, messages in zip(indices, batch[messages_field]):
            text, spans = _assistant_spans(tokenizer, _check_messages(messages, row, messages_field))
            # Segment by segment (like prompt/response pairs): the trained tokens are exactly the spans'.
            ids, labels, cursor = [], [], 0
            for start, end in [*spans, (len(text), len(text))]:
                for piece, trained in ((text[cursor:start], False), (text[start:end], True)):
                    if piece:
                        piece_ids = list(tokenizer(piece, add_special_tokens=False)["input_ids"])
                        ids += piece_ids
                        labels += piece_ids if trained else [IGNORE_INDEX] * len(piece_ids)
                cursor = end
            ids, labels = ids[:max_length], labels[:max_length]
            if len(ids) < 2 or all(label == IGNORE_INDEX for label in labels):
                continue
            out["input_ids"].append(ids)
            out["attention_mask"].append([1] * len(ids))
            out["labels"].append(labels)
        return out

    with datasets_progress(show_progress):
        tokenized = dataset.map(
            encode,
            batched=True,
            batch_size=batch_size,
            with_indices=True,
            remove_columns=dataset.column_names,
            desc="applying the chat template",
        )
    if len(tokenized) == 0:
        raise ValueError(
            f"no trainable examples: none of the {len(dataset)} conversations has an assistant turn within "
            f"max_length={max_length}"
        )
    if len(tokenized) < len(dataset):
        warnings.warn(
            f"dropped {len(dataset) - len(tokenized)} of {len(dataset)} conversations with no assistant token within "
            f"max_length={max_length}",
            stacklevel=2,
        )
    return tokenized
