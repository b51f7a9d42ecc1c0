"""Faster R-CNN with FPN (Ren et al.; Lin et al.) as mmdetection's ``faster_rcnn_r50_fpn_1x_coco`` defines it.

Over 500 lines because it is the whole family, as each family file is: config, output, RoI head,
box coders, matching, model (RPN, sampling, losses, post-processing); the RoI head is a class of
its own here so that it runs alone (the partial teacher).

Reference: mmdetection 3.3 ``configs/_base_/models/faster-rcnn_r50_fpn.py`` with
``mmdet/models/dense_heads/{rpn_head,anchor_head}.py``, ``roi_heads/standard_roi_head.py``,
``roi_heads/bbox_heads/{bbox_head,convfc_bbox_head}.py`` (``Shared2FCBBoxHead``),
``roi_heads/roi_extractors/single_level_roi_extractor.py``, ``task_modules/assigners/max_iou_assigner.py``,
``task_modules/samplers/random_sampler.py``, ``task_modules/coders/delta_xywh_bbox_coder.py``,
``task_modules/prior_generators/anchor_generator.py``, ``layers/bbox_nms.py``. The defaults of
``FasterRCNNConfig`` are that model:

- Backbone and neck: ResNet (pytorch style), FPN on C2–C5 to 256 channels, P6 = 1×1 stride-2
  max-pool of P5 (``add_extra_convs=False``, ``num_outs=5``): P2..P6, strides 4..64.
- RPN head (weights shared across levels): 3×3 conv + ReLU (``head_convs``), 1×1 conv to A
  objectness logits (sigmoid) and 1×1 conv to 4A deltas; init normal(0, 0.01), bias 0.
- Anchors: A = 3 per location, ratios h/w 0.5, 1, 2, side ``anchor_scale`` (8) × stride (32..512
  pixels on P2..P6), centred at (j·stride, i·stride), sizes kept exact.
- Proposals, per image: per level the top ``rpn_pre_nms_top_n`` (2000 train / 1000 test) anchors
  by objectness, decoded (stds 1), clipped to the image, boxes of zero width or height dropped,
  NMS at 0.7 within each level, the first ``rpn_post_nms_top_n`` kept (1000 train and test). No
  gradient flows through the proposals.
- RPN training: IoU ≥ 0.7 positive, < 0.3 negative, between ignored; then each GT's best anchors
  (ties included) are positive if that IoU ≥ ``rpn_min_pos_iou`` (0.3); 256 random anchors per
  image, at most half positive. BCE on the sampled anchors, L1 on the positives' deltas, both
  summed and divided by Σ_images max(1, positives) + max(1, negatives).
- RoI head: RoIAlign 7×7 (``aligned=True``, ``sampling_ratio=0``: adaptive) over P2..P5, a RoI
  going to level floor(log2(sqrt(wh)/56 + 1e-6)) clamped to 0..3; flatten, fc 1024 + ReLU twice,
  a classifier over K + 1 classes (softmax) and class-specific deltas with stds (0.1, 0.1, 0.2, 0.2).
  Init: fcs Xavier uniform (bias 0), classifier normal(0, 0.01), deltas normal(0, 0.001).
- RoI training: the GT boxes are added to the proposals (and assigned to their own GT); IoU ≥ 0.5
  positive, else negative; 512 random RoIs per image, at most a quarter positive. CE over the
  sampled RoIs (mean) and L1 on the deltas of the GT class of the positives / number of sampled
  RoIs, over the batch.
- Inference: softmax; each class's box decoded and clipped; (RoI, class) pairs with score > 0.05;
  class-aware NMS at 0.5; keep 100.

Layout: class column 0 is the background and column k + 1 class k (torchvision's
``FastRCNNPredictor``, with deltas for the background too); mmdetection's head has the background
last and no background deltas, which ``detectors.convert.convert_mmdet_frcnn`` rotates and pads
with zeros (unused rows) so that a converted head computes mmdetection's numbers.

torchvision's ``fasterrcnn_resnet50_fpn`` has the same modules and state-dict keys (its RPN runs
on its five maps "0".."3", "pool", which are P2..P6 here, and its pooler on the first four) and
differs where :data:`TORCHVISION_FRCNN` sets: anchors rounded to integers (``round_anchors``);
2000 proposals after NMS in training; low-quality RPN matches whatever their IoU
(``rpn_min_pos_iou=0``); smooth L1 with beta 1/9 in both stages; RoIAlign ``aligned=False``,
``sampling_ratio=2``, and its ``LevelMapper`` (floor(4 + log2(sqrt(wh)/224) + 1e-6) clamped to
2..5); and ``rules="torchvision"``, which switches each smaller convention to torchvision's:

- box coding: torchvision's ``BoxCoder`` (centre x1 + w/2, deltas divided by weights 1/stds, the
  log-scale clamped from above only) instead of mmdetection's (centre (x1 + x2)/2, deltas
  multiplied by stds, log-scale clamped to ±|log(16/1000)|);
- small boxes: proposals kept with width and height ≥ 1e-3 and detections with ≥ 1e-2, instead of
  proposals > 0 and no filter on detections;
- the per-level top-n ranked by logits, not sigmoid scores (the same but for float ties);
- an anchor that is some GT's best anchor goes to its own best GT (torchvision's ``Matcher``),
  not to the last GT it is best for (mmdetection's loop);
- the RPN loss divided by the number of sampled anchors;
- GT boxes added as proposals are matched by IoU like the others.

Its head's initialisation (PyTorch's Linear default) and its scale of each RoI level, inferred
from the image size (the same as the strides for any batch padded to 32), are not reproduced.

Differences from both, by design (as the dense families): anchors outside an image's canonical
padding take no part in its proposals or RPN assignment (mmdetection's valid flags follow the
batch's padded shape), and boxes stay in view pixels.

This file is the whole family: ``FasterRCNNConfig`` (its keys and mmdetection's defaults),
``TwoStageOutput`` (what the forward returns), ``RoIBoxHead`` (RoIAlign + box head, runnable alone
from its state: ``FasterRCNN.roi_head_state`` / ``RoIBoxHead.from_state``) and ``FasterRCNN``, the
model; detectors/zoo.py registers it as "frcnn". It is a ``BaseDetector``, not a ``Detector``:
the dense base's forward returns per-level head maps over anchors (``DetectorOutput``), which a
two-stage model does not have; it shares the config check, the input checks, the backbone pass,
anchors on true strides and the valid regions (detectors/detector.py), and the zoo's building
and checkpoints.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import batched_nms, box_iou, clip_boxes_to_image, roi_align
from torchvision.ops.poolers import LevelMapper

from detectors.config import DetectorConfig
from detectors.detector import (BACKGROUND, IGNORE, BaseDetector, build_backbone, flatten_levels, grid_anchors,
                                valid_anchor_mask, valid_level_sizes)
from detectors.fcos import RESNET_STYLES, to_caffe_style

STRIDES = (4, 8, 16, 32, 64)          # P2..P6
ROI_LEVELS = 4                        # P2..P5 feed the RoI head
RULES = ("mmdet", "torchvision")
MMDET_FINEST_SCALE = 56.0             # SingleRoIExtractor.finest_scale
MMDET_MAX_LOG_SCALE = abs(math.log(16 / 1000))   # DeltaXYWHBBoxCoder's wh_ratio_clip
ROI_HEAD_FORMAT = "detkd-roi-head/1"

# torchvision's fasterrcnn_resnet50_fpn (module docstring); its COCO weights also need norm_eps=0.0.
TORCHVISION_FRCNN = dict(rules="torchvision", round_anchors=True, rpn_post_nms_top_n_train=2000, rpn_min_pos_iou=0.0,
                         rpn_smooth_l1_beta=1 / 9, roi_sampling_ratio=2, roi_aligned=False,
                         roi_level_mapping="torchvision", roi_smooth_l1_beta=1 / 9)
# Shared keys of the dense families that do not apply here (P6 is max-pooled, there is no P7, and
# no per-level top-k of class scores): refused unless left at these values.
_FIXED_SHARED_KEYS = {"p6_from": "p5", "relu_before_p7": False, "topk_candidates": 1000}


@dataclass(frozen=True, kw_only=True)
class FasterRCNNConfig(DetectorConfig):
    """Faster R-CNN's keys on top of the shared ones; defaults are mmdetection's ``faster_rcnn_r50_fpn_1x``
    (a torchvision ResNet); ``head_convs`` is the RPN head's 3×3 convs."""

    family: ClassVar[str] = "frcnn"
    # Zoo sizes (detectors.zoo.SIZES) whose shared values this family changes: one RPN conv, a
    # narrower RoI head on the CPU models.
    SIZE_OVERRIDES: ClassVar[dict[str, dict[str, Any]]] = {"small": {"head_convs": 1, "roi_fc_channels": 256},
                                                           "nano": {"head_convs": 1, "roi_fc_channels": 64}}
    relu_before_p7: bool = False             # does not apply (no P7)
    head_convs: int = 1
    nms_thresh: float = 0.5
    detections_per_img: int = 100
    resnet_style: str = "pytorch"            # "caffe": detectors.fcos.to_caffe_style
    rules: str = "mmdet"                     # "mmdet" | "torchvision" (module docstring)
    # RPN
    anchor_scale: float = 8.0                # anchor side = anchor_scale × stride
    anchor_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)   # h / w
    round_anchors: bool = False              # torchvision rounds its cell anchors to integers
    rpn_pre_nms_top_n_train: int = 2000      # per level
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_train: int = 1000     # per image (torchvision 2000)
    rpn_post_nms_top_n_test: int = 1000
    rpn_nms_thresh: float = 0.7
    rpn_fg_iou_thresh: float = 0.7
    rpn_bg_iou_thresh: float = 0.3
    rpn_min_pos_iou: float = 0.3             # low-quality matches need this IoU (torchvision 0)
    rpn_batch_size_per_image: int = 256
    rpn_positive_fraction: float = 0.5
    rpn_box_stds: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0)
    rpn_smooth_l1_beta: float = 0.0          # 0: L1 (torchvision 1/9)
    # RoI head
    roi_pool_size: int = 7
    roi_sampling_ratio: int = 0              # <= 0: adaptive (torchvision 2)
    roi_aligned: bool = True                 # half-pixel offset (torchvision False)
    roi_level_mapping: str = "mmdet"         # "mmdet" | "torchvision"
    roi_fc_channels: int = 1024
    roi_box_stds: tuple[float, ...] = (0.1, 0.1, 0.2, 0.2)   # torchvision's weights (10, 10, 5, 5) = 1 / stds
    roi_fg_iou_thresh: float = 0.5
    roi_bg_iou_thresh: float = 0.5
    roi_batch_size_per_image: int = 512
    roi_positive_fraction: float = 0.25
    roi_smooth_l1_beta: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("anchor_ratios", "rpn_box_stds", "roi_box_stds"):
            object.__setattr__(self, key, tuple(float(v) for v in getattr(self, key)))
        for key, fixed in _FIXED_SHARED_KEYS.items():
            if getattr(self, key) != fixed:
                raise ValueError(f"FasterRCNNConfig {key} does not apply to Faster R-CNN (P6 is a max-pool of P5, "
                                 f"there is no P7); leave it at {fixed!r}, got {getattr(self, key)!r}")
        for key, allowed in (("rules", RULES), ("roi_level_mapping", RULES), ("resnet_style", RESNET_STYLES)):
            if getattr(self, key) not in allowed:
                raise ValueError(f"FasterRCNNConfig {key} must be one of {allowed}, got {getattr(self, key)!r}")
        for key in ("rpn_box_stds", "roi_box_stds"):
            if len(getattr(self, key)) != 4 or min(getattr(self, key)) <= 0:
                raise ValueError(f"FasterRCNNConfig {key} must be 4 positive numbers, got {getattr(self, key)}")
        if not self.anchor_ratios or min(self.anchor_ratios) <= 0 or self.anchor_scale <= 0:
            raise ValueError(f"FasterRCNNConfig anchor_scale and anchor_ratios must be positive, got "
                             f"{self.anchor_scale}, {self.anchor_ratios}")
        if self.head_convs < 1 or self.roi_fc_channels < 1 or self.roi_pool_size < 1:
            raise ValueError("FasterRCNNConfig head_convs, roi_fc_channels and roi_pool_size must be >= 1")


