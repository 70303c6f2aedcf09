"""3-D volumes served as 2-D slices: NIfTI in the MSD layout (``imagesTr/`` + ``labelsTr/``) and the Synapse
format (``*.npz`` 2-D slices with ``image``/``label``, ``*.npy.h5`` volumes with ``image``/``label``).

Volumes are reoriented to RAS (nibabel ``as_closest_canonical``) so that ``axis`` means the same thing for every
file (0 = sagittal, 1 = coronal, 2 = axial), normalised once per volume (``intensity``), checked for NaN/Inf and
label values, and cached in memory as float32.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vm_unet.errors import DataError

from .intensity import normalize_intensity
from .labels import apply_label_map
from .pairs import pair_by_key

NIFTI_EXTS = (".nii.gz", ".nii")


def _strip_nifti(name: str) -> str | None:
    for e in NIFTI_EXTS:
        if name.endswith(e):
            return name[: -len(e)]
    return None


def find_msd_pairs(root, images_dir="imagesTr", labels_dir="labelsTr") -> list[tuple[Path, Path]]:
    """Pair ``imagesTr/X[_0000].nii.gz`` with ``labelsTr/X.nii.gz`` (nnU-Net channel suffix tolerated)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: data folder not found")
    idir, ldir = root / images_dir, root / labels_dir
    if not idir.is_dir() or not ldir.is_dir():
        raise DataError(f"{root}: expected sub-folders {images_dir}/ and {labels_dir}/ (MSD layout)")
    imgs = {}
    for p in sorted(idir.iterdir()):
        s = _strip_nifti(p.name)
        if s is None or p.name.startswith("."):
            continue
        key = s[:-5] if s.endswith("_0000") else s
        imgs[key] = p
    labs = {_strip_nifti(p.name): p for p in sorted(ldir.iterdir())
            if _strip_nifti(p.name) is not None and not p.name.startswith(".")}
    if not imgs:
        raise DataError(f"{idir}: no NIfTI files (.nii/.nii.gz)")
    return pair_by_key(imgs, labs, ldir, idir, "label")


def load_nifti(path, reorient: bool = True) -> np.ndarray:
    """Array in RAS orientation; 4-D files keep the modality axis last."""
    import nibabel as nib

    try:
        img = nib.load(str(path))
        if reorient:
            img = nib.as_closest_canonical(img)
        return np.asanyarray(img.dataobj)
    except Exception as e:  # nibabel raises many types (ImageFileError, EOFError, zlib errors...)
        raise DataError(f"{path}: cannot read NIfTI ({e.__class__.__name__}: {str(e).splitlines()[0][:120]})") from None


def remap_labels(lab: np.ndarray, path, num_classes: int, label_map: dict | None, binarize: bool) -> np.ndarray:
    if not np.issubdtype(lab.dtype, np.integer):
        if not np.isfinite(lab).all():
            raise DataError(f"{path}: label volume contains NaN/Inf")
        if not np.all(lab == np.round(lab)):
            raise DataError(f"{path}: label volume has non-integer values")
    lab = lab.astype(np.int64)
    if label_map:
        lab = apply_label_map(lab, label_map, path, "label")
    if binarize:
        lab = (lab > 0).astype(np.int64)
    n = 2 if num_classes == 1 else num_classes
    lo, hi = int(lab.min()), int(lab.max())
    if lo < 0 or hi >= n:
        raise DataError(f"{path}: label values range {lo}..{hi} but the task has {n} classes (0..{n - 1}); "
                        "set data.label_map or data.binarize")
    return lab


class VolumeSlices:
    """All 2-D slices along ``axis`` of a list of volumes; ``load(i)`` -> ``(image HxWxC float32, labels HxW)``."""

    def __init__(self, cases: list[tuple[str, np.ndarray, np.ndarray]], axis: int, empty_slice_weight: float = 1.0):
        # cases: (name, image (C, X, Y, Z) float32 normalised, labels (X, Y, Z) int64[, case group])
        self.cases, self.axis = cases, int(axis)
        self.index: list[tuple[int, int]] = []
        self.weights: list[float] = []
        for ci, (_, _, lab, *_) in enumerate(cases):
            fg = np.moveaxis(lab, self.axis, 0).reshape(lab.shape[self.axis], -1).any(1)
            for s in range(lab.shape[self.axis]):
                self.index.append((ci, s))
                self.weights.append(1.0 if fg[s] else float(empty_slice_weight))

    def __len__(self) -> int:
        return len(self.index)

    def name(self, i: int) -> str:
        ci, s = self.index[i]
        c = self.cases[ci]
        return c[0] if len(c) > 3 else f"{c[0]}_s{s:03d}"  # one-slice files (Synapse .npz) keep their own name

    def case(self, i: int) -> str:
        c = self.cases[self.index[i][0]]
        return c[3] if len(c) > 3 else c[0]  # optional 4th item: the patient/volume a slice file belongs to

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        ci, s = self.index[i]
        _, img, lab, *_ = self.cases[ci]
        im = np.take(img, s, axis=self.axis + 1)  # (C, H, W)
        return np.ascontiguousarray(np.moveaxis(im, 0, -1)), np.ascontiguousarray(np.take(lab, s, axis=self.axis))


