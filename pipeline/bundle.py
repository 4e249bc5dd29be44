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
only states what differs. ``heatmark configs BUNDLE WORKFLOW [OVERLAY ...]`` prints the list for
``python -m monai.bundle run ... --config_file``; :func:`run_bundle` (in this process: ``heatmark
train``, the demo) and :func:`bundle_command` (a subprocess: benchmarks, tests) build on the same list.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["CONFIG_DIR", "CONFIG_VALUES", "WORKFLOWS", "BundleError", "check_config", "bundle_command", "bundle_config_files", "config_file_arg", "run_bundle",
           "check_bundle"]

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
        files.append(p if p.is_file() else configs / p)
    for f in files:
        if not f.is_file():
            raise BundleError(f"config not found: {f}")
    return files


def config_file_arg(files: Sequence[str | os.PathLike]) -> str:
    """The ``--config_file`` value for ``python -m monai.bundle run``: a Python list literal."""
    return repr([str(f) for f in files])


#: heatmark's own top-level config keys and what they must hold: "bool", "int>=N", "float>N" /
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
