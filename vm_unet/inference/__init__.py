"""Inference on NIfTI volumes (slice-wise) and 2D pictures of any size; CLI in ``scripts/infer.py``.

    from vm_unet.checkpoint import load_checkpoint
    from vm_unet.inference import Predictor, segment_volume, segment_image
    model, meta = load_checkpoint("best.pth")
    pred = Predictor(model, meta, torch.device("cuda"), tta=True)
    res = segment_volume("case.nii.gz", pred)      # res.labels (X, Y, Z) on the input grid, res.summary (ml)
"""
from .image2d import segment_image
from .io import InputError
from .predictor import Predictor, resolve_device
from .volume import segment_volume

__all__ = ["InputError", "Predictor", "resolve_device", "segment_image", "segment_volume"]
