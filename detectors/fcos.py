"""FCOS (Tian et al., "FCOS: Fully Convolutional One-Stage Object Detection") as mmdetection's ``FCOSHead`` defines it.

Reference: mmdetection 3.3 ``mmdet/models/dense_heads/fcos_head.py`` (with ``anchor_free_head.py``,
``base_dense_head.py``, ``MlvlPointGenerator``) and the config the FCOS distillation seeds build on,
``configs/fcos/fcos_r50-caffe_fpn_gn-head-center-normbbox-centeronreg-giou_1x_coco.py`` (the
"improved FCOS" of the official FCOS and AdelaiDet code). The defaults of ``FCOSConfig`` are that
variant:

- Points: one per location, at ((j + 0.5)·stride, (i + 0.5)·stride) (``point_offset``). The
  ``DetectorOutput.anchors`` of FCOS are squares of side stride centred on the points.
- Head (weights shared across levels): two towers of ``head_convs`` × [3×3 conv with bias
  (``conv_bias=True``), GroupNorm(32), ReLU]; class logits (K, sigmoid), side distances (4) and
  centerness (1), each a 3×3 conv; centerness on the regression tower (``centerness_on_reg``);
  one learnable ``Scale`` per level on the distances, then ReLU (``norm_on_bbox``: distances in
  stride units). Init: convs normal(0, 0.01), biases 0, class bias −log(0.99/0.01).
- Assignment (``fcos_assign``): a point is positive for a GT if it lies strictly inside the GT's
  centre region (the square of half-side 1.5·stride around the box centre, cut to the box:
  ``center_sampling``) and the largest of its four side distances to the GT lies in its level's
  regress range, both ends included: (−1, 64), (64, 128), (128, 256), (256, 512), (512, 1e8)
  pixels. A point positive for several GTs takes the one of smallest area.
- Losses, over the batch: ``cls`` sigmoid focal loss (α 0.25, γ 2) summed over every valid point
  and class / N_pos; ``box`` GIoU loss weighted by the centerness target / Σ centerness targets;
  ``centerness`` BCE of the centerness logit against sqrt(min(l, r)/max(l, r) · min(t, b)/max(t, b))
  / N_pos; N_pos = max(1, positives) averaged over ranks, as mmdetection's ``reduce_mean``.
- Inference (``score_rule="mmdet"``), per level over the image's valid region: σ(cls) > 0.05, the
  top 1000 (point, class) pairs by σ(cls); score = σ(cls)·σ(centerness) (no square root:
  mmdetection's ``_bbox_post_process``, which marks the paper's sqrt as a TODO; the ranking is the
  same); boxes clipped to the image, boxes with zero width or height dropped (``min_bbox_size=0``),
  class-aware NMS at IoU 0.6, keep 100.

``box_outputs`` hold the side distances (l, t, r, b) in stride units in training and evaluation
alike (mmdetection multiplies them by the stride in eval mode only): the teacher's cached maps and
the student's live maps have one unit. ``DetectorOutput.centerness`` holds the centerness logits,
per level (N, 1, H_l, W_l), laid out as the class logits (a later cache field, ``head.ctr``).

The seeds' FCOS configs are not all that variant. The switches of ``FCOSConfig`` cover them:
MasKD's FCOS student (hunto/MasKD ``mmrazor/configs/distill/maskd/fcos_r101-fcos_r50_coco.py``) puts
the centerness on the classification tower (``centerness_on_reg=False``); its teacher
(``fcos_r101-caffe_fpn_gn-head_ms-640-800-2x``) is the original FCOS, :data:`MMDET_PLAIN_FCOS`
(exp on pixel distances, tower convs without bias, no centre sampling, IoU loss, NMS 0.5). ICD's
FCOS is AdelaiDet's (megvii-research/ICD ``pytorch_release``), the defaults here, but AdelaiDet
ranks its top 1000 by σ(cls)·σ(ctr) and reports sqrt(σ(cls)·σ(ctr)). mmdetection's and AdelaiDet's
ResNets are caffe-style (``resnet_style="caffe"``, set by ``detectors.convert.mmdet_config_overrides``).

torchvision's ``fcos_resnet50_fpn`` is :data:`TORCHVISION_FCOS` (its state dict converts with
``detectors.convert.convert_torchvision_fcos``): the same neck and head (conv bias, GN(32),
centerness on the regression tower, ReLU on distances normalised by the anchor size = stride),
without the per-level Scale (converted as Scale = 1, which gives its outputs exactly); its points are
at (j·stride, i·stride) (``point_offset=0``) and it thresholds and ranks by sqrt(σ(cls)·σ(ctr)) > 0.2
(``score_rule="torchvision"``). Its training differs and is not reproduced (a converted model trains
with the losses above): its regress ranges exclude both ends, with 0 instead of −1 on P3, and its GIoU
term is unweighted and divided by the number of positives.

Differences from mmdetection, by design (as the other families): points outside an image's
canonical padding are ignored by the assignment, the losses and ``postprocess``; GIoU/IoU losses are
computed on boxes relative to their point in stride units (both are invariant to the translation and
the common scale, so the values are mmdetection's up to rounding).

This file is the whole family: ``FCOSConfig`` (its keys and mmdetection's defaults), the head, and
``FCOS``, the model (assignment, losses, post-processing); detectors/zoo.py registers it as "fcos".
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.fcos import FCOSClassificationHead, FCOSRegressionHead
from torchvision.models.resnet import Bottleneck
from torchvision.ops import batched_nms, clip_boxes_to_image, sigmoid_focal_loss

from detectors.atss import box_centers
from detectors.backbone import group_norm
from detectors.config import DetectorConfig
from detectors.detector import (BACKGROUND, IGNORE, Detector, DetectorOutput, build_backbone, flatten_levels,
                                valid_level_sizes)
from detectors.gfl import Scale, distance2bbox
from detectors.losses import aligned_box_iou, giou_loss, mean_over_ranks
from store.schema import STRIDES

# mmdetection's INF: the upper end of the last regress range and the "no GT" area.
INF = 1e8
RESNET_STYLES = ("pytorch", "caffe")
BOX_LOSSES = ("giou", "iou")
SCORE_RULES = ("mmdet", "torchvision")
# mmdetection's IoULoss clamps the IoU to this before the log.
IOU_LOSS_EPS = 1e-6

# The original FCOS head of mmdetection's fcos_r50-caffe_fpn_gn-head_* / fcos_r101-caffe_* configs
# (MasKD's FCOS teacher): exp on pixel distances, centerness on the classification tower, tower
# convs without bias, no centre sampling, IoU loss (−log IoU), NMS at 0.5.
MMDET_PLAIN_FCOS = dict(norm_on_bbox=False, centerness_on_reg=False, head_conv_bias=False, center_sampling=False,
                        box_loss="iou", nms_thresh=0.5)
# torchvision's fcos_resnet50_fpn (see the module docstring); its COCO weights have 91 classes.
TORCHVISION_FCOS = dict(point_offset=0.0, score_rule="torchvision", score_thresh=0.2)


@dataclass(frozen=True, kw_only=True)
class FCOSConfig(DetectorConfig):
    """FCOS's keys on top of the shared ones; defaults are mmdetection's
    ``fcos_r50-caffe_fpn_gn-head-center-normbbox-centeronreg-giou_1x_coco`` (but a torchvision ResNet)."""

    family: ClassVar[str] = "fcos"
    relu_before_p7: bool = True              # mmdetection's relu_before_extra_convs=True, as torchvision's FCOS
    nms_thresh: float = 0.6
    detections_per_img: int = 100
    # "caffe": stride 2 on the 1×1 conv of each Bottleneck stage's first block (mmdetection's and
    # detectron2's caffe ResNets); "pytorch": on the 3×3 conv (torchvision). BasicBlocks have one place.
    resnet_style: str = "pytorch"
    head_conv_bias: bool = True              # mmdetection's conv_bias in the towers
    centerness_on_reg: bool = True           # centerness conv on the regression tower (else the class tower)
    norm_on_bbox: bool = True                # ReLU on stride-unit distances; False: exp on pixel distances
    center_sampling: bool = True
    center_sample_radius: float = 1.5        # in strides
    # Boundaries (pixels) between the levels' regress ranges: (−1, b0), (b0, b1), ..., (b_last, INF).
    regress_range_bounds: tuple[float, ...] = (64.0, 128.0, 256.0, 512.0)
    box_loss: str = "giou"                   # "giou" | "iou" (−log IoU, the original FCOS)
    score_rule: str = "mmdet"                # "mmdet" | "torchvision" (module docstring)
    point_offset: float = 0.5                # points at (j + point_offset)·stride

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "regress_range_bounds", tuple(float(b) for b in self.regress_range_bounds))
        bounds = self.regress_range_bounds
        if len(bounds) != len(STRIDES) - 1 or any(b <= a for a, b in zip((0.0,) + bounds, bounds)):
            raise ValueError(f"regress_range_bounds must be {len(STRIDES) - 1} increasing positive pixel sizes "
                             f"(one between each two of the levels {STRIDES}), got {bounds}")
        for key, allowed in (("resnet_style", RESNET_STYLES), ("box_loss", BOX_LOSSES), ("score_rule", SCORE_RULES)):
            if getattr(self, key) not in allowed:
                raise ValueError(f"FCOSConfig {key} must be one of {allowed}, got {getattr(self, key)!r}")
        if self.center_sample_radius <= 0:
            raise ValueError(f"FCOSConfig center_sample_radius must be > 0, got {self.center_sample_radius}")

    def regress_ranges(self) -> list[tuple[float, float]]:
        """(low, high) pixels of each level, mmdetection's ((−1, 64), (64, 128), ..., (512, 1e8))."""
        edges = (-1.0,) + self.regress_range_bounds + (INF,)
        return list(zip(edges[:-1], edges[1:]))


