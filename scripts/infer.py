#!/usr/bin/env python
"""Segment NIfTI volumes or 2D pictures with a VM-UNet checkpoint; see ``python scripts/infer.py --help``.

    python scripts/infer.py imagesTs/ --checkpoint best.pth --out preds/ --tta --probabilities
    python scripts/infer.py slide.tif --checkpoint best.pth --out slide_mask.png --overlay --device cuda
"""
import sys

from vm_unet.inference.cli import main

if __name__ == "__main__":
    sys.exit(main())
