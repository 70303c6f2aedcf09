"""``scripts/infer.py``: segment NIfTI volumes and 2D pictures (one file or a folder) with a VM-UNet checkpoint.

Exit status: 0 when every input was segmented, 1 when any input or the setup failed (each failure is one line
on stderr, no traceback; ``--debug`` shows tracebacks), 2 for command-line usage errors, 130 on Ctrl-C.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

from vm_unet.errors import UserError

from .io import (InputError, atomic_output, case_name, check_writable_dir, input_kind, label_volume_like,
                 list_inputs, prob_volume_like, save_json)

__all__ = ["build_parser", "main", "run"]

CHECKPOINT_KINDS = {"volume_slices": "volume", "image2d": "image"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="infer.py",
        description="Segment NIfTI volumes (.nii/.nii.gz, slice by slice) or 2D pictures (PNG/JPG/BMP/TIFF, 8/16-bit, "
                    "any size) with a VM-UNet checkpoint. INPUT may be a file or a folder of files.")
    p.add_argument("input", type=Path, help="file or folder (not recursive)")
    p.add_argument("--checkpoint", "-c", type=Path, required=True, help="checkpoint written by vm_unet training")
    p.add_argument("--out", "-o", type=Path, required=True,
                   help="output folder, or for a single input an output file (.nii.gz/.nii for volumes, .png for images)")
    p.add_argument("--axis", type=int, choices=(0, 1, 2), default=None,
                   help="slicing axis of the volume (in the checkpoint's orientation); default: the checkpoint's")
    p.add_argument("--mode", choices=("auto", "window", "resize"), default="auto",
                   help="window: native resolution, sliding windows of the training size (default); resize: whole "
                        "slice/image resized to the training size like the trainer does; auto: the checkpoint's "
                        "preprocessing.inference_mode if set, else window")
    p.add_argument("--tta", action="store_true", help="average over horizontal/vertical flips (4x slower)")
    p.add_argument("--probabilities", action="store_true",
                   help="also write probabilities: float32 NIfTI for volumes, 8-bit PNG(s) for images")
    p.add_argument("--overlay", action="store_true", help="images: also write <name>_overlay.png")
    p.add_argument("--overlap", type=float, default=0.25, help="sliding-window overlap fraction (default 0.25)")
    p.add_argument("--sw-batch-size", type=int, default=None,
                   help="windows (or slices) per forward pass (default 32 on GPU, 4 on CPU)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 ...")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="auto: bf16 autocast on GPUs that support it, fp32 on CPU")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the network: faster on GPUs (BENCHMARKS.md) after a compile of about a "
                        "minute per window shape; worth it for many or large inputs")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="--compile and replay the network as CUDA graphs (CUDA only): removes the kernel-launch cost "
                        "that dominates small --sw-batch-size (5x at batch 1, BENCHMARKS.md)")
    p.add_argument("--max-band-mb", type=float, default=1024.0,
                   help="images: CPU memory for the float buffers of one band of rows (default 1024)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars or per-case lines")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    return p


def _err(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr, flush=True)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:400] if text else type(e).__name__


def _out_paths(src: Path, kind: str, out: Path, single_file_target: bool, n_out: int, class_names) -> dict:
    """Where each output of ``src`` goes: ``labels``, ``probs`` (list), ``overlay``."""
    if single_file_target:
        name = out.name
        suffix = ".nii.gz" if name.lower().endswith(".nii.gz") else out.suffix
        stem, parent = name[: -len(suffix)], out.parent
    else:
        stem, parent = case_name(src), out
        suffix = (".nii" if src.name.lower().endswith(".nii") else ".nii.gz") if kind == "volume" else ".png"
    paths = {"labels": parent / f"{stem}{suffix}"}
    if kind == "volume":
        paths["probs"] = [parent / f"{stem}_probs{suffix}"]
        paths["overlay"] = None
    else:
        paths["probs"] = ([parent / f"{stem}_prob.png"] if n_out == 1
                          else [parent / f"{stem}_prob_{_safe(n)}.png" for n in class_names])
        paths["overlay"] = parent / f"{stem}_overlay.png"
    return paths


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in str(name)) or "class"


def _describe(summary: dict) -> str:
    unit = "ml" if summary["kind"] == "volume" else "pixels"
    parts = [f"{n} {v[unit]:g} {unit}" if unit == "ml" else f"{n} {v[unit]} px"
             for n, v in list(summary["classes"].items())[1:]]  # background is the rest
    return ", ".join(parts)


def _segment_one(src: Path, kind: str, predictor, args, paths: dict) -> dict:
    import numpy as np
    from PIL import Image

    from .image2d import mask_for_png, overlay_rgb, segment_image
    from .io import _no_pixel_limit

    t0 = time.perf_counter()
    progress = not args.quiet
    with contextlib.ExitStack() as stack:  # every output of the case is renamed into place only if all succeed
        if kind == "volume":
            from .volume import segment_volume

            res = segment_volume(src, predictor, axis=args.axis, probabilities=args.probabilities, progress=progress)
            import nibabel as nib

            nib.save(label_volume_like(res.labels, res.img), str(stack.enter_context(atomic_output(paths["labels"]))))
            written = [paths["labels"]]
            if args.probabilities:
                nib.save(prob_volume_like(res.probs, res.img),
                         str(stack.enter_context(atomic_output(paths["probs"][0]))))
                written += paths["probs"]
        else:
            res = segment_image(src, predictor, probabilities=args.probabilities, progress=progress,
                                max_band_mb=args.max_band_mb)
            with _no_pixel_limit():
                Image.fromarray(mask_for_png(res.labels, predictor.binary)).save(
                    stack.enter_context(atomic_output(paths["labels"])), format="PNG", compress_level=1)
                written = [paths["labels"]]
                if args.probabilities:
                    for c, dest in enumerate(paths["probs"]):
                        Image.fromarray(np.ascontiguousarray(res.probs[..., c])).save(
                            stack.enter_context(atomic_output(dest)), format="PNG", compress_level=1)
                    written += paths["probs"]
                if args.overlay:
                    Image.fromarray(overlay_rgb(res.image, res.full_scale, res.labels)).save(
                        stack.enter_context(atomic_output(paths["overlay"])), format="PNG", compress_level=1)
                    written.append(paths["overlay"])
    summary = dict(res.summary)
    summary["outputs"] = [str(p) for p in written]
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    return summary


def run(args: argparse.Namespace) -> int:
    import torch

    from vm_unet.checkpoint import load_checkpoint

    from .predictor import Predictor, resolve_device

    device = resolve_device(args.device)
    inputs = list_inputs(args.input)
    single = args.input.is_file()
    out_lower = args.out.name.lower()
    single_file_target = single and (out_lower.endswith((".nii", ".nii.gz", ".png")))
    if not single and out_lower.endswith((".nii", ".nii.gz", ".png")) and not args.out.is_dir():
        raise InputError(f"{args.out}: INPUT is a folder, so --out must be a folder, not a file name")
    check_writable_dir(args.out.parent if single_file_target else args.out)

    model, meta = load_checkpoint(args.checkpoint, device="cpu")
    pre = meta.get("preprocessing") or {}
    ck_kind = CHECKPOINT_KINDS.get(pre.get("input"))
    if ck_kind is None:
        raise InputError(f"{args.checkpoint}: checkpoint preprocessing.input is {pre.get('input')!r}; "
                         f"expected one of {', '.join(CHECKPOINT_KINDS)}")
    if single_file_target:
        want = ".png" if ck_kind == "image" else ".nii/.nii.gz"
        if (ck_kind == "image") != out_lower.endswith(".png"):
            raise InputError(f"{args.out}: output for this checkpoint's {ck_kind} inputs must end in {want}")
    mode = pre.get("inference_mode", "window") if args.mode == "auto" else args.mode
    amp = {"auto": None, "fp32": False, "bf16": True}[args.precision]
    if args.sw_batch_size is None:
        args.sw_batch_size = 32 if device.type == "cuda" else 4
    predictor = Predictor(model, meta, device, mode=mode, tta=args.tta, overlap=args.overlap,
                          sw_batch_size=args.sw_batch_size, amp=amp, compile=args.compile,
                          cuda_graphs=args.cuda_graphs)
    if args.axis is not None and ck_kind != "volume":
        raise InputError("--axis applies to volume checkpoints only")
    if args.overlay and ck_kind == "volume":
        raise InputError("--overlay applies to 2D images only")
    if not args.quiet:
        print(f"checkpoint {args.checkpoint.name}: {meta.get('model_name')} for {ck_kind}s, {predictor.in_chans} "
              f"channel(s), classes {predictor.class_names}, training size {predictor.image_size}; "
              f"device {device}, mode {mode}{', TTA' if args.tta else ''}", flush=True)
        if predictor.compiled:
            print(f"{'--cuda-graphs' if args.cuda_graphs else '--compile'}: the first batch compiles the network "
                  "(about a minute, once per window shape)", flush=True)
        if args.mode == "auto" and "inference_mode" not in pre:
            print("note: window mode runs the network at the input's native resolution; if the model was trained "
                  "on whole images/slices resized to the training size, use --mode resize", file=sys.stderr)

    results, failures, taken = [], [], {}
    n = len(inputs)
    for i, src in enumerate(inputs, 1):
        try:
            kind = input_kind(src)
            if kind != ck_kind:
                raise InputError(f"{src}: is a {'NIfTI volume' if kind == 'volume' else '2D image'} but the "
                                 f"checkpoint segments {ck_kind}s")
            paths = _out_paths(src, kind, args.out, single_file_target, predictor.n_out, predictor.class_names)
            for p in [paths["labels"], *paths["probs"], paths["overlay"]]:
                if p is None:
                    continue
                if p.resolve() == src.resolve():
                    raise InputError(f"{src}: output {p} would overwrite the input; choose another --out")
                if p in taken:
                    raise InputError(f"{src}: output {p} is also the output of {taken[p]}; rename one input")
            for p in [paths["labels"], *paths["probs"], paths["overlay"]]:
                if p is not None:
                    taken[p] = src
            summary = _segment_one(src, kind, predictor, args, paths)
            results.append(summary)
            if not args.quiet:
                print(f"[{i}/{n}] {src.name} -> {paths['labels']}  {_describe(summary)}  ({summary['seconds']:.1f} s)",
                      flush=True)
        except KeyboardInterrupt:
            raise
        except UserError as e:
            failures.append({"input": str(src), "error": _one_line(e)})
            _err(_one_line(e))
        except torch.cuda.OutOfMemoryError:
            if args.debug:
                raise
            failures.append({"input": str(src), "error": f"{src}: out of GPU memory; lower --sw-batch-size"})
            _err(failures[-1]["error"])
            torch.cuda.empty_cache()
        except Exception as e:  # keep a folder run going; the message names the file
            if args.debug:
                raise
            failures.append({"input": str(src), "error": f"{src}: {type(e).__name__}: {_one_line(e)}"})
            _err(failures[-1]["error"])
    if not single_file_target:
        save_json({"checkpoint": str(args.checkpoint), "model": meta.get("model_name"), "device": str(device),
                   "mode": mode, "tta": args.tta, "cases": results, "failures": failures},
                  args.out / "summary.json")
    if failures:
        print(f"{len(failures)} of {n} input(s) failed:", file=sys.stderr)
        for f in failures:
            print(f"  {f['error']}", file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except KeyboardInterrupt:
        _err("interrupted")
        return 130
    except UserError as e:
        if args.debug:
            raise
        _err(_one_line(e))
        return 1
    except Exception as e:  # setup failures outside any user input: still one line unless --debug
        if args.debug:
            raise
        _err(f"{type(e).__name__}: {_one_line(e)} (run with --debug for the traceback)")
        return 1


def entry() -> None:
    """Console-script entry point (``vm-unet-infer``)."""
    sys.exit(main())
