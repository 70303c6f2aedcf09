"""Reading and (atomically) writing the files inference touches: NIfTI volumes, 2D pictures, PNG masks, JSON.

Every reader turns a broken file into an :class:`InputError` with one line naming the file, so CLIs can print it
without a traceback. Every writer goes through :func:`atomic_output`: the data is written to a hidden temporary
file in the destination folder and renamed over the destination only once it is complete, so a crash or a bad
input never leaves a partial output behind.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np

from vm_unet.errors import DataError

__all__ = [
    "InputError", "VOLUME_SUFFIXES", "IMAGE_SUFFIXES", "input_kind", "case_name", "list_inputs",
    "atomic_output", "check_writable_dir", "load_volume", "volume_spacing", "label_volume_like",
    "prob_volume_like", "save_nifti", "load_image2d", "save_png", "save_json",
]

VOLUME_SUFFIXES = (".nii.gz", ".nii")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class InputError(DataError):
    """An input file that cannot be segmented (unreadable, truncated, wrong shape/channels, no signal)."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0][:200] if text else type(e).__name__)


def input_kind(path: Path) -> str | None:
    """``"volume"``, ``"image"`` or None (unsupported suffix), from the file name."""
    name = path.name.lower()
    if name.endswith(VOLUME_SUFFIXES):
        return "volume"
    if name.endswith(IMAGE_SUFFIXES):
        return "image"
    return None


def case_name(path: Path) -> str:
    """File name without its (possibly double) suffix: ``a.nii.gz`` -> ``a``."""
    name = path.name
    for suf in VOLUME_SUFFIXES + IMAGE_SUFFIXES:
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return path.stem


def list_inputs(path: Path) -> list[Path]:
    """The supported files of a folder (not recursive, hidden files skipped, sorted) or ``[path]`` for a file."""
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if path.is_dir():
        files = sorted(p for p in path.iterdir()
                       if p.is_file() and not p.name.startswith(".") and input_kind(p) is not None)
        if not files:
            raise InputError(f"{path}: folder has no NIfTI (.nii/.nii.gz) or image "
                             f"({'/'.join(s[1:] for s in IMAGE_SUFFIXES)}) files")
        return files
    if input_kind(path) is None:
        raise InputError(f"{path}: unsupported file type; expected .nii/.nii.gz or "
                         f"{'/'.join(IMAGE_SUFFIXES)}")
    return [path]


# ----------------------------------------------------------------------------------------------------- writing

def check_writable_dir(folder: Path) -> None:
    """Create ``folder`` if needed and prove we can write there, before spending minutes on inference."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".vmunet-write-test.", dir=folder)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise InputError(f"{folder}: output folder is not writable ({e.strerror or _first_line(e)})") from None


@contextlib.contextmanager
def atomic_output(dest: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``dest``; rename it to ``dest`` when the block succeeds, delete it otherwise.

    The temporary name keeps ``dest``'s suffixes because nibabel picks gzip from the name (``.nii.gz``)."""
    dest = Path(dest)
    suffix = "".join(dest.suffixes[-2:]) if dest.name.lower().endswith(".nii.gz") else dest.suffix
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=f".tmp{suffix}", dir=dest.parent)
    except OSError as e:
        raise InputError(f"{dest.parent}: cannot write output ({e.strerror or _first_line(e)})") from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def save_json(obj, dest: Path) -> None:
    with atomic_output(dest) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------------- volumes

