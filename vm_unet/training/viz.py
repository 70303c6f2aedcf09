"""Training curves and prediction overlays as PNG.

Figures are built with matplotlib's object API (``Figure``, no pyplot): no global figure registry and no GUI backend,
so they draw headless and from the trainer's background writer thread alike."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

COLOURS = np.array([[0, 0, 0], [255, 60, 60], [60, 200, 60], [60, 120, 255], [255, 200, 0], [200, 60, 255],
                    [0, 220, 220], [255, 128, 0]], dtype=np.float64)


def new_figure(nrows: int, ncols: int, figsize: tuple[float, float]):
    """(figure, 2-D array of axes) drawn with the Agg renderer, nothing registered with pyplot."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def _atomic_savefig(fig, path: Path):
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100, bbox_inches="tight")
    os.replace(tmp, path)


def plot_curves(history: list[dict], path) -> None:
    ep = [h["epoch"] for h in history]
    fig, axes = new_figure(1, 2, (10, 3.5))
    ax = axes[0]
    ax[0].plot(ep, [h["train_loss"] for h in history], "o-", label="train loss")
    if any(h.get("val_loss") is not None for h in history):
        ax[0].plot(ep, [h.get("val_loss") for h in history], "o-", label="val loss")
    ax[0].set_xlabel("epoch"), ax[0].legend(), ax[0].set_title("loss")
    for k in ("val_mean_dice", "val_pooled_dsc", "val_pooled_miou"):
        ax[1].plot(ep, [h.get(k) for h in history], "o-", label=k)
    ax[1].set_xlabel("epoch"), ax[1].set_ylim(0, 1), ax[1].legend(), ax[1].set_title("validation")
    _atomic_savefig(fig, Path(path))


def denormalize(img: np.ndarray, preprocessing: dict) -> np.ndarray:
    """(C,H,W) network input -> HxWx3 float in [0,1] for display."""
    norm = preprocessing.get("normalize")
    if norm:
        img = img * np.array(norm["std"])[:, None, None] + np.array(norm["mean"])[:, None, None]
    else:
        lo, hi = np.percentile(img, [1, 99])
        img = (img - lo) / max(hi - lo, 1e-6)
    img = np.clip(img, 0, 1).transpose(1, 2, 0)
    return np.repeat(img[..., :1], 3, -1) if img.shape[-1] != 3 else img


def overlay(img01: np.ndarray, labels: np.ndarray, alpha=0.45) -> np.ndarray:
    col = COLOURS[np.asarray(labels) % len(COLOURS)] / 255.0
    m = (np.asarray(labels) > 0)[..., None]
    return np.clip(np.where(m, (1 - alpha) * img01 + alpha * col, img01), 0, 1)


def save_overlays(items: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]], path, title: str = "") -> None:
    """items: (name, image HxWx3 in [0,1], ground truth HxW, prediction HxW). Rows: image | truth | prediction."""
    if not items:
        return
    fig, axes = new_figure(len(items), 3, (7.5, 2.5 * len(items)))
    for r, (name, img, gt, pred) in enumerate(items):
        for c, (im, t) in enumerate(((img, name), (overlay(img, gt), "truth"), (overlay(img, pred), "prediction"))):
            axes[r, c].imshow(im)
            axes[r, c].set_title(t, fontsize=8)
            axes[r, c].axis("off")
    if title:
        fig.suptitle(title)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    _atomic_savefig(fig, Path(path))
