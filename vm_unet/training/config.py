"""Config loading: shipped defaults <- YAML file <- CLI flags <- ``--set key=value`` (dotted keys, YAML values)."""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

from vm_unet.errors import ConfigError

DEFAULTS: dict = {
    "seed": 0,
    "device": "auto",          # auto | cpu | cuda
    "out": "runs",
    "run_name": None,
    "model": {"name": "vmunet_isic", "in_chans": 3, "num_classes": 1, "overrides": {}, "pretrained": None},
    "data": {"kind": "synthetic", "root": None, "image_size": 64, "num_workers": 0, "class_names": None,
             "split": {"val_fraction": 0.2, "test_fraction": 0.0, "seed": 0, "file": None},
             # picture folders: training reads copies resized to image_size, made in the first epoch
             # (datasets/resized_cache.py); cache_dir None: $VM_UNET_CACHE_DIR or ~/.cache/vm_unet/resized
             "cache": True, "cache_dir": None},
    "augment": [],
    "train": {
        "epochs": 2, "max_steps": None, "batch_size": 8, "lr": 1e-3, "weight_decay": 1e-2,
        "warmup_steps": 20, "min_lr_ratio": 0.01, "amp": "auto", "grad_clip": 1.0, "ema": None,
        "loss": {"ce_weight": 1.0, "dice_weight": 1.0}, "nan_policy": "stop", "val_batch_size": None,
        "overlays": 4, "hd95": True, "keep_epoch_checkpoints": False, "log_every": 10, "compile": False,
        "cuda_graphs": False, "grad_checkpointing": False,
        # processes computing validation HD95 beside the GPU's forward passes (auto: on CUDA, half the cores
        # shared among the node's training processes, at most 8; 0: in the training process)
        "metric_workers": "auto",
    },
}


def deep_update(base: dict, new: dict) -> dict:
    for k, v in (new or {}).items():
        if isinstance(v, dict) and isinstance(base.get(k), dict) and v:
            deep_update(base[k], v)
        else:
            base[k] = copy.deepcopy(v)
    return base


def load_config(name_or_path=None) -> dict:
    """Defaults merged with a YAML config (path or shipped name; ``None`` = ``synthetic``)."""
    from vm_unet.configs import resolve_config

    path = resolve_config(name_or_path or "synthetic")
    try:
        user = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot parse config ({str(e).splitlines()[0]})") from None
    if not isinstance(user, dict):
        raise ConfigError(f"{path}: config must be a YAML mapping")
    cfg = deep_update(copy.deepcopy(DEFAULTS), user)
    cfg["config_file"] = str(path)
    return cfg


def set_dotted(cfg: dict, key: str, value) -> None:
    parts = key.split(".")
    d = cfg
    for p in parts[:-1]:
        if not isinstance(d.get(p), dict):
            d[p] = {}
        d = d[p]
    d[parts[-1]] = value


def apply_sets(cfg: dict, sets: list[str] | None) -> dict:
    for s in sets or []:
        if "=" not in s:
            raise ConfigError(f"--set {s!r}: expected key=value (e.g. train.lr=3e-4)")
        k, v = s.split("=", 1)
        try:
            val = yaml.safe_load(v) if v != "" else None
        except yaml.YAMLError:
            raise ConfigError(f"--set {s!r}: value is not valid YAML") from None
        if isinstance(val, str) and k.split(".")[-1] in ("lr", "weight_decay", "min_lr_ratio"):
            try:  # YAML 1.1 reads 3e-4 as a string
                val = float(val)
            except ValueError:
                pass
        set_dotted(cfg, k.strip(), val)
    return cfg
