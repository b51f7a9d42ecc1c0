"""LD: Localization Distillation for GFL students.

Paper: Zheng et al., "Localization Distillation for Dense Object Detection", CVPR 2022 (and the
TPAMI extension). Official code: https://github.com/HikariTJU/LD @4287990
(``mmdet/models/dense_heads/ld_head.py``, ``mmdet/models/losses/kd_loss.py``,
``configs/ld/ld_r50_gflv1_r101_fpn_coco_1x.py``).

Reads only region rows (``region.*``): ATSS positives and VLR locations of each view, with the
teacher's class logits (``cls``, K) and box distributions (``box_dist``, 4·(reg_max+1)) there.
Each row names a level and a flat index ``(h·w_l + w)·A + a`` on the image's own level grid;
the student's logits are gathered at the same place.

    KL_T(s, t) = T² · mean over bins of softmax(t/T)·(log softmax(t/T) − log softmax(s/T))
                 (mmdet's ``knowledge_distillation_kl_div_loss``: ``kl_div(...).mean(1) · T²``)

    ld_main = 0.25 · Σ_pos Σ_4 sides w·KL_10(box_s, box_t) / 4 / N_pos
              w = max_k σ(student class logit) at the row, detached
    ld_vlr  = 0.25 · Σ_vlr Σ_4 sides IoU·KL_10(box_s, box_t) / 16 / N_pos
              IoU = region.iou, the row's IoU with its GT (VLR membership is by DIoU, the weight is
              the IoU: ``assigned_neg`` in the official ATSSAssigner.assign_neg)
    ld_kd   = 10 · Σ_levels Σ_{pos on level} KL_2(cls_s, cls_t) / (positives on that level)
              (KL over the K class logits with a softmax, as the official code)
    VLR KD has weight 0 in the official config (``vlr_kd_weight``; its term is left out when 0).

N_pos = Σ_images max(1, positives of the image) (GFL's count; averaged over DDP ranks).

Deviation from the official code, on purpose: the official ``ld_main`` and ``ld_vlr`` are sums
over the batch (``avg_factor`` 4 and 16, no count), so their size grows with the number of
positives and with the per-GPU batch (the official runs use 2 images per GPU). Here both are
divided by N_pos (``normalize=True``), like GFL's own box losses; ``normalize=False`` gives the
official sums. Note that dividing by N_pos shrinks these two terms by that count relative to the
official weights (0.25 was tuned for the sums); the KD term is normalised in both.
The optional imitation term (MSE between F_s and F_t in a GT-derived region) is not implemented:
the cache's region rows carry no FPN features.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from detectors.losses import mean_over_ranks
from detectors.outputs import DetectorOutput
from store.schema import REGION_POSITIVE, REGION_VLR
from train.methods.base import (DistillationMethod, MethodConfig, kl_divergence_with_temperature, require,
                                zero_term)
from train.teacher_batch import TeacherBatch


@dataclass(frozen=True)
class LDConfig(MethodConfig):
    ld_weight: float = 0.25         # main LD at positives
    ld_temperature: float = 10.0
    vlr_weight: float = 0.25        # LD at VLR rows
    vlr_temperature: float = 10.0
    kd_weight: float = 10.0         # class-logit KD at positives
    kd_temperature: float = 2.0
    vlr_kd_weight: float = 0.0      # class-logit KD at VLR rows (off in the official config)
    normalize: bool = True          # divide ld_main and ld_vlr by N_pos (the official code does not)

    # LD needs box distributions: GFL only.
    FAMILY_DEFAULTS = {"gfl": {}}


@dataclass
class RegionRows:
    """Region rows with the student's outputs gathered at them."""

    batch_index: Tensor      # (R,) long
    level: Tensor            # (R,) long
    kind: Tensor             # (R,) long
    iou: Tensor | None       # (R,)
    teacher_cls: Tensor      # (R, K)
    teacher_box: Tensor      # (R, B)
    student_cls: Tensor      # (R, K)
    student_box: Tensor      # (R, B)


