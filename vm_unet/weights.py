"""Import published weights: VMamba v0 ImageNet checkpoints and trained VM-UNet checkpoints of the published code.

``load_pretrained(model, path)`` fills a ``VMUNet``, a bare ``VSSEncoder``, or any module holding one VMamba
encoder (smp ``model.encoder``, MONAI ``FlexibleUNet``, ...), and returns a :class:`LoadReport` listing the loaded,
missing and unexpected keys. Any shape mismatch is an error naming the key and both shapes.

Recognised sources (keys under ``model``/``state_dict``/``model_state_dict`` or at the top level; DDP ``module.``
prefixes are stripped):

- ``vmamba_v0``: VMamba v0 classifier (``vmamba_tiny_e292.pth``, ``vmamba_small_e238_ema.pth``): ``patch_embed.*``,
  ``layers.i.blocks.j.{ln_1, self_attention}.*``, ``layers.i.downsample.*``; ``norm.*``/``head.*`` are ignored.
  Into a VMUNet it also initialises the decoder as the published code does: ``layers.{0,1,2,3}`` ->
  ``layers_up.{3,2,1,0}``, blocks only (our ``decoder.{3,2,1,0}.blocks``).
- ``vmunet_published``: a model trained with the published VM-UNet code (``vmunet.`` prefix, ``layers_up``,
  ``final_up``, ``final_conv``), from ``best.pth`` (raw state dict) or ``latest.pth`` (``model_state_dict``).
- ``vm_unet``: our own names (a ``vm_unet.checkpoint`` file or a plain ``state_dict()`` of our models).

As in the published loader, blocks that the model does not have (e.g. a VMamba-S checkpoint, 27 blocks in stage 3,
into the ISIC config with 2) are skipped and reported as unexpected, not an error.
"""
from __future__ import annotations

import collections
import logging
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn

from vm_unet.errors import UserError
from vm_unet.models.vmamba import VSSEncoder
from vm_unet.models.vmamba_fast import VSSEncoderFast
from vm_unet.models.vmunet import VMUNet

__all__ = ["LoadReport", "WeightsError", "adapt_input_conv", "convert_state_dict", "detect_format",
           "load_pretrained", "read_state_dict"]

log = logging.getLogger(__name__)

_CONTAINERS = ("model", "state_dict", "model_state_dict", "module", "net")
# First convolution of each family: the only weight whose input-channel count may legitimately differ.
_STEM_KEYS = ("patch_embed.proj.weight", "patch_embed.conv1.weight")


class WeightsError(UserError, ValueError):
    """The checkpoint cannot be loaded into the model (unknown format, shape mismatch, nothing matched)."""


@dataclass
class LoadReport:
    """What ``load_pretrained`` did. Keys: ``loaded``/``missing`` are model keys, ``unexpected`` checkpoint keys."""

    source: str
    source_format: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)

    def summary(self, max_groups: int = 12) -> str:
        lines = [f"{self.source} ({self.source_format}): loaded {len(self.loaded)}, missing {len(self.missing)}, "
                 f"unexpected {len(self.unexpected)}"]
        for title, keys in (("missing", self.missing), ("unexpected", self.unexpected)):
            if keys:
                lines.append(f"  {title}:")
                lines += [f"    {g}" for g in _group_keys(keys, max_groups)]
        lines += [f"  adapted: {a}" for a in self.adapted]
        return "\n".join(lines)

    __str__ = summary


def _group_keys(keys: list[str], max_groups: int) -> list[str]:
    """Collapse block indices so 300 keys of skipped blocks read as a few lines."""
    groups: dict[str, list[str]] = defaultdict(list)
    for k in keys:
        groups[re.sub(r"blocks\.\d+\.", "blocks.*.", k)].append(k)
    out = [f"{g}" + (f"  (x{len(v)})" if len(v) > 1 else "") for g, v in groups.items()]
    return out[:max_groups] + ([f"... and {len(out) - max_groups} more"] if len(out) > max_groups else [])


# ---------------------------------------------------------------------------------------------------------- reading

def _stub_class(qualified: str) -> type:
    """Inert stand-in for a non-tensor object in a checkpoint (e.g. the yacs config VMamba's trainer saves).

    Instantiating it gives an empty OrderedDict, which ``weights_only`` loading can fill (SETITEMS) and update
    (BUILD); so the tensors load and no code from the file runs."""

    def __new__(cls, *args, **kwargs):  # noqa: N807
        return collections.OrderedDict()

    module, _, name = qualified.rpartition(".")
    return type(name, (), {"__new__": __new__, "__module__": module})


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as first:  # noqa: BLE001 (re-raised below unless unknown globals explain it)
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # noqa: BLE001 (not a zip checkpoint: report the original error)
            unsafe = []
        if not unsafe:
            raise WeightsError(f"{path}: not a readable PyTorch checkpoint: {str(first).strip().splitlines()[0][:200]}"
                               ) from None
        with torch.serialization.safe_globals([(_stub_class(q), q) for q in unsafe]):
            return torch.load(path, map_location="cpu", weights_only=True)


