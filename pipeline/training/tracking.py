"""Experiment tracking with MLflow, on top of MONAI's :class:`~monai.handlers.MLFlowHandler`.

MONAI does the core tracking: ``monai.bundle run ... --tracking mlflow`` appends an
``MLFlowHandler`` to ``train#handlers`` (per-iteration ``train_loss``, trainer metrics, the executed
config as artifact), ``validate#handlers`` (validation metrics per epoch) and
``evaluate#handlers``. This module adds what that handler does not do:

- :class:`MLflowExtrasHandler`: the run's parameters (network, sigma, learning rate, spacing,
  augmentation...), artifacts at the end of training (best model, evaluation CSV, plots) and
  evaluator metrics that no MLflow handler logs (e.g. per-landmark arrays), all into the run of
  the ``MLFlowHandler`` attached to the same engine;
- :func:`log_evaluation_artifacts`: evaluation outputs into an existing or a new run;
- :func:`default_tracking_uri`, :func:`check_tracking_uri`: the SQLite store. MLflow >= 3.13
  refuses the plain file store (a directory or ``file:`` URI), so every local store here is
  ``sqlite:///<abs dir>/mlruns.db`` with artifacts in ``<dir>/mlruns`` (MONAI's layout);
  :func:`prepare_store` creates it so that even MLflow's ``Default`` experiment keeps its artifacts
  there (MLflow would point it at ``./mlruns`` of whatever folder the first process ran in);
- :func:`run_name`, :func:`run_tags`: a training run is named after its bundle and overlays
  (``isbi2015_cephalometric+smoke``) and tagged with the git commit, the bundle's name and version,
  the dataset folder and the overlays;
- :func:`run_ui`, :func:`ui_command`: ``mlflow ui`` on such a store, stopped with its whole process
  group (no worker keeps the port).
"""

from __future__ import annotations

import logging
import numbers
import os
import ast
import posixpath
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import numpy as np
import torch
from ignite.engine import Events
from monai.utils import flatten_dict, path_to_sqlite_uri

from heatmark import __version__
from heatmark.training.model_file import _bundle_metadata

__all__ = [
    "STORE_FILE",
    "default_tracking_uri",
    "check_tracking_uri",
    "sqlite_path",
    "artifact_location",
    "prepare_store",
    "run_name",
    "run_tags",
    "find_mlflow_handler",
    "flatten_params",
    "MLflowExtrasHandler",
    "log_evaluation_artifacts",
    "ui_command",
    "run_ui",
]

logger = logging.getLogger(__name__)

#: File name of the SQLite tracking store inside a tracking directory.
STORE_FILE = "mlruns.db"

_MAX_KEY = 250  # mlflow.utils.validation.MAX_ENTITY_KEY_LENGTH
_MAX_PARAM_VALUE = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
_MAX_BATCH_PARAMS = 100  # mlflow.utils.validation.MAX_PARAMS_TAGS_PER_BATCH
_MAX_BATCH_METRICS = 1000
_FILE_STORE_MESSAGE = (
    "MLflow >= 3.13 refuses the plain file store (a directory or file: URI) as tracking backend; "
    "use a SQLite store, e.g. heatmark.training.tracking.default_tracking_uri(<dir>) -> 'sqlite:///<dir>/mlruns.db', "
    "or a remote tracking server URI (http(s)://...)"
)


# ----------------------------------------------------------------------------------------------
# tracking URIs


def _scheme(uri: str) -> str | None:
    """The URI scheme (``"sqlite"``, ``"file"``, ``"http"``...) or None for a plain path.

    A one-letter scheme is a Windows drive (``C:\\...``), i.e. a plain path.
    """
    m = re.match(r"^([A-Za-z][A-Za-z0-9+.\-]*):", uri)
    return m.group(1).lower() if m and len(m.group(1)) > 1 else None


def default_tracking_uri(directory: str | os.PathLike) -> str:
    """The SQLite tracking URI of a tracking directory: ``sqlite:///<abs dir>/mlruns.db``.

    MONAI's ``MLFlowHandler`` keeps the artifacts of such a store in ``<dir>/mlruns``. A path
    ending in ``.db`` is taken as the database file itself; a string that already is a non-file
    tracking URI (``sqlite:``, ``http(s):``, ``postgresql:``...) is returned unchanged.

    Raises:
        ValueError: a ``file:`` URI, or a directory that holds an MLflow file store (``meta.yaml``
            of experiment 0), which MLflow >= 3.13 refuses.
    """
    text = os.fspath(directory)
    scheme = _scheme(text)
    if scheme == "file":
        raise ValueError(f"tracking store {text!r}: {_FILE_STORE_MESSAGE}")
    if scheme is not None:
        return text
    path = Path(text).expanduser()
    if path.suffix == ".db":
        return path_to_sqlite_uri(path)
    for store in (path, path / "mlruns"):
        if (store / "0" / "meta.yaml").is_file():
            raise ValueError(f"{store} is an MLflow file store; {_FILE_STORE_MESSAGE}")
    return path_to_sqlite_uri(path / STORE_FILE)


