"""Distillation methods: each loss against a value computed by hand from METHODS.md, plus gradients,
combinations, strict overrides and the valid-region contract.

Long on purpose: one section per method, each with its hand computations, shares the builders at the
top and sits above the contract every registered method must keep, so a method's check and the rules
it answers to read in one file.

The hand computations loop over explicit cells with ``math`` (or spell the formula out in plain
tensor ops) instead of calling the method's own helpers.
"""
import math

import pytest
import torch

from detectors import build_detector, flatten_levels
from detectors.detector import DetectorOutput, valid_level_sizes
from store.schema import LEVELS, REGION_POSITIVE, REGION_VLR
from detectors.zoo import TWO_STAGE_FAMILIES
from precompute.fields import TeacherOutputs, resolve_fields
from store import expand_fields
from train.methods import (FRS, ICD, LD, METHODS, DatasetStats, DeFeat, MasKD, MethodSpec, NoDistillation,
                           build_method, named_field_sets)
from train.methods.icd import InstanceQueries, num_queries, sample_queries
from train.methods.ld import gather_region_rows
from train.methods.maskd_tokens import ReceptiveTokens
from train.teacher_batch import TeacherBatch, collate_teacher

sig = torch.sigmoid


# ---------------------------------------------------------------------------------------------- builders
def make_student(features, cls_logits, box_outputs, num_anchors=1, strides=(8, 16, 32, 64, 128), image_sizes=None):
    anchors = [torch.zeros(f.shape[-2] * f.shape[-1] * num_anchors, 4) for f in features]
    n = features[0].shape[0]
    return DetectorOutput(list(features), list(cls_logits), list(box_outputs), anchors,
                          tuple(strides[:len(features)]), image_sizes or [(64, 64)] * n)


def make_teacher(valid_sizes, map_sizes, fpn=None, cls=None, box=None, region=None):
    """valid_sizes: per image, per level (h, w); map_sizes: per level (H, W)."""
    valid = []
    for level, (map_h, map_w) in enumerate(map_sizes):
        mask = torch.zeros(len(valid_sizes), 1, map_h, map_w, dtype=torch.bool)
        for index, sizes in enumerate(valid_sizes):
            h, w = sizes[level]
            mask[index, :, :h, :w] = True
        valid.append(mask)
    return TeacherBatch(fpn=fpn, cls=cls, box=box, valid=valid, region=region, valid_sizes=valid_sizes)


def set_identity(conv):
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.zero_()
        k = conv.kernel_size[0] // 2
        for c in range(conv.out_channels):
            conv.weight[c, c, k, k] = 1.0


def valid_cells(valid_size):
    h, w = valid_size
    return [(y, x) for y in range(h) for x in range(w)]


def bce(p, q):
    """BCE of prediction probability p against target probability q."""
    return -(q * math.log(p) + (1 - q) * math.log(1 - p))


def softmax(values, temperature=1.0):
    exps = [math.exp(v / temperature) for v in values]
    return [e / sum(exps) for e in exps]


def kl_mean(student_logits, teacher_logits, temperature):
    """LD's KL(T): T² · mean over bins of p_t (log p_t − log p_s)."""
    p_s, p_t = softmax(student_logits, temperature), softmax(teacher_logits, temperature)
    return temperature ** 2 * sum(t * (math.log(t) - math.log(s)) for s, t in zip(p_s, p_t)) / len(p_t)


# ---------------------------------------------------------------------------------------------- none
def test_none_has_no_terms_and_reads_nothing():
    method = build_method("none", "retina")
    assert isinstance(method, NoDistillation) and method.fields == ()
    assert method(None, None, [], 0) == {}


# ---------------------------------------------------------------------------------------------- FRS
def test_frs_matches_hand_computation():
    torch.manual_seed(0)
    n, c, k = 2, 2, 2
    valid_sizes = [[(2, 2)], [(1, 2)]]  # image 1 covers only the top row
    f_s, f_t = torch.randn(n, c, 2, 2), torch.randn(n, c, 2, 2)
    s_cls, t_cls = torch.randn(n, k, 2, 2), torch.randn(n, k, 2, 2) * 2
    method = FRS(FRS.Config.for_family("retina"), student_channels=c, teacher_channels=c, num_levels=1)
    set_identity(method.adapters[0])
    student = make_student([f_s], [s_cls], [torch.zeros(n, 4, 2, 2)])
    teacher = make_teacher(valid_sizes, [(2, 2)], fpn=[f_t], cls=[t_cls])
    terms = method(student, teacher, [], iteration=100)

    s_sum = feat = cls = 0.0
    for image in range(n):
        for y, x in valid_cells(valid_sizes[image][0]):
            richness = max(float(sig(t_cls[image, j, y, x])) for j in range(k))
            s_sum += richness
            feat += richness * sum(float(f_t[image, ch, y, x] - f_s[image, ch, y, x]) ** 2 for ch in range(c))
            cls += richness * sum(bce(float(sig(s_cls[image, j, y, x])), float(sig(t_cls[image, j, y, x])))
                                  for j in range(k))
    ramp = 100 / 500
    assert terms["frs_feat"].item() == pytest.approx(0.005 * ramp * feat / s_sum, rel=1e-5)
    assert terms["frs_cls"].item() == pytest.approx(0.02 * ramp * cls / s_sum, rel=1e-5)
    after = method(student, teacher, [], iteration=500)
    assert after["frs_feat"].item() == pytest.approx(0.005 * feat / s_sum, rel=1e-5)


def test_frs_gfl_defaults_and_no_adapters_without_feature_term():
    config = FRS.Config.for_family("gfl")
    assert (config.feat_weight, config.cls_weight, config.warmup_iters) == (0.1, 0.05, 500)
    method = build_method("frs", "gfl", {"feat_weight": 0.0})
    assert len(method.adapters) == 0 and method.fields == ("head.cls",)


# ---------------------------------------------------------------------------------------------- MasKD
class HandTokens:
    """Minimal stage-1 tokens: masks σ(tokens·F), weights softmax_t(mean_hw(prob·F))."""

    def __init__(self, tokens, prob):
        self.tokens, self.prob = tokens, prob  # (T, C) each

    def masks(self, features, level):
        return torch.einsum("tc,nchw->nthw", self.tokens, features).sigmoid()

    def weights(self, features, level):
        return torch.einsum("tc,nchw->nt", self.prob, features).div(features.shape[-2] * features.shape[-1]).softmax(1)


