"""Augmentation pipelines built from YAML lists, using albumentations (pictures) and MONAI (volume slices).

YAML form (``augment:`` in a config), one dict per transform, ``name`` = the library class::

    augment:
      - {name: HorizontalFlip, p: 0.5}
      - {name: Affine, rotate: [-30, 30], scale: [0.9, 1.1], translate_percent: [-0.05, 0.05], p: 0.5}
      - {name: ColorJitter, brightness: 0.2, contrast: 0.2, saturation: 0.1, hue: 0.02, p: 0.5}
      - {name: ElasticTransform, alpha: 20, sigma: 5, p: 0.2}

For volume slices the names are MONAI dictionary transforms (``RandFlipd``, ``RandRotated``, ``RandZoomd``...);
``keys`` defaults to ``[image, label]`` and interpolation modes default to bilinear/nearest.

Every sample is augmented with its own seed (drawn by the sampler from ``(seed, epoch, position)``), so the
augmentation stream does not depend on worker count or process RNG state - which makes ``--resume`` exact.
"""

from __future__ import annotations

import inspect
import os

import numpy as np
import torch

from vm_unet.errors import ConfigError


def _spec_items(augment):
    for spec in augment or []:
        if not isinstance(spec, dict) or "name" not in spec:
            raise ConfigError(f"augment entries need a 'name' (library transform class), got {spec!r}")
        kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in spec.items() if k != "name"}
        yield spec["name"], kw


def _albumentations():
    # albumentations asks PyPI for its latest version on import (2 s timeout, a warning offline, once per
    # data-loader process); training on clinical data should not call out. An explicit user setting wins.
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import albumentations as A

    return A


def resize_op(image_size):
    """The resize every picture starts with in training (``PictureTransform``, ``ResizedPairs``): one definition,
    so that a pair resized ahead of time is exactly what the transform would have made of it."""
    h, w = image_size
    return _albumentations().Resize(h, w)


def albumentations_mask(mask: np.ndarray) -> np.ndarray:
    """Labels as the dtype albumentations' OpenCV ops take (they reject int64)."""
    return mask.astype(np.uint8) if mask.max() < 256 else mask.astype(np.int32)


class PictureTransform:
    """albumentations: resize -> augment -> normalise; returns a (C,H,W) float32 tensor and (H,W) int64 labels.

    ``compact``: stop before normalising and return the (C,H,W) uint8 picture with labels as albumentations holds
    them (uint8 below 256 classes): the training loader moves a fifth of the bytes (a 256² batch of 32: 8 MB instead
    of 42), and :class:`DeviceNormalize` finishes the job on the GPU. On an H200 the loader's main process topped out
    near 900 img/s on float batches, below what compiled training takes (BENCHMARKS.md)."""

    def __init__(self, image_size, mean, std, max_pixel_value=255.0, augment=None, compact: bool = False):
        A = _albumentations()
        ops = [resize_op(image_size)]
        for name, kw in _spec_items(augment):
            cls = getattr(A, name, None)
            if cls is None or not inspect.isclass(cls):
                raise ConfigError(f"augment: albumentations has no transform named {name!r}")
            try:
                ops.append(cls(**kw))
            except Exception as e:
                raise ConfigError(f"augment: albumentations.{name}({kw}) failed: {e}") from None
        if not compact:
            ops.append(A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=float(max_pixel_value)))
        self.compose, self.compact = A.Compose(ops, seed=0), compact

    def __call__(self, image: np.ndarray, mask: np.ndarray, seed: int | None):
        if seed is not None:
            self.compose.set_random_seed(int(seed))
        out = self.compose(image=image, mask=albumentations_mask(mask))
        img = torch.from_numpy(np.ascontiguousarray(out["image"].transpose(2, 0, 1)))
        labels = torch.from_numpy(np.ascontiguousarray(out["mask"]))
        return (img, labels) if self.compact else (img.float(), labels.long())


class DeviceNormalize:
    """Model input from a training batch, on its device: uint8 pictures (``PictureTransform(compact=True)``) get the
    normalisation ``A.Normalize`` would have applied, from the preprocessing record; float batches (volume slices,
    normalised in the loader) pass through."""

    def __init__(self, preprocessing: dict, device):
        norm = preprocessing.get("normalize")
        self.mean = self.std = None
        if norm:
            scale = float(norm.get("max_pixel_value", 255.0))
            as_column = lambda v: torch.tensor([float(a) * scale for a in v], device=device).view(-1, 1, 1)  # noqa
            self.mean, self.std = as_column(norm["mean"]), as_column(norm["std"])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.uint8:
            return x
        if self.mean is None:
            raise ValueError("uint8 batch without a normalisation in the preprocessing record")
        return (x.float() - self.mean) / self.std


class SliceTransform:
    """MONAI dictionary transforms for (already intensity-normalised) volume slices."""

    def __init__(self, image_size, augment=None):
        import monai.transforms as M

        keys = ["image", "label"]
        ops = [M.Resized(keys=keys, spatial_size=tuple(image_size), mode=("bilinear", "nearest"))]
        for name, kw in _spec_items(augment):
            cls = getattr(M, name, None)
            if cls is None or not inspect.isclass(cls):
                raise ConfigError(f"augment: monai.transforms has no transform named {name!r}")
            kw.setdefault("keys", keys)
            params = inspect.signature(cls.__init__).parameters
            if "mode" in params and "mode" not in kw:
                kw["mode"] = ("bilinear", "nearest")
            try:
                ops.append(cls(**kw))
            except Exception as e:
                raise ConfigError(f"augment: monai.transforms.{name}({kw}) failed: {e}") from None
        ops.append(M.EnsureTyped(keys=keys, track_meta=False))
        self.compose = M.Compose(ops)

    def __call__(self, image: np.ndarray, mask: np.ndarray, seed: int | None):
        if seed is not None:
            self.compose.set_random_state(seed=int(seed) % (2 ** 32))
        d = self.compose({"image": np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32),
                          "label": mask[None].astype(np.float32)})
        return torch.as_tensor(d["image"]).float(), torch.as_tensor(d["label"])[0].round().long()
