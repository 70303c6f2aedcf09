"""Validation metrics.

Per image/case (MONAI, foreground classes only): Dice, IoU, HD95 (pixels/voxels; 3-D per volume in evaluation). Empty-vs-empty gives Dice = IoU = 1
(a correct "no lesion" answer); HD95 is NaN when either side is empty and is left out of means (counted).
Pooled over the whole set (as the published VM-UNet reports): confusion-matrix DSC, mIoU, accuracy, specificity,
sensitivity per foreground class. Counts are plain sums, so they reduce across DDP ranks exactly.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from monai.metrics import DiceMetric, HausdorffDistanceMetric, MeanIoU


def predict_labels(logits: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """(B, C, H, W) logits -> (B, H, W) class indices."""
    if logits.shape[1] == 1:
        return (torch.sigmoid(logits.float()[:, 0]) > threshold).long()
    return logits.argmax(1)


def one_hot(labels: torch.Tensor, n: int) -> torch.Tensor:
    """(B, *spatial) -> (B, n, *spatial); works for 2-D slices and 3-D volumes."""
    return torch.nn.functional.one_hot(labels.long(), n).movedim(-1, 1).float()


class SegMetrics:
    """Accumulates per-item metrics and pooled confusion counts; ``summary()`` after (optional) DDP reduction."""

    def __init__(self, num_classes: int, class_names: list[str], hd95: bool = True):
        self.n = 2 if num_classes == 1 else num_classes
        self.class_names = class_names
        self.hd95 = hd95
        self.dice = DiceMetric(include_background=False, reduction="none", ignore_empty=False)
        self.iou = MeanIoU(include_background=False, reduction="none", ignore_empty=False)
        self.hd = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")
        self.reset()

    def reset(self):
        self.rows: list[dict] = []
        self.conf = torch.zeros(self.n, 4, dtype=torch.float64)  # per class: TP, FP, FN, TN
        for m in (self.dice, self.iou, self.hd):
            m.reset()   # MONAI's metrics also keep every call's result; we only use the returned values

    def update(self, pred: torch.Tensor, target: torch.Tensor, names: list[str], cases: list[str] | None = None):
        """``pred``/``target``: (B, H, W) or (B, X, Y, Z) class indices (same size).

        Dice, IoU and the confusion counts are computed where ``pred`` lives (the GPU during training: copying
        full masks to the host and reducing them there was the slowest part of validation, badly so with several
        jobs sharing the CPU); only the per-item numbers come back. HD95 runs on the host (distance transforms).
        """
        pred, target = pred.detach().long(), target.detach().long().to(pred.device)
        p1, t1 = one_hot(pred, self.n), one_hot(target, self.n)
        dice = self.dice(p1, t1).double()
        iou = self.iou(p1, t1).double()
        if self.hd95:
            p1c, t1c = p1.cpu(), t1.cpu()
            with warnings.catch_warnings():  # MONAI warns for every empty prediction/label; we report NaN instead
                warnings.simplefilter("ignore")
                hd = self.hd(p1c, t1c).double()
            empty = (p1c[:, 1:].flatten(2).sum(-1) == 0) | (t1c[:, 1:].flatten(2).sum(-1) == 0)  # HD undefined
            hd[empty] = float("nan")
        else:
            hd = torch.full(dice.shape, float("nan"), dtype=torch.float64)
        dims = (0, *range(2, p1.ndim))
        tp = (p1 * t1).sum(dims).double()
        fp = (p1 * (1 - t1)).sum(dims).double()
        fn = ((1 - p1) * t1).sum(dims).double()
        tn = ((1 - p1) * (1 - t1)).sum(dims).double()
        self.conf += torch.stack([tp, fp, fn, tn], 1).cpu()
        gt_pixels, pred_pixels = t1.flatten(2).sum(-1).long().cpu(), p1.flatten(2).sum(-1).long().cpu()
        dice, iou, hd = dice.cpu(), iou.cpu(), hd.cpu()
        for b in range(pred.shape[0]):
            row = {"name": names[b], "case": (cases or names)[b]}
            for c in range(1, self.n):
                suf = "" if self.n == 2 else f"_{self.class_names[c]}"
                row[f"dice{suf}"] = float(dice[b, c - 1])
                row[f"iou{suf}"] = float(iou[b, c - 1])
                row[f"hd95{suf}"] = float(hd[b, c - 1])
                row[f"gt_pixels{suf}"] = int(gt_pixels[b, c])
                row[f"pred_pixels{suf}"] = int(pred_pixels[b, c])
            if self.n > 2:
                row["dice"] = float(np.mean([row[f"dice_{self.class_names[c]}"] for c in range(1, self.n)]))
                row["iou"] = float(np.mean([row[f"iou_{self.class_names[c]}"] for c in range(1, self.n)]))
            self.rows.append(row)

    def reduce(self):
        """Combine ranks: sum confusion counts, gather per-item rows (no-op without torch.distributed)."""
        from .distributed import all_gather_objects, all_reduce_sum

        self.conf = all_reduce_sum(self.conf)
        self.rows = sorted(sum(all_gather_objects(self.rows), []), key=lambda r: r["name"])

    @staticmethod
    def pooled_from_counts(conf: torch.Tensor) -> dict:
        tp, fp, fn, tn = (conf[:, i] for i in range(4))
        div = lambda a, b: torch.where(b > 0, a / b.clamp(min=1e-12), torch.full_like(a, float("nan")))  # noqa
        return {"dsc": div(2 * tp, 2 * tp + fp + fn), "iou": div(tp, tp + fp + fn), "accuracy": div(tp + tn, tp + fp + fn + tn),
                "specificity": div(tn, tn + fp), "sensitivity": div(tp, tp + fn)}

    def summary(self) -> dict:
        pooled = self.pooled_from_counts(self.conf)
        out: dict = {"n_items": len(self.rows)}
        # pooled: foreground classes; mean over them for the headline numbers
        for k, v in pooled.items():
            fg = v[1:]
            out[f"pooled_{k}"] = float(torch.nanmean(fg)) if fg.numel() else float("nan")
            if self.n > 2:
                for c in range(1, self.n):
                    out[f"pooled_{k}_{self.class_names[c]}"] = float(v[c])
        out["pooled_miou"] = out.pop("pooled_iou")
        for k in ("dice", "iou", "hd95"):
            vals = np.array([r.get(k, r.get(f"{k}_{self.class_names[1]}", float("nan"))) if self.n == 2 or k != "hd95"
                             else np.nanmean([r[f"hd95_{self.class_names[c]}"] for c in range(1, self.n)])
                             for r in self.rows], dtype=float) if self.rows else np.array([])
            finite = vals[np.isfinite(vals)]
            out[f"mean_{k}"] = float(finite.mean()) if finite.size else float("nan")
            if k == "hd95":
                out["hd95_undefined"] = int(vals.size - finite.size)
        return out


def finite_or_none(d: dict) -> dict:
    """JSON-safe copy (NaN -> None)."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}