def check_tracking_uri(uri: str | os.PathLike) -> str:
    """Validate an explicit tracking URI: returned unchanged unless it is a plain path or a
    ``file:`` URI, which raise ``ValueError`` (MLflow >= 3.13 refuses the file store; use
    :func:`default_tracking_uri` to turn a directory into a SQLite URI)."""
    text = os.fspath(uri)
    if _scheme(text) in (None, "file"):
        raise ValueError(f"tracking URI {text!r}: {_FILE_STORE_MESSAGE}")
    return text


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (percent-decoded), or None for other URIs."""
    if not uri.startswith("sqlite:///"):
        return None
    rest = unquote(uri[len("sqlite:///"):].split("?", 1)[0])
    return Path(rest)


def artifact_location(tracking_uri: str) -> str | None:
    """Artifact root of new experiments: ``<db dir>/mlruns`` as a file URI for a SQLite store (as
    MONAI's ``MLFlowHandler`` does), None (MLflow's choice) for other stores."""
    db = sqlite_path(tracking_uri)
    return None if db is None else (db.parent / "mlruns").absolute().as_uri()


def prepare_store(directory: str | os.PathLike) -> str:
    """The tracking URI of ``directory`` (:func:`default_tracking_uri`), creating a SQLite store
    that does not exist yet with its artifact root in ``<dir>/mlruns``.

    MLflow creates the ``Default`` experiment (id 0) with the database, its artifacts in the
    *current folder's* ``mlruns/`` unless told otherwise; created here, it points into the store's
    own folder, so nothing logged to it lands in the folder a training or ``mlflow models predict``
    happened to run in. Only rank 0 of a process group creates the store; other URIs are returned
    unchanged. (``base.yaml``: ``tracking_uri``.)
    """
    uri = default_tracking_uri(directory)
    db = sqlite_path(uri)
    if db is None or db.exists() or _is_not_rank0():
        return uri
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore  # lazy: mlflow is slow to import; only MLflow-tracked runs pay for it

    db.parent.mkdir(parents=True, exist_ok=True)
    store = SqlAlchemyStore(uri, artifact_location(uri))
    store.engine.dispose()  # release the file (Windows) before MONAI's client opens it
    return uri


# ----------------------------------------------------------------------------------------------
# run names and tags

#: config files of a training that are not overlays: heatmark's base config, the bundle's own
_NOT_OVERLAYS = ("base.yaml",)


def _argv_config_files(argv: Sequence[str]) -> list[str]:
    """The ``--config_file`` value of a ``python -m monai.bundle run`` command line: a Python/JSON
    list literal, a comma-separated list or one path; [] when absent or unreadable."""
    value = None
    for i, arg in enumerate(argv):
        if arg == "--config_file" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("--config_file="):
            value = arg.split("=", 1)[1]
    if not value:
        return []
    text = value.strip()
    if text.startswith(("[", "(")):
        try:
            return [str(f) for f in ast.literal_eval(text)]
        except (ValueError, SyntaxError):
            return []
    return [f.strip() for f in text.split(",") if f.strip()]


def _config_files(config_files: Sequence[str | os.PathLike] | None) -> list[str]:
    """``config_files`` (set by ``heatmark train``), else those of this process's
    ``python -m monai.bundle run`` command line."""
    files = [os.fspath(f) for f in config_files or ()]
    return files if files else _argv_config_files(sys.argv)


def _overlays(bundle_root: str | os.PathLike, config_files: Sequence[str | os.PathLike] | None) -> list[str]:
    """The overlays among a run's config files: every file after the bundle's ``configs/train.yaml``
    (heatmark's shipped workflow overlays such as ``evaluate.yaml`` included), or all files but
    heatmark's ``base.yaml`` when the bundle's file is not among them."""
    files = _config_files(config_files)
    own = (Path(bundle_root) / "configs" / "train.yaml").resolve()
    at = next((i for i, f in enumerate(files) if Path(f).resolve() == own), None)
    if at is not None:
        return files[at + 1:]
    return [f for f in files if Path(f).name not in _NOT_OVERLAYS and Path(f).name != "train.yaml"]


def run_name(bundle_root: str | os.PathLike, config_files: Sequence[str | os.PathLike] | None = None) -> str:
    """The MLflow run name of a bundle run: the bundle folder's name, then ``+<overlay>`` per
    overlay file (without ``.yaml``/``.json``), e.g. ``isbi2015_cephalometric+smoke`` or
    ``synthetic_dots+evaluate``. ``config_files``: the run's config files (``base.yaml``:
    ``@config_files``, which ``heatmark train`` sets); when empty, those of the ``python -m
    monai.bundle run ... --config_file`` command line of this process.

    MONAI's ``MLFlowHandler`` continues an unfinished run of that name (a killed training resumed)
    and otherwise starts a new one; runs of one name are told apart by their start time.
    """
    name = Path(os.path.abspath(os.fspath(bundle_root))).name or "bundle"
    stems = [Path(f).name.rsplit(".", 1)[0] if Path(f).suffix in (".yaml", ".yml", ".json") else Path(f).name
             for f in _overlays(bundle_root, config_files)]
    return "+".join([name, *stems])[:250]


def _git(folder: Path, *args: str) -> str | None:
    try:
        proc = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def git_state(folder: str | os.PathLike) -> dict[str, str]:
    """``{"commit": <sha>, "dirty": "true"/"false", "root": <repo folder>}`` of the git repository
    holding ``folder``; {} outside a repository or without git. Dirty = tracked files changed."""
    path = Path(folder).resolve()
    while not path.is_dir() and path != path.parent:
        path = path.parent
    commit = _git(path, "rev-parse", "HEAD")
    if not commit:
        return {}
    status = _git(path, "status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": "unknown" if status is None else str(bool(status)).lower(),
            "root": _git(path, "rev-parse", "--show-toplevel") or str(path)}


def run_tags(bundle_root: str | os.PathLike, config_files: Sequence[str | os.PathLike] | None = None,
             dataset_dir: str | os.PathLike | None = None) -> dict[str, str]:
    """The tags of a bundle run (``base.yaml``: ``mlflow_tags``, logged by :class:`MLflowExtrasHandler`):

    - ``heatmark.bundle.git.commit`` / ``heatmark.bundle.git.dirty`` (tracked files changed): the
      git repository holding the bundle, when it is in one; ``heatmark.code.git.commit`` /
      ``heatmark.code.git.dirty``: the one holding heatmark's code (a source checkout);
      ``mlflow.source.git.commit`` (which the MLflow UI shows): the bundle's commit, else the code's;
    - ``heatmark.bundle.name`` / ``heatmark.bundle.version``: ``configs/metadata.json``;
      ``heatmark.bundle.root``: the bundle folder (absolute);
    - ``heatmark.dataset_dir``: the dataset folder (absolute), when given;
    - ``heatmark.overlays``: the overlay files, comma-separated (``none`` without overlays);
    - ``heatmark.version``.
    """
    root = Path(os.path.abspath(os.fspath(bundle_root)))
    meta = _bundle_metadata(root)
    tags = {"heatmark.bundle.root": str(root), "heatmark.overlays": ",".join(_overlays(root, config_files)) or "none"}
    for key in ("name", "version"):
        if meta.get(key) is not None:
            tags[f"heatmark.bundle.{key}"] = str(meta[key])
    if dataset_dir is not None and os.fspath(dataset_dir).strip():
        tags["heatmark.dataset_dir"] = os.path.abspath(os.fspath(dataset_dir))
    for what, folder in (("code", Path(__file__).parent), ("bundle", root)):
        state = git_state(folder)
        if state:
            tags[f"heatmark.{what}.git.commit"] = state["commit"]
            tags[f"heatmark.{what}.git.dirty"] = state["dirty"]
            tags["mlflow.source.git.commit"] = state["commit"]  # the bundle's wins (set last)
    tags["heatmark.version"] = str(__version__)
    return {_clean_key(k): v[:_MAX_PARAM_VALUE] for k, v in tags.items()}


# ----------------------------------------------------------------------------------------------
# engines and ranks


def _is_not_rank0() -> bool:
    return bool(torch.distributed.is_available() and torch.distributed.is_initialized()
                and torch.distributed.get_rank() > 0)


def _unwrap(handler: Any) -> Any:
    """The user's handler behind ignite's event-filter wrapper (``__wrapped__``/``_parent``)."""
    seen = 0
    while seen < 8:
        seen += 1
        inner = getattr(handler, "__wrapped__", None)
        if inner is None:
            parent = getattr(handler, "_parent", None)
            inner = parent() if callable(parent) else None
        if inner is None:
            return handler
        handler = inner
    return handler


def _mlflow_handler_class() -> type | None:
    try:
        from monai.handlers import MLFlowHandler  # lazy: MONAI's MLflow handler needs mlflow, optional here
    except ImportError:  # pragma: no cover - MONAI without ignite/mlflow
        return None
    return MLFlowHandler


def find_mlflow_handler(engine: Any) -> Any | None:
    """MONAI's ``MLFlowHandler`` attached to the ignite ``engine``, or None.

    Looks through ``engine._event_handlers`` for a bound method (possibly wrapped by an event
    filter) whose ``__self__`` is an ``MLFlowHandler``; with several, the first attached to
    ``Events.STARTED`` (the one that owns a run) wins.
    """
    cls = _mlflow_handler_class()
    handlers = getattr(engine, "_event_handlers", None)
    if cls is None or not handlers:
        return None
    found = []
    for event, entries in list(handlers.items()):
        for entry in list(entries):
            owner = getattr(_unwrap(entry[0]), "__self__", None)
            if isinstance(owner, cls) and all(owner is not f for _, f in found):
                found.append((event, owner))
    if not found:
        return None
    for event, owner in found:
        if event == Events.STARTED:
            return owner
    return found[0][1]


# ----------------------------------------------------------------------------------------------
# parameters and metrics


def _clean_key(key: str) -> str:
    """An MLflow-valid param / metric name (alphanumerics and ``_ - . / space``, no path tricks
    such as ``a/../b``), at most 250 characters."""
    k = re.sub(r"[^\w.\- /]", "_", str(key)).strip()
    k = re.sub(r"/+", "/", k).strip("/")
    if posixpath.normpath(k) != k or k.startswith(".."):
        k = k.replace("/", "_")
    if not k or k.startswith("."):
        k = "_" + k
    return k[:_MAX_KEY]


def _param_text(value: Any) -> str:
    """Readable text of one parameter value (truncated to MLflow's 6000 characters)."""
    if isinstance(value, str):
        text = value
    elif value is None or isinstance(value, (bool, int, float)):
        text = str(value)
    elif isinstance(value, np.generic):
        text = str(value.item())
    elif isinstance(value, os.PathLike):
        text = os.fspath(value)
    elif isinstance(value, (torch.dtype, torch.device)):
        text = str(value)
    elif isinstance(value, torch.Tensor):
        v = value.detach().cpu()
        text = str(v.tolist()) if v.numel() <= 64 else f"tensor(shape={list(v.shape)}, dtype={v.dtype})"
    elif isinstance(value, np.ndarray):
        text = str(value.tolist()) if value.size <= 64 else f"array(shape={list(value.shape)}, dtype={value.dtype})"
    elif isinstance(value, (list, tuple, set, frozenset)):
        text = "[" + ", ".join(_param_text(v) for v in value) + "]"
    elif isinstance(value, type) or callable(value) and hasattr(value, "__qualname__"):
        text = f"{getattr(value, '__module__', '')}.{value.__qualname__}".lstrip(".")
    elif isinstance(value, (torch.nn.Module, torch.optim.Optimizer)):
        text = type(value).__name__
    else:
        text = repr(value)
        if " at 0x" in text or len(text) > 200:
            text = type(value).__name__
    return text if len(text) <= _MAX_PARAM_VALUE else text[: _MAX_PARAM_VALUE - 3] + "..."


def _is_plain(value: Any) -> bool:
    return value is None or isinstance(value, (str, bool, numbers.Number, np.generic, os.PathLike))


def flatten_params(params: Mapping[str, Any], prefix: str = "", sep: str = ".") -> dict[str, str]:
    """Flatten nested parameters into MLflow params ``{"a.b": "text"}``.

    Nested mappings are joined with ``sep``; lists holding mappings are flattened by index
    (``augmentation.0._target_``); other lists, tuples, arrays and tensors become ``"[a, b]"``;
    modules and optimizers their class name; classes and functions their qualified name; objects
    whose ``repr`` is an address their class name. Keys are made MLflow-valid.
    """
    out: dict[str, str] = {}

    def walk(value: Any, key: str) -> None:
        if isinstance(value, Mapping):
            if not value and key:
                out[_clean_key(key)] = "{}"
            for k, v in value.items():
                walk(v, f"{key}{sep}{k}" if key else str(k))
        elif isinstance(value, (list, tuple)) and any(isinstance(v, Mapping) for v in value):
            for i, v in enumerate(value):
                walk(v, f"{key}{sep}{i}")
        else:
            out[_clean_key(key or "value")] = _param_text(value)

    walk(params, prefix)
    return out


def _scalar(value: Any) -> float | None:
    """A Python float for a real scalar (number, one-element array or tensor); None otherwise
    (bools, strings, complex numbers, larger arrays)."""
    if isinstance(value, (bool, str, np.bool_)):
        return None
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        v = value.item()
    elif isinstance(value, np.ndarray) and value.size == 1:
        v = value.item()
    else:
        return None
    return float(v) if isinstance(v, numbers.Real) and not isinstance(v, bool) else None


def _metric_items(metrics: Mapping[str, Any], names: Sequence[str] | None = None
                  ) -> Iterator[tuple[bool, str, float]]:
    """``(scalar, key, value)`` for every real number in ``metrics``.

    Keys follow MONAI's ``MLFlowHandler`` (``monai.utils.flatten_dict``): an entry of a nested
    mapping is named by its own key, so a metric has the same name whoever logs it. Real scalars
    give ``scalar=True`` (MONAI's handler would log them too); 1-D arrays / tensors / lists of
    numbers, which it cannot log, are expanded to ``<key>_<name>`` (``names`` of the same length)
    or ``<key>_<i>`` with ``scalar=False``.
    """

    def walk(value: Any, key: str) -> Iterator[tuple[bool, str, float]]:
        if isinstance(value, Mapping):
            for k, v in value.items():
                yield from walk(v, str(k))
            return
        s = _scalar(value)
        if s is not None:
            yield True, key, s
            return
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        if isinstance(value, (list, tuple)):
            try:
                value = np.asarray(value, dtype=np.float64)
            except (TypeError, ValueError):
                return
        if isinstance(value, np.ndarray) and value.ndim == 1 and np.issubdtype(value.dtype, np.number) \
                and not np.issubdtype(value.dtype, np.complexfloating):
            labels = list(names) if names is not None and len(names) == value.size else range(value.size)
            for label, v in zip(labels, value.tolist()):
                yield False, f"{key}_{label}", float(v)

    yield from walk(metrics, "")


# ----------------------------------------------------------------------------------------------
# the ignite handler


class MLflowExtrasHandler:
    """Parameters, artifacts and extra evaluator metrics, logged into MONAI's MLflow run.

    Attach it to the trainer (in a bundle: an entry of ``train#handlers``); it finds MONAI's
    ``MLFlowHandler`` on the same engine *at event time* (:func:`find_mlflow_handler`) and logs
    into that handler's run through the handler's ``client``: ``cur_run.info.run_id``, which
    MONAI sets at ``Events.STARTED`` (it picks the latest unfinished run of the experiment or
    creates one) and clears at ``COMPLETED`` when ``close_on_complete`` (as in MONAI's default
    trainer settings). The run id is remembered once seen, so both attachment orders work:

    - ``STARTED``: forget the previous run; if the run exists already (this handler attached
      after MONAI's), log the parameters now;
    - ``ITERATION_COMPLETED`` / ``EPOCH_COMPLETED``: log the parameters if not yet done (attached
      before MONAI's handler: its run exists from the first iteration on);
    - evaluator ``COMPLETED`` (when ``evaluator`` is given, i.e. after each validation): every real
      scalar of ``evaluator.state.metrics`` that no ``MLFlowHandler`` on the evaluator logs (e.g.
      per-landmark arrays, expanded to ``<key>_<name>`` with ``names`` or ``<key>_<i>``; entries of
      nested mappings named by their own key, as MONAI names them), with step = the trainer's
      epoch;
    - ``COMPLETED``: the ``artifacts`` that exist (files; folders recursively under their name),
      each under ``artifact_path``; then ``model_logger(client, run_id)`` (``base.yaml``:
      :class:`heatmark.predict.mlflow_model.MLflowModelLogger`, the best model as an MLflow model);
    - a resumed training (``engine.state.resumed_from``, set by
      :class:`heatmark.training.TrainingCheckpoint`): tags linking the run to the previous one
      (:meth:`_log_resume`). The run id is kept in ``engine.state.mlflow_run_id`` for the
      checkpoint's ``run.json``.

    Note that MONAI's handler continues the oldest unfinished run of the experiment that has the
    configured ``run_name`` (any unfinished run when it is None), so after a crash or kill the
    resumed training usually logs into the same run (which a killed process could not close, so it
    stays ``RUNNING`` until then).

    Parameters already in the run (a resumed run, MONAI's ``max_epochs``) are not logged again; a
    different value is reported by a warning (MLflow parameters are immutable). Logging problems
    are logged as warnings and never stop training. Without an ``MLFlowHandler`` (tracking off)
    the handler does nothing (debug log); neither does it on ranks other than 0 of an initialised
    process group.

    Args:
        params: parameters, nested allowed (:func:`flatten_params`): network name, sigma, learning
            rate, spacing, augmentation settings...
        artifacts: files or folders to log when training completes (absent ones are skipped).
        evaluator: the validation engine, to log its extra metrics after each validation.
        names: landmark names, to label per-landmark metric arrays.
        artifact_path: folder in the run's artifacts (default: the top level).
        tags: run tags (:func:`run_tags`), set with the parameters.
        model_logger: called as ``model_logger(client, run_id)`` when training completes, after the
            artifacts (failures are warnings, as for everything here).
    """

    def __init__(
        self,
        params: Mapping[str, Any] | None = None,
        artifacts: Sequence[str | os.PathLike] | str | os.PathLike | None = None,
        evaluator: Any | None = None,
        names: Sequence[str] | None = None,
        artifact_path: str | None = None,
        tags: Mapping[str, Any] | None = None,
        model_logger: Any | None = None,
    ) -> None:
        self.params = flatten_params(params or {})
        self.tags = {_clean_key(k): _param_text(v) for k, v in (tags or {}).items()}
        self.model_logger = model_logger
        if isinstance(artifacts, (str, os.PathLike)):
            artifacts = [artifacts]
        self.artifacts = [Path(a) for a in artifacts or () if a]
        self.evaluator = evaluator
        self.names = None if names is None else [str(n) for n in names]
        self.artifact_path = artifact_path
        self._engine: Any = None
        self._client: Any = None
        self._run_id: str | None = None
        self._params_logged = False
        self._logged_steps: set[tuple[str, int]] = set()
        self._warned_no_handler = False

    # -- attaching

    def attach(self, engine: Any) -> None:
        """Register on ``engine`` (the trainer) and, when given, on the evaluator."""
        if _is_not_rank0():
            logger.debug("MLflowExtrasHandler: not rank 0, not attached")
            return
        self._engine = engine
        for event, fn in ((Events.STARTED, self._started), (Events.ITERATION_COMPLETED, self._iteration_completed),
                          (Events.EPOCH_COMPLETED, self._epoch_completed), (Events.COMPLETED, self._completed)):
            if not engine.has_event_handler(fn, event):
                engine.add_event_handler(event, fn)
        if self.evaluator is not None and not self.evaluator.has_event_handler(self._validation_completed,
                                                                                Events.COMPLETED):
            self.evaluator.add_event_handler(Events.COMPLETED, self._validation_completed)

    # -- the run

    def _target(self) -> tuple[Any, str] | None:
        """``(client, run_id)`` of MONAI's run, or None (no handler, no run yet)."""
        handler = find_mlflow_handler(self._engine) if self._engine is not None else None
        if handler is None and self.evaluator is not None:
            handler = find_mlflow_handler(self.evaluator)
        if handler is None:
            if not self._warned_no_handler:
                logger.debug("MLflowExtrasHandler: no MLFlowHandler attached (tracking off); nothing logged")
                self._warned_no_handler = True
            return None
        run = getattr(handler, "cur_run", None)
        if run is not None:
            self._client, self._run_id = handler.client, run.info.run_id
            state = getattr(self._engine, "state", None)
            if state is not None:  # TrainingCheckpoint records it beside the checkpoints (run.json)
                state.mlflow_run_id = self._run_id
        elif self._client is None:
            self._client = handler.client
        return None if self._run_id is None else (self._client, self._run_id)

    def _safely(self, what: str, fn: Any, *args: Any) -> None:
        try:
            fn(*args)
        except Exception as e:  # tracking must never stop a training
            logger.warning("MLflowExtrasHandler: could not log %s: %s: %s", what, type(e).__name__, e)

    # -- events

    def _started(self, engine: Any) -> None:
        if _is_not_rank0():
            return
        self._run_id, self._params_logged = None, False
        self._logged_steps.clear()
        self._ensure_params()

    def _iteration_completed(self, engine: Any) -> None:
        if not self._params_logged:
            self._ensure_params()

    def _epoch_completed(self, engine: Any) -> None:
        if not self._params_logged:
            self._ensure_params()

    def _completed(self, engine: Any) -> None:
        if _is_not_rank0():
            return
        self._ensure_params()
        target = self._target()
        if target is not None and self.artifacts:
            self._safely("artifacts", self._log_artifacts, *target)
        if target is not None and self.model_logger is not None:
            self._safely("the MLflow model", self.model_logger, *target)

    def _validation_completed(self, evaluator: Any) -> None:
        if _is_not_rank0():
            return
        target = self._target()
        if target is None:
            return
        self._ensure_params()
        self._safely("evaluator metrics", self._log_evaluator_metrics, evaluator, *target)

    # -- logging

    def _ensure_params(self) -> None:
        if self._params_logged or _is_not_rank0():
            return
        target = self._target()
        if target is None:
            return
        self._params_logged = True  # once per run, also when logging fails
        if self.params:
            self._safely("params", self._log_params, *target)
        if self.tags:
            self._safely("tags", self._log_tags, *target)
        if getattr(getattr(self._engine, "state", None), "resumed_from", None):
            self._safely("resume tags", self._log_resume, *target)

    def _log_resume(self, client: Any, run_id: str) -> None:
        """Link a resumed training to the run it continues: tags ``heatmark.resumed_from_run`` (the
        MLflow run recorded beside the checkpoint; the same run when MONAI's handler picked it up
        again), ``heatmark.resumed_from_checkpoint``, ``heatmark.resumed_at_iteration``, and the
        param ``resumed_at_iteration`` unless the run already has one (params are immutable)."""
        from mlflow.entities import Param, RunTag  # lazy: mlflow is slow to import; only MLflow-tracked runs pay for it

        state = self._engine.state
        iteration = str(int(getattr(state, "resumed_at_iteration", 0) or 0))
        tags = [RunTag("heatmark.resumed_from_checkpoint", str(state.resumed_from)),
                RunTag("heatmark.resumed_at_iteration", iteration)]
        old = getattr(state, "resumed_from_run", None)
        if old:
            tags.append(RunTag("heatmark.resumed_from_run", str(old)))
        params = [] if "resumed_at_iteration" in client.get_run(run_id).data.params else \
            [Param("resumed_at_iteration", iteration)]
        client.log_batch(run_id=run_id, params=params, tags=tags)
        logger.info("MLflow run %s: resumed from %s at iteration %s%s", run_id, state.resumed_from, iteration,
                    f" (previous run {old})" if old else "")

    def _log_params(self, client: Any, run_id: str) -> None:
        from mlflow.entities import Param  # lazy: mlflow is slow to import; only MLflow-tracked runs pay for it

        existing = client.get_run(run_id).data.params
        new = {}
        for key, value in self.params.items():
            if key not in existing:
                new[key] = value
            elif existing[key] != value:
                logger.warning("MLflowExtrasHandler: run %s already has param %r = %r; not replaced by %r",
                               run_id, key, existing[key], value)
        items = [Param(k, v) for k, v in new.items()]
        for i in range(0, len(items), _MAX_BATCH_PARAMS):
            client.log_batch(run_id=run_id, params=items[i:i + _MAX_BATCH_PARAMS])

    def _log_tags(self, client: Any, run_id: str) -> None:
        from mlflow.entities import RunTag  # lazy: mlflow is slow to import; only MLflow-tracked runs pay for it

        items = [RunTag(k, v) for k, v in self.tags.items()]
        for i in range(0, len(items), _MAX_BATCH_PARAMS):
            client.log_batch(run_id=run_id, tags=items[i:i + _MAX_BATCH_PARAMS])

    def _log_artifacts(self, client: Any, run_id: str) -> None:
        for path in self.artifacts:
            if path.is_file():
                client.log_artifact(run_id, str(path), self.artifact_path)
            elif path.is_dir():
                sub = path.name if self.artifact_path is None else f"{self.artifact_path}/{path.name}"
                client.log_artifacts(run_id, str(path), sub)
            else:
                logger.debug("MLflowExtrasHandler: artifact %s does not exist; skipped", path)

    def _monai_logged_keys(self, evaluator: Any) -> set[str]:
        """Keys of ``evaluator.state.metrics`` that an MLFlowHandler on the evaluator logs itself."""
        handler = find_mlflow_handler(evaluator)
        if handler is None or not getattr(handler, "epoch_log", False) or handler.epoch_logger is not None:
            return set()
        return set(flatten_dict(dict(evaluator.state.metrics or {})))

    def _log_evaluator_metrics(self, evaluator: Any, client: Any, run_id: str) -> None:
        from mlflow.entities import Metric  # lazy: mlflow is slow to import; only MLflow-tracked runs pay for it

        metrics = getattr(evaluator.state, "metrics", None) or {}
        trainer = self._engine
        step = int(getattr(getattr(trainer, "state", None), "epoch", 0) or evaluator.state.epoch or 0)
        skip = self._monai_logged_keys(evaluator)
        now = int(time.time() * 1000)
        items = []
        for scalar, name, value in _metric_items(metrics, self.names):
            key = _clean_key(name)
            if (scalar and name in skip) or (key, step) in self._logged_steps:
                continue
            self._logged_steps.add((key, step))
            items.append(Metric(key, value, now, step))
        for i in range(0, len(items), _MAX_BATCH_METRICS):
            client.log_batch(run_id=run_id, metrics=items[i:i + _MAX_BATCH_METRICS])


# ----------------------------------------------------------------------------------------------
# evaluation outputs


def _experiment_id(client: Any, name: str, tracking_uri: str) -> str:
    from mlflow.exceptions import MlflowException  # lazy: mlflow is slow to import; only MLflow-tracked runs pay for it

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location(tracking_uri))
        except MlflowException:  # created meanwhile by another process
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage != "active":
        raise ValueError(f"MLflow experiment {name!r} is deleted; restore it or choose another name")
    return experiment.experiment_id


