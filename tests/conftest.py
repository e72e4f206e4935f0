"""Test configuration.

Triton kernels run through the interpreter when no GPU is visible; the variable must be set
before any ``@triton.jit`` decorator runs, so it is set here, before hpd_fast is imported.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def devices() -> list[str]:
    out = ["cpu"]
    if torch.cuda.is_available():
        out.append("cuda")
    return out
