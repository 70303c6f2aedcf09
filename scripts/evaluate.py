#!/usr/bin/env python
"""Evaluate a checkpoint: per-case CSV, summary JSON (per-image mean and pooled metrics), overlay PNGs.

    python scripts/evaluate.py --checkpoint runs/<run>/best.pt --data-root /data/ISIC2018_test
"""
import sys

from vm_unet.training.cli import evaluate_main, run_cli

if __name__ == "__main__":
    sys.exit(run_cli(evaluate_main))
