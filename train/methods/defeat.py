"""DeFeat: distillation with decoupled foreground and background features.

Paper: Guo et al., "Distilling Object Detectors via Decoupled Features", CVPR 2021.
Official code: https://github.com/ggjy/DeFeat.pytorch @c46a793 (``mmdet/apis/train.py``:
``batch_processor_kd`` with ``neck-adapt,neck-decouple,mask-neck-gt,pixel-wise``;
``mmdet/models/dense_heads/anchor_head.py``: ``get_gt_mask``, ``_map_roi_levels``;
``mmdet/models/detectors/single_stage_kd.py`` and ``two_stage_kd.py``: the adapters; Faster R-CNN
below).

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
for fg and bg, T = 1; on Faster R-CNN it is that term, below). For the one-stage heads we use, per
anchor at the fg (M) and bg (B)
locations, the binary KL of the sigmoid class scores at temperature T summed over classes,

    defeat_head_fg = w_hfg · T² · Σ_{fg anchors} Σ_k KL(Bern(σ(t_k/T)) ‖ Bern(σ(s_k/T))) / #fg anchors

and likewise ``defeat_head_bg``. Binary rather than softmax KL because a sigmoid head has no
background class: a softmax over K classes would throw away "how much background" a location is.

Batch semantics: the official runs put 2 images on each GPU; the normalisers max(1, 2·Σ M_c)
and max(1, 2·Σ B_c) (and the head term's anchor or RoI counts) are sums over those 2 images, and DDP
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
- The head term on the one-stage families is our design (see above), not the author's.
- Backbone mask: the stride-8 grid (P3) is the finest level of these one-stage heads, which the
  official single-stage code would use (``bbox_head.get_bb_gt_mask``; as released that call passes
  a ``version`` argument the function does not take, so only the two-stage path runs, on the RPN's
  finest level, stride 4). The background is again restricted to the valid region.

Faster R-CNN (family ``frcnn``, ``detectors/frcnn.py``): the official code's own detector
(``two_stage_kd.py`` ``TwoStageDetectorKD``; the released config
``configs/kd_faster_rcnn/voc_stu_faster_rcnn_r50_decouple_neck.py`` lines 5–19). Teacher fields:
``fpn.p2`` .. ``fpn.p6`` (``pyramid_fields``), nothing else; with a head weight > 0 also the
teacher's RoI head on the student's RoIs (``reads_teacher_roi_head``), which reads ``fpn.p2`` ..
``fpn.p5``, already among them.

- Neck term: the formulas above on the student's P2..P6 (``TwoStageOutput.features``) with L = 5 and
  level k = P(k+2) of stride ``student.strides[k]`` (4, 8, ..., 64): the official mask is
  ``rpn_head.get_gt_mask(rpn_outs[0], ...)`` (``two_stage_kd.py`` line 189), the same
  ``get_gt_mask`` / ``_map_roi_levels`` (``anchor_head.py`` lines 168–173, 262–297) over the RPN's 5
  levels: √((w+1)(h+1)) < 112 -> P2, [112, 224) -> P3, [224, 448) -> P4, [448, 896) -> P5, else
  P6. Same cell rule, the same adapter per level (``neck_adapt``, ``two_stage_kd.py`` lines 50–62,
  99–102), the same normalisers per per-GPU batch (``batch_processor_kd`` lines 300–342). Weights:
  the author's COCO 4/16 (the released VOC config: ``hint_neck_w=3``, ``hint_neck_back_w=12``).
- Head term (off by default: ``head-cls`` is not in the released type): the paper's decoupled
  proposals, the official ``head-cls`` + ``KL-decouple`` branch (``mmdet/apis/train.py``
  ``KLDivergenceLoss`` lines 88–103, the branch lines 228–298; its values ``head_cls_w =
  head_cls_back_w = 2``, ``head_cls_T = 1``). Over the student's sampled RoIs r
  (``TwoStageOutput.rois``, split by the sampler's labels ``roi_labels``: > 0 fg, 0 bg), s_r the
  student's K+1 RoI logits and t_r the teacher's RoI head on the same RoI
  (``teacher.roi_head(student.rois)``: the partial teacher, ``train/partial_teacher.py``),

      defeat_head_fg = w_hfg · T² · Σ_{r fg} Σ_c KL_c(softmax(t_r/T) ‖ softmax(s_r/T)) / #fg RoIs
      defeat_head_bg = w_hbg · T² · Σ_{r bg} Σ_c KL_c(softmax(t_r/T) ‖ softmax(s_r/T)) / #bg RoIs

  (0 for a part without RoIs), sums and counts per per-GPU batch of 2 images, then the mean over
  the groups; one T for both parts (``head_cls_back_T`` is read nowhere in the official code).
  These are the official ``SampleSTU`` rows (lines 154–172: the teacher's head run with
  ``sampling=`` the student's sampling results), whose logits and labels belong to the same RoIs.
  The official default, ``SampleTEA`` (lines 203–226), re-runs the student's head on the RoIs the
  teacher sampled from its own proposals, and splits them by the *student's* sampled labels, so
  the rows between the two samplers' positive counts of an image are mislabelled; and a RoI set
  the teacher samples from its own RPN at training time cannot be cached.
- Backbone terms: refused (ValueError naming ``backbone_fg_weight`` / ``backbone_bg_weight`` when
  the config is built, ``DeFeatConfig.for_family``): a two-stage cache holds no backbone maps
  (precompute writes none for a two-stage teacher); the released config has them off
  (``hint_bb_w=0``, ``hint_bb_back_w=0``).
- RPN: no term, because the official repository defines none, in any mode: ``batch_processor_kd``
  receives both models' RPN outputs (``rpn_outs_s``, ``rpn_outs_t``) and never reads them, and its
  RPN-style helpers (``l1rpnloss``, ``mseloss``, lines 121–144) are never called. The RPN's score
  maps only give the GT masks their shapes; its input features P2..P6 are what the neck term distils.

Remaining differences on Faster R-CNN: those of the neck term above (background and GT cells within
each image's valid region); the head term on the student's RoIs (``SampleSTU``) rather than the
official default ``SampleTEA``; the teacher's RoI head pooling each image's own (canonically
padded) P2..P5, as cached, rather than the batch's padded maps; the class columns in another order
(background first here, last in mmdetection), which a softmax KL over all columns does not see.
``tests/test_two_stage_defeat.py`` checks both terms against transcriptions of the official
two-stage code (``get_gt_mask`` on 5 levels, the neck loop, ``KLDivergenceLoss`` with ``KL-decouple``)
at 2 and 4 images.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detectors.detector import DetectorOutput
from detectors.frcnn import TwoStageOutput
from detectors.zoo import TWO_STAGE_FAMILIES
from train.methods.base import (BuildContext, DistillationMethod, MethodConfig, check_same_shape, pyramid_fields,
                                require, sum_per_gpu_batch)
from train.teacher_batch import TeacherBatch

# FPN's RoI-to-level rule (as mmdetection's ``_map_roi_levels``): canonical size 56 -> level 0.
FINEST_SCALE = 56
# ResNet stages with backbone terms: C3, C4, C5 (``backbone.c3`` ...), on the grids of P3, P4, P5.
BACKBONE_STAGE_NUMBERS = (3, 4, 5)


@dataclass(frozen=True)
class DeFeatConfig(MethodConfig):
    fg_weight: float = 4.0          # w_fg (COCO, per the author; VOC release 3)
    bg_weight: float = 16.0         # w_bg (COCO, per the author; VOC release 12)
    head_fg_weight: float = 0.0     # head KL at fg anchors, or fg RoIs on frcnn (off as released; head_cls_w=2)
    head_bg_weight: float = 0.0     # head KL at bg anchors, or bg RoIs on frcnn (off; head_cls_back_w=2)
    head_temperature: float = 1.0   # T of the head term
    backbone_fg_weight: float = 0.0  # backbone term at fg cells (hint_bb_w; 0 in the released config)
    backbone_bg_weight: float = 0.0  # backbone term at bg cells (hint_bb_back_w; 0 in the released config)
    backbone_stages: tuple[int, ...] = (4, 5)  # ResNet stages distilled: 3 = C3, 4 = C4, 5 = C5
    #                                            (the author's "stage 3 and 4" = C4, C5)

    # ggjy/DeFeat.pytorch @c46a793: the GT mask is AnchorHead.get_gt_mask (dense_heads/anchor_head.py),
    # called by SingleStageDetectorKD (detectors/single_stage_kd.py); released configs: Faster R-CNN (VOC).
    # RetinaNet is the paper's one-stage result; GFL (an anchor head too) is not in that code: the same
    # values here. Its FCOSHead (dense_heads/fcos_head.py) has no get_gt_mask: no FCOS.
    # Faster R-CNN: the official code's own detector (ggjy/DeFeat.pytorch @c46a793
    # configs/kd_faster_rcnn/voc_stu_faster_rcnn_r50_decouple_neck.py; detectors/two_stage_kd.py calls
    # rpn_head.get_gt_mask, dense_heads/anchor_head.py get_gt_mask, over P2-P6): the author's COCO 4/16
    # as above (that VOC config has hint_neck_w=3, hint_neck_back_w=12), head terms off as released
    # (head-cls not in its type; head_cls_w = head_cls_back_w = 2, head_cls_T = 1 if switched on).
    FAMILY_DEFAULTS = {"retina": {}, "gfl": {}, "frcnn": {}}
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

    @classmethod
    def for_family(cls, family: str, **overrides) -> DeFeatConfig:
        config = super().for_family(family, **overrides)
        if family in TWO_STAGE_FAMILIES and config.backbone_on:
            raise ValueError(f"DeFeat's backbone terms (backbone_fg_weight={config.backbone_fg_weight}, "
                             f"backbone_bg_weight={config.backbone_bg_weight}) are not available for the "
                             f"two-stage family {family!r}: its caches hold no backbone maps; set both to 0")
        return config

    @property
    def backbone_on(self) -> bool:
        return bool(self.backbone_fg_weight or self.backbone_bg_weight)

    @property
    def head_on(self) -> bool:
        return bool(self.head_fg_weight or self.head_bg_weight)


class DeFeat(DistillationMethod):
    NAME = "defeat"
    # The released config reads the FPN maps alone (its GT masks come from the student's own targets);
    # the author's COCO recipe adds the class-head and backbone terms (module docstring).
    FIELDS = ("fpn",)
    # Faster R-CNN: P2..P6, which hold the P2..P5 maps of the teacher's RoI head (the head term) too.
    FAMILY_FIELDS = {"frcnn": pyramid_fields("frcnn")}
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
        backbone weight > 0 (so the released config never reads the backbone group). Two-stage:
        ``fpn.p2`` .. ``fpn.p6`` alone, which hold the P2..P5 maps the teacher's RoI head reads."""
        config = self.config
        if self.two_stage:
            return pyramid_fields(self.family)
        fields = ("fpn",)
        if config.head_on:
            fields += ("head.cls",)
        if config.backbone_on:
            fields += tuple(f"backbone.c{stage}" for stage in config.backbone_stages)
        return fields

    @property
    def reads_teacher_roi_head(self) -> bool:
        """Two-stage with a head weight > 0: the head term compares RoI scores on the student's RoIs."""
        return self.two_stage and self.config.head_on

    def forward(self, student: DetectorOutput | TwoStageOutput, teacher: TeacherBatch,
                targets: list[dict[str, Tensor]], iteration: int) -> dict[str, Tensor]:
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
        if config.head_on and isinstance(student, TwoStageOutput):
            terms.update(self.roi_head_terms(student, teacher))
        elif config.head_on:
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

    def roi_head_terms(self, student: TwoStageOutput, teacher: TeacherBatch) -> dict[str, Tensor]:
        """``defeat_head_fg`` / ``defeat_head_bg`` of a two-stage student (module docstring), each when
        its weight is > 0: the teacher's RoI head on the student's sampled RoIs (official SampleSTU)."""
        config = self.config
        if teacher.roi_head is None:
            raise ValueError("DeFeat's head term on a two-stage student needs the teacher's RoI head on the "
                             "student's RoIs (TeacherBatch.roi_head, bound by the trainer when the method's "
                             "reads_teacher_roi_head is True: build it for the student's family)")
        if student.roi_labels is None:
            raise ValueError("DeFeat's head term needs the student's sampled RoIs and their labels: run the "
                             "student with targets")
        _, teacher_logits, _ = teacher.roi_head(student.rois)  # (R, K+1), no gradient
        check_same_shape(student.roi_cls_logits, teacher_logits, "RoI class logits")
        temperature = config.head_temperature
        kl = softmax_kl_with_temperature(student.roi_cls_logits, teacher_logits, temperature)  # (R,)
        fg = torch.cat(student.roi_labels) > 0  # (R,): the sampler's positives; column 0 is the background
        rois_per_image = [len(rois) for rois in student.rois]
        terms = {}
        for name, weight, rows in (("defeat_head_fg", config.head_fg_weight, fg),
                                   ("defeat_head_bg", config.head_bg_weight, ~fg)):
            if not weight:
                continue
            kl_sum = torch.stack([part.sum() for part in (kl * rows).split(rois_per_image)])  # (N,)
            count = torch.stack([part.sum() for part in rows.split(rois_per_image)]).to(kl.dtype)  # (N,)
            per_gpu = sum_per_gpu_batch(kl_sum) / sum_per_gpu_batch(count).clamp(min=1)  # (G,)
            terms[name] = weight * temperature ** 2 * per_gpu.mean()
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


def softmax_kl_with_temperature(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Per row KL(softmax(t/T) ‖ softmax(s/T)) summed over the columns: (R, K+1) -> (R,); the teacher
    side is detached (the official ``KLDivergenceLoss`` before its sum over rows and its T²)."""
    log_p_student = F.log_softmax(student_logits / temperature, dim=1)
    p_teacher = F.softmax(teacher_logits.detach() / temperature, dim=1)
    return F.kl_div(log_p_student, p_teacher, reduction="none").sum(dim=1)


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

