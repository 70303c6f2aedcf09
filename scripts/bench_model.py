#!/usr/bin/env python
"""Train-step and inference throughput and peak memory of our models and the peers, one table.

Examples:
    python scripts/bench_model.py --device cuda --sizes 256 1024 2048 --batches 32 2 1
    python scripts/bench_model.py --device cpu --models vmunet_isic swinunetr --sizes 256 --batches 1
    python scripts/bench_model.py --replot results.json        # redraw results.png from a saved run

With --out, the JSON is rewritten after every measured row, so a run that is cut short keeps what it measured.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from datetime import date
from importlib import metadata
from pathlib import Path

import torch

from vm_unet.benchmark import (OURS, PEERS, as_dicts, format_table, known_models, load_results, measure,
                               plot_results, unknown_model_message)
from vm_unet.inference.io import atomic_output


def _versions() -> str:
    try:
        triton = f", triton {metadata.version('triton')}"
    except metadata.PackageNotFoundError:
        triton = ""
    return f"torch {torch.__version__}{triton}"


def _save(path: Path, device: str, results: list) -> None:
    """The results so far, replaced atomically: a long run that is cut short keeps the rows it measured."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps({"device": device, "date": str(date.today()), "results": as_dicts(results)},
                                  indent=2))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(OURS[:2]) + list(PEERS))
    p.add_argument("--sizes", nargs="+", type=int, default=[256, 512, 1024, 2048])
    p.add_argument("--batches", nargs="+", type=int, default=None,
                   help="batch per size (default: 32, 8, 2, 1 on CUDA; 1 on CPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--no-train", action="store_true")
    p.add_argument("--no-infer", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile every model first")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="torch.compile every model with CUDA graphs (mode reduce-overhead); CUDA only")
    p.add_argument("--grad-checkpointing", action="store_true",
                   help="our models recompute each block in the backward (less training memory)")
    p.add_argument("--out", type=Path, default=None, help="write results JSON (and a PNG plot) here")
    p.add_argument("--profile", type=Path, default=None,
                   help="profile one train step per (model, size) with torch.profiler; top-ops tables go here")
    p.add_argument("--replot", type=Path, default=None,
                   help="only draw the PNG of a results JSON written by --out (next to it, same name); no measuring")
    args = p.parse_args(argv)

    if args.replot:
        try:
            info, results = load_results(args.replot)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            print(f"error: {args.replot}: not a results JSON written by --out ({exc})", file=sys.stderr)
            return 2
        png = args.replot.with_suffix(".png")
        plot_results(results, png, title=" · ".join(str(info[k]) for k in ("device", "date") if k in info))
        print(format_table(results))
        print(f"wrote {png}")
        return 0

    unknown = [m for m in args.models if m not in known_models()]
    if unknown:
        print(f"error: {unknown_model_message(unknown[0])}", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    if args.cuda_graphs and device.type != "cuda":
        print("error: --cuda-graphs needs --device cuda", file=sys.stderr)
        return 2
    defaults = {256: 32, 512: 8, 1024: 2, 2048: 1} if device.type == "cuda" else {}
    batches = args.batches or [defaults.get(s, 1) for s in args.sizes]
    if len(batches) != len(args.sizes):
        print("error: give one --batches value per --sizes value", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    described = f"{name} ({_versions()})"   # the results JSON's device: what measured them
    print(f"# {date.today()} · {name} · torch {torch.__version__} · threads {torch.get_num_threads()}", flush=True)

    results = []
    for size, batch in zip(args.sizes, batches):
        for model in args.models:
            try:
                r = measure(model, size, batch, device, train=not args.no_train, infer=not args.no_infer,
                            warmup=args.warmup, repeats=args.repeats, compile=args.compile,
                            cuda_graphs=args.cuda_graphs, grad_checkpointing=args.grad_checkpointing)
            except ImportError as exc:
                print(f"skipping {model}: {exc}", file=sys.stderr)
                continue
            results.append(r)
            print(format_table([r]).splitlines()[-1], flush=True)
            if args.out:
                _save(args.out, described, results)
    if args.profile:
        from vm_unet.benchmark import profile_train_step  # noqa: PLC0415
        args.profile.parent.mkdir(parents=True, exist_ok=True)
        with args.profile.open("w") as f:
            for size, batch in zip(args.sizes, batches):
                for model in args.models:
                    table = profile_train_step(model, size, batch, device, compile=args.compile)
                    f.write(f"## {model} {size}² b{batch}\n{table}\n\n")
                    print(f"## {model} {size}² b{batch}\n{table}", flush=True)
    print()
    print(format_table(results))
    if args.out:
        _save(args.out, described, results)
        plot_results(results, args.out.with_suffix(".png"), title=f"{name} · {date.today()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
