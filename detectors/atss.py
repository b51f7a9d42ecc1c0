"""ATSS assignment (Zhang et al., "Bridging the Gap Between Anchor-based and Anchor-free Detection"),
as mmdetection's ``ATSSAssigner`` (topk 9) that GFL and LD use.

For one image:
1. IoU of every anchor with every GT (xyxy, no +1) and the distance from each anchor centre to
   each GT centre.
2. Per level and per GT, the ``min(topk, anchors on the level)`` anchors with the nearest centres
   are the candidates (up to 5·topk per GT).
3. The GT's threshold is mean + std (unbiased) of its candidates' IoUs.
4. A candidate is positive if its IoU >= the threshold and its centre lies inside the GT (every
   side distance > 0.01).
5. An anchor positive for several GTs goes to the one with the highest IoU.

The per-GT thresholds are also what LD's VLR region needs (DIoU in [0.25·thr, thr)), so
:func:`atss_assign` returns them with the IoU matrix.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from torchvision.ops import box_iou

from detectors.detector import BACKGROUND

# Centre-inside test margin of mmdetection's ATSSAssigner, in pixels.
INSIDE_EPS = 0.01
# Candidates per level and GT (mmdetection's ATSSAssigner topk, as GFL and LD use it).
ATSS_TOPK = 9


class ATSSResult(NamedTuple):
    matched_gt: Tensor   # (A,) long: GT index or BACKGROUND (-1)
    thresholds: Tensor   # (n_gt,) float: mean + std of the candidates' IoUs per GT
    ious: Tensor         # (A, n_gt) float: IoU of each anchor with each GT
    candidates: Tensor   # (n_candidates, n_gt) long: candidate anchor indices per GT, level by level


def box_centers(boxes_xyxy: Tensor) -> Tensor:
    """(n, 4) xyxy -> (n, 2) centres (cx, cy)."""
    return (boxes_xyxy[:, :2] + boxes_xyxy[:, 2:]) / 2


def atss_assign(anchors_xyxy: Tensor, num_anchors_per_level: list[int], gt_boxes_xyxy: Tensor,
                topk: int = ATSS_TOPK) -> ATSSResult:
    """Assigns anchors (A, 4) (levels concatenated, ``num_anchors_per_level`` each) to GTs (n_gt, 4)."""
    num_anchors, num_gt = anchors_xyxy.shape[0], gt_boxes_xyxy.shape[0]
    if sum(num_anchors_per_level) != num_anchors:
        raise ValueError(f"num_anchors_per_level sums to {sum(num_anchors_per_level)}, not {num_anchors}")
    matched_gt = torch.full((num_anchors,), BACKGROUND, dtype=torch.long, device=anchors_xyxy.device)
    ious = box_iou(anchors_xyxy, gt_boxes_xyxy)  # (A, n_gt)
    if num_gt == 0 or num_anchors == 0:
        empty = anchors_xyxy.new_zeros((0, num_gt), dtype=torch.long)
        return ATSSResult(matched_gt, ious.new_zeros((num_gt,)), ious, empty)

    anchor_centers = box_centers(anchors_xyxy)  # (A, 2)
    offsets = anchor_centers[:, None, :] - box_centers(gt_boxes_xyxy)[None, :, :]  # (A, n_gt, 2)
    distances = offsets.pow(2).sum(-1).sqrt()  # (A, n_gt), exact (cdist's matmul path rounds differently)
    candidates, start = [], 0
    for level_count in num_anchors_per_level:
        if level_count:
            k = min(topk, level_count)
            _, nearest = distances[start:start + level_count].topk(k, dim=0, largest=False)  # (k, n_gt)
            candidates.append(nearest + start)
        start += level_count
    candidates = torch.cat(candidates)  # (n_candidates, n_gt)
    candidate_ious = ious.gather(0, candidates)  # (n_candidates, n_gt)
    thresholds = candidate_ious.mean(0) + candidate_ious.std(0)  # (n_gt,) std is unbiased
    is_positive = candidate_ious >= thresholds  # (n_candidates, n_gt)

    centers = anchor_centers[candidates]  # (n_candidates, n_gt, 2)
    side_distances = torch.cat([centers - gt_boxes_xyxy[:, :2], gt_boxes_xyxy[:, 2:] - centers], dim=-1)
    is_positive &= side_distances.amin(dim=-1) > INSIDE_EPS

    positive_ious = torch.full_like(ious, -1.0)  # (A, n_gt): IoU where positive, -1 elsewhere
    gt_index = torch.arange(num_gt, device=ious.device).expand_as(candidates)
    positive_ious[candidates[is_positive], gt_index[is_positive]] = candidate_ious[is_positive]
    best_iou, best_gt = positive_ious.max(dim=1)  # (A,)
    matched_gt = torch.where(best_iou >= 0, best_gt, matched_gt)
    return ATSSResult(matched_gt, thresholds, ious, candidates)
