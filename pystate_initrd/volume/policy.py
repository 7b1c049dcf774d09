"""The resize policy's parameters from the trusted configuration (SPEC §9: [resize], [image]).

The initrd (provisioning, the offline shrink) and the booted service decide with the same
parameters, from the configuration the initrd used.
"""

from __future__ import annotations

from pystate_initrd.config import Config
from pystate_initrd.formats.resize_policy import PPM, PolicyParams


def params_from_config(cfg: Config) -> PolicyParams:
    """The policy's parameters from the trusted configuration (SPEC §9, [resize] and [image])."""
    return PolicyParams(
        weights=cfg.weights,
        reserve_ppm=round(cfg.reserve_percent * (PPM // 100)),
        reserve_min=cfg.reserve_min_bytes,
        min_image_size=cfg.min_image_size,
    )
