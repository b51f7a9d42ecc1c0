"""DeFeat on Faster R-CNN against a plain-torch transcription of the official two-stage code
(ggjy/DeFeat.pytorch @c46a793).

- ``official_get_gt_mask`` (tests/test_reference_defeat.py): ``AnchorHead.get_gt_mask`` with ``_map_roi_levels``
  (``mmdet/models/dense_heads/anchor_head.py``), as ``TwoStageDetectorKD`` calls it on the RPN's 5
  levels (``rpn_head.get_gt_mask(rpn_outs[0], ...)``, strides 4, 8, 16, 32, 64, imit_range all 0).
- ``official_neck_losses``: ``batch_processor_kd`` (``mmdet/apis/train.py``), branch
  ``neck-adapt,neck-decouple,pixel-wise``.
- ``official_kl_divergence`` and ``official_kl_decouple``: ``KLDivergenceLoss`` and the ``head-cls``
  + ``KL-decouple`` branch, with the labels and logits of the student's sampled RoIs (``SampleSTU``),
  in mmdetection's layout (background last).

One call is one GPU's loss (2 images); 4 images must give the mean of 2 calls (DDP's average). The
images have different sizes: as in tests/test_reference_defeat.py, the official background mask is
multiplied by the valid mask (the documented deviation, marked below).
"""
import pytest
import torch
import torch.nn.functional as F

from detectors.detector import valid_level_sizes
from detectors.frcnn import TwoStageOutput
from train.methods import build_method
from test_reference_defeat import official_get_gt_mask, official_map_roi_levels
from train.methods.defeat import DeFeat
from train.teacher_batch import collate_teacher

STRIDES = (4, 8, 16, 32, 64)  # P2..P6
LEVELS = ("p2", "p3", "p4", "p5", "p6")
C = 2
K = 3  # classes; K + 1 RoI logit columns
IMAGE_SIZES = [(960, 960), (704, 900), (960, 832), (500, 620)]
BATCH_SIZE = (960, 960)  # the batch's padded size: every image fits
LEVEL_MAPS = valid_level_sizes(BATCH_SIZE, STRIDES)  # (240, 240) .. (15, 15)


# ---------------------------------------------------------------------------------------------- the official code


def official_neck_losses(neck_feat_adapt, neck_feat_t, neck_mask_batch, hint_neck_w, hint_neck_back_w, valid):
    losskd_neck, losskd_neck_back = 0.0, 0.0
    for i, neck_feat_adapt_i in enumerate(neck_feat_adapt):
        mask_hint = neck_mask_batch[i].unsqueeze(1).repeat(1, neck_feat_adapt_i.size(1), 1, 1)
        norms = max(1.0, mask_hint.sum() * 2)
        back = (1 - mask_hint) * valid[i]  # the documented deviation: no background on batch padding
        norms_back = max(1.0, back.sum() * 2)
        losskd_neck_back += (torch.pow(neck_feat_adapt_i - neck_feat_t[i], 2) * back).sum() / norms_back
        losskd_neck += (torch.pow(neck_feat_adapt_i - neck_feat_t[i], 2) * mask_hint).sum() / norms
    losskd_neck = losskd_neck / len(neck_feat_adapt) * hint_neck_w
    losskd_neck_back = losskd_neck_back / len(neck_feat_adapt) * hint_neck_back_w
    return losskd_neck, losskd_neck_back


def official_kl_divergence(y, teacher_scores, mask, T):
    if mask.sum() > 0:
        p = F.log_softmax(y / T, dim=1)[mask]
        q = F.softmax(teacher_scores / T, dim=1)[mask]
        l_kl = F.kl_div(p, q, reduction="none")  # the official reduce=False
        loss = torch.sum(l_kl) / mask.sum()
    else:
        loss = torch.zeros(1, dtype=y.dtype)
    return loss * T ** 2


def official_kl_decouple(cls_score_s, cls_score_t, labels, head_cls_w, head_cls_back_w, head_cls_T):
    pos_inds = labels < labels.max()
    loss_hcls = official_kl_divergence(cls_score_s, cls_score_t, pos_inds, T=head_cls_T)
    pos_inds = labels == labels.max()
    loss_hcls_back = official_kl_divergence(cls_score_s, cls_score_t, pos_inds, T=head_cls_T)
    return loss_hcls * head_cls_w, loss_hcls_back * head_cls_back_w


def to_mmdet_layout(logits, labels):
    """Ours: column 0 background, class k in column k + 1; mmdetection: class k in column k, background K."""
    return torch.cat([logits[:, 1:], logits[:, :1]], dim=1), torch.where(labels == 0, K, labels - 1)


