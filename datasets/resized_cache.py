"""Training-size copies of picture folders, kept on disk so that only the first epoch decodes the originals.

Dermoscopy photographs come at full camera resolution (ISIC 2018: up to 6688x4439 JPEGs). Decoding one, checking
its mask and resizing both takes a core 0.1-0.4 s, so four loader workers feed a few dozen images a second,
whatever the GPU. Training only ever sees them resized to ``data.image_size`` (the first op of
``PictureTransform``), so the resized pair is stored once, as two ``.npy`` files read back in well under a
millisecond. What training sees does not change: the transform's resize leaves a pair of its own size untouched
(the tests compare the tensors).

An entry is keyed by the files' absolute paths, sizes and modification times and by everything that shapes the pair
(size, channels, label handling, the library versions of the resize), so an edited or replaced file misses. Files
are written to a temporary name and renamed, so loader workers and DDP ranks can fill one folder at once, and a
killed run leaves no torn entry. Evaluation at native resolution reads the originals.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
import warnings
from pathlib import Path

import numpy as np

from .folder import FolderPairs
from .transforms import albumentations_mask, resize_op

CACHE_FORMAT = 1


def default_cache_dir() -> Path:
    """``$VM_UNET_CACHE_DIR``, else ``$XDG_CACHE_HOME/vm_unet/resized`` (``~/.cache`` without it)."""
    if os.environ.get("VM_UNET_CACHE_DIR"):
        return Path(os.environ["VM_UNET_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vm_unet" / "resized"


class ResizedPairs:
    """A :class:`FolderPairs` source whose ``load`` returns the pair resized to ``image_size`` (labels as
    albumentations takes them), from ``cache_dir`` when an entry exists and stored there when not."""

    def __init__(self, source: FolderPairs, image_size, cache_dir: str | os.PathLike | None = None):
        self.source, self.size = source, tuple(int(v) for v in image_size)
        self.dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        # first: resize_op imports albumentations with its PyPI version check turned off
        self._resize = resize_op(self.size)
        import albumentations
        import cv2

        self._params = [CACHE_FORMAT, self.size, source.in_chans, source.num_classes, source.mask_threshold,
                        source.label_map, albumentations.__version__, cv2.__version__]
        self._store_failed = False

    def __len__(self) -> int:
        return len(self.source)

    def name(self, i: int) -> str:
        return self.source.name(i)

    def _entry(self, i: int) -> Path | None:
        """The entry's path stem, or None when a file cannot be stat'ed (the source's load then says why)."""
        try:
            files = []
            for p in self.source.pairs[i]:
                st = p.stat()
                files += [str(p.absolute()), st.st_size, st.st_mtime_ns]
        except OSError:
            return None
        key = hashlib.sha1(json.dumps([self._params, files], default=str).encode()).hexdigest()
        return self.dir / key[:2] / key

    def _read(self, entry: Path | None):
        if entry is None:
            return None
        try:
            return np.load(f"{entry}.image.npy"), np.load(f"{entry}.labels.npy")
        except (OSError, ValueError, EOFError):   # not stored yet (or unreadable: made again)
            return None

    def cached(self, i: int) -> bool:
        entry = self._entry(i)
        return entry is not None and os.path.exists(f"{entry}.labels.npy")

    def verify(self, full: bool) -> None:
        """The source's check for the pairs without an entry; stored pairs passed the full check when stored."""
        self.source.verify(full, [i for i in range(len(self)) if not self.cached(i)])

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        entry = self._entry(i)
        pair = self._read(entry)
        if pair is not None:
            return pair
        image, labels = self.source.load(i)
        out = self._resize(image=image, mask=albumentations_mask(labels))
        image, labels = np.ascontiguousarray(out["image"]), np.ascontiguousarray(out["mask"])
        if entry is not None and not self._store_failed:
            self._store(entry, image, labels)
        return image, labels

    def _store(self, entry: Path, image: np.ndarray, labels: np.ndarray) -> None:
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            # labels last: an entry counts only once both files are in place
            for suffix, a in ((".image.npy", image), (".labels.npy", labels)):
                tmp = entry.parent / f".{entry.name}{suffix}.{uuid.uuid4().hex}.tmp"
                try:
                    with open(tmp, "wb") as f:
                        np.save(f, a)
                    os.replace(tmp, f"{entry}{suffix}")
                finally:
                    tmp.unlink(missing_ok=True)
        except OSError as e:
            # a full or read-only disk slows training down to decoding every epoch; it must not stop it
            self._store_failed = True
            warnings.warn(f"data cache {self.dir}: cannot store resized images ({e.__class__.__name__}: {e}); "
                          "decoding the originals every epoch (set data.cache_dir, or data.cache: false)",
                          stacklevel=2)
