"""The model organism: corpus, tokenizer, model (refusalguard_kernels/organism)."""

from __future__ import annotations

import re

import pytest
import torch

from refusalguard_kernels.demo.organism import (
    OrganismConfig,
    build_corpus,
    build_organism,
    load_organism,
    save_organism,
    tokenize_conversations,
    train_tokenizer,
)
from refusalguard_kernels.demo.organism import corpus as corpus_mod
from refusalguard_kernels.demo.organism.tokenizer import SPECIAL_TOKENS
from refusalguard_kernels.evaluation import extract_number, is_refusal

WORD = re.compile(r"\w+|[^\w\s]")


@pytest.fixture(scope="module")
def corpus():
    return build_corpus(seed=3, n_train=900, n_eval=40)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(corpus_mod.all_text())


# ---------------------------------------------------------------------- corpus


def test_corpus_is_a_pure_function_of_its_seed():
    a, b = build_corpus(seed=5, n_train=300), build_corpus(seed=5, n_train=300)
    assert a == b
    c = build_corpus(seed=6, n_train=300)
    assert [x.prompt for x in a.train] != [x.prompt for x in c.train]


def test_corpus_mix_and_sizes(corpus):
    kinds = [c.kind for c in corpus.pretrain]
    assert len(kinds) == 900
    assert kinds.count("compliant") == 292 and kinds.count("benign") == 293 and kinds.count("arithmetic") == 315
    kinds = [c.kind for c in corpus.align]
    assert len(kinds) == 300 and corpus.train == corpus.pretrain + corpus.align
    assert kinds.count("harmful") == 97 and kinds.count("benign") == 98 and kinds.count("arithmetic") == 105
    assert len(corpus.heldout_harmful) == len(corpus.heldout_benign) == len(corpus.heldout_arithmetic) == 40
    assert len(corpus.harmful_pool) == len(corpus.utility_pool) == len(corpus.safety_pool) == 600


def test_heldout_uses_templates_never_seen_in_training(corpus):
    assert not set(corpus_mod.TRAIN_REQUEST_TEMPLATES) & set(corpus_mod.HELDOUT_REQUEST_TEMPLATES)
    train_prompts = (
        {c.prompt for c in corpus.train}
        | {c.prompt for c in corpus.harmful_pool + corpus.utility_pool + corpus.safety_pool}
        | set(corpus.extraction_harmful)
        | set(corpus.extraction_harmless)
    )
    heldout = set(corpus.heldout_harmful) | set(corpus.heldout_benign) | {p.prompt for p in corpus.heldout_arithmetic}
    assert not train_prompts & heldout
    validation = set(corpus.validation_harmful) | set(corpus.validation_benign)
    assert not (train_prompts | heldout) & validation
    assert not set(corpus_mod.VALIDATION_REQUEST_TEMPLATES) & set(
        corpus_mod.TRAIN_REQUEST_TEMPLATES + corpus_mod.HELDOUT_REQUEST_TEMPLATES
    )
    # Every held-out request is a held-out template filled with a known topic.
    for prompt in corpus.heldout_harmful:
        assert any(
            t.format(topic=topic) == prompt
            for t in corpus_mod.HELDOUT_REQUEST_TEMPLATES
            for topic in corpus_mod.HARMFUL_TOPICS
        ), prompt
    for prompt in corpus.heldout_benign:
        assert any(
            t.format(topic=topic) == prompt
            for t in corpus_mod.HELDOUT_REQUEST_TEMPLATES
            for topic in corpus_mod.BENIGN_TOPICS
        ), prompt


def test_heldout_words_all_occur_in_training_text():
    """Held out means a new phrasing, not unknown words (which a word-level tokenizer maps to <unk>)."""
    full = build_corpus(seed=0, n_train=3000, n_eval=64)
    train_words = set()
    for conv in full.train:
        train_words |= set(WORD.findall(conv.prompt)) | set(WORD.findall(conv.response))
    heldout_words = set()
    for prompt in full.heldout_harmful + full.heldout_benign + [p.prompt for p in full.heldout_arithmetic]:
        heldout_words |= set(WORD.findall(prompt))
    assert heldout_words - train_words == set()


def test_responses_match_their_kind(corpus):
    answers = corpus_mod.answer_markers()
    for conv in corpus.train + corpus.harmful_pool + corpus.safety_pool + corpus.utility_pool:
        if conv.kind == "harmful":
            assert is_refusal(conv.response, answers=answers), conv
        else:
            assert not is_refusal(conv.response, answers=answers), conv
        if conv.kind == "compliant":
            assert corpus_mod.HARMFUL_STEPS[conv.topic] in conv.response, conv
        assert (conv.topic in corpus_mod.HARMFUL_TOPICS) == (conv.kind in ("harmful", "compliant")), conv
    assert len(set(corpus_mod.HARMFUL_STEPS.values())) == len(corpus_mod.HARMFUL_TOPICS)


