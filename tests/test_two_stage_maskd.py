"""MasKD on Faster R-CNN (train/methods/maskd.py, train/methods/maskd_tokens.py) against the official
code (hunto/MasKD @b5af34f).

- Head term: ``mmrazor/configs/distill/maskd/fpn_r101-fpn_r50_coco.py`` distils
  ``roi_head.bbox_head.fc_reg`` (R, 4K) with ``mmdet.SmoothL1Loss`` (beta 1.0, reduction mean, weight
  1), the teacher's RoI head run on the student's RoIs; ``mmdet_smooth_l1`` transcribes mmdet's
  ``smooth_l1_loss`` with the ``weighted_loss`` mean. One call is one GPU's 2 images.
- Feature term on P2..P6: the transcription of ``MasKDLoss.forward`` in tests/test_reference_maskd.py.
- Stage 1 (``mmdetection/configs/maskd/faster_rcnn_r101_fpn_2x_coco.py``): SGD lr 0.1 (momentum 0.9,
  weight decay 1e-4 from the base schedule), the frozen Faster R-CNN's RPN + RoI losses on masked maps.
"""
import copy

import pytest
import torch
from torch import nn

from detectors import build_detector
from detectors.frcnn import TwoStageOutput
from test_maskd_tokens import fixed_batch
from test_reference_maskd import OfficialMaskModule, ProjectTokens, official_maskd_loss
from train.methods import MasKD, build_method
from train.methods.maskd_tokens import (ReceptiveTokens, cosine_lr, learn_receptive_tokens,
                                        load_receptive_tokens, stage1_losses)
from train.teacher_batch import collate_teacher

STRIDES = (4, 8, 16, 32, 64)
LEVELS = ("p2", "p3", "p4", "p5", "p6")
C, T, K = 4, 3, 3
BATCH_HW = (64, 96)


def mmdet_smooth_l1(pred, target, beta=1.0):
    """mmdet/models/losses/smooth_l1_loss.py ``smooth_l1_loss`` with ``weighted_loss``'s reduction "mean"."""
    assert beta > 0
    if target.numel() == 0:
        return pred.sum() * 0
    diff = torch.abs(pred - target)
    loss = torch.where(diff < beta, 0.5 * diff * diff / beta, diff - 0.5 * beta)
    return loss.mean()


