"""Sliding-window inference (heatmark.evaluation.sliding_window): a blob at a known world point of an
oblique volume larger than the window decodes back to that point through the stitched heatmaps and
the image's affine; the streamed stitching gives the landmarks of MONAI's dense stitching; a tiny
patch-trained bundle runs end to end through `heatmark predict` with the windows its model file
records."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from heatmark.bundle import run_bundle
from heatmark.core.geometry import voxel_to_world, world_to_voxel
from heatmark.evaluation import (
    DecodeLandmarksd,
    LocalHeatmaps,
    StreamingSlidingWindowInferer,
    decode_heatmaps,
    landmark_inferer,
)
from heatmark.training.model_file import read_model_file
from monai.data import MetaTensor
from monai.inferers import SimpleInferer, SlidingWindowInferer
from test_bundle_synthetic import BUNDLE, write_dots_dataset
from test_patches import dot_image, oblique_affine


class GaussianBlur(torch.nn.Module):
    """An analytic "network": a fixed separable Gaussian blur (zero padding, so window borders
    matter) of each input channel; a Gaussian blob stays a Gaussian blob at the same place."""

    def __init__(self, spatial_dims: int = 3, sigma: float = 1.0, radius: int = 3):
        super().__init__()
        x = torch.arange(-radius, radius + 1, dtype=torch.float32)
        k = torch.exp(-0.5 * x**2 / sigma**2)
        self.register_buffer("kernel", k / k.sum())
        self.d = spatial_dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        conv = (torch.nn.functional.conv2d, torch.nn.functional.conv3d)[self.d - 2]
        r = self.kernel.numel() // 2
        for axis in range(self.d):
            shape = [1] * self.d
            shape[axis] = self.kernel.numel()
            pad = [0] * self.d
            pad[axis] = r
            x = conv(x, self.kernel.reshape(1, 1, *shape).repeat(c, 1, *[1] * self.d), padding=pad, groups=c)
        return x


class Pool2(torch.nn.Module):
    """A network with output stride 2 and random-looking values: a fixed conv then 2x average pooling."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv3d(1, 3, 3, padding=1)

    def forward(self, x):
        return torch.nn.functional.avg_pool3d(self.conv(x), 2)


@pytest.fixture(scope="module")
def blob():
    """A 3D oblique volume (56 x 44 x 36 voxels) with two Gaussian dots at known world points, one
    per channel, and the window (roi) of 24 x 20 x 16 voxels."""
    affine = oblique_affine(spacing=(1.1, 0.8, 1.4), angle=0.35)
    points = voxel_to_world(np.array([[37.3, 11.6, 22.8], [9.7, 30.2, 5.4]]), affine.numpy())
    channels = [dot_image((56, 44, 36), affine, p)[0] for p in points]
    image = MetaTensor(torch.stack([c.as_tensor() for c in channels])[None], affine=affine)
    return image, points, (24, 20, 16)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("mode", ["gaussian", "constant"])
def test_blob_decodes_back_to_its_world_point(blob, stream, mode):
    image, points, roi = blob
    inferer = landmark_inferer(roi, overlap=0.25, mode=mode, stream=stream)
    assert isinstance(inferer, StreamingSlidingWindowInferer if stream else SlidingWindowInferer)
    with torch.no_grad():
        pred = inferer(image, GaussianBlur())
    assert isinstance(pred, LocalHeatmaps) == stream
    out = DecodeLandmarksd(truth_key=None, method="gaussian")({"pred": pred, "image": image})
    found = out["pred_world"][0].numpy()
    error_vox = np.abs(world_to_voxel(found, image.affine.numpy()) - world_to_voxel(points, image.affine.numpy()))
    assert error_vox.max() < 0.25, error_vox
    assert np.linalg.norm(found - points, axis=1).max() < 0.25


def test_streamed_equals_dense_stitching():
    """Random network outputs (no smooth peak to hide behind), output stride 2, images smaller than
    the window along some axes (padded, cropped back), batches of windows, every decoding method."""
    net = Pool2().eval()
    for shape, roi, overlap, mode, batch in [((2, 1, 40, 26, 22), (16, 16, 16), 0.25, "gaussian", 1),
                                             ((1, 1, 12, 50, 10), (16, 16, 16), 0.5, "constant", 3)]:
        x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            dense = SlidingWindowInferer(roi, batch, overlap, mode=mode)(x, net)
            local = StreamingSlidingWindowInferer(roi, overlap, mode, sw_batch_size=batch, window=2)(x, net)
        assert local.values.shape[:2] == (shape[0], 3) and max(local.values.shape[2:]) == 5  # boxes, not volumes
        assert local.shape == tuple(dense.shape[2:])
        for method in ("quadratic", "gaussian", "weighted_mean", "argmax"):
            a = decode_heatmaps(dense, method=method, window=2, output_stride=2)
            b = local.decode(method=method, window=2, output_stride=2)
            torch.testing.assert_close(b.voxel, a.voxel, equal_nan=True, rtol=0, atol=1e-9)
            torch.testing.assert_close(b.confidence, a.confidence.double(), rtol=0, atol=1e-6)


