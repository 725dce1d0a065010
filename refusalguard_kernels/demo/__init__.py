"""The offline end-to-end demo: the model organism (``organism``: synthetic corpus, tokenizer,
a small Llama trained from scratch) and the demo run (``run``: fine-tunes with and without the
guard, evaluation, report).

May import everything below it: the public op, integration, training and evaluation. Never cli.

``refusalguard_kernels.demo`` was a single module before 0.2; its names are re-exported here.
"""

from .run import DemoConfig, check_goals, format_demo_table, plot_demo, run_demo

__all__ = ["DemoConfig", "run_demo", "format_demo_table", "plot_demo", "check_goals"]
