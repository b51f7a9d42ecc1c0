"""LD against a transcription of the official loss (HikariTJU/LD @4287990), on identical seeded inputs.

Long on purpose: the transcription (anchors, ATSS assignment, VLR regions, the per-GPU loss) is kept
in one file so that it reads side by side with the official code.

The ``official_*`` functions below follow the official code step by step, in plain torch, and use
nothing of this project: each names the official file and function it transcribes. The project
side is the real path: ``precompute.fields`` (``canonical_anchors``, ``ld_regions``, ``gather_rows``)
-> ``train.teacher_batch.collate_teacher`` -> ``train.methods.ld.LD``.

Batch rule (METHODS.md "Batch semantics"): for B images the project's value is compared with the
mean of the official per-GPU loss over the B/2 groups of 2 consecutive images, each group laid out
as the official run would pad it (its own batch padding, its own feature-map sizes).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from detectors import build_detector
from detectors.detector import DetectorOutput
from precompute.fields import canonical_anchors, diou_matrix, gather_rows, ld_regions
from store import REGION_POSITIVE, REGION_VLR
from store.schema import LEVELS
from train.methods import build_method
from train.teacher_batch import collate_teacher

NUM_CLASSES = 3
REG_MAX = 16                       # 17 bins per side, 68 box outputs per location
STRIDES = (8, 16, 32, 64, 128)
OCTAVE_BASE_SCALE = 8              # configs/ld/*: anchor_generator octave_base_scale=8, scales_per_octave=1
TOPK = 9                           # train_cfg.assigner = ATSSAssigner(topk=9)
SIZE_DIVISOR = 32                  # Pad(size_divisor=32)
INF = 100000000
TERMS = ("ld_main", "ld_vlr", "ld_kd")
FPN_CHANNELS = 256                 # the official loss_single reshapes the FPN maps to (-1, 256)


# ============================================================================ official transcription
def official_bbox_overlaps(bboxes1, bboxes2, mode="iou", eps=1e-6):
    """mmdet/core/bbox/iou_calculators/iou2d_calculator.py: bbox_overlaps, is_aligned=False.

    For mode 'diou' the union is NOT built (only for iou/giou): ``union = area1``.
    """
    area1 = (bboxes1[..., 2] - bboxes1[..., 0]) * (bboxes1[..., 3] - bboxes1[..., 1])
    area2 = (bboxes2[..., 2] - bboxes2[..., 0]) * (bboxes2[..., 3] - bboxes2[..., 1])
    lt = torch.max(bboxes1[..., :, None, :2], bboxes2[..., None, :, :2])
    rb = torch.min(bboxes1[..., :, None, 2:], bboxes2[..., None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    overlap = wh[..., 0] * wh[..., 1]
    if mode in ["iou", "giou"]:
        union = area1[..., None] + area2[..., None, :] - overlap
    else:
        union = area1[..., None]
    if mode == "diou":
        enclosed_lt = torch.min(bboxes1[..., :, None, :2], bboxes2[..., None, :, :2])
        enclosed_rb = torch.max(bboxes1[..., :, None, 2:], bboxes2[..., None, :, 2:])
        b1_x1, b1_y1 = bboxes1[..., :, None, 0], bboxes1[..., :, None, 1]
        b1_x2, b1_y2 = bboxes1[..., :, None, 2], bboxes1[..., :, None, 3]
        b2_x1, b2_y1 = bboxes2[..., None, :, 0], bboxes2[..., None, :, 1]
        b2_x2, b2_y2 = bboxes2[..., None, :, 2], bboxes2[..., None, :, 3]
    eps = union.new_tensor([eps])
    union = torch.max(union, eps)
    ious = overlap / union
    if mode == "iou":
        return ious
    assert mode == "diou"
    left = ((b2_x1 + b2_x2) - (b1_x1 + b1_x2)) ** 2 / 4
    right = ((b2_y1 + b2_y2) - (b1_y1 + b1_y2)) ** 2 / 4
    rho2 = left + right
    enclose_wh = (enclosed_rb - enclosed_lt).clamp(min=0)
    enclose_c = enclose_wh[..., 0] ** 2 + enclose_wh[..., 1] ** 2
    enclose_c = torch.max(enclose_c, eps)
    return ious - rho2 / enclose_c


def official_grid_anchors(featmap_sizes):
    """mmdet/core/anchor/anchor_generator.py: AnchorGenerator.gen_single_level_base_anchors
    (ratios [1.0], center_offset 0: base anchor centred at (0, 0)) and single_level_grid_anchors
    (shifts x·stride, y·stride, row-major: y outer, x inner)."""
    anchors = []
    for (feat_h, feat_w), stride in zip(featmap_sizes, STRIDES):
        size = stride * OCTAVE_BASE_SCALE
        base = torch.tensor([[-0.5 * size, -0.5 * size, 0.5 * size, 0.5 * size]])
        shift_x = torch.arange(0, feat_w) * stride
        shift_y = torch.arange(0, feat_h) * stride
        xx = shift_x.repeat(shift_y.shape[0])
        yy = shift_y.view(-1, 1).repeat(1, shift_x.shape[0]).view(-1)
        shifts = torch.stack([xx, yy, xx, yy], dim=-1).float()
        anchors.append((base[None, :, :] + shifts[:, None, :]).view(-1, 4))
    return anchors


def official_valid_flags(featmap_sizes, pad_shape):
    """AnchorGenerator.valid_flags: valid_feat = min(ceil(pad / stride), feat) per level."""
    flags = []
    for (feat_h, feat_w), stride in zip(featmap_sizes, STRIDES):
        valid_h = min(int(math.ceil(pad_shape[0] / stride)), feat_h)
        valid_w = min(int(math.ceil(pad_shape[1] / stride)), feat_w)
        valid_x = torch.zeros(feat_w, dtype=torch.bool)
        valid_y = torch.zeros(feat_h, dtype=torch.bool)
        valid_x[:valid_w] = True
        valid_y[:valid_h] = True
        xx = valid_x.repeat(valid_y.shape[0])
        yy = valid_y.view(-1, 1).repeat(1, valid_x.shape[0]).view(-1)
        flags.append(xx & yy)
    return flags


def _centre_distances(bboxes, gt_bboxes):
    gt_points = torch.stack(((gt_bboxes[:, 0] + gt_bboxes[:, 2]) / 2.0, (gt_bboxes[:, 1] + gt_bboxes[:, 3]) / 2.0), 1)
    bboxes_cx = (bboxes[:, 0] + bboxes[:, 2]) / 2.0
    bboxes_cy = (bboxes[:, 1] + bboxes[:, 3]) / 2.0
    points = torch.stack((bboxes_cx, bboxes_cy), dim=1)
    return (points[:, None, :] - gt_points[None, :, :]).pow(2).sum(-1).sqrt(), bboxes_cx, bboxes_cy


def official_atss_assign(bboxes, num_level_bboxes, gt_bboxes):
    """mmdet/core/bbox/assigners/atss_assigner.py: ATSSAssigner.assign -> assigned_gt_inds (0 bg, i+1)."""
    num_gt, num_bboxes = gt_bboxes.size(0), bboxes.size(0)
    overlaps = official_bbox_overlaps(bboxes, gt_bboxes)
    assigned_gt_inds = overlaps.new_full((num_bboxes,), 0, dtype=torch.long)
    distances, bboxes_cx, bboxes_cy = _centre_distances(bboxes, gt_bboxes)
    candidate_idxs, start_idx = [], 0
    for bboxes_per_level in num_level_bboxes:
        end_idx = start_idx + bboxes_per_level
        _, topk_idxs = distances[start_idx:end_idx, :].topk(min(TOPK, bboxes_per_level), dim=0, largest=False)
        candidate_idxs.append(topk_idxs + start_idx)
        start_idx = end_idx
    candidate_idxs = torch.cat(candidate_idxs, dim=0)
    candidate_overlaps = overlaps[candidate_idxs, torch.arange(num_gt)]
    overlaps_thr_per_gt = candidate_overlaps.mean(0) + candidate_overlaps.std(0)
    is_pos = candidate_overlaps >= overlaps_thr_per_gt[None, :]
    for gt_idx in range(num_gt):
        candidate_idxs[:, gt_idx] += gt_idx * num_bboxes
    ep_bboxes_cx = bboxes_cx.view(1, -1).expand(num_gt, num_bboxes).contiguous().view(-1)
    ep_bboxes_cy = bboxes_cy.view(1, -1).expand(num_gt, num_bboxes).contiguous().view(-1)
    candidate_idxs = candidate_idxs.view(-1)
    l_ = ep_bboxes_cx[candidate_idxs].view(-1, num_gt) - gt_bboxes[:, 0]
    t_ = ep_bboxes_cy[candidate_idxs].view(-1, num_gt) - gt_bboxes[:, 1]
    r_ = gt_bboxes[:, 2] - ep_bboxes_cx[candidate_idxs].view(-1, num_gt)
    b_ = gt_bboxes[:, 3] - ep_bboxes_cy[candidate_idxs].view(-1, num_gt)
    is_in_gts = torch.stack([l_, t_, r_, b_], dim=1).min(dim=1)[0] > 0.01
    is_pos = is_pos & is_in_gts
    overlaps_inf = torch.full_like(overlaps, -INF).t().contiguous().view(-1)
    index = candidate_idxs.view(-1)[is_pos.view(-1)]
    overlaps_inf[index] = overlaps.t().contiguous().view(-1)[index]
    overlaps_inf = overlaps_inf.view(num_gt, -1).t()
    max_overlaps, argmax_overlaps = overlaps_inf.max(dim=1)
    assigned_gt_inds[max_overlaps != -INF] = argmax_overlaps[max_overlaps != -INF] + 1
    return assigned_gt_inds


def official_get_vlr_region(bboxes, num_level_bboxes, gt_bboxes):
    """atss_assigner.py: ATSSAssigner.get_vlr_region -> vlr_region_iou (0 outside the VLR)."""
    num_gt, num_bboxes = gt_bboxes.size(0), bboxes.size(0)
    overlaps = official_bbox_overlaps(bboxes, gt_bboxes)
    diou = official_bbox_overlaps(bboxes, gt_bboxes, mode="diou")
    vlr_region_iou = overlaps.new_zeros(num_bboxes)
    distances, _, _ = _centre_distances(bboxes, gt_bboxes)
    candidate_idxs, candidate_idxs_t, start_idx = [], [], 0
    for bboxes_per_level in num_level_bboxes:
        end_idx = start_idx + bboxes_per_level
        distances_per_level = distances[start_idx:end_idx, :]
        _, topk_idxs = distances_per_level.topk(bboxes_per_level, dim=0, largest=False)  # every anchor
        _, topt_idxs = distances_per_level.topk(min(TOPK, bboxes_per_level), dim=0, largest=False)
        candidate_idxs.append(topk_idxs + start_idx)
        candidate_idxs_t.append(topt_idxs + start_idx)
        start_idx = end_idx
    candidate_idxs = torch.cat(candidate_idxs, dim=0)
    candidate_idxs_t = torch.cat(candidate_idxs_t, dim=0)
    candidate_overlaps_t = overlaps[candidate_idxs_t, torch.arange(num_gt)]
    t_diou = diou[candidate_idxs, torch.arange(num_gt)]
    overlaps_thr_per_gt = candidate_overlaps_t.mean(0) + candidate_overlaps_t.std(0)
    is_pos = (t_diou < overlaps_thr_per_gt[None, :]) & (t_diou >= 0.25 * overlaps_thr_per_gt[None, :])
    for gt_idx in range(num_gt):
        candidate_idxs[:, gt_idx] += gt_idx * num_bboxes
    candidate_idxs = candidate_idxs.view(-1)
    overlaps_inf = torch.full_like(overlaps, -INF).t().contiguous().view(-1)
    index = candidate_idxs.view(-1)[is_pos.view(-1)]
    overlaps_inf[index] = overlaps.t().contiguous().view(-1)[index]
    overlaps_inf = overlaps_inf.view(num_gt, -1).t()
    max_overlaps, _ = overlaps_inf.max(dim=1)
    vlr_region_iou[max_overlaps != -INF] = max_overlaps[max_overlaps != -INF] + 0
    return vlr_region_iou


def official_get_im_region(bboxes, gt_bboxes):
    """mmdet/models/dense_heads/ld_head.py: LDHead.get_im_region, mode 'finegrained' (the image's
    valid anchors of every level; iou_calculator = BboxOverlaps2D -> bbox_overlaps mode 'iou')."""
    num_bboxes = bboxes.size(0)
    iou = official_bbox_overlaps(bboxes, gt_bboxes, mode="iou")
    assigned_fg = bboxes.new_full((num_bboxes,), 0, dtype=torch.long).float()
    fine_grained = torch.nonzero(iou > 0.5 * iou.max(0)[0])
    assigned_fg[fine_grained[:, 0]] = 1
    return assigned_fg


def official_im_loss(x, soft_target, loss_weight=2.0):
    """mmdet/models/losses/kd_loss.py: IMLoss (reduction 'mean', no avg_factor) -> im_loss =
    F.mse_loss(x, soft_target) (its own mean), then weight_reduce_loss's mean of that scalar."""
    return loss_weight * F.mse_loss(x, soft_target).mean()


