"""FRS and ICD on a Faster R-CNN ("frcnn") student and teacher: P2..P6, strides 4..64.

FRS: ``official_frs_two_per_gpu`` transcribes ``Distilling_FRS_Two.forward_train``
(duzhixing/FRS @decd60c ``detectors/distill_frs_two.py`` lines 87-111): per RPN level, mask = max
over the 3 anchors of σ(teacher objectness), feat = Σ mask·(y − adapted)² / Σ mask, cls = Σ mask·
F.binary_cross_entropy(σ(s), σ(t)) / Σ mask, summed over levels, times the weights (config
``resnet50_resnet101_faster_rcnn_frs.py``: 0.002, 0.1) and iter / 500 while warming up. One call
is one GPU (2 images); 4 images must give the mean of two calls. Images of equal size: no padding.

ICD: megvii-research/ICD @acf2726 ``RCNN_R_50_R101_icd_FPN_1x.yaml``: p2..p6, MAX_LABELS 100,
WEIGHT_VALUE 3.0; the key region (detectron2's ``mask_out_padding``) on strides 4..64.
"""
import math
from types import SimpleNamespace

import pytest
import torch

from detectors.frcnn import TwoStageOutput
from detectors.detector import valid_level_sizes
from test_reference_frs import official_frs_per_gpu
from train.methods import build_method
from train.methods.icd import num_queries
from train.teacher_batch import collate_teacher

STRIDES = (4, 8, 16, 32, 64)
LEVELS = ("p2", "p3", "p4", "p5", "p6")
C, A, K = 4, 3, 2


def two_stage_output(features, objectness, image_sizes):
    """A TwoStageOutput with the maps a method reads (RoI outputs empty)."""
    return TwoStageOutput(features=features, rpn_objectness=objectness,
                          rpn_deltas=[torch.zeros(o.shape[0], 4 * A, *o.shape[-2:]) for o in objectness],
                          anchors=[torch.zeros(f.shape[-2] * f.shape[-1] * A, 4) for f in features],
                          strides=STRIDES, image_sizes=list(image_sizes), proposals=[], proposal_scores=[], rois=[],
                          roi_pooled=torch.zeros(0, C, 7, 7), roi_cls_logits=torch.zeros(0, K + 1),
                          roi_box_deltas=torch.zeros(0, 4 * (K + 1)))


def teacher_samples(image_sizes, groups, generator, objectness_scale=2.0):
    """Per image: ``fpn.p2`` .. ``fpn.p6`` (C, h, w) and ``head.rpn.obj.p2`` .. (A, h, w) on its own region."""
    samples = []
    for size in image_sizes:
        sample = {}
        for level, (h, w) in zip(LEVELS, valid_level_sizes(size, STRIDES)):
            if "fpn" in groups:
                sample[f"fpn.{level}"] = torch.randn(C, h, w, generator=generator, dtype=torch.float64)
            if "head.rpn.obj" in groups:
                sample[f"head.rpn.obj.{level}"] = torch.randn(A, h, w, generator=generator,
                                                              dtype=torch.float64) * objectness_scale
        samples.append(sample)
    return samples


# ---------------------------------------------------------------------------------------------- FRS
def official_frs_two_per_gpu(y, stu_feature_adap, stu_cls_score, tea_cls_score, iteration,
                             feat_weight=0.002, cls_weight=0.1, warm_step=500):
    """distill_frs_two.py, forward_train, from ``layers = len(stu_cls_score)`` to the warmup: the loss lines
    of distill_frs_single.py (tests/test_reference_frs.py) on the RPN's objectness instead of class scores."""
    return official_frs_per_gpu(y, stu_feature_adap, stu_cls_score, tea_cls_score, feat_weight, cls_weight,
                                iteration, warm_step)


def test_frs_frcnn_settings_and_fields():
    method = build_method("frs", "frcnn", student_channels=C, teacher_channels=C)
    config = method.config
    assert (config.feat_weight, config.cls_weight, config.warmup_iters) == (0.002, 0.1, 500)
    assert method.fields == ("fpn.p2", "fpn.p3", "fpn.p4", "fpn.p5", "fpn.p6", "head.rpn.obj")
    assert len(method.adapters) == 5 and method.adapters[0].kernel_size == (3, 3)
    assert build_method("frs", "frcnn", {"feat_weight": 0}).fields == ("head.rpn.obj",)
    assert build_method("frs", "retina").fields == ("fpn", "head.cls")  # dense unchanged