def log_evaluation_artifacts(
    tracking_uri: str,
    run_id: str | None,
    experiment_name: str,
    files: Mapping[str, str | os.PathLike],
    metrics: Mapping[str, Any] | None = None,
    artifact_path: str | None = "evaluation",
    run_name: str | None = None,
) -> str:
    """Attach evaluation outputs to an MLflow run (e.g. the result of
    :func:`heatmark.evaluation.reports.write_evaluation`).

    Args:
        tracking_uri: the store (:func:`check_tracking_uri`; a directory is turned into its
            SQLite URI by :func:`default_tracking_uri`).
        run_id: the run to add to (e.g. the training run); None: a new run in ``experiment_name``
            (created if needed), named ``run_name`` (default ``evaluate_<date>_<time>``), finished
            afterwards.
        experiment_name: the experiment of a new run (ignored with ``run_id``).
        files: ``{name: path}``; files are logged under ``artifact_path``, folders recursively under
            ``artifact_path/<folder name>``.
        metrics: optional summary (e.g. the ``metrics.json`` contents): its real scalars are logged
            as metrics (entries of nested mappings by their own key, as MONAI does), step 0; text
            entries are ignored.
        artifact_path: folder in the run's artifacts (None: the top level).

    Returns:
        The run id.

    Raises:
        FileNotFoundError: a path in ``files`` does not exist (nothing is logged then).
        ValueError: a file-store tracking URI.
    """
    from mlflow import MlflowClient  # lazy: mlflow is slow to import; only MLflow-tracked runs pay for it
    from mlflow.entities import Metric, RunStatus  # lazy: mlflow is slow to import; only MLflow-tracked runs pay for it

    uri = default_tracking_uri(tracking_uri) if _scheme(os.fspath(tracking_uri)) is None else \
        check_tracking_uri(tracking_uri)
    paths = {name: Path(p) for name, p in files.items()}
    missing = [f"{name}: {p}" for name, p in paths.items() if not p.exists()]
    if missing:
        raise FileNotFoundError(f"evaluation outputs not found: {', '.join(missing)}")
    if _is_not_rank0():
        return run_id or ""
    client = MlflowClient(tracking_uri=uri)
    created = run_id is None
    if created:
        exp = _experiment_id(client, experiment_name, uri)
        run = client.create_run(exp, run_name=run_name or f"evaluate_{time.strftime('%Y%m%d_%H%M%S')}")
        run_id = run.info.run_id
    try:
        for name, path in paths.items():
            if path.is_dir():
                sub = path.name if artifact_path is None else f"{artifact_path}/{path.name}"
                client.log_artifacts(run_id, str(path), sub)
            else:
                client.log_artifact(run_id, str(path), artifact_path)
        if metrics:
            now = int(time.time() * 1000)
            items = [Metric(_clean_key(key), value, now, 0) for _, key, value in _metric_items(metrics)]
            for i in range(0, len(items), _MAX_BATCH_METRICS):
                client.log_batch(run_id=run_id, metrics=items[i:i + _MAX_BATCH_METRICS])
    except BaseException:
        if created:
            client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))
        raise
    if created:
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))
    return run_id