def official_kd_loss(pred, soft_label, weight, avg_factor, loss_weight, T):
    """mmdet/models/losses/kd_loss.py: KnowledgeDistillationKLDivLoss.forward (reduction 'mean') ->
    knowledge_distillation_kl_div_loss, reduced by losses/utils.py weight_reduce_loss: with an
    avg_factor and 'mean', (loss · weight).sum() / avg_factor."""
    target = F.softmax(soft_label / T, dim=1).detach()
    loss = F.kl_div(F.log_softmax(pred / T, dim=1), target, reduction="none").mean(1) * (T * T)
    loss = loss * weight
    return loss_weight * (loss.sum() / avg_factor)


def official_ld_loss_per_gpu(cls_scores, bbox_preds, soft_label, soft_target, gt_bboxes, gt_labels, pad_shapes,
                             x=None, teacher_x=None):
    """mmdet/models/dense_heads/ld_head.py: LDHead.loss (get_targets, _get_target_single with
    allowed_border=-1 so inside = valid, images_to_levels) and LDHead.loss_single per level; mmdet's
    _parse_losses sums each list over the levels. Returns (loss_ld, loss_ld_vlr, loss_kd), and
    loss_im ('finegrained', loss_weight 2.0: configs/ld/ld_r50_gflv1_r101_fpn_coco_1x.py) when the
    student and teacher FPN maps ``x``, ``teacher_x`` are given."""
    featmap_sizes = [tuple(c.shape[-2:]) for c in cls_scores]
    multi_level_anchors = official_grid_anchors(featmap_sizes)
    num_level_anchors = [a.size(0) for a in multi_level_anchors]
    flat_anchors = torch.cat(multi_level_anchors)
    num_imgs = cls_scores[0].shape[0]
    all_labels, all_vlr, all_im = [], [], []
    for i in range(num_imgs):
        inside_flags = torch.cat(official_valid_flags(featmap_sizes, pad_shapes[i]))
        anchors = flat_anchors[inside_flags, :]
        split = torch.split(inside_flags, num_level_anchors)
        num_level_anchors_inside = [int(flags.sum()) for flags in split]
        assigned = official_atss_assign(anchors, num_level_anchors_inside, gt_bboxes[i])
        vlr_region = official_get_vlr_region(anchors, num_level_anchors_inside, gt_bboxes[i])
        im_region = official_get_im_region(anchors, gt_bboxes[i])
        labels = anchors.new_full((anchors.shape[0],), NUM_CLASSES, dtype=torch.long)
        pos_inds = torch.nonzero(assigned > 0).squeeze(1)
        labels[pos_inds] = gt_labels[i][assigned[pos_inds] - 1]
        # unmap to every anchor of the batch grid
        full_labels = torch.full((flat_anchors.shape[0],), NUM_CLASSES, dtype=torch.long)
        full_labels[inside_flags] = labels
        full_vlr = torch.zeros(flat_anchors.shape[0])
        full_vlr[inside_flags] = vlr_region
        full_im = torch.zeros(flat_anchors.shape[0])
        full_im[inside_flags] = im_region
        all_labels.append(full_labels)
        all_vlr.append(full_vlr)
        all_im.append(full_im)
    labels_list = torch.split(torch.stack(all_labels), num_level_anchors, dim=1)  # images_to_levels
    vlr_list = torch.split(torch.stack(all_vlr), num_level_anchors, dim=1)
    im_list = torch.split(torch.stack(all_im), num_level_anchors, dim=1)

    losses_ld, losses_ld_vlr, losses_kd, losses_im = [], [], [], []
    for level in range(len(cls_scores)):
        cls_score = cls_scores[level].permute(0, 2, 3, 1).reshape(-1, NUM_CLASSES)
        bbox_pred = bbox_preds[level].permute(0, 2, 3, 1).reshape(-1, 4 * (REG_MAX + 1))
        soft_targets = soft_target[level].permute(0, 2, 3, 1).reshape(-1, 4 * (REG_MAX + 1))
        soft_lab = soft_label[level].permute(0, 2, 3, 1).reshape(-1, NUM_CLASSES)
        labels = labels_list[level].reshape(-1)
        label_weights = torch.ones_like(labels, dtype=torch.float)  # pos_weight=-1: 1.0 at pos and neg
        vlr_region = vlr_list[level].reshape(-1)
        pos_inds = ((labels >= 0) & (labels < NUM_CLASSES)).nonzero().squeeze(1)
        remain_inds = (vlr_region > 0).nonzero().squeeze(1)
        if x is not None:  # imitation_method 'finegrained' (the else branch of loss_single)
            x_level = x[level].permute(0, 2, 3, 1).reshape(-1, 256)
            teacher_x_level = teacher_x[level].permute(0, 2, 3, 1).reshape(-1, 256)
            fg_inds = (im_list[level].reshape(-1) > 0).nonzero().squeeze(1)
            if len(fg_inds) > 0:
                loss_im = official_im_loss(x_level[fg_inds], teacher_x_level[fg_inds])
            else:
                loss_im = bbox_pred.sum() * 0
        if len(pos_inds) > 0:
            weight_targets = cls_score.detach().sigmoid().max(dim=1)[0][pos_inds]
            pred_corners = bbox_pred[pos_inds].reshape(-1, REG_MAX + 1)
            soft_corners = soft_targets[pos_inds].reshape(-1, REG_MAX + 1)
            loss_ld = official_kd_loss(pred_corners, soft_corners, weight_targets[:, None].expand(-1, 4).reshape(-1),
                                       avg_factor=4.0, loss_weight=0.25, T=10)
            loss_kd = official_kd_loss(cls_score[pos_inds], soft_lab[pos_inds], label_weights[pos_inds],
                                       avg_factor=pos_inds.shape[0], loss_weight=10, T=2)
        else:
            loss_ld = loss_kd = bbox_pred.sum() * 0
            loss_im = bbox_pred.sum() * 0  # the official no-positive branch resets loss_im too
        if len(remain_inds) > 0:
            remain_targets = vlr_region[remain_inds]
            loss_ld_vlr = official_kd_loss(bbox_pred[remain_inds].reshape(-1, REG_MAX + 1),
                                           soft_targets[remain_inds].reshape(-1, REG_MAX + 1),
                                           remain_targets[:, None].expand(-1, 4).reshape(-1),
                                           avg_factor=16.0, loss_weight=0.25, T=10)
        else:
            loss_ld_vlr = bbox_pred.sum() * 0
        losses_ld.append(loss_ld)
        losses_ld_vlr.append(loss_ld_vlr)
        losses_kd.append(loss_kd)
        losses_im.append(loss_im if x is not None else None)
    out = {"ld_main": sum(losses_ld), "ld_vlr": sum(losses_ld_vlr), "ld_kd": sum(losses_kd)}
    if x is not None:
        out["ld_im"] = sum(losses_im)
    return out