# ---------------------------------------------------------------------------------------------- the case
def gt_boxes(index, height, width):
    """Boxes inside the image over every level it can hold, the 112 boundary and a thinner-than-a-cell box."""
    gen = torch.Generator().manual_seed(100 + index)
    boxes = [[10.0, 12.0, 40.0, 50.0],       # P2
             [0.0, 0.0, 110.0, 110.0],       # √(111·111) = 111: P2
             [200.0, 100.0, 311.0, 211.0],   # √(112·112) = 112: P3
             [30.0, 40.0, 330.0, 330.0],     # P4
             [5.0, 3.0, 5.0 + 0.95 * min(width, 640), 3.0 + 0.95 * min(height, 600)],  # P5 (or P4)
             [9.0, 21.0, 10.5, 60.0]]        # thinner than a cell
    if min(height, width) >= 940:
        boxes.append([2.0, 4.0, width - 3.0, height - 5.0])  # √area >= 896: P6
    for _ in range(3):
        x1, y1 = float(torch.rand(1, generator=gen)) * width * 0.6, float(torch.rand(1, generator=gen)) * height * 0.6
        bw = 4 + float(torch.rand(1, generator=gen)) * (width - x1 - 5)
        bh = 4 + float(torch.rand(1, generator=gen)) * (height - y1 - 5)
        boxes.append([x1, y1, x1 + bw, y1 + bh])
    return torch.tensor(boxes)


def two_stage_case(num_images, seed):
    """A TwoStageOutput (features and sampled RoIs), its TeacherBatch (collate_teacher on fpn.p2..p6) and targets."""
    gen = torch.Generator().manual_seed(seed)
    image_sizes = IMAGE_SIZES[:num_images]
    boxes = [gt_boxes(i, h, w) for i, (h, w) in enumerate(image_sizes)]
    targets = [{"boxes": b, "labels": torch.zeros(len(b), dtype=torch.long)} for b in boxes]
    samples = [{f"fpn.{name}": torch.randn(C, h, w, generator=gen, dtype=torch.float64)
                for name, (h, w) in zip(LEVELS, valid_level_sizes(size, STRIDES))} for size in image_sizes]
    teacher = collate_teacher(samples, LEVEL_MAPS, "cpu", image_sizes=image_sizes, strides=STRIDES)
    features = [torch.randn(num_images, C, h, w, generator=gen, dtype=torch.float64).requires_grad_()
                for h, w in LEVEL_MAPS]
    # Sampled RoIs, positives first; images 2 and 3 (the second GPU) have no positive.
    positives = [3, 5, 0, 0][:num_images]
    rois_per_image = [7, 9, 4, 6][:num_images]
    rois = [torch.rand(r, 4, generator=gen, dtype=torch.float64) * 100 for r in rois_per_image]
    roi_labels = [torch.cat([torch.randint(1, K + 1, (p,), generator=gen), torch.zeros(r - p, dtype=torch.long)])
                  for p, r in zip(positives, rois_per_image)]
    cls_logits = (torch.randn(sum(rois_per_image), K + 1, generator=gen, dtype=torch.float64) * 2).requires_grad_()
    student = TwoStageOutput(features=features, rpn_objectness=[], rpn_deltas=[], anchors=[], strides=STRIDES,
                             image_sizes=image_sizes, proposals=[], proposal_scores=[], rois=rois,
                             roi_pooled=torch.zeros(0), roi_cls_logits=cls_logits, roi_box_deltas=torch.zeros(0),
                             roi_labels=roi_labels)
    return student, teacher, targets


def build(overrides=None):
    torch.manual_seed(0)
    method = build_method("defeat", "frcnn", overrides or {}, student_channels=C, teacher_channels=C).double()
    with torch.no_grad():  # a larger adapter than the official 1e-4 init, so that its gradients are not tiny
        for adapter in method.adapters:
            adapter.weight.normal_()
    return method


# ---------------------------------------------------------------------------------------------- tests
def test_the_masks_cover_every_level():
    """The case reaches all 5 levels (P6 included) and the 112 boundary, so the rule is really tested."""
    boxes = gt_boxes(0, *IMAGE_SIZES[0])
    levels = official_map_roi_levels(boxes, 5).tolist()
    assert set(levels) == {0, 1, 2, 3, 4} and levels[1:3] == [0, 1]


