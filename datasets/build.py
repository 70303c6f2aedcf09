"""Build train/val/test datasets and the preprocessing spec from the ``data`` section of a config."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from vm_unet.errors import ConfigError, DataError

from . import folder, volume
from .resized_cache import ResizedPairs
from .synthetic import SyntheticLesions
from .transforms import PictureTransform, SliceTransform

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
KINDS = ("synthetic", "folder", "nifti", "synapse")


class SegDataset(Dataset):
    """Wraps a source (``load(i) -> (image HxWxC, labels HxW)``, ``name(i)``) with a transform.

    ``__getitem__`` takes an int (no augmentation) or ``(index, seed)`` from the training sampler (augmentation
    seeded per sample). Returns ``{"image": (C,H,W) float, "mask": (H,W) long, "name": str, "case": str}``."""

    def __init__(self, source, transform, augment_transform=None):
        self.source, self.transform, self.augment_transform = source, transform, augment_transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, item):
        i, seed = item if isinstance(item, tuple) else (item, None)
        img, mask = self.source.load(int(i))
        tf = self.augment_transform if (seed is not None and self.augment_transform is not None) else self.transform
        x, y = tf(img, mask, seed)
        case = self.source.case(i) if hasattr(self.source, "case") else self.source.name(i)
        return {"image": x, "mask": y, "name": self.source.name(i), "case": case}

    @property
    def sample_weights(self):
        return getattr(self.source, "weights", None)


@dataclass
class DataBundle:
    train: SegDataset | None
    val: SegDataset | None
    test: SegDataset | None
    preprocessing: dict
    class_names: list[str]
    split: dict = field(default_factory=dict)


def _image_size(v) -> list[int]:
    if isinstance(v, int):
        return [v, v]
    if isinstance(v, (list, tuple)) and len(v) == 2:
        return [int(v[0]), int(v[1])]
    raise ConfigError(f"data.image_size must be an int or [H, W], got {v!r}")


def seeded_split(keys: list[str], val_fraction: float, test_fraction: float, seed: int) -> dict[str, list[str]]:
    """Deterministic split of ``keys``; test and val are disjoint and val is never empty when asked for."""
    keys = sorted(keys)
    order = np.random.default_rng(seed).permutation(len(keys))
    n = len(keys)
    n_test = int(round(n * test_fraction))
    n_val = max(1, int(round(n * val_fraction))) if val_fraction > 0 else 0
    if n - n_test - n_val < 1:
        raise DataError(f"only {n} cases: too few for val_fraction={val_fraction}, test_fraction={test_fraction}")
    shuffled = [keys[i] for i in order]
    return {"test": sorted(shuffled[:n_test]), "val": sorted(shuffled[n_test:n_test + n_val]),
            "train": sorted(shuffled[n_test + n_val:])}


def _split_from_cfg(data: dict, keys: list[str]) -> dict[str, list[str]]:
    split = data.get("split") or {}
    if split.get("mode") == "all":  # evaluation of a whole folder
        return {"train": [], "val": [], "test": sorted(keys)}
    if split.get("file"):
        p = Path(split["file"])
        try:
            d = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"{p}: cannot read split file ({e})") from None
        unknown = sorted(set(sum((list(d.get(s, [])) for s in ("train", "val", "test")), [])) - set(keys))
        if unknown:
            raise DataError(f"{p}: split names {unknown[:5]} are not in the data folder")
        if set(d.get("val", [])) & set(d.get("test", [])):
            raise DataError(f"{p}: val and test splits overlap")
        return {s: sorted(d.get(s, [])) for s in ("train", "val", "test")}
    return seeded_split(keys, float(split.get("val_fraction", 0.2)), float(split.get("test_fraction", 0.0)),
                        int(split.get("seed", 0)))


def _verify_full(data: dict, n: int) -> bool:
    v = data.get("verify", "auto")
    if v == "auto":
        return n <= 2000  # decoding every mask up front is cheap at this size and catches bad labels before training
    return v == "full"


def _cache_on(data: dict) -> bool:
    """``data.cache`` (default true), checked."""
    on = data.get("cache", True)
    if not isinstance(on, bool):
        raise ConfigError(f"data.cache must be true or false, got {on!r}")
    return on


def build_datasets(cfg: dict, splits=("train", "val", "test"), root_override=None,
                   for_training: bool = False) -> DataBundle:
    """Datasets for the requested splits. Raises DataError/ConfigError (one line, naming the file) on bad input.

    ``for_training``: the caller is the trainer, which sees pictures only at ``data.image_size`` and batches them
    through a loader. Picture folders are then read through on-disk copies at that size (``ResizedPairs`` in
    ``data.cache_dir``; ``data.cache: false`` turns it off), and pictures come as uint8 with compact labels, for
    :class:`~vm_unet.datasets.transforms.DeviceNormalize` to finish on the device."""
    data, model = cfg.get("data", {}), cfg.get("model", {})
    kind = data.get("kind", "synthetic")
    if kind not in KINDS:
        raise ConfigError(f"data.kind must be one of {', '.join(KINDS)}, got {kind!r}")
    size = _image_size(data.get("image_size", 64))
    in_chans, num_classes = int(model.get("in_chans", 3)), int(model.get("num_classes", 1))
    class_names = list(data.get("class_names") or (["background", "foreground"] if num_classes == 1
                                                    else [f"class{i}" for i in range(num_classes)]))
    if len(class_names) != (2 if num_classes == 1 else num_classes):
        raise ConfigError(f"data.class_names has {len(class_names)} names; a task with num_classes={num_classes} "
                          f"needs {2 if num_classes == 1 else num_classes} (binary tasks name background too)")
    augment = cfg.get("augment") or []
    root = root_override if root_override is not None else data.get("root")
    split_record: dict = {}

    if kind in ("synthetic", "folder"):
        mean = data.get("mean", IMAGENET_MEAN if in_chans == 3 else (0.5,))
        std = data.get("std", IMAGENET_STD if in_chans == 3 else (0.25,))
        if len(mean) != in_chans or len(std) != in_chans:
            raise ConfigError(f"data.mean/std need {in_chans} values for in_chans={in_chans}")
        # inference_mode: the trainer resizes whole images to image_size, so inference must do the same by default
        preprocessing = {"input": "image2d", "image_size": size, "in_chans": in_chans, "inference_mode": "resize",
                         "normalize": {"mean": list(mean), "std": list(std), "max_pixel_value": 255.0},
                         "threshold": float(data.get("threshold", 0.5))}
        plain = PictureTransform(size, mean, std, compact=for_training)
        aug = PictureTransform(size, mean, std, augment=augment, compact=for_training) if augment else None
        if kind == "synthetic":
            if in_chans != 3 or num_classes != 1:
                raise ConfigError("synthetic data is RGB binary: model.in_chans=3, model.num_classes=1")
            n = data.get("num_samples", {})
            gen = int(data.get("synthetic_size", max(size)))
            seed = int(data.get("synthetic_seed", 0))
            # offsets keep the three splits disjoint sample streams
            sources = {"train": SyntheticLesions(int(n.get("train", 256)), gen, seed, 0),
                       "val": SyntheticLesions(int(n.get("val", 32)), gen, seed, 10_000_000),
                       "test": SyntheticLesions(int(n.get("test", 0)), gen, seed, 20_000_000)}
        else:
            if not root:
                raise ConfigError("data.root is not set (use --data-root DIR)")
            root = Path(root)
            if not root.is_dir():
                raise DataError(f"{root}: data folder not found")
            kw = dict(in_chans=in_chans, num_classes=num_classes, mask_threshold=data.get("mask_threshold"),
                      label_map=data.get("label_map"))
            if (root / "train").is_dir() or ((data.get("split") or {}).get("mode") == "all" and (root / "test").is_dir()):
                sources = {}
                for s in ("train", "val", "test"):
                    sources[s] = folder.FolderPairs(folder.find_pairs(root / s), **kw) if (root / s).is_dir() else None
                split_record = {"mode": "subfolders"}
            else:
                pairs = folder.find_pairs(root)
                by_stem = {p[0].stem: p for p in pairs}
                sp = _split_from_cfg(data, list(by_stem))
                sources = {s: folder.FolderPairs([by_stem[k] for k in sp[s]], **kw) if sp[s] else None
                           for s in ("train", "val", "test")}
                split_record = {"mode": "file" if (data.get("split") or {}).get("file") else "seeded", **sp}
            resized = for_training and _cache_on(data)
            for s in splits:
                if sources.get(s) is not None:
                    if resized:
                        sources[s] = ResizedPairs(sources[s], size, data.get("cache_dir"))
                    sources[s].verify(_verify_full(data, len(sources[s])))
    else:
        if not root:
            raise ConfigError("data.root is not set (use --data-root DIR)")
        intensity = data.get("intensity") or ({"mode": "none"} if kind == "synapse" else {"mode": "zscore"})
        axis = int(data.get("axis", 0 if kind == "synapse" else 2))
        preprocessing = {"input": "volume_slices", "image_size": size, "in_chans": in_chans, "axis": axis,
                         "inference_mode": "resize",
                         "intensity": dict(intensity), "reorient": "RAS" if kind == "nifti" else None,
                         "channels": data.get("channels"), "threshold": float(data.get("threshold", 0.5))}
        lab_kw = dict(label_map=data.get("label_map"), binarize=bool(data.get("binarize", False)))
        if kind == "nifti":
            pairs = volume.find_msd_pairs(root, data.get("images_dir", "imagesTr"), data.get("labels_dir", "labelsTr"))
            by_key = {volume._strip_nifti(p[1].name): p for p in pairs}
            sp = _split_from_cfg(data, list(by_key))
            load = lambda keys: volume.load_nifti_cases([by_key[k] for k in keys], num_classes, intensity,  # noqa
                                                        data.get("channels"), in_chans=in_chans, **lab_kw)
        else:
            if in_chans != 1:
                raise ConfigError("Synapse data has one channel: set model.in_chans=1")
            npz, h5 = volume.find_synapse(root)
            groups: dict[str, list[Path]] = {}
            for f in npz:  # slices like case0005_slice012.npz belong to case0005: split by case, never by slice
                groups.setdefault(f.stem.split("_slice")[0], []).append(f)
            if npz:
                sp = _split_from_cfg(data, list(groups))
                if h5 and not sp["test"]:
                    sp["test"] = sorted(f.name.split(".")[0] for f in h5)
                    groups.update({f.name.split(".")[0]: [f] for f in h5})
            else:
                groups = {f.name.split(".")[0]: [f] for f in h5}
                sp = _split_from_cfg(data, list(groups))
            load = lambda keys: volume.load_synapse_cases(sum((groups[k] for k in keys), []), num_classes,  # noqa
                                                          intensity, **lab_kw)
        split_record = {"mode": "file" if (data.get("split") or {}).get("file") else "seeded", **sp}
        ew = float(data.get("empty_slice_weight", 1.0))
        sources = {s: volume.VolumeSlices(load(sp[s]), axis, ew if s == "train" else 1.0)
                   if (sp[s] and s in splits) else None for s in ("train", "val", "test")}
        plain = SliceTransform(size)
        aug = SliceTransform(size, augment) if augment else None

    out = {}
    for s in ("train", "val", "test"):
        src = sources.get(s) if s in splits else None
        if src is not None and len(src) == 0:
            src = None
        out[s] = SegDataset(src, plain, aug if s == "train" else None) if src is not None else None
    if "train" in splits and out["train"] is None:
        raise DataError(f"{root or kind}: no training samples")
    if "val" in splits and out["val"] is None:
        raise DataError(f"{root or kind}: no validation samples (set data.split.val_fraction > 0 or add val/)")
    return DataBundle(out["train"], out["val"], out["test"], preprocessing, class_names, split_record)


def collate(batch):
    return {"image": torch.stack([b["image"] for b in batch]), "mask": torch.stack([b["mask"] for b in batch]),
            "name": [b["name"] for b in batch], "case": [b["case"] for b in batch]}
