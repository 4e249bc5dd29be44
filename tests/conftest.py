"""Shared fixtures: paths to the real data beside the project (skipped when absent)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one test process per core (pytest-xdist): one OpenMP thread each, set before
    # torch is imported; several spinning OpenMP threads per process on 2 cores slow all of them down
    os.environ["OMP_NUM_THREADS"] = "1"

import torch
from heatmark.bundle import bundle_command, bundle_config_files
from monai.bundle import ConfigParser

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def bundle_cmd(bundle: Path, workflow: str, overlays: list[str], *extra: str) -> list[str]:
    """``python -m monai.bundle run`` of ``workflow`` on ``bundle``, as the README documents it: the
    config files from ``heatmark configs BUNDLE WORKFLOW OVERLAYS`` (the shipped base first)."""
    return [*bundle_command(bundle, workflow, overlays), *extra]


def bundle_parser(bundle: Path, workflow: str = "training", overlays: Sequence[str] = (), **overrides: Any) -> ConfigParser:
    """A MONAI ConfigParser over ``workflow``'s config files of ``bundle`` with ``overrides`` applied."""
    parser = ConfigParser()
    parser.read_config([str(f) for f in bundle_config_files(bundle, workflow, overlays)])
    parser["bundle_root"] = str(bundle)
    for key, value in overrides.items():
        parser[key] = value
    return parser


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
