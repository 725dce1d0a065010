"""The offline end-to-end demo: a fine-tuning-attack benchmark with controls.

* ``organism``: the model organism (synthetic corpus, tokenizer, a small Llama trained from scratch);
* ``config``: options, presets, scenarios and methods; ``scenarios``: the fine-tuning data;
  ``methods``: the fine-tunes (plain LoRA, safety-mix, ProCon-style, RefusalGuard and the controls);
  ``metrics``: per-item measurements; ``report``: intervals, comparisons, goals, frontier, table,
  plots; ``subjects``: the organism as a benchmark subject; ``smollm2``: SmolLM2-135M-Instruct,
  aligned here, as one; ``run``: the cached pipeline.

May import everything below it: the public op, integration, training and evaluation. Never cli.

``refusalguard_kernels.demo`` was a single module before 0.2; its names are re-exported here.
"""

from .config import CONTROLS, METHODS, SCENARIOS, DemoConfig, preset_config
from .report import check_goals, format_demo_table, plot_budget, plot_demo
from .run import run_demo

__all__ = [
    "DemoConfig",
    "preset_config",
    "run_demo",
    "format_demo_table",
    "plot_demo",
    "plot_budget",
    "check_goals",
    "SCENARIOS",
    "METHODS",
    "CONTROLS",
]