@pytest.mark.parametrize("iteration", [200, 1000])
@pytest.mark.parametrize("num_images", [2, 4])
def test_frs_frcnn_matches_the_official_two_stage_code(num_images, iteration):
    generator = torch.Generator().manual_seed(num_images)
    image_sizes = [(64, 96)] * num_images  # equal sizes: the official sums see no padding
    level_sizes = valid_level_sizes(image_sizes[0], STRIDES)  # (16, 24) .. (1, 2)
    teacher = collate_teacher(teacher_samples(image_sizes, ("fpn", "head.rpn.obj"), generator), level_sizes, "cpu",
                              image_sizes=image_sizes, strides=STRIDES)
    teacher.fpn = [f.double() for f in teacher.fpn]
    teacher.rpn_obj = [o.double() for o in teacher.rpn_obj]
    f_s = [torch.randn(num_images, C, h, w, generator=generator, dtype=torch.float64).requires_grad_()
           for h, w in level_sizes]
    s_obj = [torch.randn(num_images, A, h, w, generator=generator, dtype=torch.float64).requires_grad_()
             for h, w in level_sizes]
    method = build_method("frs", "frcnn", student_channels=C, teacher_channels=C).double()
    terms = method(two_stage_output(f_s, s_obj, image_sizes), teacher, [], iteration)

    adapted = [adapter(f) for adapter, f in zip(method.adapters, f_s)]
    per_gpu = [official_frs_two_per_gpu([y[g:g + 2] for y in teacher.fpn], [a[g:g + 2] for a in adapted],
                                        [s[g:g + 2] for s in s_obj], [t[g:g + 2] for t in teacher.rpn_obj], iteration)
               for g in range(0, num_images, 2)]
    official_feat = sum(feat for feat, _ in per_gpu) / len(per_gpu)  # DDP: mean over GPUs
    official_cls = sum(cls for _, cls in per_gpu) / len(per_gpu)

    assert terms["frs_feat"].item() == pytest.approx(official_feat.item(), rel=1e-5)
    assert terms["frs_cls"].item() == pytest.approx(official_cls.item(), rel=1e-5)
    if num_images == 4:  # the per-GPU normalisation matters: one Σ S over all 4 images gives another value
        whole = official_frs_two_per_gpu(teacher.fpn, adapted, s_obj, teacher.rpn_obj, iteration)
        assert terms["frs_cls"].item() != pytest.approx(whole[1].item(), rel=1e-5)
    leaves = [*f_s, *s_obj, *method.parameters()]
    ours = torch.autograd.grad(terms["frs_feat"] + terms["frs_cls"], leaves)
    theirs = torch.autograd.grad(official_feat + official_cls, leaves)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-12)


# ---------------------------------------------------------------------------------------------- ICD
def test_icd_frcnn_settings_and_fields():
    method = build_method("icd", "frcnn", student_channels=16, teacher_channels=16, num_classes=K)
    assert method.config.distill_weight == 3.0 and method.config.max_queries == 100
    assert method.fields == ("fpn.p2", "fpn.p3", "fpn.p4", "fpn.p5", "fpn.p6")
    assert method.strides == STRIDES
    retina = build_method("icd", "retina", student_channels=16, teacher_channels=16, num_classes=K)
    assert retina.fields == ("fpn",) and retina.config.max_queries == 300 and retina.config.distill_weight == 8.0
    # 30 GT boxes: min(max(1, 6·30), max(100, 30)) = 100 queries (one-stage: 180).
    targets = [{"boxes": torch.tensor([[1.0, 1.0, 20.0, 30.0]]).repeat(30, 1), "labels": torch.zeros(30).long()}]
    assert int(method.make_queries(targets, [(64, 96)]).is_query.sum()) == num_queries(30, 5, 100) == 100
    assert int(retina.make_queries(targets, [(64, 96)]).is_query.sum()) == 180


