"""Shared fixtures: paths to the real data beside the project (skipped when absent)."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def require_shared_data(*parts: str) -> Path:
    """Path under ``../shared/data``; skip the test with a clear reason when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not found at {path} (../shared/data sits beside the project on developer machines and in CI)")
    return path


@pytest.fixture
def isbi_dir() -> Path:
    return require_shared_data("isbi2015")


@pytest.fixture
def afids_dir() -> Path:
    return require_shared_data("afids")
