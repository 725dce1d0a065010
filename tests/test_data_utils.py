"""Loading and tokenizing training data: files, fields, chat template, prompt boundary, truncation."""

from __future__ import annotations

import json

import datasets
import pytest
from tiny_models import tiny_tokenizer

from refusalguard_kernels.training.data_utils import load_training_dataset, resolve_fields, tokenize_dataset

ROWS = [
    {"prompt": "how do i bake bread ?", "response": "mix flour and water then bake it"},
    {"prompt": "tell me a story about a dog", "response": "a brave little dog sat on the mat"},
    {"prompt": "what is the capital of france ?", "response": "the capital of france is paris"},
]


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "hf_datasets"))


@pytest.fixture(scope="module")
def chat_tokenizer():
    return tiny_tokenizer(chat_template=True)


@pytest.fixture(scope="module")
def plain_tokenizer():
    return tiny_tokenizer(chat_template=False)


# ---------------------------------------------------------------------- loading


def test_loads_local_files_of_each_kind(tmp_path):
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (tmp_path / "d.json").write_text(json.dumps(ROWS))
    (tmp_path / "d.csv").write_text("prompt,response\n" + "".join(f"{r['prompt']},{r['response']}\n" for r in ROWS))
    (tmp_path / "d.txt").write_text("first line of text\nsecond line\n")
    for name in ("d.jsonl", "d.json", "d.csv"):
        ds = load_training_dataset(tmp_path / name)
        assert ds.column_names == ["prompt", "response"] and ds[2]["response"] == ROWS[2]["response"]
    text = load_training_dataset(str(tmp_path / "d.txt"))
    assert text.column_names == ["text"] and text["text"] == ["first line of text", "second line"]
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    assert load_training_dataset(tmp_path / "saved")[1] == ROWS[1]
    in_memory = datasets.Dataset.from_list(ROWS)
    assert load_training_dataset(in_memory) is in_memory


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "absent.jsonl"
    with pytest.raises(FileNotFoundError, match="absent.jsonl"):
        load_training_dataset(missing)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_training_dataset("./no/such/data.csv")
    (tmp_path / "notes.xml").write_text("<a/>")
    with pytest.raises(ValueError, match="unknown file type '.xml'"):
        load_training_dataset(tmp_path / "notes.xml")


# ---------------------------------------------------------------------- fields


def test_resolve_fields_recognises_common_names_and_lists_columns():
    assert resolve_fields(["prompt", "response", "id"]) == (None, "prompt", "response")
    assert resolve_fields(["prompt", "completion"]) == (None, "prompt", "completion")
    assert resolve_fields(["instruction", "output"]) == (None, "instruction", "output")
    assert resolve_fields(["text", "id"]) == ("text", None, None)
    assert resolve_fields(["body"], text_field="body") == ("body", None, None)
    with pytest.raises(ValueError, match=r"no text field 'body'; its columns are \['prompt', 'response'\]"):
        resolve_fields(["prompt", "response"], text_field="body")
    with pytest.raises(ValueError, match=r"no prompt field 'q'.*\['question', 'answer'\]"):
        resolve_fields(["question", "answer"], prompt_field="q", response_field="answer")
    with pytest.raises(ValueError, match=r"columns are \['a', 'b'\]"):
        resolve_fields(["a", "b"])
    with pytest.raises(ValueError, match="not both"):
        resolve_fields(
            ["text", "prompt", "response"], text_field="text", prompt_field="prompt", response_field="response"
        )
    with pytest.raises(ValueError, match="response field is missing"):
        resolve_fields(["prompt", "response"], prompt_field="prompt")


# ---------------------------------------------------------------------- tokenizing


def test_pairs_with_chat_template_mask_the_prompt(chat_tokenizer):
    ds = tokenize_dataset(datasets.Dataset.from_list(ROWS), chat_tokenizer, show_progress=False)
    assert ds.column_names == ["input_ids", "attention_mask", "labels", "prompt_lengths"]
    for row, source in zip(ds, ROWS):
        prompt_text = chat_tokenizer.apply_chat_template(
            [{"role": "user", "content": source["prompt"]}], tokenize=False, add_generation_prompt=True
        )
        prompt_ids = chat_tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        n = row["prompt_lengths"]
        assert n == len(prompt_ids) and row["input_ids"][:n] == prompt_ids
        assert prompt_ids[0] == chat_tokenizer.bos_token_id  # from the template, not doubled
        assert row["labels"][:n] == [-100] * n
        assert row["labels"][n:] == row["input_ids"][n:]
        assert row["input_ids"][-1] == chat_tokenizer.eos_token_id  # the template's end of turn
        assert row["input_ids"].count(chat_tokenizer.eos_token_id) == 1
        response_ids = chat_tokenizer(source["response"], add_special_tokens=False)["input_ids"]
        assert row["input_ids"][n:] == response_ids + [chat_tokenizer.eos_token_id]
        assert row["attention_mask"] == [1] * len(row["input_ids"])


def test_pairs_without_chat_template_append_eos(plain_tokenizer):
    ds = tokenize_dataset(datasets.Dataset.from_list(ROWS), plain_tokenizer, show_progress=False)
    row = ds[0]
    prompt_ids = plain_tokenizer(ROWS[0]["prompt"])["input_ids"]
    response_ids = plain_tokenizer(ROWS[0]["response"], add_special_tokens=False)["input_ids"]
    assert row["input_ids"] == prompt_ids + response_ids + [plain_tokenizer.eos_token_id]
    assert row["prompt_lengths"] == len(prompt_ids)
    assert row["labels"] == [-100] * len(prompt_ids) + response_ids + [plain_tokenizer.eos_token_id]


def test_text_mode_trains_on_every_token(chat_tokenizer):
    raw = datasets.Dataset.from_list([{"text": "the cat sat on the mat"}, {"text": ""}, {"text": "water boils"}])
    with pytest.warns(UserWarning, match="dropped 1 of 3"):
        ds = tokenize_dataset(raw, chat_tokenizer, show_progress=False)
    assert ds.column_names == ["input_ids", "attention_mask", "labels"]
    assert ds[0]["labels"] == ds[0]["input_ids"]
    assert ds[0]["input_ids"] == chat_tokenizer("the cat sat on the mat")["input_ids"] + [chat_tokenizer.eos_token_id]


def test_truncation_and_prompts_that_fill_max_length(plain_tokenizer):
    long_prompt = {"prompt": "tell me a story about a brave little dog and the sea", "response": "no"}
    raw = datasets.Dataset.from_list(ROWS + [long_prompt])
    with pytest.warns(UserWarning, match="dropped 1 of 4"):
        ds = tokenize_dataset(raw, plain_tokenizer, max_length=8, show_progress=False)
    assert len(ds) == 3
    for row in ds:
        assert len(row["input_ids"]) <= 8 and row["prompt_lengths"] < len(row["input_ids"])
    with pytest.raises(ValueError, match="no trainable examples"):
        tokenize_dataset(datasets.Dataset.from_list([long_prompt]), plain_tokenizer, max_length=4, show_progress=False)
    with pytest.raises(ValueError, match="max_length"):
        tokenize_dataset(raw, plain_tokenizer, max_length=1)


def test_forcing_a_missing_chat_template_is_an_error(plain_tokenizer):
    with pytest.raises(ValueError, match="no chat template"):
        tokenize_dataset(datasets.Dataset.from_list(ROWS), plain_tokenizer, chat_template=True)
