"""DeFeat against a plain-torch transcription of the official code (ggjy/DeFeat.pytorch @c46a793).

- ``official_map_roi_levels``: ``AnchorHead._map_roi_levels`` (``mmdet/models/dense_heads/anchor_head.py``).
- ``official_get_gt_mask``: ``AnchorHead.get_gt_mask`` (same file; imit_range all 0).
- ``official_neck_losses``: ``batch_processor_kd`` in ``mmdet/apis/train.py``, the branch
  ``neck-adapt,neck-decouple,pixel-wise``: per level, norms = max(1, 2·Σ mask_c), norms_back =
  max(1, 2·Σ (1 − mask)_c), both over the GPU's batch; each loss divided by the number of levels.

One call is one GPU's loss (2 images); a batch of 8 must give the mean of 4 calls (DDP's average).

Padding: the cache holds no teacher features on batch padding, so the project's background is
restricted to each image's valid region (documented in ``train/methods/defeat.py``). In the padded
cases the official background mask is multiplied by the valid mask — that one line, marked
below, is the documented deviation; everything else is the official computation.
"""
import pytest
import torch

from detectors.detector import DetectorOutput
from train.methods import DeFeat
from train.teacher_batch import TeacherBatch

MAPS = [(16, 20), (8, 10)]  # two levels, strides 8 and 16
STRIDES = (8, 16)
C = 4


def official_map_roi_levels(rois, num_levels):
    scale = torch.sqrt((rois[:, 2] - rois[:, 0] + 1) * (rois[:, 3] - rois[:, 1] + 1))
    target_lvls = torch.floor(torch.log2(scale / 56 + 1e-6))
    return target_lvls.clamp(min=0, max=num_levels - 1).long()


def official_get_gt_mask(featmap_sizes, featmap_strides, gt_bboxes):
    mask_batch = []
    for batch in range(len(gt_bboxes)):
        mask_level = []
        target_lvls = official_map_roi_levels(gt_bboxes[batch], len(featmap_sizes))
        for level in range(len(featmap_sizes)):
            gt_level = gt_bboxes[batch][target_lvls == level]
            h, w = featmap_sizes[level]
            mask_per_img = torch.zeros([h, w], dtype=torch.double)
            for ins in range(gt_level.shape[0]):
                gt_level_map = gt_level[ins] / featmap_strides[level]
                lx, rx = max(int(gt_level_map[0]), 0), min(int(gt_level_map[2]), w)
                ly, ry = max(int(gt_level_map[1]), 0), min(int(gt_level_map[3]), h)
                if (lx == rx) or (ly == ry):
                    mask_per_img[ly, lx] += 1
                else:
                    mask_per_img[ly:ry, lx:rx] += 1
            mask_level.append((mask_per_img > 0).double())
        mask_batch.append(mask_level)
    return [torch.stack([mask_batch[b][level] for b in range(len(mask_batch))]) for level in range(len(mask_batch[0]))]


def official_neck_losses(neck_feat_adapt, neck_feat_t, neck_mask_batch, fg_weight, bg_weight, valid=None):
    losskd_neck, losskd_neck_back = 0.0, 0.0
    for i, adapt in enumerate(neck_feat_adapt):
        mask_hint = neck_mask_batch[i].unsqueeze(1).repeat(1, adapt.size(1), 1, 1)
        norms = max(1.0, mask_hint.sum() * 2)
        back = 1 - mask_hint
        if valid is not None:
            back = back * valid[i]  # the documented deviation: no background on batch padding
        norms_back = max(1.0, back.sum() * 2)
        losskd_neck_back += (torch.pow(adapt - neck_feat_t[i], 2) * back).sum() / norms_back
        losskd_neck += (torch.pow(adapt - neck_feat_t[i], 2) * mask_hint).sum() / norms
    n = len(neck_feat_adapt)
    return losskd_neck / n * fg_weight, losskd_neck_back / n * bg_weight


