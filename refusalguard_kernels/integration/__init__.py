"""Model integration: the guard on Hugging Face models.

Holds refusal-cone extraction (``basis``), the forward hooks that apply the penalty
(``hooks``), cached anchors (``anchors``), model plumbing (``model_utils``: finding decoder
layers, PEFT unwrapping, padding) and the built-in prompt sets (``prompts``, ``data/``).

May import: the public op (``refusalguard_kernels.functional``, ``.validation``, ``.backends``),
torch, transformers, peft, datasets, safetensors, tqdm. Never the kernels (``ops``) and never
anything above it (training, evaluation, demo, cli).
"""
