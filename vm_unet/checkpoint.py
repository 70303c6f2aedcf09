"""Self-describing, atomically written VM-UNet checkpoints.

A checkpoint is a plain dict saved with ``torch.save`` that holds only tensors and primitive containers, so it
loads with ``torch.load(weights_only=True)`` (no pickled code runs on load):

``format``            ``"vm_unet.checkpoint"`` (tells our files apart from arbitrary ``.pth`` files)
``format_version``    int, bumped on incompatible layout changes
``package_version``   version of vm-unet that wrote the file
``model_name``        name for ``vm_unet.create_model``
``model_kwargs``      kwargs for ``create_model`` (always includes ``in_chans`` and ``num_classes``)
``task``              ``"binary"`` (1 output channel, sigmoid) or ``"multiclass"`` (softmax over ``num_classes``)
``class_names``       list of str; for binary ``["background", "lesion"]``-style (2 names), else ``num_classes`` names
``preprocessing``     dict describing how inputs must be prepared, see below
``state_dict``        model weights (the weights to use for inference; the EMA weights when EMA was on)
``extra``             free dict of primitives (metrics, epoch, config...)
``training_state``    optional dict (optimiser, scheduler, scaler, RNG states...) used only by ``--resume``

``preprocessing`` keys written by the trainer (readers should use ``.get`` with these defaults):

``input``             ``"image2d"`` (RGB/grey picture files) or ``"volume_slices"`` (3-D volume served as 2-D slices)
``image_size``        [H, W] the network was trained at; inputs are resized to it and logits resized back
``in_chans``          number of input channels
``normalize``         for ``image2d``: ``{"mean": [...], "std": [...], "max_pixel_value": 255.0}`` applied as
                      ``(img / max_pixel_value - mean) / std`` per channel (albumentations ``Normalize``)
``axis``              for ``volume_slices``: the slicing axis of the (X, Y, Z) volume array
``intensity``         for ``volume_slices``: ``{"mode": "zscore"|"percentile"|"window"|"none", ...}`` see
                      ``vm_unet.datasets.intensity.normalize_intensity``
``threshold``         binary decision threshold on the sigmoid probability (default 0.5)
"""

from __future__ import annotations

import os
import tempfile
import zipfile
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vm_unet.errors import UserError

__all__ = [
    "CheckpointError",
    "save_checkpoint",
    "checkpoint_payload",
    "write_checkpoint",
    "load_checkpoint",
    "read_checkpoint",
    "build_model_from_meta",
    "package_version",
    "FORMAT",
    "FORMAT_VERSION",
]

FORMAT = "vm_unet.checkpoint"
FORMAT_VERSION = 1
_REQUIRED = ("format", "format_version", "model_name", "model_kwargs", "state_dict", "preprocessing",
             "class_names", "task")


class CheckpointError(UserError, ValueError):
    """Missing, corrupt, or foreign checkpoint file. The message is one line naming the file."""


def package_version() -> str:
    try:
        from importlib.metadata import version

        return version("vm-unet")
    except Exception:  # not installed (running from a source tree)
        import vm_unet

        return str(getattr(vm_unet, "__version__", "unknown"))


