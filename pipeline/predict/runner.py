"""The prediction run: inference on batches (:func:`infer_group`) and the loop over the inputs
(:func:`run_predict`).

Per batch from the ``DataLoader``: error records of the loading are failed cases; each group of
same-shaped images goes through the bundle's ``inference#inferer`` (``inferer(images, network)``,
under :func:`heatmark.training.autocast_context`) and ``inference#postprocessing``; a group that
fails is retried one case at a time to find the culprit. A case's files are written as soon as it
is done (:mod:`~heatmark.predict.export`), then its state (:mod:`~heatmark.predict.store`); the
tables are rewritten from the states after a batch (at most once a second) and at the end, also
after Ctrl-C. Landmarks predicted outside the image are set missing
(:func:`heatmark.predict.checks.refuse_outside`).

Before anything is written: OUTPUT is resolved once (its real path); every folder, table, state
and case file the run will write is checked not to be a symbolic link
(:func:`~heatmark.predict.store.check_inside`), and no two cases to name the same file. Data
loading workers end with this process (:func:`~heatmark.predict.dataset.die_with_parent`). An
``OSError`` writing OUTPUT stops the run (:class:`~heatmark.predict.errors.PredictOutputError`).

Under torchrun (:mod:`~heatmark.predict.distributed`) rank 0 alone prepares OUTPUT; every rank then
reads the states, takes its share of the cases to do and writes only those; rank 0 writes the tables
once, after a barrier, from all the states on disk.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from tqdm.auto import tqdm

from heatmark.evaluation.sliding_window import LocalHeatmaps
from heatmark.predict.cascade import refine_result
from heatmark.predict.checks import refuse_outside
from heatmark.predict.dataset import CaseDataset, collate, die_with_parent
from heatmark.predict.distributed import Ranks, ranks_from_env, shard
from heatmark.predict.errors import PredictOutputError, PredictUsageError, describe, writing
from heatmark.predict.export import TABLES, case_files, write_case, write_tables
from heatmark.predict.inputs import STATE_DIR, assign_case_names, check_input, find_inputs
from heatmark.predict.model import LoadedBundle, load_bundle
from heatmark.predict.options import PredictOptions, PredictSummary, check_options
from heatmark.predict.store import CaseStore, check_inside, check_run_file, remove_debris, write_run_file
from heatmark.training import autocast_context

__all__ = ["AGGREGATE_INTERVAL_S", "infer", "infer_group", "run_predict"]

#: Least time between two rewrites of the aggregate tables during a run (seconds).
AGGREGATE_INTERVAL_S = 1.0


class CaseFailure(Exception):
    """The inference of a group failed for a reason that is already one clear line."""


def infer(bundle: LoadedBundle, images: torch.Tensor, affines: torch.Tensor, pad_to: int = 1,
          keep_heatmaps: bool = False) -> list[dict | str]:
    """Inferer + decoding for one stacked group; per case a result dict or an error string.

    The forward pass always runs on ``pad_to`` images (a smaller group is padded with copies of
    its last image): kernels may compute differently for different batch sizes (on CPU, batch 1
    differs from batch 2 in the last bits), and a case's result must not depend on which cases
    share its batch, or a resumed run would not reproduce an uninterrupted one.
    """
    b = images.shape[0]
    x = images.to(bundle.device, non_blocking=True)
    if b < pad_to:
        x = torch.cat([x, x[-1:].expand(pad_to - b, *x.shape[1:])])
    with torch.inference_mode():
        with autocast_context(bundle.device, bundle.amp, bundle.amp_kwargs):
            pred = bundle.inferer(x, bundle.network)
        streamed = isinstance(pred, LocalHeatmaps)  # sw_stream: boxes around the peaks, no full heatmaps
        if streamed and keep_heatmaps:
            raise CaseFailure("--save-heatmaps needs the full heatmaps, which streamed sliding windows (sw_stream) "
                              "never hold; predict with sw_stream False to save them")
        pred = pred[:b] if streamed else pred[:b].float()
        dense = pred.values if streamed else pred
        channels = bundle.num_channels or len(bundle.names)  # fewer than the names with shared channels
        if dense.ndim != bundle.spatial_dims + 2 or dense.shape[:2] != (b, channels):
            raise CaseFailure(f"the network output has shape {tuple(dense.shape)}; expected "
                              f"({b}, {channels}, ...) heatmaps")
        finite = pred.finite.all(dim=1).cpu() if streamed else torch.isfinite(pred.flatten(1)).all(dim=1).cpu()
        try:
            out = bundle.postprocessing({bundle.pred_key: pred,
                                         bundle.image_key: MetaTensor(images, affine=affines)})
        except Exception as e:  # noqa: BLE001
            raise CaseFailure(f"decoding failed: {describe(e)}") from e
        world = torch.as_tensor(out["pred_world"]).detach().double().cpu().numpy()
        conf = torch.as_tensor(out["confidence"]).detach().double().cpu().numpy()
        heat = pred.cpu() if keep_heatmaps else None
    results: list[dict | str] = []
    for i in range(b):
        if not bool(finite[i]):
            results.append("the network output holds non-finite values (NaN/inf)" +
                           (" under mixed precision; try without --amp" if bundle.amp else ""))
        elif np.isnan(world[i]).all():
            results.append("decoding failed: no landmark could be located (the heatmaps are flat)")
        else:
            results.append({"world": world[i], "confidence": conf[i], "image": images[i], "affine": affines[i].numpy(),
                            "heatmap": None if heat is None else heat[i]})
    return results


def infer_group(bundle: LoadedBundle, group: dict, pad_to: int = 1, keep_heatmaps: bool = False) -> list[dict | str]:
    """:func:`infer` on a group from :func:`heatmark.predict.dataset.collate`; when it fails, one
    case at a time, so only the culprit fails."""
    try:
        return infer(bundle, group["images"], group["affines"], pad_to, keep_heatmaps)
    except Exception as e:  # noqa: BLE001
        if len(group["cases"]) == 1:
            return [str(e) if isinstance(e, CaseFailure) else f"inference failed: {describe(e)}"]
    # isolate the culprit: one case at a time
    out: list[dict | str] = []
    for i in range(len(group["cases"])):
        out.extend(infer_group(bundle, {"cases": group["cases"][i:i + 1], "images": group["images"][i:i + 1],
                                        "affines": group["affines"][i:i + 1]}, pad_to, keep_heatmaps))
    return out


def _check_unique_files(out: Path, cases: list[str], opts: PredictOptions) -> None:
    """No two cases (of this run or kept in OUTPUT) name the same file, letter case aside: impossible
    by construction (:mod:`heatmark.predict.inputs`), checked all the same before any write."""
    owner: dict[str, str] = {t.casefold(): "the tables" for t in TABLES}
    for case in cases:
        for f in case_files(case, opts):
            other = owner.setdefault(f.casefold(), case)
            if other != case:
                raise PredictUsageError(f"cases {other!r} and {case!r} would both write {out / f}; "
                                        "rename one of the inputs")


def _prepare_output(out: Path, store: CaseStore, bundle: LoadedBundle, opts: PredictOptions,
                    paths: list[Path]) -> None:
    """Clean and reconcile OUTPUT before any case runs: temporary debris, results of another run
    (:func:`~heatmark.predict.store.check_run_file`), states of inputs that now have another case
    name. With several processes only rank 0 does it, before the others read the states."""
    state = out / STATE_DIR
    remove_debris([out, store.dir, state])
    store.load()
    check_run_file(out, store, bundle, opts)
    # the same input keeps one name; cases of other inputs already in OUTPUT keep theirs
    sources = {os.path.abspath(p) for p in paths}
    cases = assign_case_names(paths, reserved=[c for c, s in store.states.items() if s.get("source") not in sources])
    current = {os.path.abspath(p): c for p, c in zip(paths, cases)}
    for case, s in list(store.states.items()):
        if s.get("source") in current and current[s["source"]] != case:
            store.drop(case)  # superseded: that input now has another name (the input set changed)


def _merge_summaries(summary: PredictSummary, parts: list[dict]) -> None:
    """Add the counts of every rank (``parts``, in rank order) into ``summary`` (skipped and total
    are the same on every rank)."""
    summary.processed = sum(p["processed"] for p in parts)
    summary.failed = sum(p["failed"] for p in parts)
    summary.warned = sum(p["warned"] for p in parts)
    summary.failures = sorted(f for p in parts for f in p["failures"])


def run_predict(opts: PredictOptions, log: Callable[[str], None] | None = None) -> PredictSummary:
    """Run a bundle over the inputs; see :mod:`heatmark.predict`.

    Under ``torchrun`` (``WORLD_SIZE`` > 1, :mod:`heatmark.predict.distributed`) every process runs
    this function on the same options: rank 0 prepares OUTPUT, each rank predicts its share of the
    cases still to do and writes only their files and states, and after a barrier rank 0 rebuilds
    the tables from all the states on disk. The returned summary then counts the cases of all ranks
    (``rank`` says whose it is); after an interruption only this rank's.

    Args:
        opts: what to run on what, and what to write.
        log: receives a line per failed case or warning (default: printed above the progress bar).

    Raises:
        PredictUsageError: a usage mistake (before any case), symbolic links in OUTPUT included.
        PredictOutputError: OUTPUT could not be written (disk full, read-only, permissions): the
            run stops; what was written is intact and a rerun resumes.
    """
    t0 = time.perf_counter()
    opts = check_options(opts)
    ranks = ranks_from_env()
    if ranks.active:  # one device per process; one progress bar (rank 0's share)
        opts = dataclasses.replace(opts, device=ranks.device(opts.device), progress=opts.progress and ranks.is_main)
    out = Path(os.path.realpath(os.path.expanduser(os.fspath(opts.output))))  # resolved once
    if out.exists() and not out.is_dir():
        raise PredictUsageError(f"OUTPUT exists and is not a folder: {out}")
    src = check_input(opts.input)  # before the model: a missing INPUT is named as such
    if src.is_dir() and os.path.realpath(src) == str(out):
        raise PredictUsageError("OUTPUT must not be the INPUT folder")
    bundle = load_bundle(opts)
    paths = find_inputs(src, opts.recursive, opts.pattern, bundle.spatial_dims, exclude=[out])
    ranks.start()
    try:
        return _run(opts, log, ranks, t0, out, bundle, paths)
    finally:
        ranks.stop()


def _run(opts: PredictOptions, log: Callable[[str], None] | None, ranks: Ranks, t0: float, out: Path,
         bundle: LoadedBundle, paths: list[Path]) -> PredictSummary:
    """:func:`run_predict` from the creation of OUTPUT on, in the process group of ``ranks``."""
    say = log or (lambda msg: tqdm.write(msg, file=sys.stderr))
    with writing(out, "create the folder"):
        out.mkdir(parents=True, exist_ok=True)
    store = CaseStore(out, bundle.names, bundle.spatial_dims)
    state = out / STATE_DIR
    check_inside(out, [state, store.dir, state / "run.json", *(out / t for t in TABLES)])
    problem: tuple | None = None  # rank 0's set-up error, as plain values every rank can rebuild
    if ranks.is_main:
        try:
            _prepare_output(out, store, bundle, opts, paths)
        except PredictUsageError as e:
            if not ranks.active:
                raise
            problem = ("usage", str(e))
        except PredictOutputError as e:
            if not ranks.active:
                raise
            problem = ("output", e.path, e.error.errno, e.error.strerror or str(e.error))
    problem = ranks.broadcast(problem)  # every rank stops with it instead of waiting at the barrier
    if problem is not None:
        if problem[0] == "usage":
            raise PredictUsageError(problem[1])
        raise PredictOutputError(problem[1], OSError(problem[2], problem[3]))
    if not ranks.is_main:
        store.load()  # after rank 0's clean-up, before any rank writes
    sources = {os.path.abspath(p) for p in paths}
    cases = assign_case_names(paths, reserved=[c for c, s in store.states.items() if s.get("source") not in sources])
    _check_unique_files(out, sorted(set(cases) | set(store.states)), opts)

    summary = PredictSummary(output=out, total=len(paths), rank=ranks.rank, world_size=ranks.world_size)
    todo = []
    for p, c in zip(paths, cases):
        if not opts.overwrite and store.is_done(c, str(p), case_files(c, opts)):
            summary.skipped += 1
        else:
            todo.append((c, str(p)))
    check_inside(out, [p for c, _ in todo for p in (store.state_file(c), *(out / f for f in case_files(c, opts)))])
    if ranks.is_main:
        write_run_file(out, bundle, opts)
    ranks.barrier()  # every rank has read the states before any writes new ones
    todo = shard(todo, ranks.rank, ranks.world_size)

    def fail(case: str, path: str, error: str) -> None:
        store.put_failed(case, path, error)
        summary.failed += 1
        summary.failures.append((case, path, error))
        say(f"failed: {case} ({path}): {error}")

    def tables() -> None:
        """The tables from the states: this process's (alone) or all on disk (rank 0 of several)."""
        if not ranks.active:
            write_tables(out, store.states, bundle, opts)
        elif ranks.is_main:
            merged = CaseStore(out, bundle.names, bundle.spatial_dims)
            merged.load()
            write_tables(out, merged.states, bundle, opts)

    dataset = CaseDataset(todo, bundle.preprocessing, bundle.spatial_dims, bundle.image_key)
    workers = min(opts.num_workers, -(-len(todo) // opts.batch_size))  # no idle worker processes
    loader = torch.utils.data.DataLoader(dataset, batch_size=opts.batch_size, shuffle=False,
                                         num_workers=workers, collate_fn=collate,
                                         pin_memory=bundle.device.type == "cuda",
                                         worker_init_fn=functools.partial(die_with_parent, os.getpid())
                                         if workers else None)
    bar = tqdm(total=len(todo), unit="case", desc="predict", disable=not opts.progress or not todo,
               file=sys.stderr, dynamic_ncols=True, smoothing=0.1)
    last_write = time.monotonic()
    iterator = None
    try:
        iterator = iter(loader)
        for batch in iterator:
            for rec in batch["errors"]:
                fail(rec["case"], rec["path"], rec["error"])
                bar.update(1)
            for group in batch["groups"]:
                results = infer_group(bundle, group, opts.batch_size, opts.save_heatmaps)
                geometries = group.get("geometries") or [None] * len(results)
                for case, path, result, geometry in zip(group["cases"], group["paths"], results, geometries):
                    if isinstance(result, str):
                        fail(case, path, result)
                        bar.update(1)
                        continue
                    problem = refine_result(bundle, path, result)  # a cascade's fine stage (else nothing)
                    if problem is not None:
                        fail(case, path, problem)
                        bar.update(1)
                        continue
                    result["world"], outside = refuse_outside(
                        result["world"], geometry, bundle.names, bundle.checks.max_outside_mm)
                    result["warnings"] = [*result["warnings"], *outside]
                    try:
                        payload = write_case(out, case, result, bundle, opts, source=path)
                    except (KeyboardInterrupt, SystemExit, PredictOutputError):
                        raise
                    except Exception as e:  # noqa: BLE001
                        fail(case, path, f"writing the outputs failed: {describe(e)}")
                    else:
                        store.put_done(case, path, payload)
                        summary.processed += 1
                        summary.warned += len(result["warnings"])
                        for w in result["warnings"]:
                            say(f"warning: {case} ({path}): {w}")
                    bar.update(1)
            if summary.failed:
                bar.set_postfix(failed=summary.failed, refresh=False)
            if not ranks.active and time.monotonic() - last_write >= AGGREGATE_INTERVAL_S:
                write_tables(out, store.states, bundle, opts)
                last_write = time.monotonic()
    except KeyboardInterrupt:
        summary.interrupted = True
    except BaseException:
        if not ranks.active:
            with contextlib.suppress(Exception):
                write_tables(out, store.states, bundle, opts)  # consistent tables for what is done, then the error
        raise
    finally:
        bar.close()
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            with contextlib.suppress(Exception):
                shutdown()
    if ranks.active and not summary.interrupted:
        ranks.barrier()  # every rank's states are written: rank 0 merges them
        _merge_summaries(summary, ranks.gather({"processed": summary.processed, "failed": summary.failed,
                                                "warned": summary.warned, "failures": summary.failures}))
    tables()
    summary.seconds = time.perf_counter() - t0
    return summary
