"""heatmark bundles: which config files a workflow reads, and running a workflow.

A heatmark bundle folder holds ``configs/train.yaml`` (its data, grid, network and transforms),
``configs/metadata.json``, optional overlays (``cpu.yaml``, ``smoke.yaml`` ...), ``docs/`` and
``LICENSE``. Everything shared — engine wiring, handlers, metrics, evaluation, inference and
multi-GPU overlays, logging — ships with heatmark in :data:`CONFIG_DIR` and comes first:

==============  ==========================================================================
workflow        config files, in order (later files replace earlier top-level keys)
==============  ==========================================================================
``training``    base.yaml, BUNDLE/train.yaml, overlays
``evaluating``  base.yaml, BUNDLE/train.yaml, evaluate.yaml, overlays
``inference``   base.yaml, BUNDLE/train.yaml, inference.yaml, overlays
``multi_gpu``   base.yaml, BUNDLE/train.yaml, multi_gpu_train.yaml, overlays
==============  ==========================================================================

A bundle may also keep its own ``configs/evaluate.yaml`` (etc.): it follows the shipped one, so it
only states what differs. The same holds for the shipped overlays (:data:`SHIPPED_OVERLAYS`: the
coarse-to-fine ``cascade.yaml``): ``--config cascade.yaml`` reads heatmark's, then the bundle's.
``heatmark configs BUNDLE WORKFLOW [OVERLAY ...]`` prints the list for
``python -m monai.bundle run ... --config_file``; :func:`run_bundle` (in this process: ``heatmark
train``, the demo) and :func:`bundle_command` (a subprocess: benchmarks, tests) build on the same list.

``heatmark metadata BUNDLE`` (:func:`update_metadata`) records a trained model in the bundle's MONAI
files: ``large_files.yml`` (MONAI's large-file list: ``models/model.pt`` with its SHA-256, read by
``python -m monai.bundle download_large_files``) and ``eval_metrics`` in ``configs/metadata.json``
from the ``metrics.json`` of the last ``run evaluating``. Each file is written atomically, and
metadata.json only where ``eval_metrics`` stands (the rest of the file keeps its bytes).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from heatmark.core.fileio import atomic_write_text, sha256_file

__all__ = ["CONFIG_DIR", "CONFIG_VALUES", "WORKFLOWS", "BundleError", "check_config", "bundle_command", "bundle_config_files", "config_file_arg", "run_bundle",
           "check_bundle", "LARGE_FILES", "MODEL_FILE", "EVAL_METRICS_FILE", "eval_metrics", "update_metadata",
           "add_metadata_parser"]

#: Config files shipped with heatmark (base.yaml, evaluate.yaml, inference.yaml, multi_gpu_train.yaml, logging.conf).
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
#: workflow -> (MONAI run id, the shipped overlay after the bundle's train.yaml or None)
WORKFLOWS: dict[str, tuple[str, str | None]] = {
    "training": ("training", None),
    "evaluating": ("evaluating", "evaluate.yaml"),
    "inference": ("inference", "inference.yaml"),
    "multi_gpu": ("training", "multi_gpu_train.yaml"),
}
BUNDLE_CONFIG = "train.yaml"
#: overlays shipped with heatmark: ``--config cascade.yaml`` reads heatmark's file, then the bundle's
#: own ``configs/cascade.yaml`` when there is one (which then only states its settings)
SHIPPED_OVERLAYS = ("cascade.yaml", "patches.yaml")


class BundleError(ValueError):
    """A bundle folder, workflow or config file that does not exist: one line for the user."""


def check_bundle(bundle: str | os.PathLike) -> Path:
    """``bundle`` as a Path, after checking it is a bundle folder (``configs/train.yaml`` inside)."""
    path = Path(os.path.expanduser(os.fspath(bundle)))
    if not path.is_dir():
        raise BundleError(f"bundle folder not found: {path}")
    if not (path / "configs" / BUNDLE_CONFIG).is_file():
        raise BundleError(f"{path} is not a heatmark bundle folder (no configs/{BUNDLE_CONFIG} inside)")
    return path


def bundle_config_files(bundle: str | os.PathLike, workflow: str = "training",
                        overlays: Sequence[str | os.PathLike] = ()) -> list[Path]:
    """The config files of ``workflow`` for ``bundle``, in the order MONAI must read them.

    Args:
        bundle: the bundle folder.
        workflow: one of :data:`WORKFLOWS`.
        overlays: files to put last: a path, or a file name in ``bundle/configs``.

    Raises:
        BundleError: no such bundle, workflow or overlay (the message names it).
    """
    if workflow not in WORKFLOWS:
        raise BundleError(f"unknown workflow {workflow!r}; one of {', '.join(WORKFLOWS)}")
    root = check_bundle(bundle)
    configs = root / "configs"
    files = [CONFIG_DIR / "base.yaml", configs / BUNDLE_CONFIG]
    shipped = WORKFLOWS[workflow][1]
    if shipped is not None:
        files.append(CONFIG_DIR / shipped)
        if (configs / shipped).is_file():
            files.append(configs / shipped)
    for name in overlays:
        p = Path(os.path.expanduser(os.fspath(name)))
        if str(name) in SHIPPED_OVERLAYS:  # heatmark's wiring first, then the bundle's settings (if any)
            files.append(CONFIG_DIR / str(name))
            if (configs / str(name)).is_file():
                files.append(configs / str(name))
            continue
        files.append(p if p.is_file() else configs / p)
    for f in files:
        if not f.is_file():
            raise BundleError(f"config not found: {f}")
    return files


def config_file_arg(files: Sequence[str | os.PathLike]) -> str:
    """The ``--config_file`` value for ``python -m monai.bundle run``: a Python list literal."""
    return repr([str(f) for f in files])


#: heatmark's own top-level config keys and what they must hold: "bool", "number", "int>=N", "float>N" /
#: "float>=N", "number-or-list>0", or a tuple of allowed values (an enumeration)
CONFIG_VALUES: dict[str, Any] = {
    "amp": (True, False, "auto"),
    "amp_dtype": ("auto", "float16", "bfloat16"),
    "resume": "bool",
    "seed": "int>=0",
    "num_workers": "int>=0",
    "batch_size": "int>=1",
    "max_epochs": "int>=1",
    "val_interval": "int>=1",
    "early_stop_patience": "int>=0",
    "time_limit_minutes": "float>=0",
    "learning_rate": "float>0",
    "sigma_voxels": "float>0",
    "spacing_mm": "number-or-list>0",
    "train_cache_rate": "float>=0",
    "val_overlays": "int>=0",
    "eval_overlays": "int>=0",
    "decode_method": "decode-method",
    "patch_landmark_share": "float>=0",
    "sw_overlap": "float>=0",
    "sw_mode": ("gaussian", "constant"),
    "sw_batch_size": "int>=1",
    "sw_stream": "bool",
    "peak_min_distance_mm": "float>=0",
    "peak_threshold": "float>=0",
    # the cascade's stage 2 (configs/cascade.yaml)
    "fine_spacing_mm": "number-or-list>0",
    "fine_patch_size": "number-or-list>0",
    "fine_jitter_mm": "float>=0",
    "fine_outlier_prob": "float>=0",
    "fine_outlier_mm": "float>=0",
    "fine_min_confidence": "number",
    "fine_search_radius_mm": "float>=0",
    "fine_fallback_confidence": "number",
    "fine_batch_size": "int>=1",
    "fine_max_epochs": "int>=1",
    "fine_val_interval": "int>=1",
    "fine_time_limit_minutes": "float>=0",
    "fine_learning_rate": "float>0",
    "fine_batch_size_train": "int>=1",
    "fine_patches_per_case": "int>=1",
    "fine_num_val_landmarks": "int>=1",
    "fine_sigma_voxels": "float>0",
}


def _value_problem(key: str, value: Any, rule: Any) -> str | None:
    """Why ``value`` breaks ``rule`` (None when it does not). A string where a boolean belongs is
    always refused: ``--resume false`` on MONAI's command line arrives as the text 'false', which
    Python would take as true."""
    if isinstance(rule, tuple):
        ok = any(value is r if isinstance(r, bool) else value == r for r in rule)
        return None if ok else f"expected one of {', '.join(str(r).lower() for r in rule)}"
    if rule == "bool":
        return None if isinstance(value, bool) else "expected true or false"
    if rule == "decode-method":
        from heatmark.evaluation.decoding import METHODS  # lazy: `heatmark configs`/--help need no torch

        return None if value in METHODS else f"expected one of {', '.join(METHODS)}"
    if rule == "number":
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "expected a number"
    kind, _, bound = rule.partition(">")
    strict = not bound.startswith("=")
    low = float(bound.lstrip("="))
    values = value if kind == "number-or-list" and isinstance(value, (list, tuple)) and value else [value]
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind == "int" and not isinstance(v, int)):
            return f"expected {'an integer' if kind == 'int' else 'a number'}"
        if v < low or (strict and v == low):
            return f"expected a value {'>' if strict else '>='} {bound.lstrip('=')}"
    return None


def check_config(**values: Any) -> bool:
    """Check heatmark's config keys (:data:`CONFIG_VALUES`) as resolved by MONAI's parser; the base
    config calls it first in ``initialize``. Returns True, or stops the run with one line per bad
    key (``SystemExit``: no traceback).

    Example problem: ``resume: the text 'false', expected true or false; on MONAI's command line
    write --resume False (a YAML file: resume: false)``."""
    problems = []
    for key, value in values.items():
        problem = _value_problem(key, value, CONFIG_VALUES[key])
        if problem is None:
            continue
        text = isinstance(value, str)
        hint = ("; on MONAI's command line write booleans as True/False (YAML: true/false)"
                if text and value.strip().lower() in ("true", "false") else "")
        shown = f"the text {value!r}" if text else repr(value)
        problems.append(f"config key {key!r}: {shown}, {problem}{hint}")
    if problems:
        raise SystemExit("heatmark: bad bundle config values:\n  " + "\n  ".join(problems))
    return True


def _logging_file(root: Path) -> Path:
    own = root / "configs" / "logging.conf"
    return own if own.is_file() else CONFIG_DIR / "logging.conf"


def bundle_command(bundle: str | os.PathLike, workflow: str = "training", overlays: Sequence[str | os.PathLike] = (),
                   tracking: str | None = None, bundle_root: str | os.PathLike | None = None,
                   **overrides: Any) -> list[str]:
    """The ``python -m monai.bundle run`` command line (argv) of ``workflow``, for a subprocess.

    Args:
        bundle, workflow, overlays, tracking: as for :func:`run_bundle`.
        bundle_root: the run's ``bundle_root`` (where models/ and runs/ go), default ``bundle``.
        overrides: config keys, passed as ``--key value``.
    """
    root = check_bundle(bundle)
    files = bundle_config_files(root, workflow, overlays)
    cmd = [sys.executable, "-m", "monai.bundle", "run", WORKFLOWS[workflow][0],
           "--bundle_root", str(bundle_root if bundle_root is not None else root),
           "--meta_file", str(root / "configs" / "metadata.json"), "--config_file", config_file_arg(files),
           "--logging_file", str(_logging_file(root))]
    if tracking:
        cmd += ["--tracking", tracking]
    for key, value in overrides.items():
        cmd += [f"--{key}", str(value)]
    return cmd


def run_bundle(bundle: str | os.PathLike, workflow: str = "training", overlays: Sequence[str | os.PathLike] = (),
               tracking: str | None = None, **overrides: Any) -> Any:
    """Run ``workflow`` of ``bundle`` in this process, as ``python -m monai.bundle run`` would.

    Args:
        bundle: the bundle folder.
        workflow: one of :data:`WORKFLOWS`.
        overlays: overlay configs after the bundle's (see :func:`bundle_config_files`).
        tracking: ``"mlflow"`` to let MONAI patch the engines' handlers for MLflow, or None.
        overrides: config keys to replace (``dataset_dir=...``, ``max_epochs=...``).
    """
    from monai.bundle import run as monai_run  # lazy: `heatmark configs` and --help need no MONAI (seconds)

    root = check_bundle(bundle)
    files = bundle_config_files(root, workflow, overlays)
    kwargs: dict[str, Any] = {"tracking": tracking} if tracking else {}
    overrides.setdefault("config_files", [str(f) for f in files])  # recorded in the model file
    return monai_run(run_id=WORKFLOWS[workflow][0], bundle_root=str(root),
                     meta_file=str(root / "configs" / "metadata.json"), config_file=[str(f) for f in files],
                     logging_file=str(_logging_file(root)), **kwargs, **overrides)


# ---- heatmark metadata: large_files.yml and eval_metrics ------------------------------------------

#: MONAI's large-file list, in the bundle folder
LARGE_FILES = "large_files.yml"
#: the model it describes, relative to the bundle (base.yaml's ckpt_path)
MODEL_FILE = "models/model.pt"
#: where `run evaluating` writes its summary, relative to the bundle (evaluate.yaml's eval_dir)
EVAL_METRICS_FILE = "runs/eval/metrics.json"


def eval_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """``metadata.json``'s ``eval_metrics`` from an evaluation's ``metrics.json``
    (:func:`heatmark.evaluation.metrics.summarize`): errors in mm, SDR and outlier shares in percent,
    case and landmark counts. A value that is not a finite number is left out."""
    out: dict[str, Any] = {}
    for key, name in (("mean", "mean_radial_error_mm"), ("median", "median_radial_error_mm"),
                      ("sd", "sd_radial_error_mm"), ("max", "max_radial_error_mm")):
        out[name] = metrics.get(key)
    for key, value in metrics.items():
        if m := re.fullmatch(r"sdr_([0-9.]+)mm", str(key)):
            out[f"sdr_{m.group(1)}mm_percent"] = value
        elif m := re.fullmatch(r"outliers_pct_([0-9.]+)mm", str(key)):
            out[f"outliers_{m.group(1)}mm_percent"] = value
    out["n_cases"] = metrics.get("n_cases")
    out["n_landmarks"] = metrics.get("n_landmarks")
    return {k: v for k, v in out.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def _replace_eval_metrics(text: str, values: dict[str, Any], path: Path) -> str:
    """``text`` (metadata.json) with only the value of its top-level ``eval_metrics`` replaced (added
    at the end when absent); every other byte is kept."""
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise BundleError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise BundleError(f"{path}: expected a JSON object")
    block = json.dumps(values, indent=4).replace("\n", "\n    ")
    expected = {**doc, "eval_metrics": values}
    decoder = json.JSONDecoder()
    for m in re.finditer(r'"eval_metrics"\s*:\s*', text):
        try:
            _, end = decoder.raw_decode(text, m.end())
        except ValueError:
            continue
        new = text[:m.end()] + block + text[end:]
        with contextlib.suppress(ValueError):
            if json.loads(new) == expected:
                return new
    if "eval_metrics" in doc:  # written in a way we do not find: the whole file, re-indented
        return json.dumps(expected, indent=4) + "\n"
    body = text.rstrip()
    if not body.endswith("}"):
        raise BundleError(f"{path}: expected a JSON object")
    sep = "," if doc else ""
    return body[:-1].rstrip() + f'{sep}\n    "eval_metrics": {block}\n}}\n'


def _large_files_text(bundle: Path, model: Path) -> tuple[str, dict]:
    """The new ``large_files.yml``: the entry of :data:`MODEL_FILE` with the model's SHA-256 (empty
    while there is no model), other entries and an existing ``url`` kept."""
    path = bundle / LARGE_FILES
    entries: list[dict] = []
    if path.is_file():
        try:
            doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise BundleError(f"{path} is not valid YAML: {e}") from None
        entries = list(doc.get("large_files") or []) if isinstance(doc, dict) else []
        if not all(isinstance(e, dict) for e in entries):
            raise BundleError(f"{path}: large_files must be a list of entries with path, url, hash_val, hash_type")
    entry = next((e for e in entries if e.get("path") == MODEL_FILE), None)
    if entry is None:
        entry = {"path": MODEL_FILE, "url": ""}
        entries.insert(0, entry)
    entry["url"] = entry.get("url") or ""
    entry["hash_val"] = sha256_file(model) if model.is_file() else ""
    entry["hash_type"] = "sha256"
    header = ("# MONAI bundle large files (python -m monai.bundle download_large_files --bundle_path BUNDLE).\n"
              "# Written by `heatmark metadata BUNDLE` after training; hash_val is empty while there is no trained\n"
              "# model, and url is empty until the model is published somewhere (set it by hand; it is kept).\n")
    return header + yaml.safe_dump({"large_files": entries}, sort_keys=False), entry


def update_metadata(bundle: str | os.PathLike, metrics: str | os.PathLike | None = None) -> list[str]:
    """Record the bundle's trained model in its MONAI files; returns one line per file, saying what
    was done.

    - ``BUNDLE/large_files.yml``: ``models/model.pt`` with ``hash_type: sha256`` and its
      ``hash_val`` (empty when there is no model yet).
    - ``BUNDLE/configs/metadata.json``: ``eval_metrics`` (:func:`eval_metrics`) from ``metrics``
      (default ``BUNDLE/runs/eval/metrics.json``, what ``run evaluating`` writes); left as it is
      when there is no such file.

    Raises:
        BundleError: no bundle, a broken metadata.json or large_files.yml, or an evaluation older
            than the model (it did not evaluate this model: run evaluating again).
    """
    root = check_bundle(bundle)
    model = root / MODEL_FILE
    text, entry = _large_files_text(root, model)
    atomic_write_text(root / LARGE_FILES, text)
    lines = [f"{root / LARGE_FILES}: {MODEL_FILE} " + (f"sha256 {entry['hash_val']}" if entry["hash_val"] else
                                                        "(no trained model yet: hash_val empty)")]
    metrics_path = Path(os.path.expanduser(os.fspath(metrics))) if metrics is not None else root / EVAL_METRICS_FILE
    meta_path = root / "configs" / "metadata.json"
    if not metrics_path.is_file():
        if metrics is not None:
            raise BundleError(f"metrics file not found: {metrics_path}")
        lines.append(f"{meta_path}: eval_metrics not updated (no {metrics_path}: run `python -m monai.bundle run "
                     "evaluating` first)")
        return lines
    if model.is_file() and metrics_path.stat().st_mtime < model.stat().st_mtime:
        raise BundleError(f"{metrics_path} is older than {model}: it evaluated an earlier model; run "
                          "`python -m monai.bundle run evaluating` again, then `heatmark metadata`")
    try:
        values = eval_metrics(json.loads(metrics_path.read_text(encoding="utf-8")))
    except (OSError, ValueError, AttributeError) as e:
        raise BundleError(f"cannot read the evaluation {metrics_path}: {e}") from None
    if not values:
        raise BundleError(f"{metrics_path} holds no metrics (expected mean, median, sdr_<r>mm ... in mm)")
    if not meta_path.is_file():
        raise BundleError(f"{meta_path} not found")
    atomic_write_text(meta_path, _replace_eval_metrics(meta_path.read_text(encoding="utf-8"), values, meta_path))
    lines.append(f"{meta_path}: eval_metrics from {metrics_path}: " +
                 ", ".join(f"{k} {v:.4g}" for k, v in values.items()))
    return lines


def _cmd_metadata(args: argparse.Namespace) -> int:
    for line in update_metadata(args.bundle, args.metrics):
        print(line)
    return 0


def add_metadata_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``heatmark metadata`` to ``subparsers`` (of ``argparse``); returns its parser."""
    p = subparsers.add_parser(
        "metadata", help="record the trained model in large_files.yml and the last evaluation in metadata.json",
        description="After training and `python -m monai.bundle run evaluating`: write BUNDLE/large_files.yml "
                    f"({MODEL_FILE} with its SHA-256, MONAI's large-file format) and fill eval_metrics of "
                    f"BUNDLE/configs/metadata.json from {EVAL_METRICS_FILE}. Files are written atomically.")
    p.add_argument("bundle", help="bundle folder")
    p.add_argument("--metrics", metavar="JSON", help=f"the evaluation's metrics.json (default BUNDLE/{EVAL_METRICS_FILE})")
    p.set_defaults(func=_cmd_metadata)
    return p
