"""Shared fixtures: paths to the real data beside the project (skipped when absent)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def bundle_cmd(bundle: Path, run_id: str, configs: list[str], *extra: str) -> list[str]:
    """``python -m monai.bundle run RUN_ID`` on ``bundle`` with the given config files (in configs/)."""
    files = [str(bundle / "configs" / c) for c in configs]
    return [sys.executable, "-m", "monai.bundle", "run", run_id, "--bundle_root", str(bundle),
            "--meta_file", str(bundle / "configs" / "metadata.json"), "--config_file", repr(files),
            "--logging_file", str(bundle / "configs" / "logging.conf"), *extra]


def run(cmd: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run a command, failing the test with its output when it fails."""
    proc = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


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
