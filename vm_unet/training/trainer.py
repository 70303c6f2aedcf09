"""The training loop: AdamW + per-step cosine with warm-up, AMP (bf16 where supported), grad clipping, optional
EMA, best-by-validation-Dice, atomic checkpoints each epoch, exact ``--resume``, torchrun DDP.

Resume exactness rests on three things: the data order and augmentation are pure functions of
(seed, epoch, position) (see ``sampling.py``), every other RNG state (torch CPU/CUDA on every rank, numpy, python)
is stored in the checkpoint, and a checkpoint records the step inside the epoch.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader

from vm_unet.checkpoint import CheckpointError, checkpoint_payload, read_checkpoint, write_checkpoint
from vm_unet.errors import ConfigError, TrainingError, UserError

from . import distributed as D
from .background import BackgroundWriter
from .losses import SegLoss
from .metrics import SegMetrics, default_metric_workers, finite_or_none, hd95_pool, predict_labels
from .sampling import ShardSampler, TrainSampler
from .viz import denormalize, plot_curves, save_overlays


# ----------------------------------------------------------------------------------------------------- helpers
def resolve_device(name: str) -> str:
    name = (name or "auto").lower()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA GPU is visible (use --device cpu)")
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"device must be auto, cpu or cuda, got {name!r}")
    return name


def amp_dtype(amp: str, device: str):
    """None (fp32) or the autocast dtype. ``auto``: bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU
    (CPU bf16 autocast is slower than fp32 on most CPUs)."""
    amp = str(amp).lower()
    if amp in ("off", "none", "false", "fp32", "no"):
        return None
    if amp == "auto":
        if device != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp in ("bf16", "bfloat16"):
        return torch.bfloat16
    if amp in ("fp16", "float16", "half"):
        if device != "cuda":
            raise ConfigError("train.amp=fp16 needs CUDA; use bf16 or off on CPU")
        return torch.float16
    raise ConfigError(f"train.amp must be auto, bf16, fp16 or off, got {amp!r}")


def cosine_lambda(total: int, warmup: int, min_ratio: float):
    warmup = max(0, min(int(warmup), max(total - 1, 0)))

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        t = (step - warmup) / max(1, total - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

    return f


class EMA:
    """Exponential moving average of parameters and buffers (evaluated and saved as the inference weights)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = float(decay)
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module):
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].mul_(self.decay).add_(v.detach(), alpha=1 - self.decay)
            else:
                self.shadow[k].copy_(v)


def _unwrap(model):
    return model.module if hasattr(model, "module") else model


def _atomic_write_text(path: Path, text: str):
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _rng_state() -> dict:
    st = {"torch": torch.get_rng_state(), "numpy": _np_state(), "python": _py_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def _np_state():
    s = np.random.get_state()
    return [s[0], torch.from_numpy(s[1].astype(np.int64)), int(s[2]), int(s[3]), float(s[4])]


def _py_state():
    v, internal, gauss = random.getstate()
    return [v, list(internal), gauss]


def _set_rng_state(st: dict):
    torch.set_rng_state(st["torch"])
    s = st["numpy"]
    np.random.set_state((s[0], s[1].numpy().astype(np.uint32), s[2], s[3], s[4]))
    v, internal, gauss = st["python"]
    random.setstate((v, tuple(internal), gauss))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])


def _new_run_dir(cfg: dict) -> Path:
    out = Path(cfg.get("out") or "runs")
    name = cfg.get("run_name") or f"{Path(cfg.get('config_file', 'run')).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    d, k = out / name, 1
    while d.exists():
        d, k = out / f"{name}-{k}", k + 1
    return d


def train_loader(dataset, sampler: TrainSampler, batch_size: int, num_workers: int, device: str,
                 seed: int) -> DataLoader:
    """The training batches, one epoch per iteration of the loader: ``sampler.set_epoch`` first (also what
    ``vm_unet.benchmark.measure_loader`` times). Its workers live for the whole run: starting them (and importing
    albumentations in each) every epoch cost a second or two an epoch."""
    from vm_unet.datasets import collate

    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate, num_workers=num_workers,
                      pin_memory=device == "cuda", drop_last=False, persistent_workers=num_workers > 0,
                      generator=torch.Generator().manual_seed(seed))  # keeps the global RNG untouched


