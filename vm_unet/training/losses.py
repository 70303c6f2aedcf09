"""Segmentation losses on logits, computed in fp32 so they are safe under bf16/fp16 autocast.

Binary (1 channel): BCE-with-logits + soft Dice (MONAI ``DiceLoss(sigmoid=True)``).
Multi-class: cross-entropy + soft Dice over softmax (MONAI ``DiceCELoss``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss, DiceLoss
from torch import nn


class SegLoss(nn.Module):
    def __init__(self, num_classes: int, ce_weight: float = 1.0, dice_weight: float = 1.0):
        super().__init__()
        self.num_classes, self.ce_weight, self.dice_weight = num_classes, float(ce_weight), float(dice_weight)
        if num_classes == 1:
            self.dice = DiceLoss(sigmoid=True, smooth_nr=1e-5, smooth_dr=1e-5)
        else:
            self.dicece = DiceCELoss(softmax=True, to_onehot_y=True, lambda_ce=self.ce_weight,
                                     lambda_dice=self.dice_weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``logits`` (B, C, H, W); ``target`` (B, H, W) class indices."""
        with torch.autocast(device_type=logits.device.type, enabled=False):
            logits = logits.float()
            if self.num_classes == 1:
                t = target.unsqueeze(1).float()
                return (self.ce_weight * F.binary_cross_entropy_with_logits(logits, t)
                        + self.dice_weight * self.dice(logits, t))
            return self.dicece(logits, target.unsqueeze(1))