# ----------------------------------------------------------------------------------------------
# the UI


def _store(store: str | os.PathLike) -> tuple[str, Path | None]:
    """``(tracking URI, SQLite database file or None)`` of a tracking directory, ``.db`` file or URI."""
    text = os.fspath(store)
    uri = default_tracking_uri(text) if _scheme(text) is None else check_tracking_uri(text)
    return uri, sqlite_path(uri)


def ui_command(store: str | os.PathLike, host: str = "127.0.0.1", port: int = 5000, workers: int = 1) -> list[str]:
    """The ``mlflow ui`` command line for a tracking directory (its ``mlruns.db``), a ``.db`` file
    or a tracking URI: ``[python, -m, mlflow, ui, --backend-store-uri, <uri>,
    [--default-artifact-root, <dir>/mlruns,] --host, <host>, --port, <port>, --workers, <n>]`` (the
    artifact root, for experiments created from the UI, only for SQLite stores; it is where MONAI
    puts them).

    Raises:
        ValueError: ``workers`` < 1, or a file-store URI.
    """
    if int(workers) < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}")
    uri, db = _store(store)
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri]
    if db is not None:
        cmd += ["--default-artifact-root", artifact_location(uri) or ""]
    return cmd + ["--host", str(host), "--port", str(int(port)), "--workers", str(int(workers))]


