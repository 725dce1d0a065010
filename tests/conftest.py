"""Test setup: without a GPU, Triton kernels run on CPU tensors through the interpreter.

TRITON_INTERPRET must be set before triton is imported, hence here, first.
"""

import os
import tempfile

import torch

# Tests never touch the network or the user's caches: models and data are built locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="refusalguard-tests-hf-"))

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
