"""2-D image/mask folder pairs in the ISIC layout: ``ROOT/images/*`` + ``ROOT/masks/*`` matched by file stem.

Mask names may carry a suffix (``_segmentation``, ``_Segmentation``, ``_mask``). Optional ``train/ val/ test/``
subfolders each hold their own ``images/`` + ``masks/``. Every problem is raised as :class:`DataError` naming the
file, because a silently skipped or mis-paired mask is worse than a stopped run.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from vm_unet.errors import DataError

from .labels import apply_label_map
from .pairs import pair_by_key

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
MASK_SUFFIXES = ("_segmentation", "_Segmentation", "_mask", "_Mask")
IMAGE_DIRS = ("images", "image", "imgs")
MASK_DIRS = ("masks", "mask", "labels", "ground_truth")


def _files(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS and not p.name.startswith("."))


def _mask_key(stem: str) -> str:
    for s in MASK_SUFFIXES:
        if stem.endswith(s):
            return stem[: -len(s)]
    return stem


def _find_dir(root: Path, names) -> Path | None:
    for n in names:
        if (root / n).is_dir():
            return root / n
    return None


def find_pairs(root) -> list[tuple[Path, Path]]:
    """Match ``images/`` and ``masks/`` under ``root``; unmatched files on either side are an error."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: data folder not found")
    img_dir, mask_dir = _find_dir(root, IMAGE_DIRS), _find_dir(root, MASK_DIRS)
    if img_dir is None or mask_dir is None:
        raise DataError(f"{root}: expected sub-folders images/ and masks/ (ISIC layout)")
    images, masks = _files(img_dir), _files(mask_dir)
    if not images:
        raise DataError(f"{img_dir}: no image files ({', '.join(sorted(IMAGE_EXTS))})")
    if not masks:
        raise DataError(f"{mask_dir}: no mask files")
    by_key: dict[str, Path] = {}
    for m in masks:
        k = _mask_key(m.stem)
        if k in by_key:
            raise DataError(f"{m}: two masks for image '{k}' ({by_key[k].name} and {m.name})")
        by_key[k] = m
    img_keys: dict[str, Path] = {}
    for p in images:
        if p.stem in img_keys:
            raise DataError(f"{p}: two images with stem '{p.stem}' ({img_keys[p.stem].name} and {p.name})")
        img_keys[p.stem] = p
    return pair_by_key(img_keys, by_key, mask_dir, img_dir, "mask")


