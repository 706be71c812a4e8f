import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(os.environ.get("LOOKHERE_GOLDEN", ROOT.parent / "shared" / "golden"))


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    yield


@pytest.fixture(scope="session")
def golden_file() -> Path:
    path = GOLDEN / "lookhere_bias_public.npz"
    if not path.is_file():
        pytest.skip(f"golden LookHere matrices not found at {path} (set LOOKHERE_GOLDEN to the folder)")
    return path