def _check_finite(a: np.ndarray, path) -> None:
    if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
        bad = int((~np.isfinite(a)).sum())
        raise DataError(f"{path}: image contains {bad} NaN/Inf voxels")


def load_nifti_cases(pairs, num_classes: int, intensity: dict | None, channels: list[int] | None = None,
                     label_map: dict | None = None, binarize: bool = False, in_chans: int = 1):
    cases = []
    for ip, lp in pairs:
        img = load_nifti(ip)
        _check_finite(img, ip)
        img = img[..., None] if img.ndim == 3 else img
        if img.ndim != 4:
            raise DataError(f"{ip}: expected a 3-D or 4-D (with modalities last) volume, got shape {img.shape}")
        if channels is not None:
            if max(channels) >= img.shape[-1]:
                raise DataError(f"{ip}: has {img.shape[-1]} modalities, config asks for channels {channels}")
            img = img[..., list(channels)]
        if img.shape[-1] != in_chans:
            raise DataError(f"{ip}: gives {img.shape[-1]} channel(s) but model.in_chans={in_chans} "
                            "(set data.channels or model.in_chans)")
        lab = load_nifti(lp)
        if lab.shape != img.shape[:3]:
            raise DataError(f"{lp}: label shape {lab.shape} differs from image shape {img.shape[:3]}")
        lab = remap_labels(np.asarray(lab), lp, num_classes, label_map, binarize)
        chw = normalize_intensity(np.moveaxis(img.astype(np.float32), -1, 0), intensity)
        cases.append((_strip_nifti(Path(ip).name).removesuffix("_0000"), chw, lab))
    return cases


def find_synapse(root) -> tuple[list[Path], list[Path]]:
    """``(*.npz slice files, *.npy.h5 volume files)`` found (recursively) under ``root``."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: data folder not found")
    npz = sorted(root.rglob("*.npz"))
    h5 = sorted(root.rglob("*.npy.h5")) + sorted(p for p in root.rglob("*.h5") if not p.name.endswith(".npy.h5"))
    if not npz and not h5:
        raise DataError(f"{root}: no Synapse files (*.npz slices or *.npy.h5 volumes)")
    return npz, h5


def load_synapse_cases(files, num_classes: int, intensity: dict | None, label_map=None, binarize=False):
    """Synapse files as cases (C=1). A ``.npz`` is a one-slice volume (1, H, W); ``.h5`` volumes are (D, H, W)
    and stay in that order, so both slice along ``axis=0``."""
    import h5py

    cases = []
    for f in files:
        f = Path(f)
        try:
            if f.suffix == ".npz":
                with np.load(f) as z:
                    img, lab = z["image"], z["label"]
                img, lab = img[None], lab[None]  # a one-slice (D=1, H, W) volume, so axis 0 serves both kinds
                name, group = f.stem, f.stem.split("_slice")[0]
            else:
                with h5py.File(f, "r") as h:
                    img, lab = h["image"][()], h["label"][()]
                name = group = f.name.split(".")[0]
        except KeyError:
            raise DataError(f"{f}: expected arrays 'image' and 'label'") from None
        except Exception as e:
            raise DataError(f"{f}: cannot read ({e.__class__.__name__}: {str(e).splitlines()[0][:120]})") from None
        if img.shape != lab.shape:
            raise DataError(f"{f}: label shape {lab.shape} differs from image shape {img.shape}")
        _check_finite(np.asarray(img), f)
        lab = remap_labels(np.asarray(lab), f, num_classes, label_map, binarize)
        cases.append((name, normalize_intensity(np.asarray(img, np.float32)[None], intensity), lab, group))
    return cases