def read_state_dict(source: str | Path | Mapping[str, Any], key: str | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """Flat ``{name: tensor}`` from a file or dict (container keys unwrapped, ``module.`` stripped) and its label."""
    label = "<state dict>"
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise WeightsError(f"{path}: checkpoint file not found")
        label = str(path)
        obj = _torch_load(path)
    else:
        obj = source
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{label}: expected a dict of tensors, got {type(obj).__name__}")
    if key is not None:
        if key not in obj:
            raise WeightsError(f"{label}: no entry {key!r}; top-level keys: {sorted(map(str, obj))[:20]}")
        obj = obj[key]
    elif obj.get("format") == "vm_unet.checkpoint":
        obj = obj["state_dict"]
    else:
        for name in _CONTAINERS:
            if isinstance(obj.get(name), Mapping) and any(isinstance(v, torch.Tensor) for v in obj[name].values()):
                obj = obj[name]
                break
    out = {}
    for k, v in obj.items():
        if isinstance(v, torch.Tensor):
            for prefix in ("module.", "_orig_mod."):
                while k.startswith(prefix):
                    k = k[len(prefix):]
            out[k] = v
    if not out:
        raise WeightsError(f"{label}: contains no tensors")
    return out, label


def detect_format(sd: Mapping[str, torch.Tensor]) -> str:
    keys = list(sd)
    if any(k.startswith(("vmunet.", "layers_up.", "final_up.")) for k in keys):
        return "vmunet_published"
    if any(".ln_1." in k or ".self_attention." in k for k in keys):
        return "vmamba_v0"
    if any(k.startswith(("encoder.", "patch_embed.", "layers.")) for k in keys):
        return "vm_unet"
    raise WeightsError("unrecognised checkpoint: expected VMamba v0 (patch_embed/layers...ln_1/self_attention), "
                       f"published VM-UNet (vmunet.*) or vm_unet keys; first keys: {keys[:5]}")


# ------------------------------------------------------------------------------------------------------ converting

_BLOCK_RENAMES = ((re.compile(r"(blocks\.\d+)\.ln_1\."), r"\1.norm."),
                  (re.compile(r"(blocks\.\d+)\.self_attention\."), r"\1.ss2d."))


def _rename_block(k: str) -> str:
    for pat, rep in _BLOCK_RENAMES:
        k = pat.sub(rep, k)
    return k


def convert_state_dict(sd: Mapping[str, torch.Tensor], num_decoder_stages: int = 4, init_decoder: bool = True
                       ) -> tuple[dict[str, tuple[str, torch.Tensor]], dict[str, tuple[str, torch.Tensor]], list[str], str]:
    """Split a checkpoint into our names.

    Returns ``(encoder, rest, ignored, format)``: ``encoder`` maps encoder-relative names (``patch_embed.*``,
    ``layers.*``) and ``rest`` VMUNet names outside the encoder (``decoder.*``, ``final_expand.*``, ``head.*``) to
    ``(checkpoint key, tensor)``; ``ignored`` are checkpoint keys with no counterpart (classifier ``norm``/``head``).
    """
    fmt = detect_format(sd)
    enc: dict[str, tuple[str, torch.Tensor]] = {}
    rest: dict[str, tuple[str, torch.Tensor]] = {}
    ignored: list[str] = []
    for src, t in sd.items():
        k = src
        if fmt == "vm_unet":
            if k.startswith("encoder."):
                enc[k[len("encoder."):]] = (src, t)
            elif k.startswith(("patch_embed.", "layers.")):
                enc[k] = (src, t)
            else:
                rest[k] = (src, t)
            continue
        if fmt == "vmunet_published" and k.startswith("vmunet."):
            k = k[len("vmunet."):]
        k = _rename_block(k)
        if k.startswith(("patch_embed.", "layers.")):
            enc[k] = (src, t)
        elif fmt == "vmunet_published" and k.startswith("layers_up."):
            rest["decoder." + k[len("layers_up."):]] = (src, t)
        elif fmt == "vmunet_published" and k.startswith("final_up."):
            rest["final_expand." + k[len("final_up."):]] = (src, t)
        elif fmt == "vmunet_published" and k.startswith("final_conv."):
            rest["head." + k[len("final_conv."):]] = (src, t)
        else:
            ignored.append(src)
    if fmt == "vmamba_v0" and init_decoder:
        # Published decoder init: encoder stage i's blocks -> decoder stage (n-1-i) (same width).
        for k, v in enc.items():
            m = re.match(r"layers\.(\d+)\.(blocks\..*)", k)
            if m and int(m.group(1)) < num_decoder_stages:
                rest[f"decoder.{num_decoder_stages - 1 - int(m.group(1))}.{m.group(2)}"] = v
    return enc, rest, ignored, fmt


def adapt_input_conv(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """3-channel stem weights for ``in_chans`` inputs, as timm does: sum for 1 channel (a grey image replicated to
    RGB gives the same output), else repeat the RGB filters and rescale by 3/in_chans."""
    src = weight.shape[1]
    if in_chans == src:
        return weight
    if in_chans == 1:
        return weight.sum(dim=1, keepdim=True)
    reps = math.ceil(in_chans / src)
    return weight.repeat(1, reps, 1, 1)[:, :in_chans] * (src / in_chans)


def _locate(model: nn.Module) -> tuple[str, str]:
    """(mode, prefix): ``("vmunet", prefix)`` for a VMUNet, ``("encoder", prefix)`` for a VMamba encoder."""
    if isinstance(model, VMUNet):
        return "vmunet", ""
    if isinstance(model, (VSSEncoder, VSSEncoderFast)):
        return "encoder", ""
    for kind, cls in (("vmunet", VMUNet), ("encoder", (VSSEncoder, VSSEncoderFast))):
        found = [n for n, m in model.named_modules() if isinstance(m, cls)]
        outer = [n for n in found if not any(n.startswith(o + ".") for o in found if o != n)]
        if len(outer) == 1:
            return kind, outer[0] + "."
        if len(outer) > 1:
            raise WeightsError(f"{type(model).__name__} holds several VMamba models ({outer}); pass the one to load")
    raise WeightsError(f"{type(model).__name__} contains no VM-UNet or VMamba encoder to load weights into")


def load_pretrained(model: nn.Module, source: str | Path | Mapping[str, Any], *, init_decoder: bool = True,
                    key: str | None = None, verbose: bool = False) -> LoadReport:
    """Load published or own weights into ``model`` (in place) and return what was loaded.

    Args:
        model: a ``VMUNet``, a ``VSSEncoder``/``VSSEncoderFast``, or a module holding one (smp/MONAI models).
        source: checkpoint path or an already loaded dict.
        init_decoder: for VMamba (encoder-only) checkpoints into a VMUNet, also initialise the decoder blocks from
            the mirrored encoder stages, as the published VM-UNet does.
        key: top-level entry holding the weights (default: ``model``, ``state_dict``, ``model_state_dict``, ...;
            e.g. ``key="model_ema"`` for the EMA weights of a checkpoint that stores both).
        verbose: also log the report at INFO level.

    Raises:
        WeightsError: unreadable/unknown checkpoint, a shape mismatch (naming the key and both shapes), or a
        checkpoint of which nothing fits the model.
    """
    sd, label = read_state_dict(source, key)
    mode, prefix = _locate(model)
    target = model.get_submodule(prefix[:-1]) if prefix else model
    num_dec = len(target.decoder) if mode == "vmunet" else 4
    enc, rest, _, fmt = convert_state_dict(sd, num_dec, init_decoder)
    if mode == "vmunet":
        mapping = {f"{prefix}encoder.{k}": v for k, v in enc.items()} | {prefix + k: v for k, v in rest.items()}
    else:
        mapping = {prefix + k: v for k, v in enc.items()}

    own = model.state_dict()
    report = LoadReport(label, fmt)
    used: set[str] = set()
    errors = []
    updates: dict[str, torch.Tensor] = {}
    for tk, (src, t) in mapping.items():
        if tk not in own:
            continue
        want = own[tk].shape
        if t.shape != want and tk.endswith(_STEM_KEYS) and t.dim() == 4 and t.shape[0] == want[0] \
                and t.shape[2:] == want[2:]:
            report.adapted.append(f"{tk}: {t.shape[1]}-channel stem -> {want[1]} input channel(s) "
                                  f"({'summed' if want[1] == 1 else 'repeated and rescaled'})")
            t = adapt_input_conv(t, want[1])
        if t.shape != want:
            errors.append(f"{tk} (checkpoint key {src}): checkpoint shape {tuple(t.shape)} vs model shape "
                          f"{tuple(want)}")
            continue
        updates[tk] = t
        used.add(src)
    if errors:
        raise WeightsError(f"{label}: shape mismatch for {len(errors)} tensor(s): " + "; ".join(errors[:5])
                           + (" ..." if len(errors) > 5 else ""))
    if not updates:
        raise WeightsError(f"{label}: no tensor of this {fmt} checkpoint fits {type(model).__name__} "
                           f"(is it the right model family?)")
    with torch.no_grad():
        for tk, t in updates.items():
            own[tk].copy_(t)
    report.loaded = sorted(updates)
    # Only the part we load into: an smp/MONAI decoder is expected to be untouched.
    report.missing = sorted(k for k in own if k.startswith(prefix) and k not in updates)
    report.unexpected = sorted(set(sd) - used)
    if verbose:
        log.info("%s", report.summary())
    return report