def compile_options(tc: dict, device: str, ddp: bool) -> tuple[bool, bool]:
    """``train.compile`` and ``train.cuda_graphs``, checked: (compile the training forward, with CUDA graphs).

    Compiling keeps the graph whole (the scan kernels are custom ops), so inductor fuses the norms, gates and casts
    around them (BENCHMARKS.md); CUDA graphs also replay forward and backward without per-kernel launch cost (the
    last, shorter batch of an epoch gets a graph of its own). Validation, EMA and checkpoints keep using the plain
    module, which shares the parameters.

    ``cuda_graphs: auto`` (the long-run configs) turns them on where they can run: one CUDA process with Triton and
    no gradient checkpointing. An eager step is bound by the host's kernel launches: on an H200, ``isic`` trained at
    about 300 img/s eager, 250 compiled without graphs and 618 with them, after a minute or two of compiling
    (BENCHMARKS.md), which a run of a few thousand steps repays."""
    compiled, graphs = _switch(tc, "compile"), tc.get("cuda_graphs", False)
    if graphs == "auto":
        from vm_unet.kernels.backend import triton_available

        graphs = device == "cuda" and not ddp and triton_available() and not tc.get("grad_checkpointing")
    elif not isinstance(graphs, bool):
        raise ConfigError(f"train.cuda_graphs must be true, false or auto, got {graphs!r}")
    if graphs and device != "cuda":
        raise ConfigError(f"train.cuda_graphs needs a CUDA device (device is {device})")
    if graphs and ddp:
        raise ConfigError("train.cuda_graphs runs on one GPU; with several processes use train.compile")
    return compiled or graphs, graphs


def metric_workers(tc: dict, device: str) -> int:
    """``train.metric_workers``, checked: how many processes compute validation HD95 (0: in this process; ``auto``:
    ``metrics.default_metric_workers``). On an H200 host, HD95 in the training process was most of validation."""
    value = tc.get("metric_workers", "auto")
    if not tc.get("hd95", True):
        return 0
    if value == "auto":
        return default_metric_workers(device)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"train.metric_workers must be auto or a whole number >= 0, got {value!r}")
    return value


def _switch(tc: dict, key: str) -> bool:
    """A true/false ``train`` option (default false), checked."""
    value = tc.get(key, False)
    if not isinstance(value, bool):
        raise ConfigError(f"train.{key} must be true or false, got {value!r}")
    return value