@pytest.mark.parametrize("num_images", [2, 4])
def test_neck_terms_match_the_official_two_stage_code(num_images):
    student, teacher, targets = two_stage_case(num_images, seed=num_images)
    method = build()
    assert len(method.adapters) == 5
    terms = method(student, teacher, targets, iteration=0)
    assert set(terms) == {"defeat_fg", "defeat_bg"}

    adapted = [adapter(f) for adapter, f in zip(method.adapters, student.features)]
    per_gpu = []
    for g in range(0, num_images, 2):
        masks = official_get_gt_mask(LEVEL_MAPS, STRIDES, [t["boxes"].double() for t in targets[g:g + 2]])
        per_gpu.append(official_neck_losses([a[g:g + 2] for a in adapted], [f[g:g + 2] for f in teacher.fpn],
                                            masks, 4.0, 16.0, [v[g:g + 2] for v in teacher.valid]))
    official_fg = sum(fg for fg, _ in per_gpu) / len(per_gpu)  # DDP: mean over GPUs
    official_bg = sum(bg for _, bg in per_gpu) / len(per_gpu)

    assert terms["defeat_fg"].item() == pytest.approx(official_fg.item(), rel=1e-5)
    assert terms["defeat_bg"].item() == pytest.approx(official_bg.item(), rel=1e-5)
    leaves = [*student.features, *method.parameters()]
    ours = torch.autograd.grad(terms["defeat_fg"] + terms["defeat_bg"], leaves)
    theirs = torch.autograd.grad(official_fg + official_bg, leaves)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("num_images", [2, 4])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_roi_head_terms_match_the_official_kl_decouple(num_images, temperature):
    student, teacher, targets = two_stage_case(num_images, seed=10 + num_images)
    gen = torch.Generator().manual_seed(7)
    teacher_logits = torch.randn(student.roi_cls_logits.shape, generator=gen, dtype=torch.float64) * 3
    calls = []

    def roi_head(rois):  # the partial teacher: its outputs on the RoIs it is given
        calls.append(rois)
        return torch.zeros(len(teacher_logits), C, 7, 7), teacher_logits, torch.zeros(len(teacher_logits), 4 * (K + 1))

    teacher.roi_head = roi_head
    method = build({"head_fg_weight": 2.0, "head_bg_weight": 3.0, "head_temperature": temperature})
    terms = method(student, teacher, targets, iteration=0)
    assert len(calls) == 1 and calls[0] is student.rois  # the student's sampled RoIs (SampleSTU)
    assert set(terms) == {"defeat_fg", "defeat_bg", "defeat_head_fg", "defeat_head_bg"}

    rows = [len(r) for r in student.rois]
    per_gpu = []
    for g in range(0, num_images, 2):
        first, last = sum(rows[:g]), sum(rows[:g + 2])
        labels = torch.cat(student.roi_labels[g:g + 2])
        cls_score_s, labels_mmdet = to_mmdet_layout(student.roi_cls_logits[first:last], labels)
        cls_score_t, _ = to_mmdet_layout(teacher_logits[first:last], labels)
        per_gpu.append(official_kl_decouple(cls_score_s, cls_score_t, labels_mmdet, 2.0, 3.0, temperature))
    official_fg = sum(fg for fg, _ in per_gpu) / len(per_gpu)
    official_bg = sum(bg for _, bg in per_gpu) / len(per_gpu)
    if num_images == 4:  # the second GPU has no positive RoI: its fg term is 0 and still counts in the mean
        assert per_gpu[1][0].item() == 0 and per_gpu[0][0].item() > 0

    assert terms["defeat_head_fg"].item() == pytest.approx(official_fg.item(), rel=1e-5)
    assert terms["defeat_head_bg"].item() == pytest.approx(official_bg.item(), rel=1e-5)
    ours = torch.autograd.grad(terms["defeat_head_fg"] + terms["defeat_head_bg"], student.roi_cls_logits)
    theirs = torch.autograd.grad((official_fg + official_bg).sum(), student.roi_cls_logits)
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-12)


def test_head_term_needs_the_teacher_roi_head():
    student, teacher, targets = two_stage_case(2, seed=0)
    method = build({"head_fg_weight": 2.0})
    with pytest.raises(ValueError, match="RoI head"):
        method(student, teacher, targets, iteration=0)


def test_fields_and_roi_head_reads_on_frcnn():
    pyramid = tuple(f"fpn.{name}" for name in LEVELS)
    released = build_method("defeat", "frcnn")
    assert released.fields == pyramid == DeFeat.FAMILY_FIELDS["frcnn"] and not released.reads_teacher_roi_head
    config = released.config
    assert (config.fg_weight, config.bg_weight, config.head_fg_weight, config.head_bg_weight) == (4.0, 16.0, 0.0, 0.0)
    for overrides in ({"head_fg_weight": 2.0}, {"head_bg_weight": 2.0}, {"head_fg_weight": 2, "head_bg_weight": 2}):
        method = build_method("defeat", "frcnn", overrides)
        assert method.reads_teacher_roi_head
        assert method.fields == pyramid  # fpn.p2..p5 (the RoI head's maps) among them, no head.cls
    # The dense families are unchanged.
    assert build_method("defeat", "retina").fields == ("fpn",)
    dense_head = build_method("defeat", "retina", {"head_fg_weight": 2.0})
    assert dense_head.fields == ("fpn", "head.cls") and not dense_head.reads_teacher_roi_head


@pytest.mark.parametrize("key", ["backbone_fg_weight", "backbone_bg_weight"])
def test_backbone_terms_are_refused_on_frcnn(key):
    with pytest.raises(ValueError, match=rf"{key}=1.*two-stage family 'frcnn'.*no backbone maps"):
        build_method("defeat", "frcnn", {key: 1.0})
    assert DeFeat.Config.for_family("retina", **{key: 1.0}).backbone_on  # dense: allowed
