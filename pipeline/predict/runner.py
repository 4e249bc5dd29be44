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
"""

from __future__ import annotations

import contextlib
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

from heatmark.predict.checks import refuse_outside
from heatmark.predict.dataset import CaseDataset, collate, die_with_parent
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
        pred = pred[:b].float()
        if pred.ndim != bundle.spatial_dims + 2 or pred.shape[:2] != (b, len(bundle.names)):
            raise CaseFailure(f"the network output has shape {tuple(pred.shape)}; expected "
                              f"({b}, {len(bundle.names)}, ...) heatmaps")
        finite = torch.isfinite(pred.flatten(1)).all(dim=1).cpu()
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


def run_predict(opts: PredictOptions, log: Callable[[str], None] | None = None) -> PredictSummary:
    """Run a bundle over the inputs; see :mod:`heatmark.predict`.

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
    out = Path(os.path.realpath(os.path.expanduser(os.fspath(opts.output))))  # resolved once
    if out.exists() and not out.is_dir():
        raise PredictUsageError(f"OUTPUT exists and is not a folder: {out}")
    src = check_input(opts.input)  # before the model: a missing INPUT is named as such
    if src.is_dir() and os.path.realpath(src) == str(out):
        raise PredictUsageError("OUTPUT must not be the INPUT folder")
    bundle = load_bundle(opts)
    paths = find_inputs(src, opts.recursive, opts.pattern, bundle.spatial_dims, exclude=[out])
    say = log or (lambda msg: tqdm.write(msg, file=sys.stderr))

    with writing(out, "create the folder"):
        out.mkdir(parents=True, exist_ok=True)
    store = CaseStore(out, bundle.names, bundle.spatial_dims)
    state = out / STATE_DIR
    check_inside(out, [state, store.dir, state / "run.json", *(out / t for t in TABLES)])
    remove_debris([out, store.dir, state])
    store.load()
    check_run_file(out, store, bundle, opts)
    # cases of other inputs already in OUTPUT keep their names; the same input keeps one name
    sources = {os.path.abspath(p) for p in paths}
    cases = assign_case_names(paths, reserved=[c for c, s in store.states.items() if s.get("source") not in sources])
    current = {os.path.abspath(p): c for p, c in zip(paths, cases)}
    for case, s in list(store.states.items()):
        if s.get("source") in current and current[s["source"]] != case:
            store.drop(case)  # superseded: that input now has another name (the input set changed)
    _check_unique_files(out, sorted(set(cases) | set(store.states)), opts)

    summary = PredictSummary(output=out, total=len(paths))
    todo = []
    for p, c in zip(paths, cases):
        if not opts.overwrite and store.is_done(c, str(p), case_files(c, opts)):
            summary.skipped += 1
        else:
            todo.append((c, str(p)))
    check_inside(out, [p for c, _ in todo for p in (store.state_file(c), *(out / f for f in case_files(c, opts)))])
    write_run_file(out, bundle, opts)

    def fail(case: str, path: str, error: str) -> None:
        store.put_failed(case, path, error)
        summary.failed += 1
        summary.failures.append((case, path, error))
        say(f"failed: {case} ({path}): {error}")

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
                    result["world"], result["warnings"] = refuse_outside(
                        result["world"], geometry, bundle.names, bundle.checks.max_outside_mm)
                    try:
                        payload = write_case(out, case, result, bundle, opts)
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
            if time.monotonic() - last_write >= AGGREGATE_INTERVAL_S:
                write_tables(out, store.states, bundle, opts)
                last_write = time.monotonic()
    except KeyboardInterrupt:
        summary.interrupted = True
    except BaseException:
        with contextlib.suppress(Exception):
            write_tables(out, store.states, bundle, opts)  # consistent tables for what is done, then the error
        raise
    finally:
        bar.close()
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            with contextlib.suppress(Exception):
                shutdown()
    write_tables(out, store.states, bundle, opts)
    summary.seconds = time.perf_counter() - t0
    return summary