def _primitive(obj: Any, where: str) -> Any:
    """Convert to types ``torch.load(weights_only=True)`` accepts; fail loudly on anything else.

    numpy scalars/arrays and Paths are converted because configs and metrics often contain them."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, dict):
        return {(k if isinstance(k, (str, int)) else str(k)): _primitive(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        out = [_primitive(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return tuple(out) if isinstance(obj, tuple) else out
    try:
        import numpy as np

        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return torch.from_numpy(obj.copy())
    except ImportError:  # pragma: no cover
        pass
    raise TypeError(f"checkpoint field {where} has unsupported type {type(obj).__name__}; use primitives/tensors")


def _clean_state_dict(model_or_sd) -> dict[str, torch.Tensor]:
    """CPU copy of a state dict with DDP (``module.``) and torch.compile (``_orig_mod.``) prefixes removed, so a
    checkpoint from any training setup loads into a plain model."""
    sd = model_or_sd.state_dict() if isinstance(model_or_sd, nn.Module) else model_or_sd
    out = {}
    for k, v in sd.items():
        for prefix in ("module.", "_orig_mod."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v.detach().cpu().clone()
    return out


def checkpoint_payload(
    model: nn.Module | dict,
    *,
    model_name: str,
    model_kwargs: dict,
    preprocessing: dict,
    class_names: list[str],
    extra: dict | None = None,
    training_state: dict | None = None,
) -> dict:
    """The checkpoint dict, every tensor a CPU copy: a snapshot that training may go on changing the model after,
    e.g. while ``write_checkpoint`` runs on another thread.

    ``model`` may be a module (DDP/compiled wrappers are fine) or a state dict. ``model_kwargs`` must include
    ``in_chans`` and ``num_classes``."""
    model_kwargs = dict(model_kwargs)
    if "in_chans" not in model_kwargs or "num_classes" not in model_kwargs:
        raise ValueError("model_kwargs must include in_chans and num_classes")
    num_classes = int(model_kwargs["num_classes"])
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "package_version": package_version(),
        "model_name": str(model_name),
        "model_kwargs": _primitive(model_kwargs, "model_kwargs"),
        "task": "binary" if num_classes == 1 else "multiclass",
        "class_names": [str(c) for c in class_names],
        "preprocessing": _primitive(dict(preprocessing), "preprocessing"),
        "state_dict": _clean_state_dict(model),
        "extra": _primitive(dict(extra or {}), "extra"),
        "training_state": _primitive(training_state, "training_state") if training_state is not None else None,
    }


def write_checkpoint(path, payload: dict) -> Path:
    """Write a ``checkpoint_payload`` atomically (temp file in the same directory, flushed to disk, then
    ``os.replace``): a crash mid-write never leaves a truncated file at ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def save_checkpoint(path, model: nn.Module | dict, **fields) -> Path:
    """Snapshot and write a checkpoint atomically: ``write_checkpoint(path, checkpoint_payload(model, **fields))``,
    ``fields`` being ``checkpoint_payload``'s keywords (model_name, model_kwargs, preprocessing, class_names, extra,
    training_state)."""
    return write_checkpoint(path, checkpoint_payload(model, **fields))


def read_checkpoint(path) -> dict:
    """Load and validate the raw checkpoint dict (weights_only). Raises :class:`CheckpointError`."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint file not found")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a file")
    if not zipfile.is_zipfile(path):
        # torch.save has written zip archives since PyTorch 1.6; anything else (a text file, an image, a truncated
        # download) would otherwise surface as torch's confusing "weights only load failed" message
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (corrupt or truncated, or another kind of file; "
                              "expected a complete file written by torch.save, e.g. best.pt of a training run)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, pickle.UnpicklingError, ValueError,
            AttributeError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (corrupt or truncated?): {first[:200]}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a VM-UNet checkpoint (no '{FORMAT}' header); "
                              "raw state dicts must be loaded with model.load_state_dict")
    missing = [k for k in _REQUIRED if k not in payload]
    if missing:
        raise CheckpointError(f"{path}: VM-UNet checkpoint is missing fields {missing}")
    if int(payload["format_version"]) > FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {payload['format_version']} is newer than this vm-unet "
                              f"supports ({FORMAT_VERSION}); upgrade vm-unet")
    return payload


def build_model_from_meta(meta: dict) -> nn.Module:
    import vm_unet

    try:
        return vm_unet.create_model(meta["model_name"], **dict(meta["model_kwargs"]))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"cannot build model {meta.get('model_name')!r} from checkpoint: {e}") from None


def load_checkpoint(path, device="cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model described by a checkpoint and load its weights.

    Returns ``(model.eval() on device, meta)``; ``meta`` is the checkpoint dict without ``state_dict`` and
    ``training_state``. Raises :class:`CheckpointError` (a ``ValueError`` and ``UserError``) with a one-line
    message for missing, corrupt or foreign files and for weights that do not match the described model."""
    payload = read_checkpoint(path)
    model = build_model_from_meta(payload)
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        msg = " ".join(s.strip() for s in first[:2])[:300]
        raise CheckpointError(f"{path}: weights do not match model {payload['model_name']!r}: {msg}") from None
    model.to(device).eval()
    meta = {k: v for k, v in payload.items() if k not in ("state_dict", "training_state")}
    return model, meta
