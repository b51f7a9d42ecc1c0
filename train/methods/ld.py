"""LD: Localization Distillation for GFL students.

Paper: Zheng et al., "Localization Distillation for Dense Object Detection", CVPR 2022 (and the
TPAMI extension). Official code: https://github.com/HikariTJU/LD @4287990
(``mmdet/models/dense_heads/ld_head.py`` ``LDHead.loss_single``, ``mmdet/models/losses/kd_loss.py``,
``mmdet/core/bbox/assigners/atss_assigner.py`` ``ATSSAssigner.get_vlr_region``,
``configs/ld/ld_r50_gflv1_r101_fpn_coco_1x.py``).

Reads region rows (``region.*``): ATSS positives and VLR locations of each view, with the
teacher's class logits (``cls``, K) and box distributions (``box_dist``, 4·(reg_max+1)) there
(``precompute.fields.ld_regions``; the VLR rule, official by default, is recorded in the cache
manifest's ``options`` and checked against ``LDConfig.vlr_rule``: :attr:`LD.cache_options`).
Each row names a level and a flat index ``(h·w_l + w)·A + a`` on the image's own level grid;
the student's logits are gathered at the same place. Only with ``imitation_weight > 0`` it also
reads the teacher's FPN maps (``fpn``; :attr:`LD.fields`), for the imitation term.

    KL_T(s, t) = T² · mean over bins of softmax(t/T)·(log softmax(t/T) − log softmax(s/T))
                 (``knowledge_distillation_kl_div_loss``: ``kl_div(...).mean(1) · T²``, teacher detached)

Per group g of 2 consecutive images of the batch (the official ``samples_per_gpu=2``):

    ld_main(g) = 0.25 · Σ_{pos in g} Σ_4 sides w·KL_10(box_s, box_t) / 4
                 w = max_k σ(student class logit) at the row, detached; ``avg_factor=4.0``, so
                 mmdet's ``weight_reduce_loss`` gives sum / 4: a sum over the positives, no count
    ld_vlr(g)  = 0.25 · Σ_{vlr in g} Σ_4 sides IoU·KL_10(box_s, box_t) / 16
                 IoU = region.iou, the row's IoU with its GT (VLR membership is by the "DIoU",
                 the weight is the IoU: ``vlr_region_iou`` of ``get_vlr_region``); ``avg_factor=16.0``
    ld_kd(g)   = 10 · Σ_levels Σ_{pos of g on level} KL_2(cls_s, cls_t) / (positives of g on that level)
                 (KL over the K class logits with a softmax, label weight 1, ``avg_factor`` = the
                 level's positives in the 2 images; a level without positives adds 0)
    VLR KD: the official ``loss_kd_neg`` is multiplied by 0 (``vlr_kd_weight`` 0; the term is left
    out when 0; when set it is vlr_kd_weight · the same per-group, per-level mean at the VLR rows).
    ld_im(g)   = imitation_weight · Σ_levels [level has a positive of g] ·
                 mean over (locations of g's imitation region on the level, C channels) of (F_s − F_t)²
                 ('finegrained' ``loss_im``: ``IMLoss`` is ``F.mse_loss`` with its default mean, no
                 adapter, teacher under no_grad; summed over levels by mmdet's ``_parse_losses``.
                 Off by default as in the R18/R34/R101 configs; the R50 COCO config sets 2.0:
                 ``--set ld.imitation_weight=2``, with a cache that holds ``fpn``: precompute
                 ``--fields ld,fpn``; the trainer refuses a cache without it.) The region is
                 computed here from the anchors and the GT boxes (:func:`finegrained_region`): per
                 image, the anchors of its valid region (every level together) whose IoU with a GT
                 is > 0.5 · that GT's largest IoU over those anchors. A level on which the 2 images
                 have no ATSS positive (no ``REGION_POSITIVE`` row) adds 0: the official
                 ``loss_single`` resets ``loss_im`` in its no-positive branch. Student and teacher
                 FPN maps must have the same channels (the official code has no adapter).

Every term of a batch of B images is the mean over its ceil(B/2) groups (METHODS.md "Batch
semantics"): 8 images on one device give the mean of the official per-GPU loss of 8 GPUs × 2
images, whose gradients DDP averages. Nothing is divided by a count of positives and nothing is
reduced over ranks (the official LD terms are per-GPU; only the GFL losses use ``reduce_mean``).
``images_per_group`` (default 2) changes the group size.

Differences from the official code, measured (tests/test_ld_reference.py transcribes the
official computation and compares; sizes from 20 seeded batches of those tests):
- None in the loss itself: on identical inputs every term agrees with the transcription to
  float32 rounding (largest relative difference 2.2e-7; gradients 5.8e-8 of the largest
  gradient), at 2 and 8 images, with and without batch padding.
- Odd B: the last group holds 1 image (the official runs never have one); its terms weigh as
  much as a 2-image group's. With B even this never happens.
- An image without GT contributes no rows (the official ``get_vlr_region`` returns an
  ``AssignResult`` instead of a tensor for it, and mmdetection drops such images with
  ``filter_empty_gt``); it still counts in its group.
- None in the imitation term (``ld_im``) either: against the transcription of ``get_im_region``
  ('finegrained') and ``IMLoss`` on 60 seeded batches (2 and 8 images, with and without
  padding, 256 channels), largest relative difference 4.4e-7, gradients identical. The
  no-positive reset matters: on the seeded 8-image batch of the reference test that has a
  level with region cells and no positive, skipping it would give 8.15 instead of 6.50.
  Left out: the head's other ``imitation_method`` values ('gibox', 'decouple', 'fitnet'); the
  R50 recipe uses 'finegrained'. With several anchors per location (not GFL, so not reached by
  LD) a location joins the region when one of its anchors does; the official code assumes one.
- Cache, not this file: ``region.cls`` and ``region.box_dist`` are stored as fp16 by default;
  on one 8-image reference batch (logits of scale 2–3) that moves ld_main and ld_kd by 1.1e-5
  and 1.3e-5 relative (``--codec region=raw`` removes it).
- Cache, not this file: the teacher's rows come from the teacher run on each image's own
  canonical padding (precompute), not on the 2-image batch the official teacher saw, so every
  row whose receptive field reaches the extra batch padding differs. Measured on an untrained
  gfl-small teacher (224×320 image, batch padded to 320×480): all 460 rows change, box outputs
  by 62% and class logits by 2.8% (relative norm); a trained teacher has to be measured on data.
  The same holds for the ``fpn`` maps the imitation term reads, at region cells near the border.
- Cache, not this file: ``fpn`` is stored with the lossy ``klt`` codec by default (relative RMSE
  <= 1% per field and sample, checked by the encoder); not measured on ``ld_im`` here. Its
  error adds about ||e||² to each region cell's MSE, which matters most once the student is
  close to the teacher; ``--codec fpn=raw`` (or fp16) removes most of it.
- Cache, not this file: with ``--ld-vlr-rule diou`` the VLR rows are the true-DIoU set (on 20
  random 800×1216 images with 5 GTs each: 19720 rows against the official 28859, 6974 shared);
  :meth:`LD.check_cache_options` refuses such a cache unless ``vlr_rule="diou"`` is set.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.ops import box_iou

from detectors.detector import DetectorOutput
from store.schema import LD_VLR_RULE_OPTION, LD_VLR_RULES, LEVELS, REGION_POSITIVE, REGION_VLR
from train.methods.base import (BuildContext, DistillationMethod, MethodConfig, check_same_shape,
                                kl_divergence_with_temperature, require, zero_term)
from train.teacher_batch import TeacherBatch

# 'finegrained' imitation region: IoU with a GT > this ratio · that GT's largest IoU over the image's anchors.
IMITATION_IOU_RATIO = 0.5
# The picture (python -m train.viz): row colours by kind, markers by level P3..P7.
PICTURE_POSITIVE_COLOR = "#2ca02c"
PICTURE_VLR_COLOR = "#ff7f0e"
PICTURE_LEVEL_MARKERS = ("o", "s", "^", "D", "P")


@dataclass(frozen=True)
class LDConfig(MethodConfig):
    ld_weight: float = 0.25         # main LD at positives
    ld_temperature: float = 10.0
    vlr_weight: float = 0.25        # LD at VLR rows
    vlr_temperature: float = 10.0
    kd_weight: float = 10.0         # class-logit KD at positives
    kd_temperature: float = 2.0
    vlr_kd_weight: float = 0.0      # class-logit KD at VLR rows (official: multiplied by 0)
    images_per_group: int = 2       # official samples_per_gpu: each term is the mean over groups of this many images
    vlr_rule: str = "official"      # the VLR rule the cache must have been written with (manifest options)
    imitation_weight: float = 0.0   # 'finegrained' FPN imitation (loss_im): 0 in the R18/R34/R101 configs, 2.0 in
    #                                 the R50 COCO recipe (--set ld.imitation_weight=2; the cache needs fpn)

    # HikariTJU/LD @4287990 configs/ld/ld_r*_gflv1_r101_fpn_coco_1x.py (GFL). Its RetinaNet and FCOS
    # configs (ld_retina_r50_1x.py, ld_r50_fcos_r101_1x.py) put distribution heads on those detectors
    # (LDRetinaHead(RetinaGFLHead), LDFCOSHead(FCOSGFLHead), reg_max bins) with matching teachers
    # (retinagfl_r101_2x, fcos_gfl_r101_2x_center): not the families here, whose box outputs are deltas
    # and distances.
    FAMILY_DEFAULTS = {"gfl": {}}
    UNSUPPORTED = {family: f"LD distils box distributions (4·(reg_max+1) logits per location), which {name}'s "
                           f"head does not predict; the official {name} variant, {config}, swaps in a "
                           f"distribution head ({head}) and a teacher trained with it"
                   for family, name, config, head in (
                       ("retina", "RetinaNet", "configs/ld/ld_retina_r50_1x.py", "RetinaGFLHead"),
                       ("fcos", "FCOS", "configs/ld/ld_r50_fcos_r101_1x.py", "FCOSGFLHead"))}

    def __post_init__(self) -> None:
        if self.images_per_group < 1:
            raise ValueError(f"images_per_group must be >= 1, got {self.images_per_group}")
        if self.vlr_rule not in LD_VLR_RULES:
            raise ValueError(f"vlr_rule must be one of {LD_VLR_RULES}, got {self.vlr_rule!r}")


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
    # The region rows; a cache with them also holds the GT meta they index (region.gt). The FPN
    # maps only with the imitation term, off by default (:attr:`fields`).
    FIELDS = ("region",)
    Config = LDConfig
    PICTURE_FIELDS = ("region.level", "region.index", "region.kind", "region.iou")
    PICTURE_HELP = "LD: the cached region rows, ATSS positives and VLR anchors, and the GT boxes"

    @classmethod
    def build(cls, config: LDConfig, context: BuildContext) -> LD:
        if config.imitation_weight and context.student_channels != context.teacher_channels:
            raise ValueError(f"LD's imitation term compares the student's and the teacher's FPN maps directly (the "
                             f"official code has no adapter), but their widths differ: student "
                             f"{context.student_channels}, teacher {context.teacher_channels} channels; "
                             f"use ld.imitation_weight=0 or a student with the teacher's FPN width")
        return cls(config)

    @property
    def fields(self) -> tuple[str, ...]:
        # FPN maps only for the imitation term; the region rows always (they also gate imitation by level).
        return ("region", "fpn") if self.config.imitation_weight else ("region",)

    @property
    def cache_options(self) -> dict[str, str]:
        """What the cache manifest's ``options`` must hold for this configuration (``Manifest.check``
        ``expect["options"]``): the VLR rule, when a term reads the VLR rows."""
        config = self.config
        return {LD_VLR_RULE_OPTION: config.vlr_rule} if (config.vlr_weight or config.vlr_kd_weight) else {}

    def check_cache_options(self, options: dict | None, where: str = "the cache") -> None:
        """Refuses a cache whose manifest ``options`` lack or differ from :attr:`cache_options`."""
        options = options or {}
        for key, wanted in self.cache_options.items():
            if key not in options:
                raise ValueError(f"{where} does not record {key!r} in its manifest options (written before the "
                                 f"rule was declared, or without LD regions); LD is configured for the "
                                 f"{wanted!r} VLR rule: precompute the cache again with --ld-vlr-rule {wanted}")
            if options[key] != wanted:
                raise ValueError(f"{where} holds VLR rows picked by the {options[key]!r} rule but LD is configured "
                                 f"for {wanted!r} (ld.vlr_rule): use a cache written with --ld-vlr-rule {wanted}, "
                                 f"or set ld.vlr_rule={options[key]}")

    def forward(self, student: DetectorOutput, teacher: TeacherBatch, targets: list[dict[str, Tensor]],
                iteration: int) -> dict[str, Tensor]:
        config = self.config
        rows = gather_region_rows(student, teacher)
        positive, vlr = rows.kind == REGION_POSITIVE, rows.kind == REGION_VLR
        bins = rows.teacher_box.shape[1] // 4  # reg_max + 1
        group = torch.div(rows.batch_index, config.images_per_group, rounding_mode="floor")  # (R,)
        num_groups = max(1, -(-teacher.num_images // config.images_per_group))  # ceil(B / 2)
        num_levels = len(student.cls_logits)

        def side_kl(mask: Tensor, temperature: float) -> Tensor:
            """(r, 4) KL_T of each side's distribution at the rows in ``mask``."""
            s_box = rows.student_box[mask].reshape(-1, 4, bins)
            t_box = rows.teacher_box[mask].reshape(-1, 4, bins)
            return kl_divergence_with_temperature(s_box, t_box, temperature)

        def kd_per_group_and_level(mask: Tensor) -> Tensor:
            """Σ_groups Σ_levels mean over the rows of ``mask`` in that group and level of KL_T(cls)."""
            kl = kl_divergence_with_temperature(rows.student_cls[mask], rows.teacher_cls[mask],
                                                config.kd_temperature)  # (r,)
            cell = group[mask] * num_levels + rows.level[mask]  # (r,) one id per (group, level)
            size = num_groups * num_levels
            counts = torch.bincount(cell, minlength=size)  # (G·L,)
            sums = kl.new_zeros(size).index_add(0, cell, kl)  # (G·L,)
            return (sums / counts.clamp(min=1)).sum()

        keep_in_graph = zero_term(*student.box_outputs, *student.cls_logits)
        terms: dict[str, Tensor] = {}
        if config.ld_weight:
            weights = rows.student_cls[positive].detach().sigmoid().amax(dim=1)  # (P,)
            kl = side_kl(positive, config.ld_temperature)  # (P, 4)
            terms["ld_main"] = config.ld_weight * (weights[:, None] * kl).sum() / 4 / num_groups + keep_in_graph
        if config.vlr_weight:
            iou = require(rows.iou, "region.iou", "LD (VLR term)")[vlr]  # (V,)
            kl = side_kl(vlr, config.vlr_temperature)  # (V, 4)
            terms["ld_vlr"] = config.vlr_weight * (iou[:, None] * kl).sum() / 16 / num_groups + keep_in_graph
        if config.kd_weight:
            terms["ld_kd"] = config.kd_weight * kd_per_group_and_level(positive) / num_groups + keep_in_graph
        if config.vlr_kd_weight:
            terms["ld_vlr_kd"] = config.vlr_kd_weight * kd_per_group_and_level(vlr) / num_groups + keep_in_graph
        if config.imitation_weight:
            # A level whose group has no ATSS positive adds 0 (the official no-positive branch resets loss_im).
            cell = group[positive] * num_levels + rows.level[positive]  # (P,)
            has_positive = torch.bincount(cell, minlength=num_groups * num_levels).view(num_groups, num_levels) > 0
            teacher_fpn = require(teacher.fpn, "fpn", "LD (imitation term)")
            region = finegrained_region(student.anchors, teacher.valid, targets)
            per_group = imitation_per_group(student.features, teacher_fpn, region, config.images_per_group,
                                            has_positive)  # (G,)
            terms["ld_im"] = (config.imitation_weight * per_group.sum() / num_groups
                              + zero_term(*student.features) + keep_in_graph)
        return terms

    @classmethod
    def draw_picture(cls, painter, view):
        """The cached region rows at their anchors (the teacher's anchors: it decodes no weights)."""
        from matplotlib.lines import Line2D

        from train import viz
        painter.require(view, cls.NAME, cls.PICTURE_FIELDS)
        teacher = painter.teacher_detector()
        anchors = teacher.grid_anchors(view.level_hw, torch.zeros(()))  # per level (h_l·w_l·A, 4), (h, w, a)
        level, index = view.fields["region.level"].long(), view.fields["region.index"].long()
        kind = view.fields["region.kind"].long()
        boxes = torch.stack([anchors[int(lvl)][int(i)] for lvl, i in zip(level, index)]) if len(level) \
            else torch.zeros(0, 4)  # (R, 4) anchor boxes, view pixels
        centres = (boxes[:, :2] + boxes[:, 2:]) / 2  # (R, 2)
        positive, vlr = kind == REGION_POSITIVE, kind == REGION_VLR

        fig, axes = viz.new_figure(1, 2, view.image_hw, colorbar=False, panel_inches=viz.WIDE_PANEL_INCHES)
        left, right = axes[0]
        for ax in (left, right):
            viz.show_view(ax, view)
        # Left: every row's anchor centre; colour = kind, marker = level. VLR under the positives.
        for mask, color, size in ((vlr, PICTURE_VLR_COLOR, 14), (positive, PICTURE_POSITIVE_COLOR, 22)):
            for lvl in range(len(LEVELS)):
                on = mask & (level == lvl)
                if on.any():
                    left.scatter(centres[on, 0], centres[on, 1], s=size, c=color, marker=PICTURE_LEVEL_MARKERS[lvl],
                                 edgecolors="black", linewidths=0.4, zorder=3)
        painter.draw_gt(left, view)
        left.set_title(f"anchor centres: {int(positive.sum())} positives, {int(vlr.sum())} VLR rows", fontsize=9)
        # Right: the positives' anchor boxes (what the teacher's box distributions are read at).
        viz.draw_boxes(right, boxes[positive], PICTURE_POSITIVE_COLOR, linewidth=0.8, alpha=0.8)
        painter.draw_gt(right, view)
        right.set_title("anchor boxes of the positives", fontsize=9)

        handles = [Line2D([], [], color=PICTURE_POSITIVE_COLOR, marker="o", linestyle="", label="ATSS positive"),
                   Line2D([], [], color=PICTURE_VLR_COLOR, marker="o", linestyle="", label="VLR"),
                   Line2D([], [], color=viz.GT_COLOR, linestyle="--", label="GT box")]
        handles += [Line2D([], [], color="grey", marker=PICTURE_LEVEL_MARKERS[lvl], linestyle="",
                           label=LEVELS[lvl].upper()) for lvl in range(len(LEVELS)) if bool((level == lvl).any())]
        legend = fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=8,
                            facecolor="#dddddd")
        legend.get_frame().set_edgecolor("none")
        fig.suptitle(f"LD region rows (cached region.*): ATSS positives and VLR (DIoU in [0.25·thr, thr))\n"
                     f"{view.describe()}", fontsize=10)
        return painter.save(fig, view, cls.NAME)