@pytest.mark.parametrize("iteration", [10, 7000])
def test_maskd_matches_hand_computation(iteration):
    torch.manual_seed(1)
    n, c, t = 2, 2, 2
    valid_sizes = [[(2, 2)], [(1, 2)]]
    tokens = HandTokens(torch.randn(t, c), torch.randn(t, c))
    f_s, f_t = torch.randn(n, c, 2, 2), torch.randn(n, c, 2, 2)
    s_box, t_box = torch.randn(n, 4, 2, 2), torch.randn(n, 4, 2, 2)
    method = MasKD(MasKD.Config.for_family("retina"), tokens, student_channels=c, teacher_channels=c, num_levels=1)
    set_identity(method.align[0])
    student = make_student([f_s], [torch.zeros(n, 2, 2, 2)], [s_box])
    teacher = make_teacher(valid_sizes, [(2, 2)], fpn=[f_t], box=[t_box])
    terms = method(student, teacher, [], iteration=iteration)

    def token_dot(tok, feats, image, y, x):
        return sum(float(tok[j] * feats[image, j, y, x]) for j in range(c))

    total = 0.0
    for image in range(n):
        cells = valid_cells(valid_sizes[image][0])
        pooled = [sum(token_dot(tokens.prob[k], f_t, image, y, x) for y, x in cells) / len(cells) for k in range(t)]
        p = softmax(pooled)
        image_loss = 0.0
        for k in range(t):
            m = {}
            for y, x in cells:
                m[y, x] = 1 / (1 + math.exp(-token_dot(tokens.tokens[k], f_t, image, y, x)))
                if iteration >= 7000:
                    m[y, x] *= 1 / (1 + math.exp(-token_dot(tokens.tokens[k], f_s, image, y, x)))
            per_channel = [sum(m[y, x] ** 2 * float(f_s[image, ch, y, x] - f_t[image, ch, y, x]) ** 2
                               for y, x in cells) / sum(m.values()) for ch in range(c)]
            image_loss += p[k] * sum(per_channel) / c
        total += image_loss / n
    assert terms["maskd_feat"].item() == pytest.approx(7 * total, rel=1e-5)

    errors = [abs(float(s_box[image, j, y, x] - t_box[image, j, y, x]))
              for image in range(n) for y, x in valid_cells(valid_sizes[image][0]) for j in range(4)]
    assert terms["maskd_head"].item() == pytest.approx(sum(errors) / len(errors), rel=1e-5)


def test_maskd_gfl_choice_and_tokens_stay_frozen():
    tokens = ReceptiveTokens(channels=8, num_levels=2)
    method = build_method("maskd", "gfl", student_channels=4, teacher_channels=8, num_levels=2, prepared={"maskd": tokens})
    assert (method.config.loss_weight, method.config.student_mask_warmup, method.config.head_weight) == (10, 5000, 0)
    assert method.fields == ("fpn",)
    trainable = {id(p) for group in method.param_groups() for p in group.params}
    assert not any(id(p) in trainable for p in tokens.parameters())
    assert all(id(p) in trainable for p in method.align.parameters())
    method.train()
    assert not tokens.training
    with pytest.raises(ValueError, match="receptive tokens"):
        build_method("maskd", "retina")


# ---------------------------------------------------------------------------------------------- LD
def test_ld_matches_hand_computation():
    torch.manual_seed(2)
    n, k, bins = 2, 2, 2  # reg_max = 1: 4 sides × 2 bins = 8 box outputs
    map_sizes = [(2, 3), (1, 2)]
    valid_sizes = [[(2, 2), (1, 1)], [(2, 3), (1, 2)]]  # image 0 is narrower than the batch
    s_cls = [torch.randn(n, k, h, w) for h, w in map_sizes]
    s_box = [torch.randn(n, 4 * bins, h, w) * 2 for h, w in map_sizes]
    # Rows: (image, level, index on the image's own grid, kind, iou) and the (y, x) each index means.
    rows = [(0, 0, 1 * 2 + 0, REGION_POSITIVE, 0.9, (1, 0)),   # width 2 on image 0
            (0, 0, 1 * 2 + 1, REGION_POSITIVE, 0.8, (1, 1)),
            (1, 0, 1 * 3 + 2, REGION_VLR, 0.4, (1, 2)),        # width 3 on image 1
            (1, 0, 0 * 3 + 1, REGION_POSITIVE, 0.7, (0, 1)),
            (1, 1, 0 * 2 + 1, REGION_POSITIVE, 0.6, (0, 1)),
            (0, 1, 0, REGION_VLR, 0.3, (0, 0))]
    t_cls, t_box = torch.randn(len(rows), k) * 2, torch.randn(len(rows), 4 * bins) * 3
    region = {"batch_index": torch.tensor([r[0] for r in rows]), "level": torch.tensor([r[1] for r in rows]),
              "index": torch.tensor([r[2] for r in rows]), "kind": torch.tensor([r[3] for r in rows]),
              "iou": torch.tensor([r[4] for r in rows]), "gt": torch.zeros(len(rows), dtype=torch.long),
              "cls": t_cls, "box_dist": t_box}
    student = make_student([torch.zeros(n, 1, h, w) for h, w in map_sizes], s_cls, s_box)
    teacher = make_teacher(valid_sizes, map_sizes, region=region)
    terms = build_method("ld", "gfl")(student, teacher, [], iteration=0)

    main = vlr = 0.0  # 2 images: one official group, so sums over the rows with no count of positives
    kd_per_level = {}
    for r, (image, level, _, kind, iou, (y, x)) in enumerate(rows):
        student_cls = [float(s_cls[level][image, j, y, x]) for j in range(k)]
        sides = [kl_mean([float(s_box[level][image, side * bins + b, y, x]) for b in range(bins)],
                         [float(t_box[r, side * bins + b]) for b in range(bins)], 10.0) for side in range(4)]
        if kind == REGION_POSITIVE:
            weight = max(1 / (1 + math.exp(-v)) for v in student_cls)
            main += weight * sum(sides) / 4
            kd_per_level.setdefault(level, []).append(kl_mean(student_cls, t_cls[r].tolist(), 2.0))
        else:
            vlr += iou * sum(sides) / 16
    kd = sum(sum(v) / len(v) for v in kd_per_level.values())
    assert terms["ld_main"].item() == pytest.approx(0.25 * main, rel=1e-5)
    assert terms["ld_vlr"].item() == pytest.approx(0.25 * vlr, rel=1e-5)
    assert terms["ld_kd"].item() == pytest.approx(10 * kd, rel=1e-5)
    assert "ld_vlr_kd" not in terms

    # Groups of one image each: the mean of the two single-image values (KD per level per group).
    single = build_method("ld", "gfl", {"images_per_group": 1})(student, teacher, [], iteration=0)
    main_1 = [0.0, 0.0]
    kd_1: dict[tuple[int, int], list[float]] = {}
    for r, (image, level, _, kind, _, (y, x)) in enumerate(rows):
        if kind != REGION_POSITIVE:
            continue
        student_cls = [float(s_cls[level][image, j, y, x]) for j in range(k)]
        sides = [kl_mean([float(s_box[level][image, side * bins + b, y, x]) for b in range(bins)],
                         [float(t_box[r, side * bins + b]) for b in range(bins)], 10.0) for side in range(4)]
        main_1[image] += max(1 / (1 + math.exp(-v)) for v in student_cls) * sum(sides) / 4
        kd_1.setdefault((image, level), []).append(kl_mean(student_cls, t_cls[r].tolist(), 2.0))
    assert single["ld_main"].item() == pytest.approx(0.25 * sum(main_1) / 2, rel=1e-5)
    assert single["ld_kd"].item() == pytest.approx(10 * sum(sum(v) / len(v) for v in kd_1.values()) / 2, rel=1e-5)
    with pytest.raises(ValueError, match="retina"):
        build_method("ld", "retina")
    with pytest.raises(ValueError, match="unknown"):
        build_method("ld", "gfl", {"normalize": False})  # dividing by the positives is gone