# ------------------------------------------------------------------------------------------------------- train
def train(cfg: dict, resume: str | os.PathLike | None = None, callbacks: dict | None = None) -> Path:
    """Train from a config dict (see ``config.DEFAULTS``); returns the run folder.

    ``resume``: a run folder or a checkpoint; training continues in that run folder. ``callbacks``:
    ``{"on_epoch_end": fn(info)}`` (used by tests to simulate a crash)."""
    from vm_unet.datasets import DeviceNormalize, build_datasets, collate
    from vm_unet.models import compile_model, model_config, set_grad_checkpointing
    import vm_unet

    callbacks = callbacks or {}
    ckpt_state = None
    if resume is not None:
        rp = Path(resume)
        rp = rp / "last.pt" if rp.is_dir() else rp
        payload = read_checkpoint(rp)
        if not payload.get("training_state"):
            raise CheckpointError(f"{rp}: holds no training state (only last.pt/epoch checkpoints can be resumed)")
        ckpt_state = payload["training_state"]
        run_dir = rp.parent

    device = resolve_device(cfg.get("device", "auto"))
    ddp, local_rank = D.init_from_env(device)
    dev = torch.device(device, local_rank) if device == "cuda" else torch.device("cpu")
    rank, world = D.rank(), D.world_size()
    main = rank == 0
    tc = cfg["train"]
    seed = int(cfg.get("seed", 0))
    torch.manual_seed(seed + rank)  # different drop-path draws per rank, reproducible
    np.random.seed(seed + rank)
    random.seed(seed + rank)

    # Data first: bad input must fail before anything is written.
    data = build_datasets(cfg, splits=("train", "val"), for_training=True)
    mc = cfg["model"]
    num_classes, in_chans = int(mc.get("num_classes", 1)), int(mc.get("in_chans", 3))
    try:
        model_kwargs = model_config(mc["name"], in_chans, num_classes, **(mc.get("overrides") or {}))
        # pretrained weights initialise a fresh run only; they are not part of the saved model description
        pretrained = mc.get("pretrained") if resume is None else None
        model = vm_unet.create_model(mc["name"], pretrained=pretrained, **model_kwargs) if pretrained \
            else vm_unet.create_model(mc["name"], **model_kwargs)
    except UserError:
        raise
    except (KeyError, ValueError, TypeError) as e:
        raise ConfigError(f"model: {str(e).strip(chr(39))}") from None
    # train.grad_checkpointing: recompute each block in the backward instead of storing its activations
    # (high-resolution training in less memory; BENCHMARKS.md has the trade)
    set_grad_checkpointing(model, _switch(tc, "grad_checkpointing"))
    compiled, cuda_graphs = compile_options(tc, device, ddp)
    n_metric_workers = metric_workers(tc, device)
    model.to(dev)

    bs = int(tc["batch_size"])
    train_sampler = TrainSampler(len(data.train), seed, rank, world, data.train.sample_weights)
    steps_per_epoch = -(-train_sampler.per_rank // bs)
    epochs = int(tc["epochs"])
    total_steps = epochs * steps_per_epoch
    if tc.get("max_steps"):
        total_steps = min(total_steps, int(tc["max_steps"]))
    if total_steps < 1:
        raise ConfigError("nothing to train: epochs and max_steps give 0 steps")

    decay, no_decay = [], []
    for n_, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # norms, biases and SSM constants (A_log, D) are not weight-decayed, as in mamba/VMamba
        (no_decay if p.ndim <= 1 or n_.endswith(("A_logs", "A_log", "Ds", ".D"))
         else decay).append(p)
    # fused on GPUs: one kernel for all parameters instead of a dozen multi-tensor passes (H200, vmunet_fast 256² b32
    # under CUDA graphs: 41.6 -> 40.8 ms a step, BENCHMARKS.md)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": float(tc["weight_decay"])},
                             {"params": no_decay, "weight_decay": 0.0}], lr=float(tc["lr"]),
                            fused=True if device == "cuda" else None)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_lambda(total_steps, int(tc.get("warmup_steps", 0)),
                                                                 float(tc.get("min_lr_ratio", 0.0))))
    adt = amp_dtype(tc.get("amp", "auto"), device)
    scaler = torch.amp.GradScaler("cuda", enabled=(adt == torch.float16))
    ema = EMA(model, tc["ema"]) if tc.get("ema") else None
    loss_fn = SegLoss(num_classes, **(tc.get("loss") or {}))

    start_epoch, batch_in_epoch, global_step = 0, 0, 0
    best, best_epoch, history, nan_skipped = -1.0, -1, [], 0
    if ckpt_state is not None:
        if payload["model_name"] != mc["name"] or dict(payload["model_kwargs"]) != _prim(model_kwargs):
            raise CheckpointError(f"{rp}: checkpoint model {payload['model_name']} {dict(payload['model_kwargs'])} "
                                  f"differs from the configured model {mc['name']} {model_kwargs}")
        model.load_state_dict(ckpt_state["model"] if "model" in ckpt_state else payload["state_dict"])
        if ema is not None:
            if "ema" not in ckpt_state:
                raise CheckpointError(f"{rp}: run had no EMA; cannot resume with train.ema set")
            ema.shadow = {k: v.to(dev) for k, v in ckpt_state["ema"].items()}
        opt.load_state_dict(ckpt_state["optimizer"])
        sched.load_state_dict(ckpt_state["scheduler"])
        if ckpt_state.get("scaler"):
            scaler.load_state_dict(ckpt_state["scaler"])
        start_epoch, batch_in_epoch = int(ckpt_state["epoch"]), int(ckpt_state["batch_in_epoch"])
        global_step = int(ckpt_state["global_step"])
        best, best_epoch = float(ckpt_state["best_metric"]), int(ckpt_state["best_epoch"])
        history = list(ckpt_state.get("history", []))
        nan_skipped = int(ckpt_state.get("nan_skipped", 0))
        rngs = ckpt_state["rng"]
        if len(rngs) != world:
            raise CheckpointError(f"{rp}: saved with {len(rngs)} process(es), resumed with {world}; exact resume "
                                  "needs the same world size")
        _set_rng_state(rngs[rank])
        if main:
            print(f"resuming {run_dir} at epoch {start_epoch + 1}, step {global_step}", flush=True)
    else:
        run_dir = D.broadcast_object(_new_run_dir(cfg) if main else None)

    net = model
    if ddp:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if device == "cuda" else None)
    if compiled:
        net = compile_model(net, cuda_graphs=cuda_graphs)
    if main and compiled:
        print("train.compile: the first steps compile the model (about a minute on a GPU)", flush=True)

    created = False
    if main:
        created = not run_dir.exists()
        (run_dir / "overlays").mkdir(parents=True, exist_ok=True)
        saved_cfg = copy.deepcopy(cfg)
        _atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(saved_cfg, sort_keys=False))
        if data.split:
            _atomic_write_text(run_dir / "split.json", json.dumps(data.split, indent=1))

    meta = dict(model_name=mc["name"], model_kwargs=model_kwargs, preprocessing=data.preprocessing,
                class_names=data.class_names)
    nw = int(cfg["data"].get("num_workers", 0))
    val_loader = DataLoader(data.val, batch_size=int(tc.get("val_batch_size") or bs), collate_fn=collate,
                            sampler=ShardSampler(len(data.val), rank, world), num_workers=nw,
                            persistent_workers=nw > 0)
    pool = hd95_pool(n_metric_workers)
    metrics = SegMetrics(num_classes, data.class_names, hd95=bool(tc.get("hd95", True)), pool=pool)
    # checkpoints, history and PNGs are written in the background, one epoch's at a time (see background.py)
    writer = BackgroundWriter() if main else None
    threshold = float(data.preprocessing.get("threshold", 0.5))
    to_input = DeviceNormalize(data.preprocessing, dev)
    log_every = int(tc.get("log_every", 10))

    def save(kind: str, epoch_done: int, batch_done: int, val_summary: dict | None):
        rngs = D.all_gather_objects(_rng_state())  # every rank's RNG, so DDP resumes exactly too
        if not main:
            return
        writer.wait()   # the last epoch's files: one epoch's snapshot in memory at a time
        ts = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "scaler": scaler.state_dict(),
              "epoch": epoch_done, "batch_in_epoch": batch_done, "global_step": global_step,
              "best_metric": best, "best_epoch": best_epoch, "history": history, "rng": rngs,
              "nan_skipped": nan_skipped}
        if ema is not None:
            ts["model"], ts["ema"] = model.state_dict(), ema.shadow
        weights = ema.shadow if ema is not None else model
        extra = {"config": cfg, "epoch": epoch_done, "global_step": global_step, "val": val_summary or {},
                 "ema": bool(ema)}
        payload = checkpoint_payload(weights, **meta, extra=extra, training_state=ts)   # CPU copies, taken now
        writer.submit(write_checkpoint, run_dir / "last.pt", payload)
        weights_only = dict(payload, training_state=None)
        if kind == "best":
            writer.submit(write_checkpoint, run_dir / "best.pt", weights_only)
        if tc.get("keep_epoch_checkpoints"):
            writer.submit(write_checkpoint, run_dir / f"epoch_{epoch_done:04d}.pt", weights_only)

    loader = train_loader(data.train, train_sampler, bs, nw, device, seed)
    # fused AdamW without a GradScaler (bf16, fp32) on a GPU: non-finite losses are checked a step late, without
    # stopping the host (see _LateCheck)
    late = _LateCheck() if device == "cuda" and opt.defaults.get("fused") and not scaler.is_enabled() else None
    shown_loss = float("nan")

    def settle(earlier):
        """A late-checked step (bad, loss, step) or None: a bad one is counted or stops the run, and its samples
        leave the epoch's mean loss."""
        nonlocal nan_skipped, run_n
        if earlier is not None and earlier[0]:
            nan_skipped = _bad_batch(earlier[2], tc, nan_skipped, steps_per_epoch, main)
            run_n -= earlier[2][3]

    try:
        epoch = start_epoch
        while epoch < epochs and global_step < total_steps:
            train_sampler.set_epoch(epoch, skip=batch_in_epoch * bs)
            net.train()
            t_epoch = time.perf_counter()
            # on the device: a .cpu() per step would synchronise the GPU every step
            run_loss, run_n = torch.zeros((), dtype=torch.float64, device=dev), 0
            batches = _WaitTimer(progress_bar(loader, main, f"epoch {epoch + 1}/{epochs}", initial=batch_in_epoch,
                                      total=steps_per_epoch))
            bar = batches.it
            for batch in batches:
                x = to_input(batch["image"].to(dev, non_blocking=True))
                y = batch["mask"].to(dev, non_blocking=True).long()
                if cuda_graphs:
                    # a new step for the graphs' memory: also right after a skipped (NaN) batch left its forward's
                    # backward unrun, which the automatic step detection would misread
                    torch.compiler.cudagraph_mark_step_begin()
                with torch.autocast(device_type=device, dtype=adt or torch.float32, enabled=adt is not None):
                    logits = net(x)
                loss = loss_fn(logits, y)
                bad = ~torch.isfinite(loss.detach())
                step = (epoch + 1, global_step + 1, batch["name"][:3], x.shape[0])
                if late is not None:
                    # the host does not wait for the loss: a bad batch's update is dropped on the device (the fused
                    # AdamW step reads found_inf, as under a GradScaler), and the host learns of it a step later
                    if ddp:
                        D.any_rank_(bad)
                    opt.found_inf = bad.float()
                    update = True
                else:
                    if ddp:  # every rank must take the same branch, or DDP hangs
                        bad = D.all_reduce_sum(bad.double().cpu()) > 0
                    update = not bool(bad)
                    if not update:
                        nan_skipped = _bad_batch(step, tc, nan_skipped, steps_per_epoch, main)
                opt.zero_grad(set_to_none=True)
                if update:
                    scaler.scale(loss).backward()
                    if tc.get("grad_clip"):
                        scaler.unscale_(opt)
                        torch.nn.utils.clip_grad_norm_(model.parameters(), float(tc["grad_clip"]))
                    scaler.step(opt)
                    scaler.update()
                # a skipped batch leaves the weights as they were, and still counts as a step of the schedule
                sched.step()
                if ema is not None:
                    ema.update(model)
                global_step += 1
                batch_in_epoch += 1
                if late is not None:
                    run_loss += torch.where(bad, 0.0, loss.detach().double()) * x.shape[0]
                    run_n += x.shape[0]
                    earlier = late.put(bad, loss, step)
                    if earlier is not None:
                        shown_loss = earlier[1]
                        settle(earlier)
                elif update:
                    run_loss += loss.detach().double() * x.shape[0]
                    run_n += x.shape[0]
                    shown_loss = loss
                if main and hasattr(bar, "set_postfix") and (global_step % log_every == 0 or batch_in_epoch == 1):
                    bar.set_postfix(loss=f"{float(shown_loss):.4f}", lr=f"{sched.get_last_lr()[0]:.2e}")
                if global_step >= total_steps:
                    break
            if late is not None:
                settle(late.take())
            epoch_complete = batch_in_epoch >= steps_per_epoch
            stats = D.all_reduce_sum(torch.stack([run_loss.cpu(), torch.tensor(float(run_n), dtype=torch.float64)]))
            t_val = time.perf_counter()
            train_loss = float(stats[0] / stats[1]) if stats[1] > 0 else float("nan")

            # ---- validation (EMA weights when EMA is on: those are the weights we save for inference)
            eval_model = model
            if ema is not None:
                eval_model = copy.deepcopy(model)
                eval_model.load_state_dict(ema.shadow)
            val, overlays = validate(eval_model, val_loader, to_input, loss_fn, metrics, dev, adt, threshold,
                                     int(tc.get("overlays", 4)) if main else 0, data.preprocessing)
            row = {"epoch": epoch + 1, "step": global_step, "train_loss": train_loss,
                   "lr": sched.get_last_lr()[0], "val_loss": val.pop("loss"),
                   **{f"val_{k}": v for k, v in val.items()}}
            history.append(row)
            improved = row["val_mean_dice"] > best
            if improved:
                best, best_epoch = row["val_mean_dice"], epoch + 1
            done_epoch, done_batch = (epoch + 1, 0) if epoch_complete else (epoch, batch_in_epoch)
            t_save = time.perf_counter()
            save("best" if improved else "last", done_epoch, done_batch, finite_or_none(row))
            if main:
                writer.submit(_write_history, run_dir, list(history), best, best_epoch)
                writer.submit(save_overlays, overlays, run_dir / "overlays" / f"epoch_{epoch + 1:04d}.png",
                              f"epoch {epoch + 1}  val Dice {row['val_mean_dice']:.3f}")
                print(f"epoch {epoch + 1}: train loss {train_loss:.4f}  val loss {row['val_loss']:.4f}  "
                      f"val Dice {row['val_mean_dice']:.4f} (pooled DSC {row['val_pooled_dsc']:.4f}, "
                      f"mIoU {row['val_pooled_miou']:.4f}, HD95 {row['val_mean_hd95']:.2f})"
                      + ("  *best*" if improved else "")
                      + f"  [train {t_val - t_epoch:.1f}s ({float(stats[1]) / max(t_val - t_epoch, 1e-9):.0f} img/s, "
                        f"{batches.seconds:.1f}s of it waiting for data), val {t_save - t_val:.1f}s, "
                        f"save+log {time.perf_counter() - t_save:.1f}s]", flush=True)
            if "on_epoch_end" in callbacks:
                callbacks["on_epoch_end"]({"epoch": epoch + 1, "step": global_step, "run_dir": run_dir, "row": row})
            D.barrier()
            if epoch_complete:
                epoch, batch_in_epoch = epoch + 1, 0
            else:
                break
        if writer is not None:
            writer.wait()
    except BaseException:
        if writer is not None:
            try:   # what was queued before the failure still lands (each file whole or not at all)
                writer.wait()
            except BaseException:  # noqa: BLE001 (the error being raised is the one to report)
                pass
        # nothing half-written: a run that fails before its first checkpoint leaves no folder behind
        if main and created and run_dir.exists() and not (run_dir / "last.pt").exists():
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    finally:
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
    if main:
        print(f"done: best val Dice {best:.4f} at epoch {best_epoch}; run folder {run_dir}", flush=True)
    return run_dir


