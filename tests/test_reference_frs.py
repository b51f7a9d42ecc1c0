"""FRS against a plain-torch transcription of the official code (duzhixing/FRS @decd60c).

``official_frs_per_gpu`` follows ``Distilling_FRS_Single.forward_train`` in
``detectors/distill_frs_single.py``: per level, mask = max over channels of σ(teacher logits),
feat = Σ mask·(y − adapted)² / Σ mask, cls = Σ mask·F.binary_cross_entropy(σ(s), σ(t)) / Σ mask,
summed over levels, times the weights, times iter / distill_warm_step while warming up. One call
is one GPU's loss (2 images); a batch of 8 must give the mean of 4 such calls (DDP's average).

Padding: the cache holds no teacher outputs on batch padding, so the project sums over each
image's valid region only (documented in ``train/methods/frs.py``). The padded cases give the
official code a teacher whose logits are −1e4 on the padding (σ = 0, so S = 0 there): then the
official sums over the whole map must equal the project's sums over the valid region.
"""
import pytest
import torch
import torch.nn.functional as F

from detectors.detector import DetectorOutput
from train.methods import FRS
from train.teacher_batch import TeacherBatch

MAPS = [(6, 8), (3, 4)]  # two levels, strides 8 and 16
C, K = 4, 3


def official_frs_per_gpu(y_t, adapted, stu_cls, tea_cls, feat_weight, cls_weight, iteration, warm_step):
    """distill_frs_single.py, forward_train, from ``layers = len(stu_cls_score)`` to the warmup."""
    distill_feat_loss, distill_cls_loss = 0, 0
    for layer in range(len(stu_cls)):
        stu_cls_score_sigmoid = stu_cls[layer].sigmoid()
        tea_cls_score_sigmoid = tea_cls[layer].sigmoid()
        mask = torch.max(tea_cls_score_sigmoid, dim=1).values.detach()
        feat_loss = torch.pow((y_t[layer] - adapted[layer]), 2)
        cls_loss = F.binary_cross_entropy(stu_cls_score_sigmoid, tea_cls_score_sigmoid, reduction="none")
        distill_feat_loss += (feat_loss * mask[:, None, :, :]).sum() / mask.sum()
        distill_cls_loss += (cls_loss * mask[:, None, :, :]).sum() / mask.sum()
    distill_feat_loss = distill_feat_loss * feat_weight
    distill_cls_loss = distill_cls_loss * cls_weight
    if warm_step > iteration:
        distill_feat_loss = (iteration / warm_step) * distill_feat_loss
        distill_cls_loss = (iteration / warm_step) * distill_cls_loss
    return distill_feat_loss, distill_cls_loss


