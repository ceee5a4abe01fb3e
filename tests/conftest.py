"""Shared test set-up: on a machine without CUDA, Triton kernels run under the interpreter.

The same test files run on the GPU (CUDA tensors) and on the CPU (TRITON_INTERPRET=1, CPU
tensors); `DEVICE` is the one to use.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device():
    return DEVICE
