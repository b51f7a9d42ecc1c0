"""MasKD stage 2 against a plain-torch transcription of the official code (hunto/MasKD @b5af34f).

- ``OfficialMaskModule``: ``MaskModule.forward_mask`` / ``forward_prob``
  (``mmrazor/mmrazor/models/losses/maskd.py``, same in ``mmdetection/maskd.py``).
- ``official_maskd_loss``: ``MasKDLoss.forward`` (same file), with the student's masks after
  ``custom_mask_warmup``.
- ``official_l1``: mmdet's ``L1Loss`` (reduction mean) on ``bbox_head.retina_reg``'s outputs, one
  loss per level (``SingleTeacherDistiller.compute_distill_loss``), weight 1.

One call is one GPU's loss (2 images); a batch of 8 must give the mean of 4 calls (DDP's average).

Padding: the cache holds no teacher outputs on batch padding, so the project restricts the masks
and the L1 mean to each image's valid region and pools p per image on its valid crop
(documented in ``train/methods/maskd.py``). In the padded cases those lines of the official code,
marked below, apply the valid region; everything else is the official computation.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from detectors.detector import DetectorOutput
from train.methods import MasKD
from train.teacher_batch import TeacherBatch

MAPS = [(6, 8), (3, 4)]
C, T, BOX = 8, 3, 4


class OfficialMaskModule(nn.Module):
    def __init__(self, channels, num_tokens):
        super().__init__()
        self.mask_token = nn.Parameter(torch.randn(num_tokens, channels))
        self.prob = nn.Sequential(nn.Conv2d(channels, channels, kernel_size=3, padding=1), nn.AdaptiveAvgPool2d(1),
                                  nn.Conv2d(channels, num_tokens, kernel_size=1))

    def forward_mask(self, x):
        n, c, h, w = x.shape
        attn = self.mask_token.expand(n, -1, -1) @ x.view(n, -1, h * w)  # [N, T, H*W]
        return attn.sigmoid().view(n, -1, h, w)

    def forward_prob(self, x):
        return self.prob(x).softmax(1).unsqueeze(2)  # [N, T, 1, 1, 1]


class ProjectTokens:
    """The project's tokens protocol over the official module's weights."""

    def __init__(self, modules):
        self.modules = modules

    def masks(self, features, level):
        return self.modules[level].forward_mask(features)

    def weights(self, features, level):
        return self.modules[level].forward_prob(features).flatten(1)


def official_maskd_loss(y_s_list, y_t_list, mask_modules, use_student_masks, loss_weight, valid=None):
    losses = []
    for level, (y_s, y_t, mask_module) in enumerate(zip(y_s_list, y_t_list, mask_modules)):
        mask = mask_module.forward_mask(y_t)
        if valid is not None:
            mask = mask * valid[level]  # the documented deviation: no mask on batch padding
        if use_student_masks:
            with torch.no_grad():
                mask = mask * mask_module.forward_mask(y_s)
        masked_y_s = y_s.unsqueeze(1) * mask.unsqueeze(2)
        masked_y_t = y_t.unsqueeze(1) * mask.unsqueeze(2)
        loss = ((masked_y_s - masked_y_t) ** 2).sum((3, 4))  # [N, T, C]
        loss = loss / mask.sum((2, 3)).unsqueeze(-1)
        if valid is None:
            weights = mask_module.forward_prob(y_t).flatten(1)  # [N, T]
        else:  # the documented deviation: p pooled on each image's valid crop
            weights = torch.cat([mask_module.forward_prob(y_t[i:i + 1, :, :int(valid[level][i, 0].any(1).sum()),
                                                             :int(valid[level][i, 0].any(0).sum())]).flatten(1)
                                 for i in range(y_t.shape[0])])
        losses.append((loss.mean(-1) * weights).sum(-1).mean())
    return loss_weight * sum(losses)


def official_l1(s_boxes, t_boxes, valid=None):
    total = 0.0
    for level, (s, t) in enumerate(zip(s_boxes, t_boxes)):
        if valid is None:
            total = total + F.l1_loss(s, t, reduction="mean")
        else:  # the documented deviation: the mean over the valid region only
            total = total + ((s - t).abs() * valid[level]).sum() / (valid[level].sum() * s.shape[1])
    return total


@pytest.mark.parametrize("iteration", [0, 7000])
@pytest.mark.parametrize("padding", [False, True])
@pytest.mark.parametrize("num_images", [2, 8])
def test_maskd_matches_the_official_code(num_images, padding, iteration):
    torch.manual_seed(num_images + 10 * padding)
    valid_sizes = []
    for i in range(num_images):
        h, w = (MAPS[0][0] - i % 3, MAPS[0][1] - 2 * (i % 2)) if padding else MAPS[0]
        valid_sizes.append([(h, w), ((h + 1) // 2, (w + 1) // 2)])
    valid = []
    for level, (map_h, map_w) in enumerate(MAPS):
        mask = torch.zeros(num_images, 1, map_h, map_w, dtype=torch.bool)
        for i, sizes in enumerate(valid_sizes):
            mask[i, :, :sizes[level][0], :sizes[level][1]] = True
        valid.append(mask)
    modules = nn.ModuleList([OfficialMaskModule(C, T) for _ in MAPS]).double().requires_grad_(False)
    f_s = [torch.randn(num_images, C, h, w, dtype=torch.float64, requires_grad=True) for h, w in MAPS]
    f_t = [torch.randn(num_images, C, h, w, dtype=torch.float64) * v for v, (h, w) in zip(valid, MAPS)]
    s_box = [torch.randn(num_images, BOX, h, w, dtype=torch.float64, requires_grad=True) for h, w in MAPS]
    t_box = [torch.randn(num_images, BOX, h, w, dtype=torch.float64) * v for v, (h, w) in zip(valid, MAPS)]

    method = MasKD(MasKD.Config.for_family("retina"), ProjectTokens(modules), student_channels=C,
                   teacher_channels=C, num_levels=2).double()
    student = DetectorOutput(f_s, [], s_box, [], (8, 16), [(48, 64)] * num_images)
    teacher = TeacherBatch(fpn=f_t, cls=None, box=t_box, valid=valid, region=None, valid_sizes=valid_sizes)
    terms = method(student, teacher, [], iteration)

    aligned = [align(f) for align, f in zip(method.align, f_s)]
    feat, head = [], []
    for g in range(0, num_images, 2):
        part = slice(g, g + 2)
        group_valid = [v[part] for v in valid] if padding else None
        feat.append(official_maskd_loss([a[part] for a in aligned], [f[part] for f in f_t], modules,
                                        iteration >= 7000, 7.0, group_valid))
        head.append(official_l1([s[part] for s in s_box], [t[part] for t in t_box], group_valid))
    official_feat, official_head = sum(feat) / len(feat), sum(head) / len(head)  # DDP: mean over GPUs

    assert terms["maskd_feat"].item() == pytest.approx(official_feat.item(), rel=1e-5)
    assert terms["maskd_head"].item() == pytest.approx(official_head.item(), rel=1e-5)
    leaves = [*f_s, *s_box, *method.align.parameters()]
    ours = torch.autograd.grad(terms["maskd_feat"] + terms["maskd_head"], leaves)
    theirs = torch.autograd.grad(official_feat + official_head, leaves)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-12)
