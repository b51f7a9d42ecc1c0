"""FRS: Feature Richness Score distillation.

Paper: Du et al., "Distilling Object Detectors with Feature Richness", NeurIPS 2021.
Official code: https://github.com/duzhixing/FRS @decd60c (``detectors/distill_frs_single.py``,
``neck/adap.py``, ``config/distill_frs/*``).

Per level l, with the teacher's class logits t (N, A*K, H, W) and the student's s (a two-stage
student: the RPN objectness logits (N, A, H, W), below):

    S    = max over the A*K channels of σ(t)                      (N, 1, H, W), no gradient
    feat = Σ_{n,c,h,w} S·(F_t − Adapt_l(F_s))² / Σ_{n,h,w} S      (n over one per-GPU batch, below)
    cls  = Σ_{n,ak,h,w} S·BCE(σ(s), σ(t)) / Σ_{n,h,w} S          (element-wise over anchors and classes)

    frs_feat = w_f · ramp · Σ_l feat_l,   frs_cls = w_c · ramp · Σ_l cls_l,
    ramp = min(1, iteration / 500)

``Adapt_l`` is a 3×3 conv C_s → C_t with bias, no activation, PyTorch's default init (the
official ``ADAP`` neck), trained with the student. The richness mask is dense: it keeps rich
features outside GT boxes and drops background-like ones inside.

Official weights per family (``FAMILY_DEFAULTS``; ``distill_feat_weight``, ``distill_cls_weight``,
``distill_warm_step`` of ``config/distill_frs/resnet50_resnet101_{retinanet,gfl,fcos}_frs.py``):
RetinaNet (0.005, 0.02), GFL (0.1, 0.05), FCOS (0.01, 0.05), ramp 500 for all three.

Faster R-CNN (``frcnn``; ``detectors/distill_frs_two.py`` lines 78-111, config
``config/distill_frs/resnet50_resnet101_faster_rcnn_frs.py`` lines 12-22): the same loss lines on
``rpn_head(x)[0]``, the RPN objectness logits (N, A = 3, H, W), over the 5 RPN/FPN levels P2..P6
(strides 4..64). S = max over the A anchors of σ(teacher objectness) (cached ``head.rpn.obj``,
``TeacherBatch.rpn_obj``); the head term is the BCE between σ(student ``rpn_objectness``) and
σ(teacher objectness) per anchor channel, masked by S and divided by Σ S as above; the feature term
is unchanged (adapters 3×3, one per level, on P2..P6). Weights w_f 0.002, w_c 0.1, ramp 500. There
is no RoI-head or box term. Fields: ``fpn.p2`` .. ``fpn.p6`` and ``head.rpn.obj``.

FCOS: the same code reads ``bbox_head(x)[0]``, the class scores, for both S and the head term;
the centerness (``[2]``) is read nowhere, so S is max σ(class logits) without the centerness
factor of FCOS's detection score, and the head term covers the class logits only. (That config's
models are mmdetection's original FCOS, ``fcos_r50_caffe_fpn_gn-head_mstrain_640-800_2x_coco``
student, ``fcos_r101_caffe_...`` teacher: ``detectors.fcos.MMDET_PLAIN_FCOS``.)

Batch semantics: the official runs put 2 images on each GPU and divide by the Σ S of those 2
images; DDP then averages the GPUs. So a batch of B images is split into groups of 2 consecutive
images (the last group of an odd B holds 1 image), ``feat`` and ``cls`` are computed per group as
above (Σ over the group / Σ S of the group) and the terms are the mean over the groups: 1 device ×
16 images trains like 8 GPUs × 2. ``tests/test_reference_frs.py`` checks this against a plain-torch
transcription of ``Distilling_FRS_Single.forward_train`` at 2 and 8 images, with and without padding;
``tests/test_two_stage_frs_icd.py`` checks the Faster R-CNN case against ``Distilling_FRS_Two.forward_train``.

Remaining differences from the official code:

- Sums run only over each image's valid region; the official code also counts batch padding
  (the smaller image of a pair is padded to the larger), where the teacher's logits are real
  values of the zero-padded image, so S > 0 there. Its size is the teacher's richness in the
  padding times the padded area: 0 for a pair of equal sizes, up to 41 % of the pair's map for a
  portrait image (1333×800) paired with a landscape one (800×1333). It cannot be reproduced from
  the cache, which holds only each image's own region; the reference test checks the rest of the
  computation with the official code given a teacher whose richness is 0 on the padding.
- BCE is computed from logits (``binary_cross_entropy_with_logits``), which equals the official
  ``F.binary_cross_entropy`` on sigmoids (within 1e-6 relative in the reference test) except where
  that one clamps log(0) at −100 (|logit| > ~17 in float32).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from detectors.detector import DetectorOutput
from detectors.frcnn import TwoStageOutput
from train.methods.base import (BuildContext, DistillationMethod, MethodConfig, check_same_shape, linear_ramp,
                                pyramid_fields, require, sum_per_gpu_batch)
from train.teacher_batch import TeacherBatch


def richness_score(cls_logits: Tensor) -> Tensor:
    """FRS's richness mask S of one level: class logits (N, A*K, H, W) (a two-stage teacher: RPN
    objectness (N, A, H, W)) -> max over the channels of σ(logits), (N, 1, H, W). Used by
    :meth:`FRS.forward` and by the pictures in ``train.viz``."""
    return cls_logits.sigmoid().amax(dim=1, keepdim=True)


@dataclass(frozen=True)
class FRSConfig(MethodConfig):
    feat_weight: float = 0.005      # w_f (RetinaNet); GFL 0.1; FCOS 0.01; Faster R-CNN 0.002
    cls_weight: float = 0.02        # w_c (RetinaNet); GFL 0.05; FCOS 0.05; Faster R-CNN 0.1
    warmup_iters: int = 500         # linear ramp of both terms from 0 (distill_warm_step, every family)

    # duzhixing/FRS @decd60c config/distill_frs/resnet50_resnet101_{retinanet,gfl,fcos}_frs.py;
    # frcnn: resnet50_resnet101_faster_rcnn_frs.py lines 12-14 (Distilling_FRS_Two)
    FAMILY_DEFAULTS = {"retina": {},
                       "gfl": {"feat_weight": 0.1, "cls_weight": 0.05},
                       "fcos": {"feat_weight": 0.01, "cls_weight": 0.05},
                       "frcnn": {"feat_weight": 0.002, "cls_weight": 0.1}}


class FRS(DistillationMethod):
    NAME = "frs"
    FIELDS = ("fpn", "head.cls")
    FAMILY_FIELDS = {"frcnn": (*pyramid_fields("frcnn"), "head.rpn.obj")}   # S and the head term: the RPN
    Config = FRSConfig
    PICTURE_FIELDS = ("head.cls", "head.rpn.obj")   # a dense teacher's class logits, a two-stage one's RPN
    PICTURE_HELP = ("FRS feature richness S = max over classes of σ(teacher class logits), per level P3..P7, "
                    "over the image (cached head.cls); a two-stage teacher's: max over its anchors of σ(RPN "
                    "objectness), per level P2..P6 (cached head.rpn.obj)")

    def __init__(self, config: FRSConfig, student_channels: int = 256, teacher_channels: int = 256,
                 num_levels: int = 5) -> None:
        super().__init__(config)
        # No adapters when the feature term is off (unused parameters would trouble DDP).
        self.adapters = nn.ModuleList([nn.Conv2d(student_channels, teacher_channels, kernel_size=3, padding=1)
                                       for _ in range(num_levels if config.feat_weight else 0)])

    @classmethod
    def build(cls, config: FRSConfig, context: BuildContext) -> FRS:
        return cls(config, context.student_channels, context.teacher_channels, context.num_levels)

    @property
    def fields(self) -> tuple[str, ...]:
        # The richness mask always needs the head's logits; the features only for the feature term.
        logits = ("head.rpn.obj",) if self.two_stage else ("head.cls",)
        return pyramid_fields(self.family) + logits if self.config.feat_weight else logits

    def forward(self, student: DetectorOutput | TwoStageOutput, teacher: TeacherBatch,
                targets: list[dict[str, Tensor]], iteration: int) -> dict[str, Tensor]:
        config = self.config
        # S and the head term read the class logits, or a two-stage detector's RPN objectness.
        if self.two_stage:
            teacher_logits = require(teacher.rpn_obj, "head.rpn.obj", "FRS")  # per level (N, A, H, W)
            student_logits, what = student.rpn_objectness, "RPN objectness"
        else:
            teacher_logits = require(teacher.cls, "head.cls", "FRS")  # per level (N, A*K, H, W)
            student_logits, what = student.cls_logits, "class logits"
        if config.feat_weight:
            teacher_fpn = require(teacher.fpn, "fpn", "FRS")
        feat_loss = cls_loss = 0.0
        for level, valid in enumerate(teacher.valid):
            t_logits, s_logits = teacher_logits[level], student_logits[level]
            check_same_shape(s_logits, t_logits, f"{what} of level {level}")
            richness = richness_score(t_logits) * valid  # (N, 1, H, W), zero outside valid
            richness_sum = sum_per_gpu_batch(richness.sum(dim=(1, 2, 3))).clamp(min=1e-12)  # (G,)
            if config.feat_weight:
                adapted = self.adapters[level](student.features[level])  # (N, C_t, H, W)
                check_same_shape(adapted, teacher_fpn[level], f"adapted features of level {level}")
                per_image = ((teacher_fpn[level] - adapted) ** 2 * richness).sum(dim=(1, 2, 3))  # (N,)
                feat_loss = feat_loss + sum_per_gpu_batch(per_image) / richness_sum  # (G,)
            if config.cls_weight:
                bce = F.binary_cross_entropy_with_logits(s_logits, t_logits.sigmoid(), reduction="none")
                per_image = (bce * richness).sum(dim=(1, 2, 3))  # (N,)
                cls_loss = cls_loss + sum_per_gpu_batch(per_image) / richness_sum  # (G,)
        ramp = linear_ramp(iteration, config.warmup_iters)
        terms = {}
        if config.feat_weight:
            terms["frs_feat"] = config.feat_weight * ramp * feat_loss.mean()  # mean over the per-GPU batches
        if config.cls_weight:
            terms["frs_cls"] = config.cls_weight * ramp * cls_loss.mean()
        return terms

    @classmethod
    def picture_maps(cls, painter, view) -> tuple[list, str]:
        """The richness S (h_l, w_l) of each of the cache's levels, and the field prefix it comes from:
        the class logits, or a two-stage teacher's RPN objectness."""
        logits = "head.rpn.obj" if painter.two_stage else "head.cls"
        painter.require(view, cls.NAME, (logits,))
        return [richness_score(maps[None])[0, 0].numpy() for maps in view.level_maps(logits)], logits

    @classmethod
    def draw_picture(cls, painter, view):
        """The richness S of each level over the view image, from the cached class logits (RPN objectness)."""
        from matplotlib.colors import Normalize

        from train import viz
        maps, logits = cls.picture_maps(painter, view)
        fig, axes = viz.new_figure(2, 3, view.image_hw)
        viz.show_view(axes[0, 0], view)
        painter.draw_gt(axes[0, 0], view)
        axes[0, 0].set_title("view image, GT dashed", fontsize=9)
        norm = Normalize(0, 1)
        mappable = None
        for level, (ax, grid) in enumerate(zip(axes.flat[1:], maps)):
            viz.show_view(ax, view, grey=True)
            mappable = viz.overlay_map(ax, grid, view.strides[level], view, norm)
            painter.draw_gt(ax, view, with_labels=False)
            ax.set_title(f"{viz.level_title(level, view)}\nmax S {grid.max():.2f}, mean {grid.mean():.2f}", fontsize=9)
        fig.colorbar(mappable, ax=axes.ravel().tolist(), shrink=0.8, label="richness S")
        what = ("the A anchors of σ(teacher RPN objectness)" if painter.two_stage
                else "classes of σ(teacher class logits)")
        fig.suptitle(f"FRS feature richness S = max over {what}, per FPN level\n"
                     f"{view.describe()}; from the cached {logits}", fontsize=10)
        return painter.save(fig, view, cls.NAME)