def test_fcos_official_values_and_the_methods_that_refuse_fcos():
    """FCOS values of the official configs (each FAMILY_DEFAULTS comment names its file); LD (whose
    FCOS variant needs a distribution head) and DeFeat (no FCOS code) refuse it, saying why."""
    frs = FRS.Config.for_family("fcos")
    assert (frs.feat_weight, frs.cls_weight, frs.warmup_iters) == (0.01, 0.05, 500)
    assert ICD.Config.for_family("fcos") == ICD.Config.for_family("retina")   # WEIGHT_VALUE 8.0, the rest default
    maskd = MasKD.Config.for_family("fcos")
    assert (maskd.loss_weight, maskd.student_mask_warmup, maskd.head_weight) == (10.0, 5000, 0.0)
    assert (maskd.stage1_iters, maskd.stage1_batch_size, maskd.stage1_lr) == (2000, 16, 0.01)
    # no head term: the FCOS config distils the neck alone, and no method reads the centerness
    assert MasKD(maskd, ReceptiveTokens(channels=4, num_levels=1), 4, 4, 1).fields == ("fpn",)
    assert all(not any(f.startswith("head.ctr") for f in cls.FIELDS) for cls in METHODS.values())
    with pytest.raises(ValueError, match=r"'fcos' \(LD distils box distributions .*which FCOS's head does not "
                                         r"predict; the official FCOS variant, configs/ld/ld_r50_fcos_r101_1x\.py.*"
                                         r"FCOSGFLHead.*supported: \['gfl'\]"):
        build_method("ld", "fcos")
    with pytest.raises(ValueError, match=r"'retina' \(LD distils box distributions .*RetinaNet's head.*"
                                         r"RetinaGFLHead"):
        build_method("ld", "retina")
    with pytest.raises(ValueError, match=r"'fcos' \(the official code builds its GT mask in "
                                         r"AnchorHead.get_gt_mask.*supported: \['frcnn', 'gfl', 'retina'\]"):
        build_method("defeat", "fcos")


def test_ld_declares_and_checks_the_vlr_rule_of_the_cache():
    method = build_method("ld", "gfl")
    assert method.cache_options == {"ld_vlr_rule": "official"}
    method.check_cache_options({"ld_vlr_rule": "official"})
    with pytest.raises(ValueError, match="does not record 'ld_vlr_rule'"):
        method.check_cache_options({}, where="old-cache")
    with pytest.raises(ValueError, match="'diou' rule but LD is configured for 'official'"):
        method.check_cache_options({"ld_vlr_rule": "diou"})
    build_method("ld", "gfl", {"vlr_rule": "diou"}).check_cache_options({"ld_vlr_rule": "diou"})
    assert build_method("ld", "gfl", {"vlr_weight": 0.0}).cache_options == {}  # no term reads the VLR rows
    with pytest.raises(ValueError, match="vlr_rule"):
        build_method("ld", "gfl", {"vlr_rule": "giou"})


def test_ld_imitation_matches_hand_computation():
    """'finegrained' imitation: MSE of the FPN maps over each group's region cells and channels, per
    level, a level without a positive row in the group adding 0; summed over levels, mean over groups.

    Anchors: level 0 stride 8, 16×16 centred at (8x, 8y); level 1 stride 16, 32×32 at (16x, 16y).
    Each GT equals one anchor (IoU 1); every other anchor has IoU <= 1/3 with it, so the region
    (IoU > 0.5 · max) is that one cell: image 0 level 0 (y=1, x=0), image 1 level 1 (y=0, x=1).
    """
    torch.manual_seed(4)
    n, channels = 2, 3
    map_sizes = [(2, 3), (1, 2)]
    valid_sizes = [[(2, 2), (1, 1)], [(2, 3), (1, 2)]]
    anchors = []
    for (h, w), stride in zip(map_sizes, (8, 16)):
        centres = torch.tensor([[stride * x, stride * y] for y in range(h) for x in range(w)], dtype=torch.float)
        anchors.append(torch.cat([centres - stride, centres + stride], dim=1))  # (h·w, 4), side 2·stride
    targets = [{"boxes": torch.tensor([[-8.0, 0.0, 8.0, 16.0]])}, {"boxes": torch.tensor([[0.0, -16.0, 32.0, 16.0]])}]
    s_fpn = [torch.randn(n, channels, h, w, requires_grad=True) for h, w in map_sizes]
    t_fpn = [torch.randn(n, channels, h, w) for h, w in map_sizes]
    cells = [(0, 0, 1, 0), (1, 1, 0, 1)]  # (image, level, y, x)

    def mse(image, level, y, x):
        return sum((float(s_fpn[level].detach()[image, c, y, x]) - float(t_fpn[level][image, c, y, x])) ** 2
                   for c in range(channels)) / channels

    def inputs(positive_levels, features=s_fpn):
        """Student and teacher with positive rows of image 0 on each of ``positive_levels`` (their
        logits do not matter here)."""
        count = len(positive_levels)
        region = {"batch_index": torch.zeros(count, dtype=torch.long), "level": torch.tensor(positive_levels),
                  "index": torch.zeros(count, dtype=torch.long), "kind": torch.full((count,), REGION_POSITIVE),
                  "iou": torch.ones(count), "gt": torch.zeros(count, dtype=torch.long),
                  "cls": torch.zeros(count, 2), "box_dist": torch.zeros(count, 8)}
        student = DetectorOutput(features, [torch.zeros(n, 2, h, w) for h, w in map_sizes],
                                 [torch.zeros(n, 8, h, w) for h, w in map_sizes], anchors, (8, 16), [(16, 16)] * n)
        return student, make_teacher(valid_sizes, map_sizes, fpn=t_fpn, region=region)

    def run(positive_levels, **overrides):
        return build_method("ld", "gfl", {"imitation_weight": 2.0, **overrides})(*inputs(positive_levels),
                                                                                  targets, 0)

    both = run([0, 1])
    assert both["ld_im"].item() == pytest.approx(2.0 * (mse(*cells[0]) + mse(*cells[1])), rel=1e-5)
    # No positive on level 1 in the (only) group: the official no-positive branch zeroes that level.
    assert run([0])["ld_im"].item() == pytest.approx(2.0 * mse(*cells[0]), rel=1e-5)
    # Groups of 1 image: image 1 has no positive row at all, so its group adds 0; the mean over 2 groups.
    assert run([0, 1], images_per_group=1)["ld_im"].item() == pytest.approx(2.0 * mse(*cells[0]) / 2, rel=1e-5)
    both["ld_im"].backward()
    grad = 2.0 * 2 * (s_fpn[0][0, :, 1, 0] - t_fpn[0][0, :, 1, 0]) / channels
    torch.testing.assert_close(s_fpn[0].grad[0, :, 1, 0], grad.detach())
    assert s_fpn[0].grad.count_nonzero() == channels and s_fpn[1].grad.count_nonzero() == channels
    assert "ld_im" not in run([0], imitation_weight=0.0)

    method = build_method("ld", "gfl", {"imitation_weight": 2.0})
    with pytest.raises(ValueError, match="GT boxes"):
        method(*inputs([0]), [], 0)
    with pytest.raises(ValueError, match="adapter"):  # the official code has none: channels must agree
        method(*inputs([0], features=[f[:, :2] for f in s_fpn]), targets, 0)
    with pytest.raises(ValueError, match="student 64, teacher 128"):  # refused when built, too
        build_method("ld", "gfl", {"imitation_weight": 2.0}, student_channels=64, teacher_channels=128)
    build_method("ld", "gfl", student_channels=64, teacher_channels=128)  # without imitation no FPN is compared


