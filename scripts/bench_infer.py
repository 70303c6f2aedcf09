#!/usr/bin/env python
"""Inference benchmark: seconds per BraTS-size volume (240x240x155) and per 4096² / 16384² RGB image, with peak
GPU memory and peak CPU RSS. Each case runs in a fresh subprocess so the peaks belong to that case alone.

    python scripts/bench_infer.py                                 # GPU if available, published ISIC config
    python scripts/bench_infer.py --cases volume img4096 --tiny   # CPU-friendly widths
    python scripts/bench_infer.py --json results.json

Inputs are synthetic (random smooth structure) and written as real files, so the timings include reading and
writing, as a user sees them; "segment" is the model + stitching part alone.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = {"volume": "BraTS-size volume 240x240x155", "img4096": "RGB 4096x4096", "img16384": "RGB 16384x16384"}
TINY = dict(dims=[8, 16, 32, 64], depths=[1, 1, 1, 1], depths_decoder=[1, 1, 1, 1])


def _smooth_noise(h, w, c, seed=0):
    """Blobby test picture without a full-size float temporary (built from an upsampled low-res field)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, (max(2, h // 256), max(2, w // 256), c), dtype=np.uint8)
    Image.MAX_IMAGE_PIXELS = None
    im = Image.fromarray(low if c == 3 else low[..., 0]).resize((w, h), Image.BILINEAR)
    return im


def _make_checkpoint(path, args, kind):
    import torch

    import vm_unet
    from vm_unet.checkpoint import save_checkpoint

    kw = dict(TINY) if args.tiny else {}
    in_chans, num_classes = (1, 5) if kind == "volume" else (3, 1)
    torch.manual_seed(0)
    model = vm_unet.create_model(args.model, in_chans, num_classes, **kw)
    pre = ({"input": "volume_slices", "image_size": [args.size, args.size], "in_chans": 1, "axis": 2,
            "intensity": {"mode": "zscore", "nonzero": True}, "reorient": "RAS"} if kind == "volume" else
           {"input": "image2d", "image_size": [args.size, args.size], "in_chans": 3,
            "normalize": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "max_pixel_value": 255.0}})
    names = [f"c{i}" for i in range(num_classes)] if num_classes > 1 else ["background", "lesion"]
    save_checkpoint(path, model, model_name=args.model, model_kwargs={"in_chans": in_chans, "num_classes": num_classes,
                                                                      **kw},
                    preprocessing=pre, class_names=names)
    return sum(p.numel() for p in model.parameters())


def _input_path(folder: Path, case: str) -> Path:
    return folder / ("vol.nii.gz" if case == "volume" else f"{case}.png")


def make_input(folder: Path, case: str) -> None:
    """Write the synthetic input of ``case`` (in the parent process, so it does not count in the case's peak)."""
    import numpy as np

    src = _input_path(folder, case)
    if case == "volume":
        import nibabel as nib

        rng = np.random.default_rng(0)
        vol = rng.normal(0, 1, (240, 240, 155)).astype(np.float32)
        vol[60:180, 60:180, 40:120] += 2
        nib.save(nib.Nifti1Image(vol, np.diag([-1.0, -1.0, 1.0, 1.0])), str(src))  # LPS like BraTS
    else:
        side = 4096 if case == "img4096" else 16384
        _smooth_noise(side, side, 3).save(src, compress_level=1)


def run_case(args) -> dict:
    """One case in this process: build inputs and a checkpoint, run the CLI code path, report the peaks."""
    import numpy as np
    import torch

    from vm_unet.checkpoint import load_checkpoint
    from vm_unet.inference import Predictor, resolve_device, segment_image, segment_volume
    from vm_unet.inference.image2d import mask_for_png
    from vm_unet.inference.io import label_volume_like, save_nifti, save_png

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    tmp = args.workdir
    kind = "volume" if args.case == "volume" else "image"
    n_params = _make_checkpoint(tmp / "m.pth", args, kind)
    src = _input_path(tmp, args.case)

    model, meta = load_checkpoint(tmp / "m.pth")
    pred = Predictor(model, meta, device, mode="window", tta=args.tta, overlap=args.overlap,
                     sw_batch_size=args.sw_batch_size, compile=args.compile, cuda_graphs=args.cuda_graphs)
    if args.pipeline_only:
        # Measures everything but the network (read, normalise, window extraction, gaussian stitching, labels,
        # write) and the CPU memory of the whole-image arrays; reported as such, never as model speed.
        pred.model = torch.nn.Conv2d(pred.in_chans, pred.n_out, 1).to(device).eval()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    cpu0 = sum(getattr(resource.getrusage(resource.RUSAGE_SELF), f) for f in ("ru_utime", "ru_stime"))
    t0 = time.perf_counter()
    if kind == "volume":
        res = segment_volume(src, pred, progress=not args.quiet)
        t1 = time.perf_counter()
        save_nifti(label_volume_like(res.labels, res.img), tmp / "out.nii.gz")
    else:
        res = segment_image(src, pred, progress=not args.quiet, max_band_mb=args.max_band_mb)
        t1 = time.perf_counter()
        save_png(mask_for_png(res.labels, pred.binary), tmp / "out.png")
    if device.type == "cuda":
        torch.cuda.synchronize()
    t2 = time.perf_counter()
    out = {
        "case": args.case, "what": CASES[args.case], "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU x{torch.get_num_threads()}",
        "model": "1x1 conv (pipeline only)" if args.pipeline_only else args.model + (" tiny" if args.tiny else ""), "params": n_params, "window": args.size,
        "sw_batch_size": args.sw_batch_size, "overlap": args.overlap, "tta": args.tta,
        "compile": args.compile or args.cuda_graphs, "cuda_graphs": args.cuda_graphs,
        "amp_bf16": bool(pred.amp), "seconds_total": round(t2 - t0, 2),
        "seconds_segment": round(t1 - t0, 2),  # read + normalise + network + stitching, no output writing
        "peak_gpu_gb": round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 3) if device.type == "cuda" else None,
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2),
        "rss_before_gb": round(rss0, 2),
        # CPU seconds of this process: on a shared machine wall time can be several times the work done
        "cpu_seconds": round(sum(getattr(resource.getrusage(resource.RUSAGE_SELF), f) for f in ("ru_utime", "ru_stime"))
                             - cpu0, 1),
    }
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    p.add_argument("--model", default="vmunet_isic")
    p.add_argument("--tiny", action="store_true", help="widths 8..64, one block per stage (CPU smoke numbers)")
    p.add_argument("--size", type=int, default=256, help="training/window size (default 256)")
    p.add_argument("--pipeline-only", action="store_true",
                   help="replace the network by a 1x1 conv: time and memory of everything around the network")
    p.add_argument("--device", default="auto")
    p.add_argument("--sw-batch-size", type=int, default=None, help="default 32 on GPU, 4 on CPU")
    p.add_argument("--overlap", type=float, default=0.25)
    p.add_argument("--tta", action="store_true")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the network (compile time included; inductor's disk cache shortens reruns)")
    p.add_argument("--cuda-graphs", action="store_true", help="--compile and replay as CUDA graphs (CUDA only)")
    p.add_argument("--max-band-mb", type=float, default=1024.0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--case", choices=list(CASES), help=argparse.SUPPRESS)  # internal: run one case in-process
    p.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)  # internal: where the case's input lies
    args = p.parse_args(argv)
    if args.sw_batch_size is None:
        import torch

        args.sw_batch_size = 32 if (args.device != "cpu" and torch.cuda.is_available()) else 4
    if args.case:
        print("RESULT " + json.dumps(run_case(args)), flush=True)
        return 0
    results = []
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
    # drop --cases and its values; each child gets one --case
    child_args, skip = [], False
    for a in passthrough:
        if a == "--cases":
            skip = True
            continue
        if skip and not a.startswith("--"):
            continue
        skip = False
        child_args.append(a)
    import shutil

    for case in args.cases:
        work = Path(tempfile.mkdtemp(prefix="vmunet-bench-"))
        try:
            make_input(work, case)
            cmd = [sys.executable, __file__, *child_args, "--case", case, "--workdir", str(work),
                   "--sw-batch-size", str(args.sw_batch_size)]
            r = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ})
        finally:
            shutil.rmtree(work, ignore_errors=True)
        lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
        if r.returncode != 0 or not lines:
            print(f"{case}: failed (exit {r.returncode})", file=sys.stderr)
            results.append({"case": case, "error": f"exit {r.returncode}"})
            continue
        res = json.loads(lines[-1][7:])
        results.append(res)
        gpu = f"{res['peak_gpu_gb']:.2f} GB" if res["peak_gpu_gb"] is not None else "-"
        print(f"{res['what']:<30} {res['seconds_total']:>9.2f} s  (segment {res['seconds_segment']:.2f} s)  "
              f"peak GPU {gpu}  peak RSS {res['peak_rss_gb']:.2f} GB  cpu {res['cpu_seconds']:.0f} s  [{res['device_name']}, {res['model']}, "
              f"window {res['window']}, sw_batch {res['sw_batch_size']}, bf16 {res['amp_bf16']}]", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
