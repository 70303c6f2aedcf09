"""Datasets (installed as ``vm_unet.datasets``): synthetic lesions, ISIC-style folders, NIfTI/Synapse slices."""
from .build import DataBundle, SegDataset, build_datasets, collate, seeded_split
from .folder import find_pairs
from .intensity import normalize_intensity
from .synthetic import SyntheticLesions, make_lesion
from .transforms import DeviceNormalize

__all__ = ["DataBundle", "DeviceNormalize", "SegDataset", "SyntheticLesions", "build_datasets", "collate",
           "find_pairs", "make_lesion", "normalize_intensity", "seeded_split"]
