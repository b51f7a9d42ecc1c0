"""The detector base classes, the ``DetectorOutput`` the dense ones return, valid regions.

``BaseDetector`` is what every family shares: its config class and the check that refuses another
family's config, the input checks, and the backbone pass (``extract_features``). A dense family
(detectors/gfl.py, detectors/retinanet.py, detectors/fcos.py) subclasses ``Detector`` (a
``BaseDetector``) with its head, anchors, matching, losses and box decoding; the two-stage family
(detectors/frcnn.py) subclasses ``BaseDetector`` directly, since its forward returns proposals and
RoI outputs rather than dense maps (``detectors.frcnn.TwoStageOutput``). Each family also subclasses
``DetectorConfig`` (detectors/config.py) with its keys; detectors/zoo.py registers it by name.

A detector maps a zero-padded batch ``images (N, 3, H, W)`` (H, W multiples of 32) and the valid
``image_sizes`` to per-level FPN features, class logits and box outputs on P3–P7 (and, for a head
with a quality branch, FCOS's centerness logits), plus the anchors of the batch's grid. With
targets it also returns each image's anchor assignment and the named loss terms. Distillation
code reads these fields directly. ``return_backbone=True`` adds the ResNet stage maps C3..C5
the FPN is built on (``backbone_features``), from the same pass.
``amp_dtype=torch.bfloat16`` is the one mixed-precision forward (teacher in precompute, student in
train): backbone and head under autocast, anchors, assignment and losses in float32.

Canonical padding: an image's own padded size is its size rounded up to 32
(:func:`detectors.views.padded_size`). On each level, :func:`valid_level_sizes` gives the
top-left region computed from that padding alone; anchors outside it (batch padding added for
bigger batch-mates) are ignored by the assignment, the losses and ``postprocess``, so the
assignment, losses and detections of an image do not depend on how it was batched (feature
values near the region's border still do, through the convolutions' receptive fields).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import batched_nms, clip_boxes_to_image

from detectors.backbone import ResNetFPN, build_resnet_fpn
from detectors.config import DetectorConfig
from detectors.views import SIZE_DIVISOR, padded_size
from store.schema import STRIDES  # pixels per cell of P3..P7, one definition with the cache's level names

# Values of ``matched_gt`` besides a GT index (as torchvision's Matcher uses them).
BACKGROUND = -1
IGNORE = -2


@dataclass
class DetectorOutput:
    """What ``Detector.forward`` returns. Level lists run over P3..P7.

    Anchor order, within a level and over the concatenation of levels, is (h, w, a): the same
    order as ``flatten_levels`` gives the maps.
    """

    features: list[Tensor]                 # per level (N, C, H_l, W_l) FPN outputs
    cls_logits: list[Tensor]               # per level (N, A*K, H_l, W_l), sigmoid logits
    box_outputs: list[Tensor]              # per level (N, A*4, H_l, W_l) RetinaNet deltas, or
    #                                        (N, 4*(reg_max+1), H_l, W_l) GFL distribution logits (after Scale),
    #                                        or (N, 4, H_l, W_l) FCOS side distances ltrb in stride units (>= 0)
    anchors: list[Tensor]                  # per level (H_l*W_l*A, 4) xyxy pixels, shared by the batch
    strides: tuple[int, ...]               # pixels per cell of each level
    image_sizes: list[tuple[int, int]]     # valid (h, w) of each image, pixels
    # Per image, over all anchors of all levels: "matched_gt" (A_total,) long, a GT index or
    # BACKGROUND (-1) or IGNORE (-2: between IoU thresholds, or outside the image's valid region);
    # GFL adds "atss_threshold" (n_gt,) float, the ATSS IoU threshold of each GT.
    assignment: list[dict[str, Tensor]] | None = None
    losses: dict[str, Tensor] | None = None  # named, already weighted terms: total = sum(values)
    # Per stage C3, C4, C5 (N, C_l, H_l, W_l): the backbone maps the FPN is built on, with the
    # (H_l, W_l) of P3, P4, P5; only when asked for (``forward(..., return_backbone=True)``).
    backbone_features: list[Tensor] | None = None
    # Per level (N, A, H_l, W_l) centerness logits (pre-sigmoid) of a head with a quality branch
    # (FCOS, A = 1); None for heads without one (RetinaNet, GFL).
    centerness: list[Tensor] | None = None


def valid_level_sizes(image_size_hw: tuple[int, int], strides: tuple[int, ...] = STRIDES,
                      size_divisor: int = SIZE_DIVISOR) -> list[tuple[int, int]]:
    """(h_l, w_l) of each level computed from the image's canonical padding (size rounded up to 32).

    Levels with stride <= ``size_divisor`` divide the padded size exactly; coarser levels follow
    the stride-2 conv chain (3×3, padding 1), ``ceil(previous / 2)``, as P6 and P7 are computed.
    """
    padded_h, padded_w = padded_size(image_size_hw, size_divisor)
    sizes: list[tuple[int, int]] = []
    for index, stride in enumerate(strides):
        if stride <= size_divisor:
            if size_divisor % stride:
                raise ValueError(f"stride {stride} does not divide the size divisor {size_divisor}")
            sizes.append((padded_h // stride, padded_w // stride))
        else:
            if index == 0 or stride != 2 * strides[index - 1]:
                raise ValueError(f"strides above {size_divisor} must double the previous one, got {strides}")
            prev_h, prev_w = sizes[-1]
            sizes.append((math.ceil(prev_h / 2), math.ceil(prev_w / 2)))
    return sizes


def flatten_levels(maps: list[Tensor], num_anchors: int) -> Tensor:
    """Per-level maps (N, A*C, H_l, W_l) -> (N, sum_l H_l*W_l*A, C), rows in (level, h, w, a) order."""
    rows = []
    for level_map in maps:
        n, channels, h, w = level_map.shape
        level_map = level_map.view(n, num_anchors, channels // num_anchors, h, w)  # (N, A, C, H, W)
        rows.append(level_map.permute(0, 3, 4, 1, 2).reshape(n, h * w * num_anchors, -1))  # (N, HWA, C)
    return torch.cat(rows, dim=1)


def grid_anchors(anchor_generator: AnchorGenerator, strides: tuple[int, ...], level_shapes: list[tuple[int, int]],
                 like: Tensor) -> list[Tensor]:
    """Per level (H_l*W_l*A, 4) xyxy pixel anchors of ``anchor_generator`` at (j*stride, i*stride), order (h, w, a).

    Uses the true strides, not torchvision's ``AnchorGenerator.forward`` estimate ``padded size //
    map size``, which is off on the coarsest levels unless the batch is a multiple of their stride
    and would make anchors depend on the batch's padding.
    """
    anchor_generator.set_cell_anchors(like.dtype, like.device)
    level_strides = [[torch.tensor(s, device=like.device), torch.tensor(s, device=like.device)] for s in strides]
    return anchor_generator.grid_anchors([list(shape) for shape in level_shapes], level_strides)


def valid_anchor_mask(image_size_hw: tuple[int, int], level_shapes: list[tuple[int, int]], num_anchors: int,
                      strides: tuple[int, ...] = STRIDES, device: torch.device | None = None) -> Tensor:
    """(A_total,) bool over the batch grid's anchors (order level, h, w, a): inside the image's
    canonical-padding region of each level (:func:`valid_level_sizes`)."""
    masks = []
    for (map_h, map_w), (valid_h, valid_w) in zip(level_shapes, valid_level_sizes(image_size_hw, strides)):
        mask = torch.zeros(map_h, map_w, num_anchors, dtype=torch.bool, device=device)
        mask[:valid_h, :valid_w] = True
        masks.append(mask.reshape(-1))
    return torch.cat(masks)


def build_backbone(config: DetectorConfig, levels: str = "p3-p7") -> ResNetFPN:
    """The ResNet-FPN that ``config`` describes: P3–P7 for the dense families, P2–P6 for Faster R-CNN."""
    return build_resnet_fpn(config.depth, config.blocks, config.widths, config.norm, config.norm_eps,
                            config.fpn_channels, config.p6_from, config.relu_before_p7, config.trainable_layers,
                            config.backbone_weights, levels)


class BaseDetector(nn.Module):
    """What every family shares: config, backbone, the input checks and the backbone pass.

    Subclasses set ``config_class`` and ``strides`` (pixels per cell of the pyramid levels the
    backbone returns) and define ``forward`` and ``postprocess``.
    """

    strides: tuple[int, ...]
    config_class: ClassVar[type[DetectorConfig]]  # the family's config (its ``family`` names the family)
    # State-dict prefixes of the neck and heads: what a student "inherits" from its teacher (ICD's and
    # MasKD's official runs initialise the student's FPN and heads from the teacher's).
    NECK_AND_HEADS: ClassVar[tuple[str, ...]] = ("backbone.fpn.", "head.")

    def __init__(self, config: DetectorConfig, backbone: nn.Module) -> None:
        self.check_config(config)
        super().__init__()
        self.config = config
        self.num_classes = config.num_classes
        self.backbone = backbone

    @classmethod
    def check_config(cls, config: DetectorConfig) -> None:
        """Refuse another family's config (families call it first, before building parts from its keys)."""
        if not isinstance(config, cls.config_class):
            raise ValueError(f"{cls.__name__} needs a {cls.config_class.__name__} (family "
                             f"{cls.config_class.family!r}), got a {type(config).__name__}")

    def extract_features(self, images: Tensor, return_backbone: bool = False) -> tuple[list[Tensor],
                                                                                     list[Tensor] | None]:
        """(pyramid maps, stage maps or None): backbone and neck on a padded batch, no head.

        The pyramid is P3..P7 (P2..P6 for Faster R-CNN), the stage maps C3..C5 (C2..C5).
        """
        if not return_backbone:
            return list(self.backbone(images).values()), None  # each (N, C, H_l, W_l)
        if not hasattr(self.backbone, "forward_with_stages"):
            raise ValueError(f"{type(self.backbone).__name__} does not expose its stage maps (forward_with_stages); "
                             f"backbone features need a detectors.backbone.ResNetFPN")
        pyramid, stages = self.backbone.forward_with_stages(images)
        return list(pyramid.values()), list(stages.values())  # stage maps, each (N, C_l, H_l, W_l)

    def _check_inputs(self, images: Tensor, image_sizes: list[tuple[int, int]],
                      targets: list[dict[str, Tensor]] | None) -> None:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (N, 3, H, W), got {tuple(images.shape)}")
        height, width = images.shape[-2:]
        if height % SIZE_DIVISOR or width % SIZE_DIVISOR:
            raise ValueError(f"batch size {height}x{width} is not a multiple of {SIZE_DIVISOR}; pad the batch "
                             f"(detectors.views.collate does)")
        if len(image_sizes) != images.shape[0]:
            raise ValueError(f"{len(image_sizes)} image_sizes for a batch of {images.shape[0]} images")
        for size in image_sizes:
            pad_h, pad_w = padded_size(size)
            if pad_h > height or pad_w > width or min(size) < 1:
                raise ValueError(f"image size {size} (padded {pad_h}x{pad_w}) does not fit the batch "
                                 f"{height}x{width}")
        if targets is None:
            return
        if len(targets) != images.shape[0]:
            raise ValueError(f"{len(targets)} targets for a batch of {images.shape[0]} images")
        for target in targets:
            boxes, labels = target["boxes"], target["labels"]
            if boxes.dim() != 2 or boxes.shape[-1] != 4 or labels.shape != boxes.shape[:1]:
                raise ValueError(f"target boxes must be (n, 4) with labels (n,), got {tuple(boxes.shape)} "
                                 f"and {tuple(labels.shape)}")
            if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
                raise ValueError(f"target labels must be in [0, {self.num_classes}), got "
                                 f"[{int(labels.min())}, {int(labels.max())}]")


