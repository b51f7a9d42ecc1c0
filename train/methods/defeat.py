"""DeFeat: distillation with decoupled foreground and background features.

Paper: Guo et al., "Distilling Object Detectors via Decoupled Features", CVPR 2021.
Official code: https://github.com/ggjy/DeFeat.pytorch @c46a793 (``mmdet/apis/train.py``:
``batch_processor_kd`` with ``neck-adapt,neck-decouple,mask-neck-gt,pixel-wise``;
``mmdet/models/dense_heads/anchor_head.py``: ``get_gt_mask``, ``_map_roi_levels``;
``mmdet/models/detectors/single_stage_kd.py``: the adapters).

GT mask M (N, 1, H, W) per level: each GT box goes to one level,

    k = floor(log2(√((w+1)(h+1)) / 56 + 1e-6)) clipped to [0, L−1],   level k = P(k+3)

which is the official single-stage rule: ``_map_roi_levels`` (FPN's RoI rule with mmdet v1's +1)
applied to the anchor head's levels, P3–P7 for RetinaNet and GFL. Its cells
[int(y1/s), int(y2/s)) × [int(x1/s), int(x2/s)) on that level are set (one cell when the range is
empty), s the level's stride. With the adapter A_l (3×3 conv C_s → C_t, weights N(0,1) fmod 2 ×
1e-4, default bias, no activation, trained with the student) and M_c = M repeated over C_t:

    defeat_fg = w_fg / L · Σ_l Σ M·(A_l(F_s) − F_t)² / max(1, 2·Σ M_c)
    defeat_bg = w_bg / L · Σ_l Σ B·(A_l(F_s) − F_t)² / max(1, 2·Σ B_c),   B = valid · (1 − M)

COCO weights per the author: w_fg = 4, w_bg = 16 (the released VOC config has 3 and 12).

Backbone terms (optional, off by default as in the released configs, ``hint_bb_w=0``,
``hint_bb_back_w=0``): the official ``bb-adapt,bb-decouple,mask-bb-gt`` branch of
``batch_processor_kd`` (``mmdet/apis/train.py`` lines 349–386), adapters in
``single_stage_kd.py`` / ``two_stage_kd.py`` (``bb_adapt``), mask in ``anchor_head.py``
``get_bb_gt_mask`` (lines 299–320). For each distilled ResNet stage S (C3, C4, C5: strides 8, 16,
32, the FPN's inputs; ``backbone_stages``) with its adapter A_S = 3×3 conv C_s,S → C_t,S followed by
a ReLU (unlike the neck adapters; same N(0,1) fmod 2 × 1e-4 weight init, trained with the student):

    M_8  = every GT box's cells on the stride-8 grid (P3, the head's finest level), no level
           assignment, the same cell rule as above
    M_S  = nearest-neighbour resize of M_8 to stage S's map (C3: M_8; C4: M_8[::2, ::2]; C5: M_8[::4, ::4])
    defeat_backbone_fg = w_bbfg / |S| · Σ_S Σ M_S·(A_S(C_s) − C_t)² / max(1, 2·Σ M_S,c)
    defeat_backbone_bg = w_bbbg / |S| · Σ_S Σ B_S·(A_S(C_s) − C_t)² / max(1, 2·Σ B_S,c),
                         B_S = valid · (1 − M_S)

(M_S,c: M_S repeated over the teacher's C_t,S channels.) The author's COCO recipe (DeFeat.pytorch
issue #18: "4 and 16 for the foreground and background, ... KD for backbone feature (stage 3 and
4), Neck feature, and cls-head") names mmdetection's ResNet stages 3 and 4 (``layer3``,
``layer4``, counted as ``frozen_stages`` counts them): C4 and C5, the default of
``backbone_stages``. The issue gives no backbone or head weights; the released VOC config
(``voc_stu_faster_rcnn_r50_decouple_neck.py``) lists ``bb_indices=(1,2,3)`` (C3–C5) with both
backbone weights 0 and ``head_cls_w = head_cls_back_w = 2``. The recipe, as run here:

    python -m precompute ... --fields defeat-coco        # = defeat + head.cls + backbone
    python -m train ... --method defeat --set defeat.fg_weight=4 --set defeat.bg_weight=16 \
        --set defeat.backbone_fg_weight=4 --set defeat.backbone_bg_weight=16 \
        --set defeat.head_fg_weight=2 --set defeat.head_bg_weight=2

The backbone weights above reuse the neck's 4/16 (an assumption: the author did not state them);
``--set defeat.backbone_stages=3,4,5`` distils C3 too (the released ``bb_indices``). A cache
written with ``--fields defeat`` (the released config) holds no backbone maps, and a run with
backbone weights > 0 refuses it; ``--fields backbone`` adds just the group to another spec. The
adapters are sized by both models' C3–C5 widths, which :meth:`DeFeat.build` takes from the build
context (``student_backbone_channels``, ``teacher_backbone_channels``;
``detectors.backbone.resnet_stage_channels`` or ``ResNetFPN.stage_channels`` give them); without
them the backbone terms refuse to build. The student's C3–C5 come from the same forward as its
FPN (``Detector.forward(..., return_backbone=True)``, which the trainer asks for whenever the
method reads ``backbone`` fields).

Head term (optional, off by default): the author's head term is a KL on a two-stage detector's
RoI class scores (``head-cls``, not enabled in the released config; its values there are weight 2
for fg and bg, T = 1). For these one-stage heads we use, per anchor at the fg (M) and bg (B)
locations, the binary KL of the sigmoid class scores at temperature T summed over classes,

    defeat_head_fg = w_hfg · T² · Σ_{fg anchors} Σ_k KL(Bern(σ(t_k/T)) ‖ Bern(σ(s_k/T))) / #fg anchors

and likewise ``defeat_head_bg``. Binary rather than softmax KL because a sigmoid head has no
background class: a softmax over K classes would throw away "how much background" a location is.

Batch semantics: the official runs put 2 images on each GPU; the normalisers max(1, 2·Σ M_c)
and max(1, 2·Σ B_c) (and the head term's anchor counts) are sums over those 2 images, and DDP
averages the GPUs. So a batch of B images is split into groups of 2 consecutive images (the last
group of an odd B holds 1 image), every term is computed per group as above and the terms are
the mean over the groups: 1 device × 16 images trains like 8 GPUs × 2.
``tests/test_reference_defeat.py`` checks this against a plain-torch transcription of
``batch_processor_kd`` (``neck-adapt,neck-decouple,pixel-wise``) and ``get_gt_mask`` /
``_map_roi_levels`` at 2 and 8 images, with and without padding.

Remaining differences from the official code:

- The background mask is restricted to each image's valid region (the official 1 − M also
  covers batch padding, where the teacher's features are real values of the zero-padded image
  and the normaliser counts those cells). For a pair of equal sizes there is no padding; for a
  portrait 1333×800 image paired with a landscape one, 41 % of the pair's map is padding, so the
  official L_bg normaliser is up to 1/(1 − 0.41) = 1.7× ours and its numerator holds the
  padding's errors. Not reproducible from the cache, which holds only each image's own region.
- GT cells are clipped to the image's valid region rather than to the batch map (identical for
  boxes inside the image).
- The head term is our one-stage design (see above), not the author's.
- Backbone mask: the stride-8 grid (P3) is the finest level of these one-stage heads, which the
  official single-stage code would use (``bbox_head.get_bb_gt_mask``; as released that call passes
  a ``version`` argument the function does not take, so only the two-stage path runs, on the RPN's
  finest level, stride 4). The background is again restricted to the valid region.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detectors.detector import DetectorOutput
from train.methods.base import (BuildContext, DistillationMethod, MethodConfig, check_same_shape, require,
                                sum_per_gpu_batch)
from train.teacher_batch import TeacherBatch

# FPN's RoI-to-level rule (as mmdetection's ``_map_roi_levels``): canonical size 56 -> level 0.
FINEST_SCALE = 56
# ResNet stages with backbone terms: C3, C4, C5 (``backbone.c3`` ...), on the grids of P3, P4, P5.
BACKBONE_STAGE_NUMBERS = (3, 4, 5)


@dataclass(frozen=True)
class DeFeatConfig(MethodConfig):
    fg_weight: float = 4.0          # w_fg (COCO, per the author; VOC release 3)
    bg_weight: float = 16.0         # w_bg (COCO, per the author; VOC release 12)
    head_fg_weight: float = 0.0     # one-stage head KL at fg anchors (off; the author's two-stage value is 2)
    head_bg_weight: float = 0.0     # one-stage head KL at bg anchors (off; the author's two-stage value is 2)
    head_temperature: float = 1.0   # T of the head term
    backbone_fg_weight: float = 0.0  # backbone term at fg cells (hint_bb_w; 0 in the released config)
    backbone_bg_weight: float = 0.0  # backbone term at bg cells (hint_bb_back_w; 0 in the released config)
    backbone_stages: tuple[int, ...] = (4, 5)  # ResNet stages distilled: 3 = C3, 4 = C4, 5 = C5
    #                                            (the author's "stage 3 and 4" = C4, C5)

    # ggjy/DeFeat.pytorch @c46a793: the GT mask is AnchorHead.get_gt_mask (dense_heads/anchor_head.py),
    # called by SingleStageDetectorKD (detectors/single_stage_kd.py); released configs: Faster R-CNN (VOC).
    # RetinaNet is the paper's one-stage result; GFL (an anchor head too) is not in that code: the same
    # values here. Its FCOSHead (dense_heads/fcos_head.py) has no get_gt_mask: no FCOS.
    FAMILY_DEFAULTS = {"retina": {}, "gfl": {}}
    UNSUPPORTED = {"fcos": "the official code builds its GT mask in AnchorHead.get_gt_mask, which FCOS's "
                           "anchor-free head lacks, and neither its configs nor its paper have an FCOS run"}

    def __post_init__(self) -> None:
        stages = tuple(int(s) for s in self.backbone_stages)
        if (any(s not in BACKBONE_STAGE_NUMBERS or s != t for s, t in zip(stages, self.backbone_stages))
                or len(set(stages)) != len(stages)):
            raise ValueError(f"backbone_stages={self.backbone_stages!r}: expected distinct stages among "
                             f"{BACKBONE_STAGE_NUMBERS} (3 = C3, 4 = C4, 5 = C5)")
        if self.backbone_on and not stages:
            raise ValueError("backbone terms are on (backbone_fg_weight or backbone_bg_weight > 0) but "
                             "backbone_stages is empty")
        object.__setattr__(self, "backbone_stages", stages)

    @property
    def backbone_on(self) -> bool:
        return bool(self.backbone_fg_weight or self.backbone_bg_weight)


class DeFeat(DistillationMethod):
    NAME = "defeat"
    # The released config reads the FPN maps alone (its GT masks come from the student's own targets);
    # the author's COCO recipe adds the class-head and backbone terms (module docstring).
    FIELDS = ("fpn",)
    FIELD_PRESETS = {"defeat-coco": ("fpn", "head.cls", "backbone")}
    Config = DeFeatConfig

    def __init__(self, config: DeFeatConfig, student_channels: int = 256, teacher_channels: int = 256,
                 num_levels: int = 5, student_backbone_channels: Sequence[int] | None = None,
                 teacher_backbone_channels: Sequence[int] | None = None) -> None:
        """``student_backbone_channels`` / ``teacher_backbone_channels``: C3, C4, C5 widths (e.g.
        ``ResNetFPN.stage_channels``), needed only when the backbone terms are on."""
        super().__init__(config)
        self.adapters = nn.ModuleList([nn.Conv2d(student_channels, teacher_channels, kernel_size=3, padding=1)
                                       for _ in range(num_levels)])
        with torch.no_grad():
            for adapter in self.adapters:
                adapter.weight.normal_().fmod_(2).mul_(1e-4)
        self.backbone_adapters = None  # built only with the backbone terms on: the released config has none
        if config.backbone_on:
            if student_backbone_channels is None or teacher_backbone_channels is None:
                raise ValueError("DeFeat's backbone terms need the student's and the teacher's C3-C5 widths "
                                 "(student_backbone_channels, teacher_backbone_channels) to build their adapters")
            if len(student_backbone_channels) != 3 or len(teacher_backbone_channels) != 3:
                raise ValueError(f"expected C3, C4, C5 widths, got student {tuple(student_backbone_channels)}, "
                                 f"teacher {tuple(teacher_backbone_channels)}")
            self.backbone_adapters = nn.ModuleDict()
            for stage in config.backbone_stages:
                index = BACKBONE_STAGE_NUMBERS.index(stage)
                conv = nn.Conv2d(int(student_backbone_channels[index]), int(teacher_backbone_channels[index]),
                                 kernel_size=3, padding=1)
                with torch.no_grad():
                    conv.weight.normal_().fmod_(2).mul_(1e-4)
                self.backbone_adapters[f"c{stage}"] = nn.Sequential(conv, nn.ReLU())  # the official bb_adapt

    @classmethod
    def build(cls, config: DeFeatConfig, context: BuildContext) -> DeFeat:
        return cls(config, context.student_channels, context.teacher_channels, context.num_levels,
                   context.student_backbone_channels, context.teacher_backbone_channels)

    @property
    def fields(self) -> tuple[str, ...]:
        """``fpn``; ``head.cls`` with a head weight > 0; ``backbone.cS`` per distilled stage with a
        backbone weight > 0 (so the released config never reads the backbone group)."""
        config = self.config
        fields = ("fpn",)
        if config.head_fg_weight or config.head_bg_weight:
            fields += ("head.cls",)
        if config.backbone_on:
            fields += tuple(f"backbone.c{stage}" for stage in config.backbone_stages)
        return fields

    def forward(self, student: DetectorOutput, teacher: TeacherBatch, targets: list[dict[str, Tensor]],
                iteration: int) -> dict[str, Tensor]:
        config = self.config
        teacher_fpn = require(teacher.fpn, "fpn", "DeFeat")
        gt_masks = gt_level_masks(targets, teacher.level_sizes, teacher.valid_sizes, student.strides,
                                  teacher.valid[0].device)
        num_levels = len(teacher.valid)
        fg_loss = bg_loss = 0.0
        for level, (valid, fg) in enumerate(zip(teacher.valid, gt_masks)):
            adapted = self.adapters[level](student.features[level])  # (N, C_t, H, W)
            check_same_shape(adapted, teacher_fpn[level], f"adapted features of level {level}")
            squared_error = (adapted - teacher_fpn[level]) ** 2  # (N, C, H, W)
            bg = valid & ~fg  # (N, 1, H, W)
            fg_loss = fg_loss + decoupled_term(squared_error, fg)  # (G,)
            bg_loss = bg_loss + decoupled_term(squared_error, bg)
        # Mean over the per-GPU batches.
        terms = {"defeat_fg": config.fg_weight / num_levels * fg_loss.mean(),
                 "defeat_bg": config.bg_weight / num_levels * bg_loss.mean()}
        if config.head_fg_weight or config.head_bg_weight:
            teacher_cls = require(teacher.cls, "head.cls", "DeFeat (head term)")
            fg_kl, bg_kl, fg_count, bg_count = 0.0, 0.0, 0, 0
            temperature = config.head_temperature
            for level, (valid, fg) in enumerate(zip(teacher.valid, gt_masks)):
                s_logits, t_logits = student.cls_logits[level], teacher_cls[level]  # (N, A*K, H, W)
                check_same_shape(s_logits, t_logits, f"class logits of level {level}")
                num_anchors = student.anchors[level].shape[0] // (s_logits.shape[-2] * s_logits.shape[-1])
                kl = binary_kl_with_temperature(s_logits, t_logits, temperature)  # (N, A*K, H, W)
                kl = kl.sum(dim=1, keepdim=True)  # (N, 1, H, W): Σ over anchors and classes
                bg = valid & ~fg
                fg_kl = fg_kl + sum_per_gpu_batch((kl * fg).sum(dim=(1, 2, 3)))  # (G,)
                bg_kl = bg_kl + sum_per_gpu_batch((kl * bg).sum(dim=(1, 2, 3)))
                fg_count = fg_count + sum_per_gpu_batch(fg.sum(dim=(1, 2, 3))) * num_anchors  # (G,) long
                bg_count = bg_count + sum_per_gpu_batch(bg.sum(dim=(1, 2, 3))) * num_anchors
            scale = temperature ** 2
            if config.head_fg_weight:
                per_gpu = fg_kl / fg_count.clamp(min=1)  # (G,)
                terms["defeat_head_fg"] = config.head_fg_weight * scale * per_gpu.mean()
            if config.head_bg_weight:
                per_gpu = bg_kl / bg_count.clamp(min=1)
                terms["defeat_head_bg"] = config.head_bg_weight * scale * per_gpu.mean()
        if config.backbone_on:
            terms.update(self.backbone_terms(student, teacher, targets))
        return terms

    def backbone_terms(self, student: DetectorOutput, teacher: TeacherBatch,
                       targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """``defeat_backbone_fg`` / ``defeat_backbone_bg`` (module docstring), each when its weight is > 0."""
        config = self.config
        if student.backbone_features is None:
            raise ValueError("DeFeat's backbone terms need the student's backbone maps: run the student with "
                             "return_backbone=True")
        teacher_stages = require(teacher.backbone, "backbone", "DeFeat (backbone terms)")
        device = teacher.valid[0].device
        # Every GT on the finest head grid (stride 8, P3), as the official get_bb_gt_mask.
        gt_mask = gt_backbone_mask(targets, teacher.level_sizes[0], [sizes[0] for sizes in teacher.valid_sizes],
                                   student.strides[0], device)  # (N, 1, H_3, W_3) bool
        fg_loss = bg_loss = 0.0
        for stage in config.backbone_stages:
            name, index = f"c{stage}", BACKBONE_STAGE_NUMBERS.index(stage)
            if name not in teacher_stages:
                raise ValueError(f"DeFeat's backbone terms read backbone.{name}, which this TeacherBatch does not "
                                 f"hold; cache it (precompute --fields defeat-coco or backbone)")
            valid = teacher.valid[index]  # C3..C5 share the grids of P3..P5
            adapted = self.backbone_adapters[name](student.backbone_features[index])  # (N, C_t, H, W)
            check_same_shape(adapted, teacher_stages[name], f"adapted backbone {name.upper()} maps")
            # The official F.interpolate(mask, size=[h, w], mode="nearest") of the stride-8 mask.
            fg = F.interpolate(gt_mask.float(), size=valid.shape[-2:], mode="nearest").bool() & valid
            squared_error = (adapted - teacher_stages[name]) ** 2  # (N, C_t, H, W)
            fg_loss = fg_loss + decoupled_term(squared_error, fg)  # (G,)
            bg_loss = bg_loss + decoupled_term(squared_error, valid & ~fg)
        num_stages = len(config.backbone_stages)
        terms = {}
        if config.backbone_fg_weight:
            terms["defeat_backbone_fg"] = config.backbone_fg_weight / num_stages * fg_loss.mean()
        if config.backbone_bg_weight:
            terms["defeat_backbone_bg"] = config.backbone_bg_weight / num_stages * bg_loss.mean()
        return terms


def decoupled_term(squared_error: Tensor, mask: Tensor) -> Tensor:
    """Σ M·err / max(1, 2·Σ M_c) per official per-GPU batch: err (N, C, H, W), M (N, 1, H, W) bool -> (G,)."""
    error = sum_per_gpu_batch((squared_error * mask).sum(dim=(1, 2, 3)))  # (G,)
    cells = sum_per_gpu_batch(mask.sum(dim=(1, 2, 3)).to(error.dtype))  # (G,) cells of M
    return error / (2.0 * squared_error.shape[1] * cells).clamp(min=1.0)  # Σ M_c = C · cells


def binary_kl_with_temperature(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Element-wise KL(Bern(σ(t/T)) ‖ Bern(σ(s/T))); the teacher side is detached."""
    t = teacher_logits.detach() / temperature
    s = student_logits / temperature
    p = t.sigmoid()
    # p·(log p − log q) + (1−p)·(log(1−p) − log(1−q)),
    # with log σ(x) = −softplus(−x) and log(1−σ(x)) = −softplus(x)
    return p * (F.softplus(-s) - F.softplus(-t)) + (1 - p) * (F.softplus(s) - F.softplus(t))


