"""Kernel tests run the Triton interpreter on CPU (TRITON_INTERPRET=1, as `make test` sets);
set here too, before any kernel module is imported, so a bare `pytest tests/kernels` works."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def device() -> str:
    """cpu under the interpreter; cuda when the kernels really compile."""
    interpreted = os.environ.get("TRITON_INTERPRET", "0") == "1"
    return "cuda" if torch.cuda.is_available() and not interpreted else "cpu"