@dataclass
class TwoStageOutput:
    """What ``FasterRCNN.forward`` returns. Level lists run over P2..P6 (``strides``).

    The RoI rows of all images are concatenated image after image (``rois[i]`` holds image i's);
    with targets they are the sampled RoIs, positives first, else the proposals.
    """

    features: list[Tensor]                 # per level (N, C, H_l, W_l) FPN outputs
    rpn_objectness: list[Tensor]           # per level (N, A, H_l, W_l) objectness logits (sigmoid)
    rpn_deltas: list[Tensor]               # per level (N, A*4, H_l, W_l) deltas on the anchors (rpn_box_stds units)
    anchors: list[Tensor]                  # per level (H_l*W_l*A, 4) xyxy pixels, order (h, w, a), shared by the batch
    strides: tuple[int, ...]
    image_sizes: list[tuple[int, int]]     # valid (h, w) of each image, pixels
    proposals: list[Tensor]                # per image (P_i, 4) xyxy pixels, by objectness descending, no gradient
    proposal_scores: list[Tensor]          # per image (P_i,) sigmoid objectness
    rois: list[Tensor]                     # per image (R_i, 4) xyxy pixels: what the RoI head ran on
    roi_pooled: Tensor                     # (R, C, S, S) RoIAlign features
    roi_cls_logits: Tensor                 # (R, K+1) softmax logits, column 0 background, k+1 class k
    roi_box_deltas: Tensor                 # (R, 4*(K+1)) class-specific deltas (roi_box_stds units)
    # With targets: per image over the batch grid's anchors (A_total,), a GT index or BACKGROUND or IGNORE.
    rpn_assignment: list[Tensor] | None = None
    roi_matched_gt: list[Tensor] | None = None   # per image (R_i,) GT index or BACKGROUND
    roi_labels: list[Tensor] | None = None       # per image (R_i,) long, the column of roi_cls_logits to learn
    roi_box_targets: list[Tensor] | None = None  # per image (R_i, 4) encoded GT boxes (zeros for background)
    losses: dict[str, Tensor] | None = None      # "rpn_cls", "rpn_box", "cls", "box"
    backbone_features: list[Tensor] | None = None  # C2..C5 with return_backbone=True