def test_region_rows_gather_with_several_anchors_and_each_images_width():
    torch.manual_seed(3)
    num_anchors, k, b = 3, 2, 4
    map_h, map_w = 3, 4
    valid_sizes = [[(3, 4)], [(2, 3)]]
    cls_map, box_map = torch.randn(2, num_anchors * k, map_h, map_w), torch.randn(2, num_anchors * b, map_h, map_w)
    picks = [(0, 2, 3, 1), (1, 1, 2, 2), (1, 0, 1, 0)]  # (image, y, x, anchor)
    index = [(y * valid_sizes[i][0][1] + x) * num_anchors + a for i, y, x, a in picks]
    region = {"batch_index": torch.tensor([p[0] for p in picks]), "level": torch.zeros(3, dtype=torch.long),
              "index": torch.tensor(index), "kind": torch.ones(3, dtype=torch.long), "iou": torch.zeros(3),
              "cls": torch.zeros(3, k), "box_dist": torch.zeros(3, b)}
    student = make_student([torch.zeros(2, 1, map_h, map_w)], [cls_map], [box_map], num_anchors=num_anchors)
    rows = gather_region_rows(student, make_teacher(valid_sizes, [(map_h, map_w)], region=region))
    for r, (i, y, x, a) in enumerate(picks):
        assert torch.equal(rows.student_cls[r], cls_map[i, a * k:(a + 1) * k, y, x])
        assert torch.equal(rows.student_box[r], box_map[i, a * b:(a + 1) * b, y, x])


# ---------------------------------------------------------------------------------------------- DeFeat
def test_defeat_matches_hand_computation():
    torch.manual_seed(4)
    c, k = 2, 2
    map_sizes, valid_sizes = [(4, 4), (2, 2)], [[(3, 4), (2, 2)]]
    f_s = [torch.randn(1, c, h, w) for h, w in map_sizes]
    f_t = [torch.randn(1, c, h, w) for h, w in map_sizes]
    s_cls = [torch.randn(1, k, h, w) for h, w in map_sizes]
    t_cls = [torch.randn(1, k, h, w) * 2 for h, w in map_sizes]
    targets = [{"boxes": torch.tensor([[0.0, 0.0, 16.0, 8.0],     # √(17·9) ≈ 12 -> P3, cells y 0, x 0..1
                                       [0.0, 0.0, 200.0, 120.0],  # √(201·121) ≈ 156 -> level 1 (P4 here)
                                       [24.0, 8.0, 25.0, 9.0]]),  # thinner than a cell -> P3 cell (1, 3)
                "labels": torch.tensor([0, 1, 0])}]
    fg_cells = [{(0, 0), (0, 1), (1, 3)}, {(0, 0), (0, 1), (1, 0), (1, 1)}]
    config = DeFeat.Config.for_family("retina", head_fg_weight=2.0, head_bg_weight=3.0, head_temperature=2.0)
    method = DeFeat(config, student_channels=c, teacher_channels=c, num_levels=2)
    for adapter in method.adapters:
        set_identity(adapter)
    student = make_student(f_s, s_cls, [torch.zeros(1, 4, h, w) for h, w in map_sizes], strides=(8, 16))
    teacher = make_teacher(valid_sizes, map_sizes, fpn=f_t, cls=t_cls)
    terms = method(student, teacher, targets, iteration=0)

    def squared(level, y, x):
        return sum(float(f_s[level][0, ch, y, x] - f_t[level][0, ch, y, x]) ** 2 for ch in range(c))

    def binary_kl(level, y, x, temperature):
        total = 0.0
        for j in range(k):
            p = 1 / (1 + math.exp(-float(t_cls[level][0, j, y, x]) / temperature))
            q = 1 / (1 + math.exp(-float(s_cls[level][0, j, y, x]) / temperature))
            total += p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))
        return total

    fg = bg = 0.0
    head_fg, head_bg, n_fg, n_bg = 0.0, 0.0, 0, 0
    for level in range(2):
        cells = set(valid_cells(valid_sizes[0][level]))
        fg_l, bg_l = fg_cells[level], cells - fg_cells[level]
        fg += sum(squared(level, y, x) for y, x in fg_l) / max(1, 2 * c * len(fg_l))
        bg += sum(squared(level, y, x) for y, x in bg_l) / max(1, 2 * c * len(bg_l))
        head_fg += sum(binary_kl(level, y, x, 2.0) for y, x in fg_l)
        head_bg += sum(binary_kl(level, y, x, 2.0) for y, x in bg_l)
        n_fg, n_bg = n_fg + len(fg_l), n_bg + len(bg_l)
    assert terms["defeat_fg"].item() == pytest.approx(4 / 2 * fg, rel=1e-5)
    assert terms["defeat_bg"].item() == pytest.approx(16 / 2 * bg, rel=1e-5)
    assert terms["defeat_head_fg"].item() == pytest.approx(2 * 4 * head_fg / n_fg, rel=1e-5)
    assert terms["defeat_head_bg"].item() == pytest.approx(3 * 4 * head_bg / n_bg, rel=1e-5)


def test_defeat_adapter_init_and_default_terms():
    method = build_method("defeat", "retina", student_channels=4, teacher_channels=8)
    weights = torch.cat([a.weight.flatten() for a in method.adapters])
    assert weights.abs().max() <= 2e-4 and weights.std() > 1e-5
    assert method.fields == ("fpn",)
    assert (method.config.fg_weight, method.config.bg_weight) == (4.0, 16.0)


# ---------------------------------------------------------------------------------------------- ICD
def _mlp(layers, x):
    for index, layer in enumerate(layers):
        x = x @ layer.weight.T + layer.bias
        if index < len(layers) - 1:
            x = x.clamp(min=0)
    return x


