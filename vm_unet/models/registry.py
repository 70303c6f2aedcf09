"""Model registry: ``create_model(name, in_chans, num_classes, **overrides)`` and ``list_models()``."""
from __future__ import annotations

import inspect
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn


@dataclass(frozen=True)
class ModelEntry:
    builder: Callable[..., nn.Module]
    defaults: dict[str, Any] = field(default_factory=dict)
    description: str = ""


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str, builder: Callable[..., nn.Module], description: str = "", **defaults: Any) -> None:
    if name in _REGISTRY:
        raise KeyError(f"model {name!r} is already registered")
    _REGISTRY[name] = ModelEntry(builder, dict(defaults), description)


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def model_entry(name: str) -> ModelEntry:
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    return _REGISTRY[name]


def model_config(name: str, in_chans: int = 3, num_classes: int = 1, **overrides: Any) -> dict[str, Any]:
    """The full keyword arguments ``create_model`` would pass to the builder (stored in checkpoints)."""
    entry = model_entry(name)
    accepted = set(inspect.signature(entry.builder).parameters)
    unknown = sorted(set(overrides) - accepted)
    if unknown:
        raise ValueError(f"model {name!r} does not take {', '.join(unknown)}; it takes {', '.join(sorted(accepted))}")
    return {**entry.defaults, "in_chans": in_chans, "num_classes": num_classes, **overrides}


def create_model(name: str, in_chans: int = 3, num_classes: int = 1, pretrained: str | Path | None = None,
                 **overrides: Any) -> nn.Module:
    """Build a registered model. ``overrides`` replace the registered defaults (e.g. ``dims``, ``depths``).

    ``pretrained``: a local checkpoint (official VMamba/VM-UNet or ours) loaded with ``vm_unet.weights``; the
    load report is logged, a shape mismatch raises ``WeightsError`` naming the key.
    """
    entry = model_entry(name)
    model = entry.builder(**model_config(name, in_chans, num_classes, **overrides))
    if pretrained is not None:
        from vm_unet.weights import load_pretrained  # noqa: PLC0415 (weights imports the models package)
        load_pretrained(model, pretrained, verbose=True)
    return model


# Inductor options for models with channel-first VMamba-v2 blocks (vmunet_fast). triton.max_tiles=1: no 2-D tiled
# kernels. With tiling (torch 2.11, Triton 3.6, H200), a compiled vmunet_fast training step at batch 1 from 512² up
# stops with "CUDA error: misaligned address" inside a tiled LayerNorm-backward reduction whose arguments are all
# aligned; without it those steps run, and its 256² batch-32 step is as fast. vmunet_isic does not fail and is 8%
# slower without tiling, so it keeps inductor's defaults (BENCHMARKS.md, "Compiled training at batch 1").
FAST_BLOCK_INDUCTOR_OPTIONS = {"triton.max_tiles": 1}


def inductor_options(model: nn.Module) -> dict[str, Any]:
    """The inductor options ``compile_model`` uses for ``model``; pass them as ``torch.compile(..., options=...)``
    when compiling a network that holds our blocks yourself."""
    from .vmamba_fast import VSSBlockFast  # noqa: PLC0415 (the registry is imported before the model modules)

    fast = any(isinstance(m, VSSBlockFast) for m in model.modules())
    return dict(FAST_BLOCK_INDUCTOR_OPTIONS) if fast else {}


def compile_model(model: nn.Module, cuda_graphs: bool = False) -> nn.Module:
    """``torch.compile`` as the trainer, the predictor and the benchmark use it. Static shapes: each new input shape
    compiles once (a few per run: full and last batches); the automatic dynamic-shape recompile that follows a
    second shape hit an inductor assertion on this model (torch 2.11, H200, BENCHMARKS.md). Inductor runs with
    ``inductor_options(model)``, scoped to this compile (never set process-wide).

    ``cuda_graphs``: also replay the compiled graph as a CUDA graph (``mode="reduce-overhead"``), which removes the
    per-kernel launch cost that dominates small batches. Outputs then live in memory the next call overwrites, so a
    caller must consume them (or clone them) before calling again."""
    from torch._inductor import list_mode_options  # noqa: PLC0415 (inductor loads only when compiling)

    # torch.compile takes a mode or options, not both: the mode's own options, then the model's
    options = {**list_mode_options("reduce-overhead" if cuda_graphs else "default"), **inductor_options(model)}
    return torch.compile(model, dynamic=False, options=options)
