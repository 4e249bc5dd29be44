"""Print a markdown table of the parameter counts of every network's default configuration.

2D: in_channels=1, num_landmarks=19 (ISBI 2015 cephalometric landmarks); 3D: in_channels=1,
num_landmarks=32 (AFIDs). Default widths/kernels/depths as in the papers. Needs no data:

    .venv/bin/python bench/network_params.py
"""

from __future__ import annotations

import torch

from heatmark.networks import get_network

NUM_LANDMARKS = {2: 19, 3: 32}

ROWS = [
    ("scn2019", "SpatialConfiguration-Net 2019: 4-level additive U-Net (local) x coarse 11x11/7^3 conv net with tanh (spatial)",
     "Payer et al., Med. Image Anal. 2019"),
    ("scn2016", "SpatialConfiguration-Net 2016: 3 convs 5x5 (local) x per-landmark 15x15 conv over the other landmarks at 1/8 (spatial)",
     "Payer et al., MICCAI 2016"),
    ("unet", "U-Net: average pooling, linear upsampling, concatenation skips, two 3x3 convs per level, constant width",
     "Payer et al., MICCAI 2016"),
    ("downsampling", "Downsampling-Net: (2 convs + avg pool) x 2 (2D) / x 1 (3D), 2 convs, output at 1/4 (2D) / 1/2 (3D)",
     "Payer et al., MICCAI 2016"),
    ("convonly", "ConvOnly-Net: 6 large-kernel convs (11x11 / 5^3), no pooling",
     "Payer et al., MICCAI 2016"),
    ("coordreg", "Coordinate regression: conv encoder, adaptive pooling, FC head -> normalised (N, D) coordinates",
     "Huang et al."),
]


def count(name: str, spatial_dims: int) -> int:
    net = get_network(name, spatial_dims=spatial_dims, in_channels=1, num_landmarks=NUM_LANDMARKS[spatial_dims])
    return sum(p.numel() for p in net.parameters())


def main() -> None:
    torch.manual_seed(0)
    print(
        f"Parameter counts of the default configurations (in_channels=1; "
        f"2D: num_landmarks={NUM_LANDMARKS[2]}, 3D: num_landmarks={NUM_LANDMARKS[3]})\n"
    )
    print("| network | 2D params | 3D params | description | reference |")
    print("|---|---:|---:|---|---|")
    for name, description, reference in ROWS:
        print(f"| `{name}` | {count(name, 2):,} | {count(name, 3):,} | {description} | {reference} |")


if __name__ == "__main__":
    main()