def valid_sizes_for(num_images, padding):
    if not padding:
        return [[MAPS[0], MAPS[1]] for _ in range(num_images)]
    sizes = []
    for i in range(num_images):
        h, w = MAPS[0][0] - i % 3, MAPS[0][1] - 2 * (i % 2)
        sizes.append([(h, w), ((h + 1) // 2, (w + 1) // 2)])
    return sizes


def valid_masks(valid_sizes):
    masks = []
    for level, (map_h, map_w) in enumerate(MAPS):
        mask = torch.zeros(len(valid_sizes), 1, map_h, map_w, dtype=torch.bool)
        for i, sizes in enumerate(valid_sizes):
            mask[i, :, :sizes[level][0], :sizes[level][1]] = True
        masks.append(mask)
    return masks


@pytest.mark.parametrize("iteration", [200, 1000])
@pytest.mark.parametrize("padding", [False, True])
@pytest.mark.parametrize("num_images", [2, 8])
def test_frs_matches_the_official_code(num_images, padding, iteration):
    torch.manual_seed(num_images + 10 * padding)
    valid_sizes = valid_sizes_for(num_images, padding)
    valid = valid_masks(valid_sizes)
    f_s = [torch.randn(num_images, C, h, w, dtype=torch.float64, requires_grad=True) for h, w in MAPS]
    s_cls = [torch.randn(num_images, K, h, w, dtype=torch.float64, requires_grad=True) for h, w in MAPS]
    f_t = [torch.randn(num_images, C, h, w, dtype=torch.float64) for h, w in MAPS]
    # Teacher logits −1e4 on the padding: σ = 0 there, so the official sums see no padding.
    t_cls = [torch.where(v, torch.randn(num_images, K, h, w, dtype=torch.float64) * 2, torch.tensor(-1e4).double())
             for v, (h, w) in zip(valid, MAPS)]

    method = FRS(FRS.Config.for_family("retina"), student_channels=C, teacher_channels=C, num_levels=2).double()
    student = DetectorOutput(f_s, s_cls, [torch.zeros(num_images, 4, h, w) for h, w in MAPS],
                             [torch.zeros(h * w, 4) for h, w in MAPS], (8, 16), [(48, 64)] * num_images)
    teacher = TeacherBatch(fpn=f_t, cls=t_cls, box=None, valid=valid, region=None, valid_sizes=valid_sizes)
    terms = method(student, teacher, [], iteration)

    adapted = [adapter(f) for adapter, f in zip(method.adapters, f_s)]
    per_gpu = [official_frs_per_gpu([f[g:g + 2] for f in f_t], [a[g:g + 2] for a in adapted],
                                    [s[g:g + 2] for s in s_cls], [t[g:g + 2] for t in t_cls], 0.005, 0.02,
                                    iteration, 500)
               for g in range(0, num_images, 2)]
    official_feat = sum(feat for feat, _ in per_gpu) / len(per_gpu)  # DDP: mean over GPUs
    official_cls = sum(cls for _, cls in per_gpu) / len(per_gpu)

    assert terms["frs_feat"].item() == pytest.approx(official_feat.item(), rel=1e-5)
    assert terms["frs_cls"].item() == pytest.approx(official_cls.item(), rel=1e-5)
    leaves = [*f_s, *s_cls, *method.parameters()]
    ours = torch.autograd.grad(terms["frs_feat"] + terms["frs_cls"], leaves)
    theirs = torch.autograd.grad(official_feat + official_cls, leaves)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-12)


def test_odd_batch_last_group_is_one_image():
    """B = 3: the mean of the pair's loss and the lone image's loss (documented in frs.py)."""
    torch.manual_seed(3)
    valid_sizes = valid_sizes_for(3, True)
    valid = valid_masks(valid_sizes)
    f_s = [torch.randn(3, C, h, w, dtype=torch.float64) for h, w in MAPS]
    s_cls = [torch.randn(3, K, h, w, dtype=torch.float64) for h, w in MAPS]
    f_t = [torch.randn(3, C, h, w, dtype=torch.float64) for h, w in MAPS]
    t_cls = [torch.where(v, torch.randn(3, K, h, w, dtype=torch.float64), torch.tensor(-1e4).double())
             for v, (h, w) in zip(valid, MAPS)]
    method = FRS(FRS.Config.for_family("retina"), student_channels=C, teacher_channels=C, num_levels=2).double()
    student = DetectorOutput(f_s, s_cls, [], [], (8, 16), [(48, 64)] * 3)
    teacher = TeacherBatch(fpn=f_t, cls=t_cls, box=None, valid=valid, region=None, valid_sizes=valid_sizes)
    terms = method(student, teacher, [], 1000)
    with torch.no_grad():
        adapted = [adapter(f) for adapter, f in zip(method.adapters, f_s)]
        parts = [official_frs_per_gpu([f[s] for f in f_t], [a[s] for a in adapted], [x[s] for x in s_cls],
                                      [t[s] for t in t_cls], 0.005, 0.02, 1000, 500)
                 for s in (slice(0, 2), slice(2, 3))]
    assert terms["frs_feat"].item() == pytest.approx((parts[0][0] + parts[1][0]).item() / 2, rel=1e-5)