class LD(DistillationMethod):
    NAME = "ld"
    FIELDS = ("region",)
    Config = LDConfig

    def forward(self, student: DetectorOutput, teacher: TeacherBatch, targets: list[dict[str, Tensor]],
                iteration: int) -> dict[str, Tensor]:
        config = self.config
        rows = gather_region_rows(student, teacher)
        positive, vlr = rows.kind == REGION_POSITIVE, rows.kind == REGION_VLR
        bins = rows.teacher_box.shape[1] // 4  # reg_max + 1

        positives_per_image = torch.bincount(rows.batch_index[positive], minlength=teacher.num_images)
        num_positive = mean_over_ranks(positives_per_image.clamp(min=1).sum().float())
        normaliser = num_positive if config.normalize else 1.0

        def side_kl(mask: Tensor, temperature: float) -> Tensor:
            """(r, 4) KL_T of each side's distribution at the rows in ``mask``."""
            s_box = rows.student_box[mask].reshape(-1, 4, bins)
            t_box = rows.teacher_box[mask].reshape(-1, 4, bins)
            return kl_divergence_with_temperature(s_box, t_box, temperature)

        keep_in_graph = zero_term(*student.box_outputs, *student.cls_logits)
        terms: dict[str, Tensor] = {}
        if config.ld_weight:
            weights = rows.student_cls[positive].detach().sigmoid().amax(dim=1)  # (P,)
            kl = side_kl(positive, config.ld_temperature)  # (P, 4)
            terms["ld_main"] = config.ld_weight * (weights[:, None] * kl).sum() / 4 / normaliser + keep_in_graph
        if config.vlr_weight:
            iou = require(rows.iou, "region.iou", "LD (VLR term)")[vlr]  # (V,)
            kl = side_kl(vlr, config.vlr_temperature)  # (V, 4)
            terms["ld_vlr"] = config.vlr_weight * (iou[:, None] * kl).sum() / 16 / normaliser + keep_in_graph
        if config.kd_weight:
            terms["ld_kd"] = config.kd_weight * self._kd_per_level(rows, positive, config.kd_temperature) \
                + keep_in_graph
        if config.vlr_kd_weight:
            terms["ld_vlr_kd"] = config.vlr_kd_weight * self._kd_per_level(rows, vlr, config.kd_temperature) \
                + keep_in_graph
        return terms

    @staticmethod
    def _kd_per_level(rows: RegionRows, mask: Tensor, temperature: float) -> Tensor:
        """Σ_levels mean over the level's rows in ``mask`` of KL_T over the class logits."""
        kl = kl_divergence_with_temperature(rows.student_cls[mask], rows.teacher_cls[mask], temperature)  # (r,)
        levels = rows.level[mask]
        total = kl.new_zeros(())
        for level in levels.unique():
            on_level = levels == level
            total = total + kl[on_level].sum() / on_level.sum()
        return total


def gather_region_rows(student: DetectorOutput, teacher: TeacherBatch) -> RegionRows:
    """The student's class logits and box outputs at the teacher's region rows.

    A row's ``index`` is ``(y·w_l + x)·A + a`` on the image's own level grid (width ``w_l`` of its
    valid region, as precompute ran the teacher), so it is decoded with that width and then read
    from the student's batch-padded maps at (y, x).
    """
    region = require(teacher.region, "region", "LD")
    teacher_cls, teacher_box = region["cls"], region["box_dist"]  # (R, K), (R, B)
    num_classes, box_channels = teacher_cls.shape[1], teacher_box.shape[1]
    map_h, map_w = student.cls_logits[0].shape[-2:]
    num_anchors = student.anchors[0].shape[0] // (map_h * map_w)
    if student.cls_logits[0].shape[1] != num_anchors * num_classes:
        raise ValueError(f"teacher region rows have {num_classes} class logits but the student has "
                         f"{student.cls_logits[0].shape[1]} channels for {num_anchors} anchors per location")
    if student.box_outputs[0].shape[1] != num_anchors * box_channels:
        raise ValueError(f"teacher region rows have {box_channels} box outputs but the student has "
                         f"{student.box_outputs[0].shape[1]} channels for {num_anchors} anchors per location")
    if box_channels % 4:
        raise ValueError(f"LD needs box distributions (4·(reg_max+1) per anchor), got {box_channels} box outputs")

    batch_index, level, index = region["batch_index"], region["level"], region["index"]
    if bool((level < 0).any()) or bool((level >= len(student.cls_logits)).any()):
        raise ValueError(f"region rows name levels outside 0..{len(student.cls_logits) - 1}")
    device = teacher_cls.device
    widths = torch.tensor([[w for _, w in sizes] for sizes in teacher.valid_sizes], device=device)  # (N, L)
    heights = torch.tensor([[h for h, _ in sizes] for sizes in teacher.valid_sizes], device=device)  # (N, L)
    anchor = index % num_anchors
    location = torch.div(index, num_anchors, rounding_mode="floor")
    row_width = widths[batch_index, level]
    y = torch.div(location, row_width, rounding_mode="floor")
    x = location % row_width
    if bool((y >= heights[batch_index, level]).any()) or bool((index < 0).any()):
        raise ValueError("a region row's index lies outside its image's valid region on its level; "
                         "the cache and the student batch disagree on the view")

    row_order, cls_parts, box_parts = [], [], []
    for lvl in range(len(student.cls_logits)):
        rows_on_level = (level == lvl).nonzero().squeeze(1)  # (r,)
        n, _, h, w = student.cls_logits[lvl].shape
        cls_map = student.cls_logits[lvl].view(n, num_anchors, num_classes, h, w)
        box_map = student.box_outputs[lvl].view(n, num_anchors, box_channels, h, w)
        b, a = batch_index[rows_on_level], anchor[rows_on_level]
        yy, xx = y[rows_on_level], x[rows_on_level]
        # Advanced indices split by a slice put the row dimension first: (r, K) and (r, B).
        cls_parts.append(cls_map[b, a, :, yy, xx])
        box_parts.append(box_map[b, a, :, yy, xx])
        row_order.append(rows_on_level)
    back_to_rows = torch.cat(row_order).argsort()  # level-grouped order -> original row order
    student_cls = torch.cat(cls_parts)[back_to_rows]  # (R, K)
    student_box = torch.cat(box_parts)[back_to_rows]  # (R, B)
    return RegionRows(batch_index, level, region["kind"], region.get("iou"), teacher_cls, teacher_box,
                      student_cls, student_box)