def fcos_anchor_generator(strides: tuple[int, ...] = STRIDES) -> AnchorGenerator:
    """One square of side stride per location and level (torchvision's FCOS anchors), centred at j·stride."""
    return AnchorGenerator(tuple((s,) for s in strides), ((1.0,),) * len(strides))


def to_caffe_style(body: nn.Module) -> None:
    """Moves the stride 2 of each stage's first Bottleneck from its 3×3 conv to its 1×1 conv1 (in place).

    mmdetection's ``ResNet(style="caffe")`` (``conv1_stride = stride, conv2_stride = 1``), which its
    FCOS configs use with caffe/detectron2 weights; same map sizes, different function. BasicBlock
    ResNets have a single place for the stride and are left as they are (as in mmdetection).
    """
    for name in ("layer2", "layer3", "layer4"):
        block = getattr(body, name)[0]
        if isinstance(block, Bottleneck):
            block.conv1.stride, block.conv2.stride = block.conv2.stride, (1, 1)


def fcos_assign(points_xy: Tensor, point_strides: Tensor, point_ranges: Tensor, gt_boxes_xyxy: Tensor,
                center_sample_radius: float | None = 1.5) -> Tensor:
    """mmdetection's ``FCOSHead._get_targets_single`` assignment: ``matched_gt`` (A,) long, a GT index or BACKGROUND.

    Args:
        points_xy: (A, 2) points, pixels.
        point_strides: (A,) stride of each point's level.
        point_ranges: (A, 2) regress range (low, high) of each point's level, pixels.
        gt_boxes_xyxy: (G, 4) GT boxes, pixels.
        center_sample_radius: half-side of the centre region in strides; None: the whole box.
    A point is a candidate of a GT if it lies strictly inside the GT's centre region (cut to the box)
    and low <= max(l, t, r, b) <= high; among its candidates it takes the GT of smallest area (the
    first on ties, as ``torch.min``).
    """
    num_points = points_xy.shape[0]
    if gt_boxes_xyxy.numel() == 0:
        return torch.full((num_points,), BACKGROUND, dtype=torch.long, device=points_xy.device)
    x, y = points_xy[:, 0, None], points_xy[:, 1, None]  # (A, 1) each
    x1, y1, x2, y2 = gt_boxes_xyxy.unbind(dim=1)  # (G,) each
    distances = torch.stack([x - x1, y - y1, x2 - x, y2 - y], dim=2)  # (A, G, 4) ltrb
    if center_sample_radius is None:
        inside = distances.amin(dim=2) > 0  # (A, G)
    else:
        reach = point_strides[:, None] * center_sample_radius  # (A, 1)
        center_x, center_y = (x1 + x2) / 2, (y1 + y2) / 2  # (G,)
        region = torch.stack([x - torch.maximum(center_x - reach, x1), y - torch.maximum(center_y - reach, y1),
                              torch.minimum(center_x + reach, x2) - x, torch.minimum(center_y + reach, y2) - y],
                             dim=2)  # (A, G, 4)
        inside = region.amin(dim=2) > 0
    largest = distances.amax(dim=2)  # (A, G)
    in_range = (largest >= point_ranges[:, 0, None]) & (largest <= point_ranges[:, 1, None])
    areas = ((x2 - x1) * (y2 - y1)).expand(num_points, -1).clone()  # (A, G)
    areas[~(inside & in_range)] = INF
    min_area, matched_gt = areas.min(dim=1)  # (A,)
    matched_gt[min_area == INF] = BACKGROUND
    return matched_gt


