"""The resume state of an OUTPUT folder, under ``OUTPUT/.heatmark``.

``run.json`` says what produced the folder (model and config hashes, spacing, options);
``cases/<case>.json`` holds the state of one case: the landmarks, confidence, measurements and
files of a case done, or the error of a case that failed. A case's own files are written first,
then its state, which is the commit mark: a rerun skips the cases whose state says done for the
same input with all the requested files present, and retries failed ones. A folder written with
another model, other configs or another spacing is refused unless ``--overwrite``.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from heatmark.core.fileio import TMP_PREFIX, atomic_write_text
from heatmark.predict.errors import PredictUsageError
from heatmark.predict.model import LoadedBundle
from heatmark.predict.options import PredictOptions

__all__ = ["STATE_DIR", "STATE_VERSION", "CaseStore", "remove_debris", "check_run_file"]

#: Folder inside OUTPUT holding the run description and the per-case states.
STATE_DIR = ".heatmark"
STATE_VERSION = 1


class CaseStore:
    """The per-case states of an OUTPUT folder, in memory (:attr:`states`) and under
    ``.heatmark/cases``."""

    def __init__(self, out: Path, names: Sequence[str], spatial_dims: int):
        self.out = out
        self.dir = out / STATE_DIR / "cases"
        self.names = list(names)
        self.spatial_dims = spatial_dims
        self.states: dict[str, dict] = {}

    def load(self) -> None:
        """Read the states on disk; unreadable or foreign ones count as absent (their cases are redone)."""
        if not self.dir.is_dir():
            return
        for p in sorted(self.dir.glob("*.json")):
            if p.name.startswith(TMP_PREFIX):
                continue
            try:
                s = json.loads(p.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue  # unreadable: as if absent, the case is redone
            if (isinstance(s, dict) and s.get("version") == STATE_VERSION and s.get("case") == p.name[:-5]
                    and s.get("status") in ("done", "failed") and self._valid(s)):
                self.states[s["case"]] = s

    def _valid(self, s: dict) -> bool:
        if s["status"] == "failed":
            return True
        coords = s.get("coords")
        d = self.spatial_dims
        return (s.get("landmark_names") == self.names and isinstance(coords, list)
                and len(coords) == len(self.names)
                and all(c is None or (isinstance(c, list) and len(c) == d) for c in coords))

    def is_done(self, case: str, path: str, files: Sequence[str]) -> bool:
        """``case`` is done for the input ``path`` and its ``files`` are all there."""
        s = self.states.get(case)
        return (s is not None and s["status"] == "done" and s.get("source") == os.path.abspath(path)
                and all((self.out / f).is_file() for f in files))

    def _remove_files(self, case: str, keep: Sequence[str] = ()) -> None:
        old = self.states.get(case)
        for f in (old or {}).get("files", []):
            if f not in keep and Path(f).name == f and f.startswith(case):
                with contextlib.suppress(OSError):
                    (self.out / f).unlink()

    def put(self, state: dict) -> None:
        """Commit a case's state (its files written before), removing files of its previous state
        that the new one does not list."""
        case = state["case"]
        self._remove_files(case, keep=state.get("files", []))
        atomic_write_text(self.dir / f"{case}.json", json.dumps(state, allow_nan=False) + "\n")
        self.states[case] = state

    def put_done(self, case: str, path: str, payload: dict[str, Any]) -> None:
        """``case`` done from the input ``path``; ``payload`` from :func:`heatmark.predict.export.write_case`."""
        self.put({"version": STATE_VERSION, "case": case, "status": "done", "path": path,
                  "source": os.path.abspath(path), "landmark_names": self.names,
                  "spatial_dims": self.spatial_dims, **payload})

    def put_failed(self, case: str, path: str, error: str) -> None:
        """``case`` failed on the input ``path`` with the reason ``error``."""
        self.put({"version": STATE_VERSION, "case": case, "status": "failed", "path": path,
                  "source": os.path.abspath(path), "error": error})

    def drop(self, case: str) -> None:
        """Forget ``case``: its files and its state."""
        self._remove_files(case)
        with contextlib.suppress(FileNotFoundError):
            (self.dir / f"{case}.json").unlink()
        self.states.pop(case, None)


def remove_debris(folders: Sequence[Path]) -> None:
    """Delete temporary files left by a killed run (``TMP_PREFIX``; see heatmark.core.fileio)."""
    for folder in folders:
        if folder.is_dir():
            for p in folder.glob(TMP_PREFIX + "*"):
                with contextlib.suppress(OSError):
                    p.unlink()


def check_run_file(out: Path, store: CaseStore, bundle: LoadedBundle, opts: PredictOptions) -> None:
    """Refuse to mix results of another model/config/spacing unless --overwrite (then drop them);
    then write ``run.json`` for this run."""
    run_file = out / STATE_DIR / "run.json"
    previous = None
    if run_file.is_file():
        with contextlib.suppress(OSError, ValueError):
            previous = json.loads(run_file.read_text(encoding="utf-8")).get("fingerprint")
    if store.states and previous != bundle.fingerprint:
        if not opts.overwrite:
            what = "an unknown run" if previous is None else ", ".join(
                k.replace("_sha256", "") for k in bundle.fingerprint if previous.get(k) != bundle.fingerprint[k])
            raise PredictUsageError(f"{out} holds results of another model or settings ({what} differ); "
                                    "choose another OUTPUT folder or pass --overwrite to replace them")
        for case in list(store.states):
            store.drop(case)
    doc = {"fingerprint": bundle.fingerprint, "bundle": str(bundle.root.resolve()),
           "options": {"formats": list(opts.formats), "save_heatmaps": opts.save_heatmaps,
                       "overlays": opts.overlays, "amp": bundle.amp, "device": str(bundle.device)}}
    atomic_write_text(run_file, json.dumps(doc, indent=1) + "\n")
