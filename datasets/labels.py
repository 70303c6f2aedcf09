"""Label remapping shared by every reader (2D masks, label volumes)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from vm_unet.errors import DataError


def apply_label_map(values: np.ndarray, label_map: dict, path: Path | str, what: str = "label") -> np.ndarray:
    """Stored values -> class indices through ``label_map`` (YAML keys may be ints or strings).

    Raises ``DataError`` naming the file when a stored value has no entry."""
    out = np.zeros_like(values, dtype=np.int64)
    vals = np.unique(values)
    unknown = [int(v) for v in vals if int(v) not in label_map and str(int(v)) not in label_map]
    if unknown:
        raise DataError(f"{path}: {what} values {unknown[:8]} are not in label_map {dict(label_map)}")
    for v in vals:
        out[values == v] = int(label_map.get(int(v), label_map.get(str(int(v)))))
    return out