def random_case(num_images, padding, seed):
    gen = torch.Generator().manual_seed(seed)
    valid_sizes, targets = [], []
    for i in range(num_images):
        h, w = (MAPS[0][0] - 2 * (i % 3), MAPS[0][1] - 4 * (i % 2)) if padding else MAPS[0]
        valid_sizes.append([(h, w), ((h + 1) // 2, (w + 1) // 2)])
        height, width = 8 * h, 8 * w  # pixels
        boxes = []
        for _ in range(4 + i % 3):
            x1 = float(torch.rand(1, generator=gen)) * width * 0.7
            y1 = float(torch.rand(1, generator=gen)) * height * 0.7
            bw = 4 + float(torch.rand(1, generator=gen)) * (width - x1 - 4)
            bh = 4 + float(torch.rand(1, generator=gen)) * (height - y1 - 4)
            boxes.append([x1, y1, x1 + bw, y1 + bh])
        boxes.append([3.0, 5.0, 6.0, 7.0])  # thinner than a cell
        targets.append({"boxes": torch.tensor(boxes), "labels": torch.zeros(len(boxes), dtype=torch.long)})
    valid = []
    for level, (map_h, map_w) in enumerate(MAPS):
        mask = torch.zeros(num_images, 1, map_h, map_w, dtype=torch.bool)
        for i, sizes in enumerate(valid_sizes):
            mask[i, :, :sizes[level][0], :sizes[level][1]] = True
        valid.append(mask)
    return valid_sizes, valid, targets


@pytest.mark.parametrize("padding", [False, True])
@pytest.mark.parametrize("num_images", [2, 8])
def test_defeat_matches_the_official_code(num_images, padding):
    torch.manual_seed(num_images + 10 * padding)
    valid_sizes, valid, targets = random_case(num_images, padding, seed=num_images + padding)
    f_s = [torch.randn(num_images, C, h, w, dtype=torch.float64, requires_grad=True) for h, w in MAPS]
    f_t = [torch.randn(num_images, C, h, w, dtype=torch.float64) * v for v, (h, w) in zip(valid, MAPS)]
    method = DeFeat(DeFeat.Config.for_family("retina"), student_channels=C, teacher_channels=C, num_levels=2).double()
    with torch.no_grad():  # a larger adapter than the official 1e-4 init, so that its gradients are not tiny
        for adapter in method.adapters:
            adapter.weight.normal_()
    student = DetectorOutput(f_s, [], [], [torch.zeros(h * w, 4) for h, w in MAPS], STRIDES,
                             [(8 * s[0][0], 8 * s[0][1]) for s in valid_sizes])
    teacher = TeacherBatch(fpn=f_t, cls=None, box=None, valid=valid, region=None, valid_sizes=valid_sizes)
    terms = method(student, teacher, targets, iteration=0)

    adapted = [adapter(f) for adapter, f in zip(method.adapters, f_s)]
    per_gpu = []
    for g in range(0, num_images, 2):
        masks = official_get_gt_mask(MAPS, STRIDES, [t["boxes"].double() for t in targets[g:g + 2]])
        per_gpu.append(official_neck_losses([a[g:g + 2] for a in adapted], [f[g:g + 2] for f in f_t], masks, 4.0,
                                            16.0, [v[g:g + 2] for v in valid] if padding else None))
    official_fg = sum(fg for fg, _ in per_gpu) / len(per_gpu)  # DDP: mean over GPUs
    official_bg = sum(bg for _, bg in per_gpu) / len(per_gpu)

    assert terms["defeat_fg"].item() == pytest.approx(official_fg.item(), rel=1e-5)
    assert terms["defeat_bg"].item() == pytest.approx(official_bg.item(), rel=1e-5)
    leaves = [*f_s, *method.parameters()]
    ours = torch.autograd.grad(terms["defeat_fg"] + terms["defeat_bg"], leaves)
    theirs = torch.autograd.grad(official_fg + official_bg, leaves)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-12)
