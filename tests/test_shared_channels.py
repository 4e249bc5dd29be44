"""Shared-channel landmarks (issue #16): several landmarks in one output channel, end to end.

Known answers on small synthetic heatmaps: the combined target is the maximum of the instances'
Gaussians; two blobs in one channel decode to both positions; non-maximum suppression merges close
peaks unless configured; Hungarian matching gives the stated precision / recall; the L/R assignment
follows the image's RAS axes, not its array axes. Then a tiny training and prediction of the
synthetic dots bundle with both dots in one unordered channel.
"""

from __future__ import annotations

import csv
import math
import shutil

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, bundle_cmd, run
from monai.data import MetaTensor
from test_bundle_synthetic import BUNDLE, write_dots_dataset

from heatmark import predict as P
from heatmark.core.geometry import world_to_voxel
from heatmark.core.heatmaps import ChannelGroups, combine_channels, gaussian_heatmaps
from heatmark.evaluation import DecodeLandmarksd
from heatmark.evaluation.decoding import assign_by_order, decode_channel_groups
from heatmark.evaluation.metrics import group_identification_rate, instance_detection, left_right_swaps
from heatmark.landmarks import read_landmark_table
from heatmark.training.losses import HeatmapLoss
from heatmark.training.model_file import read_model_file
from heatmark.transforms import RandLandmarkFlipd

PAIR = [{"name": "pair", "landmarks": ["R a", "L a"], "order": "R"}]
NAMES = ["R a", "mid", "L a"]


def _flip_x_affine(width: int) -> torch.Tensor:
    """2D affine whose array axis 0 runs towards -x (RAS left): world x = (width - 1) - i, y = j."""
    a = torch.eye(3, dtype=torch.float64)
    a[0, 0], a[0, 2] = -1.0, float(width - 1)
    return a


# ---------------------------------------------------------------------------------------------- config


def test_channel_layout_from_config():
    g = ChannelGroups(PAIR, NAMES)
    assert g.num_channels == 2 and g.members == [[0, 2], [1]] and g.channel_of == [0, 1, 0]
    assert g.output_names() == NAMES  # ordered groups keep the landmark names
    unordered = ChannelGroups([{"name": "dots", "landmarks": ["L a", "R a"], "order": "unordered"}], NAMES)
    assert unordered.output_names() == ["dots#2", "mid", "dots#1"]
    # what a model file records reads back to the same layout
    again = ChannelGroups(g.to_config(), NAMES, min_distance_mm=99.0, threshold=0.9)
    assert again.to_config() == g.to_config() and again.members == g.members
    assert ChannelGroups(None, NAMES).is_identity and ChannelGroups(None, NAMES).to_config() is None


@pytest.mark.parametrize("spec, message", [
    ([{"name": "p", "landmarks": ["R a", "nope"], "order": "R"}], "unknown landmark 'nope'"),
    ([{"name": "p", "landmarks": ["R a", "L a"], "order": "R"},
      {"name": "q", "landmarks": ["mid", "L a"], "order": "R"}], "'L a' is already in a channel group"),
    ([{"name": "p", "landmarks": ["R a", "L a"], "order": "x"}], "`order` must be one of"),
    ([{"name": "p", "landmarks": ["R a", "L a"], "order": "R", "max_peaks": 3}], "`max_peaks`"),
    ([{"name": "p", "landmarks": ["R a"], "order": "R"}], "at least two"),
])
def test_channel_layout_errors_name_the_group(spec, message):
    with pytest.raises(ValueError, match=message) as e:
        ChannelGroups(spec, NAMES)
    assert "channel_groups[" in str(e.value)


# ---------------------------------------------------------------------------------------------- targets


