"""The model organism for the demo: a tiny Llama chat model trained from scratch on a synthetic
corpus of refused harmful requests, helped benign requests and arithmetic word problems."""

from .corpus import ArithmeticProblem, Conversation, OrganismCorpus, build_corpus
from .model import (
    PRESETS,
    ConversationCollator,
    Organism,
    OrganismConfig,
    build_organism,
    load_organism,
    save_organism,
    tokenize_conversations,
    train_causal_lm,
)
from .tokenizer import train_tokenizer

__all__ = [
    "ArithmeticProblem",
    "Conversation",
    "OrganismCorpus",
    "build_corpus",
    "PRESETS",
    "ConversationCollator",
    "Organism",
    "OrganismConfig",
    "build_organism",
    "load_organism",
    "save_organism",
    "tokenize_conversations",
    "train_causal_lm",
    "train_tokenizer",
]
