"""Training: the guard inside any ``transformers.Trainer`` subclass, TRL's included (``trainer``:
``RefusalGuardMixin``, ``RefusalGuardTrainer``), and dataset loading and tokenisation for
fine-tuning, chat data included (``data_utils``).

May import: the public op and ``refusalguard_kernels.integration``. Never evaluation, demo or cli,
and never the kernels.
"""