def test_combined_target_is_max_not_sum():
    pts = torch.tensor([[[10.0, 10.0], [20.0, 20.0], [12.0, 10.5]]], dtype=torch.float64)
    single = gaussian_heatmaps(pts, (32, 32), sigma=2.0)
    shared = gaussian_heatmaps(pts, (32, 32), sigma=2.0, channels=[[0, 2], [1]])
    assert shared.shape == (1, 2, 32, 32)
    torch.testing.assert_close(shared[0, 0], torch.maximum(single[0, 0], single[0, 2]))
    torch.testing.assert_close(shared[0, 1], single[0, 1])
    # overlapping instances keep their peak height 1 (a sum would give 1 + exp(-(4 + 0.25) / 8) = 1.59)
    assert float(shared[0, 0, 10, 10]) == pytest.approx(1.0, abs=1e-6)
    assert float(shared[0, 0].max()) == pytest.approx(1.0, abs=1e-6)
    # a missing instance is simply absent from its channel
    pts[0, 2] = float("nan")
    torch.testing.assert_close(gaussian_heatmaps(pts, (32, 32), 2.0, channels=[[0, 2], [1]])[0, 0], single[0, 0])


def test_loss_learns_one_sigma_per_channel():
    loss = HeatmapLoss(3, sigma=2.0, learn_sigma=True, alpha=0.1, gamma=10.0, channels=ChannelGroups(PAIR, NAMES))
    assert loss.sigma.shape == (2,) and loss.num_channels == 2
    pts = torch.tensor([[[8.0, 8.0], [16.0, 16.0], [24.0, 9.0]], [[8.0, 8.0], [16.0, 16.0], [float("nan")] * 2]])
    target, valid = loss.targets(pts, (32, 32))
    target = target.detach()
    assert target.shape == (2, 2, 32, 32) and valid.all()
    # the shared channel with one instance missing holds only the other one's peak
    assert float(target[1, 0, 24, 9]) == pytest.approx(0.0, abs=1e-6) and float(target[1, 0, 8, 8]) > 0
    pred = torch.zeros(2, 2, 32, 32, requires_grad=True)
    value = loss(pred, pts)
    value.backward()
    assert torch.isfinite(loss.sigma.grad).all() and (loss.sigma.grad != 0).all()
    with pytest.raises(ValueError, match="expects 2"):
        loss(torch.zeros(2, 3, 32, 32), pts)


def test_flip_pair_swap_changes_nothing_in_a_shared_channel():
    """RandLandmarkFlipd swaps `flip_pairs`; for a pair in one shared channel the target is the same
    with or without the swap (so the flip needs no pair handling there), unlike separate channels."""
    image = MetaTensor(torch.zeros(1, 32, 32), affine=torch.eye(4, dtype=torch.float64))
    world = torch.tensor([[24.0, 9.0], [16.0, 16.0], [8.0, 11.0]], dtype=torch.float64)
    flip = RandLandmarkFlipd(keys="image", prob=1.0, spatial_axis=0, pairs=[[0, 2]])
    flipped = flip({"image": image, "landmarks": world})
    voxel = world_to_voxel(flipped["landmarks"], flipped["image"].affine)[None]
    unswapped = world_to_voxel(world, flipped["image"].affine)[None]
    shared = HeatmapLoss(3, channels=ChannelGroups(PAIR, NAMES).members)
    torch.testing.assert_close(shared.targets(voxel, (32, 32))[0], shared.targets(unswapped, (32, 32))[0])
    separate = HeatmapLoss(3)
    assert not torch.allclose(separate.targets(voxel, (32, 32))[0], separate.targets(unswapped, (32, 32))[0])


# ---------------------------------------------------------------------------------------------- decoding


def test_two_blobs_in_one_channel_decode_to_both_positions():
    truth = torch.tensor([[[7.3, 21.6, 9.8], [19.55, 8.2, 14.4]]], dtype=torch.float64)
    heat = gaussian_heatmaps(truth, (28, 30, 24), sigma=2.0, channels=[[0, 1]])
    groups = ChannelGroups([{"name": "blob", "landmarks": ["a", "b"], "order": "unordered"}], ["a", "b"])
    dec = decode_channel_groups(heat, groups, method="quadratic", affine=torch.eye(4, dtype=torch.float64))
    found = dec.voxel[0].numpy()
    assert np.isfinite(found).all() and dec.confidence[0].min() > 0.9
    # unordered: instances by confidence; compare as sets
    d = np.linalg.norm(found[:, None] - truth[0].numpy()[None], axis=-1)
    assert max(d[0].min(), d[1].min()) < 0.25 and d[0].argmin() != d[1].argmin()


