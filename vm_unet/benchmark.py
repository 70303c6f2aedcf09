"""Whole-model throughput and memory: ours and the usual peers, measured the same way in one process.

Train step = forward + loss + backward + AdamW step (fused on CUDA, as the trainer runs it); inference = forward
under ``torch.inference_mode``. On CUDA both run under bf16 autocast, timings are medians of synchronised repeats,
memory is the CUDA peak.
"""
from __future__ import annotations

import gc
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

import vm_unet
from vm_unet.models import compile_model

OURS = ("vmunet_isic", "vmunet_fast", "vmunet")
PEERS = ("swinunetr", "monai_unet", "smp_unet_r34")


@dataclass
class Result:
    model: str
    size: int
    batch: int
    train_img_s: float | None
    train_peak_gb: float | None
    infer_img_s: float | None
    infer_peak_gb: float | None
    note: str = ""


def known_models() -> tuple[str, ...]:
    """Names ``build_model`` takes: our registered models, then the peers."""
    return (*vm_unet.list_models(), *PEERS)


def unknown_model_message(name: str) -> str:
    return f"unknown model {name!r}; ours: {', '.join(vm_unet.list_models())}; peers: {', '.join(PEERS)}"


def build_model(name: str, in_chans: int = 3, num_classes: int = 1) -> nn.Module:
    """One of our registered models or a peer; peers raise ImportError when their library is missing."""
    if name in vm_unet.list_models():
        return vm_unet.create_model(name, in_chans=in_chans, num_classes=num_classes)
    if name == "swinunetr":
        from monai.networks.nets import SwinUNETR  # noqa: PLC0415
        return SwinUNETR(in_channels=in_chans, out_channels=num_classes, spatial_dims=2, feature_size=48)
    if name == "monai_unet":
        from monai.networks.nets import UNet  # noqa: PLC0415
        return UNet(spatial_dims=2, in_channels=in_chans, out_channels=num_classes,
                    channels=(32, 64, 128, 256, 512), strides=(2, 2, 2, 2), num_res_units=2)
    if name == "smp_unet_r34":
        import segmentation_models_pytorch as smp  # noqa: PLC0415
        return smp.Unet("resnet34", encoder_weights=None, in_channels=in_chans, classes=num_classes)
    raise KeyError(unknown_model_message(name))


def _timed(fn: Callable[[], None], device: torch.device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _optimizer(model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    # the trainer's (``training.trainer``): AdamW, fused on GPUs, for every model alike
    return torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True if device.type == "cuda" else None)


def measure(name: str, size: int, batch: int, device: torch.device, *, train: bool = True, infer: bool = True,
            warmup: int = 2, repeats: int = 5, compile: bool = False, cuda_graphs: bool = False,
            grad_checkpointing: bool = False) -> Result:
    torch.manual_seed(0)
    model = build_model(name).to(device)
    if grad_checkpointing:
        if not hasattr(model, "set_grad_checkpointing"):   # the peers: a row that says so, nothing measured
            return Result(name, size, batch, None, None, None, None, "no block checkpointing")
        model.set_grad_checkpointing(True)
    if compile or cuda_graphs:
        model = compile_model(model, cuda_graphs=cuda_graphs)
        warmup = max(warmup, 3)   # compile, then (CUDA graphs) one warm-up run and the capture, before timing
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast(
        "cpu", enabled=False)
    x = torch.randn(batch, 3, size, size, device=device)
    target = (torch.rand(batch, 1, size, size, device=device) > 0.5).float()
    result = Result(name, size, batch, None, None, None, None)
    try:
        if train:
            model.train()
            opt = _optimizer(model, device)

            def step():
                opt.zero_grad(set_to_none=True)
                with amp:
                    logits = model(x)
                loss = F.binary_cross_entropy_with_logits(logits.float(), target)
                loss.backward()
                opt.step()

            _reset_peak(device)
            seconds = _timed(step, device, warmup, repeats)
            result.train_img_s, result.train_peak_gb = batch / seconds, _peak_gb(device)
            del opt
        if infer:
            model.eval()

            def forward():
                with torch.inference_mode(), amp:
                    model(x)

            _reset_peak(device)
            seconds = _timed(forward, device, warmup, repeats)
            result.infer_img_s, result.infer_peak_gb = batch / seconds, _peak_gb(device)
    except torch.OutOfMemoryError:
        result.note = "out of memory"
    finally:
        del model
        _reset_peak(device)
    return result


def profile_train_step(name: str, size: int, batch: int, device: torch.device, *, rows: int = 30,
                       compile: bool = False) -> str:
    """torch.profiler over two train steps (after two warm-up steps): ops by self device time, as a table."""
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415
    torch.manual_seed(0)
    model = build_model(name).to(device).train()
    if compile:
        model = compile_model(model)
    opt = _optimizer(model, device)
    x = torch.randn(batch, 3, size, size, device=device)
    target = (torch.rand(batch, 1, size, size, device=device) > 0.5).float()
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step():
        opt.zero_grad(set_to_none=True)
        with amp:
            logits = model(x)
        F.binary_cross_entropy_with_logits(logits.float(), target).backward()
        opt.step()

    for _ in range(2):
        step()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(2):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60)
    del model, opt
    _reset_peak(device)
    return table


