"""A whole bundle on a task with a known answer: two dots on small synthetic 2D images whose pixels
are anisotropic and whose origins differ per case (tests/bundles/synthetic_dots, under 100 lines of
config on top of heatmark's base). Trained through ``python -m monai.bundle run`` for a few seconds,
the working pipeline finds the dots to within a stated error in mm; the same model evaluated with
a deliberately broken step — decoding that ignores the output grid, or an image shifted without its
affine knowing (landmarks not moved with the image) — misses by millimetres. So a bug in either
place fails this test, where an "any finite MRE" check would pass."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import REPO_ROOT, bundle_cmd, run

from heatmark.landmarks import Landmarks, write_landmark_table

BUNDLE = REPO_ROOT / "tests" / "bundles" / "synthetic_dots"
SPLITS = {"train": 48, "val": 8, "eval": 8}
#: the working pipeline's error bound (mm) on this task; the broken variants must exceed BROKEN_MM
WORKING_MM = 1.0
BROKEN_MM = 2.0


def _dot(grid: np.ndarray, centre: np.ndarray, sigma_mm: float) -> np.ndarray:
    return np.exp(-0.5 * ((grid - centre) ** 2).sum(-1) / sigma_mm**2)


def write_dots_dataset(root: Path, seed: int = 0) -> Path:
    """Images ``images/<case>.nii.gz`` (2D, pixel spacing 0.8-1.25 mm per axis, random origin) with a
    bright dot (peak 1) and a dim dot (peak 0.45) of 2 mm sigma, 6-16 mm apart, inside the central
    28 mm; ``landmarks.csv`` (world mm) and ``train/val/eval.txt`` case lists."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    table = {}
    for split, count in SPLITS.items():
        cases = [f"{split}{i:02d}" for i in range(count)]
        for case in cases:
            spacing = rng.uniform(0.8, 1.25, 2)
            shape = np.round(40.0 / spacing).astype(int)  # about 40 x 40 mm
            origin = rng.uniform(-30, 30, 2)
            centre = origin + (shape - 1) * spacing / 2
            bright = centre + rng.uniform(-9, 9, 2)
            while True:
                dim = centre + rng.uniform(-9, 9, 2)
                if 6.0 <= np.linalg.norm(dim - bright) <= 16.0:
                    break
            index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
            grid = origin + index * spacing  # world mm of every pixel centre
            image = _dot(grid, bright, 2.0) + 0.45 * _dot(grid, dim, 2.0) + rng.normal(0, 0.02, tuple(shape))
            affine = np.diag([spacing[0], spacing[1], 1.0, 1.0])
            affine[:2, 3] = origin
            nib.save(nib.Nifti1Image(image.astype(np.float32), affine), str(root / "images" / f"{case}.nii.gz"))
            table[case] = Landmarks(np.stack([bright, dim]), ["bright", "dim"])
        (root / f"{split}.txt").write_text("\n".join(cases) + "\n")
    write_landmark_table(root / "landmarks.csv", table)
    return root


def _evaluate(bundle: Path, data: Path, *overlays: str) -> dict:
    run(bundle_cmd(bundle, "evaluating", list(overlays), "--dataset_dir", str(data)), cwd=REPO_ROOT)
    return json.loads((bundle / "runs" / "eval" / "metrics.json").read_text())


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path, dict]:
    root = tmp_path_factory.mktemp("dots")
    data = write_dots_dataset(root / "data")
    bundle = root / "synthetic_dots"
    shutil.copytree(BUNDLE, bundle)
    run(bundle_cmd(bundle, "training", [], "--dataset_dir", str(data)), cwd=REPO_ROOT, timeout=600)
    return bundle, data, _evaluate(bundle, data)


def test_bundle_is_only_what_differs():
    lines = [ln for ln in (BUNDLE / "configs" / "train.yaml").read_text().splitlines() if ln.strip()]
    assert len(lines) < 100
    assert not any(ln.startswith(("train:", "validate:", "imports:")) for ln in lines), "wiring belongs in base.yaml"


def test_working_pipeline_finds_the_dots(trained):
    _, _, metrics = trained
    assert metrics["n_cases"] == SPLITS["eval"]
    assert metrics["mean"] < WORKING_MM, metrics
    assert metrics["outliers_4mm"] == 0, metrics


def test_decoding_off_by_the_stride_is_caught(trained, tmp_path):
    bundle, data, _ = trained
    overlay = tmp_path / "wrong_stride.yaml"
    overlay.write_text("validate#postprocessing#output_stride: [2, 2]\n")
    metrics = _evaluate(bundle, data, str(overlay))
    assert metrics["mean"] > BROKEN_MM, metrics


def test_landmarks_not_moved_with_the_image_is_caught(trained, tmp_path):
    """Shift the image array by 3 pixels without telling its affine (what a transform that forgets
    the geometry rule does): the truth no longer sits on the dots and the error shows it."""
    bundle, data, _ = trained
    overlay = tmp_path / "unrecorded_shift.yaml"
    overlay.write_text(
        "val_transforms: \"$@preprocessing + [monai.transforms.Lambdad('image', lambda x: torch.roll(x, 3, 1))]"
        " + @to_voxels\"\n")
    metrics = _evaluate(bundle, data, str(overlay))
    assert metrics["mean"] > BROKEN_MM, metrics
