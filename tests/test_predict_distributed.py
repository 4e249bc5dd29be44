"""`heatmark predict` over several processes (torchrun, gloo on CPU): the cases are shared out,
each rank writes only its own, rank 0 merges the tables, and the merged output is byte-identical to
a single-process run, also after a multi-process run was killed midway and resumed.

The multi-process runs inside the tests are forked from the test process (torch is imported once)
with the environment torchrun would set; one test starts the real ``torchrun -m heatmark predict``."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ENV
from heatmark import predict as P
from heatmark.core.fileio import TMP_PREFIX
from heatmark.predict import STATE_DIR, runner
from heatmark.predict.distributed import Ranks, ranks_from_env, shard
from test_model_artifact import write_described_model
from test_predict import TINY_SCN, image, make_bundle, save_nifti

NUM_CASES = 7
OPTS = ["--num-workers", "0", "--quiet"]
TORCHRUN = Path(sys.executable).with_name("torchrun")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _outputs(out: Path) -> dict[str, bytes]:
    """Every file a run leaves in OUTPUT except its resume state, by name."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    bundle = make_bundle(root / "bundle", TINY_SCN)
    write_described_model(bundle)  # self-describing: no --config needed
    inputs = root / "inputs"
    inputs.mkdir()
    for i in range(NUM_CASES):
        save_nifti(inputs / f"case{i:02d}.nii.gz", image((60 + 3 * i, 70), i), 2.5)
    (inputs / "broken.nii.gz").write_text("not an image\n")  # a failed case: errors.csv must merge too
    ref = root / "reference"
    assert P.main([str(bundle), str(inputs), str(ref), *OPTS]) == P.EXIT_FAILED  # the broken input
    return {"root": root, "bundle": bundle, "inputs": inputs, "reference": _outputs(ref)}


def _rank_main(rank: int, world: int, port: int, argv: list[str], die_after: int | None) -> None:
    """A forked rank: torchrun's environment, then ``heatmark predict``; with ``die_after`` it is
    killed (``os._exit``) after writing the files of that many cases, before the last one's state."""
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    if die_after is not None:
        real, count = runner.write_case, [0]

        def write_then_die(*args, **kwargs):
            result = real(*args, **kwargs)
            count[0] += 1
            if count[0] >= die_after:
                os._exit(9)
            return result

        runner.write_case = write_then_die
    os._exit(P.main(argv))


def _run_ranks(world: int, argv: list[str], die: dict[int, int] | None = None, timeout: float = 120) -> list[int]:
    """Fork ``world`` ranks running ``heatmark predict argv``; returns their exit codes. When a rank
    dies, the others are killed as torchrun does (SIGTERM, then SIGKILL)."""
    ctx = multiprocessing.get_context("fork")
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, argv, (die or {}).get(r))) for r in range(world)]
    for p in procs:
        p.start()
    end = time.monotonic() + timeout
    while time.monotonic() < end and any(p.is_alive() for p in procs):
        if any(p.exitcode not in (None, 0, 1, 2, 130) for p in procs):  # a rank crashed: end the others
            for p in procs:
                if p.is_alive():
                    p.terminate()
            for p in procs:
                p.join(10)
                if p.is_alive():
                    p.kill()
        time.sleep(0.05)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
            pytest.fail(f"rank {procs.index(p)} did not end within {timeout} s")
    return [p.exitcode for p in procs]


def test_ranks_from_the_environment():
    assert ranks_from_env({}) == Ranks(0, 1, 0)
    assert ranks_from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == Ranks(3, 4, 1)
    for bad in ({"RANK": "4", "WORLD_SIZE": "4"}, {"WORLD_SIZE": "two"}, {"RANK": "-1", "WORLD_SIZE": "2"}):
        with pytest.raises(P.PredictUsageError, match="RANK|WORLD_SIZE"):
            ranks_from_env(bad)
    one = Ranks()
    assert not one.active and one.broadcast("x") == "x" and one.gather(5) == [5]  # no process group


def test_shards_cover_every_case_once():
    items = list(range(11))
    shards = [shard(items, r, 3) for r in range(3)]
    assert shards == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8]]
    assert sorted(i for s in shards for i in s) == items


def test_two_processes_merge_to_the_single_process_output(setup, tmp_path):
    out = tmp_path / "out"
    codes = _run_ranks(2, [str(setup["bundle"]), str(setup["inputs"]), str(out), *OPTS])
    assert codes == [P.EXIT_FAILED] * 2  # every rank exits with the merged status (one input failed)
    assert _outputs(out) == setup["reference"]
    states = list((out / STATE_DIR / "cases").glob("*.json"))
    assert len(states) == NUM_CASES + 1
    assert not [p for p in out.rglob("*") if p.name.startswith(TMP_PREFIX)]


def test_three_processes_with_fewer_cases_than_ranks_idle(setup, tmp_path):
    inputs = tmp_path / "two"
    inputs.mkdir()
    for name in ("case00.nii.gz", "case01.nii.gz"):
        shutil.copy(setup["inputs"] / name, inputs / name)
    single, out = tmp_path / "single", tmp_path / "out"
    assert P.main([str(setup["bundle"]), str(inputs), str(single), *OPTS]) == P.EXIT_OK
    assert _run_ranks(3, [str(setup["bundle"]), str(inputs), str(out), *OPTS]) == [P.EXIT_OK] * 3
    assert _outputs(out) == _outputs(single)


def test_killed_multi_process_run_resumes_under_torchrun(setup, tmp_path):
    """Rank 1 dies after writing the files of its 2nd case (before that case's state), rank 0 is
    then terminated as torchrun would; ``torchrun --nproc_per_node 2 -m heatmark predict`` into the
    same OUTPUT redoes only what was not done and merges to the single-process output."""
    out = tmp_path / "out"
    argv = [str(setup["bundle"]), str(setup["inputs"]), str(out), *OPTS]
    codes = _run_ranks(2, argv, die={1: 2})
    assert codes[1] == 9, codes
    states = [json.loads(p.read_text()) for p in (out / STATE_DIR / "cases").glob("*.json")
              if not p.name.startswith(TMP_PREFIX)]
    done = [s["case"] for s in states if s["status"] == "done"]  # failed cases are retried, not skipped
    assert 1 <= len(done) < NUM_CASES, f"killed midway ({len(done)} cases done)"

    assert TORCHRUN.is_file(), f"torchrun not found beside {sys.executable}"
    cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", "heatmark", "predict", *argv]
    proc = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    summary = re.findall(r"(\d+) processed, (\d+) skipped \(done before\), (\d+) failed.*over 2 processes", log)
    assert len(summary) == 1, log[-4000:]  # printed once, by rank 0
    processed, skipped, failed = map(int, summary[0])
    assert skipped == len(done) and processed + failed == NUM_CASES + 1 - len(done), log[-4000:]
    assert _outputs(out) == setup["reference"]
    assert not [p for p in out.rglob("*") if p.name.startswith(TMP_PREFIX)]


def test_a_set_up_error_of_rank_0_stops_every_rank(setup, tmp_path):
    """Rank 0 refuses OUTPUT (results of another model, no --overwrite): the other rank stops with
    the same error instead of waiting at the barrier."""
    out = tmp_path / "out"
    shutil.copytree(setup["root"] / "reference", out)
    run_file = out / STATE_DIR / "run.json"
    run_file.write_text(run_file.read_text().replace('"model_sha256": "', '"model_sha256": "0'))
    codes = _run_ranks(2, [str(setup["bundle"]), str(setup["inputs"]), str(out), *OPTS], timeout=60)
    assert codes == [P.EXIT_USAGE] * 2