def format_table(results: list[Result]) -> str:
    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    lines = ["| model | size | batch | train img/s | train peak GB | infer img/s | infer peak GB | note |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.model} | {r.size}² | {r.batch} | {num(r.train_img_s, '.2f')} | "
                     f"{num(r.train_peak_gb, '.2f')} | {num(r.infer_img_s, '.2f')} | {num(r.infer_peak_gb, '.2f')} | "
                     f"{r.note} |")
    return "\n".join(lines)


def as_dicts(results: list[Result]) -> list[dict]:
    return [asdict(r) for r in results]


def load_results(path: Path) -> tuple[dict, list[Result]]:
    """A results JSON as ``bench_model.py --out`` writes it -> (its other fields, e.g. device and date; the rows)."""
    import json  # noqa: PLC0415

    doc = json.loads(Path(path).read_text())
    rows = [Result(**r) for r in doc.pop("results")]
    return doc, rows


PLOT_PANELS = {"train_img_s": "train img/s", "train_peak_gb": "train peak GB", "infer_img_s": "inference img/s",
               "infer_peak_gb": "inference peak GB"}


def plot_results(results: list[Result], path: Path, title: str | None = None) -> None:
    """Throughput and peak memory against image side, one line per model (log-log), as a PNG. Only the panels
    the run measured are drawn (``--no-train`` / ``--no-infer`` leave theirs empty)."""
    from matplotlib.ticker import NullLocator  # noqa: PLC0415 (matplotlib only when plotting)

    from vm_unet.training.viz import _atomic_savefig, new_figure  # noqa: PLC0415

    panels = {k: t for k, t in PLOT_PANELS.items() if any(getattr(r, k) is not None for r in results)}
    if not panels:
        return
    fig, axes = new_figure(1, len(panels), (5 * len(panels), 4))
    axes = axes[0]
    for model in dict.fromkeys(r.model for r in results):
        rs = [r for r in results if r.model == model]
        for ax, key in zip(axes, panels):
            vals = [getattr(r, key) for r in rs]
            if any(v is not None for v in vals):
                ax.plot([r.size for r in rs], [float("nan") if v is None else v for v in vals], marker="o",
                        label=model)
    sides = sorted({r.size for r in results})
    for ax, panel_title in zip(axes, panels.values()):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(sides, [str(s) for s in sides])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("image side (px)")
        ax.set_title(panel_title)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    _atomic_savefig(fig, Path(path))


def measure_loader(cfg: dict, epochs: int = 2, max_samples: int | None = None, progress: bool = True) -> list[dict]:
    """Training batches a second from the config's data pipeline, per epoch, in the trainer's loader (decode,
    resize, augmentation, collate, pinning in ``data.num_workers`` workers); no model. With picture folders the
    first epoch stores the resized copies (``data.cache``) and later ones read them. Rows: epoch, samples, seconds,
    img/s, and how many of the samples had a stored copy when the epoch began (None without the cache)."""
    from vm_unet.datasets import build_datasets
    from vm_unet.training.sampling import TrainSampler
    from vm_unet.training.trainer import progress_bar, resolve_device, train_loader

    data = build_datasets(cfg, splits=("train",), for_training=True)
    n = len(data.train) if max_samples is None else min(int(max_samples), len(data.train))
    source, seed = data.train.source, int(cfg.get("seed", 0))
    sampler = TrainSampler(n, seed)
    loader = train_loader(data.train, sampler, int(cfg["train"]["batch_size"]), int(cfg["data"].get("num_workers", 0)),
                          resolve_device(cfg.get("device", "auto")), seed)
    rows = []
    for epoch in range(epochs):
        stored = sum(source.cached(i) for i in range(n)) if hasattr(source, "cached") else None
        sampler.set_epoch(epoch)
        t = time.perf_counter()
        for _ in progress_bar(loader, progress, f"epoch {epoch + 1}/{epochs}", total=len(loader)):
            pass
        dt = time.perf_counter() - t
        rows.append({"epoch": epoch + 1, "samples": n, "seconds": dt, "img_s": n / dt, "stored_before": stored})
    return rows