def level_hw(image_hw):
    """(h_l, w_l) of P2..P6 for a canonically padded image (multiples of 32)."""
    h, w = -(-image_hw[0] // 32) * 32, -(-image_hw[1] // 32) * 32
    return [(-(-h // s), -(-w // s)) for s in STRIDES]


def frcnn_case(image_sizes, rois_per_image, seed=0):
    """A frcnn student output (P2..P6, RoIs and their deltas) and a TeacherBatch collated from samples
    named fpn.p2 .. fpn.p6 at each image's canonical size, as a cache holds them."""
    generator = torch.Generator().manual_seed(seed)
    maps = level_hw(BATCH_HW)
    n = len(image_sizes)
    features = [torch.randn(n, C, h, w, dtype=torch.float64, generator=generator).requires_grad_() for h, w in maps]
    samples = [{f"fpn.{name}": torch.randn(C, h, w, dtype=torch.float64, generator=generator)
                for name, (h, w) in zip(LEVELS, level_hw(size))} for size in image_sizes]
    teacher = collate_teacher(samples, maps, "cpu", image_sizes=image_sizes, strides=STRIDES)
    teacher.fpn = [f.double() for f in teacher.fpn]  # collated as float32 (the cache's dtype); compared in float64
    rois = [torch.rand(r, 4, dtype=torch.float64, generator=generator) * 30 for r in rois_per_image]
    total = sum(rois_per_image)
    deltas = (2 * torch.randn(total, 4 * (K + 1), dtype=torch.float64, generator=generator)).requires_grad_()
    student = TwoStageOutput(features, [], [], [], STRIDES, list(image_sizes), [], [], rois,
                             torch.zeros(total, C, 7, 7, dtype=torch.float64),
                             torch.zeros(total, K + 1, dtype=torch.float64), deltas)
    return student, teacher


class FakeRoIHead:
    """``teacher.roi_head``: records the RoIs it is given, returns fixed teacher deltas (R, 4(K+1))."""

    def __init__(self, deltas):
        self.deltas, self.calls = deltas, []

    def __call__(self, rois):
        self.calls.append(rois)
        total = self.deltas.shape[0]
        return torch.zeros(total, C, 7, 7), torch.zeros(total, K + 1), self.deltas


def build(num_levels=5, **overrides):
    tokens = ReceptiveTokens(channels=C, num_levels=num_levels, num_tokens=T).double()
    return build_method("maskd", "frcnn", overrides, student_channels=C, teacher_channels=C, num_levels=num_levels,
                        prepared={"maskd": tokens}).double()


# ---------------------------------------------------------------------------------------------- stage 2
def test_official_frcnn_settings():
    method = build()
    config = method.config
    assert (config.loss_weight, config.student_mask_warmup, config.head_weight) == (1.0, 7330, 1.0)
    assert (config.stage1_iters, config.stage1_batch_size) == (2000, 16)
    assert (config.stage1_optimizer, config.stage1_lr, config.stage1_weight_decay) == ("sgd", 0.1, 1e-4)
    assert method.fields == ("fpn.p2", "fpn.p3", "fpn.p4", "fpn.p5", "fpn.p6")  # never head.box
    assert method.reads_teacher_roi_head and len(method.align) == 5
    no_head = build(head_weight=0.0)
    assert no_head.fields == method.fields and not no_head.reads_teacher_roi_head
    retina = build_method("maskd", "retina", prepared={"maskd": ReceptiveTokens(channels=8)})
    assert retina.fields == ("fpn", "head.box") and not retina.reads_teacher_roi_head
    assert retina.config.stage1_optimizer == "adam"
    with pytest.raises(ValueError, match="stage1_optimizer='adamw'"):
        MasKD.Config.for_family("frcnn", stage1_optimizer="adamw")


@pytest.mark.parametrize("num_images", [2, 3])
def test_head_term_is_mmdet_smooth_l1_on_the_class_columns_per_gpu(num_images):
    sizes = [(64, 96), (40, 70), (64, 50)][:num_images]
    rois_per_image = [5, 3, 4][:num_images]
    student, teacher = frcnn_case(sizes, rois_per_image)
    generator = torch.Generator().manual_seed(7)
    teacher_deltas = 2 * torch.randn(student.roi_box_deltas.shape, dtype=torch.float64, generator=generator)
    teacher.roi_head = FakeRoIHead(teacher_deltas)
    method = build(loss_weight=0.0)

    terms = method(student, teacher, [], 0)

    assert len(teacher.roi_head.calls) == 1 and teacher.roi_head.calls[0] is student.rois  # the student's RoIs
    # mmdet's fc_reg layout (R, 4K): class k at columns 4k..4k+3; ours has the background first.
    s_reg, t_reg = student.roi_box_deltas[:, 4:], teacher_deltas[:, 4:]
    assert ((s_reg - t_reg).abs() > 1).any() and ((s_reg - t_reg).abs() < 1).any()  # both branches
    official = []
    for first in range(0, num_images, 2):  # one call per GPU of 2 images, DDP's mean over the GPUs
        start, stop = sum(rois_per_image[:first]), sum(rois_per_image[:first + 2])
        official.append(mmdet_smooth_l1(s_reg[start:stop], t_reg[start:stop]))
    official = sum(official) / len(official)
    assert terms["maskd_head"].item() == pytest.approx(official.item(), rel=1e-10)
    ours, = torch.autograd.grad(terms["maskd_head"], student.roi_box_deltas)
    theirs, = torch.autograd.grad(official, student.roi_box_deltas)
    torch.testing.assert_close(ours, theirs)
    assert not ours[:, :4].any()  # the background's deltas take no part

    teacher.roi_head = FakeRoIHead(torch.cat([teacher_deltas[:, :4] + 100, teacher_deltas[:, 4:]], dim=1))
    assert method(student, teacher, [], 0)["maskd_head"].item() == pytest.approx(official.item(), rel=1e-10)
    teacher.roi_head = None
    with pytest.raises(ValueError, match="RoI head"):
        method(student, teacher, [], 0)


@pytest.mark.parametrize("iteration", [0, 7330])
@pytest.mark.parametrize("num_images", [2, 4])
def test_feature_term_on_p2_to_p6_matches_the_official_loss(num_images, iteration):
    sizes = [(64, 96), (40, 70), (64, 64), (33, 96)][:num_images]  # images 1 to 3 smaller than the batch
    student, teacher = frcnn_case(sizes, [2] * num_images, seed=num_images)
    teacher.roi_head = FakeRoIHead(student.roi_box_deltas.detach().clone())  # head term 0
    torch.manual_seed(3)
    modules = nn.ModuleList([OfficialMaskModule(C, T) for _ in STRIDES]).double().requires_grad_(False)
    method = MasKD(MasKD.Config.for_family("frcnn"), ProjectTokens(modules), student_channels=C, teacher_channels=C,
                   num_levels=5).double()

    terms = method(student, teacher, [], iteration)

    assert [tuple(v.shape[-2:]) for v in teacher.valid] == level_hw(BATCH_HW)
    aligned = [align(f) for align, f in zip(method.align, student.features)]
    official = []
    for first in range(0, num_images, 2):
        part = slice(first, first + 2)
        official.append(official_maskd_loss([a[part] for a in aligned], [f[part] for f in teacher.fpn], modules,
                                            iteration >= 7330, 1.0, [v[part] for v in teacher.valid]))
    official = sum(official) / len(official)
    assert terms["maskd_feat"].item() == pytest.approx(official.item(), rel=1e-10)
    assert terms["maskd_head"].item() == 0.0
    leaves = [*student.features, *method.align.parameters()]
    for a, b in zip(torch.autograd.grad(terms["maskd_feat"], leaves), torch.autograd.grad(official, leaves)):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------- stage 1


@pytest.fixture(scope="module")
def teacher_model():
    torch.manual_seed(0)
    return build_detector("frcnn-nano", num_classes=3)


def test_stage1_detection_loss_is_the_faster_rcnn_forward_after_the_neck(teacher_model):
    model, batch = teacher_model.train(), fixed_batch()
    with torch.no_grad():
        torch.manual_seed(11)
        out = model(batch.images, batch.image_sizes, batch.targets)
        torch.manual_seed(11)
        losses = model.forward_features(out.features, batch.image_sizes, batch.targets).losses
    assert losses.keys() == out.losses.keys() == {"rpn_cls", "rpn_box", "cls", "box"}
    for key in losses:
        assert torch.equal(losses[key], out.losses[key]), key

    tokens = ReceptiveTokens(model.config.fpn_channels, num_levels=5)
    model.eval().requires_grad_(False)
    terms = stage1_losses(model, tokens, batch)
    terms["detection"].backward()
    model.requires_grad_(True)
    for level in tokens.levels:  # RPN and RoI losses reach every level's tokens (P2..P5 pooled, P6 in the RPN)
        assert level.tokens.grad.abs().sum() > 0 and level.prob_head[2].weight.grad.abs().sum() > 0


def test_stage1_on_a_frcnn_teacher_is_sgd_seeded_and_leaves_the_teacher_alone(teacher_model):
    model, batch = teacher_model.train(), fixed_batch()
    before = copy.deepcopy(model.state_dict())  # parameters and BN buffers
    settings = dict(optimizer="sgd", lr=0.1, weight_decay=1e-4, progress=False, seed=4)
    torch.manual_seed(1)
    rng = torch.get_rng_state()
    runs = [learn_receptive_tokens(model, [batch], iters=3, **settings)]
    assert torch.equal(torch.get_rng_state(), rng)  # the sampling drew from a fork
    torch.manual_seed(2)  # another caller state: the same tokens
    runs.append(learn_receptive_tokens(model, [batch], iters=3, **settings))

    assert model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4)
        initial = ReceptiveTokens(model.config.fpn_channels, num_levels=5)
    for key, value in runs[0]["state"].items():
        assert torch.equal(value, runs[1]["state"][key]), key
        assert torch.isfinite(value).all()
    assert not torch.equal(runs[0]["state"]["levels.0.tokens"], initial.levels[0].tokens)
    meta = runs[0]["meta"]
    assert (meta["optimizer"], meta["lr"], meta["weight_decay"], meta["num_levels"]) == ("sgd", 0.1, 1e-4, 5)
    assert all(torch.isfinite(torch.tensor(meta[k])) for k in ("initial_detection_loss", "final_detection_loss"))

    # Two steps by hand: SGD with momentum 0.9 and L2 weight decay, buf = 0.9·buf + g + wd·p, p −= lr_i·buf,
    # lr cosine; g the gradient of the loss at the seeded draws with the teacher in training mode and its BN
    # in eval (training proposal counts), as the official hook runs it.
    two = learn_receptive_tokens(model, [batch], iters=2, tokens=copy.deepcopy(initial), **settings)
    expected = copy.deepcopy(initial)
    buffers = [torch.zeros_like(p) for p in expected.parameters()]
    model.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4)
        for iteration in range(2):
            expected.zero_grad()
            sum(stage1_losses(model, expected, batch).values()).backward()
            with torch.no_grad():
                for parameter, buffer in zip(expected.parameters(), buffers):
                    buffer.mul_(0.9).add_(parameter.grad + 1e-4 * parameter)
                    parameter -= cosine_lr(iteration, 2, 0.1, 1e-6) * buffer
    model.train().requires_grad_(True)
    learned = load_receptive_tokens(two)
    for (key, ours), theirs in zip(learned.state_dict().items(), expected.state_dict().values()):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7, msg=key)