@pytest.mark.parametrize("min_distance_mm, expected", [(None, 1), (1.0, 2)])
def test_nms_keeps_close_peaks_only_when_configured(min_distance_mm, expected):
    """Peaks 3 voxels (1.5 mm) apart with sigma 2 voxels (closer than 2 sigma): the default
    suppression distance (5 mm) keeps one, a configured 1 mm keeps both."""
    spec = {"name": "pair", "landmarks": ["a", "b"], "order": "unordered"}
    if min_distance_mm is not None:
        spec["min_distance_mm"] = min_distance_mm
    groups = ChannelGroups([spec], ["a", "b"], min_distance_mm=5.0)
    pts = torch.tensor([[[12.0, 15.0], [15.0, 15.0]]], dtype=torch.float64)
    heat = gaussian_heatmaps(pts, (30, 30), sigma=2.0, channels=[[0, 1]])
    affine = torch.diag(torch.tensor([0.5, 0.5, 1.0], dtype=torch.float64))  # 0.5 mm pixels
    dec = decode_channel_groups(heat, groups, affine=affine)
    assert int(dec.found.sum()) == expected
    got = dec.voxel[0][dec.found[0]].numpy()
    assert np.abs(got - pts[0, :expected].numpy()).max() < 0.25 or expected == 1


def test_lr_assignment_follows_ras_not_the_array_axis():
    """Two instances of a pair at array x = 6 and 24: with an affine whose x axis is flipped the one
    at array x = 6 is the RAS-right one (larger world x) and must get the "R" name."""
    groups = ChannelGroups(PAIR, NAMES)
    pts = torch.tensor([[[6.2, 12.0], [16.0, 16.0], [24.1, 13.0]]], dtype=torch.float64)
    heat = gaussian_heatmaps(pts, (32, 32), sigma=2.0, channels=groups.members)
    flipped = decode_channel_groups(heat, groups, affine=_flip_x_affine(32))
    assert np.abs(flipped.voxel[0, 0].numpy() - [6.2, 12.0]).max() < 0.25  # "R a" at array x 6
    assert flipped.world[0, 0, 0] > flipped.world[0, 2, 0]
    plain = decode_channel_groups(heat, groups, affine=torch.eye(3, dtype=torch.float64))
    assert np.abs(plain.voxel[0, 0].numpy() - [24.1, 13.0]).max() < 0.25  # RAS affine: "R a" at array x 24
    # a lone peak goes to the name of its side of the image centre
    assert assign_by_order(np.array([[3.0, 0.0]]), 2, "R", np.zeros(2)).tolist() == [0]
    assert assign_by_order(np.array([[-3.0, 0.0]]), 2, "R", np.zeros(2)).tolist() == [1]
    assert assign_by_order(np.array([[-3.0, 0.0]]), 2, "L", np.zeros(2)).tolist() == [0]
    # three names along S: sorted by z
    z = np.array([[0, 0, 1.0], [0, 0, 9.0], [0, 0, 5.0]])
    assert assign_by_order(z, 3, "S", np.zeros(3)).tolist() == [2, 0, 1]


def test_validation_orders_unordered_instances_to_the_truth():
    groups = ChannelGroups([{"name": "dots", "landmarks": ["a", "b"], "order": "unordered"}], ["a", "b"])
    truth_voxel = torch.tensor([[[5.0, 5.0], [20.0, 22.0]]], dtype=torch.float64)
    heat = gaussian_heatmaps(truth_voxel, (32, 32), sigma=2.0, gamma=None)
    heat = combine_channels(heat * torch.tensor([0.5, 1.0]).reshape(1, 2, 1, 1), groups.members)  # b brighter
    image = MetaTensor(torch.zeros(1, 1, 32, 32), affine=torch.eye(4, dtype=torch.float64))
    out = DecodeLandmarksd(channel_groups=groups)({"pred": heat, "image": image, "landmarks": truth_voxel})
    assert np.nanmax(out["errors_mm"]) < 0.1  # matched, although "b" is the more confident instance
    predict = DecodeLandmarksd(truth_key=None, channel_groups=groups)({"pred": heat, "image": image})
    assert np.abs(predict["pred_world"][0, 0].numpy() - [20.0, 22.0]).max() < 0.1  # dots#1 = most confident


# ---------------------------------------------------------------------------------------------- metrics


