"""Name -> network class registry, for configs and the command line.

``get_network("scn", spatial_dims=2, in_channels=1, num_landmarks=19)`` builds a network by name.
Names are case-insensitive; ``-`` and ``_`` are ignored (``"scn-2016"`` == ``"scn2016"``).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .coordreg import CoordinateRegressionNet
from .scn import SpatialConfigurationNet
from .simple import ConvOnlyNet, DownsamplingNet
from .unet import HeatmapUNet

__all__ = ["NETWORKS", "get_network", "network_names"]

#: Registered names (canonical names and aliases) -> network class.
NETWORKS: dict[str, type[nn.Module]] = {
    "scn2019": SpatialConfigurationNet,
    "scn": SpatialConfigurationNet,
    "scn2016": SpatialConfigurationNet,
    "unet": HeatmapUNet,
    "downsampling": DownsamplingNet,
    "convonly": ConvOnlyNet,
    "coordreg": CoordinateRegressionNet,
}

#: Constructor arguments implied by a name (``scn2016`` is the SCN class with ``variant="2016"``).
NAME_DEFAULTS: dict[str, dict[str, Any]] = {
    "scn2019": {"variant": "2019"},
    "scn": {"variant": "2019"},
    "scn2016": {"variant": "2016"},
}


def _normalise(name: str) -> str:
    return str(name).lower().replace("-", "").replace("_", "")


def network_names() -> list[str]:
    """All registered names (canonical names and aliases), in registration order."""
    return list(NETWORKS)


def get_network(name: str, **kwargs: Any) -> nn.Module:
    """Build the network registered as ``name`` with ``kwargs`` (``spatial_dims``, ``in_channels``,
    ``num_landmarks``, width/depth arguments of that class).

    Raises:
        ValueError: unknown name (the message lists the valid names), or an argument that
            contradicts the name (``get_network("scn2016", variant="2019")``).
    """
    key = _normalise(name)
    if key not in NETWORKS:
        raise ValueError(f"unknown network {name!r}; valid names: {', '.join(network_names())}")
    implied = NAME_DEFAULTS.get(key, {})
    for arg, value in implied.items():
        if arg in kwargs and str(kwargs[arg]) != str(value):
            raise ValueError(f"network {name!r} implies {arg}={value!r}, got {arg}={kwargs[arg]!r}")
    return NETWORKS[key](**{**implied, **kwargs})