def test_streamed_slab_stays_bounded_on_a_long_volume():
    """A volume 10 windows long along the first axis: the slab holds at most the rows one batch of
    windows spans plus one peak box (a buffer that kept growing, or kept every row, fails), and the
    landmarks, including scattered non-finite values (one NaN, one infinity, in two channels), equal
    those of MONAI's dense stitching."""
    net = Pool2().eval()
    x = torch.randn(1, 1, 160, 20, 18, generator=torch.Generator().manual_seed(2))
    for overlap, mode, batch in [(0.25, "gaussian", 1), (0.25, "gaussian", 3), (0.0, "constant", 2)]:
        def poisoned(win):
            out = net(win)
            out[0, 0, 3, 2, 1] = float("nan")
            out[-1, 1, 1, 4, 2] = float("inf")
            return out

        with torch.no_grad():
            dense = SlidingWindowInferer((16, 16, 16), batch, overlap, mode=mode)(x, poisoned)
            streamer = StreamingSlidingWindowInferer((16, 16, 16), overlap, mode, sw_batch_size=batch)
            local = streamer(x, poisoned)
        # input rows one batch spans: one window, or (4 windows per row of windows) two rows of them
        span = 16 if batch == 1 else 16 + 16 - int(16 * overlap)
        assert 0 < streamer.rows_held <= span // 2 + 3, (overlap, batch, streamer.rows_held)  # stride 2, box 3
        a = decode_heatmaps(dense, output_stride=2)
        b = local.decode(output_stride=2)
        assert torch.isnan(b.voxel[0, :2]).all() and torch.isfinite(b.voxel[0, 2]).all()
        torch.testing.assert_close(b.voxel, a.voxel, equal_nan=True, rtol=0, atol=1e-9)
        torch.testing.assert_close(b.confidence, a.confidence.double(), rtol=0, atol=1e-6)


def test_streamed_flat_and_nonfinite_channels_are_missing():
    def net(x):
        out = torch.zeros(x.shape[0], 2, *x.shape[2:])
        out[:, 1] = float("nan")
        return out

    local = StreamingSlidingWindowInferer((8, 8, 8), 0.25)(torch.zeros(1, 1, 20, 12, 9), net)
    dec = local.decode()
    assert torch.isnan(dec.voxel).all() and (dec.confidence == 0).all()
    with pytest.raises(ValueError, match="wider than the streamed boxes"):
        local.decode(method="weighted_mean", window=2)


def test_inferer_settings():
    assert isinstance(landmark_inferer(None), SimpleInferer)
    for bad, match in [({"overlap": 1.0}, "sw_overlap"), ({"mode": "box"}, "sw_mode"),
                       ({"sw_batch_size": 0}, "sw_batch_size")]:
        with pytest.raises(ValueError, match=match):
            landmark_inferer((8, 8), **bad)


PATCH_OVERLAY = """\
patch_size: [24, 24]
patch_landmark_share: 0.7
sw_overlap: 0.5
max_epochs: 8
val_interval: 8
"""


def test_patch_training_and_sliding_window_predict(tmp_path):
    """The synthetic dots bundle (images about 40 x 40 mm at 1 mm) trained on 24 x 24 patches, then
    predicted with sliding windows that `heatmark predict` takes from the model file alone."""
    from heatmark.predict import (  # the predict layer, after the bundle ran
        PredictOptions,
        load_bundle,
        run_predict,
    )

    data = write_dots_dataset(tmp_path / "data")
    bundle = tmp_path / "synthetic_dots"
    shutil.copytree(BUNDLE, bundle)
    (bundle / "configs" / "patches.yaml").write_text(PATCH_OVERLAY)
    run_bundle(bundle, "training", ["patches.yaml"], dataset_dir=str(data))  # in this process: no start-up
    _, description = read_model_file(bundle / "models" / "model.pt")
    assert description["sliding_window"] == {"patch_size": [24, 24], "overlap": 0.5, "mode": "gaussian",
                                             "sw_batch_size": 2, "stream": False}
    metrics = json.loads((bundle / "runs" / "validation" / "metrics.json").read_text())

    inputs = tmp_path / "eval_images"
    inputs.mkdir()
    for case in (data / "eval.txt").read_text().split():
        shutil.copy(data / "images" / f"{case}.nii.gz", inputs)
    # predict, from the model file alone, keeps the resampled image at its own size (no resize to input_size 32)
    loaded = load_bundle(PredictOptions(bundle, inputs, tmp_path / "unused"))
    first = min(inputs.iterdir())
    image = loaded.preprocessing({"image": str(first)})["image"]
    assert tuple(image.shape[1:]) != (32, 32) and min(image.shape[1:]) > 32
    results = {}
    for name, configs in [("dense", []), ("stream", [str(tmp_path / "stream.yaml")])]:
        (tmp_path / "stream.yaml").write_text("sw_stream: true\n")
        summary = run_predict(PredictOptions(bundle, inputs, tmp_path / name, configs=configs, num_workers=0,
                                             progress=False, formats=("csv",)))
        assert summary.failed == 0 and summary.processed == 8
        results[name] = (tmp_path / name / "landmarks.csv").read_text()
    dense, streamed = ([ln.split(",") for ln in results[k].splitlines()] for k in ("dense", "stream"))
    assert [r[:4] for r in dense] == [r[:4] for r in streamed]
    np.testing.assert_allclose(np.array([r[4:] for r in dense[1:]], float), np.array([r[4:] for r in streamed[1:]], float),
                               rtol=0, atol=1e-9)
    # the bright dot (the one every landmark-centred patch sees best) is found to well under a voxel: the
    # windows are stitched on the image grid and decoded in world mm (a wrong window offset or affine
    # would miss by millimetres)
    truth = {}
    for line in (data / "landmarks.csv").read_text().splitlines()[1:]:
        case, _, name, _, x, y = line.split(",")
        truth[(case, name)] = np.array([float(x), float(y)])
    errors = {}
    for r in dense[1:]:
        errors.setdefault(r[2], []).append(np.linalg.norm(np.array([float(r[4]), float(r[5])]) - truth[(r[0], r[2])]))
    assert len(errors["bright"]) == len(errors["dim"]) == 8
    assert np.all(np.isfinite(errors["dim"]))
    assert np.max(errors["bright"]) < 1.0, (errors, metrics)
