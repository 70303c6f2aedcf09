"""Segmentation of 2D pictures of any size, up to gigapixel, with bounded memory on both devices.

GPU memory: windows of the training size are the only thing on the accelerator (``sliding_window_inference``
with ``sw_device`` = model device, ``device`` = CPU).
CPU memory: stitching a 16384² image whole would need float32 buffers of 1 GiB per output channel plus the
count map and the float input (3 GiB for RGB). Instead the image is cut into horizontal bands of whole rows;
each band is extended by half a window of context above and below, segmented with sliding windows, and only its
core rows are kept. Float buffers therefore scale with ``band rows x width``, while the full-size arrays are the
uint8/uint16 input and the uint8 label map. Every kept pixel sees at least half a window of real context, so
band joins show no seams.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .io import InputError, load_image2d
from .predictor import Predictor

__all__ = ["segment_image", "ImageResult", "normalizer_for", "band_rows_for", "overlay_rgb", "mask_for_png"]

# Colours for class 1..N in overlays (class 0 = background is left untouched).
PALETTE = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180],
                    [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128],
                    [220, 190, 255], [170, 110, 40], [255, 250, 200], [128, 0, 0], [170, 255, 195]], np.uint8)


class ImageResult:
    def __init__(self, image: np.ndarray, full_scale: float, labels: np.ndarray, probs: np.ndarray | None,
                 summary: dict):
        self.image, self.full_scale, self.labels, self.probs, self.summary = image, full_scale, labels, probs, summary


def normalizer_for(predictor: Predictor, image: np.ndarray, full_scale: float):
    """Function mapping a uint8/uint16 band (h, W, C) to the normalised (1, C, h, W) float32 tensor, as in training:
    16-bit pictures are min-max stretched to 0..255 like ``vm_unet.datasets.folder.read_image`` does, then
    ``(v / max_pixel_value - mean) / std`` per channel (albumentations ``Normalize``)."""
    pre = predictor.meta.get("preprocessing", {}) or {}
    norm = pre.get("normalize") or {}
    c = predictor.in_chans
    mean = np.asarray(norm.get("mean", [0.0] * c), np.float32).reshape(-1)
    std = np.asarray(norm.get("std", [1.0] * c), np.float32).reshape(-1)
    if mean.size != c or std.size != c:
        raise InputError(f"checkpoint normalize mean/std have {mean.size}/{std.size} values for {c} channels")
    max_px = float(norm.get("max_pixel_value", 255.0))
    if full_scale > 255:
        lo, hi = float(image.min()), float(image.max())
        gain, offset = 255.0 / max(hi - lo, 1e-8), lo
    else:
        gain, offset = 1.0, 0.0
    # One fused affine map per channel: v -> ((v - offset) * gain / max_px - mean) / std
    scale = torch.from_numpy(gain / max_px / std).view(1, c, 1, 1)
    shift = torch.from_numpy((-offset * gain / max_px - mean) / std).view(1, c, 1, 1)

    def to_tensor(band: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(band.astype(np.float32)).permute(2, 0, 1)[None]  # astype: the one copy we need
        return x.mul_(scale).add_(shift)

    return to_tensor


def band_rows_for(predictor: Predictor, width: int, max_band_mb: float) -> int:
    """Core rows per band so that the band's float buffers (input C, output n_out, MONAI count map, probability
    copy n_out) stay under ``max_band_mb``; a multiple of the window height, at least one window."""
    per_row = 4 * width * (predictor.in_chans + 2 * predictor.n_out + 1)
    rows = int(max_band_mb * 2 ** 20 // per_row) - predictor.image_size[0]  # minus the context rows
    win = predictor.image_size[0]
    return max(win, rows // win * win)


def segment_image(path: Path, predictor: Predictor, probabilities: bool = False, progress: bool = True,
                  max_band_mb: float = 1024.0) -> ImageResult:
    """Segment one picture file. Returns uint8 labels (H, W) and, if asked, uint8 probabilities (H, W, n_out)
    scaled to 0..255 (8 bits are plenty for a map meant to be viewed or re-thresholded)."""
    path = Path(path)
    image, full = load_image2d(path, predictor.in_chans)
    h, w = image.shape[:2]
    to_tensor = normalizer_for(predictor, image, full)
    labels = np.zeros((h, w), np.uint8 if predictor.n_labels <= 256 else np.uint16)
    probs = np.zeros((h, w, predictor.n_out), np.uint8) if probabilities else None
    if predictor.mode == "resize":
        bands = [(0, h)]  # the network sees the whole picture at the training size: nothing to band
        ctx = 0
    else:
        core = band_rows_for(predictor, w, max_band_mb)
        bands = [(t, min(h, t + core)) for t in range(0, h, core)]
        ctx = predictor.image_size[0] // 2
    bar = tqdm(total=h, desc=path.name, unit="row", disable=not progress, leave=False)
    try:
        for top, bottom in bands:
            lo, hi = max(0, top - ctx), min(h, bottom + ctx)
            p = predictor(to_tensor(image[lo:hi]))[0, :, top - lo: bottom - lo]  # (n_out, rows, W)
            labels[top:bottom] = predictor.labels(p[None])[0].cpu().numpy()
            if probabilities:
                probs[top:bottom] = (p.permute(1, 2, 0) * 255).round_().to(torch.uint8).cpu().numpy()
            del p
            bar.update(bottom - top)
    finally:
        bar.close()
    counts = np.bincount(labels.ravel(), minlength=predictor.n_labels)
    summary = {
        "input": str(path), "kind": "image", "shape": [h, w], "mode": predictor.mode, "tta": predictor.tta,
        "classes": {name: {"pixels": int(counts[i]), "fraction": round(float(counts[i]) / (h * w), 6)}
                    for i, name in enumerate(predictor.class_names)},
    }
    return ImageResult(image, full, labels, probs, summary)


def mask_for_png(labels: np.ndarray, binary: bool) -> np.ndarray:
    """Binary masks as 0/255 (viewable, the ISIC convention); multi-class masks as class indices."""
    if binary:
        out = labels.view(np.uint8) if labels.dtype == np.uint8 else labels.astype(np.uint8)
        return out * np.uint8(255)
    return labels


def overlay_rgb(image: np.ndarray, full_scale: float, labels: np.ndarray, alpha: float = 0.45,
                rows: int = 2048) -> np.ndarray:
    """RGB uint8 picture with class colours blended in; computed in row blocks to keep float temporaries small."""
    h, w = labels.shape
    out = np.empty((h, w, 3), np.uint8)
    lo, hi = (float(image.min()), float(image.max())) if full_scale > 255 else (0.0, 255.0)
    for t in range(0, h, rows):
        img = image[t:t + rows]
        if full_scale > 255:  # 16-bit: stretch for display
            img = ((img.astype(np.float32) - lo) * (255.0 / max(hi - lo, 1e-8))).astype(np.uint8)
        if img.shape[-1] == 1:
            img = np.repeat(img, 3, axis=-1)
        elif img.shape[-1] != 3:
            img = img[..., :3]
        lab = labels[t:t + rows]
        colour = PALETTE[(lab.astype(np.int64) - 1) % len(PALETTE)]
        blend = (img * (1 - alpha) + colour * alpha).astype(np.uint8)
        out[t:t + rows] = np.where((lab > 0)[..., None], blend, img)
    return out
