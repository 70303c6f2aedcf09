"""Validation metrics.

Per image/case (MONAI, foreground classes only): Dice, IoU, HD95 (pixels/voxels; 3-D per volume in evaluation). Empty-vs-empty gives Dice = IoU = 1
(a correct "no lesion" answer); HD95 is NaN when either side is empty and is left out of means (counted).
Pooled over the whole set (as the published VM-UNet reports): confusion-matrix DSC, mIoU, accuracy, specificity,
sensitivity per foreground class. Counts are plain sums, so they reduce across DDP ranks exactly.

HD95 can run in worker processes (``hd95_pool``): MONAI's call costs milliseconds of Python an image (about 3.5 ms at
256² on one CI-class core, the distance transform itself a sixth of it), which holds the GIL, so threads do not help;
in the training process it was most of validation. Submitted batch by batch, it overlaps the model's forward passes.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import signal
import warnings
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np
import torch
from monai.metrics import DiceMetric, MeanIoU, compute_hausdorff_distance


def predict_labels(logits: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """(B, C, H, W) logits -> (B, H, W) class indices."""
    if logits.shape[1] == 1:
        return (torch.sigmoid(logits.float()[:, 0]) > threshold).long()
    return logits.argmax(1)


def one_hot(labels: torch.Tensor, n: int) -> torch.Tensor:
    """(B, *spatial) -> (B, n, *spatial); works for 2-D slices and 3-D volumes."""
    return torch.nn.functional.one_hot(labels.long(), n).movedim(-1, 1).float()


def hd95_batch(pred: np.ndarray, target: np.ndarray, n: int) -> np.ndarray:
    """(B, *spatial) class indices (numpy, same shape) -> (B, n - 1) float64 HD95 per foreground class (MONAI's
    ``compute_hausdorff_distance`` at the 95th percentile, in pixels/voxels), NaN where either side is empty. A plain
    function of numpy arrays so that worker processes can run it."""
    p1, t1 = one_hot(torch.from_numpy(pred), n), one_hot(torch.from_numpy(target), n)
    with warnings.catch_warnings():  # MONAI warns for every empty prediction/label; we report NaN instead
        warnings.simplefilter("ignore")
        hd = compute_hausdorff_distance(p1, t1, include_background=False, percentile=95).double()
    empty = (p1[:, 1:].flatten(2).sum(-1) == 0) | (t1[:, 1:].flatten(2).sum(-1) == 0)  # HD undefined
    hd[empty] = float("nan")
    return hd.numpy()


def _metric_worker():
    # one thread a worker: the pool is the parallelism. With torch's default (a thread per core) in every worker,
    # their spinning OpenMP threads took validation from 3 s to 40 s on a 16-core host
    torch.set_num_threads(1)
    # Ctrl-C reaches the whole process group: the trainer handles it; its workers would only print tracebacks
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def default_metric_workers(device: str) -> int:
    """HD95 worker processes worth having: with a GPU computing the model, half the cores this process may use,
    split among the node's training processes (torchrun's LOCAL_WORLD_SIZE), at most 8; on CPU none (the model's
    forward passes already use the cores)."""
    if device != "cuda":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(8, cores // (2 * int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def hd95_pool(workers: int) -> ProcessPoolExecutor | None:
    """Worker processes for ``SegMetrics``' HD95, or None for ``workers`` <= 0. Spawned (the trainer's process holds
    CUDA, which a forked child must not touch) and started now: each imports torch and MONAI, a few seconds that
    then overlap training instead of the first validation."""
    if workers <= 0:
        return None
    try:
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_metric_worker)
        for _ in range(workers):   # not waited on: the pool starts a worker for each job queued while none is idle
            pool.submit(os.getpid)
    except (OSError, NotImplementedError) as e:   # e.g. no POSIX semaphores in some sandboxes
        warnings.warn(f"HD95 worker processes unavailable ({e}); computing HD95 in the training process",
                      stacklevel=2)
        return None
    return pool


class SegMetrics:
    """Accumulates per-item metrics and pooled confusion counts; ``summary()`` after (optional) DDP reduction.
    ``pool``: an executor (``hd95_pool``) that computes HD95 while the caller goes on; its results are collected by
    ``reduce()`` / ``summary()``."""

    def __init__(self, num_classes: int, class_names: list[str], hd95: bool = True,
                 pool: ProcessPoolExecutor | None = None):
        self.n = 2 if num_classes == 1 else num_classes
        self.class_names = class_names
        self.hd95 = hd95
        self.pool = pool
        self.dice = DiceMetric(include_background=False, reduction="none", ignore_empty=False)
        self.iou = MeanIoU(include_background=False, reduction="none", ignore_empty=False)
        self.reset()

    def reset(self):
        self.rows: list[dict] = []
        self.pending: list[tuple[int, Future, tuple]] = []   # (first row, HD95 of its batch, its arguments)
        self.conf = torch.zeros(self.n, 4, dtype=torch.float64)  # per class: TP, FP, FN, TN
        for m in (self.dice, self.iou):
            m.reset()   # MONAI's metrics also keep every call's result; we only use the returned values

    def update(self, pred: torch.Tensor, target: torch.Tensor, names: list[str], cases: list[str] | None = None):
        """``pred``/``target``: (B, H, W) or (B, X, Y, Z) class indices (same size).

        Dice, IoU and the confusion counts are computed where ``pred`` lives (the GPU during training: copying
        full masks to the host and reducing them there was the slowest part of validation, badly so with several
        jobs sharing the CPU); only the per-item numbers come back. HD95 runs on the host (distance transforms), in
        the pool when there is one.
        """
        pred, target = pred.detach().long(), target.detach().long().to(pred.device)
        hd = None
        if self.hd95:
            # class indices travel to the host (and to a worker) in the smallest type that holds them
            small = torch.uint8 if self.n <= 256 else torch.int32
            args = (pred.to(small).cpu().numpy(), target.to(small).cpu().numpy(), self.n)
            if self.pool is not None:
                try:
                    self.pending.append((len(self.rows), self.pool.submit(hd95_batch, *args), args))
                except BrokenProcessPool:
                    self._without_pool()
            if self.pool is None:
                hd = torch.from_numpy(hd95_batch(*args))
        p1, t1 = one_hot(pred, self.n), one_hot(target, self.n)
        dice = self.dice(p1, t1).double()
        iou = self.iou(p1, t1).double()
        if hd is None:   # not computed, or not yet (filled in by _collect)
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
                suf = self._suffix(c)
                row[f"dice{suf}"] = float(dice[b, c - 1])
                row[f"iou{suf}"] = float(iou[b, c - 1])
                row[f"hd95{suf}"] = float(hd[b, c - 1])
                row[f"gt_pixels{suf}"] = int(gt_pixels[b, c])
                row[f"pred_pixels{suf}"] = int(pred_pixels[b, c])
            if self.n > 2:
                row["dice"] = float(np.mean([row[f"dice_{self.class_names[c]}"] for c in range(1, self.n)]))
                row["iou"] = float(np.mean([row[f"iou_{self.class_names[c]}"] for c in range(1, self.n)]))
            self.rows.append(row)

    def _suffix(self, c: int) -> str:
        """Per-class column suffix of class ``c``: none for a binary task, ``_<name>`` otherwise."""
        return "" if self.n == 2 else f"_{self.class_names[c]}"

    def _collect(self):
        """Fill in the HD95 values computed in the pool. A pool whose worker died (e.g. killed for memory) is given
        up for this process's own computation, with a warning, rather than failing the run."""
        for first, fut, args in self.pending:
            try:
                hd = fut.result()
            except BrokenProcessPool:
                self._without_pool()
                hd = hd95_batch(*args)
            for b in range(hd.shape[0]):
                row = self.rows[first + b]
                for c in range(1, self.n):
                    row[f"hd95{self._suffix(c)}"] = float(hd[b, c - 1])
        self.pending = []

    def _without_pool(self):
        if self.pool is not None:
            warnings.warn("an HD95 worker process died; computing HD95 in the training process from now on",
                          stacklevel=3)
            self.pool = None

    def reduce(self):
        """Combine ranks: sum confusion counts, gather per-item rows (no-op without torch.distributed)."""
        from .distributed import all_gather_objects, all_reduce_sum

        self._collect()
        self.conf = all_reduce_sum(self.conf)
        self.rows = sorted(sum(all_gather_objects(self.rows), []), key=lambda r: r["name"])

    @staticmethod
    def pooled_from_counts(conf: torch.Tensor) -> dict:
        tp, fp, fn, tn = (conf[:, i] for i in range(4))
        div = lambda a, b: torch.where(b > 0, a / b.clamp(min=1e-12), torch.full_like(a, float("nan")))  # noqa
        return {"dsc": div(2 * tp, 2 * tp + fp + fn), "iou": div(tp, tp + fp + fn), "accuracy": div(tp + tn, tp + fp + fn + tn),
                "specificity": div(tn, tn + fp), "sensitivity": div(tp, tp + fn)}

    def summary(self) -> dict:
        self._collect()
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