def point_levels(num_points_per_level: list[int], device: torch.device | None = None) -> Tensor:
    """(A,) level index of each point, for levels laid out one after the other."""
    return torch.repeat_interleave(torch.arange(len(num_points_per_level), device=device),
                                   torch.tensor(num_points_per_level, device=device))


def distance_targets(points_xy: Tensor, boxes_xyxy: Tensor, strides: Tensor) -> Tensor:
    """Side distances (M, 4) ltrb in stride units from points (M, 2) to their boxes (M, 4), strides (M,)."""
    return torch.cat([points_xy - boxes_xyxy[:, :2], boxes_xyxy[:, 2:] - points_xy], dim=1) / strides[:, None]


def centerness_target(distances_ltrb: Tensor) -> Tensor:
    """sqrt(min(l, r)/max(l, r) · min(t, b)/max(t, b)) of positive distances (M, 4) -> (M,)."""
    left_right, top_bottom = distances_ltrb[:, [0, 2]], distances_ltrb[:, [1, 3]]
    return torch.sqrt(left_right.amin(dim=1) / left_right.amax(dim=1)
                      * (top_bottom.amin(dim=1) / top_bottom.amax(dim=1)))


class FCOSHead(nn.Module):
    """torchvision's FCOS towers (its state-dict keys), run per level with mmdetection's switches.

    ``forward(features)`` -> per level class logits (N, K, H, W), side distances (N, 4, H, W) in
    stride units and centerness logits (N, 1, H, W). Keys: ``classification_head.conv.{3i, 3i+1}``
    (conv, GroupNorm of tower layer i), ``classification_head.cls_logits``, ``regression_head.conv.*``,
    ``regression_head.bbox_reg``, ``regression_head.bbox_ctrness`` (also when it reads the class
    tower), ``scales.{level}.scale``. GroupNorm groups: ``gcd(32, channels // 2)`` (32 at 256, as
    both references).
    """

    def __init__(self, in_channels: int, num_classes: int, num_convs: int = 4, strides: tuple[int, ...] = STRIDES,
                 conv_bias: bool = True, centerness_on_reg: bool = True, norm_on_bbox: bool = True) -> None:
        super().__init__()
        if num_convs < 1:
            raise ValueError(f"FCOS head_convs must be >= 1, got {num_convs}")
        self.classification_head = FCOSClassificationHead(in_channels, 1, num_classes, num_convs,
                                                          norm_layer=group_norm)
        self.regression_head = FCOSRegressionHead(in_channels, 1, num_convs, norm_layer=group_norm)
        if not conv_bias:
            for tower in (self.classification_head.conv, self.regression_head.conv):
                for layer in tower:
                    if isinstance(layer, nn.Conv2d):
                        layer.bias = None
        self.scales = nn.ModuleList([Scale(1.0) for _ in strides])
        self.strides = tuple(strides)
        self.centerness_on_reg = centerness_on_reg
        self.norm_on_bbox = norm_on_bbox

    def forward(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        if len(features) != len(self.scales):
            raise ValueError(f"FCOS head built for {len(self.scales)} levels got {len(features)}")
        cls_logits, distances, centerness = [], [], []
        for feature, scale, stride in zip(features, self.scales, self.strides):
            cls_feature = self.classification_head.conv(feature)  # (N, C, H, W)
            reg_feature = self.regression_head.conv(feature)
            cls_logits.append(self.classification_head.cls_logits(cls_feature))  # (N, K, H, W)
            centerness.append(self.regression_head.bbox_ctrness(
                reg_feature if self.centerness_on_reg else cls_feature))  # (N, 1, H, W)
            regression = scale(self.regression_head.bbox_reg(reg_feature))  # (N, 4, H, W)
            # float before exp, as mmdetection, so that half precision does not overflow
            distances.append(regression.clamp(min=0) if self.norm_on_bbox else regression.float().exp() / stride)
        return cls_logits, distances, centerness


class FCOS(Detector):
    """FCOS on a ResNet-FPN P3–P7 backbone; components default to the config's standard build."""

    config_class = FCOSConfig

    def __init__(self, config: FCOSConfig, backbone: nn.Module | None = None, head: nn.Module | None = None) -> None:
        self.check_config(config)
        if backbone is None:
            backbone = build_backbone(config)
            if config.resnet_style == "caffe":
                to_caffe_style(backbone.body)
        if head is None:
            head = FCOSHead(config.fpn_channels, config.num_classes, config.head_convs, self.strides,
                            config.head_conv_bias, config.centerness_on_reg, config.norm_on_bbox)
        super().__init__(config, backbone, fcos_anchor_generator(self.strides), head)

    def grid_anchors(self, level_shapes: list[tuple[int, int]], like: Tensor) -> list[Tensor]:
        """The base's squares of side stride, moved by ``point_offset``·stride: centred on the points."""
        anchors = super().grid_anchors(level_shapes, like)
        return [level + self.config.point_offset * stride for level, stride in zip(anchors, self.strides)]

    def match(self, anchors_xyxy: Tensor, num_anchors_per_level: list[int],
              gt_boxes_xyxy: Tensor) -> dict[str, Tensor]:
        """:func:`fcos_assign` on the anchors' centres (the points): ``matched_gt`` (A,)."""
        config = self.config
        level = point_levels(num_anchors_per_level, anchors_xyxy.device)  # (A,)
        strides = anchors_xyxy.new_tensor(self.strides)[level]
        ranges = anchors_xyxy.new_tensor(config.regress_ranges())[level]  # (A, 2)
        radius = config.center_sample_radius if config.center_sampling else None
        return {"matched_gt": fcos_assign(box_centers(anchors_xyxy), strides, ranges, gt_boxes_xyxy, radius)}

    def compute_losses(self, out: DetectorOutput, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """``cls``, ``box``, ``centerness`` as mmdetection's ``FCOSHead.loss_by_feat`` (module docstring).

        N_pos = max(1, positives of the batch) and W = max(1e-6, Σ centerness targets of the
        positives), both averaged over ranks under torch.distributed.
        cls = Σ_valid points, classes focal(z, onehot) / N_pos;
        box = Σ_pos c_i · L(box_i, gt_i) / W, L = 1 − GIoU (or −log IoU), on boxes relative to the
        point in stride units;
        centerness = Σ_pos BCE(ctr_i, c_i) / N_pos, c_i = :func:`centerness_target`.
        """
        cls_logits = flatten_levels(out.cls_logits, 1)  # (N, A_total, K)
        distances = flatten_levels(out.box_outputs, 1)  # (N, A_total, 4) stride units
        centerness = flatten_levels(out.centerness, 1)[..., 0]  # (N, A_total)
        anchors = torch.cat(out.anchors)  # (A_total, 4)
        points = box_centers(anchors)  # (A_total, 2) pixels
        strides = anchors.new_tensor(out.strides)[point_levels([len(a) for a in out.anchors], anchors.device)]
        matched_gt = torch.stack([a["matched_gt"] for a in out.assignment])  # (N, A_total)

        image_index, point_index = torch.where(matched_gt >= 0)  # (P,) each, image-major
        gt_boxes = torch.cat([t["boxes"].to(anchors) for t in targets])  # (sum n_gt, 4) pixels
        gt_labels = torch.cat([t["labels"].to(matched_gt) for t in targets])  # (sum n_gt,)
        gt_offsets = torch.tensor([0] + [len(t["labels"]) for t in targets[:-1]], device=anchors.device).cumsum(0)
        gt_flat = gt_offsets[image_index] + matched_gt[image_index, point_index]  # (P,) rows of gt_boxes

        num_positive = mean_over_ranks(anchors.new_tensor(float(image_index.numel()))).clamp(min=1)
        gt_classes = torch.zeros_like(cls_logits)  # (N, A_total, K)
        gt_classes[image_index, point_index, gt_labels[gt_flat]] = 1.0
        valid = matched_gt != IGNORE  # (N, A_total)
        cls = sigmoid_focal_loss(cls_logits[valid], gt_classes[valid], reduction="sum") / num_positive

        if image_index.numel():
            target_distances = distance_targets(points[point_index], gt_boxes[gt_flat], strides[point_index])  # (P, 4)
            ctr_targets = centerness_target(target_distances)  # (P,)
            ctr_sum = mean_over_ranks(ctr_targets.sum()).clamp(min=1e-6)
            pred = distances[image_index, point_index]  # (P, 4)
            pred_boxes = torch.cat([-pred[:, :2], pred[:, 2:]], dim=1)  # (P, 4) relative to the point
            target_boxes = torch.cat([-target_distances[:, :2], target_distances[:, 2:]], dim=1)
            if self.config.box_loss == "giou":
                box_losses = giou_loss(pred_boxes, target_boxes)
            else:
                box_losses = -aligned_box_iou(pred_boxes, target_boxes).clamp(min=IOU_LOSS_EPS).log()
            box = (box_losses * ctr_targets).sum() / ctr_sum
            ctr = F.binary_cross_entropy_with_logits(centerness[image_index, point_index], ctr_targets,
                                                     reduction="sum") / num_positive
        else:  # no positives: zero losses that keep both branches in the graph
            box, ctr = distances.sum() * 0, centerness.sum() * 0
        return {"cls": cls, "box": box, "centerness": ctr}

    def decode_boxes(self, box_rows: Tensor, anchors_xyxy: Tensor, stride: int) -> Tensor:
        """Side distances (n, 4) in stride units at the anchors' centres (n, 4) -> boxes (n, 4) xyxy pixels."""
        return distance2bbox(box_centers(anchors_xyxy), box_rows * stride)

    @torch.no_grad()
    def postprocess(self, out: DetectorOutput) -> list[dict[str, Tensor]]:
        """Detections per image: ``boxes`` (d, 4) xyxy view pixels clipped to the image, ``scores``, ``labels``.

        Per level over the image's valid region, ``score_rule`` "mmdet": σ(cls) > score_thresh, top
        ``topk_candidates`` (point, class) pairs by σ(cls), score σ(cls)·σ(ctr), then boxes of zero
        width or height dropped; "torchvision": sqrt(σ(cls)·σ(ctr)) > score_thresh, top
        ``topk_candidates`` by it. Then class-aware NMS over all levels, keep ``detections_per_img``.
        """
        config, num_classes = self.config, self.num_classes
        if out.centerness is None:
            raise ValueError("FCOS.postprocess needs the centerness maps (DetectorOutput.centerness)")
        mmdet_rule = config.score_rule == "mmdet"
        detections = []
        for index, image_size in enumerate(out.image_sizes):
            image_boxes, image_scores, image_labels = [], [], []
            for level, (valid_h, valid_w) in enumerate(valid_level_sizes(image_size, out.strides)):
                map_h, map_w = out.cls_logits[level].shape[-2:]
                cls_probs = out.cls_logits[level][index, :, :valid_h, :valid_w].permute(1, 2, 0).sigmoid()  # (h, w, K)
                ctr_probs = out.centerness[level][index, :, :valid_h, :valid_w].permute(1, 2, 0).sigmoid()  # (h, w, 1)
                distances = out.box_outputs[level][index, :, :valid_h, :valid_w].permute(1, 2, 0).reshape(-1, 4)
                anchors = out.anchors[level].view(map_h, map_w, 4)[:valid_h, :valid_w].reshape(-1, 4)  # (hw, 4)
                ctr_probs = ctr_probs.reshape(-1)  # (hw,)
                cls_probs = cls_probs.reshape(-1, num_classes)  # (hw, K)
                ranked = cls_probs if mmdet_rule else torch.sqrt(cls_probs * ctr_probs[:, None])
                ranked = ranked.reshape(-1)  # (hw*K,)
                keep = ranked > config.score_thresh
                scores, flat_indices = ranked[keep], torch.where(keep)[0]
                scores, order = scores.topk(min(config.topk_candidates, scores.numel()))
                flat_indices = flat_indices[order]
                point_indices = torch.div(flat_indices, num_classes, rounding_mode="floor")
                if mmdet_rule:
                    scores = scores * ctr_probs[point_indices]
                boxes = self.decode_boxes(distances[point_indices], anchors[point_indices], out.strides[level])
                image_boxes.append(clip_boxes_to_image(boxes, image_size))
                image_scores.append(scores)
                image_labels.append(flat_indices % num_classes)
            boxes, scores, labels = torch.cat(image_boxes), torch.cat(image_scores), torch.cat(image_labels)
            if mmdet_rule:  # mmdetection's min_bbox_size=0: width and height > 0
                sized = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
                boxes, scores, labels = boxes[sized], scores[sized], labels[sized]
            keep = batched_nms(boxes, scores, labels, config.nms_thresh)[: config.detections_per_img]
            detections.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
        return detections
