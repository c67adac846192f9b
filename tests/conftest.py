import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run on CPU tensors under the interpreter; it must be chosen before any
    # kernel is defined, i.e. before vllm_lite.attention.triton_ops is first imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    # Nothing in the test suite may reach a model hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    """HuggingFace folder of SmolLM2-135M-Instruct (converted from GGUF once, then cached)."""
    from vllm_lite.default_model import default_model_path

    return default_model_path()