class Detector(BaseDetector):
    """Base of the dense one-stage detectors (RetinaNet, GFL, FCOS): backbone -> head -> ``DetectorOutput``.

    Subclasses provide their config class, the head, the anchor generator and three methods:
    ``match`` (one image's assignment), ``compute_losses`` and ``decode_boxes`` (for ``postprocess``).
    ``head(features)`` returns the per-level maps ``(cls_logits, box_outputs)``, or
    ``(cls_logits, box_outputs, centerness)`` for a head with a quality branch (FCOS).
    """

    strides: tuple[int, ...] = STRIDES

    def __init__(self, config: DetectorConfig, backbone: nn.Module, anchor_generator: AnchorGenerator,
                 head: nn.Module) -> None:
        super().__init__(config, backbone)
        self.anchor_generator = anchor_generator
        self.head = head
        self.num_anchors = anchor_generator.num_anchors_per_location()[0]

    # ------------------------------------------------------------------ forward
    def forward(self, images: Tensor, image_sizes: list[tuple[int, int]],
                targets: list[dict[str, Tensor]] | None = None, return_backbone: bool = False,
                amp_dtype: torch.dtype | None = None) -> DetectorOutput:
        """Runs the detector on a padded batch; computes assignment and losses only with ``targets``.

        Args:
            images: (N, 3, H, W) normalised, zero-padded, H and W multiples of 32.
            image_sizes: valid (h, w) of each image in pixels.
            targets: per image ``boxes`` (n, 4) xyxy pixels and ``labels`` (n,) long in [0, K).
            return_backbone: also return the ResNet stage maps C3..C5 in ``backbone_features``
                (the same pass; without it nothing is kept or computed beyond the usual outputs).
            amp_dtype: torch.bfloat16 / torch.float16 to run backbone and head under autocast
                (``detectors.runtime.resolve_amp``); every returned map is a float32 copy, and the
                anchors (pixel coordinates), assignment and losses are computed in float32.
        """
        image_sizes = [(int(h), int(w)) for h, w in image_sizes]
        self._check_inputs(images, image_sizes, targets)
        if amp_dtype is None:
            features, stages = self.extract_features(images, return_backbone)
            head_maps = self.head(features)
        else:
            with torch.autocast(images.device.type, dtype=amp_dtype):
                features, stages = self.extract_features(images, return_backbone)  # P3..P7; C3..C5 or None
                head_maps = self.head(features)
            features = [m.float() for m in features]
            head_maps = tuple([m.float() for m in maps] for maps in head_maps)
            stages = None if stages is None else [m.float() for m in stages]
        out = self._outputs(features, head_maps, image_sizes, targets)
        out.backbone_features = stages
        return out

    def forward_features(self, features: list[Tensor], image_sizes: list[tuple[int, int]],
                         targets: list[dict[str, Tensor]] | None = None) -> DetectorOutput:
        """The part of ``forward`` after the neck: head, anchors, and with ``targets`` assignment and losses.

        For code that changes the FPN features before the head (MasKD stage 1 feeds masked teacher
        features to the frozen head). ``features`` are P3..P7, each (N, C, H_l, W_l), laid out as
        ``backbone`` lays out a padded batch; ``image_sizes`` and ``targets`` as in ``forward``.
        """
        image_sizes = [(int(h), int(w)) for h, w in image_sizes]
        if len(features) != len(self.strides):
            raise ValueError(f"expected {len(self.strides)} feature levels (P3..P7), got {len(features)}")
        if len(image_sizes) != features[0].shape[0] or (targets is not None and len(targets) != len(image_sizes)):
            raise ValueError(f"{len(image_sizes)} image_sizes and {None if targets is None else len(targets)} "
                             f"targets for features of {features[0].shape[0]} images")
        for size in image_sizes:
            for feature, valid_hw in zip(features, valid_level_sizes(size, self.strides)):
                if valid_hw[0] > feature.shape[-2] or valid_hw[1] > feature.shape[-1]:
                    raise ValueError(f"image size {size} needs level maps of at least {valid_hw}, got "
                                     f"{tuple(feature.shape[-2:])}")
        return self._outputs(features, self.head(features), image_sizes, targets)

    def _outputs(self, features: list[Tensor], head_maps: tuple[list[Tensor], ...],
                 image_sizes: list[tuple[int, int]], targets: list[dict[str, Tensor]] | None) -> DetectorOutput:
        """The head's maps plus the batch's anchors, and with ``targets`` the assignment and losses."""
        if len(head_maps) not in (2, 3):
            raise ValueError(f"{type(self.head).__name__} returned {len(head_maps)} map lists; expected "
                             "(cls_logits, box_outputs) or (cls_logits, box_outputs, centerness)")
        cls_logits, box_outputs, *centerness = head_maps
        anchors = self.grid_anchors([tuple(f.shape[-2:]) for f in features], features[0])
        out = DetectorOutput(features, cls_logits, box_outputs, anchors, tuple(self.strides), image_sizes,
                             centerness=centerness[0] if centerness else None)
        if targets is not None:
            out.assignment = self.assign(out, targets)
            out.losses = self.compute_losses(out, targets)
        return out

    # ------------------------------------------------------------------ anchors and valid regions
    def grid_anchors(self, level_shapes: list[tuple[int, int]], like: Tensor) -> list[Tensor]:
        """Per level (H_l*W_l*A, 4) xyxy pixel anchors centred at (j*stride, i*stride), order (h, w, a)."""
        return grid_anchors(self.anchor_generator, self.strides, level_shapes, like)

    def valid_anchor_mask(self, image_size_hw: tuple[int, int], level_shapes: list[tuple[int, int]],
                          device: torch.device | None = None) -> Tensor:
        """(A_total,) bool: anchors inside the image's canonical-padding region of each level."""
        return valid_anchor_mask(image_size_hw, level_shapes, self.num_anchors, self.strides, device)

    # ------------------------------------------------------------------ assignment
    @torch.no_grad()
    def assign(self, out: DetectorOutput, targets: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
        """Per image: ``match`` on the valid anchors only, then IGNORE for the rest of the batch grid."""
        level_shapes = [tuple(m.shape[-2:]) for m in out.cls_logits]
        anchors = torch.cat(out.anchors)  # (A_total, 4)
        assignment = []
        for image_size, target in zip(out.image_sizes, targets):
            valid = self.valid_anchor_mask(image_size, level_shapes, anchors.device)  # (A_total,)
            valid_per_level = [h * w * self.num_anchors for h, w in valid_level_sizes(image_size, self.strides)]
            matched = self.match(anchors[valid], valid_per_level, target["boxes"].to(anchors))
            matched_gt = torch.full((anchors.shape[0],), IGNORE, dtype=torch.long, device=anchors.device)
            matched_gt[valid] = matched.pop("matched_gt")
            assignment.append({"matched_gt": matched_gt, **matched})
        return assignment

    def match(self, anchors_xyxy: Tensor, num_anchors_per_level: list[int],
              gt_boxes_xyxy: Tensor) -> dict[str, Tensor]:
        """One image: ``matched_gt`` (A,) over the given anchors, plus family-specific entries."""
        raise NotImplementedError

    def compute_losses(self, out: DetectorOutput, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """Named, weighted loss terms from ``out`` (with ``out.assignment`` filled in)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ inference
    def decode_boxes(self, box_rows: Tensor, anchors_xyxy: Tensor, stride: int) -> Tensor:
        """Rows of one level's box outputs (n, C) and their anchors (n, 4) -> boxes (n, 4) xyxy pixels."""
        raise NotImplementedError

    @torch.no_grad()
    def postprocess(self, out: DetectorOutput) -> list[dict[str, Tensor]]:
        """Detections per image: ``boxes`` (d, 4) xyxy view pixels clipped to the image, ``scores``, ``labels``.

        Per level over the image's valid region: scores > score_thresh, top ``topk_candidates``,
        decode, clip; then class-aware NMS over all levels and keep ``detections_per_img``.
        """
        config = self.config
        num_anchors, num_classes = self.num_anchors, self.num_classes
        detections = []
        for index, image_size in enumerate(out.image_sizes):
            image_boxes, image_scores, image_labels = [], [], []
            level_sizes = valid_level_sizes(image_size, out.strides)
            for level, (valid_h, valid_w) in enumerate(level_sizes):
                map_h, map_w = out.cls_logits[level].shape[-2:]
                logits = out.cls_logits[level][index, :, :valid_h, :valid_w]  # (A*K, h, w)
                logits = logits.reshape(num_anchors, num_classes, valid_h, valid_w).permute(2, 3, 0, 1)
                scores = logits.reshape(-1).sigmoid()  # (h*w*A*K,)
                box_map = out.box_outputs[level][index, :, :valid_h, :valid_w]  # (A*C, h, w)
                box_map = box_map.reshape(num_anchors, -1, valid_h, valid_w).permute(2, 3, 0, 1)
                box_rows = box_map.reshape(valid_h * valid_w * num_anchors, -1)  # (hwA, C)
                anchors = out.anchors[level].view(map_h, map_w, num_anchors, 4)[:valid_h, :valid_w].reshape(-1, 4)

                keep = scores > config.score_thresh
                scores, flat_indices = scores[keep], torch.where(keep)[0]
                scores, order = scores.topk(min(config.topk_candidates, scores.numel()))
                flat_indices = flat_indices[order]
                anchor_indices = torch.div(flat_indices, num_classes, rounding_mode="floor")
                boxes = self.decode_boxes(box_rows[anchor_indices], anchors[anchor_indices], out.strides[level])
                image_boxes.append(clip_boxes_to_image(boxes, image_size))
                image_scores.append(scores)
                image_labels.append(flat_indices % num_classes)
            boxes, scores, labels = torch.cat(image_boxes), torch.cat(image_scores), torch.cat(image_labels)
            keep = batched_nms(boxes, scores, labels, config.nms_thresh)[: config.detections_per_img]
            detections.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
        return detections
