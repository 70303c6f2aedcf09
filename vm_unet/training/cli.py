"""Command-line front ends (``scripts/train.py``, ``scripts/evaluate.py``) share this: argument parsing and the
one-line error handling for :class:`vm_unet.errors.UserError`."""

from __future__ import annotations

import argparse
import errno
import sys

from vm_unet.errors import UserError


def one_line(e: BaseException) -> str:
    """Message for the user. Errors re-raised from DataLoader workers carry the worker traceback text; keep only
    the final ``Type: message`` line, without the type."""
    msg = str(e).strip()
    if "\n" in msg:
        last = msg.splitlines()[-1]
        msg = last.split(": ", 1)[1] if ": " in last and last.split(": ", 1)[0].endswith(("Error", "Exception")) \
            else last
    return msg


# the disk or folder the user pointed us at, not a bug: a full disk, a read-only or forbidden output folder
_USER_OS_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS}


def run_cli(fn, argv=None) -> int:
    try:
        fn(argv)
        return 0
    except UserError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in _USER_OS_ERRORS:
            raise
        print(f"error: {f'{e.filename}: ' if e.filename else ''}{e.strerror}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train.py", description="Train VM-UNet (default: synthetic lesions, CPU-friendly)")
    p.add_argument("--config", help="YAML file or shipped name: synthetic (default), isic, isic2016, brats_slices, synapse")
    p.add_argument("--data-root", help="data folder (overrides data.root)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--max-steps", type=int, help="stop after this many optimiser steps in total")
    p.add_argument("--batch-size", type=int, help="per-process batch size")
    p.add_argument("--image-size", help="N or HxW")
    p.add_argument("--model", help="vmunet_isic, vmunet, vmunet_fast")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--out", help="folder that receives run folders (default runs/)")
    p.add_argument("--resume", help="run folder or checkpoint to continue exactly")
    p.add_argument("--seed", type=int)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, dotted, YAML value (e.g. --set train.lr=3e-4 --set train.ema=0.999)")
    return p


def _image_size(s: str):
    from vm_unet.errors import ConfigError

    try:
        if "x" in s.lower():
            h, w = s.lower().split("x")
            return [int(h), int(w)]
        return int(s)
    except ValueError:
        raise ConfigError(f"--image-size {s!r}: expected N or HxW") from None


def config_from_args(args) -> dict:
    from vm_unet.checkpoint import read_checkpoint
    from vm_unet.training.config import apply_sets, load_config, set_dotted
    from pathlib import Path

    if args.resume and not args.config:
        # continue with the run's own config, so the schedule and data are identical
        rp = Path(args.resume)
        rp = rp / "last.pt" if rp.is_dir() else rp
        cfg = read_checkpoint(rp).get("extra", {}).get("config")
        if not cfg:
            raise UserError(f"{rp}: checkpoint carries no config; pass --config")
    else:
        cfg = load_config(args.config)
    flags = {"data.root": args.data_root, "train.epochs": args.epochs, "train.max_steps": args.max_steps,
             "train.batch_size": args.batch_size, "model.name": args.model, "device": args.device, "out": args.out,
             "seed": args.seed, "data.image_size": _image_size(args.image_size) if args.image_size else None}
    for k, v in flags.items():
        if v is not None:
            set_dotted(cfg, k, v)
    return apply_sets(cfg, args.set)


def train_main(argv=None):
    from vm_unet.training.trainer import train

    args = train_parser().parse_args(argv)
    cfg = config_from_args(args)
    return train(cfg, resume=args.resume)


def evaluate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="evaluate.py", description="Evaluate a VM-UNet checkpoint on labelled data")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data-root", help="folder with images/+masks/ (or test/), or imagesTr/+labelsTr/ volumes")
    p.add_argument("--config", help="config for the data kind/options (default: the one saved in the checkpoint)")
    p.add_argument("--out", help="output folder (default: beside the checkpoint)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--overlays", type=int, default=8, help="number of items drawn in overlay PNGs")
    return p


def evaluate_main(argv=None):
    import json

    from vm_unet.training.evaluate import evaluate_checkpoint
    from vm_unet.training.trainer import resolve_device

    a = evaluate_parser().parse_args(argv)
    s = evaluate_checkpoint(a.checkpoint, a.data_root, a.config, a.out, resolve_device(a.device), a.overlays)
    keys = ("n_items", "mean_dice", "mean_iou", "mean_hd95", "pooled_dsc", "pooled_miou", "pooled_accuracy",
            "pooled_specificity", "pooled_sensitivity")
    print(json.dumps({k: s.get(k) for k in keys}, indent=1))
    print(f"wrote {s['out']}/per_case.csv, summary.json, overlays/")
    return s


def train_entry():
    """Console-script entry point (``vm-unet-train``)."""
    sys.exit(run_cli(train_main))


def evaluate_entry():
    """Console-script entry point (``vm-unet-evaluate``)."""
    sys.exit(run_cli(evaluate_main))