def _prim(d):
    return json.loads(json.dumps(d))


def _bad_batch(step: tuple, tc: dict, skipped: int, steps_per_epoch: int, main: bool) -> int:
    """A batch whose loss was NaN/Inf (``step``: epoch, step, names, size): the run stops (``nan_policy: stop``)
    or counts it as skipped, and stops when too many were. Returns the new count."""
    epoch, n_step, names = step[:3]
    if tc.get("nan_policy", "stop") != "skip":
        raise TrainingError(f"loss became NaN/Inf at epoch {epoch}, step {n_step} (batch {', '.join(names)}); lower "
                            "train.lr, use train.amp=bf16 or off, or set train.nan_policy=skip")
    skipped += 1
    if main:
        print(f"warning: non-finite loss at step {n_step} (batch {names}...), batch skipped ({skipped} so far)",
              file=sys.stderr, flush=True)
    if skipped > max(10, steps_per_epoch // 2):
        raise TrainingError(f"loss was NaN/Inf on {skipped} batches; stopping (lower train.lr, use train.amp=bf16 "
                            "or off, check inputs)")
    return skipped


class _LateCheck:
    """A step's non-finite flag and loss, for the host one step later. They are copied into pinned memory once the
    step is queued, and read once the next one is, when the copy has long arrived: the host never waits for the GPU
    mid-step (a check right after the forward held the host until the forward had run, leaving the GPU idle while
    the backward was launched)."""

    def __init__(self):
        self.buffers = [torch.empty(2, pin_memory=True) for _ in range(2)]
        self.turn, self.pending = 0, None

    def put(self, bad: torch.Tensor, loss: torch.Tensor, step: tuple):
        """Queue this step's copy; returns the previous step's (bad, loss, step), or None."""
        buf = self.buffers[self.turn]
        self.turn ^= 1
        buf.copy_(torch.stack([bad.float(), loss.detach().float()]), non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        earlier, self.pending = self.take(), (buf, done, step)
        return earlier

    def take(self):
        if self.pending is None:
            return None
        buf, done, step = self.pending
        self.pending = None
        done.synchronize()
        return bool(buf[0]), float(buf[1]), step


class _WaitTimer:
    """Iterates ``it``, adding up the time spent waiting for its items: a loader that keeps the GPU waiting shows
    here (raise data.num_workers)."""

    def __init__(self, it):
        self.it, self.seconds = it, 0.0

    def __iter__(self):
        items = iter(self.it)
        while True:
            t = time.perf_counter()
            try:
                item = next(items)
            except StopIteration:
                return
            finally:
                self.seconds += time.perf_counter() - t
            yield item


def progress_bar(it, main, desc, initial=0, total=None):
    if not main:
        return it
    try:
        from tqdm.auto import tqdm

        return tqdm(it, desc=desc, initial=initial, total=total, leave=False, dynamic_ncols=True,
                    disable=os.environ.get("VMUNET_NO_PROGRESS") == "1")
    except ImportError:  # pragma: no cover
        return it


@torch.no_grad()
def validate(model, loader, to_input, loss_fn, metrics: SegMetrics, dev, adt, threshold, n_overlays,
             preprocessing):
    """Loss and metrics over the validation shard of this rank, reduced over ranks; plus overlay items.
    ``to_input``: the batch's model input from its image tensor on the device (``DeviceNormalize``)."""
    model.eval()
    metrics.reset()
    tot, n = torch.zeros((), dtype=torch.float64), 0
    overlays = []
    for batch in loader:
        x, y = to_input(batch["image"].to(dev)), batch["mask"].to(dev).long()
        with torch.autocast(device_type=dev.type, dtype=adt or torch.float32, enabled=adt is not None):
            logits = model(x)
        logits = logits.float()
        tot += loss_fn(logits, y).double().cpu() * x.shape[0]
        n += x.shape[0]
        pred = predict_labels(logits, threshold)
        metrics.update(pred, y, batch["name"], batch["case"])
        for b in range(x.shape[0]):
            if len(overlays) < n_overlays:
                overlays.append((batch["name"][b], denormalize(x[b].float().cpu().numpy(), preprocessing),
                                 y[b].cpu().numpy(), pred[b].cpu().numpy()))
    s = D.all_reduce_sum(torch.stack([tot, torch.tensor(float(n), dtype=torch.float64)]))
    metrics.reduce()
    out = metrics.summary()
    out["loss"] = float(s[0] / s[1]) if s[1] > 0 else float("nan")
    return out, overlays


def _write_history(run_dir: Path, history: list[dict], best: float, best_epoch: int):
    keys = list(dict.fromkeys(k for h in history for k in h))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(history)
    _atomic_write_text(run_dir / "metrics.csv", buf.getvalue())
    _atomic_write_text(run_dir / "metrics.json", json.dumps(
        {"best_val_mean_dice": best, "best_epoch": best_epoch, "history": [finite_or_none(h) for h in history]},
        indent=1))
    plot_curves(history, run_dir / "curves.png")