def _layer_norm(x, weight=None, bias=None, eps=1e-5):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    out = (x - mean) / torch.sqrt(var + eps)
    return out if weight is None else out * weight + bias


def test_icd_matches_hand_computation():
    torch.manual_seed(5)
    c, heads, k = 8, 2, 2
    d = c // heads
    map_size, valid = (2, 2), (2, 1)  # keys: (0, 0) and (1, 0); column 1 is batch padding
    f_t, f_s = torch.randn(1, c, *map_size), torch.randn(1, c, *map_size)
    # The corrected options (exact log2 bins, own image size, canonical key region); the official
    # defaults are checked against the official code in tests/test_reference_icd.py.
    config = ICD.Config.for_family("retina", num_heads=heads, scale_bins="log2", scale_image="own",
                                   key_region="canonical")
    method = ICD(config, num_classes=k, student_channels=c, teacher_channels=c)
    image_h, image_w = 1024, 512
    queries = InstanceQueries(labels=torch.tensor([[1, 0]]),
                              boxes=torch.tensor([[[0.1, 0.2, 0.6, 0.9], [0.3, 0.3, 0.5, 0.4]]]),
                              centers=torch.tensor([[[0.4, 0.5], [0.42, 0.33]]]),
                              is_real=torch.tensor([[True, False]]), is_query=torch.tensor([[True, True]]),
                              image_sizes=[(image_h, image_w)])
    student = make_student([f_s], [torch.zeros(1, k, *map_size)], [torch.zeros(1, 4, *map_size)])
    teacher = make_teacher([[valid]], [map_size], fpn=[f_t])
    terms = method(student, teacher, [], iteration=1000, queries=queries)
    method.requires_grad_(False)  # the hand computation below reads the weights as constants

    # Query descriptors: one-hot ⊕ sine(cx) ⊕ sine(cy) ⊕ scale one-hots, spelled out.
    def sine(v):
        freqs = [10000 ** (2 * (i // 2) / 128) for i in range(128)]
        return [math.sin(2 * math.pi * v / freqs[i]) for i in range(0, 128, 2)] + \
               [math.cos(2 * math.pi * v / freqs[i]) for i in range(1, 128, 2)]

    def scale_bins(box):
        w_px, h_px = (box[2] - box[0]) * image_w, (box[3] - box[1]) * image_h
        out = []
        for side in (w_px, h_px):
            one_hot = [0.0] * 5
            one_hot[min(4, max(0, math.floor(math.log2(side)) - 5))] = 1.0
            out += one_hot
        return out

    descriptors = []
    for q in range(2):
        box, (cx, cy) = queries.boxes[0, q].tolist(), queries.centers[0, q].tolist()
        one_hot = [1.0 if j == int(queries.labels[0, q]) else 0.0 for j in range(k)]
        descriptors.append(one_hot + sine(cx) + sine(cy) + scale_bins(box))
    assert scale_bins(queries.boxes[0, 0].tolist()) == [0, 0, 0, 1, 0, 0, 0, 0, 0, 1]  # 256 px, 717 px
    embedded = _mlp(method.query_encoder.layers, torch.tensor(descriptors))  # (2, C)

    # Keys at the two valid positions: F_t + Linear(sine position), DETR's normalised embedding.
    def grid_position(i, j, h, w):
        freqs = [10000 ** (2 * (m // 2) / (c // 2)) for m in range(c // 2)]
        y, x = 2 * math.pi * (i + 1) / (h + 1e-6), 2 * math.pi * (j + 1) / (w + 1e-6)
        return [math.sin(y / f) if m % 2 == 0 else math.cos(y / f) for m, f in enumerate(freqs)] + \
               [math.sin(x / f) if m % 2 == 0 else math.cos(x / f) for m, f in enumerate(freqs)]

    decoder = method.decoder
    keys_at = [(0, 0), (1, 0)]
    feats = torch.stack([f_t[0, :, i, j] for i, j in keys_at])  # (2, C)
    pos = torch.tensor([grid_position(i, j, *valid) for i, j in keys_at])
    keys = (feats + pos @ decoder.pos_proj.weight.T + decoder.pos_proj.bias) @ decoder.k_proj.weight.T \
        + decoder.k_proj.bias
    values = feats @ decoder.v_proj.weight.T + decoder.v_proj.bias  # (2 keys, C)
    qs = embedded @ decoder.q_proj.weight.T + decoder.q_proj.bias  # (2 queries, C)
    attended = torch.zeros(2, c)
    attention = torch.zeros(heads, 2, 2)  # (head, query, key)
    for h in range(heads):
        part = slice(h * d, (h + 1) * d)
        for q in range(2):
            logits = [(qs[q, part] @ keys[s, part]).item() / math.sqrt(d) for s in range(2)]
            weights = softmax(logits)
            attention[h, q] = torch.tensor(weights)
            attended[q, part] = sum(weights[s] * values[s, part] for s in range(2))
    x = _layer_norm(embedded + attended @ decoder.out_proj.weight.T + decoder.out_proj.bias,
                    decoder.norm1.weight, decoder.norm1.bias)
    x = _layer_norm(x + _mlp([decoder.ffn[0], decoder.ffn[2]], x), decoder.norm2.weight, decoder.norm2.bias)
    prediction = _mlp(method.aux_head.layers, x)  # (2, 5)

    real = [1.0, 0.0]
    aux_cls = sum(bce(float(sig(prediction[q, 0])), real[q]) for q in range(2)) / 2
    x1, y1, x2, y2 = queries.boxes[0, 0].tolist()
    cx, cy = queries.centers[0, 0].tolist()
    edges, sizes = [cx - x1, cy - y1, x2 - cx, y2 - cy], [x2 - x1, y2 - y1] * 2
    aux_box = sum(abs(float(sig(prediction[0, 1 + j])) - edges[j]) / sizes[j] for j in range(4))

    # Distillation at the real query's attention.
    student_feats = torch.stack([f_s[0, :, i, j] for i, j in keys_at])
    student_values = student_feats @ method.student_value.weight.T + method.student_value.bias
    distill = 0.0
    for h in range(heads):
        part = slice(h * d, (h + 1) * d)
        m = attention[h, 0]  # only the real query
        v_t, v_s = _layer_norm(values[:, part]), _layer_norm(student_values[:, part])  # (2 keys, d)
        distill += sum(float((m[:, None] * (v_s - v_t) ** 2).sum(0)[ch]) / float(m.sum()) for ch in range(d))
    distill /= heads * d

    assert terms["icd_aux_cls"].item() == pytest.approx(aux_cls, rel=1e-4)
    assert terms["icd_aux_box"].item() == pytest.approx(aux_box, rel=1e-4)
    assert terms["icd_distill"].item() == pytest.approx(8 * distill, rel=1e-4)


def test_icd_query_sampling_follows_the_rules():
    stats = DatasetStats.from_boxes(torch.tensor([0, 0, 0, 1]), torch.tensor([[0.1, 0.2], [0.3, 0.2], [0.2, 0.2],
                                                                             [0.5, 0.5]]), num_classes=3)
    assert stats.class_freq.tolist() == pytest.approx([0.75, 0.25, 0.0])
    assert stats.size_mean[0].tolist() == pytest.approx([0.2, 0.2])
    assert num_queries(0, 5, 300) == 1 and num_queries(2, 5, 300) == 12 and num_queries(60, 5, 300) == 300
    assert num_queries(400, 5, 300) == 400
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 50.0, 60.0], [0.0, 0.0, 100.0, 80.0]]),
                "labels": torch.tensor([2, 1])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}]
    queries = sample_queries(targets, [(80, 100), (64, 64)], stats, generator=torch.Generator().manual_seed(0))
    assert queries.is_query.sum(1).tolist() == [12, 1] and queries.is_real.sum(1).tolist() == [2, 0]
    assert queries.labels[0, :2].tolist() == [2, 1]
    assert torch.allclose(queries.boxes[0, 0], torch.tensor([0.1, 0.25, 0.5, 0.75]))
    fake = queries.is_query & ~queries.is_real
    assert set(queries.labels[fake].tolist()) <= {0, 1}  # class 2 has frequency 0
    sizes = queries.boxes[..., 2:] - queries.boxes[..., :2]
    assert (sizes[fake] <= 0.7 + 1e-6).all() and (queries.boxes[fake] >= 0).all() and (queries.boxes[fake] <= 1).all()
    centers = (queries.boxes[..., :2] + queries.boxes[..., 2:]) / 2
    offset = (queries.centers - centers).abs()
    assert (offset[queries.is_query] <= 0.3 * sizes[queries.is_query] + 1e-6).all()


def test_icd_detaches_student_features_early_and_has_its_own_optimiser():
    torch.manual_seed(6)
    method = ICD(ICD.Config.for_family("gfl", num_heads=2), num_classes=2, student_channels=4, teacher_channels=8)
    f_s = torch.randn(1, 4, 2, 2, requires_grad=True)
    student = make_student([f_s], [torch.zeros(1, 2, 2, 2)], [torch.zeros(1, 8, 2, 2)], image_sizes=[(16, 16)])
    teacher = make_teacher([[(2, 2)]], [(2, 2)], fpn=[torch.randn(1, 8, 2, 2)])
    targets = [{"boxes": torch.tensor([[1.0, 1.0, 9.0, 12.0]]), "labels": torch.tensor([1])}]
    sum(method(student, teacher, targets, iteration=999).values()).backward()
    assert f_s.grad is None
    assert method.student_value.weight.grad.abs().sum() > 0
    assert method.query_encoder.layers[0].weight.grad.abs().sum() > 0
    sum(method(student, teacher, targets, iteration=1000).values()).backward()
    assert f_s.grad.abs().sum() > 0
    (group,) = method.param_groups()
    assert (group.optimizer, group.lr, group.weight_decay, group.max_grad_norm) == ("adamw", 1e-4, 1e-4, 0.01)
    optimizer, scheduler = group.build(total_iters=100)
    assert group.warmup_iters == 0  # official build_tea_optimizer: WARMUP_FACTOR 1.0, i.e. no warmup
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)
    norm = group.clip()
    assert norm > 0 and torch.nn.utils.clip_grad_norm_(group.params, 1e9) <= 0.01 + 1e-6
    optimizer.step()
    scheduler.step()