def _existing_file(path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: empty file")
    return path


def load_volume(path: Path, in_chans: int, channels: list[int] | None = None):
    """Read a NIfTI file -> ``(image, data)`` with data float32 ``(X, Y, Z, in_chans)`` in stored orientation.

    Accepted layouts: 3D (in_chans 1), 4D ``(X, Y, Z, modalities)``, and the NIfTI vector layout
    ``(X, Y, Z, 1, modalities)``; trailing singleton dimensions are dropped. ``channels`` picks modalities the
    way training did (``preprocessing["channels"]``)."""
    import nibabel as nib

    path = _existing_file(path)
    try:
        img = nib.load(str(path))
    except Exception as e:  # nibabel raises ImageFileError, gzip/zlib errors, struct errors... for junk
        raise InputError(f"{path}: not a readable NIfTI file ({_first_line(e).replace(str(path), 'file')})") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise InputError(f"{path}: not a NIfTI image ({type(img).__name__})")
    shape = tuple(int(s) for s in img.shape)
    if len(shape) < 3:
        raise InputError(f"{path}: is {len(shape)}D {shape}; expected a 3D volume")
    if any(s == 0 for s in shape):
        raise InputError(f"{path}: empty volume of shape {shape}")
    # (X, Y, Z, 1, C) is how NIfTI stores vector-valued voxels; (X, Y, Z, 1) is a 3D volume saved as 4D.
    chan_shape = [s for s in shape[3:] if s != 1] if len(shape) > 3 else []
    if len(chan_shape) > 1:
        raise InputError(f"{path}: has shape {shape}; expected (X, Y, Z) or (X, Y, Z, channels)")
    n_chan = chan_shape[0] if chan_shape else 1
    if channels is not None:
        channels = [int(c) for c in channels]
        if max(channels) >= n_chan or min(channels) < 0:
            raise InputError(f"{path}: has {n_chan} modalities (shape {shape}) but the checkpoint uses "
                             f"channels {channels}")
    elif n_chan != in_chans:
        if len(shape) > 3 and n_chan != 1:
            what = f"a 4D volume with {n_chan} channels in its last dimension (shape {shape})"
        else:
            what = f"a single-channel volume (shape {shape})"
        raise InputError(f"{path}: is {what} but the checkpoint expects {in_chans} channel(s)"
                         + (" (time series are not supported)" if in_chans == 1 else ""))
    try:
        data = np.asarray(img.dataobj, dtype=np.float32)  # applies scl_slope/inter; no float64 copy
    except Exception as e:  # truncated gzip -> EOFError/zlib.error, short file -> OSError/ValueError
        raise InputError(f"{path}: cannot read the voxel data, file is corrupt or truncated "
                         f"({_first_line(e).replace(str(path), 'file')})") from None
    data = data.reshape(shape[:3] + (n_chan,))
    if channels is not None:
        data = np.ascontiguousarray(data[..., channels])
        if data.shape[-1] != in_chans:
            raise InputError(f"{path}: channels {channels} give {data.shape[-1]} channel(s) but the model takes "
                             f"{in_chans}; the checkpoint is inconsistent")
    return img, data


def volume_spacing(img) -> tuple[float, float, float]:
    """Voxel size in mm along the three array axes (from pixdim, converted when the header says metres/microns)."""
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    unit = img.header.get_xyzt_units()[0]
    scale = {"meter": 1000.0, "micron": 1e-3}.get(unit, 1.0)
    return tuple(z * scale for z in zooms)


def _derived_header(ref_img, dtype):
    hdr = ref_img.header.copy()
    hdr.set_data_dtype(dtype)
    hdr.set_slope_inter(1.0, 0.0)  # written values are the values; never rescale labels
    return hdr


def label_volume_like(labels: np.ndarray, ref_img):
    """Integer label image on the input's grid: same affine, qform/sform (+codes) and header fields.

    affine=None makes nibabel keep the header's qform/sform untouched instead of re-deriving one from the other."""
    import nibabel as nib

    dtype = np.uint8 if labels.max(initial=0) <= 255 else np.uint16
    hdr = _derived_header(ref_img, dtype)
    hdr["cal_min"], hdr["cal_max"] = 0, float(labels.max(initial=0))
    hdr.set_intent("label")
    hdr["descrip"] = b"vm-unet labels"
    cls = nib.Nifti2Image if isinstance(ref_img, nib.Nifti2Image) else nib.Nifti1Image
    return cls(labels.astype(dtype, copy=False), None, header=hdr)


def prob_volume_like(probs: np.ndarray, ref_img):
    """Float32 probability image (X, Y, Z) or (X, Y, Z, C) on the input's grid."""
    import nibabel as nib

    hdr = _derived_header(ref_img, np.float32)
    hdr["cal_min"], hdr["cal_max"] = 0.0, 1.0
    hdr.set_intent("estimate")
    hdr["descrip"] = b"vm-unet probabilities"
    cls = nib.Nifti2Image if isinstance(ref_img, nib.Nifti2Image) else nib.Nifti1Image
    return cls(probs.astype(np.float32, copy=False), None, header=hdr)


def save_nifti(img, dest: Path) -> None:
    import nibabel as nib

    with atomic_output(dest) as tmp:
        nib.save(img, str(tmp))


# ------------------------------------------------------------------------------------------------- 2D images

@contextlib.contextmanager
def _no_pixel_limit():
    """Pillow refuses images above ~179 Mpx as 'decompression bombs'; 16384² (268 Mpx) slides and maps are the
    point of this module and come from the user's own disk, so lift the limit while we read."""
    from PIL import Image

    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


def load_image2d(path: Path, in_chans: int) -> tuple[np.ndarray, float]:
    """Read a picture -> ``(array (H, W, in_chans) uint8 or uint16, full_scale)``.

    ``full_scale`` is the value of a white pixel for the file's bit depth (255 or 65535). Alpha channels are
    dropped; grey vs colour must match the checkpoint (we do not guess a conversion that training never saw)."""
    from PIL import Image, UnidentifiedImageError

    path = _existing_file(path)
    try:
        with _no_pixel_limit(), Image.open(path) as im:
            im.load()  # decode now: truncated files fail here, not later
            mode = im.mode
            if mode in ("1", "P", "CMYK", "YCbCr", "LAB", "HSV", "PA"):
                has_colour = mode not in ("1",) and not (mode in ("P", "PA") and _palette_is_grey(im))
                im = im.convert("RGB" if has_colour else "L")
                mode = im.mode
            arr = np.asarray(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise InputError(f"{path}: not a readable image, file is corrupt or truncated "
                         f"({_first_line(e).replace(str(path), 'file')})") from None
    if arr.size == 0:
        raise InputError(f"{path}: empty image")
    if arr.ndim == 2:
        arr = arr[..., None]
    if mode in ("LA", "RGBA"):
        arr = arr[..., :-1]  # alpha is transparency, not signal
    if arr.dtype == np.uint8 or arr.dtype == bool:
        arr, full = arr.astype(np.uint8, copy=False), 255.0
    elif arr.dtype.kind in "iu" and arr.min() >= 0 and arr.max() <= 65535:  # 16-bit PNG/TIFF ('I;16', 'I')
        arr, full = arr.astype(np.uint16, copy=False), 65535.0
    else:
        raise InputError(f"{path}: unsupported pixel format {mode} ({arr.dtype}); expected 8- or 16-bit")
    c = arr.shape[-1]
    if c != in_chans:
        kind = {1: "greyscale", 3: "RGB"}.get(c, f"{c}-channel")
        raise InputError(f"{path}: is a {kind} image ({c} channel(s)) but the checkpoint expects {in_chans} "
                         f"channel(s); convert the image first")
    return arr, full


def _palette_is_grey(im) -> bool:
    pal = im.getpalette() or []
    rgb = np.asarray(pal[: len(pal) // 3 * 3]).reshape(-1, 3)
    return bool(len(rgb)) and bool((rgb == rgb[:, :1]).all())


def save_png(array: np.ndarray, dest: Path, compress_level: int = 1) -> None:
    """Write a uint8 (H, W) or (H, W, 3) array as PNG. Level 1: masks compress well anyway and 16384² images
    take minutes at the default level."""
    from PIL import Image

    with _no_pixel_limit(), atomic_output(dest) as tmp:
        Image.fromarray(array).save(tmp, format="PNG", compress_level=compress_level)
