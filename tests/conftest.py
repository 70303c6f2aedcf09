"""Shared test helpers. Tests run on CPU; GPU tests are marked ``gpu`` and skip without CUDA."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

TINY = dict(dims=[8, 16, 32, 64], depths=[1, 1, 1, 1], depths_decoder=[1, 1, 1, 1])


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _private_data_cache(tmp_path_factory, monkeypatch):
    """Resized-picture caches (``data.cache``) go to a per-test folder, never the user's ~/.cache."""
    monkeypatch.setenv("VM_UNET_CACHE_DIR", str(tmp_path_factory.mktemp("resized_cache")))


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA
