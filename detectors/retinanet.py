"""RetinaNet (Lin et al., "Focal Loss for Dense Object Detection"), torchvision's reference.

State dict compatible with torchvision's ``retinanet_resnet50_fpn`` (keys ``backbone.body.*``,
``backbone.fpn.*``, ``head.classification_head.*``, ``head.regression_head.*``): the head reuses
torchvision's classification and regression heads, applied per level so that the outputs are the
raw maps of the ``DetectorOutput`` API. Same anchors (3 scales × 3 ratios per location, sizes 32..512),
matcher (IoU 0.5 / 0.4, low-quality matches allowed), sigmoid focal loss (α 0.25, γ 2), L1 on
(1, 1, 1, 1)-weighted box deltas, each normalised per image by its foreground count and averaged
over the batch, and post-processing (score 0.05, top 1000 per level, NMS 0.5, 300 detections).

Differences from torchvision, by design: anchors use the true level strides (see
``Detector.grid_anchors``), and anchors outside an image's canonical padding are ignored.

This file is the whole family: ``RetinaNetConfig`` (its keys and torchvision's defaults), the head,
and ``RetinaNet``, the model (matching, losses, box decoding); detectors/zoo.py registers it as "retina".
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.retinanet import RetinaNetClassificationHead, RetinaNetRegressionHead
from torchvision.ops import box_iou, sigmoid_focal_loss

from detectors.config import DetectorConfig
from detectors.detector import BACKGROUND, Detector, DetectorOutput, build_backbone, flatten_levels


@dataclass(frozen=True, kw_only=True)
class RetinaNetConfig(DetectorConfig):
    """RetinaNet's keys on top of the shared ones; defaults are torchvision's ``retinanet_resnet50_fpn``."""

    family: ClassVar[str] = "retina"
    relu_before_p7: bool = True              # torchvision's LastLevelP6P7
    nms_thresh: float = 0.5
    detections_per_img: int = 300
    fg_iou_thresh: float = 0.5               # matcher: foreground at IoU >= fg_iou_thresh,
    bg_iou_thresh: float = 0.4               # background below bg_iou_thresh, ignored in between


def retinanet_anchor_generator() -> AnchorGenerator:
    """torchvision's RetinaNet anchors: sizes (s, s·2^(1/3), s·2^(2/3)) for s in 32..512, ratios 0.5/1/2."""
    sizes = tuple((x, int(x * 2 ** (1.0 / 3)), int(x * 2 ** (2.0 / 3))) for x in (32, 64, 128, 256, 512))
    return AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))


class RetinaNetHead(nn.Module):
    """torchvision's RetinaNet classification and regression towers, run per level.

    ``num_convs`` < 4 keeps the first ``num_convs`` conv+ReLU blocks of each tower (small demo
    models); 4 is torchvision's head, key for key.
    """

    def __init__(self, in_channels: int, num_anchors: int, num_classes: int, num_convs: int = 4) -> None:
        super().__init__()
        if not 1 <= num_convs <= 4:
            raise ValueError(f"RetinaNet head_convs must be in [1, 4], got {num_convs}")
        self.classification_head = RetinaNetClassificationHead(in_channels, num_anchors, num_classes)
        self.regression_head = RetinaNetRegressionHead(in_channels, num_anchors)
        self.classification_head.conv = self.classification_head.conv[:num_convs]
        self.regression_head.conv = self.regression_head.conv[:num_convs]

    def forward(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Per level: class logits (N, A*K, H, W) and box deltas (N, A*4, H, W)."""
        cls_logits = [self.classification_head.cls_logits(self.classification_head.conv(f)) for f in features]
        box_deltas = [self.regression_head.bbox_reg(self.regression_head.conv(f)) for f in features]
        return cls_logits, box_deltas


class RetinaNet(Detector):
    """RetinaNet on a ResNet-FPN P3–P7 backbone; components default to the config's standard build."""

    config_class = RetinaNetConfig

    def __init__(self, config: RetinaNetConfig, backbone: nn.Module | None = None,
                 head: nn.Module | None = None, matcher: det_utils.Matcher | None = None) -> None:
        self.check_config(config)
        anchor_generator = retinanet_anchor_generator()
        if backbone is None:
            backbone = build_backbone(config)
        if head is None:
            head = RetinaNetHead(config.fpn_channels, anchor_generator.num_anchors_per_location()[0],
                                 config.num_classes, config.head_convs)
        super().__init__(config, backbone, anchor_generator, head)
        self.matcher = matcher or det_utils.Matcher(config.fg_iou_thresh, config.bg_iou_thresh,
                                                    allow_low_quality_matches=True)
        self.box_coder = det_utils.BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))

    def match(self, anchors_xyxy: Tensor, num_anchors_per_level: list[int],
              gt_boxes_xyxy: Tensor) -> dict[str, Tensor]:
        """torchvision's IoU matcher: GT index, BACKGROUND below 0.4, IGNORE in [0.4, 0.5)."""
        if gt_boxes_xyxy.numel() == 0:
            matched = torch.full((anchors_xyxy.shape[0],), BACKGROUND, dtype=torch.long, device=anchors_xyxy.device)
            return {"matched_gt": matched}
        return {"matched_gt": self.matcher(box_iou(gt_boxes_xyxy, anchors_xyxy))}  # (n_gt, A) -> (A,)

    def compute_losses(self, out: DetectorOutput, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """``cls``: focal loss over non-ignored anchors; ``box``: L1 on deltas of foreground anchors.

        Each is summed per image, divided by max(1, foreground anchors of the image), then averaged
        over the images (torchvision's normalisation).
        """
        cls_logits = flatten_levels(out.cls_logits, self.num_anchors)  # (N, A_total, K)
        box_deltas = flatten_levels(out.box_outputs, self.num_anchors)  # (N, A_total, 4)
        anchors = torch.cat(out.anchors)  # (A_total, 4)
        cls_losses, box_losses = [], []
        for index, (target, assignment) in enumerate(zip(targets, out.assignment)):
            matched_gt = assignment["matched_gt"]  # (A_total,)
            foreground = matched_gt >= 0
            num_foreground = max(1, int(foreground.sum()))
            gt_classes = torch.zeros_like(cls_logits[index])  # (A_total, K)
            gt_classes[foreground, target["labels"][matched_gt[foreground]]] = 1.0
            counted = matched_gt >= BACKGROUND  # not IGNORE
            cls_losses.append(sigmoid_focal_loss(cls_logits[index][counted], gt_classes[counted],
                                                 reduction="sum") / num_foreground)
            gt_boxes = target["boxes"].to(anchors)[matched_gt[foreground]]  # (F, 4)
            target_deltas = self.box_coder.encode_single(gt_boxes, anchors[foreground])  # (F, 4)
            box_losses.append(F.l1_loss(box_deltas[index][foreground], target_deltas, reduction="sum")
                              / num_foreground)
        return {"cls": torch.stack(cls_losses).mean(), "box": torch.stack(box_losses).mean()}

    def decode_boxes(self, box_rows: Tensor, anchors_xyxy: Tensor, stride: int) -> Tensor:
        """Deltas (n, 4) on anchors (n, 4) -> boxes (n, 4) xyxy pixels."""
        return self.box_coder.decode_single(box_rows, anchors_xyxy)