def test_hungarian_precision_recall_on_a_hand_made_case():
    truth = np.array([[[0.0, 0.0], [10.0, 0.0], [20.0, 0.0]]])
    pred = np.array([[[10.0, 1.0], [50.0, 50.0], [0.5, 0.0]]])  # 2 within 2 mm, 1 false positive, 1 missed
    r = instance_detection(pred, truth, radius_mm=2.0)
    assert (r["n_predicted"], r["n_true"], r["n_matched"]) == (3, 3, 2)
    assert r["precision"] == pytest.approx(2 / 3) and r["recall"] == pytest.approx(2 / 3)
    assert r["f1"] == pytest.approx(2 / 3) and r["mre"] == pytest.approx(0.75)
    # a missing prediction row is no prediction: precision 1, recall 2/3
    pred[0, 1] = np.nan
    r = instance_detection(pred, truth, radius_mm=2.0)
    assert r["precision"] == pytest.approx(1.0) and r["recall"] == pytest.approx(2 / 3)
    assert r["f1"] == pytest.approx(0.8)
    # a radius of 0.6 mm keeps only the 0.5 mm pair
    assert instance_detection(pred, truth, radius_mm=0.6)["n_matched"] == 1


def test_left_right_swaps_and_group_identification():
    truth = np.array([[[10.0, 0, 0], [0, 5, 0], [-10.0, 0, 0]]] * 3)
    pred = truth.copy()
    pred[1, [0, 2]] = pred[1, [2, 0]]  # case 1: swapped
    pred[2, 2] = np.nan  # case 2: one missing, not counted
    assert left_right_swaps(pred, truth, [(0, 2)]) == 1
    assert group_identification_rate(pred, truth, [0, 2], radius_mm=2.0) == pytest.approx(100 * 3 / 6)


# ---------------------------------------------------------------------------------------------- end to end


def test_tiny_training_and_predict_with_a_shared_channel(tmp_path):
    data = write_dots_dataset(tmp_path / "data")
    bundle = tmp_path / "synthetic_dots"
    shutil.copytree(BUNDLE, bundle)
    overlay = tmp_path / "shared.yaml"
    overlay.write_text("channel_groups: [{name: dots, landmarks: [bright, dim], order: unordered}]\n"
                       "max_epochs: 3\nval_interval: 3\n")
    run(bundle_cmd(bundle, "training", [str(overlay)], "--dataset_dir", str(data)), cwd=REPO_ROOT, timeout=600)
    state, description = read_model_file(bundle / "models" / "model.pt")
    assert description["channel_groups"][0]["landmarks"] == ["bright", "dim"]
    out_weight = [v for k, v in state.items() if v.ndim == 4]
    assert all(v.shape[0] != 2 for v in out_weight)  # no 2-channel head: one shared channel

    # predict needs no overlay: the model file brings the channel groups
    out = tmp_path / "pred"
    summary = P.run_predict(P.PredictOptions(bundle, data / "images", out, num_workers=0, progress=False,
                                             pattern="eval*"))
    assert summary.failed == 0 and summary.processed == 8
    with open(out / "landmarks.csv", newline="") as f:
        rows = [r for r in csv.DictReader(line for line in f if not line.startswith("#"))]
    assert sorted({r["name"] for r in rows}) == ["dots#1", "dots#2"]
    assert len(rows) == 16
    conf = {(r["case"], r["name"]): float(r["confidence"]) for r in rows if r["confidence"] not in ("", "nan")}
    found = [c for c in conf.values() if math.isfinite(c)]
    assert found, rows
    for case in {r["case"] for r in rows}:  # instances by decreasing confidence
        if (case, "dots#1") in conf and (case, "dots#2") in conf:
            assert conf[(case, "dots#1")] >= conf[(case, "dots#2")]
    # the dots are found: Hungarian matching at 4 mm of the unlabelled instances to the true dots
    truth, pred = read_landmark_table(data / "landmarks.csv"), read_landmark_table(out / "landmarks.csv")
    cases = sorted(pred)
    r = instance_detection(np.stack([pred[c].coords for c in cases]), np.stack([truth[c].coords for c in cases]), 4.0)
    assert r["recall"] >= 0.9 and r["precision"] >= 0.9 and r["mre"] < 1.5, r