def finegrained_region(anchors: list[Tensor], valid: list[Tensor], targets: list[dict[str, Tensor]]) -> list[Tensor]:
    """LD's 'finegrained' imitation region: per level (N, 1, H_l, W_l) bool.

    Per image, over the anchors of its valid region on every level together: an anchor is in the
    region when its IoU with some GT is > ``IMITATION_IOU_RATIO`` · the largest IoU of that GT over
    those anchors (``LDHead.get_im_region``, mode 'finegrained'). A location is in the region when
    one of its anchors is. Anchors outside the valid region neither count in the maximum nor join.

    Args:
        anchors: per level (H_l·W_l·A, 4) xyxy pixels on the batch grid, (h, w, a) order.
        valid: per level (N, 1, H_l, W_l) bool, each image's valid region (``TeacherBatch.valid``).
        targets: per image ``boxes`` (n, 4) xyxy pixels, same frame as the anchors.
    """
    num_images = valid[0].shape[0]
    if len(targets) != num_images:
        raise ValueError(f"LD's imitation region needs the GT boxes of each image: got {len(targets)} targets "
                         f"for {num_images} images")
    num_anchors = anchors[0].shape[0] // (valid[0].shape[-2] * valid[0].shape[-1])
    flat_anchors = torch.cat(anchors).float()  # (A_total, 4)
    valid_anchors = torch.cat([v[:, 0, :, :, None].expand(-1, -1, -1, num_anchors).reshape(num_images, -1)
                               for v in valid], dim=1)  # (N, A_total), (level, h, w, a) order
    in_region = torch.zeros_like(valid_anchors)  # (N, A_total)
    for image, target in enumerate(targets):
        boxes = target["boxes"].detach().to(flat_anchors)  # (G, 4)
        inside = valid_anchors[image].nonzero().squeeze(1)  # (a,)
        if boxes.shape[0] == 0 or inside.numel() == 0:
            continue
        ious = box_iou(flat_anchors[inside], boxes)  # (a, G)
        best = ious.amax(dim=0)  # (G,) over every valid anchor of every level
        in_region[image, inside] = (ious > IMITATION_IOU_RATIO * best).any(dim=1)
    region, start = [], 0
    for v in valid:
        h, w = v.shape[-2:]
        count = h * w * num_anchors
        level = in_region[:, start:start + count].view(num_images, h, w, num_anchors)  # (N, H, W, A)
        region.append(level.any(dim=3)[:, None])  # (N, 1, H, W)
        start += count
    return region


