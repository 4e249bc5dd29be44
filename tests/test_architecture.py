"""The layout's promises, checked on the source: imports point downward between layers, imports
inside functions say why, and each concept that once drifted apart has one home."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import REPO_ROOT

import heatmark.predict
import heatmark.transforms.io as image_io
from heatmark import bundle
from heatmark.core import heatmaps
from heatmark.landmarks import registry as landmark_registry

#: heatmark's layers, lowest first: a module may import its own package and lower layers only.
#: Packages in one layer are independent of each other.
LAYERS: list[tuple[str, ...]] = [
    ("heatmark.core",),
    ("heatmark.landmarks",),
    ("heatmark.transforms", "heatmark.networks"),
    ("heatmark.data",),
    ("heatmark.training",),
    ("heatmark.evaluation",),
    ("heatmark.bundle",),
    ("heatmark.predict",),
    ("heatmark.exporting",),
    ("heatmark.demo",),
    ("heatmark.cli",),
    ("heatmark.__main__",),
]
#: packages that may import only these (besides themselves), stricter than their layer
ONLY: dict[str, tuple[str, ...]] = {"heatmark.networks": ("heatmark.core",)}
#: the package root and the old-path alias table import nothing of the layers statically
ROOT_MODULES = ("heatmark", "heatmark._compat")
SOURCES = {"heatmark": REPO_ROOT / "pipeline", "heatmark.transforms": REPO_ROOT / "transforms",
           "heatmark.networks": REPO_ROOT / "networks"}
LAZY_MARK = "# lazy:"


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            found[".".join([package, *parts])] = path
    return found


MODULES = _modules()


def _package_of(module: str) -> str | None:
    for layer in LAYERS:
        for package in layer:
            if module == package or module.startswith(package + "."):
                return package
    return None


def _layer(package: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if package in layer)


def _imports(module: str, path: Path) -> list[tuple[str, int, bool]]:
    """(imported heatmark module, line, inside a function or class) for every import in the file."""
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    out: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, nested: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            if isinstance(child, ast.Import):
                out.extend((a.name, child.lineno, nested) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = module.split(".")
                    base = base if is_package else base[:-1]
                    base = base[: len(base) - (child.level - 1)]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                out.append((target, child.lineno, nested))
            visit(child, inner)

    visit(tree, False)
    return out


def test_every_module_belongs_to_a_layer():
    orphans = [m for m in MODULES if m not in ROOT_MODULES and _package_of(m) is None]
    assert not orphans, f"modules outside every layer (add them to LAYERS): {orphans}"


def test_imports_point_downward():
    upward = []
    for module, path in MODULES.items():
        own = _package_of(module)
        for target, line, _ in _imports(module, path):
            if not target.startswith("heatmark"):
                continue
            if module in ROOT_MODULES:
                if target not in ROOT_MODULES:
                    upward.append(f"{module}:{line} imports {target}")
                continue
            other = _package_of(target)
            if other is None or other == own:
                continue
            allowed = ONLY.get(own)
            if (allowed is not None and other not in allowed) or _layer(other) >= _layer(own):
                upward.append(f"{path.relative_to(REPO_ROOT)}:{line} ({own}) imports {target}")
    assert not upward, "imports against the layer order:\n" + "\n".join(upward)


def test_imports_inside_functions_say_why():
    hidden = []
    for module, path in MODULES.items():
        lines = path.read_text().splitlines()
        for target, line, nested in _imports(module, path):
            if nested and LAZY_MARK not in lines[line - 1] and LAZY_MARK not in lines[line - 2]:
                hidden.append(f"{path.relative_to(REPO_ROOT)}:{line} import {target}")
    assert not hidden, (f"imports inside functions without a `{LAZY_MARK} <reason>` comment "
                        "(move them to the top of the module):\n" + "\n".join(hidden))


def test_the_checker_sees_a_violation(tmp_path):
    """The layer check is not vacuous: an upward import in a fake core module is found."""
    fake = tmp_path / "geometry.py"
    fake.write_text("import numpy\nfrom heatmark.predict import run_predict\n\ndef f():\n    import torch\n")
    found = _imports("heatmark.core.geometry", fake)
    assert ("heatmark.predict", 2, False) in found and ("torch", 5, True) in found
    assert _layer(_package_of("heatmark.predict")) > _layer(_package_of("heatmark.core.geometry"))


# ---- one home per concept -------------------------------------------------------------------------

def test_predict_discovers_every_suffix_the_loader_reads():
    assert heatmark.predict.IMAGE_SUFFIXES is image_io.IMAGE_SUFFIXES
    for suffix in image_io.IMAGE_SUFFIXES:
        assert image_io.image_suffix("case" + suffix.upper()) == suffix


def test_one_gaussian_renderer():
    """The coordinate-regression fusion renders its Gaussian with heatmark.core.heatmaps."""
    source = (REPO_ROOT / "networks" / "coordreg.py").read_text()
    assert "gaussian_heatmaps" in source and "torch.exp(" not in source
    assert callable(heatmaps.gaussian_heatmaps)


@pytest.mark.parametrize("name", ["sha256", "_per_axis", "tuple_rep", "output_offset", "output_to_input_voxel",
                                  "stride_to_input_grid", "atomic_write_bytes", "bundle_config_files"])
def test_no_second_home(name):
    """Helpers that once existed twice are defined once (or not at all)."""
    homes = [p.relative_to(REPO_ROOT) for p in MODULES.values()
             if f"def {name}(" in p.read_text() or f"def _{name}(" in p.read_text()]
    assert len(homes) <= 1, f"{name} defined in {homes}"


def test_landmark_formats_and_bundle_workflows_are_registries():
    assert {"csv", "fcsv", "mrk.json", "json"} <= {f.name for f in landmark_registry.FORMATS}
    for workflow, (_, shipped) in bundle.WORKFLOWS.items():
        assert shipped is None or (bundle.CONFIG_DIR / shipped).is_file(), workflow
    assert (bundle.CONFIG_DIR / "base.yaml").is_file() and (bundle.CONFIG_DIR / "logging.conf").is_file()


def test_every_package_is_distributed():
    """A normal (non-editable) install ships every package: pyproject lists each one."""
    import tomllib

    listed = set(tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    packages = {m for m, p in MODULES.items() if p.name == "__init__.py"}
    assert packages <= listed, f"missing from pyproject.toml packages: {sorted(packages - listed)}"
    assert "heatmark.configs" in listed  # the shipped bundle configs (package data)


def test_no_module_is_git_ignored():
    """A module that .gitignore hides exists here but not in a fresh clone (it happened: `data/`)."""
    import subprocess

    paths = [str(p.relative_to(REPO_ROOT)) for p in MODULES.values()]
    paths += [str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / "pipeline" / "configs").iterdir()]
    proc = subprocess.run(["git", "check-ignore", "--no-index", *paths], cwd=REPO_ROOT, capture_output=True, text=True)
    assert proc.returncode in (0, 1), proc.stderr
    assert proc.stdout.strip() == "", f"ignored by .gitignore: {proc.stdout.split()}"
