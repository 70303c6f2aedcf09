#!/usr/bin/env python
"""Train VM-UNet. No arguments: a couple of minutes on CPU with synthetic lesions (configs/synthetic.yaml).

    python scripts/train.py
    python scripts/train.py --config isic --data-root /data/ISIC2018 --device cuda
    torchrun --nproc_per_node 4 scripts/train.py --config isic --data-root /data/ISIC2018
    python scripts/train.py --resume runs/<run>          # continue exactly where it stopped
"""
import sys

from vm_unet.training.cli import run_cli, train_main

if __name__ == "__main__":
    sys.exit(run_cli(train_main))
