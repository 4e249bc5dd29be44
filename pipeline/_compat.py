"""Old module paths of heatmark 0.1 (a flat package) keep working: ``import heatmark.engines`` or a
bundle's ``heatmark.geometry.world_to_voxel`` resolve to the modules' new homes. New code imports
the new paths; this table is the only place that knows the old ones."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types

#: old module -> the module(s) now holding its public names
MOVED: dict[str, tuple[str, ...]] = {
    "heatmark.geometry": ("heatmark.core.geometry",),
    "heatmark.heatmaps": ("heatmark.core.heatmaps",),
    "heatmark.fileio": ("heatmark.core.fileio",),
    "heatmark.datasets": ("heatmark.data.fetch",),
    "heatmark.losses": ("heatmark.training.losses",),
    "heatmark.tracking": ("heatmark.training.tracking",),
    "heatmark.engines": ("heatmark.training.engines", "heatmark.training.checkpoint", "heatmark.training.handlers",
                         "heatmark.evaluation.validation"),
    "heatmark.decoding": ("heatmark.evaluation.decoding",),
    "heatmark.metrics": ("heatmark.evaluation.metrics",),
    "heatmark.reports": ("heatmark.evaluation.reports",),
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old module name and loads it as the new module (or, for a module split in several,
    as a module exposing all their public names)."""

    def find_spec(self, fullname, path=None, target=None):  # noqa: ANN001 - importlib protocol
        if fullname in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):  # noqa: ANN001
        targets = [importlib.import_module(name) for name in MOVED[spec.name]]
        if len(targets) == 1:
            return targets[0]
        module = types.ModuleType(spec.name, f"Moved: see {', '.join(MOVED[spec.name])}.")
        module.__all__ = [name for target in targets for name in getattr(target, "__all__", ())]
        for target in targets:
            for name in getattr(target, "__all__", ()):
                setattr(module, name, getattr(target, name))
        return module

    def exec_module(self, module):  # noqa: ANN001 - the module is complete when created
        pass


def install() -> None:
    """Register the finder once (idempotent)."""
    if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
        sys.meta_path.append(_MovedModules())
