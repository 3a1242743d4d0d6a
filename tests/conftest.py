"""Shared fixtures: the benchmark data folder and a fast tiny-model run configuration."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch a model hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from helpers import DATA_DIR


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA_DIR.is_dir():
        pytest.skip(f"benchmark data not found at {DATA_DIR}")
    return DATA_DIR


@pytest.fixture
def one_thread_fresh_accelerate():
    """One torch thread; accelerate's process-wide state reset afterwards (a Trainer fixes its
    mixed-precision setting, which a later Accelerator of another test may not change)."""
    import torch
    from accelerate.state import AcceleratorState

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
    AcceleratorState._reset_state(reset_partial_state=True)
