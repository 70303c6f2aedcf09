"""Evaluate a checkpoint on a data folder: per-case CSV, summary JSON (per-image means and pooled), overlays.

Pictures are scored per image; volumes (NIfTI/Synapse) per case in 3-D, from slice predictions stacked back.

Predictions are resized back to each item's original size, so metrics are measured at the resolution of the
ground truth, not at the network's input size."""

from __future__ import annotations

import copy
import csv
import io
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from vm_unet.checkpoint import load_checkpoint
from vm_unet.errors import ConfigError, DataError

from .metrics import SegMetrics, default_metric_workers, finite_or_none, hd95_pool, predict_labels
from .viz import save_overlays


def _config_for(meta: dict, config, data_root) -> dict:
    from .config import DEFAULTS, deep_update, load_config

    if config:
        cfg = load_config(config)
    elif meta.get("extra", {}).get("config"):
        cfg = copy.deepcopy(meta["extra"]["config"])
    else:
        cfg = copy.deepcopy(DEFAULTS)
    pp = meta["preprocessing"]
    cfg = deep_update(cfg, {"model": {"in_chans": meta["model_kwargs"]["in_chans"],
                                      "num_classes": meta["model_kwargs"]["num_classes"]}})
    d = cfg.setdefault("data", {})
    # the checkpoint's preprocessing wins: evaluating with other normalisation would silently skew metrics
    d["image_size"] = list(pp["image_size"])
    d["class_names"] = list(meta["class_names"])
    if pp.get("input") == "image2d":
        if d.get("kind") not in ("folder", "synthetic"):
            d["kind"] = "folder"
        d["mean"], d["std"] = pp["normalize"]["mean"], pp["normalize"]["std"]
    else:
        if d.get("kind") not in ("nifti", "synapse"):
            raise ConfigError("this checkpoint was trained on volume slices: pass --config with data.kind nifti/synapse")
        d["axis"], d["intensity"] = pp["axis"], pp["intensity"]
    if data_root is not None:
        if d.get("kind") == "synthetic":
            d["kind"] = "folder"
        d["root"] = str(data_root)
    d["split"] = {"mode": "all"} if d.get("kind") != "synthetic" else d.get("split", {})
    return cfg


@torch.no_grad()
def evaluate_checkpoint(checkpoint, data_root=None, config=None, out=None, device="cpu", overlays: int = 8) -> dict:
    from vm_unet.datasets import build_datasets

    model, meta = load_checkpoint(checkpoint, device=device)
    cfg = _config_for(meta, config, data_root)
    synthetic = cfg["data"].get("kind") == "synthetic"
    bundle = build_datasets(cfg, splits=("val",) if synthetic else ("test",))
    ds = bundle.val if synthetic else bundle.test
    if ds is None or len(ds) == 0:
        raise DataError(f"{data_root}: nothing to evaluate")
    nc = int(meta["model_kwargs"]["num_classes"])
    volumes = meta["preprocessing"].get("input") == "volume_slices"
    # HD95 in worker processes beside the GPU's forward passes (3-D volumes take seconds each)
    pool = hd95_pool(default_metric_workers(device))
    try:
        metrics = SegMetrics(nc, meta["class_names"], pool=pool)
        ov = _predict_and_score(model, meta, ds, metrics, device, overlays, volumes)
        scores = metrics.summary()
    finally:
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
    summary = {"checkpoint": str(checkpoint), "data_root": str(cfg["data"].get("root")), "model": meta["model_name"],
               "task": meta["task"], "resolution": "original (predictions resized to each ground truth)",
               "unit": "volume (3-D metrics per case)" if volumes else "image",
               **finite_or_none(scores)}
    out = Path(out) if out else Path(checkpoint).parent / f"eval-{Path(str(cfg['data'].get('root') or 'synthetic')).name}"
    out.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    keys = list(dict.fromkeys(k for r in metrics.rows for k in r))
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(metrics.rows)
    for name, text in (("per_case.csv", buf.getvalue()), ("summary.json", json.dumps(summary, indent=1))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)
    for k in range(0, len(ov), 4):
        save_overlays(ov[k:k + 4], out / "overlays" / f"overlay_{k // 4:03d}.png")
    summary["out"] = str(out)
    return summary


def _predict_and_score(model, meta: dict, ds, metrics: SegMetrics, device, overlays: int, volumes: bool) -> list:
    """Predict every item of ``ds`` at its original resolution and add it to ``metrics`` (per volume when
    ``volumes``: volume slices); returns up to ``overlays`` overlay items."""
    from tqdm.auto import tqdm

    thr = float(meta["preprocessing"].get("threshold", 0.5))
    ov = []
    src = ds.source
    if volumes:
        # per case = per volume: slice predictions are stacked back into the volume and scored in 3-D
        axis = int(meta["preprocessing"].get("axis", 2))
        for ci, (case, _, lab, *_) in enumerate(tqdm(src.cases, desc="evaluate", leave=False,
                                                      disable=os.environ.get("VMUNET_NO_PROGRESS") == "1")):
            idx = [i for i, (c, _) in enumerate(src.index) if c == ci]
            preds = []
            for k in range(0, len(idx), 16):
                xs, shapes = [], None
                for i in idx[k:k + 16]:
                    img, mask = src.load(i)
                    xs.append(ds.transform(img, mask, None)[0])
                    shapes = mask.shape[:2]
                logits = model(torch.stack(xs).to(device)).float()
                logits = F.interpolate(logits, size=shapes, mode="bilinear", align_corners=False)
                preds.append(predict_labels(logits, thr).cpu())
            pred = torch.cat(preds)  # (S, H, W) in slice order
            pred = pred.movedim(0, axis)  # back to the volume's (X, Y, Z) layout
            target = torch.as_tensor(lab).long()
            metrics.update(pred[None], target[None], [case], [case])
            if len(ov) < overlays:  # the slice with most foreground is the informative one
                s = int(torch.as_tensor(lab).movedim(axis, 0).flatten(1).sum(1).argmax())
                img, mask = src.load(idx[s])
                disp = (img - img.min()) / max(float(img.max() - img.min()), 1e-6)
                disp = disp[..., :1].repeat(3, -1) if disp.shape[-1] != 3 else disp
                ov.append((f"{case} slice {s}", disp, mask, pred.movedim(axis, 0)[s].numpy()))
    for i in ([] if volumes else tqdm(range(len(ds)), desc="evaluate", leave=False,
                                        disable=os.environ.get("VMUNET_NO_PROGRESS") == "1")):
        img, mask = src.load(i)
        x, _ = ds.transform(img, mask, None)
        logits = model(x[None].to(device)).float()
        logits = F.interpolate(logits, size=mask.shape[:2], mode="bilinear", align_corners=False)
        pred = predict_labels(logits, thr).cpu()
        target = torch.as_tensor(mask)[None].long()
        name = src.name(i)
        case = src.case(i) if hasattr(src, "case") else name
        metrics.update(pred, target, [name], [case])
        if len(ov) < overlays:
            disp = img.astype("float32")
            disp = disp / 255.0 if img.dtype.kind == "u" else (disp - disp.min()) / max(float(disp.max() - disp.min()), 1e-6)
            if disp.shape[-1] != 3:
                disp = disp[..., :1].repeat(3, -1)
            ov.append((name, disp, mask, pred[0].numpy()))
    return ov
