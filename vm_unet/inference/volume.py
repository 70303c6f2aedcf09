"""Slice-wise segmentation of NIfTI volumes with a 2D checkpoint.

Mirrors the trainer (``vm_unet.datasets.volume``): reorient to the checkpoint's ``reorient`` code (RAS:
``as_closest_canonical``) so ``axis`` means the same anatomical direction for every file, normalise the whole
volume once with ``vm_unet.datasets.intensity.normalize_intensity``, then cut 2D slices with ``np.take`` along
``axis``. Labels are mapped back to the stored orientation, so the output lies on the input's grid.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from vm_unet.datasets.intensity import normalize_intensity

from .io import InputError, load_volume, volume_spacing
from .predictor import Predictor

__all__ = ["prepare_volume", "segment_volume", "VolumeResult"]


class VolumeResult:
    """Labels ``(X, Y, Z)`` (and optional probabilities ``(X, Y, Z[, C])``) on the input grid, plus a summary."""

    def __init__(self, img, labels: np.ndarray, probs: np.ndarray | None, summary: dict):
        self.img, self.labels, self.probs, self.summary = img, labels, probs, summary


def _orientation_transforms(img, code: str | None):
    """``(to_model, to_file)`` orientation transforms for ``nibabel.orientations.apply_orientation``, or None
    when the file is already in the orientation the model was trained in."""
    if not code:
        return None
    from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

    stored = io_orientation(img.affine)
    target = axcodes2ornt(tuple(str(code).upper()))
    if np.array_equal(stored, target):
        return None
    return ornt_transform(stored, target), ornt_transform(target, stored)


def prepare_volume(path: Path, predictor: Predictor):
    """Read, check and normalise a volume -> ``(img, data (C, X', Y', Z') float32 in model orientation,
    orientation transforms or None, note)``. ``note`` mentions repaired voxels (empty string if none)."""
    from nibabel.orientations import apply_orientation

    pre = predictor.meta.get("preprocessing", {}) or {}
    img, data = load_volume(path, predictor.in_chans, pre.get("channels"))
    finite = np.isfinite(data)
    note = ""
    if not finite.all():
        if not finite.any():
            raise InputError(f"{path}: volume has no finite values (all NaN/Inf)")
        n_bad = int((~finite).sum())
        # Scanners/converters write NaN outside the field of view: treat it as the darkest (background) value.
        data = np.where(finite, data, np.nanmin(np.where(finite, data, np.nan), axis=(0, 1, 2), keepdims=True))
        note = f"{n_bad} NaN/Inf voxels set to the channel minimum"
    del finite
    lo, hi = data.min(axis=(0, 1, 2)), data.max(axis=(0, 1, 2))
    flat = [c for c in range(data.shape[-1]) if lo[c] == hi[c]]
    if flat:
        raise InputError(f"{path}: volume is constant (every voxel = {float(lo[flat[0]]):g}"
                         f"{'' if data.shape[-1] == 1 else f' in channel {flat[0]}'}); nothing to segment")
    orient = _orientation_transforms(img, pre.get("reorient"))
    if orient is not None:
        data = np.ascontiguousarray(apply_orientation(data, orient[0]))
    chw = normalize_intensity(np.moveaxis(data, -1, 0), pre.get("intensity"))
    return img, chw, orient, note


def segment_volume(path: Path, predictor: Predictor, axis: int | None = None, probabilities: bool = False,
                   progress: bool = True) -> VolumeResult:
    """Segment one NIfTI file slice by slice along ``axis`` (default: the checkpoint's)."""
    from nibabel.orientations import apply_orientation

    path = Path(path)
    pre = predictor.meta.get("preprocessing", {}) or {}
    axis = int(pre.get("axis", 2) if axis is None else axis)
    if axis not in (0, 1, 2):
        raise InputError(f"--axis must be 0, 1 or 2, got {axis}")
    img, chw, orient, note = prepare_volume(path, predictor)
    n_slices = chw.shape[axis + 1]
    labels = np.zeros(chw.shape[1:], dtype=np.uint8 if predictor.n_labels <= 256 else np.int32)
    probs = np.zeros(chw.shape[1:] + (predictor.n_out,), dtype=np.float32) if probabilities else None
    lab_view = np.moveaxis(labels, axis, 0)  # views: writing a slice writes the volume
    prob_view = np.moveaxis(probs, axis, 0) if probabilities else None
    # Slices with one window each batch well; with many windows per slice, sliding_window_inference batches the
    # windows itself, so a few slices per call keep stitching buffers small.
    slice_hw = [s for i, s in enumerate(chw.shape[1:]) if i != axis]
    n_win = math.prod(math.ceil(s / t) for s, t in zip(slice_hw, predictor.image_size)) \
        if predictor.mode == "window" else 1
    batch = max(1, predictor.sw_batch_size // max(1, n_win))
    bar = tqdm(total=n_slices, desc=path.name, unit="slice", disable=not progress, leave=False)
    try:
        for s0 in range(0, n_slices, batch):
            idx = np.arange(s0, min(n_slices, s0 + batch))
            x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.take(chw, idx, axis=axis + 1), axis + 1, 0)))
            p = predictor(x)  # (b, n_out, H, W) on the stitch device
            lab_view[idx] = predictor.labels(p).cpu().numpy()
            if probabilities:
                prob_view[idx] = p.permute(0, 2, 3, 1).cpu().numpy()
            bar.update(len(idx))
    finally:
        bar.close()
    if orient is not None:
        labels = np.ascontiguousarray(apply_orientation(labels, orient[1]))
        if probabilities:
            probs = np.ascontiguousarray(apply_orientation(probs, orient[1]))
    if probabilities and predictor.binary:
        probs = probs[..., 0]  # one foreground map: (X, Y, Z)
    spacing = volume_spacing(img)
    voxel_ml = math.prod(spacing) / 1000.0
    counts = np.bincount(labels.ravel(), minlength=predictor.n_labels)
    summary = {
        "input": str(path), "kind": "volume", "shape": list(labels.shape), "spacing_mm": [round(s, 6) for s in spacing],
        "axis": axis, "mode": predictor.mode, "tta": predictor.tta,
        "classes": {name: {"voxels": int(counts[i]), "ml": round(float(counts[i]) * voxel_ml, 4)}
                    for i, name in enumerate(predictor.class_names)},
    }
    if note:
        summary["note"] = note
    return VolumeResult(img, labels, probs, summary)