#: signals ``heatmark ui`` passes on to the MLflow server's process group
_FORWARDED = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


def _group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` is still running (zombies, which hold no port, do not count)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a process we may not signal: it exists
        return True
    proc = Path("/proc")
    if not proc.is_dir():
        return True
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":  # fields: state, ppid, pgrp, ...
            return True
    return False


def _signal_group(proc: subprocess.Popen, signum: int) -> None:
    """Send ``signum`` to the server's process group (POSIX) or to the server process."""
    try:
        if os.name == "posix":
            os.killpg(proc.pid, signum)
        else:  # pragma: no cover - Windows: no process groups to signal
            proc.terminate()
    except (ProcessLookupError, PermissionError):
        pass


def _stop_group(proc: subprocess.Popen, timeout: float) -> None:
    """End the server and everything it started: SIGTERM to its process group, then SIGKILL to
    what is left after ``timeout`` seconds; reaps the server."""
    if os.name != "posix":  # pragma: no cover
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return
    pgid = proc.pid  # start_new_session: the server leads its own group
    if proc.poll() is None or _group_alive(pgid):
        _signal_group(proc, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc.poll()
        if proc.returncode is not None and not _group_alive(pgid):
            return
        time.sleep(0.1)
    _signal_group(proc, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + timeout
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)


def run_ui(store: str | os.PathLike, host: str = "127.0.0.1", port: int = 5000, workers: int = 1,
           stop_timeout: float = 10.0) -> int:
    """Serve the MLflow UI of ``store`` (:func:`ui_command`) until interrupted; returns the exit
    status (0 when stopped by a signal).

    The server runs in its own process group (session). SIGINT (Ctrl+C), SIGTERM and SIGHUP sent to
    this process are passed on to that whole group, and when the server ends, or this function
    leaves for any reason, what is left of the group gets SIGTERM and, after ``stop_timeout``
    seconds, SIGKILL: no worker keeps the port after ``heatmark ui`` ends.

    Raises:
        FileNotFoundError: no SQLite database at the store ("no MLflow runs found at ...").
        ValueError: ``workers`` < 1, or a file-store URI.
    """
    uri, db = _store(store)
    if db is not None and not db.is_file():
        raise FileNotFoundError(f"no MLflow runs found at {db} (tracking URI {uri}); train first with "
                                "`heatmark train` (MLflow tracking on), or pass the folder holding mlruns.db")
    cmd = ui_command(store, host, port, workers)
    shown = "localhost" if host in ("0.0.0.0", "::") else host
    print(f"MLflow UI of {uri} at http://{shown}:{int(port)}  (Ctrl+C to stop)", flush=True)
    proc = subprocess.Popen(cmd, start_new_session=os.name == "posix")
    stopped: list[int] = []

    def forward(signum: int, frame: Any) -> None:
        stopped.append(signum)
        _signal_group(proc, signum)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {s: signal.signal(s, forward) for s in _FORWARDED}
    try:
        while True:
            try:
                code = proc.wait()
                break
            except KeyboardInterrupt:  # no handler installed (not the main thread)
                stopped.append(signal.SIGINT)
                _signal_group(proc, signal.SIGINT)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _stop_group(proc, stop_timeout)
    return 0 if stopped else code
