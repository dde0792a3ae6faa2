import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAPER_DATA = ROOT.parent / "shared" / "paper_data"


@pytest.fixture
def paper_data():
    """The original spreadsheets beside the project (../shared/paper_data); skipped where absent."""
    if not (PAPER_DATA / "usable_data.xlsx").is_file():
        pytest.skip(f"original spreadsheets not found at {PAPER_DATA}")
    return PAPER_DATA


@pytest.fixture
def subprocess_env():
    env = dict(os.environ)
    env.setdefault("JAX_PLATFORMS", "cpu")
    return env
