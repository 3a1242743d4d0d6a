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
