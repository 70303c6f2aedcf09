"""Intensity normalisation for volumes, shared by training and inference so both see identical inputs.

Spec (a dict, stored in checkpoints under ``preprocessing.intensity``):
  ``{"mode": "zscore", "nonzero": true}``             per volume and channel; ``nonzero`` ignores the zero background
  ``{"mode": "percentile", "lower": 0.5, "upper": 99.5}``  clip to percentiles, scale to [0, 1]
  ``{"mode": "window", "a_min": -125, "a_max": 275}``   CT window, clip and scale to [0, 1]
  ``{"mode": "none"}``                                   data already normalised (e.g. Synapse .npz)
"""

from __future__ import annotations

import numpy as np
from monai.transforms import NormalizeIntensity, ScaleIntensityRange, ScaleIntensityRangePercentiles

from vm_unet.errors import ConfigError

MODES = ("zscore", "percentile", "window", "none")


def intensity_transform(spec: dict | None):
    """MONAI array transform implementing ``spec`` (applied to a channel-first array)."""
    spec = dict(spec or {"mode": "none"})
    mode = spec.get("mode", "none")
    if mode == "zscore":
        return NormalizeIntensity(nonzero=bool(spec.get("nonzero", True)), channel_wise=True)
    if mode == "percentile":
        return ScaleIntensityRangePercentiles(lower=float(spec.get("lower", 0.5)), upper=float(spec.get("upper", 99.5)),
                                              b_min=0.0, b_max=1.0, clip=True, channel_wise=True)
    if mode == "window":
        if "a_min" not in spec or "a_max" not in spec:
            raise ConfigError("intensity mode 'window' needs a_min and a_max (e.g. -125 and 275 for abdomen CT)")
        return ScaleIntensityRange(a_min=float(spec["a_min"]), a_max=float(spec["a_max"]), b_min=0.0, b_max=1.0,
                                   clip=True)
    if mode == "none":
        return lambda x: x
    raise ConfigError(f"unknown intensity mode {mode!r}; choose one of {', '.join(MODES)}")


def normalize_intensity(volume: np.ndarray, spec: dict | None) -> np.ndarray:
    """Normalise a channel-first volume ``(C, ...)`` according to ``spec``; returns float32 numpy."""
    out = intensity_transform(spec)(np.asarray(volume, dtype=np.float32))
    return np.asarray(out.detach().cpu().numpy() if hasattr(out, "detach") else out, dtype=np.float32)
