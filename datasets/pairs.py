"""Pair image files with their label files by key, with one clear error for the first mismatch."""
from __future__ import annotations

from pathlib import Path

from vm_unet.errors import DataError


def pair_by_key(images: dict[str, Path], labels: dict[str, Path], label_dir: Path, image_dir: Path,
                label_word: str) -> list[tuple[Path, Path]]:
    """[(image, label)] sorted by key; every image needs a label and every label an image."""
    missing = [p for k, p in images.items() if k not in labels]
    if missing:
        raise DataError(f"{missing[0]}: no matching {label_word} in {label_dir}"
                        + (f" (and {len(missing) - 1} more images without {label_word}s)" if len(missing) > 1 else ""))
    orphans = [p for k, p in labels.items() if k not in images]
    if orphans:
        raise DataError(f"{orphans[0]}: {label_word} has no matching image in {image_dir}"
                        + (f" (and {len(orphans) - 1} more)" if len(orphans) > 1 else ""))
    return [(images[k], labels[k]) for k in sorted(images)]