def gt_level_masks(targets: list[dict[str, Tensor]], level_sizes: list[tuple[int, int]],
                   valid_sizes: list[list[tuple[int, int]]], strides: tuple[int, ...],
                   device: torch.device | str = "cpu") -> list[Tensor]:
    """Per level (N, 1, H_l, W_l) bool: the cells of the GT boxes assigned to that level (see the docstring).

    Built on the CPU (a few boxes per image) and moved to ``device`` once.
    """
    num_levels = len(level_sizes)
    masks = [torch.zeros(len(targets), 1, h, w, dtype=torch.bool) for h, w in level_sizes]
    for image, target in enumerate(targets):
        boxes = target["boxes"].detach().float().cpu()  # (n, 4) xyxy pixels
        if boxes.numel() == 0:
            continue
        scale = ((boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1)).sqrt()
        box_levels = torch.floor(torch.log2(scale / FINEST_SCALE + 1e-6)).clamp(0, num_levels - 1).long()
        for box, level in zip(boxes.tolist(), box_levels.tolist()):
            fill_box_cells(masks[level][image, 0], box, strides[level], *valid_sizes[image][level])
    return [mask.to(device, non_blocking=True) for mask in masks]


def gt_backbone_mask(targets: list[dict[str, Tensor]], map_size: tuple[int, int], valid_sizes: list[tuple[int, int]],
                     stride: int, device: torch.device | str = "cpu") -> Tensor:
    """(N, 1, H, W) bool: the cells of every GT box on one grid of ``stride`` (the official
    ``get_bb_gt_mask``: no level assignment), within each image's valid region ``valid_sizes[n]``."""
    mask = torch.zeros(len(targets), 1, *map_size, dtype=torch.bool)
    for image, target in enumerate(targets):
        for box in target["boxes"].detach().float().cpu().tolist():
            fill_box_cells(mask[image, 0], box, stride, *valid_sizes[image])
    return mask.to(device, non_blocking=True)


def fill_box_cells(mask: Tensor, box_xyxy: list[float], stride: int, valid_h: int, valid_w: int) -> None:
    """Sets a box's cells [int(y1/s), int(y2/s)) × [int(x1/s), int(x2/s)) in ``mask`` (H, W), clipped
    to the valid (valid_h, valid_w) region; a box thinner than a cell sets its top-left cell."""
    x1, x2 = min(int(box_xyxy[0] / stride), valid_w), min(int(box_xyxy[2] / stride), valid_w)
    y1, y2 = min(int(box_xyxy[1] / stride), valid_h), min(int(box_xyxy[3] / stride), valid_h)
    x1, y1 = max(x1, 0), max(y1, 0)
    if x1 == x2 or y1 == y2:  # thinner than a cell: its top-left cell
        mask[min(y1, valid_h - 1), min(x1, valid_w - 1)] = True
    else:
        mask[y1:y2, x1:x2] = True

