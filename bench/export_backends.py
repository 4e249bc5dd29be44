"""Eager torch vs TorchScript vs ONNX Runtime, side by side in one run: cases/s of the ISBI bundle's
network + decoding on the ISBI test1 images, on the CPU.

A temporary copy of ``bundles/isbi2015_cephalometric`` gets a self-describing ``models/model.pt``
with RANDOM weights (``torch.manual_seed(0)``, the bundle's ``network_def``; the timings do not
depend on the weights), or ``--model`` (a trained model file of that bundle) is copied there. Then
``heatmark export`` writes ``model.ts`` and ``model.onnx`` (each checked against the eager model on
the first ``--check-cases`` test1 images; its figures are printed).

The first ``--cases`` test1 images are read and preprocessed once (the bundle's inference
preprocessing). Timed per backend: :func:`heatmark.predict.runner.infer` (the bundle's inferer
with the backend's network, then decoding to world mm) over all cases in batches of
``--batch-size``, the backends taking turns for ``--repeats`` rounds (so a slower or busier machine
moment hits all of them alike); cases/s from the median round. Every backend uses ``--threads``
threads (torch ``set_num_threads``; ONNX Runtime ``intra_op_num_threads``). The last column is the
largest landmark difference to eager torch, world mm.

Usage: python bench/export_backends.py [--cases 150] [--batch-size 1] [--repeats 3] [--threads N]
       [--check-cases 3] [--model PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _timing import REPO, header, require_isbi, table
from heatmark.bundle import bundle_config_files
from heatmark.exporting import ExportSettings, export_model, load_torchscript
from heatmark.predict import PredictOptions, load_bundle
from heatmark.predict.backends import OnnxRuntimeNetwork, read_onnx_metadata
from heatmark.predict.dataset import CaseDataset, collate
from heatmark.predict.runner import infer
from heatmark.training.checkpoint import AtomicDiskSaver
from monai.bundle import ConfigParser

BUNDLE = REPO / "bundles" / "isbi2015_cephalometric"


def bundle_copy(dst: Path, model: Path | None) -> Path:
    """The ISBI bundle's configs in ``dst`` with ``model`` (or a random-weight described model) as models/model.pt."""
    shutil.copytree(BUNDLE / "configs", dst / "configs")
    (dst / "models").mkdir()
    if model is not None:
        shutil.copy(model, dst / "models" / "model.pt")
        return dst / "models" / "model.pt"
    parser = ConfigParser()
    parser.read_config([str(f) for f in bundle_config_files(dst, "training", [])])
    parser["bundle_root"] = str(dst)
    torch.manual_seed(0)
    network = parser.get_parsed_content("network_def")
    AtomicDiskSaver(dst / "models", "model.pt", parser.get_parsed_content("model_description"))(
        network.state_dict(), "ignored")
    return dst / "models" / "model.pt"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=150, help="ISBI test1 images, at most 150")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds per backend (median reported)")
    ap.add_argument("--threads", type=int, default=None, help="threads per backend (default: torch's)")
    ap.add_argument("--check-cases", type=int, default=3, help="images of the export check")
    ap.add_argument("--model", type=Path, help="a trained model file of the ISBI bundle (default: random weights)")
    args = ap.parse_args()
    import onnxruntime as ort  # the `export` extra: a clear ImportError here is enough for a benchmark

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    data = require_isbi()
    ids = (data / "splits" / "test1.txt").read_text().split()[: args.cases]
    paths = [data / "images" / f"{i}.nii.gz" for i in ids]
    print(header(f"export backends: ISBI bundle network + decoding, {len(paths)} test1 cases, batch "
                 f"{args.batch_size}, {args.repeats} rounds, {'trained' if args.model else 'random'} weights"))

    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / "bundle"
        model = bundle_copy(bundle, args.model)
        listing = Path(tmp) / "check.txt"
        listing.write_text("\n".join(str(p) for p in paths[: args.check_cases]) + "\n")
        settings = ExportSettings(check_cases=args.check_cases)
        for fmt in ("torchscript", "onnx"):
            t0 = time.perf_counter()
            _, check = export_model(bundle, fmt, images=listing, settings=settings, log=None)
            print(f"# {fmt}: exported in {time.perf_counter() - t0:.1f} s, {check.line()}")

        loaded = load_bundle(PredictOptions(bundle=bundle, input="", output="", device="cpu", amp=False))
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(str(model.with_suffix(".onnx")), sess_options=options,
                                       providers=["CPUExecutionProvider"])
        backends = {"eager torch": loaded.network, "TorchScript": load_torchscript(model.with_suffix(".ts"))[0],
                    "ONNX Runtime": OnnxRuntimeNetwork(session, read_onnx_metadata(session))}

        t0 = time.perf_counter()
        dataset = CaseDataset([(i, str(p)) for i, p in zip(ids, paths)], loaded.preprocessing, 2, loaded.image_key)
        records = [dataset[i] for i in range(len(dataset))]
        print(f"# preprocessing (once, not timed below): {time.perf_counter() - t0:.1f} s")
        batches = [collate(records[s:s + args.batch_size]) for s in range(0, len(records), args.batch_size)]
        groups = [g for b in batches for g in b["groups"]]
        cases = sum(len(g["cases"]) for g in groups)

        def run(network) -> list[np.ndarray]:
            bundle_x = dataclasses.replace(loaded, network=network)
            out = []
            for g in groups:
                for r in infer(bundle_x, g["images"], g["affines"], pad_to=args.batch_size):
                    out.append(np.full((len(loaded.names), 2), np.nan) if isinstance(r, str) else r["world"])
            return out

        seconds: dict[str, list[float]] = {name: [] for name in backends}
        worlds: dict[str, list[np.ndarray]] = {}
        for name, net in backends.items():  # warm-up round, untimed
            worlds[name] = run(net)
        for _ in range(args.repeats):
            for name, net in backends.items():
                t0 = time.perf_counter()
                run(net)
                seconds[name].append(time.perf_counter() - t0)

    eager_rate = cases / statistics.median(seconds["eager torch"])
    rows = []
    for name in backends:
        rate = cases / statistics.median(seconds[name])
        diff = max((float(np.nanmax(np.linalg.norm(a - b, axis=1))) if not np.isnan(a).all() else 0.0)
                   for a, b in zip(worlds[name], worlds["eager torch"]))
        rows.append([name, f"{rate:.2f}", f"{rate / eager_rate:.2f}x", f"{diff:.2g}"])
    print(table(["backend", "cases/s", "vs eager", "max landmark diff (mm)"], rows))


if __name__ == "__main__":
    main()
