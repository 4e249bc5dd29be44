"""The resume state of an OUTPUT folder, under ``OUTPUT/.heatmark``.

``run.json`` says what produced the folder (model and config hashes, spacing, options);
``cases/<case>.json`` holds the state of one case: the landmarks, confidence, measurements and
files of a case done (and the warnings about it), or the error of a case that failed. A case's own
files are written first, then its state, which is the commit mark: a rerun skips the cases whose
state says done for the same input with all the requested files present, and retries failed ones.
A folder written with another model, other configs or another spacing is refused unless
``--overwrite``.

Nothing is written or deleted outside OUTPUT (:func:`check_inside`: a state folder, state file,
table or case file that is a symbolic link is refused before anything is written); files are
deleted by their exact names (a case's own names from
:func:`heatmark.predict.inputs.case_file_name`, temporary files by their prefix in the folders
themselves), and deleting never follows a symbolic link.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from heatmark.core.fileio import TMP_PREFIX, atomic_write_text
from heatmark.predict.errors import PredictUsageError, writing
from heatmark.predict.inputs import CASE_FILE_KINDS, STATE_DIR, case_file_name, is_case_name
from heatmark.predict.model import LoadedBundle
from heatmark.predict.options import PredictOptions

__all__ = ["STATE_DIR", "STATE_VERSION", "CaseStore", "remove_debris", "check_inside", "check_run_file",
           "write_run_file"]

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
            if p.name.startswith(TMP_PREFIX) or p.is_symlink():
                continue
            try:
                s = json.loads(p.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue  # unreadable: as if absent, the case is redone
            # a case name with a dot (from before the naming rule) could share files with another case: redone
            if (isinstance(s, dict) and s.get("version") == STATE_VERSION and s.get("case") == p.name[:-5]
                    and is_case_name(s["case"]) and s.get("status") in ("done", "failed") and self._valid(s)):
                self.states[s["case"]] = s

    def _valid(self, s: dict) -> bool:
        if s["status"] == "failed":
            return True
        coords = s.get("coords")
        d = self.spatial_dims
        warnings = s.get("warnings", [])
        return (s.get("landmark_names") == self.names and isinstance(coords, list)
                and len(coords) == len(self.names)
                and all(c is None or (isinstance(c, list) and len(c) == d) for c in coords)
                and isinstance(warnings, list) and all(isinstance(w, str) for w in warnings))

    def is_done(self, case: str, path: str, files: Sequence[str]) -> bool:
        """``case`` is done for the input ``path`` and its ``files`` are all there."""
        s = self.states.get(case)
        return (s is not None and s["status"] == "done" and s.get("source") == os.path.abspath(path)
                and all((self.out / f).is_file() for f in files))

    def state_file(self, case: str) -> Path:
        """``.heatmark/cases/<case>.json``."""
        return self.dir / f"{case}.json"

    def _remove_files(self, case: str, keep: Sequence[str] = ()) -> None:
        """Delete the files of ``case``'s previous state not in ``keep``: only names that are this
        case's own (:func:`case_file_name`, exact), never by prefix; a link is deleted, not followed."""
        old = self.states.get(case)
        own = {case_file_name(case, kind) for kind in CASE_FILE_KINDS} if is_case_name(case) else set()
        for f in (old or {}).get("files", []):
            if f in own and f not in keep:
                with contextlib.suppress(OSError):
                    os.unlink(self.out / f)

    def put(self, state: dict) -> None:
        """Commit a case's state (its files written before), removing files of its previous state
        that the new one does not list. Raises PredictOutputError when the state cannot be written."""
        case = state["case"]
        self._remove_files(case, keep=state.get("files", []))
        path = self.state_file(case)
        with writing(path):
            atomic_write_text(path, json.dumps(state, allow_nan=False) + "\n")
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
            os.unlink(self.state_file(case))
        self.states.pop(case, None)


def remove_debris(folders: Sequence[Path]) -> None:
    """Delete temporary files left by a killed run (``TMP_PREFIX``; see heatmark.core.fileio) from
    ``folders`` themselves: a folder that is a symbolic link is not entered, and a debris entry
    that is a link is deleted as a link (its target is never touched)."""
    for folder in folders:
        try:
            if not stat.S_ISDIR(os.lstat(folder).st_mode):
                continue  # absent, a file, or a symbolic link (to a folder elsewhere)
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            if entry.name.startswith(TMP_PREFIX) and not entry.is_dir(follow_symlinks=False):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)


def check_inside(out: Path, paths: Iterable[Path]) -> None:
    """Refuse any of ``paths`` (what a run writes or deletes, under the resolved OUTPUT ``out``)
    that is a symbolic link or resolves outside ``out``.

    Raises:
        PredictUsageError: one line naming the path and its target.
    """
    root = os.path.realpath(out)
    for p in paths:
        if os.path.islink(p):
            target = "?"
            with contextlib.suppress(OSError):
                target = os.readlink(p)
            raise PredictUsageError(f"{p} is a symbolic link (to {target}); heatmark predict writes and deletes only "
                                    f"real files and folders inside OUTPUT {out}: remove the link or choose another "
                                    "OUTPUT")
        real = os.path.realpath(p)
        if real != root and not real.startswith(root.rstrip(os.sep) + os.sep):
            raise PredictUsageError(f"{p} resolves to {real}, outside OUTPUT {out}; heatmark predict writes and "
                                    "deletes only inside OUTPUT: remove the link or choose another OUTPUT")


def check_run_file(out: Path, store: CaseStore, bundle: LoadedBundle, opts: PredictOptions) -> None:
    """Refuse to mix results of another model/config/spacing unless --overwrite (then drop them).
    :func:`write_run_file` then writes ``run.json`` for this run."""
    run_file = out / STATE_DIR / "run.json"
    previous = None
    if run_file.is_file() and not run_file.is_symlink():
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


def write_run_file(out: Path, bundle: LoadedBundle, opts: PredictOptions) -> None:
    """``.heatmark/run.json``: what produced the folder. Raises PredictOutputError."""
    run_file = out / STATE_DIR / "run.json"
    doc = {"fingerprint": bundle.fingerprint, "bundle": str(bundle.root.resolve()),
           "options": {"formats": list(opts.formats), "save_heatmaps": opts.save_heatmaps,
                       "overlays": opts.overlays, "amp": bundle.amp, "device": str(bundle.device)}}
    with writing(run_file):
        atomic_write_text(run_file, json.dumps(doc, indent=1) + "\n")
