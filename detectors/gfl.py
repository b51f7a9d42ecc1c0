"""GFL (Li et al., "Generalized Focal Loss", V1) as mmdetection's ``GFLHead`` defines it (DETECTORS.md).

Boxes are distributions: each of the 4 side distances (in stride units) has ``reg_max + 1`` bin
logits; the distance is the expectation of the softmax over bins 0..reg_max (:func:`integral`).
The class score is the joint class-and-quality score trained by Quality Focal Loss. Assignment
is ATSS (:mod:`detectors.atss`); losses QFL, DFL and GIoU (:mod:`detectors.losses`).

Head: two towers of ``head_convs`` × [3×3 conv without bias, GroupNorm, ReLU] shared across
levels; ``gfl_cls`` (K channels) and ``gfl_reg`` (4·(reg_max+1)); one learnable ``Scale`` per level
on the regression logits. One square anchor of side 8·stride per location, centred at
(j·stride, i·stride); only ATSS uses the anchor box, regression uses its centre.

This file is the whole family: ``GFLConfig`` (its keys and mmdetection's defaults), the head, and
``GFL``, the model (matching, losses, box decoding); detectors/zoo.py registers it as "gfl".
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops.misc import Conv2dNormActivation

from detectors.atss import ATSS_TOPK, atss_assign, box_centers
from detectors.backbone import group_norm
from detectors.config import DetectorConfig
from detectors.detector import IGNORE, Detector, DetectorOutput, build_backbone, flatten_levels
from detectors.losses import (aligned_box_iou, distribution_focal_loss, giou_loss, mean_over_ranks,
                              quality_focal_loss)
from store.schema import STRIDES

# Anchor side in strides (mmdetection's octave_base_scale with one scale per octave).
ANCHOR_SCALE = 8
# Target distances are clamped to [0, reg_max - DFL_TARGET_EPS] so that the right bin exists.
DFL_TARGET_EPS = 0.1


@dataclass(frozen=True, kw_only=True)
class GFLConfig(DetectorConfig):
    """GFL's keys on top of the shared ones; defaults are mmdetection's ``gfl_r50_fpn_1x_coco``."""

    family: ClassVar[str] = "gfl"
    relu_before_p7: bool = False             # mmdetection's neck: no ReLU between P6 and P7
    nms_thresh: float = 0.6
    detections_per_img: int = 100
    reg_max: int = 16                        # bins per side = reg_max + 1
    atss_topk: int = ATSS_TOPK               # ATSS candidates per level and GT
    qfl_weight: float = 1.0
    dfl_weight: float = 0.25
    giou_weight: float = 2.0


def gfl_anchor_generator(strides: tuple[int, ...] = STRIDES) -> AnchorGenerator:
    """One square anchor of side ANCHOR_SCALE·stride per location and level."""
    return AnchorGenerator(tuple((ANCHOR_SCALE * s,) for s in strides), ((1.0,),) * len(strides))


def integral(box_logits: Tensor, reg_max: int) -> Tensor:
    """Distribution logits (..., 4*(reg_max+1)) -> expected side distances (..., 4) in bins (stride units)."""
    probs = F.softmax(box_logits.reshape(*box_logits.shape[:-1], 4, reg_max + 1), dim=-1)  # (..., 4, R+1)
    bins = torch.arange(reg_max + 1, dtype=probs.dtype, device=probs.device)
    return probs @ bins  # (..., 4)


def distance2bbox(points_xy: Tensor, distances_ltrb: Tensor) -> Tensor:
    """Points (M, 2) and distances to the left, top, right, bottom sides (M, 4) -> boxes (M, 4) xyxy."""
    return torch.cat([points_xy - distances_ltrb[:, :2], points_xy + distances_ltrb[:, 2:]], dim=1)


def bbox2distance(points_xy: Tensor, boxes_xyxy: Tensor, max_distance: float) -> Tensor:
    """Points (M, 2) and boxes (M, 4) -> side distances (M, 4) ltrb clamped to [0, max_distance]."""
    distances = torch.cat([points_xy - boxes_xyxy[:, :2], boxes_xyxy[:, 2:] - points_xy], dim=1)
    return distances.clamp(min=0, max=max_distance)


class Scale(nn.Module):
    """A learnable scalar that multiplies its input (one per level on the regression logits)."""

    def __init__(self, value: float = 1.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(value)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


class GFLHead(nn.Module):
    """Shared GFL head; ``forward(features)`` -> per level cls logits (N, K, H, W), box logits (N, 4(R+1), H, W).

    GroupNorm groups: ``gcd(32, channels)`` (32 for 256 channels, as mmdetection).
    Init: convs normal(0, 0.01), cls bias −log(0.99/0.01), reg bias 0.
    """

    def __init__(self, in_channels: int, num_classes: int, reg_max: int = 16, num_convs: int = 4,
                 num_levels: int = len(STRIDES), prior_probability: float = 0.01) -> None:
        super().__init__()
        if num_convs < 1:
            raise ValueError(f"GFL head_convs must be >= 1, got {num_convs}")

        def tower() -> nn.Sequential:
            return nn.Sequential(*[Conv2dNormActivation(in_channels, in_channels, kernel_size=3,
                                                        norm_layer=group_norm) for _ in range(num_convs)])

        self.cls_convs = tower()
        self.reg_convs = tower()
        self.gfl_cls = nn.Conv2d(in_channels, num_classes, kernel_size=3, padding=1)
        self.gfl_reg = nn.Conv2d(in_channels, 4 * (reg_max + 1), kernel_size=3, padding=1)
        self.scales = nn.ModuleList([Scale(1.0) for _ in range(num_levels)])
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.01)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.constant_(self.gfl_cls.bias, -math.log((1 - prior_probability) / prior_probability))

    def forward(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        if len(features) != len(self.scales):
            raise ValueError(f"GFL head built for {len(self.scales)} levels got {len(features)}")
        cls_logits = [self.gfl_cls(self.cls_convs(f)) for f in features]
        box_logits = [scale(self.gfl_reg(self.reg_convs(f))) for f, scale in zip(features, self.scales)]
        return cls_logits, box_logits


class GFL(Detector):
    """GFL on a ResNet-FPN P3–P7 backbone; components default to the config's standard build."""

    config_class = GFLConfig

    def __init__(self, config: GFLConfig, backbone: nn.Module | None = None,
                 head: nn.Module | None = None) -> None:
        self.check_config(config)
        if backbone is None:
            backbone = build_backbone(config)
        if head is None:
            head = GFLHead(config.fpn_channels, config.num_classes, config.reg_max, config.head_convs)
        super().__init__(config, backbone, gfl_anchor_generator(self.strides), head)
        self.reg_max = config.reg_max

    def match(self, anchors_xyxy: Tensor, num_anchors_per_level: list[int],
              gt_boxes_xyxy: Tensor) -> dict[str, Tensor]:
        """ATSS: ``matched_gt`` (A,) and the per-GT ``atss_threshold`` (n_gt,)."""
        result = atss_assign(anchors_xyxy, num_anchors_per_level, gt_boxes_xyxy, self.config.atss_topk)
        return {"matched_gt": result.matched_gt, "atss_threshold": result.thresholds}

    def compute_losses(self, out: DetectorOutput, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """``qfl``, ``dfl``, ``giou``, weighted and normalised as DETECTORS.md.

        N_pos = Σ_images max(1, positives); w_i = max_k σ(z_ik) (detached) of positive i;
        W = max(1, Σ w_i); both averaged over ranks under torch.distributed.
        qfl = qfl_weight · Σ_valid anchors QFL / N_pos (IoU of the detached decoded box as quality);
        giou = giou_weight · Σ w_i (1 − GIoU_i) / W; dfl = dfl_weight · Σ w_i · mean_sides DFL / W;
        boxes and distances in stride units.
        """
        config, reg_max = self.config, self.reg_max
        cls_logits = flatten_levels(out.cls_logits, 1)  # (N, A_total, K)
        box_logits = flatten_levels(out.box_outputs, 1)  # (N, A_total, 4*(R+1))
        anchors = torch.cat(out.anchors)  # (A_total, 4)
        strides = torch.cat([a.new_full((a.shape[0],), s) for a, s in zip(out.anchors, out.strides)])  # (A_total,)
        centers = box_centers(anchors) / strides[:, None]  # (A_total, 2) stride units
        matched_gt = torch.stack([a["matched_gt"] for a in out.assignment])  # (N, A_total)

        image_index, anchor_index = torch.where(matched_gt >= 0)  # (P,) each, image-major
        gt_index = matched_gt[image_index, anchor_index]  # (P,)
        gt_boxes = torch.cat([t["boxes"].to(anchors) for t in targets])  # (sum n_gt, 4) pixels
        gt_labels = torch.cat([t["labels"].to(matched_gt) for t in targets])  # (sum n_gt,)
        gt_offsets = torch.tensor([0] + [len(t["labels"]) for t in targets[:-1]], device=anchors.device).cumsum(0)
        gt_flat = gt_offsets[image_index] + gt_index  # (P,) rows of gt_boxes
        gt_boxes_su = gt_boxes[gt_flat] / strides[anchor_index, None]  # (P, 4) stride units

        positive_logits = box_logits[image_index, anchor_index]  # (P, 4*(R+1))
        positive_centers = centers[anchor_index]  # (P, 2)
        pred_boxes_su = distance2bbox(positive_centers, integral(positive_logits, reg_max))  # (P, 4)
        weights = cls_logits[image_index, anchor_index].detach().sigmoid().amax(dim=1)  # (P,)
        quality = aligned_box_iou(pred_boxes_su.detach(), gt_boxes_su)  # (P,)

        num_positive_per_image = (matched_gt >= 0).sum(dim=1).clamp(min=1)  # (N,)
        num_positive = mean_over_ranks(num_positive_per_image.sum().float()).clamp(min=1)
        weight_sum = mean_over_ranks(weights.sum()).clamp(min=1)

        labels = torch.full_like(matched_gt, -1)  # (N, A_total): class of positives, -1 otherwise
        labels[image_index, anchor_index] = gt_labels[gt_flat]
        quality_map = torch.zeros(matched_gt.shape, dtype=quality.dtype, device=quality.device)
        quality_map[image_index, anchor_index] = quality
        valid = matched_gt != IGNORE  # (N, A_total)
        qfl = quality_focal_loss(cls_logits[valid], labels[valid], quality_map[valid]).sum() / num_positive

        if image_index.numel() and bool((weights > 0).any()):
            giou = (giou_loss(pred_boxes_su, gt_boxes_su) * weights).sum() / weight_sum
            target_distances = bbox2distance(positive_centers, gt_boxes_su, reg_max - DFL_TARGET_EPS)  # (P, 4)
            dfl = distribution_focal_loss(positive_logits.reshape(-1, reg_max + 1), target_distances.reshape(-1))
            dfl = (dfl * weights.repeat_interleave(4)).sum() / 4 / weight_sum
        else:  # no positives: zero losses that keep the regression branch in the graph
            giou = dfl = box_logits.sum() * 0
        return {"qfl": config.qfl_weight * qfl, "dfl": config.dfl_weight * dfl, "giou": config.giou_weight * giou}

    def decode_boxes(self, box_rows: Tensor, anchors_xyxy: Tensor, stride: int) -> Tensor:
        """Distribution logits (n, 4*(R+1)) at anchors (n, 4) -> boxes (n, 4) xyxy pixels."""
        return distance2bbox(box_centers(anchors_xyxy), integral(box_rows, self.reg_max) * stride)
