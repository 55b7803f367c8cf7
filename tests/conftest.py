"""Shared fixtures. Tests run on the CPU with a few threads; nothing touches the network."""
from pathlib import Path

import pytest
import torch

from ddpm_nb.utils import repo_root

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the checkout (CI and developer machines have it)."""
    path = repo_root().parent / "shared" / "data"
    if not path.is_dir():
        pytest.skip(f"offline datasets not found at {path} (expected ../shared/data beside the checkout)")
    return path
