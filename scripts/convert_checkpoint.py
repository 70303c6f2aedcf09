#!/usr/bin/env python
"""Convert an official VMamba v0 ImageNet checkpoint or a published VM-UNet checkpoint into a vm_unet checkpoint.

    python scripts/convert_checkpoint.py vmamba_small_e238_ema.pth vmunet_isic_init.pth --model vmunet_isic
    python scripts/convert_checkpoint.py best.pth isic18.pth --model vmunet_isic --class-names background lesion \\
        --preprocessing published

Prints the loaded / missing / unexpected keys and writes a self-describing checkpoint
(``vm_unet.checkpoint.load_checkpoint`` / the training ``--init`` option read it).

Preprocessing recorded in the output (``--preprocessing``):
  imagenet   (default) ``(img/255 - ImageNet mean) / ImageNet std``: what the VMamba encoders were trained with.
  published  the published VM-UNet pipeline feeds images in 0..255 after a per-image min-max stretch; recorded as
             mean 0 / std 1/255 (identity on 0..255), which equals it for images that span 0..255.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import vm_unet
from vm_unet.checkpoint import save_checkpoint
from vm_unet.errors import UserError
from vm_unet.integrations._backbone import IMAGENET_MEAN, IMAGENET_STD
from vm_unet.models import model_config
from vm_unet.weights import load_pretrained


def _value(text: str):
    """--set values: ints, floats, comma lists of them, else the string."""
    def one(s: str):
        for cast in (int, float):
            try:
                return cast(s)
            except ValueError:
                pass
        return s
    return [one(s) for s in text.split(",")] if "," in text else one(text)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("input", type=Path, help="VMamba v0 (.pth, keys under 'model') or published VM-UNet checkpoint")
    p.add_argument("output", type=Path, help="vm_unet checkpoint to write")
    p.add_argument("--model", default="vmunet_isic", help=f"model name ({', '.join(vm_unet.list_models())})")
    p.add_argument("--in-chans", type=int, default=3)
    p.add_argument("--num-classes", type=int, default=1)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="model overrides, e.g. depths=2,2,9,2 drop_path_rate=0.3")
    p.add_argument("--key", default=None, help="checkpoint entry holding the weights (e.g. model_ema)")
    p.add_argument("--no-decoder-init", action="store_true",
                   help="VMamba checkpoints: leave the decoder random instead of the published mirrored init")
    p.add_argument("--class-names", nargs="*", default=None)
    p.add_argument("--image-size", type=int, nargs=2, default=[256, 256], metavar=("H", "W"))
    p.add_argument("--preprocessing", choices=("imagenet", "published"), default="imagenet")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        overrides = {}
        for item in args.set:
            if "=" not in item:
                raise UserError(f"--set expects KEY=VALUE, got {item!r}")
            k, v = item.split("=", 1)
            overrides[k] = _value(v)
        kwargs = model_config(args.model, args.in_chans, args.num_classes, **overrides)
        model = vm_unet.create_model(args.model, **kwargs)
        report = load_pretrained(model, args.input, init_decoder=not args.no_decoder_init, key=args.key)
        print(report.summary(max_groups=40))
        if args.preprocessing == "imagenet":
            mean, std = list(IMAGENET_MEAN), list(IMAGENET_STD)
        else:
            mean, std = [0.0, 0.0, 0.0], [1 / 255] * 3
        if args.in_chans != 3:  # grey inputs: one statistic per channel (the mean of the RGB ones)
            mean, std = [sum(mean) / 3] * args.in_chans, [sum(std) / 3] * args.in_chans
        names = args.class_names or (["background", "foreground"] if args.num_classes == 1
                                     else [f"class_{i}" for i in range(args.num_classes)])
        preprocessing = {"input": "image2d", "image_size": list(args.image_size), "in_chans": args.in_chans,
                         "normalize": {"mean": mean, "std": std, "max_pixel_value": 255.0}, "threshold": 0.5}
        extra = {"converted_from": str(args.input), "source_format": report.source_format,
                 "loaded": len(report.loaded), "missing": report.missing, "unexpected": len(report.unexpected),
                 "adapted": report.adapted}
        save_checkpoint(args.output, model, model_name=args.model, model_kwargs=kwargs, preprocessing=preprocessing,
                        class_names=names, extra=extra)
        print(f"wrote {args.output}")
        return 0
    except (UserError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
