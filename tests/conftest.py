import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _paper_data_candidates() -> list[Path]:
    """$EVJAX_PAPER_DATA, ../shared/paper_data beside this checkout, or beside the repository it was cloned from."""
    candidates = [Path(os.environ["EVJAX_PAPER_DATA"])] if os.environ.get("EVJAX_PAPER_DATA") else []
    candidates.append(ROOT.parent / "shared" / "paper_data")
    try:
        origin = subprocess.run(["git", "-C", str(ROOT), "config", "--get", "remote.origin.url"],
                                capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        origin = ""
    if origin and "://" not in origin and Path(origin).is_dir():
        candidates.append(Path(origin).resolve().parent / "shared" / "paper_data")
    return candidates


@pytest.fixture
def paper_data():
    """The original spreadsheets (never committed); skipped where none of the candidate folders holds them."""
    candidates = _paper_data_candidates()
    for folder in candidates:
        if (folder / "usable_data.xlsx").is_file():
            return folder
    pytest.skip(f"original spreadsheets not found in {[str(c) for c in candidates]}")


@pytest.fixture
def subprocess_env():
    env = dict(os.environ)
    env.setdefault("JAX_PLATFORMS", "cpu")
    return env