def _amp(device: torch.device, amp_dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext() if amp_dtype is None else torch.autocast(device.type, dtype=amp_dtype)


class RoIBoxHead(nn.Module):
    """RoIAlign over P2..P5, then torchvision's ``TwoMLPHead`` and ``FastRCNNPredictor`` (their keys).

    ``forward(features, rois, image_sizes)`` -> pooled (R, C, S, S), class logits (R, K+1), deltas
    (R, 4(K+1)). It needs only the FPN maps and the boxes, so a head rebuilt from
    :meth:`to_state` runs a teacher's RoI head over its cached maps on another model's RoIs.
    """

    def __init__(self, in_channels: int, num_classes: int, fc_channels: int = 1024, pool_size: int = 7,
                 sampling_ratio: int = 0, aligned: bool = True, level_mapping: str = "mmdet",
                 strides: tuple[int, ...] = STRIDES[:ROI_LEVELS]) -> None:
        super().__init__()
        if level_mapping not in RULES:
            raise ValueError(f"level_mapping must be one of {RULES}, got {level_mapping!r}")
        self.settings = dict(in_channels=in_channels, num_classes=num_classes, fc_channels=fc_channels,
                             pool_size=pool_size, sampling_ratio=sampling_ratio, aligned=aligned,
                             level_mapping=level_mapping, strides=list(strides))
        self.box_head = TwoMLPHead(in_channels * pool_size ** 2, fc_channels)
        self.box_predictor = FastRCNNPredictor(fc_channels, num_classes + 1)
        for fc in (self.box_head.fc6, self.box_head.fc7):  # mmdetection's Shared2FCBBoxHead init
            nn.init.xavier_uniform_(fc.weight)
            nn.init.zeros_(fc.bias)
        for layer, std in ((self.box_predictor.cls_score, 0.01), (self.box_predictor.bbox_pred, 0.001)):
            nn.init.normal_(layer.weight, std=std)
            nn.init.zeros_(layer.bias)
        self.strides = tuple(strides)
        self.level_mapper = LevelMapper(int(math.log2(strides[0])), int(math.log2(strides[-1])))

    def map_levels(self, boxes_xyxy: Tensor) -> Tensor:
        """(R,) level index (0 = P2) of each box (R, 4): mmdetection's or torchvision's rule."""
        if self.settings["level_mapping"] == "torchvision":
            return self.level_mapper([boxes_xyxy])
        scale = torch.sqrt((boxes_xyxy[:, 2] - boxes_xyxy[:, 0]) * (boxes_xyxy[:, 3] - boxes_xyxy[:, 1]))
        levels = torch.floor(torch.log2(scale / MMDET_FINEST_SCALE + 1e-6))
        return levels.clamp(min=0, max=len(self.strides) - 1).long()

    def pool(self, features: list[Tensor], rois: list[Tensor]) -> Tensor:
        """RoIAlign of each image's boxes (R_i, 4) on its level's map -> (R, C, S, S), images concatenated."""
        boxes = torch.cat(rois)  # (R, 4)
        image_index = torch.cat([torch.full_like(r[:, :1], i) for i, r in enumerate(rois)])  # (R, 1)
        roi_rows = torch.cat([image_index, boxes], dim=1)  # (R, 5) as roi_align takes them
        levels = self.map_levels(boxes)
        size, channels = self.settings["pool_size"], features[0].shape[1]
        pooled = features[0].new_zeros((boxes.shape[0], channels, size, size))
        for level, stride in enumerate(self.strides):
            index = torch.where(levels == level)[0]
            if index.numel():
                pooled[index] = roi_align(features[level], roi_rows[index].to(features[level].dtype), size,
                                          1.0 / stride, self.settings["sampling_ratio"], self.settings["aligned"])
        return pooled

    def forward(self, features: list[Tensor], rois: list[Tensor], image_sizes: list[tuple[int, int]],
                amp_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(pooled (R, C, S, S), class logits (R, K+1), deltas (R, 4(K+1))) of the boxes ``rois``.

        Args:
            features: the FPN maps from P2 on, each (N, C, H_l, W_l); P2..P5 are read (P6 may follow).
            rois: per image (R_i, 4) xyxy pixels.
            image_sizes: valid (h, w) of each image; the maps must cover each image's canonical padding.
            amp_dtype: run RoIAlign and the fcs under autocast; the outputs are float32 copies.
        """
        if len(features) < len(self.strides):
            raise ValueError(f"the RoI head reads {len(self.strides)} FPN maps (P2..P5), got {len(features)}")
        if not len(rois) == len(image_sizes) == features[0].shape[0]:
            raise ValueError(f"{len(rois)} RoI lists and {len(image_sizes)} image sizes for FPN maps of "
                             f"{features[0].shape[0]} images")
        for size in image_sizes:
            for feature, valid_hw in zip(features, valid_level_sizes(tuple(size), self.strides)):
                if valid_hw[0] > feature.shape[-2] or valid_hw[1] > feature.shape[-1]:
                    raise ValueError(f"image size {tuple(size)} needs maps of at least {valid_hw}, got "
                                     f"{tuple(feature.shape[-2:])}")
        with _amp(features[0].device, amp_dtype):
            pooled = self.pool(features[: len(self.strides)], rois)
            cls_logits, box_deltas = self.box_predictor(self.box_head(pooled))
        if amp_dtype is None:
            return pooled, cls_logits, box_deltas
        return pooled.float(), cls_logits.float(), box_deltas.float()

    def to_state(self) -> dict[str, Any]:
        """The head alone, as plain containers and tensors (``torch.save``-able, ``weights_only`` loadable)."""
        return {"format": ROI_HEAD_FORMAT, "settings": dict(self.settings),
                "state_dict": {key: value.detach().clone() for key, value in self.state_dict().items()}}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> RoIBoxHead:
        """The head :meth:`to_state` described, with its weights, in eval mode."""
        if not isinstance(state, dict) or state.get("format") != ROI_HEAD_FORMAT:
            raise ValueError(f"not a RoI head state (format {ROI_HEAD_FORMAT!r}): "
                             f"{state.get('format') if isinstance(state, dict) else type(state).__name__}")
        settings = dict(state["settings"])
        head = cls(**{**settings, "strides": tuple(settings["strides"])})
        head.load_state_dict(state["state_dict"])
        return head.eval()


class MMDetDeltaCoder:
    """mmdetection's ``DeltaXYWHBBoxCoder`` (``bbox2delta`` / ``delta2bbox``, means 0) under torchvision
    ``BoxCoder``'s method names."""

    def __init__(self, stds: tuple[float, ...]) -> None:
        self.stds = stds

    def encode_single(self, gt_boxes: Tensor, boxes: Tensor) -> Tensor:
        """Deltas (n, 4) of ``gt_boxes`` (n, 4) relative to ``boxes`` (n, 4), divided by the stds."""
        centre, size = (boxes[:, :2] + boxes[:, 2:]) * 0.5, boxes[:, 2:] - boxes[:, :2]  # (n, 2) each
        gt_centre, gt_size = (gt_boxes[:, :2] + gt_boxes[:, 2:]) * 0.5, gt_boxes[:, 2:] - gt_boxes[:, :2]
        deltas = torch.cat([(gt_centre - centre) / size, torch.log(gt_size / size)], dim=1)
        return deltas / deltas.new_tensor(self.stds)

    def decode_single(self, deltas: Tensor, boxes: Tensor) -> Tensor:
        """Deltas (n, 4k) applied to ``boxes`` (n, 4) -> boxes (n, 4k) xyxy (not clipped)."""
        num_boxes, columns = deltas.shape
        deltas = deltas.reshape(-1, 4) * deltas.new_tensor(self.stds)  # (n*k, 4)
        boxes = boxes.to(deltas.dtype).repeat(1, columns // 4).reshape(-1, 4)  # (n*k, 4)
        centre, size = (boxes[:, :2] + boxes[:, 2:]) * 0.5, boxes[:, 2:] - boxes[:, :2]
        new_centre = centre + size * deltas[:, :2]
        new_size = size * deltas[:, 2:].clamp(min=-MMDET_MAX_LOG_SCALE, max=MMDET_MAX_LOG_SCALE).exp()
        return torch.cat([new_centre - new_size * 0.5, new_centre + new_size * 0.5], dim=1).reshape(num_boxes, columns)


def make_box_coder(stds: tuple[float, ...], rules: str) -> det_utils.BoxCoder | MMDetDeltaCoder:
    """torchvision's ``BoxCoder`` (weights 1/stds) or mmdetection's coder: ``encode_single`` / ``decode_single``."""
    if rules == "torchvision":
        return det_utils.BoxCoder(weights=tuple(1.0 / s for s in stds))
    return MMDetDeltaCoder(stds)


def rpn_anchor_generator(config: FasterRCNNConfig) -> AnchorGenerator:
    """One size (``anchor_scale`` × stride) and the config's ratios per level, on P2..P6.

    torchvision's generator rounds its cell anchors; without ``round_anchors`` they are replaced by
    the exact ones (mmdetection's: the same formula before the rounding).
    """
    sizes = tuple((config.anchor_scale * stride,) for stride in STRIDES)
    generator = AnchorGenerator(sizes, (config.anchor_ratios,) * len(sizes))
    if not config.round_anchors:
        cells = []
        for (size,), ratios in zip(sizes, generator.aspect_ratios):
            h_ratios = torch.sqrt(torch.as_tensor(ratios))
            widths, heights = (1 / h_ratios) * size, h_ratios * size  # (A,) each, as torchvision computes them
            cells.append(torch.stack([-widths, -heights, widths, heights], dim=1) / 2)
        generator.cell_anchors = cells
    return generator


def max_iou_match(iou: Tensor, fg_iou_thresh: float, bg_iou_thresh: float, low_quality_min_iou: float | None = None,
                  rules: str = "mmdet") -> Tensor:
    """(A,) a GT index, BACKGROUND (best IoU < bg) or IGNORE (bg <= best IoU < fg), from ``iou`` (G, A), G >= 1.

    ``low_quality_min_iou`` (None: none): each GT's best anchors, ties included, whose IoU is at
    least this, are positive too: for "mmdet" (``MaxIoUAssigner``'s loop) matched to the last GT they
    are best for, for "torchvision" (``Matcher``) to their own best GT.
    """
    best_iou, best_gt = iou.max(dim=0)  # (A,)
    matched = best_gt.clone()
    matched[best_iou < fg_iou_thresh] = IGNORE
    matched[best_iou < bg_iou_thresh] = BACKGROUND
    if low_quality_min_iou is not None:
        gt_best = iou.max(dim=1).values[:, None]  # (G, 1)
        is_best = (iou == gt_best) & (gt_best >= low_quality_min_iou)  # (G, A)
        anchors = is_best.any(dim=0)
        if rules == "torchvision":
            matched[anchors] = best_gt[anchors]
        else:
            last_gt = iou.shape[0] - 1 - is_best.flip(0).int().argmax(dim=0)  # (A,)
            matched[anchors] = last_gt[anchors]
    return matched


class FasterRCNN(BaseDetector):
    """Faster R-CNN on a ResNet-FPN P2–P6 backbone; components default to the config's standard build."""

    NECK_AND_HEADS = ("backbone.fpn.", "rpn.", "roi_heads.")

    strides = STRIDES
    config_class = FasterRCNNConfig

    def __init__(self, config: FasterRCNNConfig, backbone: nn.Module | None = None,
                 roi_heads: RoIBoxHead | None = None) -> None:
        self.check_config(config)
        if backbone is None:
            backbone = build_backbone(config, levels="p2-p6")
            if config.resnet_style == "caffe":
                to_caffe_style(backbone.body)
        super().__init__(config, backbone)
        self.anchor_generator = rpn_anchor_generator(config)
        self.num_anchors = self.anchor_generator.num_anchors_per_location()[0]
        self.rpn = nn.Module()  # holds the head under torchvision's key names (rpn.head.*)
        self.rpn.head = RPNHead(config.fpn_channels, self.num_anchors, conv_depth=config.head_convs)
        if roi_heads is None:
            roi_heads = RoIBoxHead(config.fpn_channels, config.num_classes, config.roi_fc_channels,
                                   config.roi_pool_size, config.roi_sampling_ratio, config.roi_aligned,
                                   config.roi_level_mapping)
        self.roi_heads = roi_heads
        self.rpn_box_coder = make_box_coder(config.rpn_box_stds, config.rules)
        self.roi_box_coder = make_box_coder(config.roi_box_stds, config.rules)
        self.rpn_sampler = det_utils.BalancedPositiveNegativeSampler(config.rpn_batch_size_per_image,
                                                                     config.rpn_positive_fraction)
        self.roi_sampler = det_utils.BalancedPositiveNegativeSampler(config.roi_batch_size_per_image,
                                                                     config.roi_positive_fraction)

    # ------------------------------------------------------------------ forward
    def forward(self, images: Tensor, image_sizes: list[tuple[int, int]],
                targets: list[dict[str, Tensor]] | None = None, return_backbone: bool = False,
                amp_dtype: torch.dtype | None = None) -> TwoStageOutput:
        """Runs the detector on a padded batch; with ``targets`` samples RoIs and computes the losses.

        Arguments as ``Detector.forward``. The proposal counts follow ``self.training`` (as
        torchvision); the RoI head runs on the sampled RoIs with targets, on the proposals without.
        Under ``amp_dtype`` the backbone, RPN head and RoI head run under autocast; maps are float32
        copies, and proposals, sampling and losses are computed in float32.
        """
        image_sizes = [(int(h), int(w)) for h, w in image_sizes]
        self._check_inputs(images, image_sizes, targets)
        with _amp(images.device, amp_dtype):
            features, stages = self.extract_features(images, return_backbone)  # P2..P6; C2..C5 or None
        if amp_dtype is not None:
            features = [m.float() for m in features]
            stages = None if stages is None else [m.float() for m in stages]
        out = self.forward_features(features, image_sizes, targets, amp_dtype)
        out.backbone_features = stages
        return out

    def forward_features(self, features: list[Tensor], image_sizes: list[tuple[int, int]],
                         targets: list[dict[str, Tensor]] | None = None,
                         amp_dtype: torch.dtype | None = None) -> TwoStageOutput:
        """The part of ``forward`` after the neck: RPN, proposals, and with ``targets`` RoI sampling, the RoI
        head and the losses (without: the RoI head on the proposals).

        For code that changes the FPN maps before the heads (MasKD stage 1 feeds masked teacher maps to
        the frozen heads). ``features`` are P2..P6, each (N, C, H_l, W_l) float32, laid out as the
        backbone lays out a padded batch; ``image_sizes`` and ``targets`` as in ``forward``; the heads run
        under ``amp_dtype`` autocast when given.
        """
        image_sizes = [(int(h), int(w)) for h, w in image_sizes]
        if len(features) != len(self.strides):
            raise ValueError(f"expected {len(self.strides)} feature levels (P2..P6), got {len(features)}")
        with _amp(features[0].device, amp_dtype):
            objectness, deltas = self.rpn.head(features)  # per level (N, A, H, W), (N, 4A, H, W)
        if amp_dtype is not None:
            objectness, deltas = [m.float() for m in objectness], [m.float() for m in deltas]
        anchors = grid_anchors(self.anchor_generator, self.strides, [tuple(f.shape[-2:]) for f in features],
                               features[0])
        proposals, scores = self.propose(objectness, deltas, anchors, image_sizes)
        sampled = self.sample_rois(proposals, targets) if targets is not None else None
        rois = proposals if sampled is None else sampled["rois"]
        pooled, cls_logits, box_deltas = self.roi_head_outputs(features, rois, image_sizes, amp_dtype)
        out = TwoStageOutput(features, objectness, deltas, anchors, self.strides, image_sizes, proposals, scores,
                             rois, pooled, cls_logits, box_deltas)
        if targets is not None:
            out.rpn_assignment = self.assign_anchors(out, targets)
            out.roi_matched_gt, out.roi_labels, out.roi_box_targets = (
                sampled["matched_gt"], sampled["labels"], sampled["box_targets"])
            out.losses = {**self.rpn_losses(out, targets), **self.roi_losses(out)}
        return out

    def roi_head_outputs(self, features: list[Tensor], rois: list[Tensor], image_sizes: list[tuple[int, int]],
                         amp_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(pooled (R, C, S, S), class logits (R, K+1), deltas (R, 4(K+1))): the RoI head alone on FPN maps
        from P2 on and per-image boxes (R_i, 4) xyxy pixels (:meth:`RoIBoxHead.forward`)."""
        return self.roi_heads(features, rois, image_sizes, amp_dtype)

    def roi_head_state(self) -> dict[str, Any]:
        """The RoI head's settings and weights (``RoIBoxHead.from_state`` rebuilds it alone)."""
        return self.roi_heads.to_state()

    # ------------------------------------------------------------------ RPN
    @torch.no_grad()
    def propose(self, objectness: list[Tensor], deltas: list[Tensor], anchors: list[Tensor],
                image_sizes: list[tuple[int, int]]) -> tuple[list[Tensor], list[Tensor]]:
        """Per image: proposals (P, 4) xyxy pixels and their sigmoid objectness (P,) (module docstring)."""
        config, torchvision_rules = self.config, self.config.rules == "torchvision"
        pre_nms = config.rpn_pre_nms_top_n_train if self.training else config.rpn_pre_nms_top_n_test
        post_nms = config.rpn_post_nms_top_n_train if self.training else config.rpn_post_nms_top_n_test
        level_shapes = [tuple(m.shape[-2:]) for m in objectness]
        all_logits = flatten_levels(objectness, self.num_anchors)[..., 0]  # (N, A_total)
        all_deltas = flatten_levels(deltas, self.num_anchors)  # (N, A_total, 4)
        all_anchors = torch.cat(anchors)  # (A_total, 4)
        proposals, proposal_scores = [], []
        for index, image_size in enumerate(image_sizes):
            valid = valid_anchor_mask(image_size, level_shapes, self.num_anchors, self.strides, all_anchors.device)
            per_level = [h * w * self.num_anchors for h, w in valid_level_sizes(image_size, self.strides)]
            logits = all_logits[index, valid]  # (V,) valid anchors, levels one after the other
            boxes = self.rpn_box_coder.decode_single(all_deltas[index, valid], all_anchors[valid])  # (V, 4)
            top, offset = [], 0
            for count in per_level:
                ranked = logits[offset:offset + count]
                ranked = ranked if torchvision_rules else ranked.sigmoid()
                top.append(ranked.topk(min(pre_nms, count)).indices + offset)
                offset += count
            levels = torch.cat([torch.full_like(t, level) for level, t in enumerate(top)])
            top = torch.cat(top)
            boxes, scores = clip_boxes_to_image(boxes[top], image_size), logits[top].sigmoid()
            widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
            keep = ((widths >= 1e-3) & (heights >= 1e-3)) if torchvision_rules else ((widths > 0) & (heights > 0))
            boxes, scores, levels = boxes[keep], scores[keep], levels[keep]
            keep = batched_nms(boxes, scores, levels, config.rpn_nms_thresh)[:post_nms]
            proposals.append(boxes[keep])
            proposal_scores.append(scores[keep])
        return proposals, proposal_scores

    @torch.no_grad()
    def assign_anchors(self, out: TwoStageOutput, targets: list[dict[str, Tensor]]) -> list[Tensor]:
        """Per image (A_total,): the RPN's GT index / BACKGROUND / IGNORE of each anchor (IGNORE outside
        the image's valid region)."""
        config = self.config
        level_shapes = [tuple(m.shape[-2:]) for m in out.rpn_objectness]
        anchors = torch.cat(out.anchors)  # (A_total, 4)
        assignment = []
        for image_size, target in zip(out.image_sizes, targets):
            valid = valid_anchor_mask(image_size, level_shapes, self.num_anchors, self.strides, anchors.device)
            matched = torch.full((anchors.shape[0],), IGNORE, dtype=torch.long, device=anchors.device)
            gt_boxes = target["boxes"].to(anchors)
            if gt_boxes.numel() == 0:
                matched[valid] = BACKGROUND
            else:
                matched[valid] = max_iou_match(box_iou(gt_boxes, anchors[valid]), config.rpn_fg_iou_thresh,
                                               config.rpn_bg_iou_thresh, config.rpn_min_pos_iou, config.rules)
            assignment.append(matched)
        return assignment

    def rpn_losses(self, out: TwoStageOutput, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """``rpn_cls`` (BCE on the sampled anchors) and ``rpn_box`` (smooth L1 / L1 on the positives' deltas),
        sums over the batch divided by the sampled count (mmdetection: Σ max(1, pos) + max(1, neg))."""
        anchors = torch.cat(out.anchors)  # (A_total, 4)
        logits = flatten_levels(out.rpn_objectness, self.num_anchors)[..., 0]  # (N, A_total)
        deltas = flatten_levels(out.rpn_deltas, self.num_anchors)  # (N, A_total, 4)
        positive_masks, negative_masks = self.rpn_sampler([_sampler_labels(m) for m in out.rpn_assignment])
        cls_terms, box_terms, normaliser = [], [], 0
        for index, (target, matched) in enumerate(zip(targets, out.rpn_assignment)):
            positive, negative = torch.where(positive_masks[index])[0], torch.where(negative_masks[index])[0]
            sampled = torch.cat([positive, negative])
            objectness = torch.zeros_like(logits[index, sampled])
            objectness[: positive.numel()] = 1.0
            cls_terms.append(F.binary_cross_entropy_with_logits(logits[index, sampled], objectness, reduction="sum"))
            gt_boxes = target["boxes"].to(anchors)[matched[positive]]  # (P, 4)
            box_targets = self.rpn_box_coder.encode_single(gt_boxes, anchors[positive])
            box_terms.append(F.smooth_l1_loss(deltas[index, positive], box_targets, reduction="sum",
                                              beta=self.config.rpn_smooth_l1_beta))
            if self.config.rules == "torchvision":
                normaliser += sampled.numel()
            else:
                normaliser += max(1, positive.numel()) + max(1, negative.numel())
        normaliser = max(1, normaliser)
        return {"rpn_cls": torch.stack(cls_terms).sum() / normaliser,
                "rpn_box": torch.stack(box_terms).sum() / normaliser}

    # ------------------------------------------------------------------ RoI head
    @torch.no_grad()
    def sample_rois(self, proposals: list[Tensor], targets: list[dict[str, Tensor]]) -> dict[str, list[Tensor]]:
        """Per image: the GT boxes added to the proposals, matched (IoU >= roi_fg_iou_thresh positive, below
        roi_bg_iou_thresh negative) and sampled. Lists ``rois`` (R_i, 4) positives first, ``matched_gt``,
        ``labels`` (class column, 0 = background) and ``box_targets`` (R_i, 4)."""
        config = self.config
        candidates, matches = [], []
        for image_proposals, target in zip(proposals, targets):
            gt_boxes = target["boxes"].to(image_proposals)
            boxes = torch.cat([image_proposals, gt_boxes])  # (P + G, 4)
            if gt_boxes.numel() == 0:
                matched = torch.full((boxes.shape[0],), BACKGROUND, dtype=torch.long, device=boxes.device)
            else:
                matched = max_iou_match(box_iou(gt_boxes, boxes), config.roi_fg_iou_thresh, config.roi_bg_iou_thresh)
                if config.rules == "mmdet":  # mmdetection's AssignResult.add_gt_
                    matched[image_proposals.shape[0]:] = torch.arange(gt_boxes.shape[0], device=boxes.device)
            candidates.append(boxes)
            matches.append(matched)
        positive_masks, negative_masks = self.roi_sampler([_sampler_labels(m) for m in matches])
        sampled: dict[str, list[Tensor]] = {"rois": [], "matched_gt": [], "labels": [], "box_targets": []}
        for boxes, matched, target, positive_mask, negative_mask in zip(candidates, matches, targets, positive_masks,
                                                                      negative_masks):
            positive, negative = torch.where(positive_mask)[0], torch.where(negative_mask)[0]
            rows = torch.cat([positive, negative])
            rois, matched = boxes[rows], matched[rows]
            labels = torch.zeros_like(matched)
            box_targets = torch.zeros_like(rois)
            if positive.numel():
                labels[: positive.numel()] = target["labels"].to(matched)[matched[: positive.numel()]] + 1
                gt_boxes = target["boxes"].to(rois)[matched[: positive.numel()]]
                box_targets[: positive.numel()] = self.roi_box_coder.encode_single(gt_boxes, rois[: positive.numel()])
            for key, value in zip(sampled, (rois, matched, labels, box_targets)):
                sampled[key].append(value)
        return sampled

    def roi_losses(self, out: TwoStageOutput) -> dict[str, Tensor]:
        """``cls``: CE over the sampled RoIs (mean); ``box``: smooth L1 / L1 on the GT class's deltas of the
        positives, summed and divided by the number of sampled RoIs (both over the batch)."""
        labels = torch.cat(out.roi_labels)  # (R,)
        if labels.numel() == 0:  # no RoI at all: zero losses that keep the head in the graph
            zero = out.roi_cls_logits.sum() * 0 + out.roi_box_deltas.sum() * 0
            return {"cls": zero, "box": zero}
        cls = F.cross_entropy(out.roi_cls_logits, labels)
        positive = torch.where(labels > 0)[0]
        deltas = out.roi_box_deltas.view(labels.numel(), -1, 4)[positive, labels[positive]]  # (P, 4)
        box = F.smooth_l1_loss(deltas, torch.cat(out.roi_box_targets)[positive], reduction="sum",
                               beta=self.config.roi_smooth_l1_beta) / labels.numel()
        return {"cls": cls, "box": box}

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def postprocess(self, out: TwoStageOutput) -> list[dict[str, Tensor]]:
        """Detections per image: ``boxes`` (d, 4) xyxy view pixels clipped to the image, ``scores``, ``labels``
        in [0, K), from a forward without targets (the RoI head on the proposals; module docstring)."""
        if out.roi_labels is not None:
            raise ValueError("FasterRCNN.postprocess needs the RoI head's outputs on the proposals: a forward "
                             "without targets (with targets it ran on sampled RoIs)")
        config = self.config
        num_rois = [len(r) for r in out.rois]
        probabilities = F.softmax(out.roi_cls_logits, dim=-1).split(num_rois)  # per image (R_i, K+1)
        boxes_all = self.roi_box_coder.decode_single(out.roi_box_deltas, torch.cat(out.rois))
        boxes_all = boxes_all.reshape(sum(num_rois), -1, 4).split(num_rois)  # per image (R_i, K+1, 4)
        detections = []
        for boxes, scores, image_size in zip(boxes_all, probabilities, out.image_sizes):
            boxes = clip_boxes_to_image(boxes, image_size)[:, 1:].reshape(-1, 4)  # (R_i*K, 4), background dropped
            columns = torch.arange(1, self.num_classes + 1, device=boxes.device).repeat(scores.shape[0])  # (R_i*K,)
            scores = scores[:, 1:].reshape(-1)
            keep = scores > config.score_thresh
            if config.rules == "torchvision":  # torchvision's remove_small_boxes(min_size=1e-2)
                keep &= (boxes[:, 2] - boxes[:, 0] >= 1e-2) & (boxes[:, 3] - boxes[:, 1] >= 1e-2)
            boxes, scores, columns = boxes[keep], scores[keep], columns[keep]
            keep = batched_nms(boxes, scores, columns, config.nms_thresh)[: config.detections_per_img]  # per class
            detections.append({"boxes": boxes[keep], "scores": scores[keep], "labels": columns[keep] - 1})
        return detections


def _sampler_labels(matched_gt: Tensor) -> Tensor:
    """torchvision's sampler labels: 1 positive, 0 negative, -1 ignored."""
    return torch.where(matched_gt >= 0, 1, torch.where(matched_gt == BACKGROUND, 0, -1))