def read_image(path: Path, in_chans: int) -> np.ndarray:
    """HxWxC uint8 (C = in_chans: grey images are repeated to RGB, RGB converted to grey for in_chans=1)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()
                if im.mode in ("I;16", "I;16B", "I", "F"):  # 16-bit greyscale: rescale, don't clip to 255
                    a = np.asarray(im, dtype=np.float64)
                    a = (a - a.min()) / max(a.max() - a.min(), 1e-8) * 255
                    im = Image.fromarray(a.astype(np.uint8))
                im = im.convert("L" if in_chans == 1 else "RGB")
                a = np.asarray(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: cannot read image ({e.__class__.__name__}: {str(e).splitlines()[0][:120]})") from None
    if a.ndim == 2:
        a = a[..., None]
    if in_chans not in (1, 3):
        raise DataError(f"{path}: picture files give 1 or 3 channels, the model wants in_chans={in_chans}")
    return a


def read_mask(path: Path) -> np.ndarray:
    """HxW integer array. RGB masks are accepted only when the 3 channels are equal (a saved grey mask)."""
    try:
        with Image.open(path) as im:
            im.load()
            a = np.asarray(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: cannot read mask ({e.__class__.__name__}: {str(e).splitlines()[0][:120]})") from None
    if a.ndim == 3:
        if a.shape[2] == 4:
            a = a[..., :3]
        if not (a == a[..., :1]).all():
            raise DataError(f"{path}: mask is a colour image with differing channels; save masks as one-channel "
                            "class-index or 0/255 images")
        a = a[..., 0]
    if a.dtype == bool:
        a = a.astype(np.uint8)
    return a


def mask_to_labels(mask: np.ndarray, path, num_classes: int, threshold: float | None = None,
                   label_map: dict | None = None) -> np.ndarray:
    """Convert stored mask values to class indices and check them.

    Binary (num_classes == 1): values must be {0,255} or {0,1} (or any values when ``threshold`` is set, e.g. for
    JPEG-compressed masks). Multi-class: values (after ``label_map``) must lie in [0, num_classes)."""
    if label_map:
        mask = apply_label_map(mask, label_map, path, "mask")
    if num_classes == 1:
        if threshold is not None:
            return (mask > threshold).astype(np.int64)
        vals = np.unique(mask)
        if set(vals.tolist()) <= {0, 1}:
            return mask.astype(np.int64)
        if set(vals.tolist()) <= {0, 255}:
            return (mask == 255).astype(np.int64)
        shown = ", ".join(str(int(v)) for v in vals[:8]) + (", ..." if len(vals) > 8 else "")
        raise DataError(f"{path}: mask is not binary (values {shown}); binary masks must be 0/255 or 0/1 - set "
                        "data.mask_threshold (e.g. 127) to binarise, or num_classes for class-index masks")
    mask = mask.astype(np.int64)
    lo, hi = int(mask.min()), int(mask.max())
    if lo < 0 or hi >= num_classes:
        raise DataError(f"{path}: mask values range {lo}..{hi} but num_classes={num_classes} needs 0..{num_classes - 1}"
                        " (use data.label_map to remap)")
    return mask


def check_pair(img: Path, mask: Path, full: bool, num_classes: int, threshold=None, label_map=None) -> None:
    """Header check (readable, same size) or, with ``full``, decode both and check mask values."""
    try:
        with Image.open(img) as a:
            isz = a.size
            if full:
                a.load()
            else:
                a.verify()  # checks the file structure (e.g. PNG CRCs) without decoding
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{img}: cannot read image ({e.__class__.__name__}: {str(e).splitlines()[0][:120]})") from None
    if full:
        m = read_mask(mask)
        msz = (m.shape[1], m.shape[0])
        mask_to_labels(m, mask, num_classes, threshold, label_map)
    else:
        try:
            with Image.open(mask) as b:
                msz = b.size
                b.verify()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise DataError(f"{mask}: cannot read mask ({e.__class__.__name__}: {str(e).splitlines()[0][:120]})") from None
    if isz != msz:
        raise DataError(f"{mask}: mask size {msz[0]}x{msz[1]} differs from image {img.name} size {isz[0]}x{isz[1]}")


class FolderPairs:
    """List of image/mask pairs with validated loading; returns ``(image HxWxC uint8, labels HxW int64)``."""

    def __init__(self, pairs: list[tuple[Path, Path]], in_chans: int = 3, num_classes: int = 1,
                 mask_threshold: float | None = None, label_map: dict | None = None):
        self.pairs, self.in_chans, self.num_classes = list(pairs), in_chans, num_classes
        self.mask_threshold, self.label_map = mask_threshold, label_map

    def __len__(self) -> int:
        return len(self.pairs)

    def name(self, i: int) -> str:
        return self.pairs[i][0].stem

    def verify(self, full: bool, indices=None) -> None:
        for i in range(len(self.pairs)) if indices is None else indices:
            check_pair(*self.pairs[i], full, self.num_classes, self.mask_threshold, self.label_map)

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        img_p, mask_p = self.pairs[i]
        img = read_image(img_p, self.in_chans)
        raw = read_mask(mask_p)
        if raw.shape[:2] != img.shape[:2]:
            raise DataError(f"{mask_p}: mask size {raw.shape[1]}x{raw.shape[0]} differs from image {img_p.name} "
                            f"size {img.shape[1]}x{img.shape[0]}")
        return img, mask_to_labels(raw, mask_p, self.num_classes, self.mask_threshold, self.label_map)
