"""Synthetic dermoscopy-like lesions with exact masks, so training runs with no download.

Every sample is a pure function of ``(seed, index, size)``: irregular pigmented lesion (radial harmonics + noise
boundary), skin texture, hairs drawn over lesion and skin, and vignetting like a dermatoscope's round field.
The mask is the lesion region before hairs are drawn (hairs occlude but do not change the lesion, as in ISIC).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw
from scipy.ndimage import gaussian_filter


def _smooth_noise(rng: np.random.Generator, h: int, w: int, sigma: float) -> np.ndarray:
    n = gaussian_filter(rng.standard_normal((h, w)), sigma=sigma, mode="wrap")
    return n / (n.std() + 1e-8)


def make_lesion(index: int, seed: int = 0, size: int | tuple[int, int] = 64) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(image uint8 HxWx3, mask uint8 HxW in {0,1})`` for one synthetic case."""
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    # SeedSequence keeps (seed, index) streams independent, unlike seed + index.
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(index), h, w]))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    s = min(h, w)

    # Skin: base tone + low-frequency blotches + fine pore texture.
    skin = np.array([rng.uniform(190, 235), rng.uniform(140, 185), rng.uniform(115, 160)])
    img = np.ones((h, w, 3)) * skin
    img += (8 * _smooth_noise(rng, h, w, s / 8))[..., None] * np.array([1.0, 0.8, 0.7])
    img += (4 * _smooth_noise(rng, h, w, 0.8))[..., None]

    # Lesion: star-convex shape with random harmonics, plus smoothed noise for a ragged border.
    cy, cx = h / 2 + rng.uniform(-0.15, 0.15) * h, w / 2 + rng.uniform(-0.15, 0.15) * w
    r0 = s * rng.uniform(0.14, 0.3)
    theta = np.arctan2(yy - cy, xx - cx)
    rad = np.ones_like(theta)
    for k in range(2, 7):
        rad += rng.uniform(0, 0.22 / (k - 1) ** 0.7) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    dist = np.hypot((yy - cy) / rng.uniform(0.8, 1.2), xx - cx) / (r0 * rad)
    field = dist + 0.12 * _smooth_noise(rng, h, w, max(1.0, s / 24))
    mask = field < 1.0
    if not mask.any():  # keep every sample non-empty so per-image Dice is always defined
        mask[int(cy), int(cx)] = True

    # Pigment: darker brown centre, lighter rim, mottled network.
    pigment = np.array([rng.uniform(70, 140), rng.uniform(40, 90), rng.uniform(25, 70)])
    inner = np.clip(1.0 - field, 0, 1) ** 0.5
    mottle = 0.5 + 0.5 * np.tanh(_smooth_noise(rng, h, w, max(1.0, s / 32)))
    alpha = np.clip(0.55 + 0.45 * inner * (0.6 + 0.4 * mottle), 0, 1) * mask
    alpha = gaussian_filter(alpha, 0.7)  # soft edge like a real photo; mask stays crisp
    darker = pigment * (0.75 + 0.35 * mottle[..., None])
    img = img * (1 - alpha[..., None]) + darker * alpha[..., None]

    # Hairs: dark thin quadratic curves across the field.
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for _ in range(int(rng.integers(0, 6))):
        p0, p1, p2 = rng.uniform(0, 1, (3, 2)) * np.array([w, h])
        t = np.linspace(0, 1, 24)[:, None]
        pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2
        shade = int(rng.uniform(20, 70))
        draw.line([tuple(p) for p in pts], fill=(shade, shade - 10 if shade > 10 else 0, shade // 2),
                  width=max(1, int(round(s / 128 * rng.uniform(0.8, 1.6)))))
    img = np.asarray(pil).astype(np.float64)

    # Vignetting: darkening towards the corners (round dermatoscope field).
    r = np.hypot((yy - h / 2) / (h / 2), (xx - w / 2) / (w / 2))
    img *= (1 - rng.uniform(0.2, 0.55) * np.clip(r - 0.75, 0, None) ** 1.5)[..., None]
    img += rng.normal(0, 2.0, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), mask.astype(np.uint8)


class SyntheticLesions:
    """Deterministic list of ``(image, mask)`` samples (``len`` = ``num_samples``), offset so splits differ."""

    def __init__(self, num_samples: int, size: int | tuple[int, int] = 64, seed: int = 0, offset: int = 0):
        self.num_samples, self.size, self.seed, self.offset = int(num_samples), size, int(seed), int(offset)

    def __len__(self) -> int:
        return self.num_samples

    def name(self, i: int) -> str:
        return f"synthetic_{self.offset + i:06d}"

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= i < self.num_samples:
            raise IndexError(i)
        return make_lesion(self.offset + i, self.seed, self.size)