def icd_case(image_sizes, seed=0):
    """A frcnn-shaped batch: teacher fpn.p2..p6 collated on strides 4..64, a TwoStageOutput student."""
    generator = torch.Generator().manual_seed(seed)
    batch_hw = tuple(max(-(-s[i] // 32) * 32 for s in image_sizes) for i in range(2))
    level_sizes = valid_level_sizes(batch_hw, STRIDES)
    teacher = collate_teacher(teacher_samples(image_sizes, ("fpn",), generator), level_sizes, "cpu",
                              image_sizes=image_sizes, strides=STRIDES)
    teacher.fpn = [f.float() for f in teacher.fpn]
    features = [torch.randn(len(image_sizes), C, h, w, generator=generator).requires_grad_() for h, w in level_sizes]
    objectness = [torch.zeros(len(image_sizes), A, h, w) for h, w in level_sizes]
    boxes = torch.tensor([[2.0, 3.0, 30.0, 40.0], [10.0, 5.0, 50.0, 20.0]])
    targets = [{"boxes": boxes, "labels": torch.tensor([0, 1])} for _ in image_sizes]
    return two_stage_output(features, objectness, image_sizes), teacher, targets


def test_icd_frcnn_key_region_follows_strides_4_to_64():
    torch.manual_seed(0)
    image_sizes = [(50, 70), (64, 100)]  # padded (64, 96) and (64, 128): the pair's batch is (64, 128)
    student, teacher, targets = icd_case(image_sizes)
    method = build_method("icd", "frcnn", student_channels=C, teacher_channels=C, num_classes=K,
                          overrides={"num_heads": 2})
    # By hand: maps (16, 32) (8, 16) (4, 8) (2, 4) (1, 2); s = (64/H_l + 128/W_l)/2 = 4, 8, 16, 32, 64;
    # region ceil(h/s) x ceil(w/s): 50x70 -> (13, 18) (7, 9) (4, 5) (2, 3) (1, 2); 64x100 -> (16, 25) (8, 13)
    # (4, 7) (2, 4) (1, 2). (On the dense strides 8..128 P2's region would be (7, 9).)
    expected = [[(13, 18), (7, 9), (4, 5), (2, 3), (1, 2)], [(16, 25), (8, 13), (4, 7), (2, 4), (1, 2)]]
    assert method.key_sizes(teacher, image_sizes, student.strides) == expected
    assert method.key_sizes(teacher, image_sizes) == expected  # the warm-up's default: the family's strides
    # Keys used = that region within each image's cached one: (13·18 + 7·9 + 4·5 + 2·3 + 1·2) = 325 for the
    # first image (cached P2 16x24 holds 13x18), 16·25 + 8·13 + 4·7 + 2·4 + 1·2 = 542 for the second.
    queries = method.make_queries(targets, image_sizes)
    with torch.no_grad():
        _, logits, _ = method.decode_instances(teacher, queries, student.strides)  # (N, heads, Q, S)
    assert logits.shape[-1] == sum(h * w for h, w in teacher.level_sizes) == 512 + 128 + 32 + 8 + 2
    assert torch.isfinite(logits[:, 0, 0]).sum(dim=1).tolist() == [325, 542]


def test_icd_frcnn_forward_and_warm_up():
    torch.manual_seed(1)
    image_sizes = [(50, 70), (64, 100), (64, 64)]
    student, teacher, targets = icd_case(image_sizes, seed=1)
    method = build_method("icd", "frcnn", student_channels=C, teacher_channels=C, num_classes=K,
                          overrides={"num_heads": 2, "detach_student_iters": 1, "pretrain_batches": 2})
    terms = method(student, teacher, targets, iteration=0)
    assert set(terms) == {"icd_distill", "icd_aux_cls", "icd_aux_box"}
    assert all(math.isfinite(v.item()) for v in terms.values()) and terms["icd_distill"].item() > 0
    sum(terms.values()).backward()
    assert all(f.grad is None for f in student.features)  # detached before detach_student_iters
    terms = method(student, teacher, targets, iteration=1)
    terms["icd_distill"].backward()
    assert all(f.grad.abs().sum() > 0 for f in student.features)  # every level P2..P6 is distilled

    batch = SimpleNamespace(targets=targets, image_sizes=image_sizes)
    report = method.warm_up(lambda count, what: [(batch, teacher)] * count)
    assert set(report) == {"icd_aux_cls", "icd_aux_box"} and all(math.isfinite(v) for v in report.values())