# ---------------------------------------------------------------------------------------------- shared contract
C_S, C_T, K = 4, 8, 2
LEVEL_MAPS = [(4, 6), (2, 3)]
VALID = [[(4, 6), (2, 3)], [(3, 4), (2, 2)]]  # image 1 is smaller than the batch


def random_case(family, seed=0):
    """Student outputs and a full teacher batch (every group) on 2 levels; GFL reg_max 1."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).requires_grad_(False)

    num_anchors = 3 if family == "retina" else 1     # GFL and FCOS: one point per location
    box_channels = 8 if family == "gfl" else 4       # GFL reg_max 1; RetinaNet deltas, FCOS distances
    features = [randn(2, C_S, h, w).requires_grad_() for h, w in LEVEL_MAPS]
    cls_logits = [randn(2, num_anchors * K, h, w).requires_grad_() for h, w in LEVEL_MAPS]
    box_outputs = [randn(2, num_anchors * box_channels, h, w).requires_grad_() for h, w in LEVEL_MAPS]
    student = make_student(features, cls_logits, box_outputs, num_anchors=num_anchors, strides=(8, 16),
                           image_sizes=[(32, 48), (24, 32)])
    rows = [(0, 0, 7, REGION_POSITIVE), (0, 1, 2, REGION_VLR), (1, 0, 5, REGION_POSITIVE), (1, 0, 11, REGION_VLR),
            (1, 1, 3, REGION_POSITIVE)]
    region = {"batch_index": torch.tensor([r[0] for r in rows]), "level": torch.tensor([r[1] for r in rows]),
              "index": torch.tensor([r[2] for r in rows]), "kind": torch.tensor([r[3] for r in rows]),
              "gt": torch.zeros(len(rows), dtype=torch.long), "iou": torch.rand(len(rows), generator=generator),
              "cls": randn(len(rows), K), "box_dist": randn(len(rows), box_channels)}
    teacher = make_teacher(VALID, LEVEL_MAPS, fpn=[randn(2, C_T, h, w) for h, w in LEVEL_MAPS],
                           cls=[randn(2, num_anchors * K, h, w, scale=2.0) for h, w in LEVEL_MAPS],
                           box=[randn(2, num_anchors * box_channels, h, w) for h, w in LEVEL_MAPS], region=region)
    for level, valid in enumerate(teacher.valid):  # the cache holds zeros outside each image's region
        for maps in (teacher.fpn, teacher.cls, teacher.box):
            maps[level] = maps[level] * valid
    targets = [{"boxes": torch.tensor([[2.0, 3.0, 20.0, 25.0], [0.0, 0.0, 47.0, 31.0]]),
                "labels": torch.tensor([0, 1])},
               {"boxes": torch.tensor([[5.0, 5.0, 12.0, 9.0]]), "labels": torch.tensor([1])}]
    return student, teacher, targets


def build(spec, family, **overrides):
    tokens = ReceptiveTokens(channels=C_T, num_levels=2)
    torch.manual_seed(0)
    return build_method(spec, family, overrides, student_channels=C_S, teacher_channels=C_T, num_classes=K,
                        num_levels=2, prepared={"maskd": tokens})


# Every method that reads the teacher, with every detector family it has official settings for; the dense
# ones (random_case is a dense student; two-stage students: tests/test_two_stage_*.py).
CASES = [(name, family) for name, cls in METHODS.items() if cls.FIELDS for family in cls.Config.FAMILY_DEFAULTS]
DENSE_CASES = [(name, family) for name, family in CASES if family not in TWO_STAGE_FAMILIES]
SHAPE_OVERRIDES = {"icd": {"num_heads": 2}}  # C_T = 8: 8 heads would leave 1 dim per head
HEAD_OVERRIDES = {**SHAPE_OVERRIDES, "defeat": {"head_fg_weight": 2.0, "head_bg_weight": 2.0}}
ITERATION = 8000  # past every warmup: ramps done, ICD's student features attached, MasKD's student masks on


@pytest.mark.parametrize("name,family", DENSE_CASES)
def test_gradients_reach_student_outputs_and_learnable_parts(name, family):
    student, teacher, targets = random_case(family)
    method = build(name, family, **HEAD_OVERRIDES.get(name, {}))
    terms = method(student, teacher, targets, ITERATION)
    assert terms and all(torch.isfinite(v) and v.dim() == 0 for v in terms.values())
    sum(terms.values()).backward()
    reads = set(method.fields)  # the student outputs a method compares follow from the teacher fields it reads
    if "fpn" in reads:
        assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in student.features)
    if reads & {"head.cls", "region"}:
        assert any(c.grad is not None and c.grad.abs().sum() > 0 for c in student.cls_logits)
    if reads & {"head.box", "region"}:
        assert any(b.grad is not None and b.grad.abs().sum() > 0 for b in student.box_outputs)
    for group in method.param_groups():
        assert group.params and all(p.grad is not None and p.grad.abs().sum() > 0 for p in group.params), group.name


@pytest.mark.parametrize("name,family", DENSE_CASES)
def test_teacher_values_outside_valid_change_nothing(name, family):
    student, teacher, targets = random_case(family)
    method = build(name, family, **HEAD_OVERRIDES.get(name, {}))
    torch.manual_seed(1)
    before = method(student, teacher, targets, ITERATION)
    generator = torch.Generator().manual_seed(9)
    for maps in (teacher.fpn, teacher.cls, teacher.box):
        for level, valid in enumerate(teacher.valid):
            noise = torch.randn(maps[level].shape, generator=generator) * 50
            maps[level] = torch.where(valid, maps[level], noise)
    torch.manual_seed(1)
    after = method(student, teacher, targets, ITERATION)
    assert before.keys() == after.keys()
    for key in before:
        assert after[key].item() == pytest.approx(before[key].item(), rel=1e-5, abs=1e-7), key


def test_combination_is_the_sum_of_its_parts():
    student, teacher, targets = random_case("gfl")
    combined = build("ld+frs", "gfl")
    assert combined.NAME == "ld+frs" and combined.fields == ("region", "fpn", "head.cls")
    frs, ld = build("frs", "gfl"), build("ld", "gfl")
    frs.load_state_dict(combined.parts["frs"].state_dict())
    terms = combined(student, teacher, targets, 100)
    parts = {**ld(student, teacher, targets, 100), **frs(student, teacher, targets, 100)}
    assert terms.keys() == parts.keys() == {"ld_main", "ld_vlr", "ld_kd", "frs_feat", "frs_cls"}
    for key in terms:
        assert terms[key].item() == pytest.approx(parts[key].item(), rel=1e-6)
    assert sum(terms.values()).item() == pytest.approx(sum(parts.values()).item(), rel=1e-6)
    assert [g.name for g in combined.param_groups()] == ["frs"]


def test_overrides_are_routed_and_unknown_keys_rejected():
    method = build("ld+frs", "gfl", **{"frs.feat_weight": 0.3, "kd_weight": 5.0})
    assert method.parts["frs"].config.feat_weight == 0.3 and method.parts["ld"].config.kd_weight == 5.0
    with pytest.raises(ValueError, match=r"unknown override keys \['feat_wieght'\].*frs\.feat_weight"):
        build_method("frs", "retina", {"feat_wieght": 1.0})
    with pytest.raises(ValueError, match="ambiguous.*frs.warmup_iters.*icd.warmup_iters"):
        build_method("frs+icd", "retina", {"warmup_iters": 10})
    with pytest.raises(ValueError, match="unknown distillation method"):
        MethodSpec.parse("frs+kd")
    with pytest.raises(ValueError, match="cannot be combined"):
        MethodSpec.parse("none+frs")
    spec = MethodSpec.parse(" LD+frs")
    assert spec.names == ("ld", "frs") and str(spec) == "ld+frs" and "frs" in spec and MethodSpec.parse(spec) is spec
    assert all(cls.NAME == name for name, cls in METHODS.items())


@pytest.mark.parametrize("name,family", CASES)
def test_a_cache_written_for_a_method_holds_what_its_default_config_reads(name, family):
    """``precompute --fields NAME`` for a teacher of the family caches every field the default instance reads:
    the class's FIELDS, or its FAMILY_FIELDS for that family (a two-stage student's P2..P6 and RPN maps)."""
    method = build(name, family, **SHAPE_OVERRIDES.get(name, {}))
    teacher = TeacherOutputs(family, (), two_stage=family in TWO_STAGE_FAMILIES)
    assert set(expand_fields(list(method.fields))) <= set(resolve_fields(name, teacher))
    assert named_field_sets(family)[name] == METHODS[name].FAMILY_FIELDS.get(family, METHODS[name].FIELDS)
    assert named_field_sets()[name] == METHODS[name].FIELDS
    for preset, groups in METHODS[name].FIELD_PRESETS.items():  # a preset is a superset of the default reads
        assert set(resolve_fields(name)) <= set(resolve_fields(preset)) == set(resolve_fields(list(groups)))


# ---------------------------------------------------------------------------------------------- real detectors
def two_image_batch():
    """Two images (64x96 and 40x70, both canonically padded to 64x96) with three GT boxes."""
    sizes = [(64, 96), (40, 70)]
    images = torch.zeros(2, 3, 64, 96)
    for index, (h, w) in enumerate(sizes):
        images[index, :, :h, :w] = torch.randn(3, h, w)
    targets = [{"boxes": torch.tensor([[5.0, 6.0, 40.0, 50.0], [30.0, 10.0, 90.0, 60.0]]),
                "labels": torch.tensor([0, 2])},
               {"boxes": torch.tensor([[2.0, 3.0, 30.0, 30.0]]), "labels": torch.tensor([1])}]
    return sizes, images, targets


def test_every_method_runs_on_real_detector_outputs_and_cached_samples():
    """A nano GFL student and a small GFL teacher (each image run alone, canonical padding, as
    precompute does), samples cropped to the valid region, collated, every method run and backpropagated."""
    torch.manual_seed(0)
    student_model, teacher_model = build_detector("gfl-nano", num_classes=3), build_detector("gfl-small", num_classes=3)
    teacher_model.eval()
    sizes, images, targets = two_image_batch()
    student = student_model(images, sizes, targets)
    samples = []
    for index, (h, w) in enumerate(sizes):
        level_sizes = valid_level_sizes((h, w))
        padded_h, padded_w = level_sizes[0][0] * 8, level_sizes[0][1] * 8
        with torch.no_grad():
            out = teacher_model(images[index:index + 1, :, :padded_h, :padded_w], [(h, w)], [targets[index]])
        sample = {"meta.image_id": torch.tensor(index), "meta.valid_hw": torch.tensor([h, w])}
        for level, name in enumerate(LEVELS):
            sample[f"fpn.{name}"], sample[f"head.cls.{name}"] = out.features[level][0], out.cls_logits[level][0]
            sample[f"head.box.{name}"] = out.box_outputs[level][0]
        matched = out.assignment[0]["matched_gt"]
        positive = (matched >= 0).nonzero().squeeze(1)
        starts = torch.tensor([0] + [a.shape[0] for a in out.anchors[:-1]]).cumsum(0)
        level_of = torch.bucketize(positive, starts, right=True) - 1
        kind = torch.full_like(positive, REGION_POSITIVE)
        kind[::3] = REGION_VLR
        sample.update({"region.level": level_of, "region.index": positive - starts[level_of], "region.kind": kind,
                       "region.gt": matched[positive], "region.iou": torch.rand(len(positive)),
                       "region.cls": flatten_levels(out.cls_logits, 1)[0, positive],
                       "region.box_dist": flatten_levels(out.box_outputs, 1)[0, positive]})
        samples.append(sample)
    teacher = collate_teacher(samples, [tuple(f.shape[-2:]) for f in student.features], "cpu", image_sizes=sizes)
    method = build_method("frs+icd+maskd+ld+defeat", "gfl", {"maskd.head_weight": 1.0},
                          student_channels=student_model.config.fpn_channels,
                          teacher_channels=128, num_classes=3, prepared={"maskd": ReceptiveTokens(channels=128)})
    terms = method(student, teacher, targets, ITERATION)
    assert {"frs_feat", "frs_cls", "icd_distill", "icd_aux_cls", "icd_aux_box", "maskd_feat", "maskd_head", "ld_main",
            "ld_vlr", "ld_kd", "defeat_fg", "defeat_bg"} == set(terms)
    assert all(torch.isfinite(v) for v in terms.values())
    (sum(terms.values()) + sum(student.losses.values())).backward()
    assert all(p.grad is not None for p in student_model.backbone.parameters() if p.requires_grad)


def test_ld_is_zero_when_the_student_is_the_teacher():
    """Region rows cut from a model's own outputs on each image's own grid: LD gathers the same values."""
    torch.manual_seed(0)
    model = build_detector("gfl-nano", num_classes=3).eval()
    sizes = [(64, 96), (40, 60)]
    images = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        out = model(images, sizes)
    samples = []
    for index, size in enumerate(sizes):
        crop_cls, crop_box, level_ids, indices = [], [], [], []
        for level, (h, w) in enumerate(valid_level_sizes(size)):
            cls = out.cls_logits[level][index, :, :h, :w].permute(1, 2, 0).reshape(h * w, -1)
            box = out.box_outputs[level][index, :, :h, :w].permute(1, 2, 0).reshape(h * w, -1)
            pick = torch.arange(0, h * w, 5)
            crop_cls.append(cls[pick]), crop_box.append(box[pick])
            level_ids.append(torch.full_like(pick, level)), indices.append(pick)
        count = sum(len(i) for i in indices)
        samples.append({"meta.valid_hw": torch.tensor(size), "region.level": torch.cat(level_ids),
                        "region.index": torch.cat(indices), "region.kind": torch.full((count,), REGION_POSITIVE),
                        "region.gt": torch.zeros(count), "region.iou": torch.ones(count),
                        "region.cls": torch.cat(crop_cls), "region.box_dist": torch.cat(crop_box)})
    teacher = collate_teacher(samples, [tuple(f.shape[-2:]) for f in out.features], "cpu")
    terms = LD(LD.Config.for_family("gfl"))(out, teacher, [], 0)
    assert all(abs(v.item()) < 1e-6 for v in terms.values())


def test_precompute_samples_collate_and_drive_every_method():
    """precompute.fields.extract_fields -> collate_teacher -> every method; a teacher distilled into
    itself (same canonical sizes, so identical maps) has zero LD."""
    from detectors.views import Batch, ViewSpec
    from precompute import fields as fields_module
    torch.manual_seed(0)
    teacher_model = build_detector("gfl-small", num_classes=3).eval()
    student_model = build_detector("gfl-nano", num_classes=3)
    sizes, images, targets = two_image_batch()
    batch = Batch(images=images, image_sizes=sizes, targets=targets, image_ids=[1, 2], view_indices=[0, 0],
                  views=[ViewSpec(), ViewSpec()], orig_sizes=sizes)
    method = build_method("frs+icd+maskd+ld+defeat", "gfl", student_channels=student_model.config.fpn_channels,
                          teacher_channels=teacher_model.config.fpn_channels, num_classes=3, prepared={"maskd": ReceptiveTokens(channels=128)})
    samples = fields_module.extract_fields(teacher_model, batch, method.fields)
    student = student_model(images, sizes, targets)
    teacher = collate_teacher(samples, [tuple(f.shape[-2:]) for f in student.features], "cpu")
    assert teacher.image_ids == [1, 2] and teacher.region is not None
    terms = method(student, teacher, targets, ITERATION)
    assert all(torch.isfinite(v) for v in terms.values()) and "ld_main" in terms and "icd_distill" in terms
    with torch.no_grad():
        teacher_out = teacher_model(images, sizes, targets)
    self_terms = build_method("ld", "gfl")(teacher_out, teacher, targets, 0)
    assert all(abs(v.item()) < 1e-5 for v in self_terms.values())


def test_schedule_warnings_name_the_iteration_counts_a_short_run_swallows():
    from train.methods import default_iteration_settings, iteration_settings, schedule_warnings
    method = build_method("icd+frs", "gfl", {"icd.detach_student_iters": 10, "icd.warmup_iters": 1000},
                          student_channels=16,
                          teacher_channels=16, num_classes=3)
    assert iteration_settings(method) == {"icd.detach_student_iters": 10, "icd.warmup_iters": 1000,
                                          "frs.warmup_iters": 500}
    texts = schedule_warnings(method, 900)
    # 10 < 900/4 is fine; ICD's decoder warmup and FRS's ramp are not; scaled by 900/90000; then
    # ICD's own note for short runs (tests/test_method_prepare.py)
    assert [t.split("=")[0] for t in texts[:2]] == ["icd.warmup_iters", "frs.warmup_iters"]
    assert len(texts) == 3 and "icd.pretrain_batches" in texts[2]
    assert "--set icd.warmup_iters=10 " in texts[0] and "--set frs.warmup_iters=5 " in texts[1]
    assert schedule_warnings(method, 90_000) == []
    assert schedule_warnings(build_method("none", "gfl"), 10) == []
    # the same counts from the official configs alone (bench_train zeroes them for its steady state)
    assert default_iteration_settings("icd+frs", "gfl") == {"icd.detach_student_iters": 1000, "frs.warmup_iters": 500}
