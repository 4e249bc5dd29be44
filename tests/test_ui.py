"""``heatmark ui``: the MLflow server command line (``--workers``) and its shutdown: a signal to
``heatmark ui`` stops the server's whole process group, so no worker keeps the port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ENV

from heatmark import cli
from heatmark.training import tracking


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:port."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _can_bind(port: int) -> bool:
    """Whether a new listener could take the port (SO_REUSEADDR: TIME_WAIT of old connections is no owner)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            s.listen()
            return True
        except OSError:
            return False


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a live process, None when it is gone (or a zombie: holds no port)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else (fields[0], int(fields[1]))


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (st := _stat(int(entry.name))) is not None:
            children.setdefault(st[1], []).append(int(entry.name))
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def test_ui_command_passes_workers(tmp_path):
    uri = tracking.prepare_store(tmp_path)
    cmd = tracking.ui_command(tmp_path, port=5123, workers=3)
    assert cmd[cmd.index("--workers") + 1] == "3" and cmd[cmd.index("--port") + 1] == "5123"
    assert cmd[cmd.index("--backend-store-uri") + 1] == uri == f"sqlite:///{tmp_path / 'mlruns.db'}"
    assert tracking.ui_command(tmp_path)[-2:] == ["--workers", "1"]  # the default
    with pytest.raises(ValueError, match="at least 1"):
        tracking.ui_command(tmp_path, workers=0)
    args = cli.build_parser("ui").parse_args(["ui", str(tmp_path), "--workers", "2"])
    assert args.workers == 2 and cli.build_parser("ui").parse_args(["ui"]).workers == 1
    with pytest.raises(SystemExit) as e:
        cli.build_parser("ui").parse_args(["ui", "--workers", "0"])
    assert e.value.code == 2


def test_prepare_store_keeps_default_experiment_artifacts_in_the_store(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)
    store = tmp_path / "runs"
    uri = tracking.prepare_store(store)
    default = MlflowClient(uri).get_experiment("0")
    assert default.name == "Default"
    assert default.artifact_location == (store / "mlruns" / "0").as_uri()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]  # nothing in the working folder
    assert tracking.prepare_store(store) == uri  # an existing store is left as it is


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_the_server_and_frees_the_port(tmp_path, signum):
    """heatmark ui -> mlflow ui -> uvicorn: the signal reaches the grandchild that holds the port.
    (One worker: uvicorn's supervisor of several workers kills workers that start slower than its
    5 s health check, which happens on a loaded 2-core test machine.)"""
    tracking.prepare_store(tmp_path)
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "heatmark", "ui", str(tmp_path), "--port", str(port),
                             "--workers", "1"], cwd=tmp_path, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300  # about 15 s on an idle machine; minutes on a busy one
        while not _answers(port):
            assert proc.poll() is None, f"heatmark ui ended early ({proc.returncode}):\n{proc.stdout.read()}"
            assert time.monotonic() < deadline, "the MLflow server did not answer within 300 s"
            time.sleep(0.25)
        children = _descendants(proc.pid)
        assert children, "the MLflow server should run as a child of heatmark ui"
        proc.send_signal(signum)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:  # the test failed: end the server's group too (SIGKILL is not forwarded)
            for pid in _descendants(proc.pid):
                try:
                    os.killpg(os.getpgid(pid), signal.SIGKILL)
                except OSError:
                    pass
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out
    assert f"127.0.0.1:{port}" in out
    assert not _answers(port) and _can_bind(port), "a process still holds the port"
    alive = [pid for pid in children if _stat(pid) is not None]
    assert not alive, f"processes of the MLflow server still running: {alive}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlruns.db"], "the UI wrote into the folder"