def imitation_per_group(student_fpn: list[Tensor], teacher_fpn: list[Tensor], region: list[Tensor],
                        images_per_group: int, has_positive: Tensor) -> Tensor:
    """(G,) Σ_levels of the mean over (region locations of the group on the level, channels) of
    (F_s − F_t)², a level counting only where ``has_positive`` (G, L) holds. No adapter: the
    official ``IMLoss`` is ``F.mse_loss`` on the raw student and teacher features."""
    num_groups = has_positive.shape[0]
    total = student_fpn[0].new_zeros(num_groups, dtype=torch.float32)
    for level, (student_map, teacher_map, mask) in enumerate(zip(student_fpn, teacher_fpn, region)):
        check_same_shape(student_map, teacher_map, f"FPN features of level {level} (LD's imitation has no adapter)")
        cells = mask[:, 0].nonzero()  # (r, 3): image, y, x
        image, y, x = cells.unbind(dim=1)
        diff = student_map[image, :, y, x].float() - teacher_map[image, :, y, x].detach().float()  # (r, C)
        group = torch.div(image, images_per_group, rounding_mode="floor")  # (r,)
        sums = total.new_zeros(num_groups).index_add(0, group, diff.pow(2).sum(dim=1))  # (G,)
        counts = torch.bincount(group, minlength=num_groups) * student_map.shape[1]  # (G,) locations · channels
        total = total + torch.where(has_positive[:, level], sums / counts.clamp(min=1), sums.new_zeros(()))
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
