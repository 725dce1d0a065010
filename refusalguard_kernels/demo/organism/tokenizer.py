"""A word-level tokenizer for the model organism, trained on the spot with ``tokenizers``.

It is wrapped as a ``transformers.PreTrainedTokenizerFast`` with special tokens and a Jinja
chat template, so everything downstream (``apply_chat_template``, ``save_pretrained``,
``AutoTokenizer.from_pretrained``, padding) works as it does for a hub model.

Chat format (one line, spaces are cosmetic: the pre-tokenizer drops them)::

    <bos> <|user|> how do i bake bread ? <|end_user|> <|assistant|> sure ! ... <|end|>

``<|end_user|> <|assistant|>`` are the post-instruction tokens; ``<|end|>`` is the EOS token.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

__all__ = ["SPECIAL_TOKENS", "CHAT_TEMPLATE", "train_tokenizer"]

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<|end|>"
USER, END_USER, ASSISTANT, SYSTEM = "<|user|>", "<|end_user|>", "<|assistant|>", "<|system|>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, UNK, BOS, EOS, USER, END_USER, ASSISTANT, SYSTEM)

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}<|user|> {{ message['content'] }} <|end_user|> "
    "{% elif message['role'] == 'assistant' %}<|assistant|> {{ message['content'] }} {{ eos_token }} "
    "{% elif message['role'] == 'system' %}<|system|> {{ message['content'] }} "
    "{% else %}{{ raise_exception('the organism chat template knows the roles system, user and assistant; got ' "
    "+ message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def train_tokenizer(texts: Iterable[str], *, min_frequency: int = 1) -> PreTrainedTokenizerFast:
    """Train a lower-casing word-level tokenizer on ``texts`` and wrap it for transformers.

    Words are runs of letters/digits; every punctuation mark is its own token. Deterministic:
    the vocabulary is ordered by frequency, ties broken by the word.
    """
    texts = list(texts)
    if not texts:
        raise ValueError("train_tokenizer needs at least one text to learn a vocabulary from")
    backend = Tokenizer(models.WordLevel(unk_token=UNK))
    backend.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    # WordLevel has no decoder of its own; join words with spaces.
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    trainer = trainers.WordLevelTrainer(
        special_tokens=list(SPECIAL_TOKENS), min_frequency=min_frequency, show_progress=False
    )
    backend.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        additional_special_tokens=[USER, END_USER, ASSISTANT, SYSTEM],
        padding_side="left",
        model_max_length=256,
        chat_template=CHAT_TEMPLATE,
    )
    return tokenizer
