"""The prediction run: inference on batches (:func:`infer_group`) and the loop over the inputs
(:func:`run_predict`).

Per batch from the ``DataLoader``: error records of the loading are failed cases; each group of
same-shaped images goes through the bundle's ``inference#inferer`` (``inferer(images, network)``,
under :func:`heatmark.training.autocast_context`) and ``inference#postprocessing``; a group that
fails is retried one case at a time to find the culprit. A case's files are written as soon as it
is done (:mod:`~heatmark.predict.export`), then its state (:mod:`~heatmark.predict.store`); the
tables are rewritten from the states after a batch (at most once a second) and at the end, also
after Ctrl-C.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from tqdm.auto import tqdm

from heatmark.predict.dataset import CaseDataset, collate
from heatmark.predict.errors import PredictUsageError, describe
from heatmark.predict.export import case_files, write_case, write_tables
from heatmark.predict.inputs import assign_case_names, find_inputs
from heatmark.predict.model import LoadedBundle, load_bundle
from heatmark.predict.options import PredictOptions, PredictSummary, check_options
from heatmark.predict.store import STATE_DIR, CaseStore, check_run_file, remove_debris
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


def run_predict(opts: PredictOptions, log: Callable[[str], None] | None = None) -> PredictSummary:
    """Run a bundle over the inputs; see :mod:`heatmark.predict`. Raises PredictUsageError.

    Args:
        opts: what to run on what, and what to write.
        log: receives a line per failed case (default: printed above the progress bar).
    """
    t0 = time.perf_counter()
    opts = check_options(opts)
    out = Path(os.path.expanduser(os.fspath(opts.output)))
    if out.exists() and not out.is_dir():
        raise PredictUsageError(f"OUTPUT exists and is not a folder: {out}")
    src = Path(os.path.expanduser(os.fspath(opts.input)))
    if src.is_dir() and os.path.abspath(src) == os.path.abspath(out):
        raise PredictUsageError("OUTPUT must not be the INPUT folder")
    bundle = load_bundle(opts)
    paths = find_inputs(src, opts.recursive, opts.pattern, bundle.spatial_dims, exclude=[out])
    say = log or (lambda msg: tqdm.write(msg, file=sys.stderr))

    out.mkdir(parents=True, exist_ok=True)
    store = CaseStore(out, bundle.names, bundle.spatial_dims)
    remove_debris([out, store.dir, out / STATE_DIR])
    store.load()
    check_run_file(out, store, bundle, opts)
    # cases of other inputs already in OUTPUT keep their names; the same input keeps one name
    sources = {os.path.abspath(p) for p in paths}
    cases = assign_case_names(paths, reserved=[c for c, s in store.states.items() if s.get("source") not in sources])
    current = {os.path.abspath(p): c for p, c in zip(paths, cases)}
    for case, s in list(store.states.items()):
        if s.get("source") in current and current[s["source"]] != case:
            store.drop(case)  # superseded: that input now has another name (the input set changed)

    summary = PredictSummary(output=out, total=len(paths))
    todo = []
    for p, c in zip(paths, cases):
        if not opts.overwrite and store.is_done(c, str(p), case_files(c, opts)):
            summary.skipped += 1
        else:
            todo.append((c, str(p)))

    def fail(case: str, path: str, error: str) -> None:
        store.put_failed(case, path, error)
        summary.failed += 1
        summary.failures.append((case, path, error))
        say(f"failed: {case} ({path}): {error}")

    dataset = CaseDataset(todo, bundle.preprocessing, bundle.spatial_dims, bundle.image_key)
    workers = min(opts.num_workers, -(-len(todo) // opts.batch_size))  # no idle worker processes
    loader = torch.utils.data.DataLoader(dataset, batch_size=opts.batch_size, shuffle=False,
                                         num_workers=workers, collate_fn=collate,
                                         pin_memory=bundle.device.type == "cuda")
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
                for case, path, result in zip(group["cases"], group["paths"], results):
                    if isinstance(result, str):
                        fail(case, path, result)
                    else:
                        try:
                            payload = write_case(out, case, result, bundle, opts)
                        except (KeyboardInterrupt, SystemExit):
                            raise
                        except Exception as e:  # noqa: BLE001
                            fail(case, path, f"writing the outputs failed: {describe(e)}")
                        else:
                            store.put_done(case, path, payload)
                            summary.processed += 1
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
