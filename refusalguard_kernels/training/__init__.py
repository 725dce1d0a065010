"""Training: the guard inside ``transformers.Trainer`` (``trainer``) and dataset loading and
tokenisation for fine-tuning (``data_utils``).

May import: the public op and ``refusalguard_kernels.integration``. Never evaluation, demo or cli,
and never the kernels.
"""
