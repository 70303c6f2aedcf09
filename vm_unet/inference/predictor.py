"""Model + checkpoint metadata -> class probabilities for batches of 2D inputs, by sliding window or resize.

Two ways to fit an input to the network's training size (``preprocessing["image_size"]``):

``window``  native resolution; inputs larger than the training size go through MONAI ``sliding_window_inference``
            with gaussian blending, windows run on the model's device and are stitched on ``stitch_device``
            (the CPU by default), so accelerator memory depends on the window size, not the image size. Inputs
            smaller than the training size run whole (the network accepts any size), never padded with a
            value that would look like signal after normalisation.
``resize``  the whole input resized to the training size and the probabilities resized back, which is what
            the trainer does with whole images/slices (``A.Resize`` / ``Resized``).

Probabilities, not logits, are blended and averaged under TTA, so both average quantities on the same scale.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vm_unet.errors import UserError

__all__ = ["Predictor", "resolve_device", "MODES"]

MODES = ("window", "resize")


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise UserError(f"--device {device!r}: {e}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) present")
    return dev


@dataclass
class Predictor:
    """Callable on ``(B, C, H, W)`` float32 CPU tensors (already normalised) -> ``(B, n_out, H, W)`` probabilities
    on the stitch device. ``n_out`` is 1 (foreground probability) for binary checkpoints, else num_classes."""

    model: torch.nn.Module
    meta: dict
    device: torch.device
    mode: str = "window"
    tta: bool = False
    overlap: float = 0.25
    sw_batch_size: int = 4
    amp: bool | None = None  # None: bf16 autocast on CUDA when supported, fp32 elsewhere
    stitch_device: torch.device | str = "cpu"
    compile: bool = False   # torch.compile the network: faster after a warm-up compile per input shape
    cuda_graphs: bool = False  # compile and replay as CUDA graphs (CUDA only): for small window batches

    def __post_init__(self):
        if self.mode not in MODES:
            raise UserError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not 0.0 <= self.overlap < 1.0:
            raise UserError(f"--overlap must be in [0, 1), got {self.overlap}")
        if self.sw_batch_size < 1:
            raise UserError(f"--sw-batch-size must be >= 1, got {self.sw_batch_size}")
        if self.cuda_graphs and self.device.type != "cuda":
            raise UserError(f"--cuda-graphs needs a CUDA device, got {self.device}")
        pre = self.meta.get("preprocessing", {}) or {}
        size = pre.get("image_size", [256, 256])
        size = [int(size)] * 2 if isinstance(size, (int, float)) else [int(s) for s in size]
        if len(size) != 2 or min(size) < 1:
            raise UserError(f"checkpoint preprocessing.image_size must be [H, W], got {size}")
        self.image_size = tuple(size)
        kw = self.meta.get("model_kwargs", {})
        self.in_chans = int(kw.get("in_chans", pre.get("in_chans", 3)))
        self.num_classes = int(kw.get("num_classes", 1))
        self.binary = self.meta.get("task", "binary" if self.num_classes == 1 else "multiclass") == "binary"
        self.n_out = 1 if self.binary else self.num_classes
        self.n_labels = 2 if self.binary else self.num_classes
        self.threshold = float(pre.get("threshold", 0.5))
        names = [str(c) for c in (self.meta.get("class_names") or [])]
        self.class_names = names if len(names) == self.n_labels else [f"class{i}" for i in range(self.n_labels)]
        if self.amp is None:
            self.amp = self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        self.model.to(self.device).eval()
        self._compiled = None

    @property
    def compiled(self) -> bool:
        return self.compile or self.cuda_graphs

    def _network(self) -> torch.nn.Module:
        if not self.compiled:
            return self.model
        # compiled lazily and again if ``model`` is replaced; the wrapper shares the module's weights and compiles
        # once per window shape (``_probs`` pads short batches to ``sw_batch_size``)
        if self._compiled is None or self._compiled._orig_mod is not self.model:
            from vm_unet.models import compile_model  # noqa: PLC0415

            self._compiled = compile_model(self.model, cuda_graphs=self.cuda_graphs)
        return self._compiled

    # ---------------------------------------------------------------------------------------------- forward
    def _probs(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if self.compiled and n < self.sw_batch_size:
            # a compiled network sees one batch size: padding the last short batch costs less than compiling (and
            # capturing) a second graph for it
            x = torch.cat([x, x.new_zeros((self.sw_batch_size - n, *x.shape[1:]))])
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bool(self.amp)):
            logits = self._network()(x)[:n]
        # sigmoid / softmax write new tensors: a CUDA-graph output is consumed before the next replay overwrites it
        logits = logits.float()
        return torch.sigmoid(logits) if self.binary else torch.softmax(logits, dim=1)

    def window_fn(self, x: torch.Tensor) -> torch.Tensor:
        """Probabilities of one batch of windows already on ``device``; with TTA the mean over the 4 flips."""
        if not self.tta:
            return self._probs(x)
        out = self._probs(x)
        for dims in ((-1,), (-2,), (-2, -1)):
            out += torch.flip(self._probs(torch.flip(x, dims)), dims)
        return out / 4

    def _direct(self, x: torch.Tensor) -> torch.Tensor:
        """Whole inputs through the network in chunks of ``sw_batch_size``."""
        outs = []
        for i in range(0, x.shape[0], self.sw_batch_size):
            outs.append(self.window_fn(x[i:i + self.sw_batch_size].to(self.device)).to(self.stitch_device))
        return torch.cat(outs)

    # no_grad, not inference_mode: inference tensors cached inside the model (route index maps) would later break
    # training in the same process ("Inference tensors cannot be saved for backward").
    @torch.no_grad()
    def __call__(self, x: torch.Tensor, progress: bool = False) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected (B, {self.in_chans}, H, W), got {tuple(x.shape)}")
        h, w = x.shape[-2:]
        if self.mode == "resize":
            if (h, w) == self.image_size:
                return self._direct(x)
            small = F.interpolate(x, size=self.image_size, mode="bilinear", align_corners=False)
            probs = self._direct(small)
            out = torch.cat([F.interpolate(probs[i:i + 1].to(self.device), size=(h, w), mode="bilinear",
                                           align_corners=False).to(self.stitch_device)
                             for i in range(probs.shape[0])])  # per sample: the full-size copy stays small
            return out
        roi = (min(self.image_size[0], h), min(self.image_size[1], w))
        if roi == (h, w):
            return self._direct(x)
        from monai.inferers import sliding_window_inference

        out = sliding_window_inference(
            x, roi_size=roi, sw_batch_size=self.sw_batch_size, predictor=self.window_fn, overlap=self.overlap,
            mode="gaussian", sw_device=self.device, device=self.stitch_device, progress=progress)
        return out.as_tensor() if hasattr(out, "as_tensor") else out

    def labels(self, probs: torch.Tensor) -> torch.Tensor:
        """``(B, n_out, H, W)`` probabilities -> ``(B, H, W)`` uint8 class indices."""
        if self.binary:
            return (probs[:, 0] > self.threshold).to(torch.uint8)
        return probs.argmax(1).to(torch.uint8 if self.n_labels <= 256 else torch.int32)
