"""GFL's loss functions (Li et al., "Generalized Focal Loss"), as mmdetection's gfocal_loss.py / iou_loss.py.

Element-wise functions: the detector (``detectors.gfl.GFL.compute_losses``) applies the weights
and the normalisations of DETECTORS.md (N_pos, w_i, W).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import generalized_box_iou_loss


def quality_focal_loss(logits: Tensor, labels: Tensor, quality: Tensor, beta: float = 2.0) -> Tensor:
    """QFL per anchor, summed over classes: (M, K) logits, (M,) labels, (M,) quality -> (M,).

    Every class: BCE(z, 0)·σ(z)^β; the GT class of a positive (label in [0, K)) instead gets
    BCE(z, y)·|y − σ(z)|^β with y its quality target (IoU). Negatives have label -1.
    The modulating factors are not detached (as mmdetection).
    """
    probs = logits.sigmoid()  # (M, K)
    loss = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none") * probs.pow(beta)
    positive = torch.where(labels >= 0)[0]  # (P,)
    if positive.numel():
        positive_labels = labels[positive]
        positive_logits = logits[positive, positive_labels]  # (P,)
        positive_quality = quality[positive].to(logits.dtype)
        factor = (positive_quality - probs[positive, positive_labels]).abs().pow(beta)
        loss = loss.index_put((positive, positive_labels), F.binary_cross_entropy_with_logits(
            positive_logits, positive_quality, reduction="none") * factor)
    return loss.sum(dim=1)


def distribution_focal_loss(logits: Tensor, target: Tensor) -> Tensor:
    """DFL per distribution: (M, reg_max+1) bin logits, (M,) target distance in [0, reg_max) -> (M,).

    (right − y)·CE(left) + (y − left)·CE(right) with left = ⌊y⌋, right = left + 1.
    """
    left = target.long()
    right = left + 1
    weight_left = right.to(target.dtype) - target
    weight_right = target - left.to(target.dtype)
    return (F.cross_entropy(logits, left, reduction="none") * weight_left
            + F.cross_entropy(logits, right, reduction="none") * weight_right)


def giou_loss(pred_boxes_xyxy: Tensor, target_boxes_xyxy: Tensor, eps: float = 1e-7) -> Tensor:
    """1 − GIoU of aligned boxes (M, 4), (M, 4) -> (M,)."""
    return generalized_box_iou_loss(pred_boxes_xyxy, target_boxes_xyxy, reduction="none", eps=eps)


def mean_over_ranks(value: Tensor) -> Tensor:
    """Mean of a scalar over torch.distributed ranks (itself when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value)
        value = value / dist.get_world_size()
    return value


def aligned_box_iou(boxes1_xyxy: Tensor, boxes2_xyxy: Tensor, eps: float = 1e-6) -> Tensor:
    """IoU of aligned boxes (M, 4), (M, 4) -> (M,), union clamped to ``eps`` (as mmdetection)."""
    top_left = torch.maximum(boxes1_xyxy[:, :2], boxes2_xyxy[:, :2])
    bottom_right = torch.minimum(boxes1_xyxy[:, 2:], boxes2_xyxy[:, 2:])
    intersection = (bottom_right - top_left).clamp(min=0).prod(dim=1)
    area1 = (boxes1_xyxy[:, 2:] - boxes1_xyxy[:, :2]).prod(dim=1)
    area2 = (boxes2_xyxy[:, 2:] - boxes2_xyxy[:, :2]).prod(dim=1)
    return intersection / (area1 + area2 - intersection).clamp(min=eps)