def official_batch_featmap_sizes(pad_shapes):
    """FPN map sizes of a batch padded to its largest image (P3-P5 by the stride, P6 and P7 by the
    stride-2 3×3 convs with padding 1: ceil of half the level below)."""
    pad_h, pad_w = max(p[0] for p in pad_shapes), max(p[1] for p in pad_shapes)
    sizes = [(pad_h // s, pad_w // s) for s in STRIDES[:3]]
    for _ in STRIDES[3:]:
        h, w = sizes[-1]
        sizes.append(((h + 1) // 2, (w + 1) // 2))
    return sizes


def official_loss_over_groups(student_cls, student_box, teacher_cls, teacher_box, gts, labels, image_sizes,
                              student_fpn=None, teacher_fpn=None):
    """Mean over groups of 2 consecutive images of the official per-GPU loss, each group with its own padding
    (with ``ld_im`` when the FPN maps are given)."""
    pad_shapes = [(math.ceil(h / SIZE_DIVISOR) * SIZE_DIVISOR, math.ceil(w / SIZE_DIVISOR) * SIZE_DIVISOR)
                  for h, w in image_sizes]
    per_group = []
    for start in range(0, len(image_sizes), 2):
        members = slice(start, start + 2)
        sizes = official_batch_featmap_sizes(pad_shapes[members])

        def crop(maps):
            return [m[members, :, :h, :w] for m, (h, w) in zip(maps, sizes)]
        fpn = {} if student_fpn is None else {"x": crop(student_fpn), "teacher_x": crop(teacher_fpn)}
        per_group.append(official_ld_loss_per_gpu(crop(student_cls), crop(student_box), crop(teacher_cls),
                                                  crop(teacher_box), gts[members], labels[members],
                                                  pad_shapes[members], **fpn))
    return {term: sum(group[term] for group in per_group) / len(per_group) for term in per_group[0]}


# ============================================================================ the project's path
_ANCHOR_MODEL = None


def project_loss(student_cls, student_box, teacher_cls, teacher_box, gts, image_sizes, student_fpn=None,
                 teacher_fpn=None, **overrides):
    """precompute.fields region rows of each image -> collate_teacher -> LD.forward. With FPN maps,
    each image's valid crop of ``teacher_fpn`` is cached as ``fpn.p3``.. and LD gets the GT boxes."""
    global _ANCHOR_MODEL
    from detectors import valid_level_sizes
    if _ANCHOR_MODEL is None:
        _ANCHOR_MODEL = build_detector("gfl-nano", num_classes=NUM_CLASSES)
    model = _ANCHOR_MODEL
    map_sizes = [tuple(m.shape[-2:]) for m in student_cls]
    anchors = model.grid_anchors(map_sizes, torch.zeros(1))
    samples = []
    for i, size in enumerate(image_sizes):
        valid = valid_level_sizes(size)
        canonical, counts = canonical_anchors(anchors, map_sizes, valid, model.num_anchors)
        rows = ld_regions(canonical, counts, gts[i], topk=TOPK)
        widths = [w for _, w in valid]
        samples.append({"meta.valid_hw": torch.tensor(size), "region.level": rows["level"],
                        "region.index": rows["index"], "region.kind": rows["kind"], "region.gt": rows["gt"],
                        "region.iou": rows["iou"],
                        "region.cls": gather_rows(teacher_cls, i, rows["level"], rows["index"], 1, widths),
                        "region.box_dist": gather_rows(teacher_box, i, rows["level"], rows["index"], 1, widths)})
        if teacher_fpn is not None:
            samples[-1].update({f"fpn.{name}": teacher_fpn[level][i, :, :h, :w].clone()
                                for level, (name, (h, w)) in enumerate(zip(LEVELS, valid))})
    teacher = collate_teacher(samples, map_sizes, "cpu")
    features = ([torch.zeros(len(image_sizes), 1, h, w) for h, w in map_sizes] if student_fpn is None
                else list(student_fpn))
    student = DetectorOutput(features, list(student_cls), list(student_box), anchors, STRIDES, list(image_sizes))
    targets = [{"boxes": boxes} for boxes in gts] if student_fpn is not None else []
    return build_method("ld", "gfl", overrides)(student, teacher, targets, iteration=0), teacher


# ============================================================================ inputs
PADDED_SIZES = [(96, 128), (64, 100), (128, 72), (80, 80), (100, 128), (64, 64), (120, 96), (72, 110)]
SAME_SIZES = [(128, 128)] * 8


def make_inputs(image_sizes, seed):
    """Batch-padded student and teacher maps, GT boxes and labels. The teacher maps hold noise in the
    batch padding (never read: no anchor there is valid)."""
    generator = torch.Generator().manual_seed(seed)
    pad_shapes = [(math.ceil(h / SIZE_DIVISOR) * SIZE_DIVISOR, math.ceil(w / SIZE_DIVISOR) * SIZE_DIVISOR)
                  for h, w in image_sizes]
    map_sizes = official_batch_featmap_sizes(pad_shapes)
    n = len(image_sizes)

    def maps(channels, scale):
        return [(torch.randn(n, channels, h, w, generator=generator) * scale) for h, w in map_sizes]
    student_cls = [m.requires_grad_() for m in maps(NUM_CLASSES, 2.0)]
    student_box = [m.requires_grad_() for m in maps(4 * (REG_MAX + 1), 3.0)]
    teacher_cls, teacher_box = maps(NUM_CLASSES, 2.0), maps(4 * (REG_MAX + 1), 3.0)
    gts, labels = [], []
    for h, w in image_sizes:
        count = int(torch.randint(1, 4, (1,), generator=generator))
        x1 = torch.rand(count, generator=generator) * w * 0.6
        y1 = torch.rand(count, generator=generator) * h * 0.6
        bw = 8 + torch.rand(count, generator=generator) * (w - x1 - 8)
        bh = 8 + torch.rand(count, generator=generator) * (h - y1 - 8)
        gts.append(torch.stack([x1, y1, (x1 + bw).clamp(max=w), (y1 + bh).clamp(max=h)], dim=1))
        labels.append(torch.randint(0, NUM_CLASSES, (count,), generator=generator))
    return student_cls, student_box, teacher_cls, teacher_box, gts, labels


def gradients(value, student_cls, student_box):
    return torch.autograd.grad(value, student_cls + student_box, retain_graph=True, allow_unused=True)


def make_features(image_sizes, seed):
    """Batch-padded student and teacher FPN maps (256 channels); the teacher's hold noise in the batch
    padding (never read: the imitation region lies on valid anchors only)."""
    generator = torch.Generator().manual_seed(1000 + seed)
    pad_shapes = [(math.ceil(h / SIZE_DIVISOR) * SIZE_DIVISOR, math.ceil(w / SIZE_DIVISOR) * SIZE_DIVISOR)
                  for h, w in image_sizes]
    map_sizes = official_batch_featmap_sizes(pad_shapes)
    n = len(image_sizes)
    student_fpn = [torch.randn(n, FPN_CHANNELS, h, w, generator=generator).requires_grad_() for h, w in map_sizes]
    teacher_fpn = [torch.randn(n, FPN_CHANNELS, h, w, generator=generator) * 1.5 for h, w in map_sizes]
    return student_fpn, teacher_fpn


# ============================================================================ tests
@pytest.mark.parametrize("num_images", [2, 8])
@pytest.mark.parametrize("padded", [True, False], ids=["padding", "no-padding"])
def test_ld_equals_the_official_loss(num_images, padded):
    image_sizes = (PADDED_SIZES if padded else SAME_SIZES)[:num_images]
    student_cls, student_box, teacher_cls, teacher_box, gts, labels = make_inputs(image_sizes, seed=num_images)
    official = official_loss_over_groups(student_cls, student_box, teacher_cls, teacher_box, gts, labels, image_sizes)
    terms, teacher = project_loss(student_cls, student_box, teacher_cls, teacher_box, gts, image_sizes)
    kinds = teacher.region["kind"]
    assert (kinds == REGION_POSITIVE).sum() > 10 and (kinds == REGION_VLR).sum() > 10  # both terms exercised
    assert set(terms) == set(TERMS)
    for term in TERMS:
        assert official[term].item() > 0
        assert terms[term].item() == pytest.approx(official[term].item(), rel=1e-5, abs=0), term
        for mine, theirs in zip(gradients(terms[term], student_cls, student_box),
                                gradients(official[term], student_cls, student_box)):
            theirs = torch.zeros_like(mine) if theirs is None else theirs
            scale = theirs.abs().max().clamp(min=1e-30)
            torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5 * float(scale), msg=term)


def imitation_levels(teacher, targets, num_groups):
    """Per (group, level): (has an imitation cell, has an ATSS positive), from the project's region."""
    from train.methods.ld import finegrained_region
    anchors = _ANCHOR_MODEL.grid_anchors(teacher.level_sizes, torch.zeros(1))
    region = finegrained_region(anchors, teacher.valid, targets)
    cells = torch.stack([torch.stack([m[2 * g:2 * g + 2].any() for m in region]) for g in range(num_groups)])
    positive = teacher.region["kind"] == REGION_POSITIVE
    has_positive = torch.zeros(num_groups, len(region), dtype=torch.bool)
    has_positive[teacher.region["batch_index"][positive] // 2, teacher.region["level"][positive]] = True
    return cells, has_positive


@pytest.mark.parametrize("num_images", [2, 8])
@pytest.mark.parametrize("padded", [True, False], ids=["padding", "no-padding"])
def test_ld_imitation_equals_the_official_loss(num_images, padded):
    """'finegrained' loss_im (weight 2.0, the R50 COCO recipe) next to the other terms: values and the
    gradients of the student's FPN maps within 1e-5."""
    image_sizes = (PADDED_SIZES if padded else SAME_SIZES)[:num_images]
    student_cls, student_box, teacher_cls, teacher_box, gts, labels = make_inputs(image_sizes, seed=num_images)
    student_fpn, teacher_fpn = make_features(image_sizes, seed=num_images)
    official = official_loss_over_groups(student_cls, student_box, teacher_cls, teacher_box, gts, labels, image_sizes,
                                         student_fpn, teacher_fpn)
    terms, teacher = project_loss(student_cls, student_box, teacher_cls, teacher_box, gts, image_sizes,
                                  student_fpn, teacher_fpn, imitation_weight=2.0)
    assert set(terms) == set(TERMS) | {"ld_im"} == set(official)
    cells, has_positive = imitation_levels(teacher, [{"boxes": b} for b in gts], num_images // 2)
    assert (cells & has_positive).sum() >= num_images // 2  # the term is exercised in every group
    assert official["ld_im"].item() > 0
    for term in terms:
        assert terms[term].item() == pytest.approx(official[term].item(), rel=1e-5, abs=0), term
    mine = torch.autograd.grad(terms["ld_im"], student_fpn, retain_graph=True, allow_unused=True)
    theirs = torch.autograd.grad(official["ld_im"], student_fpn, retain_graph=True, allow_unused=True)
    for level, (a, b) in enumerate(zip(mine, theirs)):
        a = torch.zeros_like(student_fpn[level]) if a is None else a
        b = torch.zeros_like(student_fpn[level]) if b is None else b
        scale = max(float(b.abs().max()), 1e-30)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * scale, msg=f"ld_im gradient, level {level}")
    # The term does not reach the class and box logits (it is MSE on the FPN maps only).
    for grad in torch.autograd.grad(terms["ld_im"], student_cls + student_box, retain_graph=True, allow_unused=True):
        assert grad is None or not grad.any()


def test_ld_imitation_level_without_positives_adds_nothing_as_the_official_code():
    """A level of a group with imitation cells but no ATSS positive: the official loss_single resets
    loss_im there; so does the project. Found among the seeded 8-image batches."""
    for seed in range(20):
        student_cls, student_box, teacher_cls, teacher_box, gts, labels = make_inputs(PADDED_SIZES, seed=seed)
        student_fpn, teacher_fpn = make_features(PADDED_SIZES, seed=seed)
        terms, teacher = project_loss(student_cls, student_box, teacher_cls, teacher_box, gts, PADDED_SIZES,
                                      student_fpn, teacher_fpn, imitation_weight=2.0)
        cells, has_positive = imitation_levels(teacher, [{"boxes": b} for b in gts], 4)
        if (cells & ~has_positive).any():
            break
    else:
        pytest.fail("no seeded batch has a level with imitation cells and no positive")
    official = official_loss_over_groups(student_cls, student_box, teacher_cls, teacher_box, gts, labels,
                                         PADDED_SIZES, student_fpn, teacher_fpn)
    assert terms["ld_im"].item() == pytest.approx(official["ld_im"].item(), rel=1e-5)


def test_ld_imitation_reads_fpn_only_when_on():
    assert build_method("ld", "gfl").fields == ("region",)
    assert build_method("ld", "gfl", {"imitation_weight": 2.0}).fields == ("region", "fpn")
    sizes = PADDED_SIZES[:2]
    student_cls, student_box, teacher_cls, teacher_box, gts, _ = make_inputs(sizes, seed=2)
    with pytest.raises(ValueError, match="fpn"):  # the cache without FPN maps
        project_loss(student_cls, student_box, teacher_cls, teacher_box, gts, sizes, student_fpn=None,
                     imitation_weight=2.0)


def test_finegrained_region_on_a_hand_computed_case():
    """One GT g0 [0, 0, 16, 16] and one GT g1 [32, 0, 60, 32]; two levels with custom anchors:

      level 0 (1×3): a0 [8, 0, 24, 16]  IoU(g0) = 128 / 384 = 1/3
                     a1 [0, 0, 8, 16]   IoU(g0) = 128 / 256 = 0.5
                     a2 [0, 0, 16, 16]  IoU(g0) = 1
      level 1 (1×2): b0 [0, 0, 32, 32]  IoU(g0) = 256 / 1024 = 0.25
                     b1 [32, 0, 64, 32] IoU(g1) = 896 / 1024 = 0.875 (the others 0 with g1)

    Image 0, all valid: g0's max is 1 (a2, level 0) -> region IoU > 0.5: a2 only (a1 at exactly 0.5
    is not >); g1's max 0.875 -> b1. Image 1, level 0 valid width 2 (a2 outside): g0's max over
    the valid anchors of both levels is 0.5 (a1) -> IoU > 0.25: a0 and a1, not b0 (exactly 0.25);
    g1 -> b1. Image 2 has no GT: empty.
    """
    from train.methods.ld import finegrained_region
    anchors = [torch.tensor([[8.0, 0, 24, 16], [0, 0, 8, 16], [0, 0, 16, 16]]),
               torch.tensor([[0.0, 0, 32, 32], [32, 0, 64, 32]])]
    gts = torch.tensor([[0.0, 0, 16, 16], [32, 0, 60, 32]])
    valid = [torch.ones(3, 1, 1, 3, dtype=torch.bool), torch.ones(3, 1, 1, 2, dtype=torch.bool)]
    valid[0][1, :, :, 2] = False
    targets = [{"boxes": gts}, {"boxes": gts}, {"boxes": torch.zeros(0, 4)}]
    region = finegrained_region(anchors, valid, targets)
    assert region[0][:, 0, 0].tolist() == [[False, False, True], [True, True, False], [False, False, False]]
    assert region[1][:, 0, 0].tolist() == [[False, True], [False, True], [False, False]]
    # The transcription of the official get_im_region on each image's valid anchors agrees.
    flat = torch.cat(anchors)
    for image in range(2):
        inside = torch.cat([v[image].reshape(-1) for v in valid])
        expected = torch.zeros(flat.shape[0])
        expected[inside] = official_get_im_region(flat[inside], gts)
        got = torch.cat([r[image].reshape(-1) for r in region]).float()
        assert got.tolist() == expected.tolist()


def test_eight_images_are_the_mean_of_four_two_image_losses():
    student_cls, student_box, teacher_cls, teacher_box, gts, labels = make_inputs(PADDED_SIZES, seed=3)
    terms, _ = project_loss(student_cls, student_box, teacher_cls, teacher_box, gts, PADDED_SIZES)
    pairs = []
    for start in range(0, 8, 2):
        sizes = PADDED_SIZES[start:start + 2]

        def crop(maps):
            return [m[start:start + 2] for m in maps]
        pairs.append(project_loss(crop(student_cls), crop(student_box), crop(teacher_cls), crop(teacher_box),
                                  gts[start:start + 2], sizes)[0])
    for term in TERMS:
        mean = sum(p[term].item() for p in pairs) / 4
        assert terms[term].item() == pytest.approx(mean, rel=1e-5), term
    # 8 images in groups of 8 is not the same thing: KD divides by each level's positives of the group.
    eight, _ = project_loss(student_cls, student_box, teacher_cls, teacher_box, gts, PADDED_SIZES, images_per_group=8)
    assert eight["ld_main"].item() == pytest.approx(4 * terms["ld_main"].item(), rel=1e-5)  # a sum, not a mean
    assert eight["ld_kd"].item() != pytest.approx(terms["ld_kd"].item(), rel=1e-3)


def test_odd_batch_last_group_has_one_image():
    sizes = PADDED_SIZES[:3]
    student_cls, student_box, teacher_cls, teacher_box, gts, labels = make_inputs(sizes, seed=5)
    terms, _ = project_loss(student_cls, student_box, teacher_cls, teacher_box, gts, sizes)
    first, _ = project_loss([m[:2] for m in student_cls], [m[:2] for m in student_box], [m[:2] for m in teacher_cls],
                            [m[:2] for m in teacher_box], gts[:2], sizes[:2])
    last, _ = project_loss([m[2:] for m in student_cls], [m[2:] for m in student_box], [m[2:] for m in teacher_cls],
                           [m[2:] for m in teacher_box], gts[2:], sizes[2:])
    for term in TERMS:
        assert terms[term].item() == pytest.approx((first[term].item() + last[term].item()) / 2, rel=1e-5), term


def test_official_vlr_rule_on_a_hand_computed_case():
    """One GT [0, 0, 16, 16], one level, three anchors (topk 9 > 3: all are ATSS candidates).

    official value = overlap / anchor area − ρ²/c² (bbox_overlaps(mode='diou') with union = area1):
      a0 [0, 0, 16, 16]:   IoU 1,             official 1
      a1 [8, 0, 24, 16]:   overlap 128, IoU 128/384 = 1/3, ρ² = 64, c² = 24² + 16² = 832,
                           official 128/256 − 64/832 = 0.42308, true DIoU 1/3 − 64/832 = 0.25641
      a2 [4, 4, 12, 12]:   overlap 64, IoU 64/256 = 0.25, ρ² = 0, official 64/64 = 1, true DIoU 0.25
    thr = mean + std of (1, 1/3, 0.25) = 0.52778 + 0.41107 = 0.93885 -> VLR [0.23471, 0.93885).
    """
    gt = torch.tensor([[0.0, 0.0, 16.0, 16.0]])
    anchors = torch.tensor([[0.0, 0.0, 16.0, 16.0], [8.0, 0.0, 24.0, 16.0], [4.0, 4.0, 12.0, 12.0]])
    ious = [1.0, 1 / 3, 0.25]
    mean = sum(ious) / 3
    thr = mean + math.sqrt(sum((v - mean) ** 2 for v in ious) / 2)
    assert thr == pytest.approx(0.938851, abs=1e-5)
    official = [1.0, 128 / 256 - 64 / 832, 1.0]
    true_diou = [1.0, 1 / 3 - 64 / 832, 0.25]
    torch.testing.assert_close(diou_matrix(anchors, gt, rule="official")[:, 0], torch.tensor(official))
    torch.testing.assert_close(official_bbox_overlaps(anchors, gt, mode="diou")[:, 0], torch.tensor(official))
    torch.testing.assert_close(diou_matrix(anchors, gt, rule="diou")[:, 0], torch.tensor(true_diou))
    torch.testing.assert_close(diou_matrix(anchors, gt)[:, 0], torch.tensor(true_diou))  # the true DIoU by default

    # official: only a1 (0.423) is in [0.2347, 0.9389); a2 (1.0) is not. Weight: a1's IoU 1/3.
    rows = ld_regions(anchors, [3], gt, topk=TOPK)
    vlr = rows["kind"] == REGION_VLR
    assert rows["index"][vlr].tolist() == [1]
    torch.testing.assert_close(rows["iou"][vlr], torch.tensor([1 / 3]))
    torch.testing.assert_close(official_get_vlr_region(anchors, [3], gt), torch.tensor([0.0, 1 / 3, 0.0]))
    assert rows["index"][rows["kind"] == REGION_POSITIVE].tolist() == [0]  # IoU 1 >= thr, centre inside
    # true DIoU: a1 (0.256) and a2 (0.25) are both in the VLR.
    rows = ld_regions(anchors, [3], gt, topk=TOPK, vlr_rule="diou")
    vlr = rows["kind"] == REGION_VLR
    assert rows["index"][vlr].tolist() == [1, 2]
    torch.testing.assert_close(rows["iou"][vlr], torch.tensor([1 / 3, 0.25]))


def test_vlr_anchor_in_several_gts_takes_the_highest_iou_as_the_official_code():
    generator = torch.Generator().manual_seed(11)
    anchors = torch.cat(official_grid_anchors([(12, 16), (6, 8), (3, 4), (2, 2), (1, 1)]))
    counts = [12 * 16, 6 * 8, 3 * 4, 2 * 2, 1]
    for _ in range(5):
        xy = torch.rand(4, 2, generator=generator) * 80
        gts = torch.cat([xy, xy + 16 + torch.rand(4, 2, generator=generator) * 60], dim=1)  # overlapping GTs
        rows = ld_regions(anchors, counts, gts, topk=TOPK)
        expected = official_get_vlr_region(anchors, counts, gts)
        got = torch.zeros(anchors.shape[0])
        starts = torch.tensor([0] + counts).cumsum(0)
        vlr = rows["kind"] == REGION_VLR
        got[starts[rows["level"][vlr]] + rows["index"][vlr]] = rows["iou"][vlr]
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        assigned = official_atss_assign(anchors, counts, gts)
        positive = rows["kind"] == REGION_POSITIVE
        flat = starts[rows["level"][positive]] + rows["index"][positive]
        assert sorted(flat.tolist()) == torch.nonzero(assigned > 0).squeeze(1).tolist()
        assert (rows["gt"][positive] == assigned[flat] - 1).all()
