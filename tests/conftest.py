import os
from pathlib import Path

import pytest

SHARED_DATA = Path(os.environ.get("DYNBATCH_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture
def shared_data() -> Path:
    if not (SHARED_DATA / "mnist.npz").exists():
        pytest.skip(f"offline data not found at {SHARED_DATA} (set DYNBATCH_TEST_DATA)")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _no_data_env(monkeypatch):
    """Tests say where their data comes from; a developer's DYNBATCH_DATA must not leak in."""
    monkeypatch.delenv("DYNBATCH_DATA", raising=False)