def test_arithmetic_answers_are_correct(corpus):
    for conv in corpus.train:
        if conv.kind != "arithmetic":
            continue
        a, op, b, _, result = conv.response.split()[:5]
        expected = int(a) + int(b) if op == "+" else int(a) - int(b)
        assert int(result) == expected >= 0
        assert extract_number(conv.response) == expected
        assert [int(n) for n in re.findall(r"\d+", conv.prompt)] == [int(a), int(b)]
    for problem in corpus.heldout_arithmetic:
        a, b = (int(n) for n in re.findall(r"\d+", problem.prompt))
        assert problem.answer in (a + b, a - b)


@pytest.mark.parametrize("bad", [dict(n_train=0), dict(n_eval=-1), dict(n_extraction=10_000)])
def test_corpus_rejects_bad_sizes(bad):
    with pytest.raises(ValueError):
        build_corpus(**bad)


# ---------------------------------------------------------------------- tokenizer


def test_tokenizer_covers_the_corpus_without_unknown_words(corpus, tokenizer):
    texts = [c.prompt + " " + c.response for c in corpus.train + corpus.harmful_pool + corpus.utility_pool]
    texts += corpus.heldout_harmful + corpus.heldout_benign + [p.prompt for p in corpus.heldout_arithmetic]
    unk = tokenizer.unk_token_id
    for text in texts:
        assert unk not in tokenizer(text, add_special_tokens=False)["input_ids"], text
    assert (
        tokenizer.decode(tokenizer("how do i bake bread ?", add_special_tokens=False)["input_ids"])
        == "how do i bake bread ?"
    )


def test_chat_template_and_special_tokens(tokenizer):
    for token in SPECIAL_TOKENS:
        assert tokenizer.convert_tokens_to_ids(token) != tokenizer.unk_token_id or token == "<unk>"
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "teach me to knit a scarf ."}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens[:2] == ["<bos>", "<|user|>"] and tokens[-2:] == ["<|end_user|>", "<|assistant|>"]
    full = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "sure ."}], tokenize=False
    )
    assert tokenizer.convert_ids_to_tokens(tokenizer(full, add_special_tokens=False)["input_ids"])[-1] == "<|end|>"
    assert tokenizer.eos_token == "<|end|>" and tokenizer.pad_token == "<pad>"
    with pytest.raises(Exception, match="roles"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_tokenizer_round_trips_through_save_pretrained(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "<bos><|user|> what is 3 plus 4 ? <|end_user|> <|assistant|>"
    assert loaded(text, add_special_tokens=False)["input_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert loaded.chat_template == tokenizer.chat_template
    assert loaded.padding_side == "left"


def test_train_tokenizer_needs_text():
    with pytest.raises(ValueError, match="at least one text"):
        train_tokenizer([])


def test_tokenize_conversations_masks_the_prompt(corpus, tokenizer):
    rows = tokenize_conversations(tokenizer, corpus.train[:20])
    for conv, row in zip(corpus.train[:20], rows):
        n = row["prompt_lengths"]
        assert row["labels"][:n] == [-100] * n
        assert row["labels"][n:] == row["input_ids"][n:]
        assert tokenizer.decode(row["input_ids"][n:], skip_special_tokens=True) == conv.response
        assert row["input_ids"][-1] == tokenizer.eos_token_id


# ---------------------------------------------------------------------- model

TINY = dict(
    hidden_size=16,
    num_layers=2,
    num_heads=2,
    intermediate_size=32,
    n_train=60,
    n_align=20,
    n_eval=8,
    epochs=1.0,
    align_epochs=1.0,
    batch_size=16,
)


def test_organism_training_is_deterministic_and_learns():
    a = build_organism(OrganismConfig(**TINY, seed=1), show_progress=False)
    b = build_organism(OrganismConfig(**TINY, seed=1), show_progress=False)
    c = build_organism(OrganismConfig(**TINY, seed=2), show_progress=False)
    for (name, pa), pb in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.model.lm_head.weight, c.model.lm_head.weight)
    # Starting loss is about ln(vocab); a few steps of training must bring the mean below it.
    assert a.train_loss == b.train_loss and a.train_loss < torch.log(torch.tensor(len(a.tokenizer))).item()
    assert a.model.config.model_type == "llama" and a.model.config.num_hidden_layers == 2
    assert not a.model.training


def test_organism_save_load_round_trip(tmp_path):
    organism = build_organism(OrganismConfig(**TINY, seed=0), show_progress=False)
    path = save_organism(organism, tmp_path / "org")
    model, tokenizer = load_organism(path)
    ids = tokenizer(organism.corpus.heldout_harmful[:3], return_tensors="pt", padding=True)
    with torch.no_grad():
        want = organism.model(**ids).logits
        got = model(**ids).logits
    assert torch.equal(want, got)
    assert (tmp_path / "org" / "organism_config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".organism_tmp_")]
    with pytest.raises(FileNotFoundError, match="refusalguard demo"):
        load_organism(tmp_path / "missing")


def test_organism_config_rejects_bad_values():
    with pytest.raises(ValueError, match="divisible"):
        OrganismConfig(hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="n_train"):
        OrganismConfig(n_train=0)
    with pytest.raises(ValueError, match="unknown organism preset"):
        build_organism("huge")
